"""sharding.storage against a local folder and a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

import pytest

from sharding import storage


def test_url_helpers():
    assert storage.is_s3_url("s3://bucket/a/b")
    assert not storage.is_s3_url("/data/s3://x")
    assert storage.split_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert storage.split_s3_url("s3://bucket") == ("bucket", "")
    assert storage.join("s3://bucket/a/", "x.tar") == "s3://bucket/a/x.tar"
    assert storage.join("/tmp/out", "x.tar") == "/tmp/out/x.tar"
    with pytest.raises(ValueError):
        storage.split_s3_url("s3:///key")


def _round_trip(base: str, tmp_path) -> None:
    target = storage.join(base, "dir/blob.bin")
    assert not storage.exists(target)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(target)

    storage.write_bytes(target, b"first")
    assert storage.read_bytes(target) == b"first"
    storage.write_bytes(target, b"second")
    assert storage.read_bytes(target) == b"second"

    local = tmp_path / "finished.tar"
    payload = bytes(range(256)) * 4096  # 1 MiB: exercises a real upload
    local.write_bytes(payload)
    published = storage.join(base, "dir/finished.tar")
    storage.put_file(local, published)
    assert not local.exists()
    with storage.open_stream(published) as stream:
        assert stream.read(10) == payload[:10]
        assert stream.read() == payload[10:]

    assert storage.list_names(storage.join(base, "dir")) == ["blob.bin", "finished.tar"]
    storage.remove(published)
    assert storage.list_names(storage.join(base, "dir")) == ["blob.bin"]


def test_local_round_trip(tmp_path):
    _round_trip(str(tmp_path / "store"), tmp_path)
    # the atomic writer leaves no temporary files behind
    assert sorted(p.name for p in (tmp_path / "store" / "dir").iterdir()) == ["blob.bin"]


def test_s3_round_trip(s3_env, tmp_path):
    storage.check_s3_access(f"s3://{s3_env}/prefix")
    _round_trip(f"s3://{s3_env}/prefix", tmp_path)


def test_s3_wrong_secret_is_a_clear_error(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageError) as raised:
        storage.check_s3_access(f"s3://{s3_env}/prefix")
    message = str(raised.value)
    assert s3_env in message and "AWS_SECRET_ACCESS_KEY" in message and "403" in message
    # any later request fails the same clear way, not with a raw botocore error
    with pytest.raises(storage.StorageError, match=f"s3://{s3_env}/prefix/x.*AWS_SECRET_ACCESS_KEY"):
        storage.read_bytes(f"s3://{s3_env}/prefix/x")


def test_s3_missing_bucket_is_a_clear_error(s3_env):
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_s3_access(f"s3://{s3_env}-absent/prefix")


class FlakyProxy:
    """A TCP proxy in front of the S3 server whose first ``failures`` connections get an
    HTTP 503 (what S3 answers when overloaded); later ones are piped through untouched."""

    def __init__(self, upstream_port: int, failures: int):
        self.upstream_port = upstream_port
        self.failures_left = failures
        self.failures_served = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.failures_left > 0:
                self.failures_left -= 1
                self.failures_served += 1
                client.recv(65536)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
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
        self.listener.close()


def test_s3_transient_errors_are_retried(s3_env, s3_server, monkeypatch):
    proxy = FlakyProxy(urlsplit(s3_server.endpoint).port, failures=2)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        storage.write_bytes(f"s3://{s3_env}/retried.bin", b"payload")
        assert proxy.failures_served == 2
        assert storage.read_bytes(f"s3://{s3_env}/retried.bin") == b"payload"
    finally:
        proxy.close()
