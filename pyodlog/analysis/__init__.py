"""Analysis of logged detections: drift between slices, reports.

``compare(reference, current)`` → :class:`DriftReport` (``pyodlog.analysis.drift``);
``pyodlog.analysis.report.render_html(data, against=None)`` → a self-contained HTML report.
"""

from __future__ import annotations

from pyodlog.analysis.drift import DriftReport, DriftSignal, compare

__all__ = ["DriftReport", "DriftSignal", "compare"]
