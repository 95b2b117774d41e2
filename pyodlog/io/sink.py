"""Where a logger's records go.

The logger builds one :class:`~pyodlog.structures.CallRecord` per call and
hands it to a :class:`Sink`; the sink owns everything after that (copying off
the device, storage, upload). :class:`InMemorySink` keeps records in memory:
for tests, notebooks and quick inspection.
"""

from __future__ import annotations

import datetime
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyodlog.structures import CallRecord

__all__ = [
    "InMemorySink",
    "ResultInUseError",
    "ResultInfo",
    "SchemaMismatchError",
    "SegmentStore",
    "Sink",
]


class SchemaMismatchError(ValueError):
    """An existing result was created with another schema (fields, n_class, layers)."""


class ResultInUseError(RuntimeError):
    """``force_table_recreate`` would replace a result that another live writer still writes."""


@dataclass
class ResultInfo:
    """What a sink knows of a result when a logger opens it."""

    result_name: str
    latest_epoch: int | None


class Sink:
    """The interface between the logger and what stores its records.

    A sink must never block :meth:`submit` on disk or network I/O for long: the
    logger calls it on the inference path.
    """

    def open_result(
        self,
        model_name: str,
        version_name: str,
        result_name: str | None,
        schema: dict[str, Any],
        force_recreate: bool,
    ) -> ResultInfo:
        """Checks and resolves a result. ``result_name=None``: the most recent one, or a new one.

        Nothing is replaced or started yet: the logger calls :meth:`activate`
        once its constructor passed every check. ``force_recreate`` replaces a
        result only when its schema differs, and never deletes records (they
        are kept aside under ``<result>.replaced-<UTC time>``).

        Raises:
            SchemaMismatchError: the result exists with another schema and
                ``force_recreate`` is False.
            ResultInUseError: ``force_recreate`` would replace a result another
                live writer still writes.
        """
        raise NotImplementedError

    def activate(self) -> None:
        """Starts storing for the result :meth:`open_result` resolved (a replacement happens here)."""

    def submit(self, record: CallRecord) -> None:
        """Takes one call's record (quickly: this runs on the inference path)."""
        raise NotImplementedError

    def wait_for_save(self, interval: float = 3.0) -> None:
        """Blocks until every record submitted so far is stored."""
        raise NotImplementedError

    def close(self) -> None:
        """Flushes and releases everything; idempotent."""
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """Counters of what the sink did with the records (empty when it counts nothing)."""
        return {}


class SegmentStore(Sink, ABC):
    """A sink that stores records in segment files on disk: what export, upload and sync need.

    :class:`~pyodlog.io.store.HDF5Store` is the one pyodlog ships. The logger
    exports, uploads and syncs only through these members.
    """

    directory: Path | None
    """The result's folder (None until a result is open)."""
    rank: int
    """The ``torch.distributed`` rank whose segments this store writes."""

    @abstractmethod
    def segments(self) -> list[Path]:
        """The result's closed segments, oldest first."""

    @abstractmethod
    def rotate(self, interval: float = 3.0) -> None:
        """Stores everything submitted so far (as :meth:`wait_for_save`) and closes the open segment."""

    @abstractmethod
    def export(
        self, n_epoch: int | None, names: tuple[str, str, str], output_path: str | Path | None
    ) -> Path:
        """Writes the images of ``n_epoch`` (None: all) as a ZIP; ``names`` = (model, version, result)."""

    @abstractmethod
    def add_segment_listener(self, listener: Callable[[Path], None]) -> None:
        """Calls ``listener(path)`` on the writer thread each time a segment is closed."""


def new_result_name() -> str:
    """A result name from the current UTC time, e.g. ``20261124T230102Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


class InMemorySink(Sink):
    """Keeps records in memory, per (model, version, result).

    Args:
        max_records: keep at most this many records per result, dropping the
            oldest (None: keep all). Dropped records are counted in
            :attr:`dropped`.

    Results live as long as the sink; pass one sink to several loggers to share
    them.
    """

    def __init__(self, max_records: int | None = None) -> None:
        if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
            raise ValueError(f"max_records must be an int >= 1 or None, got {max_records!r}")
        self.max_records = max_records
        self._lock = threading.Lock()
        self._results: dict[tuple[str, str, str], deque[CallRecord]] = {}
        self._schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._order: list[tuple[str, str, str]] = []
        self._opening: tuple | None = None
        self.dropped = 0
        self.closed = False

    def open_result(
        self, model_name, version_name, result_name, schema, force_recreate
    ) -> ResultInfo:
        with self._lock:
            if result_name is None:
                mine = [k for k in self._order if k[:2] == (model_name, version_name)]
                result_name = mine[-1][2] if mine else new_result_name()
            key = (model_name, version_name, result_name)
            replace = key in self._schemas and self._schemas[key] != schema
            if replace and not force_recreate:
                raise SchemaMismatchError(
                    f"result {result_name!r} of {model_name}/{version_name} was created with another schema "
                    f"(additional_fields, n_class or target_layers differ): pass "
                    f"force_table_recreate=True to start it again (its records are kept under "
                    f"{result_name}.replaced-<UTC time>), or use another result_name"
                )
            self._opening = (key, schema, replace)
            if replace:
                return ResultInfo(result_name, None)
            epochs = [r.n_epoch for r in self._results.get(key, ()) if r.n_epoch is not None]
            return ResultInfo(result_name, max(epochs) if epochs else None)

    def activate(self) -> None:
        with self._lock:
            opening, self._opening = self._opening, None
            if opening is None:
                return
            key, schema, replace = opening
            if replace:  # the old records stay readable under another result name
                stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
                aside = (*key[:2], f"{key[2]}.replaced-{stamp}")
                self._results[aside] = self._results.pop(key)
                self._schemas[aside] = self._schemas.pop(key)
                self._order[self._order.index(key)] = aside
            if key not in self._schemas:
                self._results.setdefault(key, deque(maxlen=self.max_records))
                self._schemas[key] = schema
                self._order.append(key)

    def submit(self, record: CallRecord) -> None:
        key = (record.model_name, record.version_name, record.result_name)
        with self._lock:
            records = self._results.setdefault(key, deque(maxlen=self.max_records))
            if records.maxlen is not None and len(records) == records.maxlen:
                self.dropped += 1
            records.append(record)

    def records(
        self, model_name: str, version_name: str, result_name: str, n_epoch: int | None = None
    ) -> list[CallRecord]:
        """The records of a result (of one epoch when ``n_epoch`` is given)."""
        with self._lock:
            records = list(self._results.get((model_name, version_name, result_name), ()))
        return [r for r in records if n_epoch is None or r.n_epoch == n_epoch]

    def wait_for_save(self, interval: float = 3.0) -> None:
        return None  # records are stored as soon as they are submitted

    def close(self) -> None:
        self.closed = True
