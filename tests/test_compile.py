"""Every operator compiles into one graph under ``torch.compile(fullgraph=True)`` (its fake kernel
describes it) and the compiled call returns what the eager call returns (as pytorch/extension-cpp
tests its operators)."""

from __future__ import annotations

import pytest
import torch

from pyodlog import ops


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def detections_case(device: str, n: int = 40, n_classes: int = 5):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(n, n_classes, generator=g)
    xy = torch.rand(n, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], 1)
    image_index = torch.arange(n) % 2
    net = torch.tensor([[120, 120], [100, 140]])
    orig = torch.tensor([[240, 240], [50, 70]])
    return [t.to(device) for t in (scores, boxes, image_index, net, orig)]


def compiled_equals_eager(fn, *args, backend: str = "aot_eager") -> None:
    eager = fn(*args)
    compiled = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    flat_eager = eager if isinstance(eager, tuple) else (eager,)
    flat_compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    assert len(flat_eager) == len(flat_compiled)
    for a, b in zip(flat_eager, flat_compiled, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_postprocess_detections_compiles_fullgraph(device):
    scores, boxes, image_index, net, orig = detections_case(device)

    def fn(scores, boxes, image_index, net, orig):
        out = ops.postprocess_detections(
            scores,
            boxes,
            image_index,
            net,
            orig,
            score_thresh=0.3,
            iou_thresh=0.5,
            max_detections=7,
        )
        return out.boxes, out.scores, out.labels, out.candidates, out.counts

    compiled_equals_eager(fn, scores, boxes, image_index, net, orig)


def test_postprocess_detections_compiles_with_inductor(device):
    scores, boxes, image_index, net, orig = detections_case(device)

    def fn(scores, boxes, image_index, net, orig):
        # Generated code around the operator (inductor's own kernels are not bit-identical to eager
        # for transcendental functions, so only exact arithmetic surrounds it here).
        out = ops.postprocess_detections(
            scores * 2.0, boxes + 1.0, image_index, net, orig, 0.5, 0.5, 5
        )
        return out.boxes * 2.0, out.scores, out.counts

    compiled_equals_eager(fn, scores, boxes, image_index, net, orig, backend="inductor")


def test_batched_nms_compiles_fullgraph(device):
    scores, boxes, image_index, _, _ = detections_case(device)

    def fn(boxes, scores, idxs):
        return ops.batched_nms(boxes, scores, idxs, 0.4)

    compiled_equals_eager(fn, boxes, scores[:, 0].contiguous(), image_index)


def test_scale_boxes_compiles_fullgraph(device):
    _, boxes, image_index, net, orig = detections_case(device)

    def fn(boxes, net, orig, image_index):
        return ops.scale_boxes(boxes, net, orig, True, image_index)

    compiled_equals_eager(fn, boxes, net, orig, image_index)


def test_quantize_and_dequantize_compile_fullgraph(device):
    x = torch.randn(2, 8, 6, 5, device=device)

    def fn(x):
        q, scale, offset = ops.quantize_uint8(x)
        return q, ops.dequantize_uint8(q, scale, offset)

    compiled_equals_eager(fn, x)
