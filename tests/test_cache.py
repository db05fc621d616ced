"""The node-local shard cache (sharding/cache.py, ``data.cache_dir``): two ranks of one node,
each with two loader workers, run at the same time as separate processes against a real S3
server; storage serves each shard once, the size limit holds at every moment, and the data
the ranks get is the data they get without a cache.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import time
from collections import Counter

import pytest

from fusion.data import DataConfig, ShardSet, train_loader
from sharding import storage
from sharding.cache import CachedShardMismatch, ShardCache
from sharding.shard_index import index_manifest
from tests.test_data import write_shards

SIZES = [5, 5, 5, 5, 4]


def rank_epoch(url: str, cache_dir: str, cache_gb: float, rank: int, epoch: int, queue) -> None:
    """One rank's epoch (in its own process, as under torchrun): its keys and loader stats."""
    cfg = DataConfig(num_workers=2, crop_size=16, shuffle_window=3, cache_dir=cache_dir, cache_gb=cache_gb)
    loader = train_loader(cfg, ShardSet.open(url), batch_size=2, rank=rank, world_size=2, epoch=epoch, seed=0)
    keys = [key for batch in loader for key in batch["keys"]]
    queue.put((rank, keys, dict(loader.stats)))


def node_epoch(url: str, cache_dir: str, cache_gb: float, epoch: int, watch: ShardCache | None = None
               ) -> tuple[list[str], Counter, int]:
    """Both ranks at once; returns every key they read, their summed stats, and the largest
    size the cache folder reached while they ran (polled every few milliseconds)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=rank_epoch, args=(url, cache_dir, cache_gb, rank, epoch, queue)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    results, largest = [], 0
    deadline = time.monotonic() + 240
    while len(results) < 2 and time.monotonic() < deadline:
        if watch is not None and watch.folder.is_dir():
            largest = max(largest, watch.cached_bytes())
        try:
            results.append(queue.get(timeout=0.005))
        except Exception:  # queue.Empty
            pass
    for process in ranks:
        process.join(timeout=60)
    assert len(results) == 2 and all(process.exitcode == 0 for process in ranks), "a rank failed or hung"
    stats = Counter()
    for _, _, rank_stats in results:
        stats.update(rank_stats)
    return sorted(key for _, keys, _ in results for key in keys), stats, largest


@pytest.fixture
def s3_shards(tmp_path, s3_env) -> tuple[str, list[str], list[int]]:
    folder = tmp_path / "shards"
    keys = write_shards(folder, SIZES)
    index_manifest(str(folder), progress=False)
    url = f"s3://{s3_env}/cache-{tmp_path.name}"
    for path in folder.iterdir():
        storage.write_bytes(storage.join(url, path.name), path.read_bytes())
    sizes = [entry["bytes"] for entry in json.loads((folder / "manifest.json").read_text())["shards"]]
    return url, keys, sizes


def test_two_ranks_of_a_node_fetch_each_shard_once(s3_shards, tmp_path):
    url, keys, sizes = s3_shards
    cache = str(tmp_path / "cache")
    seen, stats, _ = node_epoch(url, cache, 1.0, epoch=0)
    assert seen == sorted(keys)
    assert stats["cache_fetches"] == len(SIZES)  # 2 ranks x 2 workers, yet each shard crossed the network once
    assert stats["bytes_read"] == sum(sizes)
    assert stats["corrupt_shards"] == 0

    again, second, _ = node_epoch(url, cache, 1.0, epoch=1)
    assert again == sorted(keys)
    assert second["cache_fetches"] == 0 and second["bytes_read"] == 0 and second["cache_bytes_read"] > 0

    uncached, plain, _ = node_epoch(url, "", 1.0, epoch=1)
    assert uncached == again and plain["cache_fetches"] == 0 and plain["bytes_read"] > 0


def test_the_size_limit_holds_while_ranks_read(s3_shards, tmp_path):
    url, keys, sizes = s3_shards
    folder = tmp_path / "cache"
    limit = 2 * max(sizes) + 1  # room for two shards of five
    seen, stats, largest = node_epoch(url, str(folder), limit / 1e9, epoch=0, watch=ShardCache(folder, limit))
    assert seen == sorted(keys)
    assert 0 < largest <= limit and stats["cache_fetches"] >= 2
    assert ShardCache(folder, limit).cached_bytes() <= limit
    # shards that found no room were read straight from storage; none was lost
    assert stats["corrupt_shards"] == 0 and stats["samples_read"] == sum(SIZES)


def test_a_dead_download_is_cleared_and_a_foreign_shard_is_refused(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, [3, 3])
    manifest = json.loads((folder / "manifest.json").read_text())
    cache = ShardCache(tmp_path / "cache", 10 * manifest["shards"][0]["bytes"])
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / ".abc-shard-000009.tar.x.partial"
    stale.write_bytes(b"\0" * 100)  # left by a process killed mid-download: nobody holds its lock
    entry = manifest["shards"][0]
    url = str(folder / entry["name"])
    stream, fetched = cache.open_range(url, entry["bytes"], None, 0, None)
    assert fetched == entry["bytes"] and stream.read() == (folder / entry["name"]).read_bytes()
    stream.close()
    assert not stale.exists()

    live = tmp_path / "cache" / ".def-shard-000008.tar.y.partial"
    live.write_bytes(b"\0" * 100)
    with open(live, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # a download in progress in another process
        other = manifest["shards"][1]
        stream, _ = cache.open_range(str(folder / other["name"]), other["bytes"], None, 0, None)
        stream.close()
        assert live.exists()

    with pytest.raises(CachedShardMismatch, match="sha256"):  # a shard that is not the manifest's is not kept
        ShardCache(tmp_path / "cache2", 10 * other["bytes"]).open_range(str(folder / other["name"]), other["bytes"],
                                                                          "0" * 64, 0, None)
    assert not any(p for p in (tmp_path / "cache2").iterdir() if not p.name.endswith(".lock"))


def test_a_bad_shard_through_the_cache_is_counted_not_kept(tmp_path):
    folder = tmp_path / "shards"
    keys = write_shards(folder, [4, 4])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64  # shard 1 is not the one the manifest describes
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cfg = DataConfig(num_workers=0, crop_size=16, shuffle_window=2, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
    loader = train_loader(cfg, ShardSet.open(str(folder)), batch_size=2, rank=0, world_size=1, epoch=0, seed=0)
    seen = [key for batch in loader for key in batch["keys"]]
    assert loader.stats["corrupt_shards"] >= 1 and not set(seen) & set(keys[4:])
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == ["shard-000000.tar"]


def test_a_damaged_sample_costs_that_sample_not_its_shard(tmp_path, caplog):
    """A copy whose bytes fail a sample's CRC-32C is not kept (the check runs as the shard
    downloads, instead of the sha256); the loader then reads that shard from storage, where
    only the damaged sample is lost."""
    folder = tmp_path / "shards"
    keys = write_shards(folder, [4, 4], label_of=lambda n: 3)
    index_manifest(str(folder), progress=False)
    entry = json.loads((folder / "manifest.json").read_text())["shards"][1]
    shard = folder / entry["name"]
    data = bytearray(shard.read_bytes())
    data[data.index(b"100006.cls") + 512] ^= 0x04  # its label digit: "3" -> "7", same size
    shard.write_bytes(bytes(data))

    index = (entry["offsets"], entry["crc32c"])
    with pytest.raises(CachedShardMismatch, match=r"samples \[2\] do not match the manifest's CRC-32C"):
        ShardCache(tmp_path / "direct", 1 << 30).open_range(str(shard), entry["bytes"], None, 0, None, index=index)
    assert not any(p for p in (tmp_path / "direct").iterdir() if not p.name.endswith(".lock"))

    cfg = DataConfig(num_workers=0, crop_size=16, shuffle_window=2, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
    loader = train_loader(cfg, ShardSet.open(str(folder)), batch_size=2, rank=0, world_size=1, epoch=0, seed=0)
    seen = {key for batch in loader for key in batch["keys"]}
    assert seen == set(keys) - {"100006"}
    assert loader.stats["corrupt_samples"] == 1 and loader.stats["corrupt_shards"] == 0
    assert "the node cache did not keep" in caplog.text
    kept = [p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert kept == ["shard-000000.tar"]
