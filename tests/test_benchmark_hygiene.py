"""Every benchmark says where, with what and on which commit it ran (issue 17, benchmark hygiene)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.environment import describe
from benchmarks.report import render

ROOT = Path(__file__).resolve().parents[1]


def _main_block_calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    calls: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name):
                    calls.add(inner.func.id)
    return calls


def test_every_benchmark_script_prints_its_context_first():
    scripts = [
        p
        for p in sorted((ROOT / "benchmarks").glob("*.py"))
        if 'if __name__ == "__main__"' in p.read_text() and p.name != "report.py"
    ]
    assert scripts, "no benchmark scripts found"
    missing = [p.name for p in scripts if "print_header" not in _main_block_calls(p)]
    assert missing == [], f"benchmark scripts that do not call print_header() first: {missing}"


def test_context_names_the_machine_torch_commit_and_date():
    facts = describe()
    for key in ("machine", "torch", "commit", "date"):
        assert facts[key] and facts[key] != "unknown", (key, facts)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"],
        capture_output=True,
        text=True,
    )
    if head.returncode == 0:  # a git checkout: the commit is the one being measured
        assert facts["commit"].startswith(head.stdout.strip()[:7])


def test_pytest_benchmark_json_carries_the_context_into_the_report(tmp_path):
    out = tmp_path / "run.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "benchmarks" / "bench_nms.py"),
            "-o",
            "python_files=bench_*.py",
            "-k",
            "test_batched_nms_cpu and uniform-100-",
            "--benchmark-only",
            "--benchmark-max-time=0.01",
            "--benchmark-min-rounds=1",
            f"--benchmark-json={out}",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    data = json.loads(out.read_text())
    recorded = data["machine_info"]["pyodlog"]
    assert set(recorded) >= {"machine", "torch", "commit", "date"}
    table = render(data, machine="ignored", command="make bench-quick")
    assert recorded["commit"] in table and recorded["torch"] in table
    assert "make bench-quick" in table
