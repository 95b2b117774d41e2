"""Writes tests/golden/segment-format3.h5.gz and segment-format3.json (run from the repository root).

    PYTHONPATH=$PWD python tests/golden/make_segment_format3.py

A segment of format 3 as this pyodlog writes it by default: float16 logits, uint8 embeddings
projected from 160 to 128 dimensions, ``images/sample_weight`` (sampling at rate 0.5, by
input_id hash: some calls sampled out), and the aggregates of every call.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import pyodlog
from tests.helpers.records import open_store, synthetic_record

HERE = Path(__file__).parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp))
        policy = pyodlog.Sampling(0.5, seed=3)
        for seed in range(6):
            record = synthetic_record(seed, 2, 4, 7, 160)
            record.sampling = policy
            store.submit(record)
        store.close()
        (segment,) = sorted((Path(tmp) / "m/v/r").glob("*.h5"))
        res = pyodlog.open_result(segment.parent)
        with open(segment, "rb") as src, gzip.open(HERE / "segment-format3.h5.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        expected = {
            "segment": segment.name,
            "input_id": res.images["input_id"],
            "sample_weight": res.images["sample_weight"].tolist(),
            "logits": res.detections["logits"].tolist(),
            "embeddings": res.detections["embeddings"].tolist(),
            "aggregates": res.aggregates().to_dict(),
        }
        (HERE / "segment-format3.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
