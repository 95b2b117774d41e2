"""Runs real torchvision detectors step by step and returns, for each, what its
own post-processing returned and the candidates pyodlog's fused operator needs.

Random weights, no download; thresholds low so that there are many detections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models import detection

IMAGE_SIZES = [(240, 320), (300, 260), (200, 410)]


@dataclass
class Candidates:
    """What postprocess_detections is fed, and what torchvision returned."""

    scores: torch.Tensor
    boxes: torch.Tensor
    image_index: torch.Tensor
    net_sizes: torch.Tensor
    orig_sizes: torch.Tensor
    kwargs: dict
    expected: list[dict[str, torch.Tensor]]


def images(seed: int = 0, sizes=IMAGE_SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _sizes(transformed, imgs):
    return torch.tensor(transformed.image_sizes), torch.tensor([tuple(i.shape[-2:]) for i in imgs])


def _random_like(
    t: torch.Tensor, g: torch.Generator, scale: float, shift: float = 0.0
) -> torch.Tensor:
    return torch.randn(t.shape, generator=g, dtype=t.dtype) * scale + shift


def faster_rcnn(model, imgs, g=None) -> Candidates:
    with torch.no_grad():
        t, _ = model.transform(imgs)
        feats = model.backbone(t.tensors)
        proposals, _ = model.rpn(t, feats)
        heads = model.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(feats, proposals, t.image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        if g is not None:
            class_logits, box_regression = (
                _random_like(class_logits, g, 2.0),
                _random_like(box_regression, g, 0.5),
            )
        boxes, scores, labels = heads.postprocess_detections(
            class_logits, box_regression, proposals, t.image_sizes
        )
        expected = [
            {"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)
        ]
        orig = [tuple(i.shape[-2:]) for i in imgs]
        expected = model.transform.postprocess(expected, t.image_sizes, orig)
        net, orig_t = _sizes(t, imgs)
        return Candidates(
            scores=F.softmax(class_logits, -1),
            boxes=heads.box_coder.decode(box_regression, proposals),
            image_index=torch.cat([torch.full((len(p),), i) for i, p in enumerate(proposals)]),
            net_sizes=net,
            orig_sizes=orig_t,
            kwargs=dict(
                score_thresh=heads.score_thresh,
                iou_thresh=heads.nms_thresh,
                max_detections=heads.detections_per_img,
                first_label=1,
                min_size=1e-2,
            ),
            expected=expected,
        )


def _dense_head(
    model, imgs, activate: Callable, decode: Callable, anchors_per_location: bool, g=None
):
    """RetinaNet and FCOS: per-anchor class scores, top-k per (image, FPN level)."""
    with torch.no_grad():
        t, _ = model.transform(imgs)
        features = list(model.backbone(t.tensors).values())
        head_outputs = model.head(features)
        if g is not None:
            head_outputs = {
                k: _random_like(
                    v, g, 1.0 if k != "bbox_regression" else 0.5, -3.0 if k == "cls_logits" else 0.0
                )
                for k, v in head_outputs.items()
            }
        anchors = model.anchor_generator(t, features)
        hw = [x.size(2) * x.size(3) for x in features]
        per_location = head_outputs["cls_logits"].size(1) // sum(hw) if anchors_per_location else 1
        per_level = [n * per_location for n in hw]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        expected = model.postprocess_detections(split_outputs, split_anchors, t.image_sizes)
        expected = model.transform.postprocess(
            expected, t.image_sizes, [tuple(i.shape[-2:]) for i in imgs]
        )
        n_images, n_anchors, n_classes = head_outputs["cls_logits"].shape
        level = torch.cat([torch.full((n,), lvl) for lvl, n in enumerate(per_level)])
        net, orig = _sizes(t, imgs)
        return Candidates(
            scores=activate(head_outputs).reshape(-1, n_classes),
            boxes=torch.cat(
                [decode(head_outputs["bbox_regression"][i], anchors[i]) for i in range(n_images)]
            ),
            image_index=torch.arange(n_images).repeat_interleave(n_anchors),
            net_sizes=net,
            orig_sizes=orig,
            kwargs=dict(
                score_thresh=model.score_thresh,
                iou_thresh=model.nms_thresh,
                max_detections=model.detections_per_img,
                topk=model.topk_candidates,
                topk_group=(
                    torch.arange(n_images)[:, None] * len(per_level) + level[None, :]
                ).reshape(-1),
            ),
            expected=expected,
        )


def retinanet(model, imgs, g=None) -> Candidates:
    return _dense_head(
        model,
        imgs,
        lambda h: torch.sigmoid(h["cls_logits"]),
        lambda reg, anc: model.box_coder.decode_single(reg, anc),
        anchors_per_location=True,
        g=g,
    )


def fcos(model, imgs, g=None) -> Candidates:
    return _dense_head(
        model,
        imgs,
        lambda h: torch.sqrt(torch.sigmoid(h["cls_logits"]) * torch.sigmoid(h["bbox_ctrness"])),
        lambda reg, anc: model.box_coder.decode(reg, anc),
        anchors_per_location=False,
        g=g,
    )


def ssd(model, imgs, g=None) -> Candidates:
    with torch.no_grad():
        t, _ = model.transform(imgs)
        features = list(model.backbone(t.tensors).values())
        head_outputs = model.head(features)
        if g is not None:
            head_outputs = {
                k: _random_like(v, g, 2.0 if k == "cls_logits" else 0.5)
                for k, v in head_outputs.items()
            }
        anchors = model.anchor_generator(t, features)
        expected = model.postprocess_detections(head_outputs, anchors, t.image_sizes)
        expected = model.transform.postprocess(
            expected, t.image_sizes, [tuple(i.shape[-2:]) for i in imgs]
        )
        n_images, n_anchors, n_classes = head_outputs["cls_logits"].shape
        net, orig = _sizes(t, imgs)
        return Candidates(
            scores=F.softmax(head_outputs["cls_logits"], dim=-1).reshape(-1, n_classes),
            boxes=torch.cat(
                [
                    model.box_coder.decode_single(head_outputs["bbox_regression"][i], anchors[i])
                    for i in range(n_images)
                ]
            ),
            image_index=torch.arange(n_images).repeat_interleave(n_anchors),
            net_sizes=net,
            orig_sizes=orig,
            kwargs=dict(
                score_thresh=model.score_thresh,
                iou_thresh=model.nms_thresh,
                max_detections=model.detections_per_img,
                first_label=1,
                topk=model.topk_candidates,
                topk_per_class=True,
            ),
            expected=expected,
        )


SMALL = dict(min_size=256, max_size=416)

# Thresholds low enough for many detections, both for the models' own heads
# (random weights) and for random head outputs.
FAMILIES = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, box_score_thresh=0.02
        ),
        faster_rcnn,
    ),
    "fasterrcnn_resnet50_fpn_v2": (
        lambda: detection.fasterrcnn_resnet50_fpn_v2(
            weights=None, weights_backbone=None, box_score_thresh=0.001, **SMALL
        ),
        faster_rcnn,
    ),
    "retinanet_resnet50_fpn": (
        lambda: detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, score_thresh=0.0102, **SMALL
        ),
        retinanet,
    ),
    "fcos_resnet50_fpn": (
        lambda: detection.fcos_resnet50_fpn(
            weights=None, weights_backbone=None, score_thresh=0.08, **SMALL
        ),
        fcos,
    ),
    "ssdlite320_mobilenet_v3_large": (
        lambda: detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, score_thresh=0.02
        ),
        ssd,
    ),
}


def candidates_of(name: str, seed: int = 0, random_head: bool = False) -> Candidates:
    """Candidates of one family on generated images.

    With ``random_head`` the head's outputs are replaced by random ones of the
    same shape (the rest — proposals or anchors, sizes, and the model's own
    post-processing code — stays real): random initial weights give MobileNet
    models many exactly tied scores, and a parity test needs one right answer.
    """
    torch.manual_seed(seed)
    build, capture = FAMILIES[name]
    model = build().eval()
    return capture(
        model, images(seed), torch.Generator().manual_seed(seed) if random_head else None
    )
