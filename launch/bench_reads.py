"""Bytes an epoch reads from storage against the bytes of the samples it uses, from the
loader's own plan (``fusion.data.train_plan``) at SSv2 size, for several cluster sizes.

    python -m launch.bench_reads [--gpus 8,32,64] [--workers 8] [--batch-size 8]

Nothing is read: the plan is computed for every rank, and each lane's segments are costed the
way :func:`fusion.data.read_segment` reads them:

- **without the index** (shards packed before ``sharding.shard_index``): a segment that starts
  mid-shard streams the shard from its first byte and drops the samples before its own;
- **with the index, no checksums** (indexed before ``crc32c`` existed): a segment is one
  ranged read of exactly its samples' bytes, except a whole shard with a sha256, which is read
  entire to check it (its end-of-archive blocks are the only bytes beyond the samples);
- **with the index and its per-sample CRC-32Cs** (what make_shards writes now): every segment,
  whole shards included, is one ranged read of exactly its samples' bytes, each sample checked.

Sample sizes are drawn around ``--clip-kb`` (SSv2's clips at 32 frames, 240 short side,
quality 90 are ~610 KB on textured frames), so shard boundaries fall where they would.
"""

from __future__ import annotations

import argparse
import random

from fusion.data import ShardSet, train_plan

SSV2_TRAIN_CLIPS = 168_913
TAR_END = 10_240  # webdataset's TarWriter pads the archive to a 10 KiB record


def ssv2_like_shardset(clips: int, shard_size: int, clip_kb: float, seed: int = 0) -> ShardSet:
    """A manifest (no files) of ``clips`` samples in shards of ``shard_size``, with offsets and
    (placeholder) CRC-32Cs."""
    rng = random.Random(seed)
    shards, left, index = [], clips, 0
    while left:
        count = min(shard_size, left)
        offsets = [0]
        for _ in range(count):
            size = max(1, int(rng.lognormvariate(0, 0.25) * clip_kb * 1024))
            offsets.append(offsets[-1] + -(-size // 512) * 512)
        shards.append({"name": f"shard-{index:06d}.tar", "num_samples": count, "bytes": offsets[-1] + TAR_END,
                       "sha256": "x" * 64, "offsets": offsets, "crc32c": [0] * count})
        left, index = left - count, index + 1
    manifest = {"format": "ssv2-frames/1", "frames": 32, "num_samples": clips, "shards": shards}
    return ShardSet(url="memory://ssv2-train", manifest=manifest)


def epoch_bytes(shardset: ShardSet, gpus: int, workers: int, batch_size: int, epoch: int = 0) -> dict[str, int]:
    """Bytes used, and read with and without the index (and its checksums), summed over every
    rank and lane."""
    used = indexed = checked = streamed = 0
    for rank in range(gpus):
        for plan in train_plan(shardset, batch_size=batch_size, rank=rank, world_size=gpus, epoch=epoch, seed=0,
                               lanes=max(1, workers)):
            for segment in plan.segments:
                entry, offsets = shardset.entry(segment.shard), shardset.offsets(segment.shard)
                whole = segment.start == 0 and segment.stop == entry["num_samples"]
                samples = offsets[segment.stop] - offsets[segment.start]
                used += samples
                indexed += entry["bytes"] if whole else samples
                checked += samples
                streamed += entry["bytes"] if whole else offsets[segment.stop]
    return {"used": used, "indexed": indexed, "checked": checked, "streamed": streamed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_reads", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="8,32,64", help="ranks to plan for, comma-separated (default 8,32,64)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers (lanes) per rank (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per rank per step (default 8)")
    parser.add_argument("--clips", type=int, default=SSV2_TRAIN_CLIPS, help=f"training clips (default SSv2's {SSV2_TRAIN_CLIPS})")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard (make_shards' default 256)")
    parser.add_argument("--clip-kb", type=float, default=610.0, help="mean bytes of a clip in KB (default 610)")
    args = parser.parse_args(argv)

    shardset = ssv2_like_shardset(args.clips, args.shard_size, args.clip_kb)
    print(f"{args.clips} clips in {len(shardset.shards)} shards of {args.shard_size}, ~{args.clip_kb:.0f} KB a clip; "
          f"batch {args.batch_size}, {args.workers} workers a GPU; one epoch's reads / the bytes of the samples it uses:\n")
    print("| GPUs | lanes | used (GB) | read without index | index, sha256 | index with crc32c |")
    print("|---|---|---|---|---|---|")
    for gpus in (int(g) for g in args.gpus.split(",")):
        figures = epoch_bytes(shardset, gpus, args.workers, args.batch_size)
        used = figures["used"]
        print(f"| {gpus} | {gpus * max(1, args.workers)} | {used / 1e9:.1f} | {figures['streamed'] / used:.3f} "
              f"| {figures['indexed'] / used:.4f} | {figures['checked'] / used:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
