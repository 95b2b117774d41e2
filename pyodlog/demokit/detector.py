"""The demo's detector: a small torchvision Faster R-CNN trained on :mod:`pyodlog.demokit.scenes`.

A plain :class:`torchvision.models.detection.FasterRCNN` (so pyodlog logs it as any
Faster R-CNN) with a seven-layer convolutional backbone (stride 8, 64 channels), a
single-level RPN and a 256-wide box head: about 1.1 M parameters, 160 px inputs.

Its weights ship with pyodlog (``demo_detector.pt`` beside this module, float16,
about 2 MB) and are checked against :data:`WEIGHTS_SHA256` when loaded. When the
file is missing, :func:`pyodlog.demokit.train.load_detector` retrains a smaller
schedule (under two minutes; a weaker detector) and caches it
(``PYODLOG_DEMO_CACHE``, default ``~/.cache/pyodlog``), with a ``.sha256`` beside it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from pyodlog.demokit.scenes import CLASS_NAMES

#: The weights that ship with pyodlog.
WEIGHTS_PATH = Path(__file__).with_name("demo_detector.pt")
#: SHA-256 of :data:`WEIGHTS_PATH`; :func:`read_weights` is given it and refuses any other file.
WEIGHTS_SHA256 = "a614da5d4c9615ab293e40012b65fd9e561e0a009baadcdd12431670e5f5c5ef"
#: Side of the (square) images the detector takes.
IMAGE_SIZE = 160
#: Version of the weights file's layout.
FORMAT = 1


class WeightsError(RuntimeError):
    """The demo detector's weights file is damaged or not the expected one."""


class TinyBackbone(nn.Sequential):
    """Seven 3×3 conv + BatchNorm + ReLU layers, stride 8, 64 output channels (receptive field ~95 px)."""

    out_channels = 64

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        # (in, out, stride, dilation)
        plan = [
            (3, 16, 2, 1),
            (16, 32, 2, 1),
            (32, 32, 1, 1),
            (32, 64, 2, 1),
            (64, 64, 1, 1),
            (64, 64, 1, 2),
            (64, 64, 1, 2),
        ]
        for c_in, c_out, stride, dilation in plan:
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


def build_detector(num_classes: int = len(CLASS_NAMES)) -> FasterRCNN:
    """The demo's Faster R-CNN, untrained (random weights); ``num_classes`` counts the background."""
    backbone = TinyBackbone()
    anchors = AnchorGenerator(sizes=((12, 20, 32, 48, 64),), aspect_ratios=((1.0,),))
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=IMAGE_SIZE,
        max_size=IMAGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(TinyBackbone.out_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        box_batch_size_per_image=64,
        box_detections_per_img=50,
    )


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike[str], info: dict[str, Any]) -> str:
    """Writes ``model``'s weights as float16 (integer buffers kept), with ``info``; returns the SHA-256.

    Also writes ``<path>.sha256`` beside the file.
    """
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu()
        for k, v in model.state_dict().items()
    }
    payload = {"format": FORMAT, "class_names": CLASS_NAMES, "info": info, "state_dict": state}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, target)
    sha = sha256_of(target)
    Path(str(target) + ".sha256").write_text(sha + "\n")
    return sha


def read_weights(path: str | os.PathLike[str], sha256: str) -> FasterRCNN:
    """The detector (in eval mode) with the weights of ``path``, after checking their SHA-256.

    Raises:
        WeightsError: the file's SHA-256 is not ``sha256``, or it is not a demo weights file.
    """
    actual = sha256_of(path)
    if actual != sha256:
        raise WeightsError(
            f"the demo detector's weights {path} have SHA-256 {actual}, expected {sha256}: the file "
            "is damaged or not the one this pyodlog ships; delete it (make demo retrains and caches "
            "a replacement) or restore it with `git checkout -- pyodlog/demokit/demo_detector.pt`"
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(
            f"{path} is not a demo detector weights file of format {FORMAT}: delete it to retrain"
        )
    model = build_detector(len(payload["class_names"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval()


def weights_info(path: str | os.PathLike[str] = WEIGHTS_PATH) -> dict[str, Any]:
    """What the training recorded in a weights file (schedule, seconds, val metrics)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return dict(payload.get("info", {}))


def match_counts(
    outputs: list[dict[str, Tensor]],
    targets: list[dict[str, Tensor]],
    score_thresh: float = 0.5,
    iou_thresh: float = 0.5,
) -> tuple[int, int, int]:
    """(true positives, detections, ground-truth objects) over images, greedy by score, labels must agree."""
    from torchvision.ops import box_iou

    tp = n_det = n_gt = 0
    for out, tgt in zip(outputs, targets):
        keep = out["scores"] >= score_thresh
        boxes, labels = out["boxes"][keep], out["labels"][keep]
        n_det += len(boxes)
        n_gt += len(tgt["boxes"])
        if not len(boxes) or not len(tgt["boxes"]):
            continue
        iou = box_iou(boxes, tgt["boxes"])
        iou[labels[:, None] != tgt["labels"][None, :]] = 0
        used = torch.zeros(len(tgt["boxes"]), dtype=torch.bool)
        for row in range(len(boxes)):  # detections come sorted by score
            scores = iou[row].masked_fill(used, 0)
            best = int(scores.argmax())
            if float(scores[best]) >= iou_thresh:
                used[best] = True
                tp += 1
    return tp, n_det, n_gt


def average_precision_50(
    outputs: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], n_class: int
) -> float:
    """Mean over classes of the all-point interpolated AP at IoU 0.5 (VOC style)."""
    from torchvision.ops import box_iou

    aps = []
    for cls in range(1, n_class):
        records: list[tuple[float, bool]] = []
        n_gt = 0
        for out, tgt in zip(outputs, targets):
            gt = tgt["boxes"][tgt["labels"] == cls]
            n_gt += len(gt)
            mine = out["labels"] == cls
            boxes, scores = out["boxes"][mine], out["scores"][mine]
            order = torch.argsort(scores, descending=True)
            used = torch.zeros(len(gt), dtype=torch.bool)
            iou = box_iou(boxes[order], gt) if len(gt) and len(boxes) else None
            for k, index in enumerate(order.tolist()):
                hit = False
                if iou is not None:
                    row = iou[k].masked_fill(used, 0)
                    best = int(row.argmax())
                    if float(row[best]) >= 0.5:
                        used[best] = hit = True
                records.append((float(scores[index]), hit))
        if n_gt == 0:
            continue
        records.sort(key=lambda r: -r[0])
        hits = torch.tensor([float(h) for _, h in records])
        tp = torch.cumsum(hits, 0)
        precision = tp / torch.arange(1, len(records) + 1)
        recall = tp / n_gt
        # all-point interpolation: precision made monotone, integrated over recall steps
        ap = 0.0
        if len(records):
            envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
            previous = 0.0
            for r, p in zip(recall.tolist(), envelope.tolist()):
                ap += (r - previous) * p
                previous = r
        aps.append(ap)
    return sum(aps) / len(aps) if aps else 0.0
