"""Does the fusion head learn the synthetic motion classes, and does motion help?

    python launch/learning_check.py [--config launch/configs/debug.yaml] [--data.train URL --data.val URL]
        [--variants xattn semantic_only motion_only] [--views 2] [--epochs 250] [--seeds 0 1] [--json FILE]

The demo's dataset (20 clips a class) is too small for the check to pass; what passed here
(2-core CPU, random debug backbones; 83 s to generate and shard, 31 s to cache the features, about
9 min to train the three variants with two seeds each):

    python -m sharding.synthetic --out data/learning/raw --train-per-class 60 --val-per-class 10 --test 0
    for s in train validation; do python sharding/make_shards.py --root data/learning/raw --split $s --out data/learning/shards/$s; done
    python launch/learning_check.py --data.train data/learning/shards/train --data.val data/learning/shards/validation \
        --variants xattn semantic_only motion_only

The frozen backbones are deterministic, so their features are computed once and cached in
memory: ``--views`` randomly cropped passes over the training shards (the training loader's
augmentation, one epoch each) and one centre-cropped pass over the validation shards. Then a
fresh head of each ``--variants`` fusion trains on the cached features (AdamW, warmup +
cosine, the same recipe for all) and is scored on validation. What this checks is the head
and the features the pipeline feeds it, at a cost a CPU can afford (minutes per variant
instead of hours of end-to-end training); ``launch/train.py`` trains the same head the same
way, only from the loader.

It exits non-zero unless the first variant (the model, ``xattn``) reaches at least 3x chance
top-1 (chance = 1 / the classes present in validation) and beats ``semantic_only``, for the
mean over ``--seeds``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python launch/learning_check.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fusion.config import ConfigError, load
from fusion.data import ShardSet, train_loader, val_loader
from fusion.heads import FusionHead
from fusion.model import build_model
from launch.train import CONFIGS, RunConfig, resolve_data_url, topk_correct

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # semantic [N,T,Ds], motion [N,T',Dm], labels [N]


@torch.no_grad()
def extract(model, batches, total: int, desc: str) -> Features:
    semantic, motion, labels = [], [], []
    for batch in tqdm(batches, total=total, desc=desc, leave=False):
        s, m = model.features(batch["clips"])
        semantic.append(s)
        motion.append(m)
        labels.append(batch["labels"])
    return torch.cat(semantic), torch.cat(motion), torch.cat(labels)


def cache_features(cfg: RunConfig, views: int, batch_size: int = 8) -> tuple[Features, Features, int, int]:
    """Training features of ``views`` augmented epochs, validation features, and the two widths."""
    model = build_model(cfg.model)
    train_set, val_set = ShardSet.open(cfg.data.train), ShardSet.open(cfg.data.val)
    parts = []
    for view in range(views):
        loader = train_loader(cfg.data, train_set, batch_size=batch_size, rank=0, world_size=1, epoch=view, seed=cfg.train.seed)
        parts.append(extract(model, loader, len(loader), f"train view {view + 1}/{views}"))
    train = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
    loader = val_loader(cfg.data, val_set, batch_size=batch_size, rank=0, world_size=1)
    val = extract(model, loader, len(loader), "validation")
    keep = val[2] >= 0
    val = tuple(t[keep] for t in val)
    return train, val, model.backbones.semantic.out_dim, model.backbones.motion.out_dim


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at ``step``: linear warmup, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_head(cfg: RunConfig, fusion: str, dims: tuple[int, int], train: Features, val: Features, *, epochs: int, seed: int,
               lr: float, batch_size: int = 32) -> dict[str, float]:
    torch.manual_seed(seed)
    head = FusionHead(dataclasses.replace(cfg.model, fusion=fusion), semantic_dim=dims[0], motion_dim=dims[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(train[2]) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps, steps // 10))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        head.train()
        for index in torch.randperm(len(train[2]), generator=generator).split(batch_size):
            loss = F.cross_entropy(head(train[0][index], train[1][index]), train[2][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    head.eval()
    with torch.no_grad():
        top1, top5 = topk_correct(head(val[0], val[1]), val[2])
        fit_top1 = topk_correct(head(train[0], train[1]), train[2], ks=(1,))[0]
    return {"top1": top1.item() / len(val[2]), "top5": top5.item() / len(val[2]), "train_top1": fit_top1.item() / len(train[2])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=CONFIGS / "debug.yaml")
    parser.add_argument("--variants", nargs="+", default=["xattn", "semantic_only"], help="fusion variants; the first is the one checked")
    parser.add_argument("--views", type=int, default=2, help="augmented passes over the training set to cache")
    parser.add_argument("--epochs", type=int, default=250, help="epochs over the cached training features")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cache", type=Path, help="keep the cached features in this file (reused when it exists)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, unknown = load(RunConfig, args.config, rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=resolve_data_url(cfg.data.train), val=resolve_data_url(cfg.data.val)))
        start = time.perf_counter()
        if args.cache and args.cache.is_file():
            train, val, *dims = torch.load(args.cache, weights_only=True)
        else:
            train, val, *dims = cache_features(cfg, args.views)
            if args.cache:
                torch.save((train, val, *dims), args.cache)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"launch/learning_check.py: error: {error}", file=sys.stderr)
        return 2
    classes = len(val[2].unique())
    chance = 1.0 / classes
    print(f"cached {len(train[2])} training views and {len(val[2])} validation clips ({classes} classes, chance {chance:.3f}) "
          f"in {time.perf_counter() - start:.0f} s")
    results = {}
    for fusion in args.variants:
        runs = [train_head(cfg, fusion, tuple(dims), train, val, epochs=args.epochs, seed=seed, lr=args.lr) for seed in args.seeds]
        results[fusion] = {key: sum(r[key] for r in runs) / len(runs) for key in ("top1", "top5", "train_top1")}
        results[fusion]["top1_per_seed"] = [r["top1"] for r in runs]
        print(f"{fusion:>14}: val top-1 {results[fusion]['top1']:.3f} ({results[fusion]['top1'] / chance:.1f}x chance), "
              f"top-5 {results[fusion]['top5']:.3f}, train top-1 {results[fusion]['train_top1']:.3f}; per seed {', '.join(f'{r:.3f}' for r in results[fusion]['top1_per_seed'])}")
    model, top1 = args.variants[0], results[args.variants[0]]["top1"]
    checks = {f"{model} >= 3x chance": top1 >= 3 * chance}
    if "semantic_only" in results and model != "semantic_only":
        checks[f"{model} > semantic_only"] = top1 > results["semantic_only"]["top1"]
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    if args.json:
        args.json.write_text(json.dumps({"chance": chance, "classes": classes, "train_views": len(train[2]), "val_clips": len(val[2]),
                                         "args": {k: str(v) for k, v in vars(args).items()}, "results": results, "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
