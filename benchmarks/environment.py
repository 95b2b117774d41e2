"""What every benchmark prints first: the machine, the torch build, the commit and the date.

A ratio is only worth what its context says: a figure copied into RESULTS.md without the machine it
ran on, the torch build it used and the commit it measured cannot be reproduced or compared. Each
benchmark script calls :func:`print_header` before it measures; the pytest-benchmark suite gets the
same lines in its report header and in the JSON's ``machine_info`` (benchmarks/conftest.py).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["describe", "header_lines", "print_header"]

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _commit() -> str:
    # A copy without .git (a GPU machine gets the working tree only) is told its commit.
    if os.environ.get("PYODLOG_COMMIT"):
        return os.environ["PYODLOG_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def describe() -> dict[str, str]:
    """The facts a benchmark figure needs beside it (all strings, JSON-ready)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gib()
    gpu = "none"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}"
    return {
        "machine": f"{_cpu_model()}, {cores} cores usable"
        + (f", {memory:.0f} GiB" if memory else "")
        + f", {platform.system()} {platform.release()}",
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'}, "
        f"{torch.get_num_threads()} intra-op threads)",
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def header_lines() -> list[str]:
    """:func:`describe` as ``key: value`` lines."""
    return [f"{key}: {value}" for key, value in describe().items()]


def print_header(title: str | None = None) -> None:
    """Print the benchmark's title (if any) and its context, before any measurement."""
    if title:
        print(f"# {title}")
    for line in header_lines():
        print(f"# {line}")
    print(flush=True)
