"""Logging in production execution modes (issue 21): mixed precision, half models, grad modes,
channels_last, batch-tensor input, torch.compile.

For each mode: the logged call returns what the bare call returns in the same mode, the logged
detections are the returned ones (ties included: bfloat16 scores tie a lot), each matched to the
candidate it came from (its logit row is the head's row), records reach the HDF5 store and read
back (``open_result``) in the documented dtypes (float32 boxes/scores/logits/embeddings), and
``logger.stats()["logging_errors"] == 0``.

Real torchvision detectors with random weights and small inputs; RetinaNet and FCOS on a
ResNet-18 FPN (the same classes and logger code as the ResNet-50 builders, faster here).
"""

from __future__ import annotations

import contextlib
import gc
import os
import weakref

import pytest
import torch
from torch import nn
from torchvision.models import detection, resnet18
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import pyodlog
from tests.helpers.detr_models import small_detr

CUDA = torch.cuda.is_available() and pyodlog.build_info()["cuda"]
SMALL = dict(weights=None, weights_backbone=None, min_size=96, max_size=128)


def _r18_fpn():
    return _resnet_fpn_extractor(
        resnet18(weights=None), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )


BUILDERS = {
    "fasterrcnn": lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        box_score_thresh=0.0, box_detections_per_img=60, **SMALL
    ),
    "retinanet": lambda: detection.RetinaNet(
        _r18_fpn(), 91, min_size=96, max_size=128, score_thresh=0.005, detections_per_img=60
    ),
    "fcos": lambda: detection.FCOS(
        _r18_fpn(), 91, min_size=96, max_size=128, score_thresh=0.005, detections_per_img=60
    ),
    "ssdlite": lambda: detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, detections_per_img=60
    ),
}
_MODELS: dict[str, nn.Module] = {}


def model_of(name: str) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = BUILDERS[name]().eval()
    return _MODELS[name]


def images(seed=0, sizes=((96, 112), (80, 128))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@contextlib.contextmanager
def head_logit_rows(model: nn.Module):
    """Records, per call, each image's candidate logit rows as the model's head produced them."""
    calls: list[list[torch.Tensor]] = []
    handles = []
    if hasattr(model, "roi_heads"):
        counts: list[int] = []
        handles.append(
            model.roi_heads.register_forward_pre_hook(
                lambda m, args: counts.__setitem__(slice(None), [len(p) for p in args[1]])
            )
        )
        handles.append(
            model.roi_heads.box_predictor.register_forward_hook(
                lambda m, i, out: calls.append(list(out[0].split(counts)))
            )
        )
    else:
        handles.append(
            model.head.register_forward_hook(
                lambda m, i, out: calls.append(list(out["cls_logits"].unbind()))
            )
        )
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def assert_outputs_equal(got, want):
    assert type(got) is type(want) and len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype, key
            assert torch.equal(g[key], w[key]), key


def run_mode(name, model, call_input, mode=contextlib.nullcontext, **logger_kwargs):
    """Bare call and logged call in ``mode``; returns (got, want, logit rows of the logged call, result)."""
    with mode():
        want = model(call_input)
        # Exact float32 storage: the stored logits are compared bit for bit with the head's.
        logger_kwargs.setdefault("storage", "float32")
        logger = pyodlog.create_logger(model, name, "v1", **logger_kwargs)  # name: a model name
        with head_logit_rows(model) as rows:
            got = logger(call_input)
    stats = logger.stats()
    logger.wait_for_save()
    path = logger.export(os.environ["PYODLOG_HOME"])  # the test's own folder, not the cwd
    logger.close()
    assert stats["logging_errors"] == 0, stats.get("last_logging_error")
    assert_outputs_equal(got, want)
    return got, want, rows[-1], pyodlog.open_result(path)


def assert_log_is_the_output(result, returned, rows):
    """The stored detections are the returned ones (as float32), each with its candidate's logit row."""
    assert len(result) == len(returned)
    for i, (w, head) in enumerate(zip(returned, rows)):
        d = result.image_detections(i)
        for field in ("boxes", "scores", "logits"):
            assert getattr(d, field).dtype == torch.float32, field
        assert torch.equal(d.boxes, w["boxes"].float())
        assert torch.equal(d.scores, w["scores"].float())
        assert torch.equal(d.labels, w["labels"])
        assert d.candidate_index.shape == (len(w["scores"]),)
        assert bool((d.candidate_index >= 0).all()), "a returned detection was not matched"
        assert torch.equal(d.logits, head[d.candidate_index.to(head.device)].float().cpu())
        if d.embeddings is not None:
            assert d.embeddings.dtype == torch.float32


def has_ties(returned) -> bool:
    return any(len(o["scores"]) > len(o["scores"].unique()) for o in returned)


def autocast(dtype, device="cpu"):
    return lambda: torch.autocast(device, dtype=dtype)


def no_grad_autocast(dtype, device="cpu"):
    @contextlib.contextmanager
    def mode():
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            yield

    return mode


# -- mixed precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_bf16_autocast_every_torchvision_family(name):
    model = model_of(name)
    got, _, rows, result = run_mode(
        name,
        model,
        images(),
        no_grad_autocast(torch.bfloat16),
        target_layers={"head_in": {"path": "backbone", "compression": "bfloat16"}}
        if name == "ssdlite"
        else None,
    )
    assert got[0]["scores"].dtype == torch.bfloat16  # the mode really ran in bfloat16
    assert sum(len(o["scores"]) for o in got) > 0
    assert_log_is_the_output(result, got, rows)
    if name in ("ssdlite", "retinanet"):
        assert has_ties(got)  # bfloat16 scores tie: the log still equals the output


def test_bf16_autocast_detr():
    torch.manual_seed(0)
    model = small_detr().eval()
    pixel_values = torch.rand(2, 3, 96, 112)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(pixel_values=pixel_values)
        with pyodlog.create_logger(model, "detr", "v1", score_thresh=0.0) as logger:
            got = logger(pixel_values=pixel_values)
            stats = logger.stats()
            logger.wait_for_save()
            path = logger.export(os.environ["PYODLOG_HOME"])  # the test's own folder, not the cwd
    assert stats["logging_errors"] == 0, stats.get("last_logging_error")
    assert got.logits.dtype == torch.bfloat16
    assert torch.equal(got.logits, want.logits) and torch.equal(got.pred_boxes, want.pred_boxes)
    result = pyodlog.open_result(path)
    for i in range(2):
        d = result.image_detections(i)
        assert d.logits.dtype == torch.float32 and d.scores.dtype == torch.float32
        assert len(d.scores) == 30
        assert torch.equal(d.logits, got.logits[i, d.candidate_index].float())


def test_fp16_autocast_cpu():
    # CPU autocast supports float16 for these ops (slow convolutions: one family here, the
    # matching code is shared; CUDA runs every family below).
    got, _, rows, result = run_mode(
        "fasterrcnn", model_of("fasterrcnn"), images(), no_grad_autocast(torch.float16)
    )
    assert got[0]["scores"].dtype == torch.float16
    assert_log_is_the_output(result, got, rows)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU present")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cuda_autocast_every_family(name, dtype):
    model = model_of(name).cuda()
    try:
        got, _, rows, result = run_mode(
            name, model, [i.cuda() for i in images()], no_grad_autocast(dtype, "cuda")
        )
    finally:
        model.cpu()
    assert_log_is_the_output(result, [{k: v.cpu() for k, v in o.items()} for o in got], rows)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU present")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bf16"])
@pytest.mark.parametrize("name", ["fasterrcnn", "ssdlite"])
def test_cuda_low_precision_models(name, dtype):
    import copy

    model = copy.deepcopy(model_of(name)).to("cuda", dtype)
    imgs = [i.to("cuda", dtype) for i in images()]
    with torch.no_grad():
        try:
            model(imgs)
        except (RuntimeError, NotImplementedError) as refused:
            # torchvision's CUDA NMS has no bfloat16 kernel (0.26 at least): the bare model cannot
            # run, and the logged call raises the model's own error, unchanged, counting nothing.
            with pyodlog.create_logger(model, name, "v1") as logger:
                with pytest.raises(type(refused)) as logged:
                    logger(imgs)
                assert logger.stats()["logging_errors"] == 0
            assert str(logged.value) == str(refused)
            return
    got, _, rows, result = run_mode(name, model, imgs, torch.no_grad)
    assert got[0]["scores"].dtype == dtype
    assert_log_is_the_output(result, [{k: v.cpu() for k, v in o.items()} for o in got], rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bf16"])
def test_low_precision_models_on_cpu_fail_as_the_bare_model_does(dtype):
    # torchvision's CPU NMS has no float16/bfloat16 kernel: the bare model cannot run there, and
    # the logged call raises the model's own error, unchanged (nothing is logged or counted).
    import copy

    model = copy.deepcopy(model_of("ssdlite")).to(dtype)
    imgs = [i.to(dtype) for i in images()]
    with torch.no_grad():
        with pytest.raises(RuntimeError) as bare:
            model(imgs)
        with pyodlog.create_logger(model, "ssdlite", "v1") as logger:
            with pytest.raises(RuntimeError) as logged:
                logger(imgs)
            assert logger.stats()["logging_errors"] == 0
    assert str(logged.value) == str(bare.value) and "not implemented" in str(bare.value)


def test_a_model_that_returns_bfloat16_from_float32_candidates():
    # The model computes in float32 and casts what it returns to bfloat16 (as a serving wrapper
    # does to halve a response): the candidates equal the returned values once rounded the same
    # way, so the matching compares in the returned precision.
    import copy

    model = copy.deepcopy(model_of("ssdlite"))
    postprocess = model.transform.postprocess

    def bf16_postprocess(*args):  # the last step of the model: boxes in the input images' sizes
        return [
            {**o, "boxes": o["boxes"].bfloat16(), "scores": o["scores"].bfloat16()}
            for o in postprocess(*args)
        ]

    model.transform.postprocess = bf16_postprocess
    got, _, rows, result = run_mode("ssdlite", model, images(), torch.no_grad)
    assert got[0]["scores"].dtype == torch.bfloat16 and rows[0].dtype == torch.float32
    assert_log_is_the_output(result, got, rows)


@pytest.mark.parametrize("compression", ["bfloat16", "float16", "uint8", "none"])
def test_features_of_a_bf16_activation_store_and_read_back(compression):
    model = model_of("ssdlite")
    layers = {"fpn": {"path": "backbone", "compression": compression}}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        captured = {}
        handle = model.backbone.register_forward_hook(
            lambda m, i, out: captured.update(out=out["0"].clone())
        )
        with pyodlog.create_logger(model, "ssdlite", "v1", target_layers=layers) as logger:
            logger(images())
            stats = logger.stats()
            logger.wait_for_save()
            path = logger.export(os.environ["PYODLOG_HOME"])  # the test's own folder, not the cwd
        handle.remove()
    assert stats["logging_errors"] == 0, stats.get("last_logging_error")
    activation = captured["out"]
    assert activation.dtype == torch.bfloat16
    result = pyodlog.open_result(path)
    for i in range(2):
        restored = result.feature(i, "fpn/0")
        assert restored.dtype == torch.bfloat16 and restored.shape == activation[i].shape
        want = activation[i]
        if compression in ("bfloat16", "none"):
            assert torch.equal(restored, want)  # lossless: the 16-bit pattern
        elif compression == "float16":
            assert torch.equal(restored, want.to(torch.float16).to(torch.bfloat16))
        else:
            q, scale, offset = pyodlog.ops.quantize_uint8(want[None])
            expected = pyodlog.ops.dequantize_uint8(q, scale, offset, torch.bfloat16)[0]
            assert torch.equal(restored, expected)


# -- grad modes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "grad_enabled"])
def test_grad_modes(grad_mode):
    mode = {
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
        "grad_enabled": torch.enable_grad,
    }[grad_mode]
    got, _, rows, result = run_mode("ssdlite", model_of("ssdlite"), images(), mode)
    assert_log_is_the_output(result, [{k: v.detach() for k, v in o.items()} for o in got], rows)


@pytest.mark.parametrize(
    "with_layers",
    [
        pytest.param(False, id="detections"),
        pytest.param(True, id="target_layers"),
    ],
)
def test_grad_enabled_nothing_logged_keeps_the_autograd_graph_alive(with_layers):
    model = model_of("ssdlite")
    sink = pyodlog.InMemorySink()
    graph: list[weakref.ref] = []  # tensors of the autograd graph the call built
    hooks = [
        model.head.register_forward_hook(
            lambda m, i, out: graph.extend(weakref.ref(t) for t in out.values())
        ),
        model.backbone.register_forward_hook(
            lambda m, i, out: graph.extend(weakref.ref(t) for t in out.values())
        ),
    ]

    def call_and_drop(run) -> None:
        out = run(images())
        assert out[0]["scores"].grad_fn is not None  # the graph exists while the output lives
        graph.extend(weakref.ref(t) for t in out[0].values())
        del out
        gc.collect()

    layers = {"fpn": {"path": "backbone", "compression": "none"}} if with_layers else None
    try:
        call_and_drop(model)
        assert graph and all(r() is None for r in graph)  # the bare call keeps nothing
        with pyodlog.create_logger(
            model, "ssdlite", "v1", sink=sink, target_layers=layers
        ) as logger:
            graph.clear()
            call_and_drop(logger)
            assert graph and all(r() is None for r in graph)  # head, backbone, output: all freed
            record = sink.records("ssdlite", "v1", logger.result_name)[-1]
            assert logger.stats()["logging_errors"] == 0
    finally:
        for h in hooks:
            h.remove()
    tensors = [t for t in record.detections.__dict__.values() if isinstance(t, torch.Tensor)]
    tensors += [f.payload for f in record.features.values()]
    assert len(record.features) == (1 if with_layers else 0) * 6
    assert tensors and all(t.grad_fn is None and not t.requires_grad for t in tensors)


# -- memory formats and input layouts ----------------------------------------------------------


@pytest.mark.parametrize("name", ["fasterrcnn", "ssdlite"])
def test_channels_last_model_and_batch_tensor_input(name):
    import copy

    model = copy.deepcopy(model_of(name)).to(memory_format=torch.channels_last)
    batch = torch.stack(images(sizes=((96, 112), (96, 112))))
    got, _, rows, result = run_mode(
        name, model, batch.contiguous(memory_format=torch.channels_last), torch.no_grad
    )
    assert_log_is_the_output(result, got, rows)
    # The plain [B, C, H, W] tensor, on the channels_last model.
    got, _, rows, result = run_mode(f"{name}-contiguous", model, batch, torch.no_grad)
    assert_log_is_the_output(result, got, rows)


# -- torch.compile -------------------------------------------------------------------------------
# backend="aot_eager": dynamo's graph capture and AOTAutograd, as the default inductor backend,
# without inductor's code generation (40 s a compile of SSDlite on this CPU, aot_eager 6 s); run
# with inductor by hand it logs the same (benchmarks/RESULTS.md).


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_compile(fresh_dynamo):
    """A compiled model logs like the eager one once its graph is compiled with the logger's hooks;
    compiled before (dynamo does not notice hooks added later) the call still returns the output and
    the logging error says how to fix it."""
    import copy

    import torch._dynamo

    model = copy.deepcopy(model_of("ssdlite"))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        want = compiled(images())  # the bare compiled call: compiled without the logger's hooks
        with pyodlog.create_logger(compiled, "ssdlite", "v1", storage="float32") as logger:
            assert logger._core is model  # the hooks are on the compiled module's original
            assert_outputs_equal(logger(images()), want)  # returned; the record is not made
            stats = logger.stats()
            assert stats["logging_errors"] == 1
            assert "torch._dynamo.reset()" in stats["last_logging_error"]
            assert "before the compiled model's first call" in stats["last_logging_error"]
            torch._dynamo.reset()  # as the message says: the next call compiles with the hooks
            with head_logit_rows(model) as rows:
                got = logger(images())
            stats = logger.stats()
            logger.wait_for_save()
            path = logger.export(os.environ["PYODLOG_HOME"])  # the test's own folder, not the cwd
    assert stats["logging_errors"] == 1, stats.get("last_logging_error")
    assert_outputs_equal(got, want)
    result = pyodlog.open_result(path)
    assert len(result) == 2  # the second call only
    assert_log_is_the_output(result, got, rows[-1])


CUDA_GRAPH_COMPILES = {
    "reduce-overhead": dict(mode="reduce-overhead"),
    "max-autotune": dict(mode="max-autotune"),
    "cudagraphs": dict(backend="cudagraphs"),
}


@pytest.mark.parametrize("compile_kwargs", list(CUDA_GRAPH_COMPILES))
@pytest.mark.parametrize("name", ["fasterrcnn", "ssdlite"])
def test_cuda_graph_compiles_are_refused_with_the_mode_named(name, compile_kwargs, device):
    # Refused at create_logger (nothing compiles there): the same on a CPU and a CUDA model.
    import copy

    model = copy.deepcopy(model_of(name)).to(device)
    compiled = torch.compile(model, **CUDA_GRAPH_COMPILES[compile_kwargs])
    with pytest.raises(ValueError, match=r"CUDA graph") as refused:
        pyodlog.create_logger(compiled, name, "v1")
    assert compile_kwargs in str(refused.value)
    assert "max-autotune-no-cudagraphs" in str(refused.value)
    # Nothing of the refused logger stays on the model; the default mode is accepted.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    pyodlog.create_logger(torch.compile(model), name, "v1").close()


# -- the fused operators on 16-bit inputs ---------------------------------------------------------
# Each kernel computes in float32 (or wider) and rounds once to the input's dtype: on 16-bit values
# (exact in float32) it equals the float32 kernel on the same values, its 16-bit outputs rounded.

LOW = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


def detection_case(device, dtype, n=60, n_classes=4):
    g = torch.Generator().manual_seed(7)
    scores = (torch.rand(n, n_classes, generator=g) * 8).round() / 8  # many ties
    xy = torch.rand(n, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 30], 1)
    image_index = torch.arange(n) % 2
    net, orig = torch.tensor([[120, 120], [100, 140]]), torch.tensor([[240, 250], [50, 70]])
    return [t.to(device) for t in (scores.to(dtype), boxes.to(dtype), image_index, net, orig)]


@pytest.mark.parametrize("dtype", LOW)
def test_postprocess_detections_16_bit_parity_and_opcheck(device, dtype):
    scores, boxes, index, net, orig = detection_case(device, dtype)
    args = (index, net, orig, 0.2, 0.5, 12)
    low = pyodlog.ops.postprocess_detections(scores, boxes, *args)
    ref = pyodlog.ops.postprocess_detections(scores.float(), boxes.float(), *args)
    assert low.boxes.dtype == dtype and low.scores.dtype == dtype
    for field in ("labels", "candidates", "counts"):
        assert torch.equal(getattr(low, field), getattr(ref, field)), field
    assert torch.equal(low.scores, ref.scores.to(dtype))
    assert torch.equal(low.boxes, ref.boxes.to(dtype))
    torch.library.opcheck(torch.ops.pyodlog.postprocess_detections.default, (scores, boxes, *args))


@pytest.mark.parametrize("dtype", LOW)
def test_batched_nms_and_scale_boxes_16_bit_parity_and_opcheck(device, dtype):
    scores, boxes, index, net, orig = detection_case(device, dtype)
    keep = pyodlog.ops.batched_nms(boxes, scores[:, 0].contiguous(), index, 0.4)
    assert torch.equal(
        keep, pyodlog.ops.batched_nms(boxes.float(), scores[:, 0].float().contiguous(), index, 0.4)
    )
    torch.library.opcheck(
        torch.ops.pyodlog.batched_nms.default, (boxes, scores[:, 0].contiguous(), index, 0.4)
    )
    scaled = pyodlog.ops.scale_boxes(boxes, net, orig, True, index)
    assert scaled.dtype == dtype
    assert torch.equal(
        scaled, pyodlog.ops.scale_boxes(boxes.float(), net, orig, True, index).to(dtype)
    )
    torch.library.opcheck(torch.ops.pyodlog.scale_boxes.default, (boxes, net, orig, True, index))


@pytest.mark.parametrize("dtype", LOW)
def test_quantize_uint8_16_bit_parity_and_opcheck(device, dtype):
    x = torch.randn(2, 6, 9, 7, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    q, scale, offset = pyodlog.ops.quantize_uint8(x)
    q32, scale32, offset32 = pyodlog.ops.quantize_uint8(x.float())
    assert scale.dtype == torch.float32  # the row statistics accumulate in float32
    assert torch.equal(q, q32) and torch.equal(scale, scale32) and torch.equal(offset, offset32)
    rows = x.reshape(12, -1)
    buffers = (
        torch.empty_like(rows, dtype=torch.uint8),
        torch.empty(12, device=device),
        torch.empty(12, device=device),
    )
    torch.library.opcheck(torch.ops.pyodlog.quantize_uint8_out.default, (rows, *buffers))
    torch.library.opcheck(
        torch.ops.pyodlog.dequantize_uint8.default, (q.reshape(12, -1), scale, offset, dtype)
    )
    restored = pyodlog.ops.dequantize_uint8(q, scale, offset, dtype)
    assert torch.equal(restored, pyodlog.ops.dequantize_uint8(q32, scale32, offset32).to(dtype))


def test_cuda_graph_modes_are_refused_for_every_family_before_any_hook():
    detr = small_detr().eval()
    compiled = torch.compile(detr, mode="reduce-overhead")
    with pytest.raises(ValueError, match="reduce-overhead"):
        pyodlog.create_logger(compiled, "m", "v", sink=pyodlog.InMemorySink())
    assert not detr._forward_hooks and not detr._forward_pre_hooks
