"""Always-on aggregates: cheap, mergeable statistics of 100 % of the calls, sampled out or not.

Every call a logger sees is summarised off the inference path (by the writer, from the
record it handed over: one :func:`summarize_calls` over the calls of a flush, in numpy; or
from the record's own ``aggregate_summary``, a :func:`summarize_call` made elsewhere) into
fixed-size counts, whether or not sampling keeps its rows:

* per ``(dataset_type, n_epoch)``: calls, images, detections, calls whose rows were kept
  (``sampled_calls``), and a detections-per-image histogram;
* per ``(dataset_type, n_epoch, class)``: detections, histograms with fixed bins of the
  score, the normalised entropy and the margin of the detection's class probabilities, and
  the box size (``sqrt(w * h)`` in original-image pixels), and an embedding sketch: the
  count, sum and sum of outer products of a seeded random projection of the embeddings to
  :data:`SKETCH_DIM` dimensions (so the running mean and covariance of that projection).

A call sampled out with ``Sampling(sampled_out_aggregates="output")`` is not parsed: it adds
everything above but the entropy and margin histograms and the embedding sketch, which then
count the kept calls' detections only (their totals fall short of ``detections`` by the
sampled-out calls' detections).

Everything is a sum, so aggregates merge exactly (counts) or up to float64 rounding
(sketch sums) across calls, segments, ranks and processes, in any order. The writer keeps
one :class:`Aggregates` in memory and writes it into each segment it closes (the
``aggregates`` dataset: UTF-8 JSON, ``docs/file-format.md``); the reader merges them
(:meth:`pyodlog.ResultData.aggregates`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pyodlog.ops.compression import (
    ONE_THREAD_MACS,
    c_order_projection,
    matmul_one_thread,
)
from pyodlog.ops.uncertainty import SOFTMAX, detection_uncertainty
from pyodlog.structures import CallRecord

__all__ = [
    "AGGREGATES_FORMAT",
    "BINS",
    "SKETCH_DIM",
    "SKETCH_SEED",
    "Aggregates",
    "CallSummary",
    "CallView",
    "CallsSummary",
    "summarize_call",
    "summarize_calls",
    "summary_fits",
    "uncertainty",
    "uncertainty_np",
]

AGGREGATES_FORMAT = 1
SKETCH_DIM = 16
SKETCH_SEED = 0x5EED_A66
_UNIT = [i / 20 for i in range(21)]
#: Fixed bin edges. A value below the first edge counts in the first bin, above the last in
#: the last; NaN counts in the last bin (so a histogram always sums to its detections).
BINS: dict[str, list[float]] = {
    "score": _UNIT,
    "entropy": _UNIT,  # entropy / ln(C) of the class probabilities: 0 certain, 1 uniform
    "margin": _UNIT,  # top-1 minus top-2 class probability
    "box_size": [0.0] + [float(2**i) for i in range(1, 14)] + [math.inf],  # sqrt(w * h), pixels
    "detections_per_image": [0, 1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 256, math.inf],
}
_HISTS = ("score", "entropy", "margin", "box_size")
_WIDTHS = [len(BINS[h]) - 1 for h in _HISTS]
_STARTS = np.concatenate([[0], np.cumsum(_WIDTHS)[:-1]]).tolist()
_ROW = int(sum(_WIDTHS))


def uncertainty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised entropy and margin of ``softmax(logits)`` per row of ``Tensor[N, C]``.

    On the CPU the computation is :func:`uncertainty_np`'s (what the writer's aggregates use,
    one thread, float32); on a device it is the fused operator's
    (:func:`pyodlog.ops.detection_uncertainty`, what the call path logs as the ``entropy`` and
    ``margin`` columns, in float64), with the entropy divided by ``ln C`` as here. The two agree
    to float32 rounding (``tests/test_writer_summary.py``).

    Returns:
        ``(entropy, margin)``, float32 ``[N]``: entropy in nats divided by ``ln C`` (0: one
        class certain, 1: uniform), margin = top-1 minus top-2 probability (1 for ``C == 1``).
    """
    logits = logits.float()
    if logits.device.type == "cpu":
        entropy_np, margin_np = uncertainty_np(logits.detach().numpy())
        return torch.from_numpy(entropy_np), torch.from_numpy(margin_np)
    n, c = logits.shape
    if n == 0 or c == 0:
        empty = logits.new_zeros(n)
        return empty, empty + 1
    u = detection_uncertainty(logits, SOFTMAX)
    entropy = u.entropy / math.log(c) if c > 1 else u.entropy * 0
    return entropy, u.margin


@dataclass
class CallSummary:
    """What one call contributes to the aggregates, and what sampling decides on.

    Attributes:
        dataset_type, n_epoch: the call's key (-1: untagged).
        n_images, n_detections: counts.
        detections_per_image: ``int64[len(BINS["detections_per_image"]) - 1]``.
        hist: ``int64[C + 1, sum of histogram widths]``: per class (row ``C``: labels outside
            ``[0, C)``), the score, entropy, margin and box-size histograms side by side.
        sketch_n, sketch_sum, sketch_sq: per class, the count, ``[SKETCH_DIM]`` sum and
            ``[SKETCH_DIM, SKETCH_DIM]`` sum of outer products of the projected embeddings
            (None without embeddings).
        labels, entropy, margin: per detection (what a sampling policy looks at).
        has_near_miss: the call holds a near-miss (False when near-misses are not logged).
    """

    dataset_type: str
    n_epoch: int
    n_images: int
    n_detections: int
    detections_per_image: np.ndarray
    hist: np.ndarray
    sketch_n: np.ndarray | None
    sketch_sum: np.ndarray | None
    sketch_sq: np.ndarray | None
    labels: np.ndarray
    entropy: np.ndarray
    margin: np.ndarray
    has_near_miss: bool = False


def _has_near_miss(record: CallRecord) -> bool:
    """The record's detections carry near-misses (``near_miss=K`` > 0) and one image has one."""
    near = getattr(record.detections, "near_misses", None)
    counts = getattr(near, "counts", None)
    if isinstance(counts, torch.Tensor):
        return bool(counts.sum().item() > 0)
    return False


def summarize_call(record: CallRecord, n_class: int) -> CallSummary:
    """The :class:`CallSummary` of one record (host tensors: run it off the inference path).

    The same computation as :func:`summarize_calls` over one record (so the two agree exactly).
    """
    batch = summarize_calls([record], n_class)
    return CallSummary(
        batch.keys[0][0],
        batch.keys[0][1],
        int(batch.n_images[0]),
        int(batch.n_detections[0]),
        batch.detections_per_image[0],
        batch.hist[0],
        None if batch.sketch_n is None else batch.sketch_n[0],
        None if batch.sketch_sum is None else batch.sketch_sum[0],
        None if batch.sketch_sq is None else batch.sketch_sq[0],
        batch.labels,
        batch.entropy,
        batch.margin,
        batch.has_near_miss[0],
    )


def summary_fits(summary: Any, n_class: int) -> bool:
    """Whether ``summary`` is a :class:`CallSummary` that aggregates of ``n_class`` classes can add
    (what the writer checks before it uses a record's precomputed ``aggregate_summary``)."""
    if not isinstance(summary, CallSummary):
        return False
    hist = summary.hist
    dpi = summary.detections_per_image
    return (
        isinstance(hist, np.ndarray)
        and hist.shape == (n_class + 1, _ROW)
        and isinstance(dpi, np.ndarray)
        and dpi.shape == (len(BINS["detections_per_image"]) - 1,)
        and (summary.sketch_n is None or np.shape(summary.sketch_n) == (n_class + 1,))
    )


@dataclass
class CallView:
    """What a sampling policy looks at for one call of a :class:`CallsSummary` (a
    :class:`CallSummary` without the histograms, which are summed per key instead)."""

    dataset_type: str
    n_epoch: int
    n_images: int
    n_detections: int
    labels: np.ndarray
    entropy: np.ndarray
    margin: np.ndarray
    has_near_miss: bool = False


@dataclass
class CallsSummary:
    """What several calls contribute to the aggregates, computed together.

    One bucketing and one ``bincount`` over the detections of every call (a flush's worth)
    instead of a dozen small operations per call; histograms and sketches are kept per key
    ``(dataset_type, n_epoch)`` (``group_keys``), the per-detection values per call
    (:meth:`call`, what a sampling policy decides on).

    Attributes:
        keys: each call's ``(dataset_type, n_epoch)``; ``call_group``: its index in ``group_keys``.
        n_images, n_detections: ``int64[calls]``; ``det_offsets``: ``int64[calls + 1]`` into
            ``labels``, ``entropy`` and ``margin`` (every call's detections, one after the other).
        hist: ``int64[groups, C + 1, sum of widths]``; ``detections_per_image``: ``int64[groups, bins]``.
        sketch_n, sketch_sum, sketch_sq: per group and class (None when no call has embeddings).
        has_near_miss: per call.
    """

    n_class: int
    keys: list[tuple[str, int]]
    call_group: np.ndarray
    group_keys: list[tuple[str, int]]
    n_images: np.ndarray
    n_detections: np.ndarray
    det_offsets: np.ndarray
    labels: np.ndarray
    entropy: np.ndarray
    margin: np.ndarray
    has_near_miss: list[bool]
    hist: np.ndarray
    detections_per_image: np.ndarray
    sketch_n: np.ndarray | None = None
    sketch_sum: np.ndarray | None = None
    sketch_sq: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def call(self, i: int) -> CallView:
        """The ``i``-th call's key, counts and per-detection values (views, no copy)."""
        a, b = int(self.det_offsets[i]), int(self.det_offsets[i + 1])
        dataset_type, n_epoch = self.keys[i]
        return CallView(
            dataset_type,
            n_epoch,
            int(self.n_images[i]),
            int(self.n_detections[i]),
            self.labels[a:b],
            self.entropy[a:b],
            self.margin[a:b],
            self.has_near_miss[i],
        )

    def add_to(self, aggregates: Aggregates, kept: list[bool] | np.ndarray) -> None:
        """Counts every call into ``aggregates`` (``kept[i]``: call ``i``'s rows were written).

        Raises:
            ValueError: ``aggregates`` counts another number of classes.
        """
        if aggregates.n_class != self.n_class:
            raise ValueError(
                f"a summary of {self.n_class} classes cannot be added to aggregates of {aggregates.n_class}"
            )
        kept_calls = np.bincount(
            self.call_group, weights=np.asarray(kept, np.float64), minlength=len(self.group_keys)
        )
        calls = np.bincount(self.call_group, minlength=len(self.group_keys))
        images = np.bincount(self.call_group, weights=self.n_images, minlength=len(self.group_keys))
        detections = np.bincount(
            self.call_group, weights=self.n_detections, minlength=len(self.group_keys)
        )
        for g, key in enumerate(self.group_keys):
            group = aggregates._group(key)
            group.calls += int(calls[g])
            group.images += int(images[g])
            group.detections += int(detections[g])
            group.sampled_calls += int(kept_calls[g])
            group.detections_per_image += self.detections_per_image[g]
            group.hist += self.hist[g]
            if self.sketch_n is not None:
                group.sketch_n += self.sketch_n[g]
                group.sketch_sum += self.sketch_sum[g]  # type: ignore[index]
                group.sketch_sq += self.sketch_sq[g]  # type: ignore[index]


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array (a view for a CPU tensor); 16-bit floats widened to float32."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


def _bucket_np(values: np.ndarray, name: str) -> np.ndarray:
    """The bin of each value: ``searchsorted(inner edges, side="right")`` (a value on an edge
    counts in the bin it opens), NaN in the last bin. The fixed bins of [0, 1] and of the box
    size are found by arithmetic and checked against the edges (the same bins, several times
    faster than a binary search)."""
    if name == "box_size":
        return _bucket_powers_of_two(values)
    if BINS[name] is _UNIT:
        return _bucket_unit(values)
    inner = _INNER_NP[name]
    index = np.searchsorted(inner, values.astype(np.float64, copy=False), side="right")
    index[np.isnan(values)] = len(inner)
    return index


def _bucket_unit(values: np.ndarray) -> np.ndarray:
    """:func:`_bucket_np` for the 20 bins of [0, 1]: ``floor(20 v)``, then moved by one where the
    float64 edges ``i / 20`` say otherwise."""
    with np.errstate(invalid="ignore"):
        index = np.clip(values * np.float32(20), 0, 19)
    nan = np.isnan(index)
    index[nan] = 0
    index = index.astype(np.intp)
    index -= values < _UNIT_EDGES[index]
    index += values >= _UNIT_EDGES[index + 1]
    np.minimum(index, 19, out=index)  # +inf
    index[nan] = 19
    return index


def _bucket_powers_of_two(values: np.ndarray) -> np.ndarray:
    """:func:`_bucket_np` for the box size's bins ``[0, 2, 4, ..., 8192, inf]``: the exponent."""
    _, exponent = np.frexp(values)
    index = np.clip(exponent.astype(np.intp) - 1, 0, 13)
    with np.errstate(invalid="ignore"):
        index[values < 2] = 0
    index[np.isnan(values) | (values == np.inf)] = 13  # the last bin
    return index


_INNER_NP = {name: np.asarray(edges[1:-1], np.float64) for name, edges in BINS.items()}
# The unit bins' edges with -inf and +inf around them: bin k holds _UNIT_EDGES[k] <= v < [k + 1].
_UNIT_EDGES = np.concatenate([[-np.inf], _INNER_NP["score"], [np.inf]])
assert BINS["box_size"][1:-1] == [float(2**i) for i in range(1, 14)]  # _bucket_powers_of_two


def uncertainty_np(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`uncertainty` of float32 rows ``[N, C]`` in numpy (one thread; a row's values do not
    depend on the other rows): the writer's computation for records without the ``entropy`` and
    ``margin`` columns (those it has are used as logged). The fused operator
    (:func:`pyodlog.ops.detection_uncertainty`, softmax heads) computes the same definition in
    float64; it is not used here because on one thread it is slower than these float32 passes,
    and it would run on the intra-op thread pool the model uses.

    With ``y = z - max z``, ``e = exp y`` and ``s = sum e``: entropy ``log s - sum(e y) / s``,
    margin ``(1 - exp y2) / s`` (``y2`` the second largest); rows where that is not finite
    (``-inf`` or NaN logits) take the definition ``-sum p log p`` itself.
    """
    n, c = logits.shape
    if n == 0 or c == 0:
        return np.zeros(n, np.float32), np.ones(n, np.float32)
    logits = logits.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # Row maxima by argmax and a flat take, sums by einsum: numpy's max and sum reduce a
        # short last axis several times slower (measured: 1.8x for the whole function on
        # 800 x 91). A NaN row's argmax is its NaN: the row takes the definition below, as before.
        row_start = np.arange(0, n * c, c)
        top = logits.argmax(axis=1) + row_start
        shifted = logits - logits.reshape(-1)[top][:, None]
        e = np.exp(shifted)
        total = np.einsum("ij->i", e)
        entropy = np.log(total) - np.einsum("ij,ij->i", e, shifted) / total
        if c > 1:
            flat = shifted.reshape(-1)  # shifted is ours (a view of it)
            flat[top] = -np.inf
            second = flat[shifted.argmax(axis=1) + row_start]
            margin = (1 - np.exp(second)) / total
        else:
            margin = np.ones(n, np.float32)
        bad = np.flatnonzero(~(np.isfinite(entropy) & np.isfinite(margin)))
        if len(bad):
            entropy[bad], margin[bad] = _uncertainty_by_definition(logits[bad])
    entropy = entropy / np.float32(math.log(c)) if c > 1 else entropy * 0
    return entropy.astype(np.float32, copy=False), margin.astype(np.float32, copy=False)


def _uncertainty_by_definition(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (nats, ``0 log 0 = 0``) and margin of ``softmax(logits)`` as written (NaN in, NaN out)."""
    c = logits.shape[1]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        entropy = -(p * np.nan_to_num(log_p, nan=0.0, posinf=0.0, neginf=0.0)).sum(axis=1)
        if c < 2:
            return entropy, np.ones(len(p), p.dtype)
        top = p.argmax(axis=1)[:, None]
        first = np.take_along_axis(p, top, axis=1)[:, 0]
        np.put_along_axis(p, top, -np.inf, axis=1)
        return entropy, first - p.max(axis=1)


class _RecordRows:
    """The valid rows of one record's padded ``[B, D, ...]`` detection tensors, as numpy arrays
    (views when every image is at its quota, the common case under load)."""

    def __init__(self, det: Any) -> None:
        self.det = det
        self.counts = _host(det.counts).astype(np.int64, copy=False).reshape(-1)
        self.n, self.d = len(self.counts), int(det.boxes.shape[1])
        self.full = bool(self.n) and int(self.counts.min()) == self.d
        self.valid = np.arange(self.d)[None, :] < self.counts[:, None]

    def rows(self, t: torch.Tensor) -> np.ndarray:
        a = _host(t)
        return a.reshape(self.n * self.d, *a.shape[2:]) if self.full else a[self.valid]

    def column(self, name: str) -> np.ndarray | None:
        """A per-detection float column the record carries (e.g. ``entropy``), or None."""
        value = getattr(self.det, name, None)
        if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (self.n, self.d):
            return self.rows(value).astype(np.float32, copy=False)
        return None

    def projected_embeddings(self) -> np.ndarray:
        """The embeddings' sketch projection, float64 ``[rows, SKETCH_DIM]``."""
        emb = self.rows(self.det.embeddings).astype(np.float32, copy=False)
        projection = c_order_projection(emb.shape[-1], SKETCH_DIM, SKETCH_SEED)
        return matmul_one_thread(emb, projection).astype(np.float64)


def _gram(z: np.ndarray) -> np.ndarray:
    """``z.T @ z`` for ``z [N, K]``, summed over row blocks that BLAS keeps on one thread."""
    rows = max(1, (ONE_THREAD_MACS - 1) // max(1, z.shape[1] * z.shape[1]))
    out = np.zeros((z.shape[1], z.shape[1]), np.float64)
    for start in range(0, z.shape[0], rows):
        block = z[start : start + rows]
        out += block.T @ block
    return out


def summarize_calls(records: list[CallRecord], n_class: int) -> CallsSummary:
    """The :class:`CallsSummary` of several records, computed together (host tensors: off the
    inference path); per key the same counts as :func:`summarize_call` of each record, summed.

    In numpy (one thread: a writer thread never competes with the model's intra-op threads).
    Per record it only picks the valid rows (views when every image is at its quota) and, for
    a record without ``entropy``/``margin`` columns, computes them from its logits; the buckets
    and histograms are one ``bincount`` over every detection of every record.
    """
    classes = n_class + 1
    keys = [(r.dataset_type, -1 if r.n_epoch is None else int(r.n_epoch)) for r in records]
    group_index: dict[tuple[str, int], int] = {}
    call_group = np.asarray([group_index.setdefault(k, len(group_index)) for k in keys], np.int64)
    n_groups = len(group_index)
    counts_of: list[np.ndarray] = []
    labels_of: list[np.ndarray] = []
    scores_of: list[np.ndarray] = []
    boxes_of: list[np.ndarray] = []
    entropy_of: list[np.ndarray] = []
    margin_of: list[np.ndarray] = []
    z_of: list[tuple[int, np.ndarray]] = []  # records with embeddings: their sketch projection
    internals_of: list[np.ndarray] = []  # per detection: its uncertainty is known (parsed)
    for i, record in enumerate(records):
        part = _RecordRows(record.detections)
        counts_of.append(part.counts)
        labels_of.append(part.rows(part.det.labels).astype(np.int64, copy=False))
        scores_of.append(part.rows(part.det.scores).astype(np.float32, copy=False))
        boxes_of.append(part.rows(part.det.boxes).astype(np.float32, copy=False).reshape(-1, 4))
        if getattr(part.det, "output_only", False):
            # What the model returned only (a call sampled out with
            # sampled_out_aggregates="output"): no uncertainty to count (NaN here, which no
            # sampling rule keeps, and left out of the entropy and margin histograms below).
            unknown = np.full(len(labels_of[-1]), np.nan, np.float32)
            entropy_of.append(unknown)
            margin_of.append(unknown)
            internals_of.append(np.zeros(len(unknown), bool))
            continue
        internals_of.append(np.ones(len(labels_of[-1]), bool))
        entropy, margin = part.column("entropy"), part.column("margin")
        if entropy is not None and n_class > 1:
            entropy = entropy / np.float32(math.log(n_class))  # the logged column is in nats
        if entropy is None or margin is None:  # no column: from the logits (row by row)
            own_entropy, own_margin = uncertainty_np(
                part.rows(part.det.logits).astype(np.float32, copy=False)
            )
            entropy = own_entropy if entropy is None else entropy
            margin = own_margin if margin is None else margin
        entropy_of.append(entropy)
        margin_of.append(margin)
        if part.det.embeddings is not None:
            z_of.append((i, part.projected_embeddings()))

    def cat(parts: list[Any], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else empty)

    counts_all = cat(counts_of, np.zeros(0, np.int64))
    n_images = np.asarray([len(c) for c in counts_of], np.int64)
    n_detections = np.asarray([len(a) for a in labels_of], np.int64)
    det_offsets = np.concatenate([[0], np.cumsum(n_detections)]).astype(np.int64)
    labels = cat(labels_of, np.zeros(0, np.int64))
    scores = cat(scores_of, np.zeros(0, np.float32))
    boxes = cat(boxes_of, np.zeros((0, 4), np.float32))
    entropy_all = cat(entropy_of, np.zeros(0, np.float32))
    margin_all = cat(margin_of, np.zeros(0, np.float32))
    det_group = np.repeat(call_group, n_detections)
    cls = np.where((labels >= 0) & (labels < n_class), labels, n_class)
    with np.errstate(invalid="ignore"):
        size = np.sqrt(
            np.maximum(boxes[:, 2] - boxes[:, 0], np.float32(0))
            * np.maximum(boxes[:, 3] - boxes[:, 1], np.float32(0))
        )
    base = (det_group * classes + cls) * _ROW
    internals = cat(internals_of, np.zeros(0, bool))
    parsed = slice(None) if bool(internals.all()) else internals  # (the usual case: a view)
    index = np.concatenate(
        [
            base[rows] + (start + _bucket_np(values[rows], name))
            for name, start, values, rows in zip(
                _HISTS,
                _STARTS,
                (scores, entropy_all, margin_all, size),
                (slice(None), parsed, parsed, slice(None)),
            )
        ]
    )
    hist = np.bincount(index, minlength=n_groups * classes * _ROW)
    n_dpi = len(BINS["detections_per_image"]) - 1
    image_group = np.repeat(call_group, n_images)
    dpi = np.bincount(
        image_group * n_dpi + _bucket_np(counts_all.astype(np.float64), "detections_per_image"),
        minlength=n_groups * n_dpi,
    )
    sketch_n: np.ndarray | None = None
    sketch_sum: np.ndarray | None = None
    sketch_sq: np.ndarray | None = None
    if z_of:
        z = cat([a for _, a in z_of], np.zeros((0, SKETCH_DIM)))
        key = det_group * classes + cls
        if len(z_of) < len(records):  # the detections of the records with embeddings
            key = np.concatenate([key[det_offsets[i] : det_offsets[i + 1]] for i, _ in z_of])
        n_keys = n_groups * classes
        sums = np.zeros((n_keys, SKETCH_DIM), np.float64)
        squares = np.zeros((n_keys, SKETCH_DIM, SKETCH_DIM), np.float64)
        if len(key):  # per (group, class) present: the sum of its rows and of their outer products
            # Keys fit in int16 (groups x classes): numpy sorts those stably by radix, ~15x
            # faster than int64's merge sort, in the same order.
            small = n_keys <= np.iinfo(np.int16).max
            order = np.argsort(key.astype(np.int16) if small else key, kind="stable")
            ordered, z_sorted = key[order], z[order]
            starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
            stops = np.concatenate([starts[1:], [len(ordered)]])
            for k, a, b in zip(ordered[starts].tolist(), starts.tolist(), stops.tolist()):
                rows_k = z_sorted[a:b]
                sums[k] = rows_k.sum(axis=0)
                squares[k] = _gram(rows_k)
        sketch_n = np.bincount(key, minlength=n_keys).astype(np.float64).reshape(n_groups, classes)
        sketch_sum = sums.reshape(n_groups, classes, SKETCH_DIM)
        sketch_sq = squares.reshape(n_groups, classes, SKETCH_DIM, SKETCH_DIM)
    return CallsSummary(
        n_class=n_class,
        keys=keys,
        call_group=call_group,
        group_keys=list(group_index),
        n_images=n_images,
        n_detections=n_detections,
        det_offsets=det_offsets,
        labels=labels,
        entropy=entropy_all,
        margin=margin_all,
        has_near_miss=[_has_near_miss(r) for r in records],
        hist=hist.astype(np.int64, copy=False).reshape(n_groups, classes, _ROW),
        detections_per_image=dpi.astype(np.int64, copy=False).reshape(n_groups, n_dpi),
        sketch_n=sketch_n,
        sketch_sum=sketch_sum,
        sketch_sq=sketch_sq,
    )


@dataclass
class _Group:
    """The aggregates of one ``(dataset_type, n_epoch)``."""

    n_class: int
    calls: int = 0
    images: int = 0
    detections: int = 0
    sampled_calls: int = 0
    detections_per_image: np.ndarray = field(
        default_factory=lambda: np.zeros(len(BINS["detections_per_image"]) - 1, np.int64)
    )
    hist: np.ndarray | None = None
    sketch_n: np.ndarray | None = None
    sketch_sum: np.ndarray | None = None
    sketch_sq: np.ndarray | None = None

    def __post_init__(self) -> None:
        classes = self.n_class + 1
        if self.hist is None:
            self.hist = np.zeros((classes, _ROW), np.int64)
        if self.sketch_n is None:
            self.sketch_n = np.zeros(classes, np.float64)
            self.sketch_sum = np.zeros((classes, SKETCH_DIM), np.float64)
            self.sketch_sq = np.zeros((classes, SKETCH_DIM, SKETCH_DIM), np.float64)

    def add(self, other: _Group) -> None:
        self.calls += other.calls
        self.images += other.images
        self.detections += other.detections
        self.sampled_calls += other.sampled_calls
        self.detections_per_image = self.detections_per_image + other.detections_per_image
        self.hist = self.hist + other.hist  # type: ignore[operator]
        self.sketch_n = self.sketch_n + other.sketch_n  # type: ignore[operator]
        self.sketch_sum = self.sketch_sum + other.sketch_sum  # type: ignore[operator]
        self.sketch_sq = self.sketch_sq + other.sketch_sq  # type: ignore[operator]


def _label(c: int, n_class: int) -> str:
    return "other" if c == n_class else str(c)


class Aggregates:
    """Mergeable statistics of every call (see the module docstring).

    ``groups`` maps ``(dataset_type, n_epoch)`` to its counts; :meth:`merge` adds another
    :class:`Aggregates` (of the same ``n_class``); :meth:`to_json` / :meth:`from_json` are the
    stored form; :meth:`totals` sums over keys and classes (per logger: everything).
    """

    def __init__(self, n_class: int) -> None:
        self.n_class = int(n_class)
        self.groups: dict[tuple[str, int], _Group] = {}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def _group(self, key: tuple[str, int]) -> _Group:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(self.n_class)
        return group

    def add(self, summary: CallSummary, kept: bool) -> None:
        """Counts one call (``kept``: its rows were written)."""
        group = self._group((summary.dataset_type, summary.n_epoch))
        group.calls += 1
        group.images += summary.n_images
        group.detections += summary.n_detections
        group.sampled_calls += int(kept)
        group.detections_per_image += summary.detections_per_image
        group.hist += summary.hist
        if summary.sketch_n is not None:
            group.sketch_n += summary.sketch_n
            group.sketch_sum += summary.sketch_sum  # type: ignore[operator]
            group.sketch_sq += summary.sketch_sq  # type: ignore[operator]

    def merge(self, other: Aggregates) -> Aggregates:
        """Adds ``other`` into this one (returns self).

        Raises:
            ValueError: the two count another number of classes.
        """
        if other.n_class != self.n_class:
            raise ValueError(
                f"cannot merge aggregates of {other.n_class} classes into aggregates of {self.n_class}: "
                "they come from different models"
            )
        for key, group in other.groups.items():
            self._group(key).add(group)
        return self

    @classmethod
    def merged(cls, parts: list[Aggregates], n_class: int | None = None) -> Aggregates:
        """The sum of ``parts`` (an empty :class:`Aggregates` of ``n_class`` when there are none)."""
        if not parts:
            return cls(n_class if n_class is not None else 0)
        out = cls(parts[0].n_class)
        for part in parts:
            out.merge(part)
        return out

    def select(self, n_epoch: int | None) -> Aggregates:
        """The groups of one epoch (None: untagged, -1)."""
        out = Aggregates(self.n_class)
        epoch = -1 if n_epoch is None else n_epoch
        out.groups = {k: v for k, v in self.groups.items() if k[1] == epoch}
        return out

    def totals(
        self, dataset_type: str | None = None, n_epoch: int | None = None, label: int | None = None
    ) -> dict[str, Any]:
        """Sums over the matching groups (None: every one) and classes (``label``: one class).

        Returns:
            ``{"calls", "images", "detections", "sampled_calls", "detections_per_image",
            "score", "entropy", "margin", "box_size"`` (histogram counts, lists),
            ``"embedding_mean"``, ``"embedding_cov"`` (of the sketch projection; None without
            embeddings)``}``. ``calls``, ``images`` and ``detections_per_image`` count every
            class (``label`` narrows only the per-class entries).
        """
        total = _Group(self.n_class)
        for (dt, ep), group in self.groups.items():
            if (dataset_type is None or dt == dataset_type) and (n_epoch is None or ep == n_epoch):
                total.add(group)
        rows = slice(None) if label is None else slice(label, label + 1)
        hist = total.hist[rows].sum(0)  # type: ignore[index]
        out: dict[str, Any] = {
            "calls": total.calls,
            "images": total.images,
            "detections": total.detections
            if label is None
            else int(total.hist[rows, : _WIDTHS[0]].sum()),  # type: ignore[index]
            "sampled_calls": total.sampled_calls,
            "detections_per_image": total.detections_per_image.tolist(),
        }
        for name, start, width in zip(_HISTS, _STARTS, _WIDTHS):
            out[name] = hist[start : start + width].tolist()
        n = float(total.sketch_n[rows].sum())  # type: ignore[index]
        if n > 0:
            s = total.sketch_sum[rows].sum(0)  # type: ignore[index]
            sq = total.sketch_sq[rows].sum(0)  # type: ignore[index]
            mean = s / n
            out["embedding_mean"] = mean
            out["embedding_cov"] = sq / n - np.outer(mean, mean)
        else:
            out["embedding_mean"] = out["embedding_cov"] = None
        return out

    # -- stored form -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        groups = []
        for (dataset_type, n_epoch), g in sorted(self.groups.items()):
            classes = {}
            for c in range(self.n_class + 1):
                detections = int(g.hist[c, : _WIDTHS[0]].sum())  # type: ignore[index]
                if not detections and not g.sketch_n[c]:  # type: ignore[index]
                    continue
                entry: dict[str, Any] = {"detections": detections}
                for name, start, width in zip(_HISTS, _STARTS, _WIDTHS):
                    entry[name] = g.hist[c, start : start + width].tolist()  # type: ignore[index]
                if g.sketch_n[c]:  # type: ignore[index]
                    entry["sketch_n"] = float(g.sketch_n[c])  # type: ignore[index]
                    entry["sketch_sum"] = g.sketch_sum[c].tolist()  # type: ignore[index]
                    entry["sketch_sq"] = g.sketch_sq[c].reshape(-1).tolist()  # type: ignore[index]
                classes[_label(c, self.n_class)] = entry
            groups.append(
                {
                    "dataset_type": dataset_type,
                    "n_epoch": n_epoch,
                    "calls": g.calls,
                    "images": g.images,
                    "detections": g.detections,
                    "sampled_calls": g.sampled_calls,
                    "detections_per_image": g.detections_per_image.tolist(),
                    "classes": classes,
                }
            )
        return {
            "format": AGGREGATES_FORMAT,
            "n_class": self.n_class,
            "bins": {k: [None if math.isinf(e) else e for e in v] for k, v in BINS.items()},
            "sketch": {
                "dim": SKETCH_DIM,
                "seed": SKETCH_SEED,
                "projection": "orthogonal-gaussian-qr",
            },
            "groups": groups,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any) -> Aggregates:
        """Parses the stored form; raises ``ValueError`` on anything else."""
        if not isinstance(data, dict) or data.get("format") != AGGREGATES_FORMAT:
            raise ValueError(f"not pyodlog aggregates of format {AGGREGATES_FORMAT}")
        n_class = data.get("n_class")
        if isinstance(n_class, bool) or not isinstance(n_class, int) or not 0 <= n_class < 1 << 20:
            raise ValueError(f"aggregates have n_class {n_class!r}")
        sketch = data.get("sketch") or {}
        if sketch.get("dim") != SKETCH_DIM or sketch.get("seed") != SKETCH_SEED:
            raise ValueError(f"aggregates have another embedding sketch ({sketch!r})")
        out = cls(n_class)
        for entry in data.get("groups") or []:
            key = (str(entry["dataset_type"]), int(entry["n_epoch"]))
            g = _Group(n_class)
            g.calls, g.images = int(entry["calls"]), int(entry["images"])
            g.detections, g.sampled_calls = int(entry["detections"]), int(entry["sampled_calls"])
            dpi = np.asarray(entry["detections_per_image"], np.int64)
            if dpi.shape != g.detections_per_image.shape:
                raise ValueError("aggregates: detections_per_image has other bins")
            g.detections_per_image = dpi
            for label, c_entry in (entry.get("classes") or {}).items():
                c = n_class if label == "other" else int(label)
                if not 0 <= c <= n_class:
                    raise ValueError(f"aggregates: class {label!r} out of range")
                for name, start, width in zip(_HISTS, _STARTS, _WIDTHS):
                    values = np.asarray(c_entry[name], np.int64)
                    if values.shape != (width,):
                        raise ValueError(f"aggregates: {name} has other bins")
                    g.hist[c, start : start + width] = values  # type: ignore[index]
                if "sketch_n" in c_entry:
                    g.sketch_n[c] = float(c_entry["sketch_n"])  # type: ignore[index]
                    g.sketch_sum[c] = np.asarray(c_entry["sketch_sum"], np.float64)  # type: ignore[index]
                    g.sketch_sq[c] = np.asarray(c_entry["sketch_sq"], np.float64).reshape(  # type: ignore[index]
                        SKETCH_DIM, SKETCH_DIM
                    )
            out._group(key).add(g)
        return out

    @classmethod
    def from_json(cls, data: bytes) -> Aggregates:
        return cls.from_dict(json.loads(data.decode("utf-8")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Aggregates) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        t = self.totals()
        return f"Aggregates(n_class={self.n_class}, groups={len(self.groups)}, calls={t['calls']}, images={t['images']}, detections={t['detections']})"
