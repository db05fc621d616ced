"""How fast the shard loader turns shards into training clips, per CPU core, against
references measured on the same clips in the same run:

- the floor: decoding the same JPEG bytes with simplejpeg in this process (what any JPEG
  loader must pay; the loader adds tar reading, cropping, resizing, batching, IPC); each frame
  into an array dropped at once, whose memory the allocator hands back for the next frame.
  The same bytes: the frames the timed loader decodes, of the clips it delivers, in its order
  (taken from the loader itself in ``decode: gpu`` mode, which picks them and decodes nothing);
  clips and frames differ in cost, by 1-5 % between the first and second half of the demo's shards;
- the same decode into one array a clip, a batch of them kept: the frames stay in memory, as
  a loader must keep them, and each is written to memory that is not in cache;
- the naive loader: decoding each source ``.webm`` with PyAV and sampling T frames
  (``sharding.video.decode_sampled``, what make_shards does once so training never has to).

The loader decodes only the region of a frame around a training clip's crop
(``data.region_decode``, :mod:`fusion.data.region`), and one row times its decode-only process
decoding whole frames, as the floor does. The loader is timed in its three modes: the crop in
the workers (the default), the crop on the device (``data.resize_on: device``: a loader process only decodes) and the decode on the
device (``data.decode: gpu``: a loader process only reads and picks the frames' bytes); for
the last two, one row times the loader process's own work, without the device's. One more
row times the decode-only process with simplejpeg's decode stubbed out (it returns its buffer
unwritten): what the loader costs beside the decoder. With
``--workers`` above 0, rows of loader workers beside this (training) process time the
hand-over of batches too: ``cpu ms/clip`` counts every process, ``workers`` their share (as
they report it, ``worker_cpu_us``). ``resize_on: device`` leaves its crop to the ``meta``
device (shapes only); ``decode: gpu`` decodes on this CPU, in the training process, so there
only the workers' share stands for a GPU node.

    python -m launch.bench_loader [--shards DIR] [--videos DIR] [--clips N] [--workers 0,2] [--rounds 5] [--in-memory]

Without ``--shards`` it generates a small synthetic SSv2 set (``sharding.synthetic``) and packs
it with make_shards in a temporary folder. The source videos are found through the
manifest's ``args.videos`` unless ``--videos`` names them. Each path is timed right after a
timing of the floor, and its ratio is to that timing: ``vs floor`` is the median of a path's
ratios over the rounds, ``rounds`` their range. Figures are ratios, not asserts.

The floor's bytes are in this process's memory; the loader reads its shards. Where the
kernel reclaims page cache left unread for a while (this project's CI machine, a VM with
DAMON's proactive ``pageout``, had dropped a tenth of the demo shards, a quarter of one, a few
minutes after they were warmed and read), the loader then waits for the disk: ``--in-memory`` times a copy of the shards in tmpfs, and
the run names every one-process path whose CPU time falls short of its wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import simplejpeg
import torch
from tqdm import tqdm

from fusion.data import DataConfig, ShardSet, region, train_loader
from sharding.video import decode_sampled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="training shard folder or s3:// URL with manifest.json (default: make a synthetic one)")
    parser.add_argument("--videos", help="folder of the source .webm files (default: the manifest's args.videos)")
    parser.add_argument("--clips", type=int, default=64, help="clips to time on each path (default 64)")
    parser.add_argument("--workers", default="0,2", help="loader worker counts to time, comma-separated (default 0,2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times every path is timed, in turn, each right after a timing of the floor; printed: "
                             "the medians, and the spread of the rounds' ratios to the floor (this 2-core machine's "
                             "figures move by ~0.1x from run to run) (default 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=0,
                        help="frames per clip the loader decodes, T (data.frames; the floor decodes as many); 0: all stored")
    parser.add_argument("--in-memory", action="store_true",
                        help="time a copy of the shard folder in tmpfs (/dev/shm), so that the loader reads from memory as "
                             "the floor does: where idle page cache is reclaimed (this VM's DAMON pageout drops pages "
                             "unread for seconds), the loader's reads otherwise wait for the disk and its ratios time "
                             "the disk too")
    return parser.parse_args(argv)


TMPFS = Path("/dev/shm")


def in_memory_copy(shards: str, folder: Path) -> str:
    """A copy of the local shard folder ``shards`` (its index and manifest with it) in
    ``folder``, a folder of tmpfs: its pages are memory, which the kernel does not reclaim as
    it does a file's cache."""
    source = Path(shards)
    if "://" in shards or not source.is_dir():
        raise SystemExit(f"--in-memory copies a local shard folder, and {shards} is not one: time object storage "
                         "with launch.bench_storage, or drop --in-memory")
    size = sum(path.stat().st_size for path in source.rglob("*") if path.is_file())
    # twice its size free: the copy must leave the loader's batch regions room in /dev/shm too
    if shutil.disk_usage(folder).free < 2 * size:
        raise SystemExit(f"--in-memory needs {2 * size / 1e9:.1f} GB free in {folder.parent} for a copy of {shards} "
                         f"({size / 1e9:.1f} GB): time fewer shards, or drop --in-memory")
    target = folder / source.name
    shutil.copytree(source, target)
    return str(target)


def synthetic_shards(folder: Path, clips: int) -> str:
    """Generate a synthetic SSv2 root and pack its training split; returns the shard folder."""
    from sharding import make_shards
    from sharding.synthetic import DEFAULT_CLASSES, generate

    classes = list(DEFAULT_CLASSES)
    per_class = max(1, -(-clips // len(classes)))
    root = generate(folder / "ssv2", seed=0, train_per_class=per_class, val_per_class=0, test_count=0, progress=True)
    out = folder / "shards" / "train"
    code = make_shards.main(["--root", str(root), "--split", "train", "--out", str(out), "--shard-size", "16"])
    if code != 0:
        raise SystemExit(f"make_shards failed on the synthetic set in {folder}")
    return str(out)


def bench_train_loader(shardset: ShardSet, workers: int, batch_size: int, crop_size: int, frames: int,
                       resize_on: str = "worker", decode: str = "cpu", device: str | None = None, region_decode: bool = True):
    """The one-rank training loader every loader path times (and :func:`loader_clips` reads
    the floor's frames from): epoch 0, seed 0, so every path sees the same clips and frames."""
    # a small shuffle window spreads the tar reads over the timed batches (with the default 256
    # they would all fall in the first, untimed, batch): each sample's read is counted once
    cfg = DataConfig(num_workers=workers, crop_size=crop_size, resize_on=resize_on, frames=frames, shuffle_window=batch_size,
                     decode=decode, region_decode=region_decode)
    return train_loader(cfg, shardset, batch_size=batch_size, rank=0, world_size=1, epoch=0, seed=0, device=device)


def loader_clips(shardset: ShardSet, batch_size: int, crop_size: int, clips: int, frames: int) -> tuple[list[str], list[list[bytes]]]:
    """The keys and the chosen frames' JPEG bytes of the clips :func:`time_loader` times (its
    batches after the first, up to ``clips``), as the loader picks them: a ``decode: gpu`` pass
    of the same loader, which picks the same frames and decodes none (the floor's bytes)."""
    loader = bench_train_loader(shardset, 0, batch_size, crop_size, frames, decode="gpu")
    keys: list[str] = []
    jpegs: list[list[bytes]] = []
    for number, batch in enumerate(loader.dataset):
        if number:  # the first batch is not timed
            keys += batch["keys"]
            jpegs += [clip["jpegs"] for clip in batch["encoded"]]
        if len(keys) >= clips:
            break
    return keys[:clips], jpegs[:clips]


def time_floor(clips: list[list[bytes]], kept: int = 0) -> tuple[float, float, None]:
    """Clips/s decoding only the JPEG frames, one thread, and CPU ms a clip. ``kept``: each
    clip's frames decoded into one array of its own, and the last ``kept`` clips' arrays kept
    (as a batch keeps them); 0: each frame into an array dropped at once, which the allocator
    hands back for the next, so the decoder writes to memory in cache (the floor)."""
    held: deque = deque(maxlen=max(kept, 1))
    start, cpu = time.perf_counter(), time.process_time()
    for jpegs in clips:
        if kept:
            height, width, _, _ = simplejpeg.decode_jpeg_header(jpegs[0])
            pixels = np.empty((len(jpegs), height, width, 3), np.uint8)
            held.append(pixels)
            for position, jpeg in enumerate(jpegs):
                simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=pixels[position])
        else:
            for jpeg in jpegs:
                simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    return len(clips) / (time.perf_counter() - start), (time.process_time() - cpu) * 1e3 / len(clips), None


def time_loader(shardset: ShardSet, workers: int, batch_size: int, crop_size: int, clips: int, resize_on: str = "worker",
                worker_side: bool = False, frames: int = 0, decode: str = "cpu", device: str | None = None,
                region_decode: bool = True) -> tuple[float, float, float | None]:
    """Clips/s through train_loader (one rank), counted from the first batch to the last so
    that worker start-up is not charged to the steady state, the CPU ms a clip of all its
    processes over that span (this one's, and what the workers report, ``worker_cpu_us``), and
    of it the workers' (None without workers). ``worker_side``: the loader's
    per-process work alone (its dataset iterated in this process: read, decode, batch), without
    what the training process then does with the batch (the device crop of ``resize_on: device``,
    the device decode of ``decode: gpu``). ``device="meta"`` with ``resize_on: device``: the
    batches as the training process receives them from the workers, the crop computing shapes
    only (what the GPU would do costs nothing here)."""
    loader = bench_train_loader(shardset, workers, batch_size, crop_size, frames, resize_on, decode, device, region_decode)
    seen, start = 0, None
    for batch in (loader.dataset if worker_side else loader):
        if start is None:
            start, cpu, worker_cpu = time.perf_counter(), time.process_time(), loader.stats["worker_cpu_us"]
        else:
            seen += len(batch["keys"])
        if seen >= clips:
            break
    worker_cpu = (loader.stats["worker_cpu_us"] - worker_cpu) / 1e6
    cpu = time.process_time() - cpu + worker_cpu
    return seen / (time.perf_counter() - start), cpu * 1e3 / seen, worker_cpu * 1e3 / seen if workers and not worker_side else None


@contextlib.contextmanager
def decoder_stubbed() -> Iterator[None]:
    """simplejpeg's decode and the region decode, in this process, replaced by ones that leave
    their output unwritten: what the loader process then costs is its own work (reads, checks,
    parsing, headers, sampling, batches), without the decoder's."""
    decode_jpeg, region_decoder = simplejpeg.decode_jpeg, region.region_decoder
    simplejpeg.decode_jpeg = lambda data, colorspace="RGB", buffer=None, **options: buffer
    region.region_decoder = lambda: (lambda jpeg, area, out: None) if region_decoder() is not None else None
    try:
        yield
    finally:
        simplejpeg.decode_jpeg, region.region_decoder = decode_jpeg, region_decoder


def time_naive(videos: Path, keys: list[str], frames: int, short_side: int) -> tuple[float, float, None]:
    """Clips/s decoding the source videos and sampling T frames, one thread, and CPU ms a clip."""
    paths = [next(iter(videos.glob(f"{key}.*")), None) for key in keys]
    paths = [p for p in paths if p is not None]
    if not paths:
        raise SystemExit(f"no source videos for the shard keys under {videos}: pass --videos")
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        decode_sampled(path, frames, short_side)
    return len(paths) / (time.perf_counter() - start), (time.process_time() - cpu) * 1e3 / len(paths), None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # per-core figures: one intra-op thread here, as in every DataLoader worker
    torch.set_num_threads(1)
    with contextlib.ExitStack() as cleanup:
        scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench_loader_"))
        shards = args.shards or synthetic_shards(Path(scratch), args.clips)
        if args.in_memory:
            if not TMPFS.is_dir():
                raise SystemExit(f"--in-memory copies the shards to {TMPFS}, which this machine does not have: drop --in-memory")
            shards = in_memory_copy(shards, Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench_loader_", dir=TMPFS))))
        shardset = ShardSet.open(shards)
        manifest_args = shardset.manifest.get("args", {})
        clips = min(args.clips, shardset.num_samples)
        if clips < 2 * args.batch_size:
            raise SystemExit(f"timing {clips} clips (--clips {args.clips}, {shardset.num_samples} in {shards}) needs at "
                             f"least two batches of --batch-size {args.batch_size}: the first batch is not timed (worker "
                             "start-up); ask for more clips or a smaller batch")
        frames = args.frames or shardset.frames
        keys, jpegs = loader_clips(shardset, args.batch_size, args.crop_size, clips, args.frames)
        print(f"shards: {shards}  ({shardset.num_samples} clips, T={frames}, short side {shardset.manifest.get('short_side')}), "
              f"timing {len(jpegs)} clips per path (the floor: the frames the loader decodes), cpu cores here: {os.cpu_count()}")

        # every path as a thunk, timed in turn each round, each right after the floor; its ratio
        # is to that floor timing, and the medians of the rounds are what is printed
        paths: list[tuple[str, int, Callable[[], tuple[float, float, float | None]]]] = [
            ("JPEG decode only (simplejpeg, floor)", 1, lambda: time_floor(jpegs)),
            # what a loader cannot avoid beyond the floor: the frames kept, a batch of clips at a time
            ("JPEG decode into kept clip arrays", 1, lambda: time_floor(jpegs, kept=args.batch_size))]
        for workers in (int(w) for w in args.workers.split(",")):
            paths.append((f"train_loader, {workers} workers, crop {args.crop_size}", max(1, workers),
                          functools.partial(time_loader, shardset, workers, args.batch_size, args.crop_size, clips,
                                            frames=args.frames)))
        timed = functools.partial(time_loader, shardset, 0, args.batch_size, args.crop_size, clips, frames=args.frames)
        # data.resize_on: device: what a loader process does (the GPU would crop), then the
        # same with the crop on this CPU as the "device" (the CPU-only path of that mode)
        paths.append(("loader process, resize_on device (decode only)", 1,
                      functools.partial(timed, resize_on="device", worker_side=True)))
        # the same, each frame decoded whole (data.region_decode: false; the floor's decode)
        paths.append(("loader process, decode only, whole frames", 1,
                      functools.partial(timed, resize_on="device", worker_side=True, region_decode=False)))
        def time_own_work() -> tuple[float, float, float | None]:
            with decoder_stubbed():
                return timed(resize_on="device", worker_side=True)

        # the same process with the decoder doing nothing: the loader's own share of the row above
        paths.append(("loader process, decoder stubbed (its own work)", 1, time_own_work))
        paths.append(("train_loader, resize_on device = this CPU", 1, functools.partial(timed, resize_on="device")))
        # the same decode in loader workers: what the training process receives (a GPU's crop
        # would cost this CPU nothing; the "meta" device computes only its shapes)
        for workers in (int(w) for w in args.workers.split(",") if int(w) > 0):
            paths.append((f"{workers} workers -> trainer, resize_on device", workers,
                          functools.partial(time_loader, shardset, workers, args.batch_size, args.crop_size, clips,
                                            frames=args.frames, resize_on="device", device="meta")))
        # data.decode: gpu: the loader process only reads and picks the chosen frames' bytes
        paths.append(("loader process, decode gpu (bytes only)", 1, functools.partial(timed, worker_side=True, decode="gpu")))
        # the same from workers: this CPU then decodes in the training process (the GPU's work),
        # so only the workers' share of the CPU says what a GPU node's loader costs
        for workers in (int(w) for w in args.workers.split(",") if int(w) > 0):
            paths.append((f"{workers} workers -> trainer, decode gpu (here: cpu)", workers,
                          functools.partial(time_loader, shardset, workers, args.batch_size, args.crop_size, clips,
                                            frames=args.frames, decode="gpu", device="cpu")))
        videos = Path(args.videos or manifest_args.get("videos", ""))
        if videos.is_dir():
            short_side = int(shardset.manifest.get("short_side", 240))
            paths.append(("naive: PyAV .webm decode + sample T frames", 1,
                          lambda: time_naive(videos, keys, frames, short_side)))
        else:
            print(f"(no source videos at '{videos}': naive path not timed; pass --videos)")
        rates: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        worker_cpu: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        ratios: dict[str, list[float]] = {name: [] for name, _, _ in paths}  # a timing / the floor just before it
        floor_name, _, time_the_floor = paths[0]
        for _ in tqdm(range(args.rounds), desc="rounds", unit="round", disable=args.rounds == 1):
            for name, cores, measure in paths[1:]:
                # the floor again right before each path: a slow spell of this machine lasts
                # seconds, and a ratio to a floor timed a minute earlier would carry it
                floor_rate, floor_cpu, _ = time_the_floor()
                rates[floor_name].append(floor_rate)
                cpu[floor_name].append(floor_cpu)
                ratios[floor_name].append(1.0)
                rate, cpu_ms, worker_ms = measure()
                rates[name].append(rate)
                cpu[name].append(cpu_ms)
                ratios[name].append(rate / cores / floor_rate)
                if worker_ms is not None:
                    worker_cpu[name].append(worker_ms)

        spread = args.rounds > 1
        # cpu ms/clip: every process of the path; workers': their own count, their hand-over included
        print(f"{'path':<48} {'clips/s':>9} {'cores':>6} {'clips/s/core':>13} {'vs floor':>9} {'cpu ms/clip':>12}"
              f" {'workers':>8}" + (f"  {'rounds (vs floor)':>17}" if spread else ""))
        for name, cores, _ in paths:
            rate = statistics.median(rates[name])
            worker_ms = statistics.median(worker_cpu[name]) if worker_cpu[name] else None
            line = (f"{name:<48} {rate:9.1f} {cores:6d} {rate / cores:13.1f} {statistics.median(ratios[name]):8.2f}x "
                    f"{statistics.median(cpu[name]):12.2f} {'-' if worker_ms is None else f'{worker_ms:.2f}':>8}")
            if spread:
                line += f"  {min(ratios[name]):8.2f}-{max(ratios[name]):.2f}x"
            print(line)
        waited = off_cpu_paths(paths, rates, cpu, worker_cpu)
        if waited:
            print("off the CPU for part of their time (waiting for reads, or for another process of this machine): "
                  + "; ".join(f"{name} {share:.0%}" for name, share in waited)
                  + ". Their ratios time more than the CPU's work" + ("" if args.in_memory else "; --in-memory serves the shards from memory") + ".")


def off_cpu_paths(paths: list, rates: dict[str, list[float]], cpu: dict[str, list[float]], worker_cpu: dict[str, list[float]],
                  tolerance: float = 0.05) -> list[tuple[str, float]]:
    """The one-process paths whose CPU time a clip is more than ``tolerance`` short of their
    wall time a clip, with the share of the wall time they were off the CPU: a path that waits
    (for storage, mostly) delivers fewer clips/s than its CPU work allows."""
    waited = []
    for name, cores, _ in paths:
        if cores == 1 and not worker_cpu[name]:
            wall_ms = 1e3 / statistics.median(rates[name])
            share = 1 - statistics.median(cpu[name]) / wall_ms
            if share > tolerance:
                waited.append((name, share))
    return waited

if __name__ == "__main__":
    main()
