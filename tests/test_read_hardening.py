"""Reading back trusts no file: open segments, hostile HDF5 files and ZIPs, damaged segments (issue 10, items 8-10)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.io import HDF5Store, WriterConfig, open_result
from pyodlog.io.export import write_tables
from pyodlog.io.reader import read_segment
from pyodlog.io.segment import CHECKSUM_SUFFIX, SEGMENT_FORMAT, write_checksum
from tests.helpers import ROOT
from tests.helpers.golden import unpack_golden
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
FIELDS = [
    {"name": "camera", "dtype": "str", "default": "?"},
    {"name": "gain", "dtype": "float64", "default": 1.5},
]


def make_logger(root, config=None, result_name="run", **kwargs):
    torch.manual_seed(0)
    store = HDF5Store(root, config=config or WriterConfig(flush_interval=0.05))
    kwargs.setdefault("target_layers", {"b": {"path": "backbone.0", "compression": "uint8"}})
    logger = TinyDetectorLogger(
        TinyDetector().eval(), "tiny", "v1", result_name=result_name, sink=store, **kwargs
    )
    return logger, store


def images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 40, generator=g) for _ in range(n)]


def closed_segments(root, calls=2, segments=1, **kwargs):
    """A result with ``segments`` closed segments of ``calls`` calls (2 images each); returns (dir, ids)."""
    logger, store = make_logger(root, **kwargs)
    ids = []
    with torch.no_grad():
        for s in range(segments):
            for c in range(calls):
                batch_ids = [f"s{s}c{c}i{i}" for i in range(2)]
                logger(images(seed=10 * s + c), input_ids=batch_ids)
                ids += batch_ids
            store.rotate()
    logger.close()
    return store.directory, ids


def same_result(a, b) -> bool:
    if len(a) != len(b) or a.images.keys() != b.images.keys():
        return False
    for key, value in a.images.items():
        if isinstance(value, list):
            if value != b.images[key]:
                return False
        elif not np.array_equal(value, b.images[key]):
            return False
    return a.detections.keys() == b.detections.keys() and all(
        np.array_equal(v, b.detections[k], equal_nan=True) for k, v in a.detections.items()
    )


# -- item 8: open segments, empty results, folders that are not results ---------------------------


def test_a_running_loggers_acknowledged_records_are_visible(tmp_path):
    logger, store = make_logger(tmp_path, config=WriterConfig(flush_interval=0.01, batch_images=2))
    with torch.no_grad():
        logger(images(), input_ids=["a0", "a1"])
        logger.wait_for_save()
        assert len(list(store.directory.glob("*.h5.part"))) == 1
        assert not list(store.directory.glob("*.h5"))  # nothing closed yet
        assert open_result(store.directory).images["input_id"] == ["a0", "a1"]
        logger(images(seed=1), input_ids=["b0", "b1"])
        logger.wait_for_save()
        result = open_result(store.directory)
        assert result.images["input_id"] == ["a0", "a1", "b0", "b1"]
        assert len(result.image_detections(3)) == int(result.images["det_count"][3])
        assert result.feature(3, "b").shape[0] == 8
        # The reader left the writer alone: it goes on and closes normally.
        logger(images(seed=2), input_ids=["c0", "c1"])
    logger.close()
    assert open_result(store.directory).images["input_id"] == ["a0", "a1", "b0", "b1", "c0", "c1"]


def test_reading_while_a_thread_logs_sees_a_clean_prefix_of_what_was_submitted(tmp_path):
    """The reader shares this process's open HDF5 file with the writer: it must see whole images
    only, and a segment closed while it is read must not change after its checksum (HDF5 finishes
    closing a file shared by two handles when the last one closes)."""
    config = WriterConfig(flush_interval=0.001, batch_images=1, segment_max_records=4)
    logger, store = make_logger(tmp_path, config=config)
    submitted: list[str] = []
    done = threading.Event()

    def log_continuously():
        with torch.no_grad():
            for i in range(60):
                ids = [f"{2 * i:04d}", f"{2 * i + 1:04d}"]
                submitted.extend(ids)
                logger(images(seed=i), input_ids=ids)
        done.set()

    thread = threading.Thread(target=log_continuously)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads < 3:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no segment is ever reported damaged
                result = open_result(store.directory)
            ids = result.images["input_id"]
            assert ids == [f"{i:04d}" for i in range(len(ids))]
            ends = result.images["det_offset"] + result.images["det_count"]
            assert len(result.detections["scores"]) == (int(ends[-1]) if len(ends) else 0)
            reads += 1
    finally:
        thread.join()
    logger.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_result(store.directory, strict=True).images["input_id"] == submitted
    segments = sorted(store.directory.glob("*.h5"))
    assert len(segments) >= 10
    for segment in segments:
        digest = segment.with_name(segment.name + CHECKSUM_SUFFIX).read_text().split()[0]
        assert digest == hashlib.sha256(segment.read_bytes()).hexdigest(), segment.name


def test_a_segment_closed_while_this_process_reads_it_keeps_its_checksum(tmp_path, monkeypatch):
    """HDF5 shares a file opened twice in one process and finishes closing it (writing to it) when
    the last handle closes: the writer must not close while open_result has the .part open."""
    from pyodlog.io import reader

    logger, store = make_logger(tmp_path)
    with torch.no_grad():
        logger(images(), input_ids=["a0", "a1"])
    logger.wait_for_save()
    rotation = threading.Thread(target=store.rotate)
    real = reader._dataset_names

    def rotate_while_open(f, label, max_bytes):
        if not rotation.is_alive() and rotation.ident is None:
            rotation.start()  # the writer closes the segment now, if it can
            rotation.join(timeout=0.5)
        return real(f, label, max_bytes)

    monkeypatch.setattr(reader, "_dataset_names", rotate_while_open)
    assert open_result(store.directory).images["input_id"] == ["a0", "a1"]
    rotation.join()
    monkeypatch.undo()
    (segment,) = store.directory.glob("*.h5")
    digest = segment.with_name(segment.name + CHECKSUM_SUFFIX).read_text().split()[0]
    assert digest == hashlib.sha256(segment.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_result(store.directory, strict=True).images["input_id"] == ["a0", "a1"]
    logger.close()


# A logger that writes one segment (it never rotates) until it is killed.
CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
import torch
from tests.helpers.crash_child import crash_logger
from pyodlog.io import WriterConfig
logger = crash_logger(sys.argv[1], WriterConfig(flush_interval=0.05, batch_images=8))
images = [torch.rand(3, 64, 64) for _ in range(2)]
sent = 0
with torch.no_grad():
    while True:
        logger(images, input_ids=[f"{sent + i:08d}" for i in range(2)])
        sent += 2
        logger.wait_for_save(interval=60)
        print("ACKED", sent, flush=True)
"""


def test_a_crashed_loggers_part_file_is_read_without_being_changed(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(ROOT)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    directory = tmp_path / "crash" / "v1" / "run"
    acked = 0
    deadline = time.monotonic() + 120
    try:
        for line in child.stdout:
            acked = int(line.split()[1])
            if acked >= 20:
                # While it runs, from another process: at least what was acknowledged.
                ids = open_result(directory).images["input_id"]
                assert len(ids) >= acked
                assert ids == [f"{i:08d}" for i in range(len(ids))]
                break
            assert time.monotonic() < deadline, "the child logged too slowly"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    parts = sorted(directory.glob("*.h5.part"))
    assert parts
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in parts}
    locks = sorted(p.name for p in directory.glob("*.lock"))
    ids = open_result(directory).images["input_id"]
    assert len(ids) >= acked and ids == [f"{i:08d}" for i in range(len(ids))]
    after = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in parts}
    assert after == before  # read-only
    assert sorted(p.name for p in directory.glob("*.lock")) == locks
    # A new logger still recovers the same records.
    from tests.helpers.crash_child import crash_logger

    crash_logger(tmp_path).close()
    assert not list(directory.glob("*.h5.part"))
    assert open_result(directory).images["input_id"] == ids


def test_a_result_without_records_has_every_column_empty(tmp_path):
    logger, store = make_logger(tmp_path, additional_fields=FIELDS)
    logger.close()
    result = open_result(store.directory)
    assert len(result) == 0
    assert result.images["input_id"] == [] and result.images["camera"] == []
    for key in ("dataset_type", "n_epoch", "timestamp", "det_offset", "det_count", "gain"):
        assert len(result.images[key]) == 0, key
    assert result.images["image_size"].shape == (0, 2)
    assert result.detections["boxes"].shape == (0, 4)
    assert result.detections["logits"].shape == (0, logger.n_class)
    assert result.feature_names() == []
    # An export of it reads back the same way.
    logger2, _ = make_logger(tmp_path, additional_fields=FIELDS)
    exported = open_result(logger2.export(tmp_path / "empty.zip"))
    logger2.close()
    assert exported.images["input_id"] == [] and exported.detections["logits"].shape == (
        0,
        logger.n_class,
    )


def test_a_folder_that_is_not_a_result_is_an_error_saying_what_it_is(tmp_path):
    closed_segments(tmp_path / "root")
    version = tmp_path / "root" / "tiny" / "v1"
    with pytest.raises(ValueError, match=r"holds the results \['run'\] \(a version folder\)"):
        open_result(version)
    with pytest.raises(ValueError, match=r"holds the versions \['v1'\] \(a model folder\)"):
        open_result(tmp_path / "root" / "tiny")
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="is not a pyodlog result folder"):
        open_result(tmp_path / "other")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a ZIP exported by pyodlog"):
        open_result(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        open_result(tmp_path / "missing")


def test_image_detections_is_a_detection_output(tmp_path):
    directory, _ = closed_segments(tmp_path)
    result = open_result(directory)
    d = result.image_detections(-1)
    assert isinstance(d, pyodlog.DetectionOutput)
    assert d.image_size == (32, 40) and d.logits.shape == (len(d), 5)
    assert torch.equal(d.scores, torch.from_numpy(result.detections["scores"][-len(d) :]))
    with pytest.raises(TypeError, match=r"use \.boxes"):
        d["boxes"]
    with pytest.raises(IndexError, match="has 4 images"):
        result.image_detections(4)


# -- item 9: hostile segments and ZIPs --------------------------------------------------------------


def rewrite(segment: Path, change) -> None:
    """Edits a closed segment in place with h5py and writes a matching checksum (as an attacker could)."""
    with h5py.File(segment, "r+") as f:
        change(f)
    write_checksum(segment)


SECRET = b"TOP-SECRET-credentials-9f8e7d"


@pytest.mark.parametrize("kind", ["external-storage", "soft-link", "external-link", "virtual"])
def test_a_crafted_segment_never_returns_another_files_contents(tmp_path, kind):
    directory, _ = closed_segments(tmp_path)
    (segment,) = directory.glob("*.h5")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    with h5py.File(tmp_path / "secret.h5", "w") as f:
        f["data"] = np.frombuffer(SECRET, np.uint8)

    def change(f):
        n = f["images/input_id.spans"].shape[0]
        if kind == "soft-link":
            del f["images/dataset_type.bytes"]
            f["images/dataset_type.bytes"] = h5py.SoftLink("/images/input_id.bytes")
            return
        del f["images/input_id.bytes"], f["images/input_id.spans"]
        f["images/input_id.spans"] = np.array([[0, len(SECRET)]] + [[len(SECRET), 0]] * (n - 1))
        if kind == "external-storage":
            f.create_dataset(
                "images/input_id.bytes",
                shape=(len(SECRET),),
                dtype=np.uint8,
                external=[(str(secret), 0, len(SECRET))],
            )
        elif kind == "external-link":
            f["images/input_id.bytes"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/data")
        else:
            layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype=np.uint8)
            layout[:] = h5py.VirtualSource(
                str(tmp_path / "secret.h5"), "data", shape=(len(SECRET),)
            )
            f.create_virtual_dataset("images/input_id.bytes", layout)

    rewrite(segment, change)
    with pytest.warns(UserWarning, match=rf"skipped a segment: {segment}") as caught:
        result = open_result(directory)
    assert len(result) == 0 and SECRET.decode() not in repr(result.images)
    expected = {
        "external-storage": "external file",
        "soft-link": "SoftLink",
        "external-link": "ExternalLink",
        "virtual": "virtual dataset",
    }[kind]
    assert expected in str(caught[0].message)
    with pytest.raises(pyodlog.CorruptResultError, match=str(segment.name)):
        open_result(directory, strict=True)
    # The same file inside an export (manifest checksums recomputed) is refused as well.
    (tmp_path / "zip").mkdir()
    shutil.copy(segment, tmp_path / "zip" / "records.h5")
    forged = make_zip(tmp_path / "forged.zip", (tmp_path / "zip" / "records.h5").read_bytes())
    with pytest.raises(pyodlog.CorruptResultError, match=rf"records\.h5.*{expected}"):
        open_result(forged)


def test_unexpected_datasets_dtypes_and_offsets_are_refused(tmp_path):
    directory, _ = closed_segments(tmp_path)
    (segment,) = directory.glob("*.h5")
    original = segment.read_bytes()
    cases = {
        "unexpected dataset 'extra'": lambda f: f.create_dataset("extra", data=np.zeros(3)),
        "has dtype": lambda f: (
            f.__delitem__("detections/labels"),
            f.create_dataset(
                "detections/labels", data=np.zeros(f["detections/scores"].shape, "S8")
            ),
        ),
        "columns disagree": lambda f: f["images/det_offset"].__setitem__(1, 10**12),
    }
    for message, change in cases.items():
        segment.write_bytes(original)
        rewrite(segment, change)
        with pytest.raises(pyodlog.CorruptResultError, match=message):
            open_result(directory, strict=True)


def make_zip(path, records: bytes, manifest=None, **zip_kwargs) -> Path:
    if manifest is None:
        manifest = {
            "members": {
                "records.h5": {"sha256": hashlib.sha256(records).hexdigest(), "bytes": len(records)}
            }
        }
    with zipfile.ZipFile(path, "w", **zip_kwargs) as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("records.h5", records)
    return path


def exported(tmp_path) -> Path:
    logger, _ = make_logger(tmp_path / "home")
    with torch.no_grad():
        logger(images(), input_ids=["x0", "x1"])
    path = logger.export(tmp_path / "out.zip")
    logger.close()
    return path


def test_a_tampered_score_in_an_export_is_refused(tmp_path):
    path = exported(tmp_path)
    with zipfile.ZipFile(path) as z:
        manifest, records = z.read("manifest.json"), z.read("records.h5")
    edited = tmp_path / "records.h5"
    edited.write_bytes(records)
    with h5py.File(edited, "r+") as f:
        f["detections/scores"][0] = f["detections/scores"][0] + 0.25
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(tampered, "w") as z:
        z.writestr("manifest.json", manifest)
        z.write(edited, "records.h5")
    with pytest.raises(pyodlog.CorruptResultError, match=r"tampered\.zip:records\.h5: its SHA-256"):
        open_result(tampered)
    assert len(open_result(path)) == 2  # the untouched export reads


def test_a_zip_bomb_is_refused_before_anything_is_expanded(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    size = 256 << 20
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        sha = hashlib.sha256()
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            sha.update(block)
        z.writestr(
            "manifest.json",
            json.dumps({"members": {"records.h5": {"sha256": sha.hexdigest(), "bytes": size}}}),
        )
        with z.open("records.h5", "w", force_zip64=True) as member:
            for _ in range(size >> 20):
                member.write(block)
    assert bomb.stat().st_size < 2 << 20
    mtime = scratch.stat().st_mtime_ns
    with pytest.raises(pyodlog.CorruptResultError, match=r"bomb\.zip:records\.h5 .*ZIP bomb"):
        open_result(bomb)
    assert scratch.stat().st_mtime_ns == mtime and not os.listdir(scratch)  # no temp folder, ever


def test_a_member_larger_than_its_header_says_is_refused(tmp_path):
    declared = 1000
    payload = bytes(range(256)) * 4096  # 1 MiB, deflated to a few KiB
    fake = {
        "records.h5": {"sha256": hashlib.sha256(payload[:declared]).hexdigest(), "bytes": declared}
    }
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps({"members": fake}))
        z.writestr("records.h5", payload)
    data = bytearray(path.read_bytes())
    # Patch records.h5's uncompressed size in the central directory (what zipfile trusts).
    entry = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)
    struct.pack_into("<I", data, entry + 24, declared)
    path.write_bytes(bytes(data))
    with pytest.raises(pyodlog.CorruptResultError, match=r"liar\.zip:records\.h5"):
        open_result(path)


def test_a_huge_manifest_is_refused_by_its_declared_size(tmp_path):
    path = tmp_path / "huge.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("manifest.json", "w", force_zip64=True) as member:
            member.write(b'{"pad": "')
            block = b" " * (1 << 20)
            for _ in range(200):
                member.write(block)
            member.write(b'"}')
        z.writestr("records.h5", b"")
    assert path.stat().st_size < 2 << 20
    started = time.monotonic()
    with pytest.raises(pyodlog.CorruptResultError, match=r"huge\.zip:manifest\.json declares"):
        open_result(path)
    assert time.monotonic() - started < 1.0


def test_missing_members_and_bad_json_are_clear_errors(tmp_path):
    only_manifest = tmp_path / "a.zip"
    with zipfile.ZipFile(only_manifest, "w") as z:
        z.writestr("manifest.json", "{}")
    with pytest.raises(pyodlog.CorruptResultError, match=r"lacks \['records\.h5'\]"):
        open_result(only_manifest)
    bad_json = make_zip(tmp_path / "b.zip", b"", manifest=None)
    with zipfile.ZipFile(bad_json, "w") as z:
        z.writestr("manifest.json", "{not json")
        z.writestr("records.h5", b"")
    with pytest.raises(
        pyodlog.CorruptResultError, match=r"b\.zip:manifest\.json is not valid JSON"
    ):
        open_result(bad_json)
    no_sums = make_zip(tmp_path / "c.zip", b"x", manifest={"members": {}})
    with pytest.raises(pyodlog.CorruptResultError, match="no SHA-256"):
        open_result(no_sums)


# -- item 10: damaged closed segments, checksums, the format of earlier versions ---------------------


def damage(directory: Path):
    """Truncates the first closed segment and zeroes the second; returns them."""
    first, second, *_ = sorted(directory.glob("*.h5"))
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 3])
    second.write_bytes(bytes(second.stat().st_size))
    return first, second


def test_a_damaged_segment_is_skipped_with_a_warning_naming_it(tmp_path):
    directory, ids = closed_segments(tmp_path, segments=3)
    first, second = damage(directory)
    with pytest.warns(UserWarning) as caught:
        result = open_result(directory)
    messages = " ".join(str(w.message) for w in caught)
    assert first.name in messages and second.name in messages
    assert result.images["input_id"] == ids[8:]
    assert [p.name for p in result.skipped] == [first.name, second.name]
    with pytest.raises(pyodlog.CorruptResultError, match=first.name):
        open_result(directory, strict=True)


def test_a_new_logger_moves_damaged_segments_to_quarantine(tmp_path, caplog):
    directory, ids = closed_segments(tmp_path, segments=3)
    for sidecar in directory.glob("*" + CHECKSUM_SUFFIX):
        sidecar.unlink()  # the start does not depend on checksums: the files do not open
    first, second = damage(directory)
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        logger, _ = make_logger(tmp_path)
    assert first.name in caplog.text and second.name in caplog.text and "quarantine" in caplog.text
    assert sorted(p.name for p in (directory / "quarantine").iterdir()) == sorted(
        [first.name, second.name]
    )
    with torch.no_grad():
        logger(images(), input_ids=["new0", "new1"])
    logger.close()
    # The surviving old segment lost its checksum above: read, with a warning; the new one verifies.
    with pytest.warns(UserWarning, match="checksum file .* is missing") as caught:
        assert open_result(directory).images["input_id"] == ids[8:] + ["new0", "new1"]
    assert len(caught) == 1


def test_closed_segments_carry_a_checksum_that_export_verifies(tmp_path):
    directory, ids = closed_segments(tmp_path, segments=2)
    segments = sorted(directory.glob("*.h5"))
    for segment in segments:
        sidecar = segment.with_name(segment.name + CHECKSUM_SUFFIX)
        digest, name = sidecar.read_text().split()
        assert name == segment.name and digest == hashlib.sha256(segment.read_bytes()).hexdigest()
        with h5py.File(segment, "r") as f:
            assert f.attrs["segment_format"] == SEGMENT_FORMAT
    # One flipped bit in a score of the second segment: export leaves it out, and says so.
    with h5py.File(segments[1], "r") as f:
        ds = f["detections/scores"]
        where = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    data = bytearray(segments[1].read_bytes())
    data[where] ^= 0x10
    segments[1].write_bytes(bytes(data))
    logger, _ = make_logger(tmp_path)
    with pytest.warns(UserWarning, match=segments[1].name):
        path = logger.export(tmp_path / "e.zip")
    logger.close()
    result = open_result(path)
    assert result.images["input_id"] == ids[:4]
    assert result.manifest["skipped_segments"] == [segments[1].name]


def test_random_bit_flips_never_change_the_data_silently(tmp_path):
    directory, _ = closed_segments(tmp_path, calls=1)
    (segment,) = directory.glob("*.h5")
    reference = open_result(directory)
    original = segment.read_bytes()
    rng = random.Random(10)
    outcomes = {"skipped": 0, "identical": 0}
    for _ in range(30):
        data = bytearray(original)
        for _ in range(8):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        segment.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = open_result(directory)
        if caught:
            assert segment.name in str(caught[0].message) and len(result) == 0
            outcomes["skipped"] += 1
        else:
            assert same_result(result, reference)
            outcomes["identical"] += 1
    assert outcomes["skipped"] > 0


def golden_result(tmp_path) -> Path:
    directory = tmp_path / "golden" / "v1" / "run"
    unpack_golden("segment-0.1.0.h5.gz", directory, "seg-golden.h5", checksum=False)
    return directory


def test_a_segment_written_by_pyodlog_0_1_0_still_reads(tmp_path):
    """Format 1: pyodlog 0.1.0's layout, no checksum sidecar (tests/golden/README.md)."""
    expected = json.loads((GOLDEN / "segment-0.1.0.json").read_text())
    directory = golden_result(tmp_path)
    with h5py.File(directory / "seg-golden.h5", "r") as f:
        assert "segment_format" not in f.attrs and f.attrs["pyodlog_version"] == "0.1.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = open_result(directory, strict=True)
    assert result.images["input_id"] == expected["input_id"]
    assert result.images["camera"] == expected["camera"]
    assert result.images["gain"].tolist() == expected["gain"]
    assert result.images["n_epoch"].tolist() == expected["n_epoch"]
    assert result.images["image_size"].tolist() == expected["image_size"]
    assert result.images["det_count"].tolist() == expected["det_count"]
    assert result.detections["boxes"].tolist() == expected["boxes"]
    assert result.detections["scores"].tolist() == expected["scores"]
    assert result.detections["labels"].tolist() == expected["labels"]
    assert list(result.detections["logits"].shape) == expected["logits_shape"]
    assert float(result.detections["logits"].astype(np.float64).sum()) == expected["logits_sum"]
    for name, shapes in expected["features"].items():
        for i, shape in enumerate(shapes):
            restored = result.feature(i, name)
            assert list(restored.shape) == shape
            assert float(restored.double().sum()) == expected["feature_sums"][name][i]


def test_strings_that_are_not_utf8_round_trip_through_a_segment(tmp_path):
    odd = os.fsdecode(b"cam-\xff\xfe")  # what os.listdir gives for a non-UTF-8 name
    tables = read_segment(golden_result(tmp_path) / "seg-golden.h5")
    tables.strings["images/input_id"] = [odd, "plain", "ünïcode", ""]
    write_tables(tmp_path / "odd.h5", tables, tables.attrs)
    assert read_segment(tmp_path / "odd.h5").strings["images/input_id"] == [
        odd,
        "plain",
        "ünïcode",
        "",
    ]


def test_a_feature_dtype_read_from_a_file_never_reaches_getattr_unchecked(tmp_path):
    directory = golden_result(tmp_path)
    tables = read_segment(directory / "seg-golden.h5")
    tables.strings["features/dtype"][0] = "load"  # torch.load, not a dtype
    (directory / "seg-golden.h5").unlink()
    write_tables(directory / "seg-golden.h5", tables, tables.attrs)
    write_checksum(directory / "seg-golden.h5")  # a crafted file with a valid checksum
    result = open_result(directory, strict=True)
    name = tables.strings["features/name"][0]
    with pytest.raises(pyodlog.CorruptResultError, match=r"has dtypes .*'load'"):
        result.feature(int(tables.numeric["features/image_row"][0]), name)


def test_a_segment_whose_checksum_file_went_missing_is_read_with_a_warning_or_refused_strictly(
    tmp_path,
):
    directory, ids = closed_segments(tmp_path, segments=2)
    lost = sorted(directory.glob("*" + CHECKSUM_SUFFIX))[0]
    lost.unlink()  # e.g. only the *.h5 files were copied
    with pytest.warns(UserWarning, match="checksum file .* is missing"):
        result = open_result(directory)
    assert result.images["input_id"] == ids  # nothing hidden
    with pytest.raises(pyodlog.CorruptResultError, match="checksum file .* is missing"):
        open_result(directory, strict=True)
