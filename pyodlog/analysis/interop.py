"""Logged records for other tools (Arrow, Parquet, pandas, COCO JSON): implemented on the read side,
:mod:`pyodlog.io.interop`, so that ``ResultData.to_arrow()`` etc. are methods; re-exported here."""

from pyodlog.io.interop import coco_dataset, coco_results, to_arrow, to_coco, to_pandas, to_parquet

__all__ = ["coco_dataset", "coco_results", "to_arrow", "to_coco", "to_pandas", "to_parquet"]
