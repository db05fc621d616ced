"""sharding.storage against a local folder and a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from sharding import storage
from tests.conftest import FaultyProxy


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
    # a byte range, read as the loader reads it, a whole sample at a time (and a stray small
    # read): exactly the range's bytes, as bytes, and nothing past its end
    stream, size = storage.open_range(published, 1000, 600_000)
    with stream:
        assert size == len(payload)
        first, piece = stream.read(5), stream.read(400_000)
        assert (first, piece) == (payload[1000:1005], payload[1005:401_005]) and type(piece) is bytes
        assert stream.read(300_000) == payload[401_005:600_000]
        assert stream.read(1) == b"" and stream.read() == b""
    stream, _ = storage.open_range(published, len(payload) - 10, len(payload) + 100)
    with stream:
        assert stream.read(50) == payload[-10:] and stream.read() == b""

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


def test_s3_transient_errors_are_retried(s3_env, s3_server, monkeypatch):
    proxy = FaultyProxy(urlsplit(s3_server.endpoint).port, failures=2)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        storage.write_bytes(f"s3://{s3_env}/retried.bin", b"payload")
        assert proxy.failures_served == 2
        assert storage.read_bytes(f"s3://{s3_env}/retried.bin") == b"payload"
    finally:
        proxy.close()


def test_a_failing_server_is_not_called_a_credentials_problem(s3_env, s3_server, monkeypatch):
    storage.write_bytes(f"s3://{s3_env}/x.bin", b"payload")
    proxy = FaultyProxy(urlsplit(s3_server.endpoint).port, failures=1000, status=500)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        with pytest.raises(storage.StorageError) as raised:
            storage.read_bytes(f"s3://{s3_env}/x.bin")
        assert not isinstance(raised.value, storage.StorageAccessError)
        message = str(raised.value)
        assert "HTTP 500" in message and "server error" in message and "AWS_ACCESS_KEY_ID" not in message
        with pytest.raises(storage.StorageError) as raised:
            storage.check_s3_access(f"s3://{s3_env}/prefix")
        assert not isinstance(raised.value, storage.StorageAccessError) and "denied" not in str(raised.value)
        assert "server error (HTTP 500)" in str(raised.value)
    finally:
        proxy.close()
