"""Drift between two slices of logged detections: :func:`compare` → :class:`DriftReport`.

Signals (each with a statistic, a threshold and a verdict):

========================  ==========================================================  ==============
signal                    statistic                                                   drift when
========================  ==========================================================  ==============
``class_frequency``       population stability index (PSI) of the class shares;       PSI > 0.1 and
                          chi-square test of the 2 × classes table (``p_value``)      p < alpha
``score``,                Wasserstein-1 distance divided by the reference's standard  W > 0.1 and
``score[<class>]``        deviation; Kolmogorov–Smirnov D and its asymptotic p-value  KS p < alpha
``detections_per_image``  as ``score``, over images                                   as ``score``
``box_size``,             as ``score``, over ``log2(sqrt(w * h))`` (pixels)            as ``score``
``box_size[<class>]``
``box_aspect``            as ``score``, over ``log2(w / h)``                          as ``score``
``entropy``, ``margin``,  as ``score``, when both slices logged the column            as ``score``
``energy``
``embedding``,            MMD² (Gaussian kernel, median bandwidth) of a bounded        permutation
``embedding[<class>]``    weighted sample of per-detection embeddings; permutation    p < alpha
                          test in torch (on the GPU when there is one); threshold:
                          the null's (1 - alpha) quantile. ``embedding`` samples
                          both slices with the reference's class mix, so it
                          measures appearance drift within classes
                          (``class_frequency`` covers the mix)
========================  ==========================================================  ==============

Requiring both an effect size and significance keeps small slices from
flagging noise and huge slices from flagging differences too small to matter
(Evidently's data-drift presets use the same PSI and normed-Wasserstein
thresholds). ``alpha`` applies to each signal: the histogram
signals also need their effect size, but the embedding tests only their
p-value, so with many classes expect about ``alpha`` × (number of
``embedding[<class>]`` signals) flags by chance; lower ``per_class_embeddings``
or ``alpha`` (with more ``permutations``: the smallest p-value is
``1 / (permutations + 1)``) when that matters. Per-class signals need ``min_class_count`` detections in each
slice (effective count when weighted); the others are listed in
:attr:`DriftReport.skipped`.

**Streaming and memory.** Both slices are read twice (value ranges, then
histograms) in chunks of at most ``chunk_detections`` detections; what is
kept between chunks is fixed-size: histograms of ``bins`` bins (and
``class_bins`` per class), moments, and reservoirs of at most
``class_embedding_sample`` embeddings per class and slice (the overall
``embedding`` test draws its ``embedding_sample`` rows from them). The extra memory is therefore
``O(chunk_detections × row width + classes × class_bins + samples × embedding width)``,
independent of the number of detections. KS and Wasserstein are computed on
the histograms: exact to one bin width (the value range / ``bins``).

**Sample weights.** When a slice has ``images["sample_weight"]`` (sampled
logging), every image and its detections count with that weight: histograms,
class shares and moments are weighted; tests use Kish's effective sample size
``(Σw)² / Σw²``; embedding reservoirs draw with probability proportional to
the weight (Efraimidis–Spirakis A-Res).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_THRESHOLDS", "DriftReport", "DriftSignal", "class_names_of", "compare"]

#: Effect-size thresholds per statistic (override with ``compare(thresholds=...)``).
DEFAULT_THRESHOLDS: dict[str, float] = {"psi": 0.1, "wasserstein": 0.1}
UNCERTAINTY_COLUMNS = ("entropy", "margin", "energy")
_EPS_SHARE = 1e-4  # PSI: shares below this are taken as this (as Evidently does)


@dataclass
class DriftSignal:
    """One signal's verdict.

    Attributes:
        name: ``class_frequency``, ``score``, ``score[person]``, ``embedding``, ...
        method: how ``statistic`` was computed (``psi``, ``wasserstein_normed``, ``mmd2``).
        statistic: the effect size compared with ``threshold``.
        threshold: drift needs ``statistic > threshold`` (and ``p_value < alpha``).
        drift: the verdict.
        p_value: the significance test's p-value (chi-square, KS or permutation).
        details: other numbers (sample sizes, means, KS D, ...).
        plot: what a plot needs: ``{"kind": "hist", "edges", "reference", "current"}``
            (shares per bin) or ``{"kind": "bar", "labels", "reference", "current"}``.
    """

    name: str
    method: str
    statistic: float
    threshold: float
    drift: bool
    p_value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    plot: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": _num(self.statistic),
            "threshold": _num(self.threshold),
            "drift": bool(self.drift),
            "method": self.method,
            "p_value": _num(self.p_value),
            **{k: _jsonable(v) for k, v in self.details.items()},
        }


class DriftReport:
    """What :func:`compare` found: one :class:`DriftSignal` per signal name.

    ``to_dict()`` maps each signal name to ``{"statistic", "threshold", "drift",
    "method", "p_value", ...}`` (JSON-safe: NaN becomes None); ``to_frame()``
    is the same as a pandas DataFrame; ``str(report)`` is a text table.
    """

    def __init__(
        self,
        signals: dict[str, DriftSignal],
        skipped: dict[str, str],
        summary: dict[str, Any],
    ) -> None:
        self.signals = signals
        self.skipped = skipped
        self.summary = summary

    def __getitem__(self, name: str) -> DriftSignal:
        return self.signals[name]

    def __contains__(self, name: object) -> bool:
        return name in self.signals

    def __iter__(self) -> Iterator[str]:
        return iter(self.signals)

    def __len__(self) -> int:
        return len(self.signals)

    @property
    def drifted(self) -> list[str]:
        """The names of the signals that drifted."""
        return [name for name, s in self.signals.items() if s.drift]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{signal name: {"statistic", "threshold", "drift", "method", "p_value", ...}}``."""
        return {name: s.to_dict() for name, s in self.signals.items()}

    def to_frame(self):
        """The signals as a pandas DataFrame (one row per signal); needs pandas."""
        try:
            import pandas as pd
        except ImportError as error:  # pragma: no cover - pandas is pinned
            raise ImportError("DriftReport.to_frame() needs pandas: pip install pandas") from error
        rows = [{"signal": name, **values} for name, values in self.to_dict().items()]
        return pd.DataFrame(rows).set_index("signal")

    def __str__(self) -> str:
        head = ("signal", "method", "statistic", "threshold", "p-value", "drift")
        rows = [
            (
                name,
                s.method,
                _fmt(s.statistic),
                _fmt(s.threshold),
                _fmt(s.p_value),
                "DRIFT" if s.drift else "-",
            )
            for name, s in self.signals.items()
        ]
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        drifted = self.drifted
        lines.append(
            f"{len(drifted)} of {len(self.signals)} signals drifted"
            + (f": {', '.join(drifted)}" if drifted else "")
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DriftReport(signals={len(self.signals)}, drifted={self.drifted})"


# -- helpers ------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _num(value)
    return value


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4f}"


def class_names_of(data: Any) -> list[str] | None:
    """The slice's class names (``data.class_names``, else the result's schema), or None."""
    names = getattr(data, "class_names", None)
    if names is None:
        schema = (getattr(data, "manifest", None) or {}).get("schema") or {}
        names = schema.get("class_names") if isinstance(schema, dict) else None
    return list(names) if isinstance(names, (list, tuple)) else None


def class_label(label: int, names: list[str] | None) -> str:
    """A class's display name: its name when known, else its number."""
    if names is not None and 0 <= label < len(names) and names[label]:
        return str(names[label])
    return str(label)


@dataclass
class Chunk:
    """A run of consecutive images and their detections."""

    image_rows: slice
    det_counts: np.ndarray  # per image
    image_weights: np.ndarray | None  # per image
    det_index: slice | np.ndarray  # rows of data.detections

    def det_weights(self) -> np.ndarray | None:
        if self.image_weights is None:
            return None
        return np.repeat(self.image_weights, self.det_counts)


#: Reads of at least this many detections show a progress bar (on a terminal) by default.
PROGRESS_MIN_DETECTIONS = 1 << 22


def iter_chunks(
    data: Any,
    chunk_detections: int = 1 << 18,
    image_block: int = 1 << 16,
    progress: bool | None = False,
    desc: str = "reading",
):
    """Consecutive images of ``data`` with at most ``chunk_detections`` detections (one image at least).

    Works on any ResultData-like object whose image ``det_offset``/``det_count``
    address its ``detections`` columns (a view included: the offsets need not
    be contiguous). ``progress``: a tqdm bar on stderr (None: when the slice
    has at least :data:`PROGRESS_MIN_DETECTIONS` detections and stderr is a
    terminal).
    """
    bar = _progress_bar(data, progress, desc)
    try:
        for chunk in _chunks(data, chunk_detections, image_block):
            yield chunk
            if bar is not None:
                bar.update(int(chunk.det_counts.sum()))
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(data: Any, progress: bool | None, desc: str):
    if progress is False:
        return None
    total = int(np.sum(data.images["det_count"]))
    if progress is None:
        import sys

        progress = total >= PROGRESS_MIN_DETECTIONS and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="det", unit_scale=True, leave=False)


def _chunks(data: Any, chunk_detections: int, image_block: int):
    images = data.images
    n_images = len(images["det_count"])
    weights_col = images.get("sample_weight")
    for block_start in range(0, n_images, image_block):
        block_end = min(block_start + image_block, n_images)
        counts = np.asarray(images["det_count"][block_start:block_end], np.int64)
        offsets = np.asarray(images["det_offset"][block_start:block_end], np.int64)
        weights = (
            None
            if weights_col is None
            else np.asarray(weights_col[block_start:block_end], np.float64)
        )
        ends = np.cumsum(counts)
        i = 0
        while i < len(counts):
            before = ends[i - 1] if i else 0
            j = int(np.searchsorted(ends, before + chunk_detections, side="right"))
            j = max(j, i + 1)
            c, o = counts[i:j], offsets[i:j]
            if len(c) and np.all(o[1:] == o[:-1] + c[:-1]):
                index: slice | np.ndarray = slice(int(o[0]), int(o[0] + c.sum()))
            else:
                starts = np.repeat(o - np.concatenate([[0], np.cumsum(c)[:-1]]), c)
                index = starts + np.arange(int(c.sum()))
            yield Chunk(
                slice(block_start + i, block_start + j),
                c,
                None if weights is None else weights[i:j],
                index,
            )
            i = j


def _column(data: Any, name: str, index: slice | np.ndarray) -> np.ndarray:
    return np.asarray(data.detections[name][index])


def box_size_aspect(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log2(sqrt(w * h))`` and ``log2(w / h)`` of xyxy boxes (NaN for empty boxes)."""
    wh = (boxes[:, 2:4] - boxes[:, 0:2]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (wh[:, 0] > 0) & (wh[:, 1] > 0)
        log_w = np.where(ok, np.log2(np.where(ok, wh[:, 0], 1)), np.nan)
        log_h = np.where(ok, np.log2(np.where(ok, wh[:, 1], 1)), np.nan)
    return (log_w + log_h) / 2, log_w - log_h


# -- streaming accumulators ---------------------------------------------------------------------


class _Range:
    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def update(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        if len(finite):
            self.lo = min(self.lo, float(finite.min()))
            self.hi = max(self.hi, float(finite.max()))

    def edges(self, bins: int, integer: bool = False) -> np.ndarray:
        lo, hi = (self.lo, self.hi) if self.lo <= self.hi else (0.0, 1.0)
        if integer:
            lo, hi = math.floor(lo), math.floor(hi) + 1
            if hi - lo <= bins:
                return np.arange(lo, hi + 1, dtype=np.float64) - 0.5
        if hi <= lo:
            hi = lo + 1.0
        return np.linspace(lo, hi, bins + 1)


class _Hist:
    """A (per-group) weighted histogram with fixed edges, plus weighted moments per group."""

    def __init__(self, edges: np.ndarray, groups: int = 1) -> None:
        self.edges = edges
        self.bins = len(edges) - 1
        self.groups = groups
        self.counts = np.zeros(groups * self.bins)
        self.w = np.zeros(groups)  # Σw
        self.w2 = np.zeros(groups)  # Σw²
        self.s1 = np.zeros(groups)  # Σw·x
        self.s2 = np.zeros(groups)  # Σw·x²

    def add(
        self, values: np.ndarray, weights: np.ndarray | None, groups: np.ndarray | None = None
    ) -> None:
        ok = np.isfinite(values)
        if groups is not None:
            ok &= (groups >= 0) & (groups < self.groups)
        if not ok.all():
            values = values[ok]
            weights = None if weights is None else weights[ok]
            groups = None if groups is None else groups[ok]
        if not len(values):
            return
        lo, hi = self.edges[0], self.edges[-1]
        b = ((values - lo) * (self.bins / (hi - lo))).astype(np.int64)
        np.clip(b, 0, self.bins - 1, out=b)
        g = np.zeros(len(values), np.int64) if groups is None else groups.astype(np.int64)
        if groups is not None:
            b += g * self.bins
        n = self.groups
        self.counts += np.bincount(b, weights, minlength=n * self.bins)
        x = values.astype(np.float64)
        w = np.ones(len(x)) if weights is None else weights
        self.w += np.bincount(g, w, minlength=n)
        self.w2 += np.bincount(g, w * w, minlength=n)
        wx = w * x
        self.s1 += np.bincount(g, wx, minlength=n)
        self.s2 += np.bincount(g, wx * x, minlength=n)

    def group(self, g: int) -> np.ndarray:
        return self.counts[g * self.bins : (g + 1) * self.bins]

    def n_eff(self, g: int) -> float:
        return float(self.w[g] ** 2 / self.w2[g]) if self.w2[g] > 0 else 0.0

    def mean_std(self, g: int) -> tuple[float, float]:
        if self.w[g] <= 0:
            return math.nan, math.nan
        mean = self.s1[g] / self.w[g]
        var = max(self.s2[g] / self.w[g] - mean * mean, 0.0)
        return float(mean), float(math.sqrt(var))


class _Reservoir:
    """A weighted random sample without replacement (A-Res keys ``log(u) / w``), per group."""

    def __init__(self, size: int, groups: int, rng: np.random.Generator) -> None:
        self.size, self.groups, self.rng = size, groups, rng
        self.keys = np.empty(0)
        self.group = np.empty(0, np.int64)
        self.rows = np.empty((0, 0), np.float32)

    def add(
        self,
        keys: np.ndarray,
        groups: np.ndarray,
        take_rows,  # callable: local indices -> [k, E] float32
    ) -> None:
        if not len(keys) or self.size <= 0:
            return
        all_keys = np.concatenate([self.keys, keys])
        all_groups = np.concatenate([self.group, groups])
        order = np.lexsort((-all_keys, all_groups))  # by group, largest key first
        sorted_groups = all_groups[order]
        first = np.searchsorted(sorted_groups, sorted_groups, side="left")
        rank = np.arange(len(order)) - first
        keep = order[(rank < self.size) & np.isfinite(all_keys[order])]
        keep.sort()
        old = keep[keep < len(self.keys)]
        new = keep[keep >= len(self.keys)] - len(self.keys)
        new_rows = take_rows(new)
        rows = (
            np.concatenate([self.rows[old], new_rows]) if len(self.rows) and len(old) else new_rows
        )
        self.keys = all_keys[np.concatenate([old, new + len(self.keys)])]
        self.group = all_groups[np.concatenate([old, new + len(self.group)])]
        self.rows = rows.astype(np.float32, copy=False)

    def sample(self, g: int) -> np.ndarray:
        """Group ``g``'s rows, largest key first (so any prefix is itself a weighted sample)."""
        idx = np.flatnonzero(self.group == g)
        return self.rows[idx[np.argsort(-self.keys[idx], kind="stable")]]


class _SliceStats:
    """Everything kept about one slice: bounded whatever its size."""

    def __init__(self) -> None:
        self.images = 0
        self.detections = 0
        self.class_w = np.zeros(0)
        self.class_w2 = np.zeros(0)
        self.hists: dict[str, _Hist] = {}
        self.class_embeddings: _Reservoir | None = None


# -- the comparison -----------------------------------------------------------------------------


def _signals_of(data: Any) -> list[str]:
    """The per-detection scalar columns compared (uncertainty only when logged)."""
    return [c for c in UNCERTAINTY_COLUMNS if c in data.detections]


def _first_pass(
    data: Any,
    columns: list[str],
    chunk_detections: int,
    ranges: dict[str, _Range],
    progress: bool | None = False,
) -> int:
    max_label = -1
    for chunk in iter_chunks(data, chunk_detections, progress=progress, desc="drift: ranges"):
        ranges["detections_per_image"].update(chunk.det_counts.astype(np.float64))
        if isinstance(chunk.det_index, slice) and chunk.det_index.stop == chunk.det_index.start:
            continue
        labels = _column(data, "labels", chunk.det_index)
        if len(labels):
            max_label = max(max_label, int(labels.max()))
        ranges["score"].update(_column(data, "scores", chunk.det_index).astype(np.float64))
        size, aspect = box_size_aspect(_column(data, "boxes", chunk.det_index))
        ranges["box_size"].update(size)
        ranges["box_aspect"].update(aspect)
        for c in columns:
            ranges[c].update(_column(data, c, chunk.det_index).astype(np.float64))
    return max_label


def _second_pass(
    data: Any,
    stats: _SliceStats,
    columns: list[str],
    edges: dict[str, np.ndarray],
    n_labels: int,
    class_bins: int,
    class_embedding_sample: int,
    chunk_detections: int,
    rng: np.random.Generator,
    progress: bool | None = False,
) -> None:
    stats.class_w = np.zeros(n_labels)
    stats.class_w2 = np.zeros(n_labels)
    hists = stats.hists
    for name in ("score", "box_size", "box_aspect", "detections_per_image", *columns):
        hists[name] = _Hist(edges[name])
    for name in ("score", "box_size"):
        hists[f"{name}[]"] = _Hist(
            np.linspace(edges[name][0], edges[name][-1], class_bins + 1), n_labels
        )
    with_embeddings = "embeddings" in data.detections and class_embedding_sample > 0
    if with_embeddings:
        stats.class_embeddings = _Reservoir(class_embedding_sample, n_labels, rng)
    for chunk in iter_chunks(data, chunk_detections, progress=progress, desc="drift: statistics"):
        stats.images += len(chunk.det_counts)
        hists["detections_per_image"].add(chunk.det_counts.astype(np.float64), chunk.image_weights)
        index = chunk.det_index
        n = int(chunk.det_counts.sum())
        if not n:
            continue
        stats.detections += n
        w = chunk.det_weights()
        labels = _column(data, "labels", index).astype(np.int64)
        valid = (labels >= 0) & (labels < n_labels)
        lab = np.where(valid, labels, 0)
        wv = np.where(valid, 1.0 if w is None else w, 0.0)
        stats.class_w += np.bincount(lab, wv, minlength=n_labels)
        stats.class_w2 += np.bincount(lab, wv * wv, minlength=n_labels)
        scores = _column(data, "scores", index).astype(np.float64)
        hists["score"].add(scores, w)
        hists["score[]"].add(scores, w, labels)
        size, aspect = box_size_aspect(_column(data, "boxes", index))
        hists["box_size"].add(size, w)
        hists["box_size[]"].add(size, w, labels)
        hists["box_aspect"].add(aspect, w)
        for c in columns:
            hists[c].add(_column(data, c, index).astype(np.float64), w)
        if with_embeddings:
            assert stats.class_embeddings is not None
            u = rng.random(n)
            with np.errstate(divide="ignore"):
                keys = np.log(u) if w is None else np.where(w > 0, np.log(u) / w, -np.inf)

            def take(local: np.ndarray, index=index) -> np.ndarray:
                if isinstance(index, slice):
                    rows = index.start + local
                else:
                    rows = index[local]
                return np.asarray(data.detections["embeddings"][np.sort(rows)], np.float32)[
                    np.argsort(np.argsort(rows))
                ]

            class_keys = np.where(valid, keys, -np.inf)
            stats.class_embeddings.add(class_keys, lab, take)


def _hist_test(
    name: str,
    ref: _Hist,
    cur: _Hist,
    g: int,
    threshold: float,
    alpha: float,
    extra: dict[str, Any] | None = None,
) -> DriftSignal:
    from scipy.stats import kstwobign

    h1, h2 = ref.group(g), cur.group(g)
    s1, s2 = h1.sum(), h2.sum()
    edges = ref.edges
    width = (edges[-1] - edges[0]) / ref.bins
    c1, c2 = np.cumsum(h1) / s1, np.cumsum(h2) / s2
    d = float(np.max(np.abs(c1 - c2)))
    wasserstein = float(np.sum(np.abs(c1 - c2)) * width)
    mean1, std1 = ref.mean_std(g)
    mean2, std2 = cur.mean_std(g)
    normed = wasserstein / max(std1, width)
    n1, n2 = ref.n_eff(g), cur.n_eff(g)
    en = math.sqrt(n1 * n2 / (n1 + n2))
    p = float(kstwobign.sf(d * en))
    drift = normed > threshold and p < alpha
    details = {
        "wasserstein": wasserstein,
        "ks_statistic": d,
        "reference": {"n": n1, "mean": mean1, "std": std1},
        "current": {"n": n2, "mean": mean2, "std": std2},
        **(extra or {}),
    }
    plot_edges, ref_shares = _coarse_hist(edges, h1 / s1)
    _, cur_shares = _coarse_hist(edges, h2 / s2)
    plot = {"kind": "hist", "edges": plot_edges, "reference": ref_shares, "current": cur_shares}
    return DriftSignal(name, "wasserstein_normed", normed, threshold, drift, p, details, plot)


def _coarse_hist(edges: np.ndarray, shares: np.ndarray, target: int = 64):
    """At most ``target`` bins for a plot: neighbouring bins summed."""
    step = max(1, math.ceil(len(shares) / target))
    pad = (-len(shares)) % step
    coarse = np.pad(shares, (0, pad)).reshape(-1, step).sum(1)
    width = (edges[-1] - edges[0]) / len(shares)
    return (edges[0] + np.arange(len(coarse) + 1) * step * width).tolist(), coarse.tolist()


def _class_frequency(
    ref: _SliceStats, cur: _SliceStats, names, threshold: float, alpha: float
) -> DriftSignal:
    from scipy.stats import chi2_contingency

    w1, w2 = ref.class_w, cur.class_w
    p1 = w1 / max(w1.sum(), 1e-300)
    p2 = w2 / max(w2.sum(), 1e-300)
    present = (w1 > 0) | (w2 > 0)
    q1 = np.maximum(p1[present], _EPS_SHARE)
    q2 = np.maximum(p2[present], _EPS_SHARE)
    psi = float(np.sum((q2 - q1) * np.log(q2 / q1)))
    # Effective counts (Kish) keep the test honest under sample weights.
    n1 = w1.sum() ** 2 / max(ref.class_w2.sum(), 1e-300)
    n2 = w2.sum() ** 2 / max(cur.class_w2.sum(), 1e-300)
    table = np.stack([p1[present] * n1, p2[present] * n2])
    if table.shape[1] >= 2 and n1 > 0 and n2 > 0:
        chi2, p, dof, _ = chi2_contingency(table)
    else:
        chi2, p, dof = 0.0, 1.0, 0
    labels = [class_label(int(c), names) for c in np.flatnonzero(present)]
    details = {
        "chi2": float(chi2),
        "dof": int(dof),
        "reference": {"n": float(n1), "shares": dict(zip(labels, p1[present].tolist()))},
        "current": {"n": float(n2), "shares": dict(zip(labels, p2[present].tolist()))},
    }
    plot = {
        "kind": "bar",
        "labels": labels,
        "reference": p1[present].tolist(),
        "current": p2[present].tolist(),
    }
    drift = psi > threshold and p < alpha
    return DriftSignal("class_frequency", "psi", psi, threshold, drift, float(p), details, plot)


def _device(device: str | None) -> str:
    import torch

    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def mmd_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    permutations: int = 200,
    alpha: float = 0.01,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, float]:
    """MMD² (biased, Gaussian kernel with the median-distance bandwidth) and its permutation test.

    Computed in torch on ``device`` (default: the GPU when there is one). All
    permutations are evaluated at once as ``Aᵀ K A`` for a matrix ``A`` of
    signed group weights, so the cost is one kernel matrix and one matrix
    product of ``(n + m)² × permutations``.

    Returns:
        ``{"mmd2", "p_value", "threshold" (the null's 1 - alpha quantile),
        "null_mean", "bandwidth", "centroid_distance" (cosine distance of the
        means, as Arize reports), "n_reference", "n_current"}``.
    """
    import torch

    dev = _device(device)
    gen = torch.Generator().manual_seed(seed)
    z = torch.from_numpy(np.concatenate([x, y]).astype(np.float32)).to(dev)
    n, m = len(x), len(y)
    total = n + m
    z = z - z.mean(0, keepdim=True)
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min_(0)
    # Median heuristic on at most 65,536 random pairs (i != j): the bandwidth, not an exact median.
    pairs = min(total * (total - 1), 1 << 16)
    i = torch.randint(0, total, (pairs,), generator=gen)
    j = (i + 1 + torch.randint(0, total - 1, (pairs,), generator=gen)) % total
    off = d2[i.to(dev), j.to(dev)]
    bandwidth = float(off.median().clamp_min(1e-12))
    k = torch.exp(-d2 / bandwidth)
    labels = torch.cat([torch.ones(n), torch.zeros(m)])
    perms = torch.stack(
        [labels] + [labels[torch.randperm(total, generator=gen)] for _ in range(permutations)], 1
    )
    a = (perms / n - (1 - perms) / m).to(dev)
    values = ((k @ a) * a).sum(0).cpu().double()
    observed, null = float(values[0]), values[1:]
    p = float((1 + (null >= observed).sum()) / (permutations + 1))
    threshold = float(torch.quantile(null, 1 - alpha))
    mx, my = x.mean(0).astype(np.float64), y.mean(0).astype(np.float64)
    denom = float(np.linalg.norm(mx) * np.linalg.norm(my))
    cosine = 1.0 - float(mx @ my) / denom if denom > 0 else 0.0
    return {
        "mmd2": observed,
        "p_value": p,
        "threshold": threshold,
        "null_mean": float(null.mean()),
        "bandwidth": bandwidth,
        "centroid_distance": cosine,
        "n_reference": n,
        "n_current": m,
    }


def _embedding_signal(
    name: str, x: np.ndarray, y: np.ndarray, permutations: int, alpha: float, seed: int, device
) -> DriftSignal:
    result = mmd_permutation_test(x, y, permutations, alpha, seed, device)
    drift = result["mmd2"] > result["threshold"] and result["p_value"] < alpha
    details = {
        "null_mean": result["null_mean"],
        "bandwidth": result["bandwidth"],
        "centroid_distance": result["centroid_distance"],
        "reference": {"n": result["n_reference"]},
        "current": {"n": result["n_current"]},
        "permutations": permutations,
    }
    return DriftSignal(
        name, "mmd2", result["mmd2"], result["threshold"], drift, result["p_value"], details
    )


def _embedding_signals(
    ref: _SliceStats,
    cur: _SliceStats,
    names: list[str] | None,
    signals: dict[str, DriftSignal],
    skipped: dict[str, str],
    embedding_sample: int,
    need: int,
    per_class_embeddings: int,
    permutations: int,
    alpha: float,
    seed: int,
    device: str | None,
) -> None:
    """``embedding`` (class-stratified) and ``embedding[<class>]`` from the per-class reservoirs."""
    assert ref.class_embeddings is not None and cur.class_embeddings is not None
    shares = ref.class_w / max(ref.class_w.sum(), 1e-300)
    xs, ys = [], []
    for g in np.flatnonzero(shares > 0).tolist():
        x, y = ref.class_embeddings.sample(g), cur.class_embeddings.sample(g)
        # The same number from each slice: both sides hold the reference's class mix.
        k = min(int(np.rint(embedding_sample * shares[g])), len(x), len(y))
        xs.append(x[:k])
        ys.append(y[:k])
    x = np.concatenate(xs) if xs else np.empty((0, 0), np.float32)
    y = np.concatenate(ys) if ys else np.empty((0, 0), np.float32)
    if min(len(x), len(y)) >= need:
        sig = _embedding_signal("embedding", x, y, permutations, alpha, seed, device)
        sig.details["stratified_by_class"] = True
        signals["embedding"] = sig
    else:
        skipped["embedding"] = f"{min(len(x), len(y))} embeddings per slice, fewer than {need}"
    done = 0
    for g in np.argsort(-ref.class_w, kind="stable").tolist():
        if ref.class_w[g] == 0:
            break
        name = f"embedding[{class_label(g, names)}]"
        x, y = ref.class_embeddings.sample(g), cur.class_embeddings.sample(g)
        if min(len(x), len(y)) < need:
            skipped[name] = f"{len(x)} and {len(y)} sampled embeddings, fewer than {need}"
            continue
        if done >= per_class_embeddings:
            skipped[name] = f"only the {per_class_embeddings} most frequent classes are tested"
            continue
        sig = _embedding_signal(name, x, y, permutations, alpha, seed + 1 + g, device)
        sig.details.update({"class": class_label(g, names), "label": g})
        signals[name] = sig
        done += 1


def compare(
    reference: Any,
    current: Any,
    *,
    thresholds: dict[str, float] | None = None,
    alpha: float = 0.01,
    bins: int = 1024,
    class_bins: int = 256,
    min_class_count: int = 30,
    embedding_sample: int = 1000,
    class_embedding_sample: int = 250,
    permutations: int = 200,
    per_class_embeddings: int = 20,
    chunk_detections: int = 1 << 18,
    seed: int = 0,
    device: str | None = None,
    progress: bool | None = None,
) -> DriftReport:
    """Compares two slices of logged detections, signal by signal (see the module's docstring).

    Args:
        reference, current: ResultData (or views from ``ResultData.where``).
        thresholds: effect-size thresholds by method, ``{"psi": 0.1, "wasserstein": 0.1}``
            by default; a signal name (``"score[person]"``) overrides its method's.
        alpha: significance level of every test.
        bins, class_bins: histogram bins overall and per class (KS/Wasserstein
            are exact to one bin width).
        min_class_count: per-class signals need this many (effective)
            detections in both slices.
        embedding_sample, class_embedding_sample: embeddings sampled per slice
            overall and per class (bounded memory; weighted by ``sample_weight``).
        permutations: of the MMD permutation test.
        per_class_embeddings: at most this many classes (the most frequent in
            the reference) get an ``embedding[<class>]`` signal.
        chunk_detections: detections read at a time.
        seed: the same seed gives the same report.
        device: torch device of the embedding test (default: CUDA when available).
        progress: tqdm progress bars on stderr (None: for slices of at least
            4,194,304 detections when stderr is a terminal).

    Returns:
        DriftReport: one signal per name; ``report.skipped`` names the per-class
        signals left out and why.
    """
    limits = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))

    def limit(name: str, method: str) -> float:
        return float(limits.get(name, limits[method]))

    names = class_names_of(reference) or class_names_of(current)
    columns = [c for c in _signals_of(reference) if c in current.detections]
    ranges = {
        k: _Range() for k in ("score", "box_size", "box_aspect", "detections_per_image", *columns)
    }
    max_label = max(
        _first_pass(reference, columns, chunk_detections, ranges, progress),
        _first_pass(current, columns, chunk_detections, ranges, progress),
    )
    n_labels = max_label + 1 if max_label >= 0 else 1
    edges = {k: r.edges(bins, integer=k == "detections_per_image") for k, r in ranges.items()}
    rng = np.random.default_rng(seed)
    ref, cur = _SliceStats(), _SliceStats()
    for data, stats in ((reference, ref), (current, cur)):
        _second_pass(
            data,
            stats,
            columns,
            edges,
            n_labels,
            class_bins,
            class_embedding_sample,
            chunk_detections,
            rng,
            progress,
        )
    signals: dict[str, DriftSignal] = {}
    skipped: dict[str, str] = {}
    summary = {
        "reference": {"images": ref.images, "detections": ref.detections},
        "current": {"images": cur.images, "detections": cur.detections},
    }
    if ref.detections == 0 or cur.detections == 0:
        skipped["*"] = "a slice has no detections"
    else:
        signals["class_frequency"] = _class_frequency(
            ref, cur, names, limit("class_frequency", "psi"), alpha
        )
    for name in ("detections_per_image",):
        if ref.images and cur.images:
            signals[name] = _hist_test(
                name,
                ref.hists[name],
                cur.hists[name],
                0,
                limit(name, "wasserstein"),
                alpha,
            )
    if ref.detections and cur.detections:
        for name in ("score", "box_size", "box_aspect", *columns):
            signals[name] = _hist_test(
                name, ref.hists[name], cur.hists[name], 0, limit(name, "wasserstein"), alpha
            )
        for base in ("score", "box_size"):
            rh, ch = ref.hists[f"{base}[]"], cur.hists[f"{base}[]"]
            for g in range(n_labels):
                name = f"{base}[{class_label(g, names)}]"
                if rh.w[g] == 0 and ch.w[g] == 0:
                    continue
                n1, n2 = rh.n_eff(g), ch.n_eff(g)
                if min(n1, n2) < min_class_count:
                    skipped[name] = (
                        f"{n1:.0f} and {n2:.0f} detections, fewer than min_class_count="
                        f"{min_class_count}"
                    )
                    continue
                signals[name] = _hist_test(
                    name,
                    rh,
                    ch,
                    g,
                    limit(name, "wasserstein"),
                    alpha,
                    {"class": class_label(g, names), "label": g},
                )
    if ref.class_embeddings is not None and cur.class_embeddings is not None:
        _embedding_signals(
            ref,
            cur,
            names,
            signals,
            skipped,
            embedding_sample,
            min(min_class_count, class_embedding_sample),
            per_class_embeddings,
            permutations,
            alpha,
            seed,
            device,
        )
    return DriftReport(signals, skipped, summary)
