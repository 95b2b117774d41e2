"""Analysis of logged results: slices, class names, interop, ground-truth evaluation.

``evaluate(data)`` (COCO mAP with pycocotools, confusion matrix, worst errors); slices come from
``ResultData.where(...)`` and :func:`open_results`; ``to_arrow`` / ``to_parquet`` / ``to_pandas`` /
``to_coco`` hand the records to other tools.
"""

from pyodlog.analysis.classes import class_name, label_names
from pyodlog.analysis.evaluation import COCO_IOU_THRESHOLDS, Evaluation, evaluate
from pyodlog.analysis.interop import to_arrow, to_coco, to_pandas, to_parquet
from pyodlog.analysis.slices import LazyResults, ResultView, open_results

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "Evaluation",
    "LazyResults",
    "ResultView",
    "class_name",
    "evaluate",
    "label_names",
    "open_results",
    "to_arrow",
    "to_coco",
    "to_pandas",
    "to_parquet",
]
