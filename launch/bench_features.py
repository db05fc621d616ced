"""What caching the frozen backbones' features buys: one epoch of head training from feature
shards against the same epoch from frame shards with live backbones, same clips, same crops,
same machine, one run. Figures are ratios, not asserts.

    python -m launch.bench_features [--shards DIR] [--clips 96] [--config launch/configs/debug.yaml] [--json FILE]

- **debug size, measured**: both epochs are timed end to end in this process (loader with no
  worker processes, forward, backward, AdamW step), so the ratio is the whole saving;
- **full size, from measured per-clip costs**: the full DINOv2 ViT-S/14 + I3D R50 forward of
  one clip (random weights), the full head's training step per clip, reading and decoding a
  clip's frames at 224 px and reading a clip's features, each timed here; their ratio is what
  an epoch would gain at full size on this machine. FLOPs per clip from
  ``torch.utils.flop_counter`` give the same comparison independent of the machine;
- **bytes per clip** of frame shards against feature shards (fp16, per view; the full-size
  figure from the full model's feature shapes).

Without ``--shards`` it generates a synthetic SSv2 set and packs it (flat synthetic frames
decode ~3x faster than real SSv2 ones, which makes the live epoch cheaper than it would be on
real data: the ratios here are lower bounds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fusion.backbones.weights import RandomWeightsWarning
from fusion.config import load
from fusion.data import ShardSet, train_loader
from fusion.model import build_model
from launch.train import CONFIGS, RunConfig

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_features", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shards", help="frame shards root with train/ (default: generate a synthetic set)")
    parser.add_argument("--clips", type=int, default=96, help="clips of the generated set (default 96)")
    parser.add_argument("--config", type=Path, default=CONFIGS / "debug.yaml", help="the model timed end to end")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def epoch_seconds(cfg: RunConfig, shards: ShardSet, batch_size: int, train_head: bool = True) -> tuple[float, int]:
    """One training epoch (epoch 0, seed 0) of a fresh head; (seconds, clips)."""
    model = build_model(cfg.model, seed=0, frozen_on_meta=shards.is_features)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    loader = train_loader(cfg.data, shards, batch_size=batch_size, rank=0, world_size=1, epoch=0, seed=0)
    clips, started = 0, time.perf_counter()
    for batch in loader:
        if "semantic" in batch:
            semantic, motion = batch["semantic"], batch["motion"]
        else:
            semantic, motion = model.features(batch["clips"])
        if train_head:
            loss = F.cross_entropy(model.head(semantic, motion), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        clips += len(batch["labels"])
    return time.perf_counter() - started, clips


def loader_seconds_per_clip(cfg: RunConfig, shards: ShardSet, batch_size: int) -> float:
    loader = train_loader(cfg.data, shards, batch_size=batch_size, rank=0, world_size=1, epoch=0, seed=0)
    clips, started = 0, time.perf_counter()
    for batch in loader:
        clips += len(batch["labels"])
    return (time.perf_counter() - started) / clips


def full_size_costs(batch: int = 2) -> dict[str, Any]:
    """Per-clip seconds and FLOPs of the full model's frozen forward and head step (random weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, _ = load(RunConfig, CONFIGS / "default.yaml", [])
    model = build_model(cfg.model, seed=0)
    clips = torch.randint(0, 256, (batch, cfg.data.frames, 3, cfg.data.crop_size, cfg.data.crop_size), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        semantic, motion = model.features(clips)
    backbone_flops = counter.get_total_flops() / batch
    model.features(clips)  # warm
    started = time.perf_counter()
    semantic, motion = model.features(clips)
    backbone_s = (time.perf_counter() - started) / batch
    head_batch = 8
    semantic, motion = semantic[:1].expand(head_batch, -1, -1).contiguous(), motion[:1].expand(head_batch, -1, -1).contiguous()
    labels = torch.zeros(head_batch, dtype=torch.int64)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(model.head(semantic, motion), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    head_flops = counter.get_total_flops() / head_batch
    started = time.perf_counter()
    for _ in range(5):
        step()
    head_s = (time.perf_counter() - started) / (5 * head_batch)
    feature_bytes = 2 * (semantic.shape[1] * semantic.shape[2] + motion.shape[1] * motion.shape[2])  # fp16, one view
    return {"backbone_s_per_clip": backbone_s, "head_step_s_per_clip": head_s, "backbone_gflops_per_clip": backbone_flops / 1e9,
            "head_step_gflops_per_clip": head_flops / 1e9, "feature_bytes_per_clip_fp16": feature_bytes,
            "semantic_shape": list(semantic.shape[1:]), "motion_shape": list(motion.shape[1:])}


def shard_bytes_per_clip(shards: ShardSet) -> float:
    return sum(int(entry.get("bytes") or 0) for entry in shards.manifest["shards"]) / shards.num_samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=RandomWeightsWarning)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_features-") as scratch:
        if args.shards:
            frames_root = Path(args.shards)
        else:
            from launch.bench_loader import synthetic_shards

            frames_root = Path(synthetic_shards(Path(scratch), args.clips)).parent
        cfg, _ = load(RunConfig, args.config, ["--data.num_workers", "0"])
        features_root = Path(scratch) / "features"
        started = time.perf_counter()
        subprocess.run([sys.executable, "launch/extract_features.py", "--config", str(args.config), "--data",
                        str(frames_root / "train"), "--out", str(features_root / "train"), "--data.num_workers", "0"],
                       cwd=REPO, check=True, capture_output=True)
        extract_s = time.perf_counter() - started
        frames, features = ShardSet.open(str(frames_root / "train")), ShardSet.open(str(features_root / "train"))

        live_s, live_clips = epoch_seconds(cfg, frames, args.batch_size)
        cached_s, cached_clips = epoch_seconds(cfg, features, args.batch_size)
        full_cfg, _ = load(RunConfig, CONFIGS / "default.yaml", ["--data.num_workers", "0"])
        decode_224 = loader_seconds_per_clip(full_cfg, frames, args.batch_size)
        read_features = loader_seconds_per_clip(cfg, features, args.batch_size)
        full = full_size_costs()
    live_full = decode_224 + full["backbone_s_per_clip"] + full["head_step_s_per_clip"]
    cached_full = read_features + full["head_step_s_per_clip"]
    results = {
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "clips": live_clips,
        "debug": {"live_epoch_s": live_s, "features_epoch_s": cached_s, "ratio": live_s / cached_s,
                  "live_clips_per_s": live_clips / live_s, "features_clips_per_s": cached_clips / cached_s,
                  "extraction_s": extract_s},
        "full_size": {**full, "decode_224_s_per_clip": decode_224, "read_features_s_per_clip": read_features,
                      "live_s_per_clip": live_full, "features_s_per_clip": cached_full, "ratio": live_full / cached_full,
                      "flops_ratio": (full["backbone_gflops_per_clip"] + full["head_step_gflops_per_clip"])
                      / full["head_step_gflops_per_clip"]},
        "bytes_per_clip": {"frame_shards": shard_bytes_per_clip(frames), "feature_shards_debug_fp16": shard_bytes_per_clip(features),
                           "feature_full_size_fp16_per_view": full["feature_bytes_per_clip_fp16"]},
    }
    d, f, b = results["debug"], results["full_size"], results["bytes_per_clip"]
    print(f"{results['machine']}; {live_clips} clips, one epoch each")
    print(f"debug model, measured:  live backbones {d['live_epoch_s']:.1f} s ({d['live_clips_per_s']:.1f} clips/s), "
          f"features {d['features_epoch_s']:.2f} s ({d['features_clips_per_s']:.0f} clips/s): {d['ratio']:.1f}x "
          f"(one-off extraction {d['extraction_s']:.1f} s)")
    print(f"full size, per clip:    decode 224 px {1e3 * f['decode_224_s_per_clip']:.0f} ms + backbones "
          f"{1e3 * f['backbone_s_per_clip']:.0f} ms + head step {1e3 * f['head_step_s_per_clip']:.1f} ms = "
          f"{1e3 * f['live_s_per_clip']:.0f} ms live, against read features {1e3 * f['read_features_s_per_clip']:.1f} ms + head "
          f"step = {1e3 * f['features_s_per_clip']:.1f} ms: {f['ratio']:.0f}x")
    print(f"full size, FLOPs:       backbones {f['backbone_gflops_per_clip']:.0f} GFLOP + head step "
          f"{f['head_step_gflops_per_clip']:.2f} GFLOP per clip: {f['flops_ratio']:.0f}x")
    print(f"bytes per clip:         frame shards {b['frame_shards'] / 1e3:.0f} KB, debug features "
          f"{b['feature_shards_debug_fp16'] / 1e3:.1f} KB, full-size features {b['feature_full_size_fp16_per_view'] / 1e3:.1f} KB "
          f"a view (fp16)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
