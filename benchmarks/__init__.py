"""pyodlog's benchmarks (pytest-benchmark files `bench_*.py`, and scripts run as `python -m benchmarks.<name>` from the repository root)."""
