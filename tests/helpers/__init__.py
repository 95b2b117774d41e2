"""What the tests and benchmarks share: tiny models, a collector process, crash children, inputs.

Child processes started by the tests import these as ``tests.helpers.<module>``: run them with
:func:`child_env` (the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that imports ``tests.helpers``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)
