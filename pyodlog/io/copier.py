"""The async copier: moves a record's device tensors to pinned host memory on a side stream.

The inference thread only enqueues copies: it records an event on its current
(compute) stream — the caller's own, so threads computing on different streams
each order their copies after their own work — a side stream waits for that
event and copies every CUDA tensor of the record into pinned host buffers with
``non_blocking=True``, and a second event marks the copies done. Each caller
stream gets a side stream of its own (:class:`CopyStreams`), so one thread's
copies never queue behind another thread's computation. The writer thread waits on that event
before it reads the buffers; the inference thread never synchronises with the
device. ``record_stream`` keeps the caching allocator from reusing a source
tensor's memory before the side stream has read it.

Pinned memory is bounded: at most ``max_inflight_bytes`` may be in flight; past
that the policy applies (``"block"`` waits up to ``block_timeout`` seconds for
the writer to release buffers, then drops; ``"drop"`` drops at once), and
dropped records are counted. Records without CUDA tensors pass through
unchanged: on the CPU the pipeline is the same, without streams.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import Tensor

from pyodlog.structures import CallRecord

__all__ = ["CopyStreams", "DeviceCopier", "PendingRecord"]


@dataclasses.dataclass
class PendingRecord:
    """A record whose host copies are ready once ``ready`` (a CUDA event, or None) has completed."""

    record: CallRecord
    ready: Any | None = None
    nbytes: int = 0

    def wait(self) -> CallRecord:
        if self.ready is not None:
            self.ready.synchronize()  # the writer thread waits, never the inference thread
        return self.record


def _cuda_tensors(record: CallRecord) -> Iterator[Tensor]:
    yield from record.detections.all_tensors()
    for feature in record.features.values():
        for part in (feature.payload, feature.scale, feature.offset):
            if part is not None:
                yield part


def _thumbnail_devices(record: CallRecord) -> set[torch.device]:
    source = record.thumbnails
    images = getattr(source, "images", None) or []
    return {t.device for t in images if isinstance(t, Tensor) and t.is_cuda}


def stream_key(stream: Any) -> Hashable:
    """What identifies a CUDA stream: its device and id (two ``Stream`` objects of one stream are equal)."""
    return (stream.device_type, stream.device_index, stream.stream_id)


class CopyStreams:
    """One side (copy) stream per caller stream, made on first use; thread-safe.

    Keyed by :func:`stream_key` of the caller's stream, so calls from threads
    on different compute streams copy on different side streams, while the
    calls of one stream share one (their copies stay in order). At most
    ``max_streams`` are kept (least recently used dropped first: a dropped
    side stream is only forgotten by this pool, work queued on it completes).

    Args:
        new_stream: makes a side stream for a device (default ``torch.cuda.Stream``).
        max_streams: how many side streams to keep.
    """

    def __init__(
        self, new_stream: Callable[[Any], Any] | None = None, max_streams: int = 64
    ) -> None:
        self._new_stream = new_stream or (lambda device: torch.cuda.Stream(device=device))
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._streams: OrderedDict[Hashable, Any] = OrderedDict()

    def for_caller(self, caller: Any, device: Any) -> Any:
        """The side stream that copies what ``caller`` (a stream on ``device``) produced."""
        key = stream_key(caller)
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = self._new_stream(device)
                while len(self._streams) > self.max_streams:
                    self._streams.popitem(last=False)
            else:
                self._streams.move_to_end(key)
            return stream

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)


class DeviceCopier:
    """Copies records off the GPU without blocking the caller (see the module docstring)."""

    def __init__(
        self, max_inflight_bytes: int = 1 << 30, policy: str = "block", block_timeout: float = 30.0
    ) -> None:
        if policy not in ("block", "drop"):
            raise ValueError(f"policy must be 'block' or 'drop', got {policy!r}")
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.policy = policy
        self.block_timeout = block_timeout
        self.inflight_bytes = 0
        self.dropped = 0
        self._cond = threading.Condition()
        self.streams = CopyStreams()

    def release(self, pending: PendingRecord) -> None:
        """Called by the writer once it no longer needs the record's host buffers."""
        if pending.nbytes:
            with self._cond:
                self.inflight_bytes -= pending.nbytes
                self._cond.notify_all()

    def _reserve(self, nbytes: int) -> bool:
        with self._cond:
            if self.policy == "drop":
                ok = (
                    self.inflight_bytes + nbytes <= self.max_inflight_bytes
                    or self.inflight_bytes == 0
                )
            else:
                ok = self._cond.wait_for(
                    lambda: (
                        self.inflight_bytes + nbytes <= self.max_inflight_bytes
                        or self.inflight_bytes == 0
                    ),
                    timeout=self.block_timeout,
                )
            if ok:
                self.inflight_bytes += nbytes
            else:
                self.dropped += 1
            return ok

    def to_host(self, record: CallRecord) -> PendingRecord | None:
        """Starts the copies; returns the pending record, or None if it was dropped (pool exhausted).

        Call it on the thread that computed ``record``, with the stream it
        computed on still current: the copies are ordered after that stream's work.
        """
        devices = {t.device for t in _cuda_tensors(record) if t.is_cuda}
        # Device thumbnails (log_images) stay on the device, encoded there by the writer once
        # ``ready`` completed: they need the event, not a copy.
        devices |= _thumbnail_devices(record)
        if not devices:
            return PendingRecord(record)
        nbytes = sum(t.numel() * t.element_size() for t in _cuda_tensors(record) if t.is_cuda)
        if not self._reserve(nbytes):
            return None
        device = next(iter(devices))
        # The stream this thread computed the record on: the copies wait for it, not for a global one.
        caller = torch.cuda.current_stream(device)
        stream = self.streams.for_caller(caller, device)
        produced = torch.cuda.Event()
        produced.record(caller)
        with torch.cuda.stream(stream):
            stream.wait_event(produced)

            def host(t):
                if t is None or not t.is_cuda:
                    return t
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                out.copy_(t, non_blocking=True)
                t.record_stream(stream)
                return out

            det = record.detections
            detections = det.map_tensors(host)
            features = {
                name: dataclasses.replace(
                    f, payload=host(f.payload), scale=host(f.scale), offset=host(f.offset)
                )
                for name, f in record.features.items()
            }
            fields = {
                k: host(v) if isinstance(v, torch.Tensor) else v for k, v in record.fields.items()
            }
            done = torch.cuda.Event()
            done.record(stream)
        copied = dataclasses.replace(
            record, detections=detections, features=features, fields=fields
        )
        return PendingRecord(copied, done, nbytes)
