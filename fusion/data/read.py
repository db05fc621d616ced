"""Stage 2, the reads: shard segments to raw samples (member bytes by name), with ranged
reads through the sample index, the node cache, the checks of sizes and checksums, and waits on
an unreachable store (:func:`read_segment`, :class:`TarStream`); then a lane's stream of
positions, shuffled in windows, resumed without reading what was trained, refilled when
something was lost (:func:`_lane_stream`, step 4-7 of :mod:`fusion.data`)."""

from __future__ import annotations

import functools
import hashlib
import re
import struct
import tarfile
import time
from collections import Counter
from typing import Any, Iterable, Iterator

from webdataset.tariterators import base_plus_ext

from fusion.data.common import (MAX_BACKOFF_S, MAX_READ_PASSES, READ_MEMBER, DataConfig, DataEvents, FrameLimits,
                                Oversize, ShardMismatch, ShardSet)
from fusion.data.plan import LanePlan, Segment, segments_of_items, window_permutation
from sharding import storage
from sharding.cache import CachedShardMismatch, ShardCache
from sharding.shard_index import crc32c


def read_segment(shardset: ShardSet, segment: Segment, cfg: DataConfig, events: DataEvents) -> Iterator[dict[str, Any]]:
    """Raw samples (member bytes by extension) of one shard segment.

    Four kinds of trouble, told apart:

    - **a sample is damaged**: its bytes do not match the manifest's CRC-32C
      (:mod:`sharding.shard_index`), checked as each sample is read, before it is even parsed:
      it stands as a lost sample (``{"__lost__": True}``, so positions hold), counted as
      ``corrupt_samples`` and named in a warning; the rest of the shard is read;
    - **the shard is bad** (not the manifest's size, a tar error, missing, fewer samples than
      listed, a sha256 that does not match): deterministic, so it is not retried; the rest of
      the shard is skipped, counted as ``corrupt_shards`` and named in a warning. A wrong size
      is caught before any sample is used. The sha256 is only checked where the manifest has
      no CRC-32Cs (shards indexed before them) and the shard is read whole: hashed as it
      streams, a mismatch is then only known at its end, when its samples were already used
      (the warning says so);
    - **the store refuses the credentials**: :class:`storage.StorageAccessError`, raised;
    - **the store is unreachable** (refused connections, timeouts, HTTP 5xx after botocore's
      own retries): waited for, re-opening with backoff and continuing at the sample reached,
      for up to ``cfg.storage_timeout_s`` since the outage began; past that,
      :class:`storage.StorageUnavailable` is raised (the caller stops, never trains on less).
    """
    url = shardset.shard_url(segment.shard)
    entry = shardset.entry(segment.shard)
    expected_bytes = entry.get("bytes") or None
    expected_sha = entry.get("sha256") or None
    offsets = shardset.offsets(segment.shard)
    checksums = shardset.checksums(segment.shard) if offsets is not None else None
    whole = segment.start == 0 and segment.stop == entry["num_samples"]
    cache = ShardCache(cfg.cache_dir, int(cfg.cache_gb * 1e9)) if cfg.cache_dir else None
    position, attempt, outage_since = segment.start, 0, None
    while position < segment.stop:
        stream = reader = cached = None
        ranged = False  # this attempt's stream starts at sample ``position`` by the index's offsets
        try:
            # the per-sample CRCs check what the sha256 would, sample by sample, at a sixth of its cost
            hashing = whole and expected_sha and position == 0 and checksums is None
            if cache is not None:  # checked whole when fetched: no hashing here
                cached = cache.open_range(url, expected_bytes, expected_sha, offsets[position] if offsets else 0,
                                          offsets[segment.stop] if offsets else None,
                                          index=(offsets, checksums) if checksums else None)
            if cached is not None:
                stream, fetched = cached
                events.count("bytes_read", fetched)
                events.count("cache_fetches", int(fetched > 0))
                hashing, size, ranged = False, expected_bytes, offsets is not None
                first, stop = (0, segment.stop - position) if offsets else (position, segment.stop)
            elif offsets is not None and not hashing:
                # only this segment's bytes cross the wire (a seek, an S3 Range GET)
                stream, size = storage.open_range(url, offsets[position], offsets[segment.stop])
                first, stop, ranged = 0, segment.stop - position, True
            else:
                stream, size = storage.open_sized(url)
                first, stop = position, segment.stop
            if expected_bytes is not None and size != expected_bytes:
                raise ShardMismatch(f"it is {size} bytes, the manifest says {expected_bytes}: not the shard that was packed")
            reader = _CountingReader(stream, hashing=bool(hashing))
            read_key = "cache_bytes_read" if cached is not None else "bytes_read"
            if ranged:
                samples = _indexed_samples(reader, url, offsets[position : segment.stop + 1],
                                           checksums[position : segment.stop] if checksums else None, shardset.limits)
            else:
                samples = _shard_samples(reader, url, first, stop, shardset.limits)
            for sample in samples:
                if outage_since is not None:
                    events.warn(f"storage is back: read {url} again after {time.monotonic() - outage_since:.0f} s")
                    outage_since, attempt = None, 0
                position += 1
                events.count("samples_read")
                events.count(read_key, reader.take())  # now: a lane may stop at its last sample
                if sample is None:
                    events.count("corrupt_samples")
                    events.warn(f"skipping sample number {position - 1} of {url}: its bytes do not match the manifest's "
                                "CRC-32C: the shard is damaged, or was rewritten after it was indexed; restore it, or "
                                f"index it again: python -m sharding.shard_index --force {shardset.url}")
                    sample = {"__lost__": True, "__key__": None}
                yield sample
            if position < segment.stop:
                raise tarfile.ReadError(f"holds {position} samples, the manifest says {segment.stop}")
            if hashing:
                digest = reader.finish()
                if digest != expected_sha:
                    raise ShardMismatch(f"its sha256 is {digest[:12]}..., the manifest says {expected_sha[:12]}...: not the "
                                        f"shard that was packed, and its {segment.stop} samples were already used")
            return
        except (tarfile.TarError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
            if isinstance(error, CachedShardMismatch) and checksums is not None:
                # damaged samples: read storage directly, where only those samples are lost
                events.warn(f"the node cache did not keep {url}: {error}; reading it from storage instead")
                cache = None
                continue
            if ranged and isinstance(error, tarfile.TarError):
                # no tar member where the index says one starts: the index, not the shard, may be
                # wrong (a hand-rewritten shard); read the shard from its start rather than lose it
                events.warn(f"shard {url}: no sample where the manifest's offsets say ({error}); reading it from its "
                            f"start instead. Rebuild the index: python -m sharding.shard_index --force {shardset.url}")
                offsets = checksums = None
                continue
            events.count("corrupt_shards")
            if position < segment.stop:
                events.warn(f"skipping the rest of shard {url} from sample {position}: {error}")
            else:
                events.warn(f"shard {url} does not match the manifest: {error}")
            return
        except storage.StorageAccessError:
            raise  # refused credentials (e.g. expired mid-run): skipping every shard would train on nothing
        except _transient_errors() as error:  # connection refused or dropped, timeouts, 5xx
            now = time.monotonic()
            if outage_since is None:
                outage_since = now
                events.warn(f"waiting for storage: {url} cannot be read ({type(error).__name__}: {error}); retrying for up "
                            f"to {cfg.storage_timeout_s:.0f} s (data.storage_timeout_s)", now=True)
            waited = now - outage_since
            if waited >= cfg.storage_timeout_s:
                raise storage.StorageUnavailable(
                    f"{url} could not be read for {waited:.0f} s (data.storage_timeout_s = {cfg.storage_timeout_s:.0f}); "
                    f"last error: {type(error).__name__}: {error}"
                ) from None
            events.count("read_retries")
            attempt += 1
            time.sleep(min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF_S, cfg.storage_timeout_s - waited))
        finally:
            if reader is not None:
                events.count(read_key, reader.take())
            if stream is not None:
                stream.close()


@functools.lru_cache(maxsize=1)
def _transient_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable store raises (waited for); anything else is a bug and propagates."""
    from http.client import HTTPException

    errors: tuple[type[BaseException], ...] = (OSError, HTTPException, storage.StorageError)
    try:  # only where S3 is used
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        errors += (BotoCoreError, HTTPError)
    except ImportError:
        pass
    return errors


class _CountingReader:
    """A read-only stream that counts (and with ``hashing``, hashes) what passes through it:
    what the tar reader reads, i.e. what came from storage (or the node cache)."""

    def __init__(self, stream: Any, hashing: bool = False) -> None:
        self.stream = stream
        self.sha = hashlib.sha256() if hashing else None
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        if self.sha is not None:
            self.sha.update(data)
        return data

    def take(self) -> int:
        """Bytes read since the last call."""
        count, self.count = self.count, 0
        return count

    def finish(self) -> str:
        """Read what is left (the tar's end blocks) and return the hex digest of it all."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


# The most bytes of one sample read into memory whole (~500 KB for SSv2's): one larger is read as
# a stream, from the shard's start, where members over their limit are skipped unread.
MAX_PIECE_BYTES = 256 << 20


def _indexed_samples(stream: Any, url: str, offsets: list[int], checksums: list[int] | None, limits: FrameLimits
                     ) -> Iterator[dict[str, Any] | None]:
    """The samples of a stream that starts at ``offsets[0]`` of its shard and ends at
    ``offsets[-1]``, by the index: each sample's bytes are read in one piece, checked against
    its CRC-32C (a mismatch yields None: the sample is damaged, its bytes are not parsed), then
    parsed from memory. A piece that is not exactly one sample's members means the index does
    not fit the shard: :class:`tarfile.ReadError`, before anything of it is yielded.

    One read a sample rather than two a member: the tar parsing of a 34-member sample then
    costs no stream calls, and its checksum is one call over contiguous bytes."""
    for number, (start, end) in enumerate(zip(offsets, offsets[1:])):
        if end - start > MAX_PIECE_BYTES:  # never held: the stream skips what is too large unread
            raise tarfile.ReadError(f"sample {number} of the range is {end - start} bytes by the index, more than the "
                                    f"{MAX_PIECE_BYTES} a sample is read whole at")
        piece = stream.read(end - start)
        if len(piece) < end - start:
            raise tarfile.ReadError(f"the stream ends {end - start - len(piece)} bytes before sample {number} of the range does")
        if checksums is not None and crc32c(piece) != checksums[number]:
            yield None
            continue
        # a piece whose CRC-32C matches is byte for byte what the index was built from, headers
        # included (their checksums were checked then): checking each header again cost ~0.1 ms
        # a 34-member sample, and its members are views of the piece, never copied
        if checksums is not None and isinstance(piece, bytes):
            sample = _checked_piece_sample(piece, url, limits)
            if sample is not None:
                yield sample
                continue
        found = list(_shard_samples(_PieceReader(piece), url, 0, 2, limits, verify_headers=checksums is None))
        if len(found) != 1:
            raise tarfile.ReadError(f"bytes {start}-{end} hold {len(found)} samples, where the index says one")
        yield found[0]


def _checked_piece_sample(piece: bytes, url: str, limits: FrameLimits) -> dict[str, Any] | None:
    """The sample of one piece whose CRC-32C matched, in one pass over its headers, or None
    where the piece holds anything but plain files of one key within their limits and PAX
    records that neither rename nor resize (long names, directories, a member over its limit, a
    second sample, a name read twice): then
    :func:`_shard_samples` parses it, and says what is wrong. Where this returns a sample it is
    the one :func:`_shard_samples` returns, member for member (``tests/test_shard_index.py``).

    Why a second parser: the general one, a generator of stream reads, a regex and webdataset's
    ``base_plus_ext`` per member, took 0.135 ms of a 34-member sample, 4 % of decoding its 16
    frames, the largest cost of the loader beside the decode; this takes ~0.06 ms."""
    view, end = memoryview(piece), len(piece)
    members: dict[str, memoryview] = {}
    key = None
    position = 0
    while position < end:
        if end - position < tarfile.BLOCKSIZE:
            return None
        name, field, kind, prefix = _HEADER_FIELDS.unpack_from(piece, position)
        if (kind not in _PLAIN_FILE and kind != _PAX) or prefix or field[0] & 0x80:
            return None  # other metadata, a link or a directory, a ustar name prefix, a base-256 size
        try:
            size = int(field.partition(b"\0")[0] or b"0", 8)
        except ValueError:
            return None
        start = position + tarfile.BLOCKSIZE
        position = start + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if kind == _PAX:  # webdataset's writer gives each member one, for its float mtime
            if position > end or _PAX_NAMING.search(piece, start, start + size):
                return None  # the record renames or resizes the next member
            continue
        name = name.partition(b"\0")[0]
        stem, dot, extension = name.partition(b".")
        if position > end or not stem or not dot or b"/" in name:
            return None
        extension = _read_extension(extension)
        if extension is None:  # not a member the loader reads (READ_MEMBER)
            continue
        if key is None:
            key = stem
        if stem != key or extension in members or size > limits.member_limit(extension):
            return None
        members[extension] = view[start : start + size]
    if key is None:
        return None
    return {"__key__": key.decode("utf-8", "surrogateescape"), "__url__": url, **members}


# a tar header's name, size, type flag and the first byte of its ustar name prefix (at 345)
_HEADER_FIELDS = struct.Struct("100s24x12s20xB188xB")
_PLAIN_FILE = frozenset(b"0\x007")  # tar type flags of regular files, as TarStream reads them
_PAX = ord("x")  # the type flag of a PAX record header for the next member
_PAX_NAMING = re.compile(rb" (?:path|size)=")  # records that TarStream applies to the member
_EXTENSIONS: dict[bytes, str | None] = {}  # a member's extension -> itself if the loader reads it, else None


def _read_extension(extension: bytes) -> str | None:
    """``extension`` as text if :data:`READ_MEMBER` takes a member named so (any key without a
    dot or slash), else None; remembered, for the few extensions shards hold."""
    if extension in _EXTENSIONS:
        return _EXTENSIONS[extension]
    text = extension.decode("utf-8", "surrogateescape")
    read = text if READ_MEMBER.match(f"key.{text}") else None
    if len(_EXTENSIONS) < 1024:  # a hostile shard's thousand names must not grow it without end
        _EXTENSIONS[extension] = read
    return read


def _shard_samples(stream: Any, url: str, first: int, stop: int, limits: FrameLimits, verify_headers: bool = True
                   ) -> Iterator[dict[str, Any]]:
    """Samples ``[first, stop)`` of a tar stream, grouped by key as webdataset does.

    A member's size is checked from its tar header first, and one over the limit is skipped in
    the stream (read in blocks, never held) and stands as an :class:`Oversize` in its sample.
    Members of samples before ``first`` are skipped unread too. Only :data:`READ_MEMBER` names
    count; the rest are never read. A member is what ``stream.read`` returns: bytes, or a
    memoryview from a :class:`_PieceReader`.
    """
    tar = TarStream(stream, verify_headers)
    index, key, sample = -1, None, None
    for name, size in tar.members():
        if not READ_MEMBER.match(name):
            continue
        prefix, extension = base_plus_ext(name)
        if prefix != key:
            if sample is not None:
                yield sample
                sample = None
            index, key = index + 1, prefix
            if index >= stop:
                return
            if index >= first:
                sample = {"__key__": prefix, "__url__": url}
        if sample is None:
            continue
        if extension in sample:
            raise ValueError(f"{name}: a second member named so in one sample")
        limit = limits.member_limit(extension)
        if size > limit:
            sample[extension] = Oversize(size, limit)
            continue
        sample[extension] = tar.data()
    if sample is not None:
        yield sample


class TarStream:
    """The regular files of a tar read as a stream: :meth:`members` yields ``(name, size)``;
    :meth:`data` then reads that member's bytes, or the member is skipped unread.

    Our own rather than ``tarfile``'s stream mode: on 32-frame textured shards (~500 KB a
    sample) that took 1.09 ms of CPU a sample (Python header parsing, 10 KiB reads through its
    ``_Stream``), ~15 % of decoding the sample's JPEGs; this takes 0.33 ms. It reads what this
    project's writers (webdataset's ``TarWriter``, GNU tar, Python's ``tarfile``) produce: ustar and GNU headers, PAX and GNU long names, base-256
    sizes; a header whose checksum fails is a :class:`tarfile.ReadError`, like a truncated one.
    """

    def __init__(self, stream: Any, verify_headers: bool = True) -> None:
        self.stream = stream
        self.verify_headers = verify_headers  # False: the bytes were checked already (a sample's CRC-32C)
        self.pending = 0  # bytes of the current member (data and padding) not read yet
        self.size = 0

    def members(self) -> Iterator[tuple[str, int]]:
        long_name, pax = None, {}
        while True:
            self._skip(self.pending)
            header = self.stream.read(tarfile.BLOCKSIZE)
            if len(header) < tarfile.BLOCKSIZE or header == _ZERO_BLOCK:
                if header and header != _ZERO_BLOCK:
                    raise tarfile.ReadError("unexpected end of data in a tar header")
                return  # the end-of-archive blocks, or the end of a range
            name, size, kind = _parse_tar_header(bytes(header), self.verify_headers)
            padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if kind in (b"L", b"x", b"K", b"g"):  # metadata for the next member
                meta = bytes(self._read(padded)[:size])
                if kind == b"L":
                    long_name = meta.rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(meta)
                continue
            if long_name is not None:
                name, long_name = long_name, None
            if pax:
                name = pax.get("path", name)
                size = int(pax.get("size", size))
                padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                pax = {}
            self.pending, self.size = padded, size
            if kind in (b"0", b"\0", b"7"):  # regular files; directories and links are nobody's member
                yield name, size

    def data(self) -> bytes | memoryview:
        """The bytes of the member just yielded (a memoryview where the stream reads so)."""
        block = self._read(self.pending)
        self.pending = 0
        return block[: self.size]

    def _read(self, count: int) -> bytes:
        block = self.stream.read(count)
        if len(block) < count:
            raise tarfile.ReadError("unexpected end of data in a tar member")
        return block

    def _skip(self, count: int) -> None:
        while count:
            block = self.stream.read(min(count, 1 << 20))
            if not block:
                raise tarfile.ReadError("unexpected end of data in a skipped tar member")
            count -= len(block)
        self.pending = 0


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


class _PieceReader:
    """One sample's bytes in memory as a stream whose reads are memoryviews of them: parsed
    by :class:`TarStream`, its members are then never copied (with ``io.BytesIO`` each
    ~16 KB frame was copied twice, ~0.1 ms a 32-frame sample)."""

    def __init__(self, piece: bytes) -> None:
        self.view, self.position = memoryview(piece), 0

    def read(self, size: int = -1) -> memoryview:
        start = self.position
        self.position = len(self.view) if size < 0 else min(start + size, len(self.view))
        return self.view[start : self.position]


def _parse_tar_header(header: bytes, verify: bool = True) -> tuple[str, int, bytes]:
    """(name, size, type flag) of one 512-byte header; with ``verify``, ReadError if its
    checksum fails."""
    if verify:
        stored = header[148:156].split(b"\0", 1)[0].strip()
        computed = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
        try:
            valid = int(stored or b"-1", 8) == computed
        except ValueError:
            valid = False
        if not valid:
            raise tarfile.ReadError("invalid tar header (bad checksum): not a member where one should start")
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        size = int.from_bytes(field[1:], "big")
    else:
        size = int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    return name.decode("utf-8", "surrogateescape"), size, header[156:157]


def _pax_records(data: bytes) -> dict[str, str]:
    """``"LEN key=value\\n"`` records of a PAX extended header."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] not in (b"", b"\0"):
        length_text, _, _ = data[position:position + 20].partition(b" ")
        length = int(length_text)
        key, _, value = data[position + len(length_text) + 1 : position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _windowed(samples: Iterator[dict[str, Any]], window: int, seed_text: str, skip: int, number: int = 0
              ) -> Iterator[dict[str, Any]]:
    """Permute consecutive windows of ``window`` samples, each with its own generator (the
    first is window ``number``); drop the first ``skip`` output positions without keeping
    whole skipped windows in memory."""
    while True:
        if skip >= window:
            dropped = sum(1 for _ in zip(range(window), samples))
            if dropped < window:
                return
            skip -= window
            number += 1
            continue
        buffer = [sample for _, sample in zip(range(window), samples)]
        if not buffer:
            return
        buffer = [buffer[index] for index in window_permutation(len(buffer), f"{seed_text}:{number}")]
        yield from buffer[skip:]
        skip, number = 0, number + 1
        if len(buffer) < window:
            return


def _lane_stream(shardset: ShardSet, plan: LanePlan, cfg: DataConfig, seed_text: str | None, skip: int, events: DataEvents) -> Iterator[dict[str, Any]]:
    """The positions of a lane: its run, then (only if something was lost) the whole epoch's
    samples, each pass with a fresh permutation, so that even a lane whose own run is all
    damaged still fills its batches; the first ``skip`` positions are dropped. In the run they
    are not even read: whole windows before the resume point are skipped by position, and of
    the window it falls in only the samples still to come are read (:func:`_resumed_window`)."""
    for read_pass in range(MAX_READ_PASSES):
        read = Counter()
        if seed_text is None:  # validation: manifest order, one pass
            yield from (sample for segment in plan.segments for sample in read_segment(shardset, segment, cfg, events))
            return
        text = f"{seed_text}:{read_pass}"
        if read_pass == 0 and skip:
            items = [(segment.shard, index) for segment in plan.segments for index in range(segment.start, segment.stop)]
            skipped_windows, within = divmod(skip, cfg.shuffle_window)
            start = skipped_windows * cfg.shuffle_window
            yield from _resumed_window(shardset, items[start:start + cfg.shuffle_window], within,
                                       f"{text}:{skipped_windows}", cfg, events)
            raw = _positioned(shardset, segments_of_items(items[start + cfg.shuffle_window:]), cfg, events)
            yield from _windowed(raw, cfg.shuffle_window, text, 0, number=skipped_windows + 1)
            skip = max(0, skip - len(items))
            continue
        raw = _counted(_positioned(shardset, plan.segments if read_pass == 0 else plan.refill, cfg, events), read)
        for sample in _windowed(raw, cfg.shuffle_window, text, skip):
            if read_pass:
                sample["__refill__"] = True  # a repeat: never one of a batch's own positions
            yield sample
        if read["samples"] == 0 and read_pass > 0:
            return
        skip = max(0, skip - read["samples"])


def _positioned(shardset: ShardSet, segments: Iterable[Segment], cfg: DataConfig, events: DataEvents) -> Iterator[dict[str, Any]]:
    """The samples of ``segments``, one item per planned position: a position whose sample
    could not be read (its shard broke, counted there) is a ``{"__lost__": True}`` stand-in,
    so that windows and batches keep to positions and a resume finds the same ones."""
    for segment in segments:
        count = 0
        for sample in read_segment(shardset, segment, cfg, events):
            count += 1
            yield sample
        for _ in range(segment.stop - segment.start - count):
            yield {"__lost__": True, "__key__": None}


def _resumed_window(shardset: ShardSet, window: list[tuple[str, int]], within: int, seed_text: str, cfg: DataConfig,
                    events: DataEvents) -> Iterator[dict[str, Any]]:
    """The samples of the window a resume falls in, from output position ``within`` on, in the
    order :func:`_windowed` gives them: the same permutation of the window's positions, and
    only the positions still to come are read (by the index, ranged reads)."""
    order = window_permutation(len(window), seed_text)
    wanted = sorted(order[within:])
    # one item per wanted position, in ``wanted`` order (lost ones as stand-ins)
    read = _positioned(shardset, segments_of_items([window[i] for i in wanted]), cfg, events)
    found = dict(zip(wanted, read))
    yield from (found[i] for i in order[within:])


def _counted(samples: Iterator[dict[str, Any]], counter: Counter) -> Iterator[dict[str, Any]]:
    for sample in samples:
        counter["samples"] += 1
        yield sample
