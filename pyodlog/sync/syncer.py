"""The syncer: sends a result's closed segments to the collector, from disk, off the inference path.

As in wandb's split, records reach the disk first (the writer) and a separate
sender uploads from disk, so the network never blocks the writer or the
caller. ``upload()`` sends everything not yet acknowledged and waits; with
``auto_sync`` a background thread sends segments as they close, backing off
(exponentially, with jitter) while the collector is unreachable.

A segment goes in pieces of ``SyncConfig.chunk_bytes``; before sending, the
syncer asks the collector how much of it is already there, so an upload cut
off by a crash on either side resumes at the last byte the collector kept.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyodlog.io.reader import read_epochs
from pyodlog.io.segment import segment_rank
from pyodlog.sync.client import CollectorClient, SyncConfig, SyncError
from pyodlog.sync.state import SyncState
from pyodlog_protocol.files import sha256_file

__all__ = ["Syncer", "UploadSummary"]

log = logging.getLogger("pyodlog")


@dataclass
class UploadSummary:
    """What one ``upload()`` did."""

    segments: int = 0  # segments sent (stored by the collector now)
    bytes: int = 0  # bytes sent over the network
    already_stored: int = 0  # segments the collector had already (nothing sent)
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e6


class Syncer:
    """Uploads one result's closed segments to one collector.

    Args:
        client: the collector client.
        segments: returns the result's closed segment files.
        result_dir: the result folder (for the acknowledgement markers).
        model_name, version_name, result_name: the result.
        rank: this process's rank (auto-sync sends the segments its rank wrote).
        n_epoch: send only segments holding records of this epoch (None: all).
        config: :class:`~pyodlog.sync.client.SyncConfig`.
        auto: start the background thread.
    """

    def __init__(
        self,
        client: CollectorClient,
        segments: Callable[[], list[Path]],
        result_dir: Path,
        model_name: str,
        version_name: str,
        result_name: str,
        rank: int,
        n_epoch: int | None,
        config: SyncConfig,
        auto: bool,
    ) -> None:
        self.client = client
        self._segments = segments
        self.state = SyncState(result_dir, client.endpoint)
        self.names = (model_name, version_name, result_name)
        self.rank = rank
        self.n_epoch = n_epoch
        self.config = config
        self._epochs: dict[str, set[int]] = {}
        self._checksums: dict[str, tuple[int, int, str]] = {}
        self._pass_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.last_error: BaseException | None = None
        self.total = UploadSummary()
        self._thread: threading.Thread | None = None
        self._stop_deadline = 0.0
        if auto:
            self._thread = threading.Thread(
                target=self._run, name=f"pyodlog-sync-{result_name}", daemon=True
            )
            self._thread.start()
            self._wake.set()  # send what earlier processes left unsent

    # -- what to send ------------------------------------------------------------------------------

    def _holds_epoch(self, path: Path) -> bool:
        if self.n_epoch is None:
            return True
        epochs = self._epochs.get(path.name)
        if epochs is None:  # closed segments never change: read once
            epochs = self._epochs[path.name] = {int(e) for e in read_epochs(path).tolist()}
        return self.n_epoch in epochs

    def _checksum(self, path: Path) -> tuple[str, int]:
        """SHA-256 and size of a closed segment, hashed once (a retried pass does not read it again)."""
        stat = path.stat()
        cached = self._checksums.get(path.name)
        if cached is None or cached[:2] != (stat.st_size, stat.st_mtime_ns):
            cached = self._checksums[path.name] = (
                stat.st_size,
                stat.st_mtime_ns,
                sha256_file(path),
            )
        return cached[2], cached[0]

    def pending(self, own_rank_only: bool = False) -> list[Path]:
        """Closed segments of the selected epoch that the collector has not acknowledged."""
        acked = self.state.acknowledged_names()
        out = []
        for path in self._segments():
            if path.name in acked:
                continue
            if own_rank_only and segment_rank(path.name) not in (None, self.rank):
                continue
            if self._holds_epoch(path):
                out.append(path)
        return out

    # -- sending ------------------------------------------------------------------------------------

    def _send(self, path: Path, summary: UploadSummary, progress, stored: dict[str, str]) -> None:
        """Sends one segment; ``stored`` is the collector's listing (segment id -> SHA-256) of this pass."""
        model, version, result = self.names
        rank = segment_rank(path.name)
        rank = self.rank if rank is None else rank
        sha, size = self._checksum(path)
        if path.name in stored:  # the listing answered: no status request for this segment
            status = {"status": "stored", "sha256": stored[path.name]}
        else:  # how much of it the collector has staged (an upload cut off earlier resumes there)
            status = self.client.status(model, version, result, rank, path.name, sha)
        if status["status"] == "stored":
            if status.get("sha256") != sha:
                raise SyncError(
                    f"the collector holds {path.name} with another SHA-256 ({status.get('sha256')}) than "
                    f"the local file ({sha}): two different files share one segment id"
                )
            self.state.acknowledge(path.name, sha, size, self.client.endpoint)
            summary.already_stored += 1
            if progress is not None:
                progress.update(size)
            return
        offset = int(status.get("received", 0))
        restarted = False
        if progress is not None:
            progress.update(offset)
        with open(path, "rb") as f:
            while True:
                f.seek(offset)
                piece = f.read(min(self.config.chunk_bytes, size - offset))
                code, answer = self.client.put_piece(
                    model, version, result, rank, path.name, sha, offset, size, piece
                )
                if code in (200, 201):
                    summary.bytes += len(piece) if code == 201 else 0
                    if progress is not None:
                        progress.update(size - offset)
                    break
                if code == 202:
                    summary.bytes += len(piece)
                    offset = int(answer["received"])
                    if progress is not None:
                        progress.update(len(piece))
                    continue
                if code == 409 and answer.get("error") == "offset_mismatch":
                    offset = int(
                        answer["received"]
                    )  # another sender, or a lost answer: resume there
                    continue
                if code == 422 and not restarted:
                    restarted, offset = (
                        True,
                        0,
                    )  # bytes were damaged on the way: send once more from the start
                    continue
                raise SyncError(
                    f"the collector refused {path.name} (HTTP {code}): {answer.get('error')}: "
                    f"{answer.get('detail', '')}"
                )
        self.state.acknowledge(path.name, sha, size, self.client.endpoint)
        summary.segments += 1

    def sync_once(
        self, own_rank_only: bool = False, progress: bool | None = False
    ) -> UploadSummary:
        """Sends every pending segment once; raises :class:`SyncError` on the first failure."""
        summary = UploadSummary()
        start = time.monotonic()
        with self._pass_lock:
            todo = self.pending(own_rank_only)
            # One listing tells what the collector holds already (e.g. acknowledgements lost with a disk).
            stored = (
                {s["segment_id"]: s["sha256"] for s in self.client.list_segments(*self.names)}
                if todo
                else {}
            )
            bar = None
            if progress and todo:
                from tqdm import tqdm

                bar = tqdm(
                    total=sum(p.stat().st_size for p in todo),
                    unit="B",
                    unit_scale=True,
                    desc=f"pyodlog upload {self.names[2]}",
                    file=sys.stderr,
                )
            try:
                for path in todo:
                    try:
                        self._send(path, summary, bar, stored)
                    except SyncError:
                        summary.failed.append(path.name)
                        raise
            finally:
                if bar is not None:
                    bar.close()
                summary.seconds = time.monotonic() - start
                for name in ("segments", "bytes", "already_stored"):
                    setattr(self.total, name, getattr(self.total, name) + getattr(summary, name))
        return summary

    def upload_all(self) -> UploadSummary:
        """``logger.upload()``: sends every pending segment of the result (every rank's), and waits."""
        progress = self.config.progress if self.config.progress is not None else sys.stderr.isatty()
        try:
            summary = self.sync_once(own_rank_only=False, progress=progress)
        except SyncError as error:
            self.last_error = error
            raise
        self.last_error = None
        log.info(
            "pyodlog uploaded %d segments (%d bytes) in %.2f s; %d were already stored",
            summary.segments,
            summary.bytes,
            summary.seconds,
            summary.already_stored,
        )
        return summary

    # -- the background thread ------------------------------------------------------------------------

    def notify(self) -> None:
        """A segment closed (called from the writer thread): send it soon."""
        self._wake.set()

    def _run(self) -> None:
        failures = 0
        while True:
            delay = None
            if failures:
                delay = min(self.config.max_retry_interval, self.config.backoff * 2**failures) * (
                    0.5 + random.random()
                )
                if self._stopping.is_set():
                    delay = min(delay, max(0.0, self._stop_deadline - time.monotonic()))
            self._wake.wait(delay)
            self._wake.clear()
            try:
                self.sync_once(own_rank_only=True)
                failures, self.last_error = 0, None
            except Exception as error:
                if self.last_error is None or str(error) != str(self.last_error):
                    log.warning("pyodlog auto-sync failed, retrying with backoff: %s", error)
                failures, self.last_error = failures + 1, error
            if self._stopping.is_set() and (
                failures == 0 or time.monotonic() >= self._stop_deadline
            ):
                return

    def close(self) -> None:
        """Stops the background thread after a last pass, waiting at most ``close_timeout`` seconds."""
        if self._thread is not None and self._thread.is_alive():
            self._stop_deadline = time.monotonic() + self.config.close_timeout
            self._stopping.set()
            self._wake.set()
            self._thread.join(self.config.close_timeout)
            if self._thread.is_alive() or self.pending(own_rank_only=True):
                log.warning(
                    "pyodlog closed with segments not yet acknowledged by %s; the next logger on this result "
                    "sends them (or call upload())",
                    self.client.endpoint,
                )
        self.client.close()

    def stats(self) -> dict[str, object]:
        """Totals of this process: segments and bytes sent, segments already stored, the last error."""
        return {
            "segments_sent": self.total.segments,
            "bytes_sent": self.total.bytes,
            "already_stored": self.total.already_stored,
            "pending": len(self.pending()),
            "last_error": None if self.last_error is None else str(self.last_error),
        }
