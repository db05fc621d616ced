"""Byte offsets of the samples in a shard: the index that lets a reader start at any sample.

A shard's manifest entry may carry ``offsets``: ``num_samples + 1`` integers, where
``offsets[i]`` is the byte at which sample ``i``'s first tar header starts and the last one is
where the last sample's data ends (the end-of-archive blocks follow). Samples ``[a, b)`` are
then exactly the bytes ``[offsets[a], offsets[b])`` of the file, a well-formed run of tar
members that a stream-mode ``tarfile`` reads as it would the whole archive. The loader turns
that into a local ``seek`` or an S3 ``Range`` GET (``sharding.storage.open_range``), so a
reader that needs the middle of a shard never reads (or pays the network for) its start.

The tars themselves are unchanged: plain webdataset, GNU tar and the AWS CLI read them as before.

``sharding/make_shards.py`` and ``launch/extract_features.py`` write the offsets as they pack.
Shards packed before that get them once, with this command (it reads every shard once and
rewrites only ``manifest.json``; the shard files are not touched)::

    python -m sharding.shard_index data/ssv2/shards/train s3://bucket/ssv2/validation
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterable

from tqdm import tqdm

from sharding import storage

MANIFEST_NAME = "manifest.json"
BLOCK = tarfile.BLOCKSIZE


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


def describe_shard(path: str | Path) -> tuple[int, str, list[int]]:
    """Size, sha256 and sample offsets of a finished local shard: what its manifest entry
    records (the writers of frame and feature shards both call this)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        handle.seek(0)
        offsets = sample_offsets(handle)
    return os.path.getsize(path), digest.hexdigest(), offsets


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


def index_manifest(url: str, force: bool = False, progress: bool = True) -> tuple[int, int]:
    """Add ``offsets`` to every shard entry of the manifest under ``url`` that lacks them (all,
    with ``force``); returns (shards scanned, shards already indexed). The manifest is written
    once, at the end, so an interrupted scan leaves it as it was."""
    manifest_url = storage.join(url, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(manifest_url))
    except FileNotFoundError:
        raise SystemExit(f"shard_index: no {MANIFEST_NAME} at {manifest_url}: point it at a folder written by "
                         "sharding/make_shards.py or launch/extract_features.py") from None
    entries = manifest.get("shards") or []
    todo = [entry for entry in entries if force or check_offsets(entry.get("offsets"), entry["num_samples"], entry.get("bytes"))]
    for entry in tqdm(todo, desc=f"indexing {url}", unit="shard", disable=not progress or not todo):
        shard_url = storage.join(url, entry["name"])
        stream, size = storage.open_sized(shard_url)
        with stream:
            offsets = sample_offsets(stream)
        if len(offsets) - 1 != entry["num_samples"]:
            raise SystemExit(f"shard_index: {shard_url} holds {len(offsets) - 1} samples, the manifest says "
                             f"{entry['num_samples']}: the shard is not the one that was packed; re-run its packing")
        if entry.get("bytes") and size != entry["bytes"]:
            raise SystemExit(f"shard_index: {shard_url} is {size} bytes, the manifest says {entry['bytes']}: "
                             "the shard is not the one that was packed; re-run its packing")
        entry["offsets"] = offsets
    if todo:
        storage.write_bytes(manifest_url, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return len(todo), len(entries) - len(todo)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="shard folders (local or s3://bucket/prefix) holding manifest.json")
    parser.add_argument("--force", action="store_true", help="rescan shards that already have offsets")
    args = parser.parse_args(list(argv) if argv is not None else None)
    for folder in args.folders:
        scanned, kept = index_manifest(folder, force=args.force)
        print(f"{folder}: indexed {scanned} shard(s)" + (f", {kept} already had offsets" if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
