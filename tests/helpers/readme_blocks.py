"""The README's Python code blocks, so that tests run them as a user would paste them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks():
    text = README.read_text()
    return [
        b
        for b in re.findall(r"```python\n(.*?)```", text, re.S)
        if not b.lstrip().startswith(">>>")
    ]


def block_starting_with(marker: str) -> str:
    for block in python_blocks():
        if block.lstrip().startswith(marker):
            return block
    raise AssertionError(f"README has no python block starting with {marker!r}")
