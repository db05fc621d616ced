"""How fast the loader's read stage streams shards from S3, against raw boto3 ``get_object``
of the same shards, and what the node cache (``data.cache_dir``) gives a second epoch.

    python -m launch.bench_storage --shards s3://bucket/prefix [--cache-dir DIR] [--rounds 3]

The S3 endpoint and credentials come from the usual ``AWS_*`` variables. A loopback server
like the tests' (SeaweedFS, the ``weed`` binary the test extras install beside python)::

    .venv/bin/weed mini -dir=/tmp/weed -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config=s3config.json
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python -m launch.bench_storage --shards s3://bench/train

Every path reads every shard of the manifest whole, in one process, one at a time; only bytes
are moved (no JPEG is decoded), so the figures are the read stage's own:

- **raw**: ``get_object(...)["Body"].read()`` of each shard, the floor any S3 reader pays;
- **loader**: ``fusion.data.read_segment`` over each whole shard: the tar parsed member by member,
  each sample checked against the index's CRC-32C, samples grouped, as in training;
- **loader, sha256 instead**: the same with the manifest's ``crc32c`` left out (an index made
  before the checksums): the whole shard is hashed with sha256 as it streams;
- **cache, first epoch**: the same with a fresh ``data.cache_dir``: each shard is downloaded and
  checked into the cache, then read from it;
- **cache, second epoch**: every shard read from the local copy.

Each figure is the best of ``--rounds`` (the first round warms the server's own caches).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

from fusion.data import DataConfig, DataEvents, Segment, ShardSet, read_segment
from sharding import storage


def time_raw(shardset: ShardSet) -> tuple[float, int]:
    client, total = storage.s3_client(), 0
    start = time.perf_counter()
    for name in shardset.shards:
        bucket, key = storage.split_s3_url(shardset.shard_url(name))
        total += len(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return time.perf_counter() - start, total


def time_loader(shardset: ShardSet, cfg: DataConfig) -> tuple[float, int, dict[str, int]]:
    events = DataEvents(announce=False)
    samples = 0
    start = time.perf_counter()
    for name, size in zip(shardset.shards, shardset.shard_sizes):
        samples += sum(1 for _ in read_segment(shardset, Segment(name, 0, size), cfg, events))
    seconds = time.perf_counter() - start
    counts, messages = events.take()
    if messages or counts.get("corrupt_shards"):
        raise SystemExit(f"bench_storage: reading {shardset.url} went wrong: {messages}")
    return seconds, samples, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_storage", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="s3://bucket/prefix holding manifest.json and its shards")
    parser.add_argument("--cache-dir", help="where the cache paths keep their copies (default: a temporary folder, removed after)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each path; the best counts (default 3)")
    args = parser.parse_args(argv)
    if not storage.is_s3_url(args.shards):
        raise SystemExit("bench_storage: --shards must be an s3:// URL (the point is what the network path costs)")

    shardset = ShardSet.open(args.shards)
    total = sum(shardset.entry(name)["bytes"] for name in shardset.shards)
    print(f"{shardset.url}: {len(shardset.shards)} shards, {shardset.num_samples} samples, {total / 1e6:.1f} MB; "
          f"best of {args.rounds} rounds, one process")
    scratch = Path(args.cache_dir or tempfile.mkdtemp(prefix="bench_storage_"))
    try:
        raw = min(time_raw(shardset)[0] for _ in range(args.rounds))
        plain = min(time_loader(shardset, DataConfig())[0] for _ in range(args.rounds))
        legacy = None
        if all("crc32c" in shardset.entry(name) for name in shardset.shards):
            manifest = copy.deepcopy(shardset.manifest)
            for entry in manifest["shards"]:
                del entry["crc32c"]
            hashed = ShardSet(url=shardset.url, manifest=manifest)
            legacy = min(time_loader(hashed, DataConfig())[0] for _ in range(args.rounds))
        else:
            print("(the manifest has no crc32c: the loader hashes whole shards with sha256; python -m sharding.shard_index adds them)")
        first = second = float("inf")
        for round_number in range(args.rounds):
            cache = scratch / f"round{round_number}"
            cfg = DataConfig(cache_dir=str(cache), cache_gb=2 * total / 1e9 + 1)
            seconds, _, counts = time_loader(shardset, cfg)
            if counts.get("cache_fetches") != len(shardset.shards):
                raise SystemExit(f"bench_storage: the first cached epoch fetched {counts.get('cache_fetches')} shards, "
                                 f"not {len(shardset.shards)}")
            first = min(first, seconds)
            seconds, _, counts = time_loader(shardset, cfg)
            if counts.get("bytes_read"):
                raise SystemExit("bench_storage: the second cached epoch read from storage")
            second = min(second, seconds)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.cache_dir:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'path':<42} {'MB/s':>8} {'vs raw':>8}")
    rows = [("raw boto3 get_object().read()", raw), ("loader read stage (read_segment)", plain),
            ("loader + cache, first epoch (fetch)", first), ("loader + cache, second epoch (hits)", second)]
    if legacy is not None:
        rows.insert(2, ("loader, whole-shard sha256 (no crc32c)", legacy))
    for name, seconds in rows:
        print(f"{name:<42} {total / seconds / 1e6:8.1f} {raw / seconds:7.2f}x")
    print(f"second cached epoch against the first: {first / second:.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
