"""The report's plots: matplotlib (Agg, no display, no pyplot state) rendered to PNG bytes.

Each function takes plain numbers (what :func:`pyodlog.analysis.report.report_numbers` holds) and
returns PNG bytes; :func:`data_uri` embeds them in HTML. Figures are built on
``matplotlib.figure.Figure`` directly, so they are thread-safe and never open a window.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

__all__ = ["bars", "confusion_matrix", "data_uri", "histogram", "overlay"]

REFERENCE_COLOR = "#4c72b0"
CURRENT_COLOR = "#dd8452"


def _figure(width: float = 5.0, height: float = 2.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``: the HTML needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def histogram(
    edges: Sequence[float], counts: Sequence[float], title: str, xlabel: str = ""
) -> bytes:
    """One histogram (bars over ``edges``)."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color=REFERENCE_COLOR, alpha=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("count", fontsize=9)
    ax.tick_params(labelsize=8)
    return _png(fig)


def overlay(
    edges: Sequence[float],
    reference: Sequence[float],
    current: Sequence[float],
    title: str,
    xlabel: str = "",
) -> bytes:
    """Two distributions (shares per bin) over the same edges: the reference and the current slice."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.stairs(reference, edges, fill=True, color=REFERENCE_COLOR, alpha=0.45, label="reference")
    ax.stairs(current, edges, color=CURRENT_COLOR, linewidth=1.6, label="current")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("share", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8)
    return _png(fig)


def bars(
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    other: Sequence[float] | None = None,
    ylabel: str = "detections",
) -> bytes:
    """Bars per class; with ``other``, reference and current side by side."""
    import numpy as np

    n = len(labels)
    fig = _figure(max(5.0, min(14.0, 0.3 * n + 2)), 2.8)
    ax = fig.add_subplot()
    x = np.arange(n)
    if other is None:
        ax.bar(x, values, color=REFERENCE_COLOR)
    else:
        ax.bar(x - 0.2, values, 0.4, color=REFERENCE_COLOR, label="reference")
        ax.bar(x + 0.2, other, 0.4, color=CURRENT_COLOR, label="current")
        ax.legend(fontsize=8)
    ax.set_xticks(
        x, [str(v) for v in labels], rotation=60 if n > 8 else 0, ha="right" if n > 8 else "center"
    )
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    return _png(fig)


def confusion_matrix(
    matrix: Sequence[Sequence[float]], labels: Sequence[str] | None, title: str
) -> bytes:
    """A confusion matrix as a heat map (rows: ground truth, columns: prediction)."""
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    n = max(m.shape) if m.ndim == 2 else 0
    size = max(3.5, min(12.0, 0.35 * n + 2.5))
    fig = _figure(size, size)
    ax = fig.add_subplot()
    ax.imshow(m, cmap="Blues")
    names = [str(v) for v in (labels or range(n))]
    if len(names) == m.shape[1]:
        ax.set_xticks(np.arange(m.shape[1]), names, rotation=60, ha="right")
    if len(names) == m.shape[0]:
        ax.set_yticks(np.arange(m.shape[0]), names)
    if n <= 20:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("ground truth", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=7)
    return _png(fig)
