"""How fast make_shards packs clips, against the floor of decoding the same videos.

    python -m sharding.benchmark [--root ROOT] [--split train] [--workers N] [--limit N] [--repeat R]

Without ``--root`` a small synthetic SSv2 set is generated in a temporary folder. Printed:
the floor (PyAV decoding every frame of every video, nothing else, one process), make_shards'
clips/s with 1 and with N workers, each per worker as a ratio to the floor, and the speed-up
from 1 to N workers. Ratios, not absolute times, are what carry over between machines. Each
figure is the best of ``--repeat`` runs: on a shared machine the best run is the one least
disturbed by other work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import av

from sharding import make_shards
from sharding.make_shards import find_video
from sharding.ssv2 import LABELS_DIR, VIDEOS_DIR

# A synthetic set big enough (200 clips) that pool start-up is a small part of a timed run.
SYNTHETIC_TRAIN_PER_CLASS = 20


def decode_floor(video_paths: list[Path]) -> float:
    """Clips per second of a bare forward decode (same threading as make_shards)."""
    started = time.perf_counter()
    for path in video_paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for _ in container.decode(stream):
                pass
    return len(video_paths) / (time.perf_counter() - started)


def make_shards_rate(root: Path, split: str, workers: int, limit: int | None, out: Path) -> float:
    """Clips per second of a whole make_shards run (pool start-up and tar writing included)."""
    argv = ["--root", str(root), "--split", split, "--out", str(out), "--workers", str(workers), "--no-progress"]
    if limit is not None:
        argv += ["--limit", str(limit)]
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        code = make_shards.main(argv)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"make_shards failed (exit {code}): {summary.getvalue()}")
    manifest = json.loads((out / "manifest.json").read_text())
    return (manifest["num_samples"] + manifest["num_rejected"]) / seconds


def _synthetic_root(folder: Path) -> Path:
    from sharding.synthetic import generate

    return generate(
        folder / "ssv2", seed=0, train_per_class=SYNTHETIC_TRAIN_PER_CLASS, val_per_class=1, test_count=0, progress=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sharding.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="SSv2 root (default: generate a small synthetic one)")
    parser.add_argument("--split", default="train", choices=("train", "validation", "test"))
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--workers", type=int, default=cores, help="N for the parallel run (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips of the split")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts (default 3)")
    args = parser.parse_args(argv)

    # Imported up front so neither timed run pays webdataset's (torch's) import.
    import webdataset  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="shard-bench-") as scratch:
        scratch = Path(scratch)
        root = Path(args.root) if args.root else _synthetic_root(scratch)
        entries = json.loads((root / LABELS_DIR / f"{args.split}.json").read_text())[: args.limit]
        videos = [find_video(root / VIDEOS_DIR, str(entry["id"])) for entry in entries]
        videos = [path for path in videos if path.exists()]

        floor = one = many = 0.0
        for run in range(args.repeat):
            floor = max(floor, decode_floor(videos))
            one = max(one, make_shards_rate(root, args.split, 1, args.limit, scratch / f"out-1-{run}"))
            many_out = scratch / f"out-{args.workers}-{run}"
            many = max(many, make_shards_rate(root, args.split, args.workers, args.limit, many_out))

    source = args.root or "a synthetic set"
    print(f"clips: {len(entries)} ({args.split} of {source}), cores: {cores}, best of {args.repeat}")
    rows = [
        ("floor: PyAV decode only, 1 process", floor, 1),
        ("make_shards, 1 worker", one, 1),
        (f"make_shards, {args.workers} workers", many, args.workers),
    ]
    for name, rate, workers in rows:
        per_worker = rate / workers
        print(f"{name:38s} {rate:7.1f} clips/s  {per_worker:7.1f} per worker = {per_worker / floor:.2f} x floor")
    print(f"speed-up 1 -> {args.workers} workers: {many / one:.2f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
