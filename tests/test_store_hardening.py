"""The store under a careless user, a hostile input and an unlucky disk (issue 10, write side).

Real HDF5 files, a real small tmpfs for the full disk where this process may
mount one (else only the writer's fault injection runs), real threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import pickle
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import zipfile
from pathlib import Path

import h5py
import pytest
import torch

import pyodlog
from pyodlog.io import HDF5Store, StorageError, WriterConfig, open_result
from pyodlog.io.columns import decode_str, encode_str
from pyodlog.io.reader import read_segment, trim_to_consistent
from pyodlog.io.store import ResultInUseError
from tests.helpers import ROOT
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

HERE = Path(__file__).resolve().parent
LAYERS = {"b": {"path": "backbone.0", "compression": "uint8"}}


def make_logger(root, config=None, model=None, **kwargs):
    torch.manual_seed(0)
    store = kwargs.pop("store", None) or HDF5Store(
        root, config=config or WriterConfig(flush_interval=0.02)
    )
    kwargs.setdefault("target_layers", LAYERS)
    kwargs.setdefault("result_name", "r")
    model = model if model is not None else TinyDetector().eval()
    return TinyDetectorLogger(model, "tiny", "v1", sink=store, **kwargs), store


def images(n=1, seed=0, size=(64, 64)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=g) for _ in range(n)]


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pyodlog-writer")]


def litter(directory: Path) -> list[str]:
    """Files a writer must not leave behind once closed."""
    suffixes = (".creating", ".h5.lock", ".part", ".recovering", ".tmp")
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(suffixes))


def assert_every_segment_complete(directory: Path) -> list[str]:
    """Every closed segment reads back with all its rows (never torn); returns the ids in order."""
    ids = []
    for segment in sorted(directory.glob("*.h5")):
        tables = read_segment(segment)
        trimmed = trim_to_consistent(tables)
        assert trimmed.n_images == tables.n_images, f"{segment.name} is torn"
        for name, column in tables.numeric.items():
            assert len(column) == len(trimmed.numeric[name]), f"{segment.name}: {name} is torn"
        for name, column in tables.strings.items():
            assert len(column) == len(trimmed.strings[name]), f"{segment.name}: {name} is torn"
        ids += [decode_str(encode_str(i)) for i in tables.strings["images/input_id"]]
    return ids


def run_in_thread(fn, timeout=20.0):
    """Runs fn on a thread; fails (instead of hanging the suite) if it does not return in time."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} blocked for more than {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- 1: strings are lossless; a record that cannot become rows is quarantined --------------


def test_undecodable_names_are_stored_losslessly_and_logging_goes_on(tmp_path):
    weird_id = os.fsdecode(b"img-\xff.jpg")  # what os.listdir gives for a non-UTF-8 file name
    weird_type = os.fsdecode(b"val-\xfe")
    weird_camera = os.fsdecode(b"cam-\xfd")
    fields = [{"name": "camera", "dtype": "str", "default": "?"}]
    logger, store = make_logger(tmp_path, additional_fields=fields)
    with torch.no_grad():
        outputs = [
            logger(
                images(seed=i),
                input_ids=[f"{weird_id}-{i}"],
                dataset_type=weird_type,
                camera=weird_camera,
            )
            for i in range(5)
        ]
    assert all(len(o) == 1 for o in outputs)  # 5 of 5 calls returned the model's output
    logger.wait_for_save()
    stats = store.stats()
    logger.close()
    assert stats["written"] == 5 and stats["quarantined"] == 0 and stats["dropped"] == 0
    (segment,) = store.segments()
    with h5py.File(segment, "r") as f:
        raw = f["images/input_id.bytes"][()].tobytes()
        spans = f["images/input_id.spans"][()]
        first = raw[spans[0][0] : spans[0][0] + spans[0][1]]
    assert first == b"img-\xff.jpg-0"  # the file name's own bytes
    assert decode_str(first) == f"{weird_id}-0"  # and the same str back
    for column, expected in (("dataset_type", weird_type), ("fields/camera", weird_camera)):
        with h5py.File(segment, "r") as f:
            data = f[f"images/{column}.bytes"][()].tobytes()
        assert data == encode_str(expected) * 5


def record(input_id: str, dataset_type: str = "test"):
    det = pyodlog.DetectionBatch(
        torch.zeros(1, 0, 4),
        torch.zeros(1, 0),
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, 0, 5),
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        [(4, 4)],
    )
    return pyodlog.CallRecord([input_id], dataset_type, 0, 0.0, [(4, 4)], det)


def test_a_record_that_cannot_become_rows_is_quarantined_and_the_writer_goes_on(tmp_path, caplog):
    # "\ud800" is a lone surrogate that no byte string represents (surrogateescape only covers
    # U+DC80..U+DCFF): the logger refuses it at the call; a sink fed directly must survive it.
    logger, store = make_logger(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1))
    logger.close()
    store = HDF5Store(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1))
    store.open_result("tiny", "v1", "r", logger.schema, False)
    store.activate()
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        store.submit(record("good-1"))
        store.submit(record("bad-\ud800"))
        store.submit(record("good-2", dataset_type="bad-\ud800"))
        store.submit(record("good-3"))
        store.wait_for_save()
    stats = store.stats()
    assert stats["quarantined"] == 2 and stats["written"] == 2
    assert stats["submitted"] == stats["written"] + stats["quarantined"] + stats["dropped"]
    assert stats["queued"] == 0  # quarantined calls are not waiting
    assert store.writer.alive  # the writer thread never dies from one bad record
    assert "quarantined 2 call(s)" in caplog.text  # wait_for_save reports it
    store.close()
    quarantine = store.directory / "quarantine"
    descriptions = sorted(quarantine.glob("*.json"))
    assert len(descriptions) == 2
    first = json.loads(descriptions[0].read_text())
    assert first["input_ids"] == ["bad-\ud800"] and "input_id" in first["reason"]
    kept = pickle.loads((quarantine / first["pickle"]).read_bytes())  # the record itself, kept
    assert kept.input_ids == ["bad-\ud800"]
    assert open_result(store.directory).images["input_id"] == ["good-1", "good-3"]


# -- 2: after close nothing blocks ------------------------------------------------------------


def test_wait_for_save_and_export_after_close_return_at_once(tmp_path):
    with make_logger(tmp_path)[0] as logger, torch.no_grad():
        logger(images(n=2), input_ids=["a", "b"])
    run_in_thread(logger.wait_for_save)  # everything was flushed at close
    exported = run_in_thread(lambda: logger.export(tmp_path / "after-close.zip"))
    assert open_result(exported).images["input_id"] == ["a", "b"]  # from what is on disk


# -- 5: a full disk ----------------------------------------------------------------------------


def disk_full(_column=None):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def test_a_failed_append_rolls_back_to_the_last_complete_batch_injected_enospc(tmp_path, caplog):
    config = WriterConfig(flush_interval=0.01, batch_images=2, queue_size=4)
    logger, store = make_logger(tmp_path, config=config)
    ids = iter(f"{i:04d}" for i in range(1000))
    with torch.no_grad():
        for _ in range(4):
            logger(images(), input_ids=[next(ids)])
        logger.wait_for_save()
        # Appends now fail half-way (after the image columns, before the detections), as ENOSPC does.
        store.writer.column_fault = lambda name: (
            disk_full() if name == "detections/logits" else None
        )
        with caplog.at_level(logging.WARNING, logger="pyodlog"):
            outputs = [logger(images(seed=i), input_ids=[next(ids)]) for i in range(30)]
            assert all(len(o) == 1 for o in outputs)  # inference goes on
            with pytest.raises(StorageError, match="No space left"):
                logger.wait_for_save(interval=0.2)
        held = store.stats()
        # Memory stays bounded: one batch held, at most a queue of calls, the rest dropped and counted.
        assert held["queued"] <= config.queue_size + config.batch_images
        assert held["dropped"] > 0
        assert "dropped" in caplog.text and "back to its last complete batch" in caplog.text
        assert not list(store.directory.glob("*.creating"))
        assert len(list(store.directory.glob("*.h5.lock"))) <= 1
        assert_every_segment_complete(store.directory)  # nothing closed torn, even now
        store.writer.column_fault = None  # space returns
        logger.wait_for_save()  # one attempt now: the held batch is written
        last = [next(ids) for _ in range(3)]
        for name in last:
            logger(images(), input_ids=[name])
        logger.wait_for_save()
    stats = store.stats()
    logger.close()
    assert stats["submitted"] == stats["written"] + stats["dropped"] + stats["quarantined"] == 37
    saved = assert_every_segment_complete(store.directory)
    assert saved == sorted(set(saved)), "a batch was written twice or out of order"
    assert len(saved) == stats["written"] and saved[:4] == ["0000", "0001", "0002", "0003"]
    assert saved[-3:] == last  # logging resumed
    assert open_result(store.directory).images["input_id"] == saved
    assert litter(store.directory) == []


def test_a_failed_rotation_keeps_the_batch_it_closed_on_once(tmp_path, caplog):
    config = WriterConfig(flush_interval=0.01, batch_images=1, segment_max_records=2)
    logger, store = make_logger(tmp_path, config=config)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="pyodlog"):
        logger(images(), input_ids=["a"])
        logger.wait_for_save()
        # The append that reaches the rotation succeeds; closing the segment then fails.
        store.writer.column_fault = lambda name: disk_full() if name == "<close>" else None
        logger(images(), input_ids=["b"])
        logger.wait_for_save()  # "b" is durable: the segment was rolled back to include it
        assert "cannot write records" in caplog.text and "(2 images)" in caplog.text
        store.writer.column_fault = None
        logger(images(), input_ids=["c"])
        logger.wait_for_save()
    logger.close()
    assert assert_every_segment_complete(store.directory) == ["a", "b", "c"]  # "b" once
    assert litter(store.directory) == []


def test_closing_on_a_full_disk_says_what_was_lost_and_closes_what_was_written(tmp_path):
    logger, store = make_logger(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1))
    with torch.no_grad():
        logger(images(), input_ids=["saved"])
        logger.wait_for_save()
        store.writer.fault_injection = disk_full
        logger(images(), input_ids=["lost-1"])
        logger(images(), input_ids=["lost-2"])
    with pytest.raises(StorageError, match=r"could not write 1 call\(s\) when closing"):
        logger.close()
    stats = store.stats()
    # One dropped while the disk failed with a batch held, one lost at close: counted, not hidden.
    assert stats["dropped"] == 2 and stats["queued"] == 0
    assert open_result(store.directory).images["input_id"] == ["saved"]
    assert litter(store.directory) == []  # the open segment was closed all the same
    run_in_thread(logger.wait_for_save)  # and nothing blocks afterwards


@pytest.fixture
def small_disk(tmp_path):
    """A real 12 MiB tmpfs (root may mount one); skipped only where mounting is not permitted."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected ENOSPC test runs"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, name: str = "filler") -> Path:
    """Fills the disk to the last byte with one file; returns it (delete it to free the space)."""
    path = disk / name
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return path


def test_a_full_disk_rolls_back_bounds_memory_and_resumes_by_itself(small_disk, caplog):
    config = WriterConfig(flush_interval=0.01, batch_images=2, queue_size=4)
    reserve = small_disk / "reserve"
    reserve.write_bytes(b"\0" * (4 << 20))  # freed later: "space returns" (a batch is ~0.6 MB)
    logger, store = make_logger(
        small_disk / "data",
        config=config,
        target_layers={"b": {"path": "backbone.0", "compression": "none"}},  # ~260 KB per image
        retention=False,  # the default disk budget would keep this small disk from filling
    )
    size = (32, 32)
    ids = iter(f"{i:04d}" for i in range(10_000))
    calls = 0
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="pyodlog"):
            while True:  # log and save until the disk is full
                assert calls < 200, "the disk never filled"
                assert len(logger(images(size=size), input_ids=[next(ids)])) == 1
                calls += 1
                try:
                    logger.wait_for_save()
                except StorageError as error:
                    assert error.__cause__.errno == errno.ENOSPC
                    break
            rest = fill(small_disk, "rest")  # not a byte left
            for i in range(20):  # keep logging into the full disk: each call returns the output
                assert len(logger(images(seed=i, size=size), input_ids=[next(ids)])) == 1
                calls += 1
            # Bounded: one batch held, a queue of calls, the rest dropped and counted.
            assert store.stats()["queued"] <= config.queue_size + config.batch_images
            assert store.writer._pending.n_images <= config.batch_images
            assert store.stats()["dropped"] > 0
            with pytest.raises(StorageError):
                logger.wait_for_save(interval=0.2)
            assert not list(store.directory.glob("*.creating"))
            assert len(list(store.directory.glob("*.h5.lock"))) <= 1
            assert_every_segment_complete(store.directory)  # never closed torn
            written = store.stats()["written"]
            reserve.unlink()  # space returns: the writer retries by itself (backoff), no call needed
            rest.unlink()
            deadline = time.monotonic() + 30
            while store.writer.last_disk_error is not None or store.stats()["written"] == written:
                assert time.monotonic() < deadline, "logging did not resume after space returned"
                time.sleep(0.05)
            last = [next(ids) for _ in range(3)]
            for name in last:
                logger(images(size=size), input_ids=[name])
                calls += 1
            logger.wait_for_save()
        stats = store.stats()
    finally:
        with contextlib.suppress(Exception):
            logger.close()
    assert stats["submitted"] == calls == stats["written"] + stats["dropped"] + stats["quarantined"]
    saved = assert_every_segment_complete(store.directory)
    assert saved == sorted(set(saved)), "a batch was written twice or out of order"
    assert len(saved) == stats["written"] and saved[-3:] == last
    assert open_result(store.directory).images["input_id"] == saved
    assert litter(store.directory) == []


def test_no_space_at_start_is_reported_as_such(small_disk):
    fill(small_disk)
    with pytest.raises(StorageError) as caught:
        HDF5Store(small_disk / "data")
    assert caught.value.errno == errno.ENOSPC and not isinstance(caught.value, PermissionError)
    assert "free space" in str(caught.value)


def test_an_export_that_does_not_fit_names_the_path_given(tmp_path, small_disk):
    logger, _ = make_logger(
        tmp_path, target_layers={"b": {"path": "backbone.0", "compression": "none"}}
    )
    with torch.no_grad():
        for i in range(12):
            logger(images(seed=i), input_ids=[f"x{i}"])
    fill(small_disk)
    given = small_disk / "out" / "x.zip"
    with pytest.raises(OSError) as caught:
        logger.export(given)
    logger.close()
    assert caught.value.errno == errno.ENOSPC
    assert str(given) in str(caught.value) and "records.h5" not in str(caught.value)
    assert not [p for p in (small_disk / "out").iterdir()]  # no temporary leftovers


# -- 6: the default never holds a call ------------------------------------------------------


def test_the_default_backpressure_drops_and_counts_instead_of_holding_the_call(tmp_path, caplog):
    assert WriterConfig().backpressure == "drop"
    logger, store = make_logger(
        tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=1, queue_size=1)
    )
    release = threading.Event()
    store.writer.fault_injection = lambda: release.wait(30)  # a disk that hangs
    held = []
    with torch.no_grad():
        logger(images(), input_ids=["warm-up"])
        for i in range(8):
            start = time.perf_counter()
            logger(images(seed=i), input_ids=[f"c{i}"])
            held.append(time.perf_counter() - start)
        bare, bare_model = [], TinyDetector().eval()
        for i in range(8):
            start = time.perf_counter()
            bare_model(images(seed=i))
            bare.append(time.perf_counter() - start)
    release.set()
    store.writer.fault_injection = None
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        logger.wait_for_save()
    stats = store.stats()
    logger.close()
    # Never held: a call costs about what the bare model does, not the 30 s the disk hangs.
    assert max(held) < max(bare) + 0.25, (held, bare)
    assert stats["dropped"] > 0 and "dropped" in caplog.text
    assert stats["submitted"] == stats["written"] + stats["dropped"] == 9


def test_blocking_backpressure_is_opt_in_and_bounded(tmp_path):
    config = WriterConfig(
        flush_interval=0.01, batch_images=1, queue_size=1, backpressure="block", block_timeout=0.3
    )
    logger, store = make_logger(tmp_path, config=config)
    release = threading.Event()
    store.writer.fault_injection = lambda: release.wait(30)
    with torch.no_grad():
        logger(images(), input_ids=["warm-up"])
        logger(images(), input_ids=["queued"])
        start = time.perf_counter()
        logger(images(), input_ids=["waits, then dropped"])
        waited = time.perf_counter() - start
    release.set()
    store.writer.fault_injection = None
    logger.wait_for_save()
    assert 0.3 <= waited < 5 and store.stats()["dropped"] >= 1
    logger.close()


# -- 7: force_table_recreate --------------------------------------------------------------------


FIELDS = [{"name": "c", "dtype": "str", "default": ""}]


def logged_result(root, n=2, **kwargs):
    logger, store = make_logger(root, **kwargs)
    with torch.no_grad():
        logger(images(n=n), input_ids=[f"old-{i}" for i in range(n)])
    logger.close()
    return store.directory


def test_force_table_recreate_with_the_same_schema_keeps_everything(tmp_path, caplog):
    directory = logged_result(tmp_path)
    before = sorted(p.name for p in directory.glob("*.h5"))
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        logger, _ = make_logger(tmp_path, force_table_recreate=True)
    assert "already has this schema" in caplog.text
    with torch.no_grad():
        logger(images(), input_ids=["new"])
    logger.close()
    assert set(before) <= {p.name for p in directory.glob("*.h5")}
    assert open_result(directory).images["input_id"] == ["old-0", "old-1", "new"]
    assert not list(directory.parent.glob("*.replaced-*"))


class HooksThatFail(TinyDetectorLogger):
    """A subclass whose constructor fails after the result was opened."""

    def _register_model_hooks(self, model):
        raise RuntimeError("a bug in _register_model_hooks")


def test_a_constructor_that_fails_replaces_nothing_and_leaves_no_thread(tmp_path):
    directory = logged_result(tmp_path)
    threads = len(writer_threads())
    with pytest.raises(RuntimeError, match="a bug in _register_model_hooks"):
        HooksThatFail(
            TinyDetector().eval(),
            "tiny",
            "v1",
            result_name="r",
            target_layers=LAYERS,
            additional_fields=FIELDS,  # another schema: would be replaced
            force_table_recreate=True,
            sink=HDF5Store(tmp_path),
        )
    assert len(writer_threads()) == threads
    assert not list(directory.parent.glob("*.replaced-*"))
    assert open_result(directory).images["input_id"] == ["old-0", "old-1"]


def test_force_table_recreate_moves_the_old_result_aside_and_refuses_while_it_is_written(
    tmp_path, caplog
):
    directory = logged_result(tmp_path)
    live, _ = make_logger(tmp_path)  # another logger still writes the result
    with torch.no_grad():
        live(images(), input_ids=["live-1"])
    with pytest.raises(ResultInUseError, match="still writes it"):
        make_logger(tmp_path, additional_fields=FIELDS, force_table_recreate=True)
    with torch.no_grad():
        live(images(), input_ids=["live-2"])
    live.wait_for_save()  # the live logger lost nothing
    live.close()
    assert open_result(directory).images["input_id"] == ["old-0", "old-1", "live-1", "live-2"]
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        fresh, _ = make_logger(
            tmp_path, result_name=None, additional_fields=FIELDS, force_table_recreate=True
        )
    (aside,) = directory.parent.glob("r.replaced-*")
    assert str(aside) in caplog.text and fresh.result_name == "r"
    assert open_result(aside).images["input_id"] == ["old-0", "old-1", "live-1", "live-2"]
    with torch.no_grad():
        fresh(images(), input_ids=["fresh"], c="x")
    fresh.close()
    assert open_result(directory).images["input_id"] == ["fresh"]


# -- 13: smaller ------------------------------------------------------------------------------


def test_a_store_shared_by_two_loggers_has_one_writer_and_closes_with_the_last(tmp_path):
    threads = len(writer_threads())
    first, store = make_logger(tmp_path)
    second, _ = make_logger(tmp_path, store=store)
    assert len(writer_threads()) == threads + 1  # no orphan: one writer for both
    with torch.no_grad():
        first(images(), input_ids=["first"])
        second(images(), input_ids=["second"])
    first.close()
    with torch.no_grad():
        second(images(), input_ids=["second-after"])
    second.close()
    assert len(writer_threads()) == threads
    assert open_result(store.directory).images["input_id"] == ["first", "second", "second-after"]
    other, other_store = make_logger(tmp_path, store=HDF5Store(tmp_path))
    with pytest.raises(ValueError, match="already writes"):  # one store writes one result
        make_logger(tmp_path, store=other_store, result_name="another")
    other.close()


def test_export_to_an_upper_case_zip_suffix_writes_a_zip(tmp_path):
    logger, _ = make_logger(tmp_path)
    with torch.no_grad():
        logger(images(), input_ids=["z"])
    path = logger.export(tmp_path / "y.ZIP")
    logger.close()
    assert path == tmp_path / "y.ZIP" and path.is_file() and zipfile.is_zipfile(path)


def test_an_unwritable_export_path_is_named_as_given(tmp_path):
    logger, _ = make_logger(tmp_path)
    (tmp_path / "a-file").write_text("")
    given = tmp_path / "a-file" / "x.zip"
    with pytest.raises(OSError, match=str(given)):
        logger.export(given)
    logger.close()


PROGRESS_CHILD = """
import sys, threading, time
sys.path.insert(0, {tests!r})
import torch
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger
from pyodlog.io import HDF5Store, WriterConfig
store = HDF5Store({root!r}, config=WriterConfig(flush_interval=0.01, batch_images=1))
logger = TinyDetectorLogger(TinyDetector().eval(), "tiny", "v1", sink=store)
store.writer.fault_injection = lambda: time.sleep(0.3)  # a slow disk
with torch.no_grad():
    for i in range(6):
        logger([torch.rand(3, 32, 32)])
logger.wait_for_save(interval=0.2)
logger.close()
print("DONE", flush=True)
"""


def test_wait_for_save_shows_a_progress_bar_on_a_terminal(tmp_path):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    code = PROGRESS_CHILD.format(tests=str(ROOT), root=str(tmp_path))
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary
    )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if not ready:
                if child.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        child.kill()
        child.wait()
        os.close(primary)
    text = output.decode(errors="replace")
    assert "DONE" in text, text
    assert "pyodlog: saving" in text and "call" in text, text
