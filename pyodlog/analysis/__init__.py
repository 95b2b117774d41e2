"""Analysis of logged results: slices, class names, interop, ground-truth evaluation, drift, reports.

``evaluate(data)`` (COCO mAP with pycocotools, confusion matrix, worst errors); ``compare(reference,
current)`` → :class:`DriftReport` (``pyodlog.analysis.drift``); ``pyodlog.analysis.report.render_html(
data, against=None)`` → a self-contained HTML report. Slices come from ``ResultData.where(...)`` and
:func:`open_results`; ``to_arrow`` / ``to_parquet`` / ``to_pandas`` / ``to_coco`` hand the records to
other tools.
"""

from pyodlog.analysis.classes import class_name, label_names
from pyodlog.analysis.drift import DriftReport, DriftSignal, compare
from pyodlog.analysis.evaluation import COCO_IOU_THRESHOLDS, Evaluation, evaluate
from pyodlog.analysis.interop import to_arrow, to_coco, to_pandas, to_parquet
from pyodlog.analysis.slices import LazyResults, ResultView, open_results

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DriftReport",
    "DriftSignal",
    "Evaluation",
    "LazyResults",
    "ResultView",
    "class_name",
    "compare",
    "evaluate",
    "label_names",
    "open_results",
    "to_arrow",
    "to_coco",
    "to_pandas",
    "to_parquet",
]
