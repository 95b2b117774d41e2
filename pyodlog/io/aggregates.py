"""Always-on aggregates: cheap, mergeable statistics of 100 % of the calls, sampled out or not.

Every call a logger sees is summarised off the inference path (on the writer thread, from
the record it handed over) into fixed-size counts, whether or not sampling keeps its rows:

* per ``(dataset_type, n_epoch)``: calls, images, detections, calls whose rows were kept
  (``sampled_calls``), and a detections-per-image histogram;
* per ``(dataset_type, n_epoch, class)``: detections, histograms with fixed bins of the
  score, the normalised entropy and the margin of the detection's class probabilities, and
  the box size (``sqrt(w * h)`` in original-image pixels), and an embedding sketch: the
  count, sum and sum of outer products of a seeded random projection of the embeddings to
  :data:`SKETCH_DIM` dimensions (so the running mean and covariance of that projection).

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

from pyodlog.ops.compression import random_projection
from pyodlog.structures import CallRecord

__all__ = [
    "AGGREGATES_FORMAT",
    "BINS",
    "SKETCH_DIM",
    "SKETCH_SEED",
    "Aggregates",
    "CallSummary",
    "summarize_call",
    "uncertainty",
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

    Returns:
        ``(entropy, margin)``, float32 ``[N]``: entropy in nats divided by ``ln C`` (0: one
        class certain, 1: uniform), margin = top-1 minus top-2 probability (1 for ``C == 1``).
    """
    logits = logits.float()
    n, c = logits.shape
    if n == 0 or c == 0:
        empty = logits.new_zeros(n)
        return empty, empty + 1
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p.nan_to_num(0.0, 0.0, 0.0)).sum(-1)
    entropy = entropy / math.log(c) if c > 1 else entropy * 0
    if c > 1:
        top = p.topk(2, dim=-1).values
        margin = top[:, 0] - top[:, 1]
    else:
        margin = torch.ones(n, dtype=p.dtype, device=p.device)
    return entropy, margin


def _bucket(values: torch.Tensor, name: str) -> torch.Tensor:
    edges = torch.tensor(BINS[name], dtype=torch.float64, device=values.device)
    inner = edges[1:-1]
    index = torch.bucketize(values.double(), inner, right=True)
    return torch.where(torch.isnan(values), len(edges) - 2, index)


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


def _per_detection(det: Any, name: str, valid: torch.Tensor) -> torch.Tensor | None:
    """A per-detection column the record already carries (e.g. issue 14's ``entropy``), or None."""
    value = getattr(det, name, None)
    if isinstance(value, torch.Tensor) and value.shape[:2] == valid.shape:
        return value[valid].float()
    return None


def _has_near_miss(record: CallRecord) -> bool:
    """The record's detections carry near-misses (``near_miss=K`` > 0) and one image has one."""
    near = getattr(record.detections, "near_misses", None)
    counts = getattr(near, "counts", None)
    if isinstance(counts, torch.Tensor):
        return bool(counts.sum().item() > 0)
    return False


def summarize_call(record: CallRecord, n_class: int) -> CallSummary:
    """The :class:`CallSummary` of one record (host tensors: run it off the inference path)."""
    det = record.detections
    n_images = len(record)
    counts = det.counts.to(torch.long)
    d = det.boxes.shape[1]
    valid = torch.arange(d, device=counts.device)[None, :] < counts[:, None]
    labels = det.labels[valid].to(torch.long)
    n_det = int(labels.shape[0])
    classes = n_class + 1
    cls = torch.where((labels >= 0) & (labels < n_class), labels, n_class)
    logits = det.logits[valid].float()
    entropy = _per_detection(det, "entropy", valid)
    margin = _per_detection(det, "margin", valid)
    if entropy is not None and n_class > 1:
        entropy = entropy / math.log(n_class)  # the logged column is in nats
    if entropy is None or margin is None:
        own_entropy, own_margin = uncertainty(logits)
        entropy = own_entropy if entropy is None else entropy
        margin = own_margin if margin is None else margin
    boxes = det.boxes[valid].float()
    size = (
        (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    ).sqrt()
    scores = det.scores[valid].float()
    index = torch.cat(
        [
            cls * _ROW + start + _bucket(values, name)
            for name, start, values in zip(_HISTS, _STARTS, (scores, entropy, margin, size))
        ]
    )
    hist = torch.bincount(index, minlength=classes * _ROW).reshape(classes, _ROW)
    per_image = _bucket(counts.double(), "detections_per_image")
    dpi = torch.bincount(per_image, minlength=len(BINS["detections_per_image"]) - 1)
    sketch_n = sketch_sum = sketch_sq = None
    if det.embeddings is not None:
        emb = det.embeddings[valid].float()
        z = emb @ random_projection(emb.shape[-1], SKETCH_DIM, SKETCH_SEED).to(emb.device)
        z = z.double()
        one_hot = torch.zeros(n_det, classes, dtype=torch.float64, device=z.device)
        one_hot[torch.arange(n_det, device=z.device), cls] = 1.0
        sketch_n = one_hot.sum(0)
        sketch_sum = one_hot.T @ z
        outer = (z[:, :, None] * z[:, None, :]).reshape(n_det, SKETCH_DIM * SKETCH_DIM)
        sketch_sq = (one_hot.T @ outer).reshape(classes, SKETCH_DIM, SKETCH_DIM)

    def host(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    def maybe(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else host(t)

    return CallSummary(
        record.dataset_type,
        -1 if record.n_epoch is None else int(record.n_epoch),
        n_images,
        n_det,
        host(dpi).astype(np.int64),
        host(hist).astype(np.int64),
        maybe(sketch_n),
        maybe(sketch_sum),
        maybe(sketch_sq),
        host(labels),
        host(entropy),
        host(margin),
        _has_near_miss(record),
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
