"""Fused post-processing of a batch of 8 images against torchvision's own post-processing.

Two comparisons per family, both on the same head outputs of a real torchvision
model (random head outputs, so the work is realistic and the answer unique):

* ``op``: pyodlog's fused operator fed activated scores and decoded boxes,
  against torchvision's ``postprocess_detections`` + ``transform.postprocess``.
* ``end-to-end``: the same, with the activation and box decoding that pyodlog's
  logger runs before the operator counted on pyodlog's side.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import detection

from pyodlog.ops import postprocess_detections

SIZES = [(240, 320), (300, 260), (200, 410), (320, 320)] * 2


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=g) for h, w in SIZES]


def faster_rcnn_inputs(device="cpu"):
    torch.manual_seed(0)
    model = (
        detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, box_score_thresh=0.02
        )
        .eval()
        .to(device)
    )
    imgs = [i.to(device) for i in _images()]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t, _ = model.transform(imgs)
        feats = model.backbone(t.tensors)
        proposals, _ = model.rpn(t, feats)
        heads = model.roi_heads
        class_logits, box_regression = heads.box_predictor(
            heads.box_head(heads.box_roi_pool(feats, proposals, t.image_sizes))
        )
        class_logits = (torch.randn(class_logits.shape, generator=g) * 2).to(device)
        box_regression = (torch.randn(box_regression.shape, generator=g) * 0.5).to(device)
    orig = [tuple(i.shape[-2:]) for i in imgs]
    net_t = torch.tensor(t.image_sizes, device=device)
    orig_t = torch.tensor(orig, device=device)
    image_index = torch.cat(
        [torch.full((len(p),), i, device=device) for i, p in enumerate(proposals)]
    )

    def torchvision_post():
        boxes, scores, labels = heads.postprocess_detections(
            class_logits, box_regression, proposals, t.image_sizes
        )
        return model.transform.postprocess(
            [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)],
            t.image_sizes,
            orig,
        )

    def activate_decode():
        return F.softmax(class_logits, -1), heads.box_coder.decode(box_regression, proposals)

    kwargs = dict(
        score_thresh=heads.score_thresh,
        iou_thresh=heads.nms_thresh,
        max_detections=heads.detections_per_img,
        first_label=1,
        min_size=1e-2,
    )
    return torchvision_post, activate_decode, image_index, net_t, orig_t, kwargs


def retinanet_inputs(device="cpu"):
    torch.manual_seed(0)
    model = (
        detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=256, max_size=416
        )
        .eval()
        .to(device)
    )
    imgs = [i.to(device) for i in _images()]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t, _ = model.transform(imgs)
        features = list(model.backbone(t.tensors).values())
        head = model.head(features)
        head = {
            "cls_logits": (torch.randn(head["cls_logits"].shape, generator=g) - 3).to(device),
            "bbox_regression": (torch.randn(head["bbox_regression"].shape, generator=g) * 0.5).to(
                device
            ),
        }
        anchors = model.anchor_generator(t, features)
    hw = [x.size(2) * x.size(3) for x in features]
    a = head["cls_logits"].size(1) // sum(hw)
    per_level = [n * a for n in hw]
    split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
    split_anchors = [list(x.split(per_level)) for x in anchors]
    orig = [tuple(i.shape[-2:]) for i in imgs]
    n_images, n_anchors, n_classes = head["cls_logits"].shape
    level = torch.cat([torch.full((n,), lvl, device=device) for lvl, n in enumerate(per_level)])
    topk_group = (
        torch.arange(n_images, device=device)[:, None] * len(per_level) + level[None, :]
    ).reshape(-1)
    image_index = torch.arange(n_images, device=device).repeat_interleave(n_anchors)

    def torchvision_post():
        return model.transform.postprocess(
            model.postprocess_detections(split, split_anchors, t.image_sizes), t.image_sizes, orig
        )

    def activate_decode():
        scores = torch.sigmoid(head["cls_logits"]).reshape(-1, n_classes)
        boxes = torch.cat(
            [
                model.box_coder.decode_single(head["bbox_regression"][i], anchors[i])
                for i in range(n_images)
            ]
        )
        return scores, boxes

    kwargs = dict(
        score_thresh=model.score_thresh,
        iou_thresh=model.nms_thresh,
        max_detections=model.detections_per_img,
        topk=model.topk_candidates,
        topk_group=topk_group,
    )
    return (
        torchvision_post,
        activate_decode,
        image_index,
        torch.tensor(t.image_sizes, device=device),
        torch.tensor(orig, device=device),
        kwargs,
    )


FAMILIES = {"fasterrcnn": faster_rcnn_inputs, "retinanet": retinanet_inputs}
_CACHE = {}


def _inputs(family):
    if family not in _CACHE:
        _CACHE[family] = FAMILIES[family]()
    return _CACHE[family]


@pytest.mark.parametrize("impl", ["torchvision", "pyodlog op", "pyodlog end-to-end"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_postprocess_batch_of_8(benchmark, family, impl):
    torchvision_post, activate_decode, image_index, net, orig, kwargs = _inputs(family)
    scores, boxes = activate_decode()
    out = postprocess_detections(scores, boxes, image_index, net, orig, **kwargs)
    want = torchvision_post()
    for b, w in enumerate(want):
        assert torch.equal(out.boxes[b, : int(out.counts[b])], w["boxes"])
    fn = {
        "torchvision": torchvision_post,
        "pyodlog op": lambda: postprocess_detections(
            scores, boxes, image_index, net, orig, **kwargs
        ),
        "pyodlog end-to-end": lambda: postprocess_detections(
            *activate_decode(), image_index, net, orig, **kwargs
        ),
    }[impl]
    benchmark.group = f"postprocess cpu {family} batch of 8"
    benchmark.extra_info["role"] = "baseline" if impl == "torchvision" else impl
    with torch.inference_mode():
        benchmark(fn)
