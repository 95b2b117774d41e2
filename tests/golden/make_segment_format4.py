"""Writes tests/golden/segment-format4.h5.gz and segment-format4.json (run from the repository root).

    PYTHONPATH=$PWD python tests/golden/make_segment_format4.py

A segment of format 4 as this pyodlog writes it by default, from a real detector: Faster R-CNN
MobileNet v3 320 (random weights, the class scores' layer drawn with std 0.5
(bias 2.0),
``torch.manual_seed(0)``, ``box_score_thresh=0.005``), two calls
of two 96x128 images, near-misses (``near_miss=8``) with their envelope (no
``images/nm_score_dtype``: format 5 added it), float16 logits, uint8 embeddings. The JSON holds
what ``open_result`` returned then, and a replay at the median detection score.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision

import pyodlog

HERE = Path(__file__).parent


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.005
    ).eval()
    # Varied class scores (random weights alone give every proposal the same ones).
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.5)
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.bias, std=2.0)
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        logger = pyodlog.create_logger(
            model,
            "golden4",
            "v1",
            result_name="run",
            sink=pyodlog.HDF5Store(Path(tmp)),
            near_miss=8,
            metrics=False,
        )
        with torch.inference_mode():
            for call in range(2):
                images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
                logger(images, input_ids=[f"c{call}-a", f"c{call}-b"])
        logger.close()
        (segment,) = sorted(Path(tmp).rglob("*.h5"))
        res = pyodlog.open_result(segment.parent)
        thresh = float(np.median(res.detections["scores"]))  # about half of the detections
        replayed = res.replay(score_thresh=thresh)
        with open(segment, "rb") as src, gzip.open(HERE / "segment-format4.h5.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        expected = {
            "segment": segment.name,
            "input_id": res.images["input_id"],
            "det_count": res.images["det_count"].tolist(),
            "scores": res.detections["scores"].tolist(),
            "nm_count": res.images["nm_count"].tolist(),
            "nm_scores": res.near_misses["scores"].tolist(),
            "nm_reason": res.near_misses["reason"].tolist(),
            "replay_score_thresh": thresh,
            "replay_scores": [replayed[i].scores.tolist() for i in range(len(replayed))],
        }
        (HERE / "segment-format4.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
