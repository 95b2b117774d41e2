"""The README's TinyDetector and its logger class, for tests that need a fast real detector.

Taken from the README's guide (so the guide stays the single definition), without
registering the logger again.
"""

from __future__ import annotations

from tests.helpers.readme_blocks import block_starting_with

_namespace: dict = {}
exec(
    compile(
        block_starting_with("# subclass-guide")
        .split("\nlogger = pyodlog.create_logger")[0]
        .replace("@pyodlog.register_logger\n", ""),
        "README.md:subclass-guide",
        "exec",
    ),
    _namespace,
)

TinyDetector = _namespace["TinyDetector"]
TinyDetectorLogger = _namespace["TinyDetectorLogger"]
