"""log_images: JPEG thumbnails made off the call, stored in the images column ``thumbnail``."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import pyodlog
from pyodlog.io.columns import ColumnBatch, record_to_columns
from pyodlog.io.thumbnails import encode_thumbnails
from tests.helpers.golden import unpack_golden
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger


def model() -> TinyDetector:
    torch.manual_seed(0)
    return TinyDetector().eval()


def gradient_images(n: int = 3, h: int = 96, w: int = 160) -> list[torch.Tensor]:
    """Smooth images (JPEG keeps them close): a horizontal red ramp, a vertical green ramp."""
    ys = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xs = torch.linspace(0, 1, w)[None, :].expand(h, w)
    return [torch.stack([xs, ys, torch.full((h, w), k / max(n - 1, 1))]) for k in range(n)]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255


def test_thumbnails_are_stored_downscaled_and_read_back_from_folder_and_zip(tmp_path):
    images = gradient_images()
    with TinyDetectorLogger(
        model(), "thumbs", "v1", log_images={"max_side": 64, "quality": 90}
    ) as logger:
        logger(images, input_ids=["a", "b", "c"])
        logger.wait_for_save()
        folder = logger.sink.directory
        zip_path = logger.export(tmp_path / "out")
    for result in (pyodlog.open_result(folder), pyodlog.open_result(zip_path)):
        assert len(result) == 3
        for i, image in enumerate(images):
            data = result.thumbnail(i)
            assert data is not None and data[:2] == b"\xff\xd8"  # a JPEG
            pixels = decode(data)
            assert pixels.shape == (38, 64, 3)  # longest side 64, aspect ratio kept (96:160)
            expected = torch.nn.functional.interpolate(
                image[None], size=(38, 64), mode="bilinear", antialias=True
            )[0]
            assert np.abs(pixels - expected.permute(1, 2, 0).numpy()).mean() < 0.03
        with pytest.raises(IndexError):
            result.thumbnail(3)


def test_uint8_batch_tensor_and_small_images_keep_their_size():
    torch.manual_seed(1)
    batch = (torch.rand(2, 3, 48, 48) * 255).to(torch.uint8)
    with TinyDetectorLogger(model(), "thumbs", "v2", log_images={}) as logger:
        logger(list(batch.float().div(255).unbind(0)), input_ids=["x", "y"])
        logger.wait_for_save()
        result = pyodlog.open_result(logger._sink.directory)  # type: ignore[attr-defined]
    data = result.thumbnail(0)
    assert data is not None and decode(data).shape == (48, 48, 3)  # smaller than 256: not upscaled


def test_without_log_images_there_is_no_column_and_old_files_read_as_none(tmp_path):
    with TinyDetectorLogger(model(), "thumbs", "v3") as logger:
        logger(gradient_images(2), input_ids=["a", "b"])
        logger.wait_for_save()
        result = pyodlog.open_result(logger._sink.directory)  # type: ignore[attr-defined]
    assert "thumbnail" not in result.images
    assert result.thumbnail(0) is None
    # pyodlog 0.1.0's layout (format 1) has no thumbnail column: still readable.
    directory = tmp_path / "golden" / "v1" / "run"
    unpack_golden("segment-0.1.0.h5.gz", directory, "seg-golden.h5", checksum=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = pyodlog.open_result(directory)
    assert len(old) > 0 and old.thumbnail(0) is None


@pytest.mark.parametrize(
    "value, words",
    [
        (True, "must be None or a dict"),
        ("256", "must be None or a dict"),
        ({"size": 256}, "unknown keys ['size']"),
        ({"max_side": 8}, "max_side'] must be an int from 16 to 4096"),
        ({"max_side": 256.0}, "max_side'] must be an int"),
        ({"quality": 0}, "quality'] must be an int from 1 to 100"),
        ({"quality": True}, "quality'] must be an int from 1 to 100"),
    ],
)
def test_invalid_log_images_is_refused_before_anything_is_written(value, words, tmp_path):
    with pytest.raises(ValueError) as error:
        TinyDetectorLogger(model(), "thumbs", "bad", log_images=value)
    assert words in str(error.value)
    assert not any((tmp_path / "data").rglob("*.h5*"))


def test_the_call_keeps_a_reference_and_encodes_nothing():
    sink = pyodlog.InMemorySink()
    images = gradient_images(2)
    with TinyDetectorLogger(model(), "thumbs", "v4", sink=sink, log_images={}) as logger:
        logger(images, input_ids=["a", "b"])
        (record,) = sink.records("thumbs", "v4", logger.result_name)
    source = record.thumbnails
    # The very input tensors, not copies and not JPEG bytes: the pixels are read by the writer.
    assert all(kept is given for kept, given in zip(source.images, images))
    encoded = encode_thumbnails(source, 2)
    assert all(data[:2] == b"\xff\xd8" for data in encoded)
    # An input changed in place after the call (a reused buffer) gets no thumbnail, not wrong pixels.
    images[1].mul_(0.5)
    encoded = encode_thumbnails(source, 2)
    assert encoded[0][:2] == b"\xff\xd8" and encoded[1] == b""


def test_a_batch_mixing_records_with_and_without_thumbnails_stays_rectangular():
    sink = pyodlog.InMemorySink()
    with (
        TinyDetectorLogger(model(), "thumbs", "v5", sink=sink) as plain,
        TinyDetectorLogger(
            TinyDetector().eval(), "thumbs", "v5", plain.result_name, sink=sink, log_images={}
        ) as thumbs,
    ):
        plain(gradient_images(2), input_ids=["p0", "p1"])
        thumbs(gradient_images(3), input_ids=["t0", "t1", "t2"])
        plain(gradient_images(1), input_ids=["p2"])
        records = sink.records("thumbs", "v5", plain.result_name)
    batch = ColumnBatch()
    for record in records:
        record_to_columns(record, batch)
    column = batch.strings["images/thumbnail"]
    assert len(column) == batch.n_images == 6
    assert [bool(c) for c in column] == [False, False, True, True, True, False]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
def test_device_images_are_downscaled_on_the_device_and_encoded_there():
    images = [t.cuda() for t in gradient_images(2)]
    m = model().cuda()
    sink = pyodlog.InMemorySink()
    with TinyDetectorLogger(m, "thumbs", "cuda", sink=sink, log_images={"max_side": 64}) as logger:
        logger(images, input_ids=["a", "b"])
        (record,) = sink.records("thumbs", "cuda", logger.result_name)
    kept = record.thumbnails.images
    assert all(t.is_cuda and t.dtype == torch.uint8 and t.shape == (3, 38, 64) for t in kept)
    with TinyDetectorLogger(m, "thumbs", "cuda2", log_images={"max_side": 64}) as logger:
        logger(images, input_ids=["a", "b"])
        logger.wait_for_save()
        result = pyodlog.open_result(logger._sink.directory)  # type: ignore[attr-defined]
    assert decode(result.thumbnail(1)).shape == (38, 64, 3)


def test_segments_with_and_without_thumbnails_stay_aligned_when_merged(tmp_path):
    images = gradient_images(4)
    m = model()
    with TinyDetectorLogger(m, "thumbs", "v6", "mixed") as logger:
        logger(images[:2], input_ids=["plain0", "plain1"])
    with TinyDetectorLogger(m, "thumbs", "v6", "mixed", log_images={"max_side": 32}) as logger:
        logger(images[2:], input_ids=["thumb2", "thumb3"])
        folder = logger.sink.directory
    with TinyDetectorLogger(m, "thumbs", "v6", "mixed") as logger:
        logger(images[:1], input_ids=["plain4"])
        zip_path = logger.export(tmp_path / "out")
    for result in (pyodlog.open_result(folder), pyodlog.open_result(zip_path)):
        assert result.images["input_id"] == ["plain0", "plain1", "thumb2", "thumb3", "plain4"]
        has = [result.thumbnail(i) is not None for i in range(5)]
        assert has == [False, False, True, True, False]
        for i in (2, 3):  # each thumbnail is its own image's (the blue channel differs per image)
            blue = decode(result.thumbnail(i))[..., 2].mean()
            assert blue == pytest.approx(float(images[i][2].mean()), abs=0.03)


def test_the_collector_accepts_segments_with_thumbnails(tmp_path):
    """auto_sync/upload() send closed segments: the collector's layout check must take the column."""
    from pyodlog_collector.segment_check import InvalidSegment, check_segment

    with TinyDetectorLogger(model(), "thumbs", "v7", log_images={"max_side": 32}) as logger:
        logger(gradient_images(2), input_ids=["a", "b"])
        logger.wait_for_save()
        folder = logger.sink.directory
    (segment,) = folder.glob("*.h5")
    check_segment(segment)  # closed by close(): the JPEG bytes are not refused as non-UTF-8 text
    import h5py

    with h5py.File(segment, "a") as f:  # a thumbnail span outside its bytes is still refused
        spans = f["images/thumbnail.spans"]
        spans[1, 1] = 10**9
    with pytest.raises(InvalidSegment, match="thumbnail.spans points outside"):
        check_segment(segment)
