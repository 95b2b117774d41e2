"""pytest-benchmark runs (``make bench``, ``make bench-quick``) carry the machine, torch build and commit."""

from __future__ import annotations

from benchmarks.environment import describe, header_lines


def pytest_report_header(config) -> list[str]:
    return header_lines()


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["pyodlog"] = describe()
