"""The viewer's web app (FastAPI on Starlette): gallery, image page, result page.

Pages are rendered on the server from the result's columns (:mod:`pyodlog.viewer.data`); boxes are
SVG elements (``rect.box`` in the gallery, ``rect.det`` / ``rect.nm`` / ``rect.gt`` on the image
page), so a browser, a test or a screen reader can count them. Nothing is written into the result:
the app only reads.
"""

from __future__ import annotations

import html
import json
import math
import mimetypes
import threading
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from pyodlog.viewer.data import SORTS, Query, ViewerResult, find_results, load_result

__all__ = ["Viewer", "create_app"]

PALETTE = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000",
    "#ffd8b1", "#000075", "#a9a9a9", "#ffe119",
]  # fmt: skip
MAX_BOXES_PER_TILE = 100
DEFAULT_DRAW = 0.3  # the gallery draws detections from this score (the `draw` parameter)

CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f6;color:#222}
header{background:#1f2937;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#cbd5e1;text-decoration:none} header a:hover{color:#fff}
main{padding:12px 16px}
form#filters{display:flex;flex-wrap:wrap;gap:8px;align-items:end;background:#fff;padding:8px;border-radius:6px}
form#filters label{display:flex;flex-direction:column;font-size:12px;color:#555}
form#filters input[type=number]{width:70px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:10px;margin-top:10px}
.tile{background:#fff;border-radius:6px;padding:6px;text-decoration:none;color:#222;box-shadow:0 1px 2px #0002}
.tile svg{width:100%;height:180px;background:#ddd;display:block}
.caption{font-size:12px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;margin-top:4px}
.meta{font-size:11px;color:#666}
svg text{paint-order:stroke;stroke:#000;stroke-width:2px;fill:#fff;font-weight:600}
.blank{fill:#e5e7eb}
#score-hist text,#unc-hist text{stroke:none;fill:#333;font-weight:400}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
tr.selected td{background:#fde68a}
rect.selected{stroke-width:5px!important}
#big rect.det,#big rect.nm{pointer-events:all;cursor:pointer}
.split{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
#big{width:100%;height:auto;background:#ddd;display:block}
.image-split{display:grid;grid-template-columns:minmax(0,55%) minmax(0,45%);gap:16px;align-items:start}
.image-split table{width:100%}
.nm-row{color:#555;font-style:italic}
.hidden{display:none}
nav.pages{margin:10px 0;display:flex;gap:12px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
"""


def colour(label: int) -> str:
    return PALETTE[label % len(PALETTE)]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, nav: str = "", script: str = "") -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)} · pyodlog view</title>"
        f"<link rel='icon' href='data:,'><style>{CSS}</style></head><body>"
        f"<header><strong>pyodlog view</strong>{nav}</header><main>{body}</main>"
        f"{f'<script>{script}</script>' if script else ''}</body></html>"
    )


def _float(params: Any, name: str) -> float | None:
    value = params.get(name)
    if value in (None, ""):
        return None
    try:
        out = float(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise HTTPException(400, f"{name} must be a finite number, got {value!r}")
    return out


def _int(params: Any, name: str) -> int | None:
    value = params.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, got {value!r}") from None


def parse_query(params: Any) -> Query:
    """The gallery's :class:`Query` from URL parameters (empty values: no filter)."""
    sort = params.get("sort") or "time"
    if sort not in SORTS:
        raise HTTPException(400, f"sort must be one of {list(SORTS)}, got {sort!r}")
    per_page = _int(params, "per_page") or 48
    return Query(
        dataset_type=params.get("dataset_type") or None,
        epoch=_int(params, "epoch"),
        label=_int(params, "label"),
        score_min=_float(params, "score_min"),
        score_max=_float(params, "score_max"),
        unc_min=_float(params, "unc_min"),
        unc_max=_float(params, "unc_max"),
        near_miss=params.get("near_miss") in ("1", "on", "true"),
        gt_error=params.get("gt_error") in ("1", "on", "true"),
        fields={k[2:]: v for k, v in params.items() if k.startswith("f.") and v != ""},
        sort=sort,
        page=max(_int(params, "page") or 0, 0),
        per_page=min(max(per_page, 1), 500),
    )


class Viewer:
    """The results a ``pyodlog view`` serves, opened on first use (read-only)."""

    def __init__(self, path: str | Path, images_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.paths = find_results(self.path)
        self.images_root = Path(images_root).resolve() if images_root is not None else None
        self._loaded: dict[int, ViewerResult] = {}
        self._lock = threading.Lock()

    def label(self, rid: int) -> str:
        p = self.paths[rid]
        try:
            return str(p.relative_to(self.path)) if p != self.path else p.name
        except ValueError:
            return str(p)

    def result(self, rid: int) -> ViewerResult:
        if not 0 <= rid < len(self.paths):
            raise HTTPException(404, f"no result {rid}: this viewer serves {len(self.paths)}")
        with self._lock:
            if rid not in self._loaded:
                self._loaded[rid] = ViewerResult(load_result(self.paths[rid]), self.label(rid))
            return self._loaded[rid]

    def local_image(self, result: ViewerResult, row: int) -> Path | None:
        """The image file ``input_id`` names under ``--images-root``, if it is a readable file there."""
        if self.images_root is None:
            return None
        input_id = result.input_id(row)
        try:
            candidate = (self.images_root / input_id).resolve()
            if candidate.is_relative_to(self.images_root) and candidate.is_file():
                return candidate
        except (OSError, ValueError):
            return None
        return None

    def has_pixels(self, result: ViewerResult, row: int) -> bool:
        return result.has_thumbnail(row) or self.local_image(result, row) is not None


# -- rendering ------------------------------------------------------------------------------------


def _canvas(
    viewer: Viewer, rid: int, result: ViewerResult, row: int, svg_attrs: str, inner: str
) -> str:
    h, w = result.image_size(row)
    if viewer.has_pixels(result, row):
        back = (
            f"<image class='pixels' href='/r/{rid}/pixels/{row}' x='0' y='0' width='{w}' "
            f"height='{h}' preserveAspectRatio='none'/>"
        )
    else:  # no thumbnail, no local file: the boxes on a blank canvas of the logged size
        back = f"<rect class='blank' x='0' y='0' width='{w}' height='{h}'/>"
    return (
        f"<svg {svg_attrs} viewBox='0 0 {w} {h}' preserveAspectRatio='xMidYMid meet' "
        f"xmlns='http://www.w3.org/2000/svg'>{back}{inner}</svg>"
    )


def _box(css: str, box: list[float], label: int, text: str, h: int, w: int, extra: str = "") -> str:
    x1, y1, x2, y2 = box
    size = max(h, w) / 28
    dash = " stroke-dasharray='6 4'" if css in ("nm", "gt") else ""
    stroke = "#ffffff" if css == "gt" else colour(label)
    label_svg = (
        f"<text x='{x1 + 2:.1f}' y='{max(y1 - 3, size):.1f}' font-size='{size:.1f}'>{_e(text)}</text>"
        if text
        else ""
    )
    return (
        f"<g class='g-{css}'{extra}><rect class='{css}' x='{x1:.1f}' y='{y1:.1f}' "
        f"width='{max(x2 - x1, 0):.1f}' height='{max(y2 - y1, 0):.1f}' fill='none' stroke='{stroke}' "
        f"stroke-width='2.5' vector-effect='non-scaling-stroke'{dash}/>{label_svg}</g>"
    )


def _nav(rid: int, viewer: Viewer) -> str:
    links = f"<a href='/r/{rid}/'>gallery</a><a href='/r/{rid}/result'>result</a>"
    if len(viewer.paths) > 1:
        links = "<a href='/'>results</a>" + links
    return links + f"<span style='color:#9ca3af'>{_e(viewer.label(rid))}</span>"


def _options(values: list[tuple[str, str]], chosen: str | None) -> str:
    return "".join(
        f"<option value='{_e(v)}'{' selected' if v == (chosen or '') else ''}>{_e(t)}</option>"
        for v, t in values
    )


def _filters(result: ViewerResult, params: Any) -> str:
    get = params.get
    types = sorted(set(result.dataset_types.tolist())) if len(result.dataset_types) else []
    epochs = sorted({int(e) for e in np.unique(result.epochs)}) if result.n_images else []
    labels = [label for label, _ in result.class_counts()]
    parts = [
        "<form id='filters' method='get'>",
        f"<label>dataset<select name='dataset_type' id='f-dataset'>"
        f"{_options([('', 'all')] + [(t, t) for t in types], get('dataset_type'))}</select></label>",
        f"<label>epoch<select name='epoch' id='f-epoch'>"
        f"{_options([('', 'all')] + [(str(e), str(e)) for e in epochs], get('epoch'))}</select></label>",
        f"<label>class<select name='label' id='f-label'>"
        f"{_options([('', 'all')] + [(str(k), result.class_name(k)) for k in sorted(labels)], get('label'))}"
        f"</select></label>",
        f"<label>score ≥<input type='number' step='0.01' name='score_min' id='f-score-min' "
        f"value='{_e(get('score_min') or '')}'></label>",
        f"<label>score ≤<input type='number' step='0.01' name='score_max' id='f-score-max' "
        f"value='{_e(get('score_max') or '')}'></label>",
    ]
    if result.uncertainty is not None:
        name = result.uncertainty_name
        parts += [
            f"<label>{name} ≥<input type='number' step='0.01' name='unc_min' id='f-unc-min' "
            f"value='{_e(get('unc_min') or '')}'></label>",
            f"<label>{name} ≤<input type='number' step='0.01' name='unc_max' id='f-unc-max' "
            f"value='{_e(get('unc_max') or '')}'></label>",
        ]
    if result.nm_counts is not None:
        checked = " checked" if get("near_miss") else ""
        parts.append(
            f"<label>has near-miss<input type='checkbox' name='near_miss' value='1' id='f-nm'{checked}></label>"
        )
    if result.gt_counts is not None:
        checked = " checked" if get("gt_error") else ""
        parts.append(
            f"<label>error vs ground truth<input type='checkbox' name='gt_error' value='1' "
            f"id='f-gt'{checked}></label>"
        )
    for name in result.field_names:
        key = f"f.{name}"
        values = [("", "all")] + [(v, v) for v in result.field_values(name)]
        parts.append(
            f"<label>{_e(name)}<select name='{_e(key)}' id='f-field-{_e(name)}'>"
            f"{_options(values, get(key))}</select></label>"
        )
    sorts = [("time", "time"), ("score", "score")]
    if result.uncertainty is not None:
        sorts.append(("uncertainty", "uncertainty"))
    parts += [
        f"<label>sort<select name='sort' id='f-sort'>{_options(sorts, get('sort') or 'time')}</select></label>",
        f"<label>draw boxes from score<input type='number' step='0.05' name='draw' id='f-draw' "
        f"value='{_e(get('draw') or DEFAULT_DRAW)}'></label>",
        "<button type='submit' id='apply'>Apply</button></form>",
    ]
    return "".join(parts)


def render_gallery(viewer: Viewer, rid: int, params: Any) -> HTMLResponse:
    result = viewer.result(rid)
    query = parse_query(params)
    draw = _float(params, "draw")
    draw = DEFAULT_DRAW if draw is None else draw
    rows, total = result.select(query)
    tiles = []
    for row in rows.tolist():
        h, w = result.image_size(row)
        o, c = int(result.offsets[row]), int(result.counts[row])
        scores = result.scores[o : o + c]
        shown = np.flatnonzero(scores >= draw)[:MAX_BOXES_PER_TILE] + o
        boxes = result.data.detections["boxes"]
        inner = "".join(
            _box(
                "box",
                [float(v) for v in boxes[k]],
                int(result.labels[k]),
                f"{result.class_name(int(result.labels[k]))} {float(result.scores[k]):.2f}",
                h,
                w,
            )
            for k in shown.tolist()
        )
        svg = _canvas(viewer, rid, result, row, "class='canvas'", inner)
        extra = ""
        if result.uncertainty is not None:
            extra = f" · {result.uncertainty_name} {float(result.uncertainty[row]):.2f}"
        tiles.append(
            f"<a class='tile' href='/r/{rid}/image/{row}' data-row='{row}' data-boxes='{len(shown)}'>{svg}"
            f"<div class='caption' title='{_e(result.input_id(row))}'>{_e(result.input_id(row))}</div>"
            f"<div class='meta'>{_e(result.dataset_types[row] if len(result.dataset_types) else '')} · "
            f"{c} det · max {float(result.max_score[row]):.2f}{extra}</div></a>"
        )
    pages = max(1, math.ceil(total / query.per_page))
    keep = {k: v for k, v in params.items() if k != "page"}
    nav = []
    if query.page > 0:
        nav.append(
            f"<a id='prev' href='?{_e(urlencode({**keep, 'page': query.page - 1}))}'>← previous</a>"
        )
    nav.append(f"<span>page {query.page + 1} of {pages}</span>")
    if query.page + 1 < pages:
        nav.append(
            f"<a id='next' href='?{_e(urlencode({**keep, 'page': query.page + 1}))}'>next →</a>"
        )
    body = (
        _filters(result, params)
        + f"<p id='count'><span id='n-match'>{total}</span> of {result.n_images} images match</p>"
        + f"<nav class='pages'>{''.join(nav)}</nav>"
        + f"<div class='gallery' id='gallery'>{''.join(tiles)}</div>"
    )
    return _page(f"gallery {viewer.label(rid)}", body, _nav(rid, viewer))


def _fmt(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


IMAGE_SCRIPT = """
function select(kind, k){
  document.querySelectorAll('.selected').forEach(e=>e.classList.remove('selected'));
  const row=document.getElementById('row-'+kind+'-'+k), box=document.getElementById('box-'+kind+'-'+k);
  if(row){row.classList.add('selected'); row.scrollIntoView({block:'nearest'});}
  if(box){box.classList.add('selected');}
}
document.querySelectorAll('rect.det,rect.nm').forEach(r=>r.addEventListener('click',
  e=>{e.preventDefault(); select(r.dataset.kind, r.dataset.k);}));
document.querySelectorAll('tr.det-row,tr.nm-row').forEach(r=>r.addEventListener('click',
  ()=>select(r.dataset.kind, r.dataset.k)));
document.querySelectorAll('a.suppressor').forEach(a=>a.addEventListener('click',
  e=>{e.preventDefault(); e.stopPropagation(); select('det', a.dataset.det);}));
function toggle(id, layer, rows){
  const box=document.getElementById(id); if(!box) return;
  const apply=()=>{document.getElementById(layer).style.display=box.checked?'':'none';
    if(rows){document.getElementById(rows).classList.toggle('hidden', !box.checked);}};
  box.addEventListener('change', apply); apply();
}
toggle('toggle-nm','nm-layer','nm-section'); toggle('toggle-gt','gt-layer',null);
"""


def _area(box: list[float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def render_image(viewer: Viewer, rid: int, row: int) -> HTMLResponse:
    result = viewer.result(rid)
    if not 0 <= row < result.n_images:
        raise HTTPException(404, f"no image row {row}: this result has {result.n_images} images")
    d = result.detail(row)
    h, w = d.size
    dets = "".join(
        _box(
            "det",
            det["box"],
            det["label"],
            f"{det['name']} {det['score']:.2f}",
            h,
            w,
        ).replace(
            "<rect class='det'",
            f"<rect class='det' id='box-det-{k}' data-kind='det' data-k='{k}'",
            1,
        )
        # Larger boxes first: a small box drawn over a large one stays clickable.
        for k, det in sorted(enumerate(d.detections), key=lambda kd: -_area(kd[1]["box"]))
    )
    nms = "".join(
        _box("nm", nm["box"], nm["label"], "", h, w).replace(
            "<rect class='nm'", f"<rect class='nm' id='box-nm-{k}' data-kind='nm' data-k='{k}'", 1
        )
        for k, nm in enumerate(d.near_misses)
    )
    gts = "".join(_box("gt", t["box"], t["label"], "", h, w) for t in d.targets)
    inner = f"<g id='det-layer'>{dets}</g><g id='nm-layer'>{nms}</g><g id='gt-layer'>{gts}</g>"
    svg = _canvas(viewer, rid, result, row, "id='big'", inner)
    has_unc = any(k in det for det in d.detections + d.near_misses for k in ("entropy", "margin"))

    def top5(det: dict[str, Any]) -> str:
        return "<br>".join(
            f"{_e(name)} {p:.2f} <small>({z:.2f})</small>" for _, name, z, p in det["top5"]
        )

    def unc(det: dict[str, Any]) -> str:
        return (
            f"<td>{_fmt(det.get('entropy'))}</td><td>{_fmt(det.get('margin'))}</td>"
            if has_unc
            else ""
        )

    unc_head = "<th>entropy</th><th>margin</th>" if has_unc else ""
    det_rows = "".join(
        f"<tr id='row-det-{k}' class='det-row' data-kind='det' data-k='{k}'><td>{k}</td>"
        f"<td><span class='swatch' style='background:{colour(det['label'])}'></span>{_e(det['name'])}</td>"
        f"<td class='score'>{det['score']:.4f}</td><td class='label'>{det['label']}</td>"
        f"<td class='box'>{', '.join(f'{v:.1f}' for v in det['box'])}</td><td>{top5(det)}</td>{unc(det)}</tr>"
        for k, det in enumerate(d.detections)
    )
    body = [
        f"<h2 id='input-id'>{_e(d.input_id)}</h2>",
        "<p>" + " · ".join(f"{_e(k)}: {_e(v)}" for k, v in d.info.items()) + f" · size {w}×{h}</p>",
        "<div class='image-split'><div>",
        svg,
        "<div>",
    ]
    if d.near_misses:
        body.append(
            f"<label><input type='checkbox' id='toggle-nm'> show near-misses ({len(d.near_misses)})</label> "
        )
    if d.targets:
        body.append(
            f"<label><input type='checkbox' id='toggle-gt' checked> ground truth ({len(d.targets)})</label>"
        )
    body.append("</div></div><div>")
    body.append(
        f"<h3>Detections ({len(d.detections)})</h3><table id='det-table'><thead><tr><th>#</th><th>class</th>"
        f"<th>score</th><th>label</th><th>box (x1, y1, x2, y2)</th><th>top-5 ({result.activation} p, logit)</th>"
        f"{unc_head}"
        f"</tr></thead><tbody>{det_rows}</tbody></table>"
    )
    if d.near_misses:
        nm_rows = []
        for k, nm in enumerate(d.near_misses):
            by = nm.get("suppressed_by")
            link = (
                f"<a class='suppressor' href='#row-det-{by}' data-det='{by}'>det {by}</a>"
                f" (IoU {_fmt(nm.get('suppressor_iou'), 2)})"
                if by is not None
                else ""
            )
            nm_rows.append(
                f"<tr id='row-nm-{k}' class='nm-row' data-kind='nm' data-k='{k}'><td>{k}</td>"
                f"<td>{_e(nm['name'])}</td><td class='score'>{nm['score']:.4f}</td>"
                f"<td>{_e(nm.get('reason', ''))}</td><td>{link}</td><td>{top5(nm)}</td>{unc(nm)}</tr>"
            )
        body.append(
            f"<div id='nm-section'><h3>Near-misses ({len(d.near_misses)})</h3><table id='nm-table'><thead>"
            f"<tr><th>#</th><th>class</th><th>score</th><th>reason</th><th>suppressed by</th>"
            f"<th>top-5</th>{unc_head}</tr></thead><tbody>{''.join(nm_rows)}</tbody></table></div>"
        )
    if d.targets:
        gt_rows = "".join(
            f"<tr><td>{_e(t['name'])}</td><td>{', '.join(f'{v:.1f}' for v in t['box'])}</td></tr>"
            for t in d.targets
        )
        body.append(
            f"<h3>Ground truth ({len(d.targets)})</h3><table id='gt-table'>"
            f"<tr><th>class</th><th>box</th></tr>{gt_rows}</table>"
        )
    body.append("</div></div>")
    return _page(f"image {d.input_id}", "".join(body), _nav(rid, viewer), IMAGE_SCRIPT)


def _histogram(values: np.ndarray, bins: int, low: float, high: float, element_id: str) -> str:
    if not len(values):
        return "<p>none</p>"
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    peak = max(int(counts.max()), 1)
    bar_w = 400 / bins
    bars = "".join(
        f"<rect class='bar' x='{k * bar_w:.1f}' y='{150 - 140 * c / peak:.1f}' width='{bar_w - 1:.1f}' "
        f"height='{140 * c / peak:.1f}' fill='#4363d8'><title>{edges[k]:.2f}–{edges[k + 1]:.2f}: {c}</title></rect>"
        for k, c in enumerate(counts.tolist())
    )
    return (
        f"<svg id='{element_id}' width='420' height='175' viewBox='0 0 420 175'>{bars}"
        f"<text x='0' y='170' font-size='11'>{low:.2f}</text>"
        f"<text x='370' y='170' font-size='11'>{high:.2f}</text></svg>"
    )


def _analysis_report(
    result: ViewerResult, where: dict[str, Any] | None = None, against: dict[str, Any] | None = None
) -> str | None:
    """The analysis layer's HTML report of the result (``pyodlog.analysis.report.render_html``).

    ``where`` picks the slice to report on and ``against`` the reference slice its drift is measured
    against (both ``ResultData.where`` keywords, from the page's ``where=k=v`` / ``against=k=v``
    query parameters). A report is rendered once per (where, against) and kept: the result is
    read-only, so it cannot change while the viewer runs.
    """
    try:
        from pyodlog.analysis.report import render_html
    except ImportError:
        return None
    key = (repr(sorted((where or {}).items())), repr(sorted((against or {}).items())))
    cache = result.__dict__.setdefault("_reports", {})
    if key not in cache:
        data = result.data.where(**where) if where else result.data
        reference = result.data.where(**against) if against else None
        cache[key] = str(render_html(data, against=reference))
    return cast(str, cache[key])


def _joined(params: Any, name: str) -> str:
    return " ".join(params.getlist(name)) if params is not None else ""


def _slice_param(params: Any, name: str) -> dict[str, Any] | None:
    """``name=k=v`` query parameters (repeatable) as ``ResultData.where`` keywords, typed like the CLI's."""
    from pyodlog.analysis.slices import parse_where

    pairs = [value for value in params.getlist(name) if value]
    return parse_where(pairs) if pairs else None


def render_result(viewer: Viewer, rid: int, params: Any = None) -> HTMLResponse:
    result = viewer.result(rid)
    counts = result.class_counts()
    peak = max((c for _, c in counts), default=1)
    class_rows = "".join(
        f"<tr class='class-row'><td><span class='swatch' style='background:{colour(k)}'></span>"
        f"<a href='/r/{rid}/?label={k}'>{_e(result.class_name(k))}</a></td><td>{c}</td>"
        f"<td><svg width='200' height='10'><rect width='{200 * c / peak:.1f}' height='10' "
        f"fill='{colour(k)}'/></svg></td></tr>"
        for k, c in counts
    )
    body = [
        f"<h2>{_e(viewer.label(rid))}</h2>",
        f"<p><span id='n-images'>{result.n_images}</span> images, "
        f"<span id='n-detections'>{len(result.scores)}</span> detections</p>",
    ]
    where = _slice_param(params, "where") if params is not None else None
    against = _slice_param(params, "against") if params is not None else None
    try:
        report = _analysis_report(result, where, against)
    except (ValueError, KeyError, TypeError) as error:
        body.append(
            f"<p class='error' id='report-error'>No analysis for this slice: {_e(str(error))}</p>"
        )
        report = None
    body.append(
        f"<form id='drift-form' method='get' action='/r/{rid}/result'>Report on "
        f"<input name='where' placeholder='dataset_type=deploying' value='{_e(_joined(params, 'where'))}'> "
        f"against <input name='against' placeholder='dataset_type=val' "
        f"value='{_e(_joined(params, 'against'))}'> <button type='submit'>analyse</button></form>"
    )
    if report is not None:
        body.append(
            f"<h3>Analysis</h3><iframe id='analysis-report' srcdoc='{_e(report)}' "
            f"style='width:100%;height:900px;border:0;background:#fff'></iframe>"
        )
    body.append("<div class='split'>")
    body.append(
        f"<div><h3>Class counts</h3><table id='class-counts'><tr><th>class</th><th>detections</th><th></th></tr>"
        f"{class_rows}</table></div>"
    )
    body.append(f"<div><h3>Scores</h3>{_histogram(result.scores, 20, 0.0, 1.0, 'score-hist')}")
    if result.entropy is not None and len(result.entropy):
        high = float(np.nanmax(result.entropy)) or 1.0
        body.append(f"<h3>Entropy</h3>{_histogram(result.entropy, 20, 0.0, high, 'unc-hist')}")
    elif result.margin is not None and len(result.margin):
        body.append(f"<h3>Margin</h3>{_histogram(result.margin, 20, 0.0, 1.0, 'unc-hist')}")
    body.append("</div></div>")
    points = result.embedding_map()
    if points:
        xs = np.array([p[0] for p in points])
        ys = np.array([p[1] for p in points])
        x0, x1 = float(xs.min()), float(xs.max())
        y0, y1 = float(ys.min()), float(ys.max())
        sx, sy = 560 / max(x1 - x0, 1e-9), 560 / max(y1 - y0, 1e-9)
        dots = "".join(
            f"<a href='/r/{rid}/image/{row}'><circle class='pt' cx='{20 + (x - x0) * sx:.1f}' "
            f"cy='{20 + (y1 - y) * sy:.1f}' r='3.5' fill='{colour(label)}' fill-opacity='0.75'>"
            f"<title>{_e(result.class_name(label))} · image {row}</title></circle></a>"
            for x, y, label, row in points
        )
        body.append(
            "<h3>Detection embeddings (PCA, 2-D; a point opens its image)</h3>"
            f"<svg id='embedding-map' width='600' height='600' viewBox='0 0 600 600' "
            f"style='background:#fff'>{dots}</svg>"
        )
    else:
        body.append("<p>No detection embeddings were logged: no embedding map.</p>")
    return _page(f"result {viewer.label(rid)}", "".join(body), _nav(rid, viewer))


def render_index(viewer: Viewer) -> HTMLResponse:
    items = "".join(
        f"<li><a class='result-link' href='/r/{rid}/'>{_e(viewer.label(rid))}</a> · "
        f"<a href='/r/{rid}/result'>result page</a></li>"
        for rid in range(len(viewer.paths))
    )
    return _page(
        "results", f"<h2>Results under {_e(viewer.path)}</h2><ul id='results'>{items}</ul>"
    )


# -- the app --------------------------------------------------------------------------------------


def create_app(path: str | Path, images_root: str | Path | None = None) -> FastAPI:
    """The viewer's app for ``path`` (a result folder, an exported ZIP, or a PYODLOG_HOME).

    Raises:
        FileNotFoundError, ValueError: ``path`` holds no result.
    """
    viewer = Viewer(path, images_root)
    app = FastAPI(title="pyodlog view", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.viewer = viewer

    @app.get("/", response_class=HTMLResponse)
    def index() -> Response:
        if len(viewer.paths) == 1:
            return RedirectResponse("/r/0/", status_code=307)
        return render_index(viewer)

    @app.get("/r/{rid}/", response_class=HTMLResponse)
    def gallery(rid: int, request: Request) -> Response:
        return render_gallery(viewer, rid, request.query_params)

    @app.get("/r/{rid}/image/{row}", response_class=HTMLResponse)
    def image(rid: int, row: int) -> Response:
        return render_image(viewer, rid, row)

    @app.get("/r/{rid}/result", response_class=HTMLResponse)
    def result_page(rid: int, request: Request) -> Response:
        return render_result(viewer, rid, request.query_params)

    @app.get("/r/{rid}/api/images")
    def api_images(rid: int, request: Request) -> Response:
        result = viewer.result(rid)
        rows, total = result.select(parse_query(request.query_params))
        return JSONResponse({"total": total, "rows": rows.tolist()})

    @app.get("/r/{rid}/api/image/{row}")
    def api_image(rid: int, row: int) -> Response:
        result = viewer.result(rid)
        if not 0 <= row < result.n_images:
            raise HTTPException(404, f"no image row {row}")
        d = result.detail(row)
        return Response(
            json.dumps(
                {
                    "row": d.row,
                    "input_id": d.input_id,
                    "size": d.size,
                    "detections": d.detections,
                    "near_misses": d.near_misses,
                }
            ),
            media_type="application/json",
        )

    @app.get("/r/{rid}/pixels/{row}")
    def pixels(rid: int, row: int) -> Response:
        result = viewer.result(rid)
        if not 0 <= row < result.n_images:
            raise HTTPException(404, f"no image row {row}")
        thumbnail = result.data.thumbnail(row)
        if thumbnail is not None:
            return Response(
                thumbnail, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
            )
        local = viewer.local_image(result, row)
        if local is None:
            raise HTTPException(
                404, "this image has no thumbnail and no readable file under --images-root"
            )
        media = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
        return Response(local.read_bytes(), media_type=media)

    return app
