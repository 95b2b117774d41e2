"""Upload of one 64 MiB segment to a real SeaweedFS cluster: pyodlog's sync vs boto3's ``upload_file``.

    python -m benchmarks.bench_s3 [--size-mib 64] [--rounds 3]

Starts the cluster of ``tests/helpers/seaweed.py`` (master, two volume servers
with replication 001, filer, S3 gateway; every object is written twice), writes
one segment of the given size (pyodlog's layout), then per round, in turn:

- ``boto3``: ``client.upload_file`` of the file (boto3's TransferManager defaults:
  8 MiB parts, 10 threads), into a fresh key;
- ``pyodlog direct``: a ``Syncer`` with the ``s3://`` target (SHA-256 of the file,
  multipart with a SHA-256 per part verified by the store, the JSON beside it,
  the acknowledgement marker), into a fresh prefix;
- ``pyodlog via collector``: a ``Syncer`` with the HTTP client to a
  ``pyodlog serve --storage s3://...`` collector in front of the same bucket
  (8 MiB pieces, each staged as an object; the collector then assembles,
  checks and creates the segment).

Prints the median seconds and MB/s of each, and the ratios. The machine matters:
run it where the figures are to be quoted, and say how loaded it was.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.environment import print_header
from pyodlog.sync import CollectorClient, S3Target, SyncConfig, Syncer
from pyodlog.sync.secret import Secret
from tests.helpers import child_env
from tests.helpers.collector_process import KEY_A, write_keys, write_segment_of_size
from tests.helpers.seaweed import SeaweedCluster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pyodlog-bench-s3-"))
    cluster = SeaweedCluster(folder / "seaweed").start()
    os.environ.update(cluster.env())
    collector = None
    try:
        s3 = cluster.client()
        s3.create_bucket(Bucket="bench")
        segment = write_segment_of_size(
            folder / "seg-00000000000000000001-r000-p1-aa-000001.h5", args.size_mib << 20
        )
        size = segment.stat().st_size
        collector = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyodlog_collector",
                "serve",
                "--storage",
                "s3://bench/collected",
                "--api-key-file",
                str(write_keys(folder / "keys")),
                "--port",
                "0",
                "--quiet",
                "--max-request-bytes",
                "128M",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert collector.stdout is not None
        url = collector.stdout.readline().split("listening on ")[1].split()[0]
        config = SyncConfig(progress=False)
        times: dict[str, list[float]] = {"boto3": [], "direct": [], "collector": []}

        def fresh_result(name: str) -> Path:
            result = folder / name
            result.mkdir()
            shutil.copy(segment, result / segment.name)  # outside the timing
            return result

        for n in range(args.rounds):
            start = time.perf_counter()
            s3.upload_file(str(segment), "bench", f"boto3/{uuid.uuid4().hex}/{segment.name}")
            times["boto3"].append(time.perf_counter() - start)

            result = fresh_result(f"direct{n}")
            start = time.perf_counter()
            syncer = Syncer(
                S3Target(f"s3://bench/direct{n}", config),
                lambda r=result: sorted(r.glob("*.h5")),
                result,
                "m",
                "v",
                "r",
                0,
                None,
                config,
                auto=False,
            )
            summary = syncer.upload_all()
            times["direct"].append(time.perf_counter() - start)
            assert summary.segments == 1, summary
            syncer.close()

            result = fresh_result(f"collector{n}")
            start = time.perf_counter()
            syncer = Syncer(
                CollectorClient(url, Secret(KEY_A), config),
                lambda r=result: sorted(r.glob("*.h5")),
                result,
                "m",
                "v",
                f"r{n}",
                0,
                None,
                config,
                auto=False,
            )
            summary = syncer.upload_all()
            times["collector"].append(time.perf_counter() - start)
            assert summary.segments == 1, summary
            syncer.close()
        median = {k: statistics.median(v) for k, v in times.items()}
        print(f"segment: {size / 2**20:.0f} MiB, {args.rounds} rounds (median seconds, MB/s)")
        for name, label in (
            ("boto3", "boto3 upload_file"),
            ("direct", "pyodlog direct (s3://)"),
            ("collector", "pyodlog via collector"),
        ):
            print(
                f"  {label:28s} {median[name]:6.2f} s  {size / median[name] / 1e6:7.1f} MB/s  "
                f"(rounds: {', '.join(f'{t:.2f}' for t in times[name])})"
            )
        print(f"  pyodlog direct / boto3 throughput: {median['boto3'] / median['direct']:.2f}")
        print(f"  collector / direct throughput:     {median['direct'] / median['collector']:.2f}")
        print(f"  load average at the end: {os.getloadavg()}")
    finally:
        if collector is not None:
            collector.terminate()
            collector.wait(10)
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    print_header("benchmarks.bench_s3")
    main()
