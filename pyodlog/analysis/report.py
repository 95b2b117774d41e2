"""A report a person reads in a minute: :func:`report_numbers` (the numbers) and :func:`render_html`.

The HTML is one self-contained file: plots are PNGs embedded as ``data:`` URIs
(matplotlib, Agg), styles are inline, nothing is fetched when it is opened.
Sections: overview (images, detections, classes, epochs, dataset types), score
and uncertainty histograms, per-class counts, evaluation (when the result has
ground truth and ``pyodlog.analysis.evaluate`` exists), drift against a
reference slice (verdicts and plots), the worst errors and the most uncertain
detections by ``input_id``. ``pyodlog report PATH --json`` prints
:func:`report_numbers`.

Memory: the data is read in chunks of at most ``chunk_detections`` detections;
what is kept is fixed-size (histograms, per-class counters, the ``top`` most
uncertain detections), plus what :func:`pyodlog.analysis.compare` keeps.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from pyodlog.analysis import plots
from pyodlog.analysis.drift import (
    UNCERTAINTY_COLUMNS,
    DriftReport,
    _jsonable,
    class_label,
    class_names_of,
    compare,
    iter_chunks,
)

__all__ = ["analyse", "html_page", "render_html", "report_numbers"]

SCORE_BINS = 50
UNCERTAINTY_BINS = 50
# Derived from the logits when the result has no logged uncertainty columns.
DERIVED = "softmax(logits)"


def _uncertainty_columns(data: Any) -> list[str]:
    return [c for c in UNCERTAINTY_COLUMNS if c in data.detections]


def _softmax_uncertainty(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Entropy (nats) and top-1 minus top-2 probability of ``softmax(logits)`` per row."""
    x = logits.astype(np.float64)
    x -= x.max(1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(p > 0, p * np.log(p), 0.0), 1)
    if p.shape[1] >= 2:
        top2 = np.partition(p, p.shape[1] - 2, 1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    else:
        margin = np.ones(len(p))
    return {"entropy": entropy, "margin": margin}


class _TopK:
    """The ``k`` largest values seen, with their detection and image rows (bounded)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values = np.empty(0)
        self.det_rows = np.empty(0, np.int64)
        self.image_rows = np.empty(0, np.int64)

    def add(self, values: np.ndarray, det_rows: np.ndarray, image_rows: np.ndarray) -> None:
        ok = np.isfinite(values)
        v = np.concatenate([self.values, values[ok]])
        d = np.concatenate([self.det_rows, det_rows[ok]])
        i = np.concatenate([self.image_rows, image_rows[ok]])
        if len(v) > self.k:
            keep = np.argpartition(-v, self.k - 1)[: self.k]
            v, d, i = v[keep], d[keep], i[keep]
        self.values, self.det_rows, self.image_rows = v, d, i

    def ordered(self) -> list[tuple[float, int, int]]:
        order = np.lexsort((self.det_rows, -self.values))
        return [
            (float(self.values[j]), int(self.det_rows[j]), int(self.image_rows[j])) for j in order
        ]


def _det_rows(index: slice | np.ndarray) -> np.ndarray:
    if isinstance(index, slice):
        return np.arange(index.start, index.stop, dtype=np.int64)
    return np.asarray(index, np.int64)


def _describe(
    data: Any, top: int, chunk_detections: int, progress: bool | None = None
) -> dict[str, Any]:
    """One slice's overview, histograms, per-class counts and most uncertain detections (streamed)."""
    images = data.images
    n_images = len(images["det_count"])
    names = class_names_of(data)
    logged = _uncertainty_columns(data)
    derive = not logged and "logits" in data.detections
    columns = logged or (["entropy", "margin"] if derive else [])
    # Pass 1: value ranges (scores and logged columns) and the largest label.
    lo = {c: math.inf for c in ["score", *logged]}
    hi = {c: -math.inf for c in ["score", *logged]}
    max_label = -1
    for chunk in iter_chunks(data, chunk_detections, progress=progress, desc="report: ranges"):
        if not int(chunk.det_counts.sum()):
            continue
        idx = chunk.det_index
        labels = np.asarray(data.detections["labels"][idx])
        max_label = max(max_label, int(labels.max()))
        for c in ["score", *logged]:
            v = np.asarray(data.detections["scores" if c == "score" else c][idx], np.float64)
            v = v[np.isfinite(v)]
            if len(v):
                lo[c], hi[c] = min(lo[c], float(v.min())), max(hi[c], float(v.max()))
    n_labels = max_label + 1
    edges: dict[str, np.ndarray] = {}
    for c in ["score", *logged]:
        a, b = (lo[c], hi[c]) if lo[c] <= hi[c] else (0.0, 1.0)
        if c == "score":
            a, b = min(a, 0.0), max(b, 1.0)
        edges[c] = np.linspace(
            a, b if b > a else a + 1, (SCORE_BINS if c == "score" else UNCERTAINTY_BINS) + 1
        )
    if derive:
        width = int(data.detections["logits"].shape[1])
        edges["entropy"] = np.linspace(0, max(math.log(max(width, 2)), 1e-6), UNCERTAINTY_BINS + 1)
        edges["margin"] = np.linspace(0, 1, UNCERTAINTY_BINS + 1)
    counts = {c: np.zeros(len(e) - 1) for c, e in edges.items()}
    sums = {c: 0.0 for c in edges}
    finite = {c: 0 for c in edges}
    class_n = np.zeros(max(n_labels, 0), np.int64)
    class_score = np.zeros(max(n_labels, 0))
    # Sampled logging (images["sample_weight"]): what the population held, besides what was logged.
    # Every reader gives format-3 results a sample_weight column (1.0 when nothing was sampled out):
    # the report speaks of weights only when some image stands for more than itself.
    weighted = "sample_weight" in images and bool(
        np.any(np.asarray(images["sample_weight"], np.float64) != 1.0)
    )
    class_weighted = np.zeros(max(n_labels, 0))
    weighted_images = (
        float(np.sum(np.asarray(images["sample_weight"], np.float64))) if weighted else 0.0
    )
    # The most uncertain: highest entropy (or lowest margin when only margin is logged).
    key = "entropy" if "entropy" in columns else ("margin" if "margin" in columns else None)
    uncertain = _TopK(top)
    n_det = 0
    for chunk in iter_chunks(data, chunk_detections, progress=progress, desc="report"):
        n = int(chunk.det_counts.sum())
        if not n:
            continue
        n_det += n
        idx = chunk.det_index
        labels = np.asarray(data.detections["labels"][idx], np.int64)
        scores = np.asarray(data.detections["scores"][idx], np.float64)
        ok = labels >= 0
        class_n += np.bincount(labels[ok], minlength=n_labels)
        class_score += np.bincount(labels[ok], scores[ok], minlength=n_labels)
        w = chunk.det_weights()
        if w is not None:
            class_weighted += np.bincount(labels[ok], w[ok], minlength=n_labels)
        values: dict[str, np.ndarray] = {"score": scores}
        if derive:
            values.update(_softmax_uncertainty(np.asarray(data.detections["logits"][idx])))
        for c in logged:
            values[c] = np.asarray(data.detections[c][idx], np.float64)
        for c, v in values.items():
            e = edges[c]
            good = np.isfinite(v)
            vv = v[good]
            b = np.clip(
                ((vv - e[0]) * ((len(e) - 1) / (e[-1] - e[0]))).astype(np.int64), 0, len(e) - 2
            )
            counts[c] += np.bincount(b, minlength=len(e) - 1)
            sums[c] += float(vv.sum())
            finite[c] += int(good.sum())
        if key is not None:
            image_rows = np.repeat(
                np.arange(chunk.image_rows.start, chunk.image_rows.stop), chunk.det_counts
            )
            v = values[key] if key == "entropy" else -values[key]
            uncertain.add(v, _det_rows(idx), image_rows)
    epochs, dataset_types = _image_facts(data)
    classes = [
        {
            "label": g,
            "name": class_label(g, names),
            "detections": int(class_n[g]),
            "mean_score": _jsonable(class_score[g] / class_n[g]) if class_n[g] else None,
            **({"weighted_detections": float(class_weighted[g])} if weighted else {}),
        }
        for g in range(n_labels)
        if class_n[g]
    ]
    input_ids = images.get("input_id")
    most = []
    for value, det_row, image_row in uncertain.ordered():
        entry: dict[str, Any] = {
            "input_id": input_ids[image_row] if input_ids is not None else str(image_row),
            "image_row": image_row,
            "detection": det_row - int(images["det_offset"][image_row]),
            "label": int(data.detections["labels"][det_row]),
            "class": class_label(int(data.detections["labels"][det_row]), names),
            "score": _jsonable(float(data.detections["scores"][det_row])),
            key or "value": _jsonable(value if key == "entropy" else -value),
        }
        most.append(entry)
    manifest = getattr(data, "manifest", {}) or {}
    return {
        "source": str(getattr(data, "source", "")),
        "names": {
            k: manifest[k] for k in ("model_name", "version_name", "result_name") if k in manifest
        },
        "overview": {
            "images": int(n_images),
            "detections": int(n_det),
            "classes": len(classes),
            "detections_per_image": n_det / n_images if n_images else None,
            "epochs": epochs,
            "dataset_types": dataset_types,
            "embeddings": "embeddings" in data.detections,
            "uncertainty": ("logged" if logged else DERIVED) if columns else None,
            **(
                {
                    "weighted": {
                        "images": weighted_images,
                        "detections": float(class_weighted.sum()),
                    }
                }
                if weighted
                else {}
            ),
        },
        "classes": classes,
        "histograms": {
            c: {
                "edges": edges[c].tolist(),
                "counts": counts[c].astype(np.int64).tolist(),
                "mean": _jsonable(sums[c] / finite[c]) if finite[c] else None,
            }
            for c in edges
        },
        "most_uncertain": {
            "by": key,
            "source": "logged" if logged else DERIVED,
            "detections": most,
        },
    }


def _image_facts(data: Any) -> tuple[list[int], dict[str, int]]:
    images = data.images
    epochs = np.asarray(images["n_epoch"]) if len(images["n_epoch"]) else np.empty(0, np.int64)
    types: dict[str, int] = {}
    for t in images["dataset_type"]:
        types[t] = types.get(t, 0) + 1
    return sorted(int(e) for e in np.unique(epochs)), dict(sorted(types.items()))


def _evaluation(data: Any) -> dict[str, Any] | None:
    """``pyodlog.analysis.evaluate(data).to_dict()`` when the slice has ground truth, else None."""
    targets = getattr(data, "targets", None)
    if not targets or not len(next(iter(targets.values()), [])):
        return None
    import importlib

    # evaluate() comes with the ground-truth work of the same issue: looked up, not imported by
    # name, so that this module works (and type-checks) with and without it.
    evaluate = getattr(importlib.import_module("pyodlog.analysis"), "evaluate", None)
    if evaluate is None:
        return None
    try:
        return _jsonable(evaluate(data).to_dict())
    except Exception as error:  # the rest of the report is still worth having
        return {"error": f"evaluate() failed: {type(error).__name__}: {error}"}


def analyse(
    data: Any,
    against: Any | None = None,
    top: int = 20,
    chunk_detections: int = 1 << 16,
    compare_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], DriftReport | None]:
    """:func:`report_numbers` and the :class:`DriftReport` behind its drift section (for plots).

    ``html_page(*analyse(data, against))`` is :func:`render_html`; computing
    once serves both the page and the JSON.
    """
    numbers = _describe(data, top, chunk_detections)
    numbers["evaluation"] = _evaluation(data)
    drift = None
    if against is not None:
        drift = compare(against, data, chunk_detections=chunk_detections, **(compare_options or {}))
        numbers["drift"] = {
            "reference": {
                "source": str(getattr(against, "source", "")),
                **drift.summary["reference"],
            },
            "current": drift.summary["current"],
            "drifted": drift.drifted,
            "signals": drift.to_dict(),
            "skipped": drift.skipped,
        }
    else:
        numbers["drift"] = None
    return _jsonable(numbers), drift


def report_numbers(
    data: Any,
    against: Any | None = None,
    *,
    top: int = 20,
    chunk_detections: int = 1 << 16,
    compare_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The numbers of the report (JSON-safe): what ``pyodlog report --json`` prints.

    Args:
        data: a ResultData (or a view from ``ResultData.where``).
        against: the reference slice to compare ``data`` with (drift), or None.
        top: how many most uncertain detections are listed.
        chunk_detections: detections read at a time (memory bound).
        compare_options: keyword arguments of :func:`pyodlog.analysis.compare`.

    Returns:
        ``{"source", "names", "overview", "classes", "histograms",
        "most_uncertain", "evaluation", "drift"}``; ``evaluation`` is
        ``evaluate(data).to_dict()`` (None without ground truth), ``drift``
        holds ``compare(against, data).to_dict()`` under ``signals`` (None
        without ``against``).
    """
    return analyse(data, against, top, chunk_detections, compare_options)[0]


# -- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px}
main{padding:8px 28px 40px;max-width:1280px}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;margin:16px 0;padding:14px 18px}
h2{font-size:16px;margin:0 0 10px}h3{font-size:14px;margin:14px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #e2e5ea;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.card span{font-size:12px;color:#5b6474}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #eceef2;padding:4px 10px;text-align:left}
th{background:#f1f3f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.drift{color:#b3261e;font-weight:700}.ok{color:#2e7d32}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots img{border:1px solid #eceef2;border-radius:4px;max-width:100%}
.note{color:#5b6474;font-size:12px}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:0 16px}
.split{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, float):
        text = (
            f"{value:.3e}" if value and (abs(value) < 1e-3 or abs(value) >= 1e6) else f"{value:.4g}"
        )
        return f'<td class="num">{text}</td>'
    if value is None:
        return "<td>–</td>"
    if isinstance(value, (dict, list)):
        return f"<td>{_e(_short(value))}</td>"
    return f"<td>{_e(value)}</td>"


def _short(value: Any, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return '<p class="note">none</p>'
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{plots.data_uri(png)}" alt="{_e(alt)}">'


def _overview(numbers: dict[str, Any]) -> str:
    o = numbers["overview"]
    cards = [
        ("images", o["images"]),
        ("detections", o["detections"]),
        ("classes", o["classes"]),
        (
            "detections / image",
            f"{o['detections_per_image']:.2f}" if o["detections_per_image"] is not None else "–",
        ),
        ("epoch numbers", ", ".join(map(str, o["epochs"])) or "–"),
    ]
    if "weighted" in o:
        cards.append(
            ("detections, weighted by sample_weight", f"{o['weighted']['detections']:,.0f}")
        )
    html_cards = "".join(
        f'<div class="card"><b>{_e(f"{v:,}" if isinstance(v, int) else v)}</b><span>{_e(k)}</span></div>'
        for k, v in cards
    )
    types = _table([{"dataset type": t, "images": n} for t, n in o["dataset_types"].items()])
    facts = (
        f'<p class="note">source: {_e(numbers["source"])} · embeddings logged: '
        f"{'yes' if o['embeddings'] else 'no'} · uncertainty: {_e(o['uncertainty'] or 'none')}</p>"
    )
    return f'<section id="overview"><h2>Overview</h2><div class="cards">{html_cards}</div><h3>Dataset types</h3>{types}{facts}</section>'


def _distributions(numbers: dict[str, Any]) -> str:
    hists = numbers["histograms"]
    parts = []
    for name, h in hists.items():
        title = f"{name} (mean {h['mean']:.3f})" if h["mean"] is not None else name
        if name != "score" and numbers["overview"]["uncertainty"] == DERIVED:
            title += f" of {DERIVED}"
        parts.append(
            _img(plots.histogram(h["edges"], h["counts"], title, name), f"{name} histogram")
        )
    score = f'<section id="scores"><h2>Scores</h2><div class="plots">{parts[0]}</div></section>'
    rest = "".join(parts[1:])
    uncertainty = (
        f'<section id="uncertainty"><h2>Uncertainty</h2><div class="plots">{rest}</div></section>'
        if rest
        else '<section id="uncertainty"><h2>Uncertainty</h2><p class="note">no logits or uncertainty columns logged</p></section>'
    )
    return score + uncertainty


def _classes(numbers: dict[str, Any]) -> str:
    classes = numbers["classes"]
    shown = sorted(classes, key=lambda c: -c["detections"])[:40]
    plot = (
        _img(
            plots.bars(
                [c["name"] for c in shown], [c["detections"] for c in shown], "detections per class"
            ),
            "detections per class",
        )
        if shown
        else ""
    )
    table = _table(
        [
            {
                "class": c["name"],
                "label": c["label"],
                "detections": c["detections"],
                "mean score": c["mean_score"],
                **(
                    {"weighted (sampling)": c["weighted_detections"]}
                    if "weighted_detections" in c
                    else {}
                ),
            }
            for c in classes
        ]
    )
    return f'<section id="classes"><h2>Classes</h2><div class="split"><div class="plots">{plot}</div>{table}</div></section>'


def _evaluation_html(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return '<section id="evaluation"><h2>Evaluation</h2><p class="note">no ground truth logged (pass targets= to the logger to evaluate)</p></section>'
    parts = []
    scalars = {k: v for k, v in evaluation.items() if isinstance(v, (int, float, str)) or v is None}
    if scalars:
        parts.append(_table([{"metric": k, "value": v} for k, v in scalars.items()]))
    for key, value in evaluation.items():
        if key in scalars or key == "confusion_matrix" or _is_error_list(key, value):
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            parts.append(f"<h3>{_e(key)}</h3>" + _table([{"": k, **v} for k, v in value.items()]))
        elif isinstance(value, dict):
            parts.append(
                f"<h3>{_e(key)}</h3>" + _table([{"": k, "value": v} for k, v in value.items()])
            )
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            parts.append(f"<h3>{_e(key)}</h3>" + _table(value[:50]))
    matrix = evaluation.get("confusion_matrix")
    if matrix is not None:
        labels = None
        if isinstance(matrix, dict):
            labels = matrix.get("labels") or matrix.get("names") or matrix.get("classes")
            matrix = matrix.get("matrix") or matrix.get("counts")
        if isinstance(matrix, list) and matrix and isinstance(matrix[0], list):
            parts.append(
                "<h3>Confusion matrix</h3>"
                + _img(
                    plots.confusion_matrix(matrix, labels, "confusion matrix"), "confusion matrix"
                )
            )
    return f'<section id="evaluation"><h2>Evaluation</h2>{"".join(parts)}</section>'


def _is_error_list(key: str, value: Any) -> bool:
    return ("error" in key or "worst" in key) and isinstance(value, (list, dict)) and key != "error"


def _worst_errors(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return '<section id="worst-errors"><h2>Worst errors</h2><p class="note">needs ground truth</p></section>'
    parts = []
    for key, value in evaluation.items():
        if not _is_error_list(key, value):
            continue
        groups = value.items() if isinstance(value, dict) else [(key, value)]
        for name, rows in groups:
            if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
                parts.append(f"<h3>{_e(name)}</h3>" + _table(rows[:50]))
    body = "".join(parts) or '<p class="note">the evaluation lists no errors</p>'
    return f'<section id="worst-errors"><h2>Worst errors</h2>{body}</section>'


AXIS_LABELS = {
    "box_size": "log2 sqrt(w * h) (pixels)",
    "box_aspect": "log2 (w / h)",
    "detections_per_image": "detections per image",
}


def _drift_html(numbers: dict[str, Any], drift: DriftReport | None) -> str:
    if drift is None:
        return '<section id="drift"><h2>Drift</h2><p class="note">no reference slice (pyodlog report PATH --against REFERENCE)</p></section>'
    d = numbers["drift"]
    rows = []
    for name, s in d["signals"].items():
        rows.append(
            {
                "signal": name,
                "method": s["method"],
                "statistic": s["statistic"],
                "threshold": s["threshold"],
                "p-value": s["p_value"],
                "verdict": "DRIFT" if s["drift"] else "ok",
            }
        )
    table = (
        _table(rows)
        .replace("<td>DRIFT</td>", '<td class="drift">DRIFT</td>')
        .replace("<td>ok</td>", '<td class="ok">ok</td>')
    )
    verdict = (
        f'<p class="drift">{len(d["drifted"])} of {len(d["signals"])} signals drifted: {_e(", ".join(d["drifted"]))}</p>'
        if d["drifted"]
        else f'<p class="ok">no drift in {len(d["signals"])} signals</p>'
    )
    ref, cur = d["reference"], d["current"]
    head = (
        f'<p class="note">reference: {_e(ref["source"])} ({ref["images"]:,} images, {ref["detections"]:,} detections) · '
        f"current: {cur['images']:,} images, {cur['detections']:,} detections</p>"
    )
    # Plots: every overall signal, and every drifted per-class one.
    imgs = []
    for name, signal in drift.signals.items():
        if signal.plot is None or ("[" in name and not signal.drift):
            continue
        p = signal.plot
        title = (
            f"{name}: {'DRIFT' if signal.drift else 'ok'} ({signal.method} {signal.statistic:.3g})"
        )
        if p["kind"] == "bar":
            png = plots.bars(p["labels"], p["reference"], title, p["current"], ylabel="share")
        else:
            axis = AXIS_LABELS.get(name.split("[")[0], name.split("[")[0])
            png = plots.overlay(p["edges"], p["reference"], p["current"], title, axis)
        imgs.append(_img(png, f"{name} drift plot"))
    skipped = (
        f'<p class="note">left out: {_e("; ".join(f"{k}: {v}" for k, v in list(d["skipped"].items())[:20]))}</p>'
        if d["skipped"]
        else ""
    )
    return f'<section id="drift"><h2>Drift</h2>{verdict}{head}<div class="split">{table}<div class="plots">{"".join(imgs)}</div></div>{skipped}</section>'


def _uncertain_html(numbers: dict[str, Any]) -> str:
    m = numbers["most_uncertain"]
    if m["by"] is None:
        body = '<p class="note">no logits or uncertainty columns logged</p>'
    else:
        how = "highest entropy" if m["by"] == "entropy" else "lowest margin"
        body = f'<p class="note">{how} ({_e(m["source"])})</p>' + _table(m["detections"])
    return f'<section id="most-uncertain"><h2>Most uncertain detections</h2>{body}</section>'


def render_html(
    data: Any,
    against: Any | None = None,
    *,
    top: int = 20,
    chunk_detections: int = 1 << 16,
    compare_options: dict[str, Any] | None = None,
) -> str:
    """The report as one self-contained HTML page (plots embedded as PNG; no network needed).

    Args:
        data: a ResultData (or a view from ``ResultData.where``).
        against: the reference slice: adds the drift section (``compare(against, data)``).
        top, chunk_detections, compare_options: as :func:`report_numbers`.
    """
    numbers, drift = analyse(data, against, top, chunk_detections, compare_options)
    return html_page(numbers, drift)


def html_page(numbers: dict[str, Any], drift: DriftReport | None = None) -> str:
    """The page for numbers :func:`report_numbers` computed (and the drift report's plots)."""
    names = numbers.get("names") or {}
    title = " / ".join(
        str(names[k]) for k in ("model_name", "version_name", "result_name") if k in names
    )
    title = title or numbers["source"]
    sections = [
        _overview(numbers),
        _drift_html(numbers, drift),
        _evaluation_html(numbers.get("evaluation")),
        f'<div class="pair">{_distributions(numbers)}</div>',
        _classes(numbers),
        _worst_errors(numbers.get("evaluation")),
        _uncertain_html(numbers),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>pyodlog report: {_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>pyodlog report: {_e(title)}</h1><p>{_e(numbers['source'])}</p></header>"
        f"<main>{''.join(sections)}</main></body></html>\n"
    )
