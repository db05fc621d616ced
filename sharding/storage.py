"""Where shards live: a local folder or an S3 bucket, behind one small set of functions.

Every path argument is either a local path or an ``s3://bucket/prefix`` URL. S3 goes through
boto3 with the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``) and botocore's retries for transient errors
(throttling, 5xx, dropped connections). Writers make a file visible only when it is complete:
locally by writing a temporary name and renaming it, on S3 by uploading the finished file.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

S3_SCHEME = "s3://"
# botocore's "standard" mode retries throttling, 5xx and connection errors with backoff.
S3_RETRY_ATTEMPTS = 8
# Temporary files are private (0600) while written; published ones are readable by all.
PUBLISHED_MODE = 0o644
CREDENTIAL_ENV_VARS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL"
# Read buffer of local shard files: a tar reader asks for 512-byte headers and ~15 KB frames;
# 1 MiB took 0.06 ms a clip off the loader's tar reading, against the default 8 KiB / 64 KiB
# (a profile of launch/bench_loader.py on the demo's textured shards)
LOCAL_BUFFER = 1 << 20


class StorageError(RuntimeError):
    """A store cannot be reached or used; the message names the location and what to check."""


class StorageAccessError(StorageError):
    """The store refused the credentials (none, wrong, expired, or not allowed): retrying
    cannot help, so readers stop instead of skipping data."""


class StorageUnavailable(StorageError):
    """The store stayed unreachable (connection refused, timeouts, HTTP 5xx) for longer than
    the reader was told to wait; the data is probably fine, the service is not."""


def is_s3_url(url: str | os.PathLike) -> bool:
    return str(url).startswith(S3_SCHEME)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (prefix without leading/trailing slash)."""
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// URL: {url}")
    bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}: write s3://bucket/prefix")
    return bucket, prefix.strip("/")


def join(url: str | os.PathLike, name: str) -> str:
    """``join("s3://b/p", "x.tar")`` -> ``"s3://b/p/x.tar"``; local paths join as paths."""
    url = str(url)
    if is_s3_url(url):
        return url.rstrip("/") + "/" + name
    return str(Path(url) / name)


# Variables that decide which client s3_client() builds: a change in any gives a new one.
_CLIENT_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_clients: dict[tuple, object] = {}


def s3_client():
    """A boto3 S3 client configured from the standard AWS_* environment, with retries.

    Building a client costs ~0.1 s, so one is kept per process and environment. Never
    boto3's default session: it caches the credentials it saw first and would ignore a
    changed environment.
    """
    key = (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV_VARS))
    if key not in _clients:
        import boto3
        from botocore.config import Config

        retries = {"max_attempts": S3_RETRY_ATTEMPTS, "mode": "standard"}
        config = Config(retries=retries, connect_timeout=10, read_timeout=60)
        _clients[key] = boto3.session.Session().client("s3", config=config)
    return _clients[key]


def _endpoint_description() -> str:
    return os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")


def _is_missing(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    codes = ("404", "NoSuchKey", "NotFound")
    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in codes


@contextlib.contextmanager
def _s3_errors(url: str):
    """Translate what boto3 raises (after its own retries) into FileNotFoundError for an
    absent object and StorageError, naming the URL and what to check, for the rest."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError as error:
        raise StorageAccessError(f"no S3 credentials for {url}: set {CREDENTIAL_ENV_VARS}") from error
    except ClientError as error:
        if _is_missing(error):
            raise FileNotFoundError(f"no such object: {url}") from error
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.response.get("Error", {}).get("Code")
        if status in (401, 403):
            raise StorageAccessError(f"S3 refused {url} (HTTP {status} {code}): check {CREDENTIAL_ENV_VARS}") from error
        if isinstance(status, int) and status >= 500:
            raise StorageError(f"S3 server error for {url} (HTTP {status} {code}, still failing after botocore's "
                               f"{S3_RETRY_ATTEMPTS} attempts): the store at {_endpoint_description()} is failing, not the data") from error
        raise StorageError(f"S3 request for {url} failed (HTTP {status} {code})") from error
    except (BotoCoreError, S3UploadFailedError) as error:
        raise StorageError(f"S3 request for {url} at {_endpoint_description()} failed: {error}") from error


def check_s3_access(url: str) -> None:
    """Fail early with a clear message if the bucket of ``url`` cannot be used."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = split_s3_url(url)
    where = f"bucket '{bucket}' at {_endpoint_description()}"
    try:
        try:
            s3_client().head_bucket(Bucket=bucket)
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 403:
                raise
            # HeadBucket needs s3:ListBucket on the whole bucket; credentials scoped to a
            # prefix may still read it, so let a listing of the prefix decide.
            s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except NoCredentialsError as error:
        raise StorageAccessError(f"no S3 credentials for {where}: set {CREDENTIAL_ENV_VARS}") from error
    except ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise StorageError(f"{where} does not exist: create it or check AWS_ENDPOINT_URL") from error
        if isinstance(status, int) and status >= 500:
            raise StorageError(f"{where} answers with a server error (HTTP {status}): the store is failing, retry later") from error
        raise StorageAccessError(f"access to {where} denied (HTTP {status}): check {CREDENTIAL_ENV_VARS}") from error
    except BotoCoreError as error:
        raise StorageError(f"cannot reach {where} ({error}): check AWS_ENDPOINT_URL and that the store is up") from error


def exists(url: str | os.PathLike) -> bool:
    url = str(url)
    if not is_s3_url(url):
        return os.path.exists(url)
    bucket, key = split_s3_url(url)
    try:
        with _s3_errors(url):
            s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        return False


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole content of a local file or an S3 object (FileNotFoundError if absent)."""
    url = str(url)
    if not is_s3_url(url):
        return Path(url).read_bytes()
    bucket, key = split_s3_url(url)
    with _s3_errors(url):
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def open_stream(url: str | os.PathLike) -> BinaryIO:
    """A readable binary file object: a local file, or an S3 object streamed as it is read."""
    return open_sized(url)[0]


def open_sized(url: str | os.PathLike) -> tuple[BinaryIO, int]:
    """:func:`open_stream` and the size in bytes of what it will read (the object's
    Content-Length on S3), so a reader can check it before reading."""
    url = str(url)
    if not is_s3_url(url):
        stream = open(url, "rb", buffering=LOCAL_BUFFER)
        return stream, os.fstat(stream.fileno()).st_size
    bucket, key = split_s3_url(url)
    with _s3_errors(url):
        response = s3_client().get_object(Bucket=bucket, Key=key)
    return _buffered(response["Body"]), int(response["ContentLength"])


class _Unbuffered(io.RawIOBase):
    """An S3 body (botocore's ``StreamingBody``, which checks the length it was promised) as a
    raw stream, so that ``io.BufferedReader`` can put a large buffer in front of it."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def _buffered(body: Any) -> BinaryIO:
    # A tar reader asks for 512-byte headers and member-sized pieces, and each read of the bare
    # body goes through urllib3: the loader's read stage went from 0.67x to 0.72x the MB/s of
    # one get_object().read() on the loopback server with this 1 MiB buffer (launch/bench_storage.py)
    return io.BufferedReader(_Unbuffered(body), buffer_size=1 << 20)


class _Bounded(io.RawIOBase):
    """The bytes ``[start, stop)`` of a local file, as a stream that ends at ``stop``."""

    def __init__(self, handle: BinaryIO, start: int, stop: int) -> None:
        handle.seek(start)
        self.handle, self.left = handle, stop - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self.left]
        count = self.handle.readinto(view) if len(view) else 0
        self.left -= count
        return count

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (-1: all that is left), read straight into the bytes returned
        (``RawIOBase.read`` fills a bytearray and copies it); fewer only at ``stop`` or at the
        file's end."""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.handle.read(size)
        while 0 < len(data) < size:  # a short read of a local file: ask for the rest
            more = self.handle.read(size - len(data))
            if not more:
                break
            data += more
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()
        super().close()


def bounded(handle: BinaryIO, start: int, stop: int, buffered: bool = True) -> BinaryIO:
    """Bytes ``[start, stop)`` of an open local file as a stream (it owns ``handle``):
    ``buffered`` for a tar reader's small reads; unbuffered for reads of whole samples by an
    index, each read straight into the bytes it returns (through the 1 MiB buffer every byte
    of a ~500 KB sample was copied twice: reading and checksumming one took 0.104-0.109 ms
    against 0.088 ms now, page cache to CRC-32C, 480 samples of the demo's textured shards,
    15 rounds, medians)."""
    raw = _Bounded(handle, start, stop)
    return io.BufferedReader(raw, buffer_size=LOCAL_BUFFER) if buffered else raw


def open_range(url: str | os.PathLike, start: int, stop: int) -> tuple[BinaryIO, int]:
    """Bytes ``[start, stop)`` of a file or object as a stream (a ``seek`` locally, one S3
    ``Range`` GET), and the size of the whole file, so a reader can check it is the file it
    expects. Only those bytes are read from storage. Meant for reads of whole samples (the
    loader's, by the shard index): a local file's stream is unbuffered (:func:`bounded`)."""
    url = str(url)
    if stop <= start:
        raise ValueError(f"an empty byte range [{start}, {stop}) of {url}")
    if not is_s3_url(url):
        handle = open(url, "rb", buffering=0)
        size = os.fstat(handle.fileno()).st_size
        return bounded(handle, start, min(stop, size), buffered=False), size
    bucket, key = split_s3_url(url)
    with _s3_errors(url):
        response = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
    # "bytes START-END/TOTAL": the whole object's size, as open_sized gives it
    total = response.get("ContentRange", "").rpartition("/")[2]
    return _buffered(response["Body"]), int(total) if total.isdigit() else -1


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see either the old content or all of the new."""
    url = str(url)
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        with _s3_errors(url):
            s3_client().upload_fileobj(io.BytesIO(data), bucket, key)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, PUBLISHED_MODE)
    os.replace(tmp.name, path)


def put_file(local_path: str | os.PathLike, url: str | os.PathLike) -> None:
    """Publish a finished local file at ``url`` (atomic rename locally, one upload on S3).

    The local file is consumed: moved when the destination is local, deleted after upload.
    """
    url = str(url)
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        with _s3_errors(url):
            s3_client().upload_file(str(local_path), bucket, key)
        os.remove(local_path)
        return
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    os.chmod(local_path, PUBLISHED_MODE)
    os.replace(local_path, url)


def list_sizes(url: str | os.PathLike) -> dict[str, int]:
    """{name: size in bytes} of the files directly under a folder or prefix."""
    url = str(url)
    if not is_s3_url(url):
        folder = Path(url)
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    bucket, prefix = split_s3_url(url)
    prefix = prefix + "/" if prefix else ""
    sizes = {}
    with _s3_errors(url):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            sizes.update((item["Key"][len(prefix) :], item["Size"]) for item in page.get("Contents", []))
    return sizes


def list_names(url: str | os.PathLike) -> list[str]:
    """Names (not paths) of the files directly under a folder or prefix, sorted."""
    return sorted(list_sizes(url))


def remove(url: str | os.PathLike) -> None:
    """Delete a file or object if it exists."""
    url = str(url)
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        with _s3_errors(url):
            s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(url).unlink(missing_ok=True)
