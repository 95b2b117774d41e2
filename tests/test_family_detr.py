"""Hugging Face DETR, Deformable DETR and RT-DETR (v1, v2): the logged detections are the image
processor's ``post_process_object_detection`` of the very output the call returned.

Small models built from configuration with random weights: nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach a hub

import pytest
import torch
import transformers
from transformers import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DeformableDetrImageProcessor,
    DetrImageProcessor,
    ResNetConfig,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessor,
    RTDetrResNetConfig,
    RTDetrV2Config,
    RTDetrV2ForObjectDetection,
)

import pyodlog
from pyodlog import InMemorySink, LoggerClosedError
from pyodlog.models.transformers_detr import TransformersDetrLogger
from tests.helpers.detr_models import SMALL_DECODER, SMALL_RESNET, small_detr


def _deformable():
    backbone = ResNetConfig(
        **SMALL_RESNET, layer_type="basic", out_features=["stage2", "stage3", "stage4"]
    )
    return DeformableDetrForObjectDetection(
        DeformableDetrConfig(
            use_pretrained_backbone=False,
            use_timm_backbone=False,
            backbone_config=backbone,
            encoder_layers=1,
            encoder_ffn_dim=64,
            encoder_attention_heads=4,
            num_feature_levels=3,
            encoder_n_points=2,
            decoder_n_points=2,
            **SMALL_DECODER,
        )
    )


def _rtdetr(config_cls=RTDetrConfig, model_cls=RTDetrForObjectDetection):
    backbone = RTDetrResNetConfig(
        **SMALL_RESNET, layer_type="basic", out_features=["stage2", "stage3", "stage4"]
    )
    return model_cls(
        config_cls(
            backbone_config=backbone,
            use_pretrained_backbone=False,
            encoder_in_channels=[32, 64, 128],
            encoder_hidden_dim=32,
            encoder_ffn_dim=64,
            encoder_attention_heads=4,
            decoder_in_channels=[32, 32, 32],
            decoder_n_points=2,
            **SMALL_DECODER,
        )
    )


# name: (builder, processor of the family, the model's class head on the last decoder layer)
FAMILIES = {
    "detr": (
        small_detr,
        lambda: DetrImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}),
        lambda m: m.class_labels_classifier,
    ),
    "deformable_detr": (
        _deformable,
        lambda: DeformableDetrImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}),
        lambda m: m.class_embed[-1],
    ),
    "rt_detr": (
        _rtdetr,
        lambda: RTDetrImageProcessor(size={"height": 160, "width": 160}),
        lambda m: m.model.decoder.class_embed[-1],
    ),
    "rt_detr_v2": (
        lambda: _rtdetr(RTDetrV2Config, RTDetrV2ForObjectDetection),
        lambda: RTDetrImageProcessor(size={"height": 160, "width": 160}),
        lambda m: m.model.decoder.class_embed[-1],
    ),
}
_MODELS: dict = {}


def model_of(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = FAMILIES[name][0]().eval()
    return _MODELS[name]


def images(sizes=((150, 200), (180, 120))):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for h, w in sizes]


def create_logger(*args, **kwargs):
    kwargs.setdefault("sink", InMemorySink())
    return pyodlog.create_logger(*args, **kwargs)


def last_record(logger):
    return logger.sink.records(logger.model_name, logger.version_name, logger.result_name)[-1]


def median_score(processor, output):
    """A threshold that keeps about half of what threshold 0 keeps (random weights score low)."""
    everything = processor.post_process_object_detection(output, threshold=0.0)
    return float(torch.cat([r["scores"] for r in everything]).median())


def assert_same_output(got, want):
    assert type(got) is type(want)
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], torch.Tensor):
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logged_detections_are_post_process_object_detection_of_the_returned_output(name):
    model, processor, class_head = model_of(name), FAMILIES[name][1](), FAMILIES[name][2]
    imgs = images()
    inputs = processor(images=imgs, return_tensors="pt")
    target_sizes = [tuple(img.shape[-2:]) for img in imgs]
    with torch.inference_mode():
        want = model(**inputs)
        thresh = median_score(processor, want)
        with create_logger(model, "m", "v1", score_thresh=thresh) as logger:
            assert type(logger) is TransformersDetrLogger
            got = logger(inputs, input_ids=["a", "b"], target_sizes=target_sizes)
    assert_same_output(got, want)  # the model's own output object, untouched
    expected = processor.post_process_object_detection(
        got, threshold=thresh, target_sizes=target_sizes
    )
    record = last_record(logger)
    assert record.input_ids == ["a", "b"]
    per_image = record.detections.unbind()
    assert sum(len(d) for d in per_image) >= 4
    for b, (d, e) in enumerate(zip(per_image, expected)):
        assert d.image_size == target_sizes[b]
        assert torch.equal(d.boxes, e["boxes"])
        assert torch.equal(d.scores, e["scores"])
        assert torch.equal(d.labels, e["labels"])
        # The query's full logit vector, its index, and its last decoder state.
        assert torch.equal(d.logits, got.logits[b, d.candidate_index])
        assert torch.equal(d.embeddings, got.last_hidden_state[b, d.candidate_index])
        with torch.no_grad():
            torch.testing.assert_close(class_head(model)(d.embeddings), d.logits)
        if name == "detr":
            assert d.logits.shape[1] == model.config.num_labels + 1  # + "no object"
            probs = d.logits.softmax(-1)
            assert torch.equal(d.candidate_index, d.candidate_index.sort().values)
        else:
            assert d.logits.shape[1] == model.config.num_labels
            probs = d.logits.sigmoid()
        torch.testing.assert_close(probs.gather(1, d.labels[:, None]).squeeze(1), d.scores)
    assert logger.n_class == per_image[0].logits.shape[1]


def test_rt_detr_with_pixel_values_keyword_and_img_sizes_and_queries_with_several_classes():
    torch.manual_seed(0)
    model, processor = _rtdetr().eval(), FAMILIES["rt_detr"][1]()
    head = model.model.decoder.class_embed[-1]
    with torch.no_grad():  # every class scores alike per query: a query gives several detections
        head.weight.copy_(head.weight[:1].expand_as(head.weight))
        head.bias.copy_(torch.linspace(0.0, 0.5, head.bias.shape[0]))
    pixel_values = processor(images=images(), return_tensors="pt")["pixel_values"]
    sizes = [(480, 640), (720, 1280)]
    with torch.inference_mode():
        want = model(pixel_values=pixel_values)
        thresh = median_score(processor, want)
        with create_logger(model, "m", "v1", score_thresh=thresh) as logger:
            got = logger(pixel_values=pixel_values, img_sizes=sizes)
    assert_same_output(got, want)
    expected = processor.post_process_object_detection(got, threshold=thresh, target_sizes=sizes)
    per_image = last_record(logger).detections.unbind()
    for d, e in zip(per_image, expected):
        assert len(d) > 0 and d.image_size in sizes
        assert torch.equal(d.boxes, e["boxes"]) and torch.equal(d.scores, e["scores"])
        assert torch.equal(d.labels, e["labels"])
        assert len(d.candidate_index.unique()) < len(d)  # repeated queries
        assert torch.equal(d.logits, got.logits[per_image.index(d), d.candidate_index])


def test_sizes_default_to_the_unpadded_size_from_the_pixel_mask():
    model, processor = model_of("detr"), FAMILIES["detr"][1]()
    inputs = processor(images=images(), return_tensors="pt")
    mask = inputs["pixel_mask"]
    assert not bool(mask.all())  # the two images were padded to one batch
    unpadded = [
        (int(m.any(1).sum()), int(m.any(0).sum())) for m in mask
    ]  # what the processor resized each image to
    with torch.inference_mode(), create_logger(model, "m", "v1", score_thresh=0.0) as logger:
        out = logger(inputs["pixel_values"], pixel_mask=mask)
    record = last_record(logger)
    assert record.image_sizes == unpadded
    expected = processor.post_process_object_detection(out, threshold=0.0, target_sizes=unpadded)
    for d, e in zip(record.detections.unbind(), expected):
        assert d.image_size in unpadded and torch.equal(d.boxes, e["boxes"])
    # Without a mask: the size of pixel_values.
    with torch.inference_mode(), create_logger(model, "m", "v1", score_thresh=0.0) as logger:
        logger(inputs["pixel_values"])
    assert last_record(logger).image_sizes == [tuple(inputs["pixel_values"].shape[-2:])] * 2


def test_deformable_detr_max_detections_is_the_processors_top_k():
    model, processor = model_of("deformable_detr"), FAMILIES["deformable_detr"][1]()
    inputs = processor(images=images(), return_tensors="pt")
    with (
        torch.inference_mode(),
        create_logger(model, "m", "v1", score_thresh=0.0, max_detections_per_image=7) as lg,
    ):
        out = lg(inputs)
    expected = processor.post_process_object_detection(out, threshold=0.0, top_k=7)
    for d, e in zip(last_record(lg).detections.unbind(), expected):
        assert len(d) == 7 and torch.equal(d.scores, e["scores"])
        assert torch.equal(d.labels, e["labels"])


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("detr", dict(iou_thresh=0.5), "no NMS"),
        ("rt_detr", dict(iou_thresh=0.5), "no NMS"),
        ("detr", dict(max_detections_per_image=10), "no cap"),
        ("rt_detr", dict(max_detections_per_image=10), "no cap"),
    ],
)
def test_thresholds_the_post_processing_does_not_have_are_refused(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_logger(model_of(name), "m", "v1", **kwargs)


def test_call_errors_are_clear_and_record_nothing():
    model = model_of("detr")
    x = torch.rand(2, 3, 64, 64)
    with create_logger(model, "m", "v1") as logger:
        with pytest.raises(ValueError, match="return_dict=False"):
            logger({"pixel_values": x, "return_dict": False})
        model.config.return_dict = False
        try:
            with pytest.raises(ValueError, match="return_dict=False"):
                logger(x)
        finally:
            model.config.return_dict = True
        with pytest.raises(ValueError, match="pass it once"):
            logger(x, pixel_values=x)
        with pytest.raises(ValueError, match="no 'pixel_values'"):
            logger({"images": x})
        with pytest.raises(ValueError, match="pixel_mask must be"):
            logger(x, pixel_mask=torch.ones(2, 32, 32, dtype=torch.long))
        with pytest.raises(ValueError, match="target_sizes must give one"):
            logger(x, target_sizes=[(10, 10)])
        with pytest.raises(ValueError, match="same thing"):
            logger(x, target_sizes=[(10, 10)] * 2, img_sizes=[(10, 10)] * 2)
        with pytest.raises(ValueError, match="unknown keyword"):
            logger(x, camera="c1")
        model.train()
        try:
            with pytest.raises(RuntimeError, match="model.eval()"):
                logger(x)
        finally:
            model.eval()
        assert logger.sink.records("m", "v1", logger.result_name) == []


def test_hooks_are_removed_on_close_and_records_read_back_from_the_store(tmp_path):
    model, processor = model_of("rt_detr"), FAMILIES["rt_detr"][1]()

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = n_hooks()
    inputs = processor(images=images(), return_tensors="pt")
    logger = pyodlog.create_logger(
        model, "m", "v1", score_thresh=0.0, target_layers={"enc": "model.encoder"}
    )  # the default HDF5 store
    assert n_hooks() > before
    with torch.inference_mode():
        out = logger(inputs, input_ids=["x", "y"], target_sizes=[(150, 200), (180, 120)])
    encoded = logger.get_hooked_features("enc")  # the encoder's own output object
    assert encoded.last_hidden_state[0].shape[0] == 2
    exported = logger.export(tmp_path)
    logger.close()
    assert n_hooks() == before
    with pytest.raises(LoggerClosedError):
        logger(inputs)
    expected = processor.post_process_object_detection(
        out, threshold=0.0, target_sizes=[(150, 200), (180, 120)]
    )
    result = pyodlog.open_result(exported)
    assert result.images["input_id"] == ["x", "y"]
    for i, e in enumerate(expected):
        d = result.image_detections(i)
        assert torch.equal(d.boxes, e["boxes"]) and torch.equal(d.labels, e["labels"])
        assert torch.equal(d.scores, e["scores"])
        assert d.embeddings.shape == (len(e["scores"]), model.config.d_model)


def test_detect_does_not_import_transformers_for_other_models():
    code = (
        "import sys, torch, pyodlog\n"
        "from pyodlog.models.transformers_detr import TransformersDetrLogger\n"
        "assert not TransformersDetrLogger.detect(torch.nn.Linear(2, 2))\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert TransformersDetrLogger.detect(model_of("detr"))
    assert transformers.DetrForObjectDetection in type(model_of("detr")).__mro__


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
@pytest.mark.parametrize("name", ["detr", "rt_detr"])
def test_on_cuda_the_selection_matches_and_never_waits_for_the_device(name):
    model, processor = FAMILIES[name][0]().eval().cuda(), FAMILIES[name][1]()
    inputs = {k: v.cuda() for k, v in processor(images=images(), return_tensors="pt").items()}
    sizes = [(150, 200), (180, 120)]
    with torch.inference_mode(), create_logger(model, "m", "v1", score_thresh=0.0) as logger:
        got = logger(inputs, img_sizes=sizes)
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the selection raises
        try:
            again = logger._parse_model_output(got, sizes)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    expected = processor.post_process_object_detection(got, threshold=0.0, target_sizes=sizes)
    assert again.boxes.is_cuda
    for d, e in zip(last_record(logger).detections.unbind(), expected):
        assert torch.equal(d.boxes.cpu(), e["boxes"].cpu())
        assert torch.equal(d.scores.cpu(), e["scores"].cpu())
        assert torch.equal(d.labels.cpu(), e["labels"].cpu())
