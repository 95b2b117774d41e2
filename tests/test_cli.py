"""The `pyodlog` command's own subcommands (info, export) with good and bad input, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import pyodlog
from tests.helpers import child_env
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger


def pyodlog_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyodlog", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        check=False,
    )


def test_info_says_what_is_installed_and_what_a_result_holds(tmp_path):
    fields = [{"name": "camera", "dtype": "str", "default": "?"}]
    with TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        sink=pyodlog.HDF5Store(tmp_path / "home"),
        additional_fields=fields,
    ) as logger:
        with torch.no_grad():
            logger([torch.rand(3, 64, 80)] * 2, input_ids=["a", "b"], camera="cam1")
        zip_path = logger.export(tmp_path / "out.zip")
    done = pyodlog_command("info", "--json", str(zip_path))
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["images"] == 2 and facts["fields"] == ["camera"] and facts["epochs"] == [0]
    installed = pyodlog_command("info")
    assert installed.returncode == 0, installed.stderr
    assert "pyodlog" in installed.stdout and "extension" in installed.stdout


def test_info_and_export_refuse_bad_input_with_a_clear_message(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    for args in (
        ("info", str(tmp_path / "missing")),
        ("info", str(tmp_path / "junk.zip")),
        ("export", "--root", str(tmp_path), "--tenant", "../etc", "m", "v", "r"),
        ("export", "--root", str(tmp_path), "m", "v", "r"),
    ):
        done = pyodlog_command(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.startswith(f"pyodlog {args[0]}: "), (args, done.stderr)
        assert "Traceback" not in done.stderr
