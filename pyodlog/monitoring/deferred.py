"""The detections of a call, made off the call path (issue 22; logged calls too: issue 17).

A call that sampling left out before its model ran writes no rows: only the always-on
aggregates need its detections, their logits and embeddings, and those are summarised on the
store's writer thread anyway. So on the CPU the call does not parse its output (the match of
each returned detection to its candidate, which recomputes every candidate's scores and boxes):
it keeps references to what its hooks captured and a copy of the returned ``boxes``, ``scores``
and ``labels`` (a few hundred values), and hands over a :class:`DeferredDetections`; the parse
runs when the writer first reads the detections, on the writer's thread. The aggregates are the
same as if the call had been parsed on its path: the same function runs on the same tensors.

A logged call (issue 17) is deferred the same way: its rows, near-misses, uncertainty columns and
embeddings are those of a parse on the call path, because everything the parse reads that may
change once the call returned is fixed at call time: the returned detections (copied), the hook
captures (this call's own, never written again), and the settings (:class:`ParseSettings`: the
logger's ``near_miss``, ``near_miss_floor``, ``log_embeddings`` and the model's thresholds, which
a later logger, ``close()`` or the user may change). The call's sampling decision, input ids,
image sizes, field values and targets are in the record, made at call time.

Not deferred (parsed on the call path, as before): tensors on a device (a parse on another
thread would need its own stream ordering), a call with autograd history, an output that is not
torchvision's ``[{"boxes", "scores", "labels"}, ...]``, a family that opts out
(``ObjectDetectionTorchLogger.defer_parse = False``, or ``defer_sampled_out = False``), and calls beyond the logger's bound on
what unparsed calls may hold (``max_deferred_bytes``), so a writer that falls behind can never
pin more memory than that.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

from pyodlog.structures import DetectionBatch

__all__ = [
    "PARSE_SETTINGS",
    "DeferredBudget",
    "DeferredDetections",
    "FrozenView",
    "ParseSettings",
    "deferrable",
    "held_tensors",
    "nbytes",
    "torchvision_output_copy",
]

_FIELDS = tuple(f.name for f in dataclasses.fields(DetectionBatch))


def held_tensors(value: Any) -> Iterator[Tensor]:
    """The tensors of a captured value (a tensor, or dicts, lists and tuples of them)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from held_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from held_tensors(item)


def torchvision_output_copy(output: Any) -> list[dict[str, Any]] | None:
    """A copy of torchvision's ``[{"boxes", "scores", "labels", ...}, ...]`` output that the caller's
    later in-place changes cannot reach: new dicts, their ``boxes``, ``scores`` and ``labels``
    cloned (a few values per detection; other entries, e.g. masks, by reference). None for any
    other output."""
    if not isinstance(output, (list, tuple)) or not output:
        return None
    copy = []
    for item in output:
        if not isinstance(item, Mapping) or not all(
            isinstance(item.get(k), Tensor) for k in ("boxes", "scores", "labels")
        ):
            return None
        entry = dict(item)
        for key in ("boxes", "scores", "labels"):
            entry[key] = item[key].clone()
        copy.append(entry)
    return copy


class DeferredBudget:
    """How many bytes of captured tensors the unparsed calls of one logger hold (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.held = 0
        self.deferred = 0  # calls deferred so far
        self.refused = 0  # calls parsed on the call path for want of budget
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Reserves ``nbytes`` for one call; False (counted) when that would pass the bound."""
        with self._lock:
            if self.held + nbytes > self.max_bytes and self.held:
                self.refused += 1
                return False
            self.held += nbytes
            self.deferred += 1
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class DeferredDetections(DetectionBatch):
    """A :class:`DetectionBatch` made when first read: ``make()`` parses the call's output from
    the references it keeps. Reading any field (or :meth:`resolve`) parses it, once, in the
    reading thread; a parse that fails raises its error at every read.

    :meth:`all_tensors` in the thread that made it (the call, handing the record over: the
    store looks for device tensors to copy) returns the tensors held, without parsing; in any
    other thread it parses first. So the store's writer parses the call as soon as it takes it
    from its queue (it sizes each record by its tensors), and the call's references are dropped
    then, not when the batch is summarised: what unparsed calls hold is bounded by the queue.
    """

    _make: Callable[[], DetectionBatch] | None
    _held: list[Tensor]
    _on_done: Callable[[], None] | None
    _batch: DetectionBatch | None
    _error: Exception | None
    _lock: threading.Lock
    _maker: int

    def __init__(
        self,
        make: Callable[[], DetectionBatch],
        held: list[Tensor],
        on_done: Callable[[], None] | None = None,
    ) -> None:
        # No DetectionBatch.__init__: every field is read from the parsed batch (properties below).
        self.__dict__.update(
            _make=make,
            _held=held,
            _on_done=on_done,
            _batch=None,
            _error=None,
            _lock=threading.Lock(),
            _maker=threading.get_ident(),
        )

    @property
    def parsed(self) -> bool:
        """Whether the parse ran (successfully or not)."""
        return self._batch is not None or self._error is not None

    def resolve(self) -> DetectionBatch:
        """The parsed detections (parsed now if not yet; the call's references are then dropped)."""
        with self._lock:
            make = self._make
            if make is not None:
                try:
                    object.__setattr__(self, "_batch", make())
                except Exception as error:
                    object.__setattr__(self, "_error", error)
                finally:
                    done = self._on_done
                    object.__setattr__(self, "_make", None)
                    object.__setattr__(self, "_held", [])
                    object.__setattr__(self, "_on_done", None)
                    if done is not None:
                        done()
        if self._error is not None:
            raise self._error
        return self._batch  # type: ignore[return-value]

    def all_tensors(self) -> list[Tensor]:
        if self._batch is None and threading.get_ident() == self._maker:
            return list(self._held)
        return self.resolve().all_tensors()

    def map_tensors(self, fn) -> DetectionBatch:
        return self.resolve().map_tensors(fn)

    def __len__(self) -> int:
        return len(self.resolve())

    def __repr__(self) -> str:
        if self._batch is None:
            return f"DeferredDetections(not parsed yet, holding {len(self._held)} tensors)"
        return f"Deferred{self._batch!r}"

    def __eq__(self, other: object) -> bool:
        return self.resolve() == other

    __hash__ = None  # type: ignore[assignment]

    def __del__(self) -> None:
        # Never parsed (the store dropped the record: queue full, disk budget): the bytes it held
        # go back to the budget all the same.
        done = self.__dict__.get("_on_done")
        if done is not None:
            self.__dict__["_on_done"] = None
            done()

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (a quarantined record) as the plain batch it stands for.
        return (_plain, (self.resolve(),))


def _plain(batch: DetectionBatch) -> DetectionBatch:
    return batch


def _field(name: str) -> property:
    def read(self: DeferredDetections) -> Any:
        return getattr(self.resolve(), name)

    def write(self: DeferredDetections, value: Any) -> None:
        setattr(self.resolve(), name, value)

    return property(read, write, doc=f"``{name}`` of the parsed detections.")


for _name in _FIELDS:
    setattr(DeferredDetections, _name, _field(_name))
del _name


def deferrable(tensors: list[Tensor]) -> bool:
    """Whether a call holding ``tensors`` can be parsed later on another thread: all on the CPU
    and without autograd history (a graph would be kept alive until then)."""
    return all(t.is_cpu and not t.requires_grad for t in tensors)


def nbytes(tensors: list[Tensor]) -> int:
    """Bytes of ``tensors`` (views counted at their own size)."""
    return sum(t.nbytes for t in tensors)


class FrozenView:
    """A read-only view of a model (or one of its parts) whose named settings keep the values they
    had when the view was made; every other attribute is read from the object itself (its
    stateless parts: box coders, heads). ``values``: ``{attribute: value}``; ``children``:
    ``{attribute: FrozenView}`` for parts that hold frozen settings of their own."""

    __slots__ = ("_children", "_obj", "_values")

    def __init__(
        self, obj: Any, values: dict[str, Any], children: dict[str, FrozenView] | None = None
    ) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_children", children or {})

    @classmethod
    def of(cls, obj: Any, paths: Iterable[str]) -> FrozenView:
        """The view of ``obj`` with each dotted attribute path of ``paths`` fixed at its value now
        (a path that does not resolve is left out; :func:`resolvable` leaves them out once)."""
        values: dict[str, Any] = {}
        nested: dict[str, list[str]] = {}
        for path in paths:
            head, _, rest = path.partition(".")
            if rest:
                nested.setdefault(head, []).append(rest)
            elif hasattr(obj, head):
                values[head] = getattr(obj, head)
        children = {
            name: cls.of(getattr(obj, name), sub)
            for name, sub in nested.items()
            if hasattr(obj, name)
        }
        return cls(obj, values, children)

    @staticmethod
    def resolvable(obj: Any, paths: Iterable[str]) -> tuple[str, ...]:
        """The dotted attribute paths of ``paths`` that ``obj`` has."""

        def has(path: str) -> bool:
            target = obj
            for name in path.split("."):
                if not hasattr(target, name):
                    return False
                target = getattr(target, name)
            return True

        return tuple(path for path in paths if has(path))

    def settings(self) -> dict[str, Any]:
        """The fixed values, by dotted path."""
        out = dict(self._values)
        for name, child in self._children.items():
            out.update({f"{name}.{k}": v for k, v in child.settings().items()})
        return out

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        children = object.__getattribute__(self, "_children")
        if name in children:
            return children[name]
        return getattr(object.__getattribute__(self, "_obj"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"a deferred parse reads the model's settings as they were at call time; "
            f"it cannot set {name!r}"
        )

    def __repr__(self) -> str:
        return f"FrozenView({type(self._obj).__name__}, {self.settings()!r})"


@dataclasses.dataclass(frozen=True)
class ParseSettings:
    """What a call's parse reads besides its output and captures, fixed at call time.

    ``owner``: the logger; ``core``: its (unwrapped) model, and ``view`` its :class:`FrozenView`
    (``pyodlog.models.common.parts(core)`` returns the view while this is current);
    ``near_miss``, ``near_miss_floor``, ``log_embeddings``: the logger's (read through its
    properties while this is current); ``autocast_dtype``: the calling thread's CPU autocast
    dtype (None: autocast off), under which the parse runs."""

    owner: Any
    core: Any
    view: FrozenView
    near_miss: int
    near_miss_floor: float | None
    log_embeddings: bool
    autocast_dtype: Any = None


#: The settings of the deferred parse running in this context (None: no deferred parse; the
#: logger's and the model's live values are read).
PARSE_SETTINGS: contextvars.ContextVar[ParseSettings | None] = contextvars.ContextVar(
    "pyodlog_parse_settings", default=None
)
