"""A node-local shard cache: whole shards copied once from storage onto a local disk, shared by
every rank and loader worker of the node, within a size limit (least recently used out first).

The loader (``data.cache_dir``, ``data.cache_gb``) asks :meth:`ShardCache.open_range` for a byte
range of a shard. On a hit it is a local ``seek``; on a miss the first process to ask downloads
the whole shard (checking its size and, as it streams, each sample's CRC-32C from the index,
or without one the shard's sha256 when the manifest has it) while every
other process of the node that wants the same shard waits on that shard's lock, then reads the
copy: storage serves each shard once per node, however many ranks and workers read it. Later
epochs read local disk while the data fits the limit.

Safe under concurrent processes because:

- a copy is downloaded under a temporary name and renamed into place only when complete and
  checked, so a reader never sees half a shard;
- one ``flock`` per shard makes its download happen once; one more serialises eviction;
- a process holds its cached file open while it reads, and eviction only unlinks, so a file
  evicted under a reader stays readable to it (POSIX) and is simply fetched again next time.

Files are named ``<16 hex of the shard URL's sha256>-<shard name>`` so two datasets with the
same shard names never collide. Anything that starts with a dot is a lock or a partial copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from sharding import storage
from sharding.shard_index import SampleCrcs

CHUNK = 1 << 20


class CachedShardMismatch(ValueError):
    """The shard storage served is not the one the manifest describes (size, sample checksums
    or sha256)."""


class ShardCache:
    """See the module docstring. ``limit_bytes`` bounds the total size of the copies, those
    being downloaded included (their full size is reserved before the first byte arrives)."""

    def __init__(self, folder: str | os.PathLike, limit_bytes: int) -> None:
        self.folder = Path(folder)
        self.limit_bytes = int(limit_bytes)

    def path_of(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.folder / f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"

    def open_range(self, url: str, size: int | None, sha256: str | None, start: int, stop: int | None,
                   index: tuple[list[int], list[int]] | None = None) -> tuple[BinaryIO, int] | None:
        """Bytes ``[start, stop)`` (``stop`` None: to the end) of the shard at ``url``, from the
        cache, fetching the whole shard first on a miss. Returns (stream, bytes fetched from
        storage: 0 on a hit), or None when the shard cannot be cached: its size is unknown, it
        alone exceeds the limit, or downloads in flight hold the room (the caller then reads
        storage directly). ``index``: the shard's sample offsets and CRC-32Cs, checked instead
        of ``sha256`` (at a sixth of its CPU). Raises :class:`CachedShardMismatch` for a shard
        that is not the manifest's, and whatever storage raises while fetching (nothing is kept
        then)."""
        if size is None or size > self.limit_bytes:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_of(url)
        fetched = 0
        handle = self._open_copy(path, size)
        if handle is None:
            with self._lock(f".{path.name}.lock"):
                handle = self._open_copy(path, size)  # another process may have fetched it meanwhile
                if handle is None:
                    reserved = self._reserve(path, size)
                    if reserved is None:
                        return None
                    fetched = self._fetch(url, reserved, path, size, sha256, index)
                    handle = open(path, "rb", buffering=0)
        # a range by the index is read a whole sample at a time; the whole shard, by the tar reader
        return storage.bounded(handle, start, size if stop is None else min(stop, size), buffered=stop is None), fetched

    def cached_bytes(self) -> int:
        """Total size of the copies in the cache, complete or being downloaded."""
        return sum(size for _, size, _, _ in self._files())

    def _open_copy(self, path: Path, size: int) -> BinaryIO | None:
        try:
            handle = open(path, "rb", buffering=0)  # bounded() buffers what needs it
        except FileNotFoundError:
            return None
        if os.fstat(handle.fileno()).st_size != size:
            handle.close()  # a copy of an older shard of that name: fetch the current one
            return None
        os.utime(path)  # most recently used
        return handle

    def _reserve(self, path: Path, size: int) -> tuple[BinaryIO, str] | None:
        """Room for ``size`` more bytes, made by evicting the least recently used complete
        copies, and a locked temporary file of that size to download into; None if the
        downloads in flight leave no room. Partial files whose writer died are removed."""
        with self._lock(".evict.lock"):
            files = self._files()
            for partial, _, _, complete in files:
                if not complete and _unlocked(partial):
                    partial.unlink(missing_ok=True)  # its writer is gone (killed mid-download)
            files = sorted(self._files(), key=lambda item: item[2])
            total = sum(item[1] for item in files)
            for copy, copy_size, _, complete in files:
                if total + size <= self.limit_bytes:
                    break
                if complete:
                    copy.unlink(missing_ok=True)
                    total -= copy_size
            if total + size > self.limit_bytes:
                return None
            descriptor, temp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".partial")
            handle = os.fdopen(descriptor, "r+b")
            fcntl.flock(handle, fcntl.LOCK_EX)  # held until the download ends: a live writer
            handle.truncate(size)
            return handle, temp

    def _fetch(self, url: str, reserved: tuple[BinaryIO, str], path: Path, size: int, sha256: str | None,
               index: tuple[list[int], list[int]] | None) -> int:
        out, temp = reserved
        crcs = SampleCrcs(index[0]) if index else None
        try:
            stream, served = storage.open_sized(url)
            try:
                if served != size:
                    raise CachedShardMismatch(f"it is {served} bytes, the manifest says {size}: not the shard that was packed")
                digest, count = (hashlib.sha256() if crcs is None else None), 0
                while chunk := stream.read(CHUNK):
                    out.write(chunk)
                    if crcs is not None:
                        crcs.update(chunk)
                    else:
                        digest.update(chunk)
                    count += len(chunk)
            finally:
                stream.close()
            if count != size:
                raise CachedShardMismatch(f"storage sent {count} of its {size} bytes")
            if crcs is not None and (crcs.mismatches(index[1]) or not crcs.complete):
                raise CachedShardMismatch(f"samples {crcs.mismatches(index[1])[:5]} do not match the manifest's CRC-32C: "
                                          "a damaged copy, not kept")
            if crcs is None and sha256 and digest.hexdigest() != sha256:
                raise CachedShardMismatch(f"its sha256 is {digest.hexdigest()[:12]}..., the manifest says "
                                          f"{sha256[:12]}...: not the shard that was packed")
            out.flush()
            os.replace(temp, path)
            return count
        finally:
            out.close()
            if os.path.exists(temp):
                os.unlink(temp)

    def _files(self) -> list[tuple[Path, int, float, bool]]:
        """(path, size, last use, complete) of the copies and of the partial downloads."""
        files = []
        for entry in os.scandir(self.folder):
            complete = not entry.name.startswith(".")
            if not (complete or entry.name.endswith(".partial")) or not entry.is_file():
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # renamed or evicted by another process just now
                continue
            files.append((Path(entry.path), stat.st_size, stat.st_mtime, complete))
        return files

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with open(self.folder / name, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _unlocked(path: Path) -> bool:
    """Whether no process holds ``path``'s lock (a partial download whose writer is gone)."""
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False
    except FileNotFoundError:
        return False
