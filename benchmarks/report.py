"""Turns a pytest-benchmark JSON file into the tables of benchmarks/RESULTS.md.

Each benchmark group has one baseline (extra_info role == "baseline"); every
other entry is reported as a ratio to it, measured in the same run.

Usage: python benchmarks/report.py RUN.json [--machine TEXT] [--command TEXT] > section.md
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict


def render(data: dict, machine: str, command: str) -> str:
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    recorded = data.get("machine_info", {}).get("pyodlog")  # benchmarks/conftest.py puts it there
    if recorded:
        lines = [f"{key.capitalize()}: {value}" for key, value in recorded.items()]
        lines = [line for pair in zip(lines, [""] * len(lines)) for line in pair]
        lines += [f"Command: `{command}`", ""]
    else:
        lines = [
            f"Machine: {machine}",
            "",
            f"Command: `{command}`",
            "",
            f"Date: {data.get('datetime', '?')}; torch {_torch_version(data)}",
            "",
        ]
    lines += [
        "| group | variant | median | speed-up vs baseline (baseline median / median) |",
        "|---|---|---|---|",
    ]
    for group in sorted(groups):
        entries = groups[group]
        base = [b for b in entries if b["extra_info"].get("role") == "baseline"]
        base_median = base[0]["stats"]["median"] if base else None
        for b in sorted(
            entries, key=lambda b: (b["extra_info"].get("role") != "baseline", b["name"])
        ):
            median = b["stats"]["median"]
            ratio = f"{base_median / median:.2f}x" if base_median else "n/a"
            role = b["extra_info"].get("role", b["name"])
            bandwidth = ""
            if "bytes" in b["extra_info"]:
                rate = b["extra_info"]["bytes"] / median
                bandwidth = (
                    f", {rate / 1e9:.1f} GB/s" if rate >= 1e9 else f", {rate / 1e6:.0f} MB/s"
                )
            lines.append(f"| {group} | {role} | {median * 1e3:.3f} ms{bandwidth} | {ratio} |")
    return "\n".join(lines) + "\n"


def _torch_version(data: dict) -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:  # pragma: no cover
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument(
        "--machine", default=f"{platform.processor() or platform.machine()}, {platform.system()}"
    )
    parser.add_argument("--command", default="make bench")
    args = parser.parse_args()
    with open(args.json_file) as f:
        print(render(json.load(f), args.machine, args.command))


if __name__ == "__main__":
    main()
