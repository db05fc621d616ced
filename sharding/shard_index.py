"""Byte offsets of the samples in a shard: the index that lets a reader start at any sample.

A shard's manifest entry may carry ``offsets``: ``num_samples + 1`` integers, where
``offsets[i]`` is the byte at which sample ``i``'s first tar header starts and the last one is
where the last sample's data ends (the end-of-archive blocks follow). Samples ``[a, b)`` are
then exactly the bytes ``[offsets[a], offsets[b])`` of the file, a well-formed run of tar
members that a stream-mode ``tarfile`` reads as it would the whole archive. The loader turns
that into a local ``seek`` or an S3 ``Range`` GET (``sharding.storage.open_range``), so a
reader that needs the middle of a shard never reads (or pays the network for) its start.

Beside them, ``crc32c``: ``num_samples`` integers, the CRC-32C of each sample's bytes
``[offsets[i], offsets[i+1])`` (headers, data and padding of its members). The reader checks
every sample it reads against it before the sample is used, ranged reads included, so a
damaged byte anywhere in a sample (a flipped label digit decodes fine) is caught at that
sample. A shard's ``sha256`` covers the whole file and can only be checked by a reader of the
whole file. CRC-32C, not a cryptographic hash: the check is against damage, not tampering,
and it must cost nothing beside a network read (``google-crc32c`` runs it at ~10 GB/s with
the CPU's CRC instruction; ``hashlib.sha256`` managed 1.8 GB/s on the same core: the
loader's S3 read stage reached 0.64x the MB/s of a bare ``get_object`` hashing whole shards,
0.94-0.97x checking samples, ``launch/bench_storage.py``). It is the checksum S3 itself
offers (``x-amz-checksum-crc32c``).

The tars themselves are unchanged: plain webdataset, GNU tar and the AWS CLI read them as before.

``sharding/make_shards.py`` and ``launch/extract_features.py`` write both as they pack.
Shards packed before that get them once, with this command (it reads every shard once,
checks it against the manifest's size and sha256, and rewrites only ``manifest.json``; the
shard files are not touched)::

    python -m sharding.shard_index data/ssv2/shards/train s3://bucket/ssv2/validation
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import google_crc32c
from tqdm import tqdm

from sharding import storage

MANIFEST_NAME = "manifest.json"
BLOCK = tarfile.BLOCKSIZE

if google_crc32c.implementation != "c":  # its pure-Python fallback is ~1000x slower
    warnings.warn("google-crc32c has no C extension on this machine: checking samples will cost CPU; reinstall it "
                  "from a wheel (pip install --force-reinstall google-crc32c)", stacklevel=1)


def crc32c(data: bytes, value: int = 0) -> int:
    """The CRC-32C of ``data``, continuing ``value`` (the CRC of the bytes before it)."""
    return google_crc32c.extend(value, data)


def sample_offsets(stream: BinaryIO) -> list[int]:
    """``num_samples + 1`` byte offsets of a tar (see the module docstring): from its headers
    alone when ``stream`` can seek (a local file), else read through once (an S3 body).

    Members are grouped into samples by consecutive equal keys with webdataset's own
    ``base_plus_ext`` (names without an extension belong to no sample, as in its reader);
    only regular files count (directories, links and the like are no sample's member)."""
    from webdataset.tariterators import base_plus_ext  # here: webdataset imports torch (~3 s)

    offsets: list[int] = []
    key, end = None, 0
    seekable = getattr(stream, "seekable", lambda: False)()
    for member in tarfile.open(fileobj=stream, mode="r:" if seekable else "r|"):
        member_key = base_plus_ext(member.name)[0] if member.isfile() else None
        if member_key is None:
            continue
        if member_key != key:
            offsets.append(member.offset)
            key = member_key
        end = member.offset_data + -(-member.size // BLOCK) * BLOCK
    offsets.append(end)
    return offsets


@dataclass(frozen=True)
class ShardDescription:
    """What a shard's manifest entry records of its file."""

    bytes: int
    sha256: str
    offsets: list[int]  # num_samples + 1: where each sample starts, and where the last ends
    crc32c: list[int]  # num_samples: the CRC-32C of each sample's bytes

    def index_fields(self) -> dict[str, list[int]]:
        """The entry's index keys (none for an empty shard)."""
        return {"offsets": self.offsets, "crc32c": self.crc32c} if len(self.offsets) > 1 else {}


def describe_shard(path: str | Path) -> ShardDescription:
    """Size, sha256, sample offsets and sample CRC-32Cs of a finished local shard: what its
    manifest entry records (the writers of frame and feature shards both call this). The
    offsets come from the headers (a seek per member), then one read of the file feeds both
    checksums."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        crcs = SampleCrcs(sample_offsets(handle))
        handle.seek(0)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            crcs.update(block)
    if not crcs.complete:
        raise tarfile.ReadError(f"{path} ends before its last sample does")
    return ShardDescription(os.path.getsize(path), digest.hexdigest(), crcs.offsets, crcs.values)


class SampleCrcs:
    """The CRC-32C of each sample of a shard whose bytes pass through :meth:`update` in order,
    from its first byte, in pieces of any size (a file's blocks, a download's chunks):
    :attr:`values`, one a sample as its last byte passes; :attr:`complete` once all have."""

    def __init__(self, offsets: list[int]) -> None:
        self.offsets = offsets
        self.values: list[int] = []
        self.position = self.crc = 0

    def update(self, data: bytes) -> None:
        done = 0
        while done < len(data) and not self.complete:
            start, end = self.offsets[len(self.values)], self.offsets[len(self.values) + 1]
            if self.position < start:  # bytes before the first sample: no sample's
                step = min(len(data) - done, start - self.position)
            else:
                step = min(len(data) - done, end - self.position)
                whole = done == 0 and step == len(data)
                self.crc = crc32c(data if whole else data[done : done + step], self.crc)
            done += step
            self.position += step
            if self.position == end:
                self.values.append(self.crc)
                self.crc = 0
        self.position += len(data) - done  # past the last sample: the end-of-archive blocks

    @property
    def complete(self) -> bool:
        return len(self.values) == len(self.offsets) - 1

    def mismatches(self, expected: list[int]) -> list[int]:
        """The samples whose bytes, seen so far, do not have the ``expected`` CRC-32C."""
        return [number for number, (value, want) in enumerate(zip(self.values, expected)) if value != want]


def check_offsets(offsets: object, num_samples: int, size: int | None) -> str | None:
    """Why ``offsets`` cannot be a manifest entry's index, or None when it can."""
    if not isinstance(offsets, list) or not all(isinstance(value, int) for value in offsets):
        return "offsets is not a list of integers"
    if len(offsets) != num_samples + 1:
        return f"{len(offsets)} offsets for {num_samples} samples (want {num_samples + 1})"
    if any(b <= a for a, b in zip(offsets, offsets[1:])) or (offsets and offsets[0] < 0):
        return "offsets do not increase"
    if size and offsets and offsets[-1] > size:
        return f"offsets end at byte {offsets[-1]}, past the shard's {size} bytes"
    if offsets and any(value % BLOCK for value in offsets):
        return f"an offset is not on a {BLOCK}-byte tar block"
    return None


def check_checksums(checksums: object, num_samples: int) -> str | None:
    """Why ``checksums`` cannot be a manifest entry's ``crc32c``, or None when it can."""
    if not isinstance(checksums, list) or not all(isinstance(value, int) and 0 <= value < 2**32 for value in checksums):
        return "crc32c is not a list of 32-bit unsigned integers"
    if len(checksums) != num_samples:
        return f"{len(checksums)} CRC-32C values for {num_samples} samples"
    return None


def index_problem(entry: dict) -> str | None:
    """Why a manifest entry's index (offsets and crc32c) is missing or unusable, or None."""
    if "offsets" not in entry or "crc32c" not in entry:
        return "no " + " and no ".join(key for key in ("offsets", "crc32c") if key not in entry)
    return (check_offsets(entry["offsets"], entry["num_samples"], entry.get("bytes"))
            or check_checksums(entry["crc32c"], entry["num_samples"]))


def index_manifest(url: str, force: bool = False, progress: bool = True) -> tuple[int, int]:
    """Add ``offsets`` and ``crc32c`` to every shard entry of the manifest under ``url`` that
    lacks them (all, with ``force``); returns (shards scanned, shards already indexed). Each
    shard is checked against the entry's size, sample count and sha256 first: an index of a
    shard that is not the packed one would bless its damage. A shard in S3 is downloaded once
    to a temporary file. The manifest is written once, at the end, so an interrupted scan
    leaves it as it was."""
    manifest_url = storage.join(url, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(manifest_url))
    except FileNotFoundError:
        raise SystemExit(f"shard_index: no {MANIFEST_NAME} at {manifest_url}: point it at a folder written by "
                         "sharding/make_shards.py or launch/extract_features.py") from None
    entries = manifest.get("shards") or []
    todo = [entry for entry in entries if force or index_problem(entry)]
    for entry in tqdm(todo, desc=f"indexing {url}", unit="shard", disable=not progress or not todo):
        shard_url = storage.join(url, entry["name"])
        description = _describe_stored(shard_url)
        rerun = "the shard is not the one that was packed; re-run its packing"
        if len(description.crc32c) != entry["num_samples"]:
            raise SystemExit(f"shard_index: {shard_url} holds {len(description.crc32c)} samples, the manifest says "
                             f"{entry['num_samples']}: {rerun}")
        if entry.get("bytes") and description.bytes != entry["bytes"]:
            raise SystemExit(f"shard_index: {shard_url} is {description.bytes} bytes, the manifest says {entry['bytes']}: {rerun}")
        if entry.get("sha256") and description.sha256 != entry["sha256"]:
            raise SystemExit(f"shard_index: {shard_url} has sha256 {description.sha256[:12]}..., the manifest says "
                             f"{entry['sha256'][:12]}...: {rerun}")
        entry.update(description.index_fields())
    if todo:
        storage.write_bytes(manifest_url, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return len(todo), len(entries) - len(todo)


def _describe_stored(shard_url: str) -> ShardDescription:
    """:func:`describe_shard` of a local shard, or of an S3 one through a temporary copy."""
    if not storage.is_s3_url(shard_url):
        return describe_shard(shard_url)
    with tempfile.NamedTemporaryFile(prefix="shard_index_", suffix=".tar") as copy:
        stream, _ = storage.open_sized(shard_url)
        with stream:
            shutil.copyfileobj(stream, copy, 1 << 20)
        copy.flush()
        return describe_shard(copy.name)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="shard folders (local or s3://bucket/prefix) holding manifest.json")
    parser.add_argument("--force", action="store_true", help="rescan shards that already have offsets and crc32c")
    args = parser.parse_args(list(argv) if argv is not None else None)
    for folder in args.folders:
        scanned, kept = index_manifest(folder, force=args.force)
        print(f"{folder}: indexed {scanned} shard(s)" + (f", {kept} already had offsets and crc32c" if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
