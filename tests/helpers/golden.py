"""The golden files (tests/golden/README.md): segments written by earlier pyodlog versions."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

from pyodlog.io.segment import write_checksum

GOLDEN = Path(__file__).parent.parent / "golden"


def expected(name: str) -> Any:
    """What a golden file read as when it was written (its ``.json``)."""
    return json.loads((GOLDEN / name).read_text())


def unpack_golden(gz_name: str, directory: Path, segment_name: str, checksum: bool) -> Path:
    """The golden segment ``gz_name`` unpacked into ``directory`` as ``segment_name``;
    ``checksum``: with the SHA-256 sidecar its writer wrote (not kept with the golden file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / segment_name
    with gzip.open(GOLDEN / gz_name) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    if checksum:
        write_checksum(path)
    return path
