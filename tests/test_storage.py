"""The HDF5 store: round trips, durability under SIGKILL, disk errors, backpressure, fork, export."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.io import (
    HDF5Store,
    StorageError,
    WriterConfig,
    WriterFailedError,
    open_result,
    recover_segments,
)
from pyodlog.io.reader import read_segment
from tests.helpers import ROOT, child_env
from tests.helpers.crash_child import crash_logger, kill
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

HERE = Path(__file__).resolve().parent


def make_logger(root, config=None, **kwargs):
    torch.manual_seed(0)
    store = HDF5Store(root, config=config or WriterConfig(flush_interval=0.05))
    kwargs.setdefault(
        "target_layers",
        {
            "b": {"path": "backbone.0", "compression": "uint8"},
            "h": {"path": "box_head", "compression": "float16"},
        },
    )
    return TinyDetectorLogger(TinyDetector().eval(), "tiny", "v1", sink=store, **kwargs), store


def batch(n=3, seed=0, size=(96, 128)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=g) for _ in range(n)]


def test_round_trip_is_exact_for_detections_and_within_the_bound_for_features(tmp_path):
    fields = [
        {"name": "camera", "dtype": "str", "default": "?"},
        {"name": "gain", "dtype": "float64", "default": 1.5},
    ]
    logger, _store = make_logger(tmp_path, additional_fields=fields)
    outputs, hooked = [], []
    with torch.no_grad():
        for i in range(4):
            outputs.append(
                logger(batch(seed=i), input_ids=[f"c{i}-{j}" for j in range(3)], camera=f"cam{i}")
            )
            hooked.append((logger.get_hooked_features("b"), logger.get_hooked_features("h")))
    zip_path = logger.export(tmp_path / "out")
    logger.close()
    result = open_result(zip_path)
    assert len(result) == 12
    assert result.images["input_id"] == [f"c{i}-{j}" for i in range(4) for j in range(3)]
    assert result.images["camera"] == [f"cam{i}" for i in range(4) for _ in range(3)]
    assert list(result.images["gain"]) == [1.5] * 12
    assert (result.images["image_size"] == np.array([96, 128])).all()
    for i in range(4):
        for j in range(3):
            row = i * 3 + j
            got, want = result.image_detections(row), outputs[i][j]
            assert isinstance(got, pyodlog.DetectionOutput)
            assert torch.equal(got.boxes, want["boxes"]) and torch.equal(got.scores, want["scores"])
            assert torch.equal(got.labels, want["labels"])
            assert got.image_size == (96, 128)
            restored = result.feature(row, "b")
            q = result.feature(row, "b", decompress=False)
            assert (
                (restored - hooked[i][0][j]).abs().amax((1, 2)) <= q.scale / 2 * 1.001 + 1e-7
            ).all()
            assert torch.equal(result.feature(row, "h"), hooked[i][1][j].half().float())
    members = zipfile.ZipFile(zip_path).namelist()
    assert members == ["manifest.json", "records.h5"]
    manifest = result.manifest
    assert (
        manifest["counts"]["images"] == 12
        and manifest["model_name"] == "tiny"
        and manifest["n_epoch"] == 0
    )
    import hashlib

    digest = hashlib.sha256(zipfile.ZipFile(zip_path).read("records.h5")).hexdigest()
    assert manifest["members"]["records.h5"]["sha256"] == digest


def test_segment_files_are_self_describing(tmp_path):
    logger, store = make_logger(tmp_path)
    with torch.no_grad():
        logger(batch())
    store.rotate()
    logger.close()
    (segment,) = store.segments()
    with h5py.File(segment, "r") as f:
        assert f.attrs["model_name"] == "tiny" and f.attrs["n_class"] == 5
        assert json.loads(f.attrs["schema"])["n_class"] == 5
        assert f.attrs["pyodlog_version"] == pyodlog.__version__
        assert {"images", "detections", "features"} <= set(f)
    assert (segment.parent / "result.json").exists()


def test_wait_for_save_makes_records_durable_in_the_open_segment(tmp_path):
    logger, store = make_logger(
        tmp_path, config=WriterConfig(flush_interval=60, batch_images=10_000)
    )
    with torch.no_grad():
        for i in range(5):
            logger(batch(seed=i))
    logger.wait_for_save()
    # Another process reads the open SWMR segment: everything acknowledged is there.
    (part,) = store.directory.glob("*.h5.part")
    code = f"import h5py; f = h5py.File({str(part)!r}, 'r', swmr=True, libver='latest'); print(f['images/det_count'].shape[0])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert int(out) == 15
    assert (
        store.stats().items()
        >= {
            "submitted": 5,
            "written": 5,
            "dropped": 0,
            "quarantined": 0,
            "queued": 0,
            "durable": 5,
            "segments_closed": 0,
            "dropped_device_copies": 0,
            "segments_open": 1,
            "queue_depth": 0,
            "sampled_out": 0,
            "aggregate_errors": 0,
        }.items()
    )
    logger.close()
    assert not list(store.directory.glob("*.part")) and len(store.segments()) == 1


def test_segments_rotate_by_record_count_and_each_closes_cleanly(tmp_path):
    logger, store = make_logger(
        tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1, segment_max_records=2)
    )
    with torch.no_grad():
        for i in range(7):
            logger(batch(n=1, seed=i), input_ids=[f"id{i}"])
    logger.close()
    segments = store.segments()
    assert len(segments) == 4
    assert [i for s in segments for i in read_segment(s).strings["images/input_id"]] == [
        f"id{i}" for i in range(7)
    ]


@pytest.mark.parametrize("trial", range(20))
def test_sigkill_at_a_random_moment_loses_nothing_acknowledged(tmp_path, trial):
    rng = random.Random(trial)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.crash_child", str(tmp_path), "2"],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(PYTHONUNBUFFERED="1"),
    )
    acked = submitted = 0
    deadline = time.monotonic() + 60
    kill_after_acks = rng.randint(1, 6)
    extra_lines = rng.randint(0, 5)
    n_acks = 0
    try:
        for line in child.stdout:
            kind, value = line.split()
            if kind == "ACKED":
                acked, n_acks = int(value), n_acks + 1
            else:
                submitted = int(value)
            if n_acks >= kill_after_acks:
                if extra_lines == 0:
                    break
                extra_lines -= 1
            assert time.monotonic() < deadline, "the child logged too slowly"
        time.sleep(rng.random() * 0.05)
    finally:
        submitted = kill(child, submitted)
    directory = tmp_path / "crash" / "v1" / "run"
    # Every closed segment reads back completely.
    for segment in directory.glob("*.h5"):
        read_segment(segment)
    # The next logger on the same result recovers without manual steps.
    crash_logger(tmp_path).close()
    assert not list(directory.glob("*.part")) and not (directory / "quarantine").exists()
    ids = open_result(directory).images["input_id"]
    assert len(ids) >= acked, f"acknowledged {acked} images, found {len(ids)}"
    assert len(ids) <= submitted
    # Written in order: what survives is a prefix, each image once.
    assert ids == [f"{i:08d}" for i in range(len(ids))]


def test_an_unreadable_leftover_is_quarantined_not_deleted(tmp_path, caplog):
    directory = tmp_path / "tiny" / "v1" / "r"
    directory.mkdir(parents=True)
    junk = directory / "seg-r000-p1-abc-000001.h5.part"
    junk.write_bytes(b"not an hdf5 file")
    with caplog.at_level(logging.ERROR, logger="pyodlog"):
        recover_segments(directory)
    assert (directory / "quarantine" / junk.name).read_bytes() == b"not an hdf5 file"
    assert "could not read" in caplog.text


def test_disk_errors_are_reported_and_logging_resumes_when_space_returns(tmp_path, caplog):
    logger, store = make_logger(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=4))

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    store.writer.fault_injection = disk_full
    with caplog.at_level(logging.ERROR, logger="pyodlog"), torch.no_grad():
        outputs = [logger(batch(n=1, seed=i), input_ids=[f"x{i}"]) for i in range(3)]
        assert all(len(o) == 1 for o in outputs)  # inference goes on
        with pytest.raises(StorageError, match="No space left on device"):
            logger.wait_for_save(interval=0.5)
        logger(batch(n=1, seed=3), input_ids=["x3"])
    assert "cannot write records" in caplog.text  # told at once, by the writer thread
    store.writer.fault_injection = None  # space returns
    logger.wait_for_save(interval=0.5)
    logger.close()
    assert open_result(store.directory).images["input_id"] == ["x0", "x1", "x2", "x3"]


def test_drop_backpressure_keeps_the_invariant_and_counts(tmp_path):
    logger, store = make_logger(
        tmp_path,
        config=WriterConfig(flush_interval=0.01, batch_images=1, queue_size=1, backpressure="drop"),
    )
    store.writer.fault_injection = lambda: time.sleep(0.2)  # a slow disk
    with torch.no_grad():
        for i in range(10):
            logger(batch(n=1, seed=i))
    stats = store.stats()
    assert stats["dropped"] > 0
    assert stats["submitted"] == stats["written"] + stats["dropped"] + stats["queued"] == 10
    store.writer.fault_injection = None
    logger.wait_for_save()
    stats = store.stats()
    assert stats["queued"] == 0 and stats["written"] + stats["dropped"] == 10
    logger.close()
    assert len(open_result(store.directory)) == stats["written"]


class _WriterBug(BaseException):
    """Not an Exception: nothing in the writer quarantines it (as a bug in the writer's own loop)."""


def test_a_dead_writer_never_blocks_and_its_error_is_raised(tmp_path):
    logger, store = make_logger(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1))

    def bug():
        raise _WriterBug("a bug in the writer")

    store.writer.fault_injection = bug
    with torch.no_grad():
        logger(batch(n=1))
        store.writer._thread.join(5)
        # Inference goes on: the call returns the model's output, the failure is counted.
        images = batch(n=1)
        want = logger.model(images)
        got = logger(images)
    assert all(torch.equal(g["boxes"], w["boxes"]) for g, w in zip(got, want, strict=True))
    stats = logger.stats()
    assert stats["logging_errors"] == 1
    assert "a bug in the writer" in stats["last_logging_error"]
    with pytest.raises(WriterFailedError):
        logger.wait_for_save(interval=0.1)
    with pytest.raises(WriterFailedError, match="a bug in the writer"):
        logger.close()  # close re-raises the stored error too


def test_a_forked_child_never_touches_the_parents_segment(tmp_path):
    logger, store = make_logger(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1))
    with torch.no_grad():
        logger(batch(n=1), input_ids=["parent-0"])
    logger.wait_for_save()
    pid = os.fork()
    if pid == 0:  # the child: log, then leave without cleanup
        code = 0
        try:
            torch.set_num_threads(1)  # GNU OpenMP's thread pool does not survive fork
            with torch.no_grad():
                logger(batch(n=1), input_ids=["child"])
            logger.wait_for_save()
            code = 0 if store.dropped_in_child == 1 else 3
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with torch.no_grad():
        logger(batch(n=1), input_ids=["parent-1"])
    logger.close()
    assert open_result(store.directory).images["input_id"] == ["parent-0", "parent-1"]


def test_a_logger_left_open_is_closed_at_exit(tmp_path):
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch
from pyodlog.io import HDF5Store
from tests.helpers.crash_child import crash_logger, kill
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger
logger = TinyDetectorLogger(TinyDetector().eval(), "tiny", "v1", result_name="r", sink=HDF5Store({str(tmp_path)!r}))
with torch.no_grad():
    logger([torch.rand(3, 64, 64)], input_ids=["only"])
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    directory = tmp_path / "tiny" / "v1" / "r"
    assert not list(directory.glob("*.part")) and len(list(directory.glob("*.h5"))) == 1
    assert open_result(directory).images["input_id"] == ["only"]


def test_an_unwritable_root_is_a_clear_error_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write to .*PYODLOG_HOME"):
        HDF5Store(blocker / "data")


def test_epochs_select_what_export_contains(tmp_path):
    first, _ = make_logger(tmp_path, n_epoch=1, result_name="r")
    with torch.no_grad():
        first(batch(n=2), input_ids=["e1-a", "e1-b"])
    first.close()
    second, _ = make_logger(tmp_path, n_epoch=2, result_name="r")
    with torch.no_grad():
        second(batch(n=1), input_ids=["e2-a"])
    assert open_result(second.export(tmp_path / "x.zip")).images["input_id"] == ["e2-a"]
    second.close()
    latest, _ = make_logger(tmp_path, result_name="r")
    assert latest.n_epoch == 2  # 'latest' resolves from the stored records
    latest.close()
    untagged, _ = make_logger(tmp_path, result_name="r", n_epoch=None)
    assert open_result(untagged.export(tmp_path)).images["input_id"] == ["e1-a", "e1-b", "e2-a"]
    untagged.close()


def test_export_writes_atomically_to_the_path_or_folder_given(tmp_path):
    logger, _store = make_logger(tmp_path)
    with torch.no_grad():
        logger(batch(n=1))
    named = logger.export(tmp_path / "exports" / "mine.zip")
    folder = logger.export(tmp_path / "exports")
    default = Path.cwd()
    logger.close()
    assert named.name == "mine.zip" and folder.parent == tmp_path / "exports"
    assert folder.name == f"tiny_v1_{logger.result_name}_epoch0.zip"
    assert not [
        p for p in (tmp_path / "exports").iterdir() if p.suffix != ".zip"
    ]  # no temporary leftovers
    del default


def test_schema_changes_need_force_table_recreate_which_moves_the_data_aside(tmp_path, caplog):
    logger, store = make_logger(tmp_path, result_name="r")
    with torch.no_grad():
        logger(batch(n=1), input_ids=["old"])
    logger.close()
    with pytest.raises(pyodlog.SchemaMismatchError, match="force_table_recreate=True"):
        make_logger(
            tmp_path,
            result_name="r",
            additional_fields=[{"name": "c", "dtype": "str", "default": ""}],
        )
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        fresh, store = make_logger(
            tmp_path,
            result_name="r",
            force_table_recreate=True,
            additional_fields=[{"name": "c", "dtype": "str", "default": ""}],
        )
    (aside,) = (tmp_path / "tiny" / "v1").glob("r.replaced-*")
    assert f"moved to {aside}" in caplog.text and store.segments() == []
    assert open_result(aside).images["input_id"] == ["old"]  # kept, readable
    fresh.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
def test_cuda_records_are_copied_on_a_side_stream_and_stored_exactly(tmp_path):
    logger, store = make_logger(tmp_path)
    model = logger.model.cuda()
    images = [t.cuda() for t in batch(n=2)]
    with torch.no_grad():
        out = logger(images, input_ids=["g0", "g1"])
    logger.wait_for_save()
    result = open_result(logger.export(tmp_path))
    for i in range(2):
        assert torch.equal(result.image_detections(i).boxes, out[i]["boxes"].cpu())
    assert store.copier.inflight_bytes == 0  # every pinned buffer was released by the writer
    logger.close()
    del model


def test_cpu_records_pass_the_copier_unchanged():
    from pyodlog.io.copier import DeviceCopier

    copier = DeviceCopier(max_inflight_bytes=1, policy="drop")
    det = pyodlog.DetectionBatch(
        torch.zeros(1, 0, 4),
        torch.zeros(1, 0),
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, 0, 3),
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        [(4, 4)],
    )
    record = pyodlog.CallRecord(["a"], "test", 0, 0.0, [(4, 4)], det)
    pending = copier.to_host(record)
    assert pending.record is record and pending.ready is None and copier.dropped == 0


def test_feature_bytes_written_as_whole_chunks_read_back_exactly(tmp_path):
    from pyodlog.io.columns import ColumnBatch
    from pyodlog.io.segment import CHUNK_BYTES, SegmentWriter

    rng = np.random.default_rng(0)
    sizes = [[5, CHUNK_BYTES - 5, 3], [2 * CHUNK_BYTES + 7], [1, 1, CHUNK_BYTES], [0, 123]]
    first = ColumnBatch()
    first.rows("images/det_count", np.zeros(0, np.int64))
    writer = SegmentWriter(tmp_path / "s.h5", {"model_name": "t"}, first)
    expected = []
    for batch_sizes in sizes:
        batch = ColumnBatch()
        batch.rows("images/det_count", np.zeros(0, np.int64))
        pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in batch_sizes]
        batch.payload = pieces
        batch.payload_bytes = sum(batch_sizes)
        writer.append(batch)
        expected += pieces
        # Readable up to here by a SWMR reader, while open.
        with h5py.File(writer.part, "r", swmr=True, libver="latest") as f:
            assert np.array_equal(f["features_payload"][()], np.concatenate(expected))
    path = writer.close()
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["features_payload"][()], np.concatenate(expected))


def test_recovery_keeps_only_complete_images_when_columns_stopped_at_different_lengths(tmp_path):
    from pyodlog.io.reader import trim_to_consistent

    logger, store = make_logger(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1))
    with torch.no_grad():
        for i in range(4):
            logger(batch(n=1, seed=i), input_ids=[f"i{i}"])
    store.rotate()
    logger.close()
    (segment,) = store.segments()
    full = read_segment(segment)
    assert len(trim_to_consistent(full).strings["images/input_id"]) == 4
    # As if the crash hit mid-batch: the last image's detections and features never arrived.
    last_det = int(full.numeric["images/det_offset"][3])
    cut = {k: (v[:last_det] if k.startswith("detections/") else v) for k, v in full.numeric.items()}
    damaged = type(full)(
        cut,
        full.strings,
        full.payload[: int(full.numeric["features/payload_offset"][-1])],
        full.attrs,
    )
    trimmed = trim_to_consistent(damaged)
    assert trimmed.strings["images/input_id"] == ["i0", "i1", "i2"]
    assert len(trimmed.numeric["detections/scores"]) == last_det
    assert set(trimmed.numeric["features/image_row"]) == {0, 1, 2}


def test_recovery_keeps_every_flushed_call_when_a_crash_cut_the_next_calls_images_and_features(
    tmp_path,
):
    """A SIGKILL while HDF5 rewrote the object headers of the append after an acknowledged one:
    some image and feature columns already had the next call's rows, others not. Found by killing
    the writer at each of its pwrite calls (benchmarks/soak_crash.py --every-write): the reader cut
    back one call too far and lost acknowledged images."""
    from pyodlog.io.reader import trim_to_consistent

    logger, store = make_logger(
        tmp_path,
        config=WriterConfig(flush_interval=0.01, batch_images=2),
        target_layers={"b": {"path": "backbone.0", "compression": "uint8"}},
    )
    with torch.no_grad():
        for i in range(5):
            logger(batch(n=2, seed=i), input_ids=[f"i{i}-{j}" for j in range(2)])
    store.rotate()
    logger.close()
    (segment,) = store.segments()
    full = read_segment(segment)
    assert full.n_images == 10
    rows = full.numeric["features/image_row"]
    assert list(rows) == list(range(10))  # one feature row per image
    # The state on disk: images 8 and 9 (the fifth call) reached some image columns, and some
    # feature columns (image_row among them), but not all.
    short_images = {"images/sample_weight"}
    long_features = {
        "features/image_row",
        "features/method",
        "features/per_image",
        "features/shape",
    }
    cut = short_images | {n for n in full.numeric if n.startswith("features/")} - long_features
    numeric = {name: v[:8] if name in cut else v for name, v in full.numeric.items()}
    strings = {name: values[:8] for name, values in full.strings.items()}
    payload_end = int(full.numeric["features/payload_offset"][8])
    damaged = type(full)(numeric, strings, full.payload[:payload_end], full.attrs)
    trimmed = trim_to_consistent(damaged)
    assert trimmed.strings["images/input_id"] == [f"i{i}-{j}" for i in range(4) for j in range(2)]
    assert list(trimmed.numeric["features/image_row"]) == list(range(8))
    # A first cut row that cannot have been written (it goes backwards) gives up its predecessor's
    # image, and with it that image's call.
    numeric["features/image_row"] = rows.copy()
    numeric["features/image_row"][8] = 3
    garbled = type(full)(numeric, strings, full.payload[:payload_end], full.attrs)
    assert trim_to_consistent(garbled).n_images == 6


@pytest.mark.parametrize(
    "counts", [[5, 5, 5], [5, 2, 0], [0, 0, 0]], ids=["every-image-full", "partial", "empty"]
)
def test_detection_rows_are_exactly_the_valid_rows(counts):
    from pyodlog.io.columns import ColumnBatch, record_to_columns
    from pyodlog.structures import CallRecord, DetectionBatch

    g = torch.Generator().manual_seed(0)
    b, d, c, e = 3, 5, 7, 4
    det = DetectionBatch(
        torch.rand(b, d, 4, generator=g),
        torch.rand(b, d, generator=g),
        torch.randint(0, c, (b, d), generator=g),
        torch.randn(b, d, c, generator=g),
        torch.randint(0, 99, (b, d), generator=g),
        torch.tensor(counts),
        [(10, 10)] * b,
        torch.randn(b, d, e, generator=g),
    )
    batch = ColumnBatch()
    record_to_columns(CallRecord(["a", "b", "c"], "val", 0, 0.0, [(10, 10)] * b, det, {}), batch)
    for column, tensor in (
        ("boxes", det.boxes),
        ("logits", det.logits),
        ("embeddings", det.embeddings),
        ("labels", det.labels),
        ("candidate_index", det.candidate_index),
    ):
        (rows,) = batch.numeric[f"detections/{column}"]
        expected = torch.cat([tensor[i, :n] for i, n in enumerate(counts)]).numpy()
        np.testing.assert_array_equal(rows, expected)
    assert batch.n_detections == sum(counts)
    assert list(batch.numeric["images/det_offset"][0]) == [0, counts[0], counts[0] + counts[1]]
