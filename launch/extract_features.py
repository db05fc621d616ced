"""Run the frozen backbones once over frame shards and write feature shards (:mod:`fusion.features`),
so that the head, and every ablation of it, trains without them.

    python launch/extract_features.py --data data/synthetic/shards --out data/synthetic/features [--views 4]
    torchrun --nproc_per_node 8 launch/extract_features.py --config launch/configs/default.yaml \\
        --data s3://bucket/ssv2 --out s3://bucket/ssv2-features-dinov2-i3d --views 4
    python launch/train.py --data.train data/synthetic/features/train --data.val data/synthetic/features/validation

``--data`` is one frame shard folder (``manifest.json`` inside) or a root whose ``train/``,
``validation/`` and ``test/`` subfolders are; ``--out`` mirrors it. The backbones, their
weights, ``data.frames`` and ``data.crop_size`` come from ``--config`` and ``--model.* /
--data.*`` overrides, as in ``launch/train.py``; the manifest records them, and training
refuses features made by another config.

**Views.** A split whose manifest says ``train`` gets ``--views K`` views per clip: view ``v``
is the crop the training loader takes in epoch ``v`` with ``--seed`` (random frame per segment,
random resized crop, the flip if ``data.flip``), and training from features reads view
``epoch mod K``. Other splits get one view, the validation loader's centre one.

**Ranks.** Under ``torchrun``/``deepspeed`` shard ``i`` of a split goes to rank ``i mod world``,
which writes the feature shard of the same name: every clip is written exactly once. A
finished shard has a record in ``OUT/records/``; a rerun (after a kill, or with more ranks)
skips those, and rank 0 writes ``manifest.json`` once every shard has its record. Corrupt
frame samples are skipped, counted in the manifest and listed in ``OUT/skipped.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # `python launch/extract_features.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from launch import distributed  # first: sets DeepSpeed's environment before anything imports it
from fusion.backbones.weights import WeightsError
from fusion.config import ConfigError, load, render_help
from fusion.data import (MANIFEST_NAME, CorruptSample, DataEvents, Sampling, Segment, ShardSet, crop_seed_text, decode_clip,
                         init_worker, read_segment, worker_context)
from fusion.features import (FEATURES_FORMAT, MOTION_MEMBER, SEMANTIC_MEMBER, STORE_DTYPES, encode_array,
                             expected_record)
from fusion.model import FusionClassifier, build_model, resolve_dtype
from launch.train import RunConfig, default_config_path, resolve_data_url
from sharding import storage
from sharding.make_shards import RECORDS_SUBDIR, TAR_MTIME, TAR_OWNER
from sharding.shard_index import ShardDescription, describe_shard

SPLIT_FOLDERS = ("train", "validation", "test")
SKIPPED_NAME = "skipped.jsonl"


def parse_command_line(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    parser = argparse.ArgumentParser(
        prog="launch/extract_features.py",
        description="Cache the frozen backbones' features of frame shards as feature shards (see the module docstring).",
        epilog="config keys (only model.* and data.frames/crop_size/min_crop_area/flip/num_workers matter here):\n"
               + render_help(RunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--data", required=True, help="frame shard folder, or a root with train/ validation/ test/ ones")
    parser.add_argument("--out", required=True, help="where the feature shards go (folder or s3://); mirrors --data")
    parser.add_argument("--config", type=Path, help="YAML config (default: as launch/train.py)")
    parser.add_argument("--views", type=int, default=1, help="views per training clip (the crops of epochs 0..K-1)")
    parser.add_argument("--store-dtype", choices=sorted(STORE_DTYPES), default="fp16",
                        help="dtype of the stored arrays (fp16 halves the bytes; fp32 is exact)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per backbone forward pass")
    parser.add_argument("--seed", type=int, help="seed of the training views' crops and of random backbones (default train.seed)")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher; LOCAL_RANK wins")
    args, rest = parser.parse_known_args(argv)
    if args.config is None:
        args.config = default_config_path()
    cfg, unknown = load(RunConfig, args.config, rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.views < 1:
        parser.error(f"--views must be at least 1, got {args.views}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed is None:
        args.seed = cfg.train.seed
    args.data = resolve_data_url(args.data)
    return args, cfg


def find_splits(data: str, out: str) -> list[tuple[str, str]]:
    """(frame shard folder, feature shard folder) pairs: ``data`` itself, or its split folders."""
    if storage.exists(storage.join(data, MANIFEST_NAME)):
        return [(data, out)]
    pairs = [(storage.join(data, name), storage.join(out, name)) for name in SPLIT_FOLDERS
             if storage.exists(storage.join(storage.join(data, name), MANIFEST_NAME))]
    if not pairs:
        raise ConfigError(f"--data {data}: no {MANIFEST_NAME} there nor in its {', '.join(SPLIT_FOLDERS)} folders; "
                          "point it at shards written by sharding/make_shards.py")
    return pairs


@dataclasses.dataclass(frozen=True)
class Job:
    """One split's extraction: what to read, how to cut it, what the manifest will say."""

    source: ShardSet
    out: str
    cfg: RunConfig
    sampling: Sampling
    views: int
    seed: int
    store_dtype: str
    fingerprint: dict[str, Any]  # the manifest's "features" record: a rerun must match it

    @property
    def training(self) -> bool:
        return self.source.manifest.get("split") == "train"


class ClipSource(torch.utils.data.IterableDataset):
    """The clips of a rank's shards, cut as :class:`Job` says: per sample a dict with the uint8
    views ``[V, T, 3, S, S]``, then per shard one ``done`` item with what was skipped. Worker
    ``w`` of ``W`` takes every ``W``-th of the shards."""

    def __init__(self, job: Job, shards: list[str]) -> None:
        self.job, self.shards = job, shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for name in self.shards[worker::workers]:
            yield from self._shard(name)

    def _shard(self, name: str) -> Iterator[dict[str, Any]]:
        job = self.job
        events, skipped = DataEvents(announce=False), []
        views = job.views if job.training else 1
        segment = Segment(name, 0, job.source.entry(name)["num_samples"])
        for sample in read_segment(job.source, segment, job.cfg.data, events):
            key = sample["__key__"]
            try:
                clips, labels = [], []
                for view in range(views):
                    rng = random.Random(f"{crop_seed_text(job.seed, view)}:{key}") if job.training else None
                    clip, label = decode_clip(sample, job.sampling, job.cfg.data, rng, require_label=job.training,
                                              limits=job.source.limits)
                    clips.append(clip)
                    labels.append(label)
            except CorruptSample as error:
                events.count("corrupt_samples")
                skipped.append({"key": key, "shard": name, "reason": str(error)})
                continue
            yield {"shard": name, "key": key, "clips": torch.stack(clips), "labels": labels}
        counts, messages = events.take()
        yield {"shard": name, "done": True, "skipped": skipped, "errors": dict(counts), "messages": messages}


class FeatureShardWriter:
    """One feature shard, written under a temporary name and published whole."""

    def __init__(self, out: str, name: str, scratch: Path) -> None:
        from webdataset import TarWriter

        self.url = storage.join(out, name)
        folder = scratch if storage.is_s3_url(out) else Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
        os.close(handle)
        self.temp = Path(temp)
        self.writer = TarWriter(str(self.temp), encoder=False, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER)
        self.count = 0
        self.label_counts: dict[str, int] = {}

    def write(self, key: str, semantic: np.ndarray, motion: np.ndarray, labels: list[int]) -> None:
        self.writer.write({"__key__": key, SEMANTIC_MEMBER: encode_array(semantic), MOTION_MEMBER: encode_array(motion),
                           "cls": str(labels[0]).encode("ascii"), "json": json.dumps({"labels": labels}).encode()})
        self.count += 1
        self.label_counts[str(labels[0])] = self.label_counts.get(str(labels[0]), 0) + 1

    def publish(self) -> ShardDescription:
        """Close, publish; returns what the manifest records of the shard (sharding.shard_index)."""
        self.writer.close()
        description = describe_shard(self.temp)
        storage.put_file(self.temp, self.url)
        return description


def record_url(out: str, name: str) -> str:
    return storage.join(storage.join(out, RECORDS_SUBDIR), name.replace(".tar", ".json"))


def finished_shards(job: Job) -> dict[str, dict[str, Any]]:
    """Records of shards a previous run finished (and whose tar is still there, whole)."""
    remote = storage.is_s3_url(job.out)
    if not remote and not Path(job.out).is_dir():
        return {}
    sizes = storage.list_sizes(job.out)
    records_folder = storage.join(job.out, RECORDS_SUBDIR)
    names = set(storage.list_names(records_folder)) if remote or Path(records_folder).is_dir() else set()
    finished = {}
    for name in job.source.shards:
        if name.replace(".tar", ".json") not in names:
            continue
        record = json.loads(storage.read_bytes(record_url(job.out, name)))
        if record.get("features") != job.fingerprint:
            raise ConfigError(f"{job.out} holds feature shards made with another config or --views/--seed/--store-dtype "
                              f"(records/{name.replace('.tar', '.json')}): choose a new --out, or delete it to start over")
        if record["num_samples"] == 0 or sizes.get(name) == record["bytes"]:
            finished[name] = record
    return finished


@torch.no_grad()
def forward(model: FusionClassifier, clips: torch.Tensor, device: torch.device, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    semantic, motion = model.features(clips.to(device, non_blocking=True))
    return semantic.cpu().numpy().astype(dtype), motion.cpu().numpy().astype(dtype)


def extract_split(job: Job, model: FusionClassifier, ranks: distributed.Ranks, batch_size: int, scratch: Path) -> int:
    """This rank's shards of one split; returns the clips written."""
    done = finished_shards(job)
    mine = [name for index, name in enumerate(job.source.shards) if index % ranks.world_size == ranks.rank and name not in done]
    if not mine:
        return 0
    total = sum(job.source.entry(name)["num_samples"] for name in mine)
    workers = min(max(job.cfg.data.num_workers, 0), len(mine))
    loader = torch.utils.data.DataLoader(
        ClipSource(job, mine), batch_size=None, num_workers=workers, in_order=True,
        worker_init_fn=functools.partial(init_worker, dict(os.environ)) if workers else None,
        multiprocessing_context=worker_context() if workers else None,
    )
    dtype = STORE_DTYPES[job.store_dtype]
    writers: dict[str, FeatureShardWriter] = {}
    pending: list[dict[str, Any]] = []
    written = 0

    def flush() -> None:
        nonlocal written
        if not pending:
            return
        semantic, motion = forward(model, torch.cat([item["clips"] for item in pending]), ranks.device, dtype)
        row = 0
        for item in pending:
            views = len(item["clips"])
            name = item["shard"]
            if name not in writers:
                writers[name] = FeatureShardWriter(job.out, name, scratch)
            writers[name].write(item["key"], semantic[row:row + views], motion[row:row + views], item["labels"])
            row += views
        written += len(pending)
        pending.clear()

    desc = f"{job.source.manifest.get('split') or Path(job.source.url).name} features"
    with tqdm(total=total, desc=desc, unit="clip", disable=not ranks.is_main, dynamic_ncols=True) as bar:
        for item in loader:
            if not item.get("done"):
                pending.append(item)
                bar.update(1)
                if sum(len(entry["clips"]) for entry in pending) >= batch_size:
                    flush()
                continue
            flush()
            name = item["shard"]
            for message in item["messages"]:
                tqdm.write(f"warning: {message}", file=sys.stderr)
            writer = writers.pop(name, None)
            description = writer.publish() if writer is not None else ShardDescription(0, "", [], [])
            record = {"name": name, "num_samples": writer.count if writer else 0, "bytes": description.bytes,
                      "sha256": description.sha256, **description.index_fields(),
                      "label_counts": writer.label_counts if writer else {},
                      "skipped": item["skipped"], "errors": item["errors"], "features": job.fingerprint}
            storage.write_bytes(record_url(job.out, name), json.dumps(record, indent=1).encode())
            bar.update(len(item["skipped"]))
    return written


def write_manifest(job: Job) -> dict[str, Any]:
    """``manifest.json`` and ``skipped.jsonl`` from every shard's record (rank 0, after all)."""
    records = []
    for name in job.source.shards:
        url = record_url(job.out, name)
        if not storage.exists(url):
            raise RuntimeError(f"shard {name} of {job.source.url} has no feature record at {url}: a rank failed; "
                               "run the same command again to finish it")
        records.append(json.loads(storage.read_bytes(url)))
    skipped = [entry for record in records for entry in record["skipped"]]
    label_counts: dict[str, int] = {}
    for record in records:
        for label, count in record["label_counts"].items():
            label_counts[label] = label_counts.get(label, 0) + count
    storage.write_bytes(storage.join(job.out, SKIPPED_NAME), "".join(json.dumps(e) + "\n" for e in skipped).encode())
    source = job.source.manifest
    manifest = {
        "format": FEATURES_FORMAT,
        "split": source.get("split"),
        "frames": job.sampling.frames,
        "templates": source.get("templates"),
        "num_samples": sum(record["num_samples"] for record in records),
        "num_skipped": len(skipped),
        "label_counts": label_counts,
        "shards": [{"name": r["name"], "num_samples": r["num_samples"], "bytes": r["bytes"], "sha256": r["sha256"],
                    **{key: r[key] for key in ("offsets", "crc32c") if r.get(key)}}
                   for r in records if r["num_samples"]],
        "features": job.fingerprint,
        "source": {"url": job.source.url, "frames": source.get("frames"), "short_side": source.get("short_side"),
                   "jpeg_quality": source.get("jpeg_quality"), "upscale": bool((source.get("args") or {}).get("upscale")),
                   "num_samples": job.source.num_samples, "num_rejected": source.get("num_rejected", 0)},
    }
    storage.write_bytes(storage.join(job.out, MANIFEST_NAME), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def make_job(source: ShardSet, out: str, cfg: RunConfig, args: argparse.Namespace, model: FusionClassifier,
             device: torch.device) -> Job:
    sampling = Sampling.of(cfg.data, source)
    training = source.manifest.get("split") == "train"
    with torch.no_grad():  # the arrays' shapes, from one blank clip
        probe = torch.zeros((1, sampling.frames, 3, cfg.data.crop_size, cfg.data.crop_size), dtype=torch.uint8, device=device)
        semantic, motion = model.features(probe)
    fingerprint = {
        **expected_record(cfg.model, sampling.frames, cfg.data.crop_size, semantic.shape[-1], motion.shape[-1], args.seed),
        "views": args.views if training else 1,
        "view_policy": "training crops of epochs 0..views-1" if training else "the centre view",
        "min_crop_area": cfg.data.min_crop_area if training else None,
        "flip": cfg.data.flip if training else False,
        "seed": args.seed,
        "dtype": args.store_dtype,
        "backbone_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[resolve_dtype(cfg.model.dtype, device)],
        "semantic_shape": list(semantic.shape[1:]),
        "motion_shape": list(motion.shape[1:]),
    }
    return Job(source, out, cfg, sampling, args.views, args.seed, args.store_dtype, fingerprint)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_command_line(argv)
    ranks = distributed.init_distributed(args.local_rank)
    say = print if ranks.is_main else (lambda *a, **k: None)
    started = time.monotonic()
    try:
        pairs = find_splits(args.data, args.out)
        sources = [(ShardSet.open(data), out) for data, out in pairs]
        for source, _ in sources:
            if source.is_features:
                raise ConfigError(f"--data {source.url} already holds features; point it at frame shards")
            if cfg.data.flip and source.manifest.get("split") == "train":
                source.check_flip_labels()
        model = build_model(cfg.model, ranks.device, seed=args.seed)
        jobs = [make_job(source, out, cfg, args, model, ranks.device) for source, out in sources]
        for job in jobs:
            finished_shards(job)  # refuses an --out that holds features made otherwise, before any work
    except (ConfigError, WeightsError, FileNotFoundError, ValueError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        distributed.shutdown()
        return 2
    say(f"{ranks.world_size} rank(s) on {ranks.device.type}; backbones {cfg.model.semantic.name} + {cfg.model.motion.name} "
        f"({cfg.model.size}), {jobs[0].sampling.frames} frames at {cfg.data.crop_size} px, stored as {args.store_dtype}")
    written = 0
    with tempfile.TemporaryDirectory(prefix="features-") as scratch:
        for job in jobs:
            written += extract_split(job, model, ranks, args.batch_size, Path(scratch))
            distributed.barrier()
            if ranks.is_main:
                manifest = write_manifest(job)
                views = job.fingerprint["views"]
                say(f"{job.out}: {manifest['num_samples']} clips x {views} view(s) in {len(manifest['shards'])} shards"
                    + (f", {manifest['num_skipped']} skipped (see {SKIPPED_NAME})" if manifest["num_skipped"] else ""))
            distributed.barrier()
    say(f"done in {time.monotonic() - started:.1f} s ({written} clips on rank 0)")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
