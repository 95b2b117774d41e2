"""pyodlog.ops.detection_uncertainty against a plain PyTorch reference, and in the logged columns."""

from __future__ import annotations

import pytest
import torch

import pyodlog
from pyodlog.ops.uncertainty import SIGMOID, SOFTMAX, detection_uncertainty


def reference(logits: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documented definitions, written with plain PyTorch ops (float64)."""
    z = logits.double()
    if kind == SOFTMAX:
        p = torch.softmax(z, -1)
        q = p
    else:
        p = torch.sigmoid(z)
        q = p / p.sum(-1, keepdim=True)
    entropy = torch.special.entr(q).sum(-1)
    top = torch.cat([p, torch.zeros_like(p[..., :1])], -1).topk(2, dim=-1).values
    margin = top[..., 0] - top[..., 1]
    energy = -torch.logsumexp(z, -1)
    return entropy.float(), margin.float(), energy.float()


def check(logits: torch.Tensor, kind: int) -> None:
    got = detection_uncertainty(logits, kind)
    want = reference(logits.cpu(), kind)
    for name, g, w in zip(("entropy", "margin", "energy"), got, want):
        assert g.dtype == torch.float32 and g.shape == logits.shape[:-1], name
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@pytest.mark.parametrize("kind", [SOFTMAX, SIGMOID])
def test_random_logits_match_the_reference(device, kind):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, 91, generator=g) * 3
    check(logits.to(device), kind)


@pytest.mark.parametrize("kind", [SOFTMAX, SIGMOID])
def test_ties_minus_inf_huge_logits_and_one_class(device, kind):
    inf = float("inf")
    rows = torch.tensor(
        [
            [2.0, 2.0, 0.5, -1.0],  # a tie for the top: margin 0
            [0.0, 0.0, 0.0, 0.0],  # all equal
            [3.0, -inf, -inf, 1.0],  # -inf columns count as probability 0
            [1e4, 1e4 - 1.0, -1e4, 0.0],  # very large logits (a naive exp overflows)
            [-50.0, -60.0, -70.0, -80.0],  # very small probabilities
        ]
    )
    check(rows.to(device), kind)
    one_class = torch.tensor([[5.0], [-3.0], [0.0]])
    check(one_class.to(device), kind)
    e, m, _ = detection_uncertainty(one_class.to(device), kind)
    if kind == SOFTMAX:
        assert e.tolist() == [0.0, 0.0, 0.0] and m.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind", [SOFTMAX, SIGMOID])
def test_all_minus_inf_and_nan(kind):
    inf = float("inf")
    entropy, margin, energy = detection_uncertainty(
        torch.tensor([[-inf, -inf, -inf], [1.0, float("nan"), 0.0]]), kind
    )
    assert torch.isnan(entropy).all()
    assert energy[0] == inf and torch.isnan(energy[1]) and torch.isnan(margin[1])
    ref = reference(torch.tensor([[-inf, -inf, -inf]]), kind)
    torch.testing.assert_close(margin[:1], ref[1], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_give_float32(dtype):
    logits = torch.randn(5, 7).to(dtype)
    got = detection_uncertainty(logits, SOFTMAX)
    want = reference(logits.double(), SOFTMAX)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_empty_and_bad_arguments():
    e, m, n = detection_uncertainty(torch.zeros(0, 5), SOFTMAX)
    assert e.shape == m.shape == n.shape == (0,)
    with pytest.raises(RuntimeError, match="kind must be 0"):
        detection_uncertainty(torch.zeros(2, 5), 7)
    with pytest.raises(RuntimeError, match="floating"):
        detection_uncertainty(torch.zeros(2, 5, dtype=torch.long), SOFTMAX)


def test_opcheck():
    logits = torch.randn(3, 4, 11)
    for kind in (SOFTMAX, SIGMOID):
        torch.library.opcheck(torch.ops.pyodlog.detection_uncertainty.default, (logits, kind))


def test_logged_detections_carry_the_columns(tmp_path):
    from torchvision.models import detection

    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.01
    ).eval()
    logger = pyodlog.create_logger(model, "m", "v", auto_sync=False, near_miss=0)
    g = torch.Generator().manual_seed(1)
    logger([torch.rand(3, 200, 240, generator=g), torch.rand(3, 180, 200, generator=g)])
    data = pyodlog.open_result(logger.export(tmp_path))
    logger.close()
    assert len(data.detections["scores"]) > 0
    for name in ("entropy", "margin", "energy"):
        assert data.detections[name].dtype.name == "float32"
    logits = torch.from_numpy(data.detections["logits"])
    want = reference(logits, SOFTMAX)
    for name, w in zip(("entropy", "margin", "energy"), want):
        torch.testing.assert_close(torch.from_numpy(data.detections[name]), w, rtol=1e-5, atol=1e-6)


def _assert_record_uncertainty(logger, kind):
    record = logger.sink.records(logger.model_name, logger.version_name, logger.result_name)[-1]
    det = record.detections
    assert int(det.counts.sum()) > 0
    valid = torch.arange(det.scores.shape[1])[None, :] < det.counts[:, None]
    want = reference(det.logits[valid], kind)
    for name, w in zip(("entropy", "margin", "energy"), want):
        got = getattr(det, name)
        assert got is not None and got.dtype == torch.float32, name
        torch.testing.assert_close(got[valid], w, rtol=1e-5, atol=1e-6)


def test_detr_logs_softmax_uncertainty():
    from tests.helpers.detr_models import small_detr

    torch.manual_seed(0)
    model = small_detr().eval()
    pixel_values = torch.rand(2, 3, 64, 80)
    with (
        torch.inference_mode(),
        pyodlog.create_logger(
            model, "m", "v1", score_thresh=0.0, sink=pyodlog.InMemorySink()
        ) as logger,
    ):
        logger(pixel_values)
        _assert_record_uncertainty(logger, SOFTMAX)


def test_yolo_logs_sigmoid_uncertainty():
    import numpy as np

    from tests.test_family_yolo import build_yolo

    yolo = build_yolo()
    g = np.random.default_rng(0)
    imgs = [g.integers(0, 255, (240, 320, 3), dtype=np.uint8)]
    with pyodlog.create_logger(yolo, "m", "v1", sink=pyodlog.InMemorySink()) as logger:
        logger(imgs)
        _assert_record_uncertainty(logger, SIGMOID)
