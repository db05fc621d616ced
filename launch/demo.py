"""The embedded default, end to end: ``make demo`` runs this.

1. generate a small synthetic SSv2 (real on-disk format; classes decided by motion, and some by
   motion and appearance together) under ``data/synthetic/raw`` with :mod:`sharding.synthetic`;
2. pack its train and validation splits into shards under ``data/synthetic/shards`` with
   ``sharding/make_shards.py`` (exactly what a user runs on real SSv2);
3. run a small ablation with ``launch/ablate.py``: it caches the debug backbones' features once
   (``launch/extract_features.py``, several augmented views per training clip) and trains the
   fusion head (the model) and the two single-stream baselines from them with
   ``launch/train.py --deepspeed ds.json``, validating every epoch;
4. evaluate the model's head on the frame shards with ``launch/evaluate.py`` (live backbones,
   SSv2's 2 temporal x 3 spatial views, attention pictures of the most confidently right and
   wrong clips);
5. print the ablation table and where the learning curves and pictures are.

Every step is resumable: a rerun reuses the generated videos, the complete shards, the cached
features and every finished run. Extra ``--section.key`` arguments go to every training run
(e.g. ``make demo ARGS="--train.epochs 5"``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_VARIANTS = ("semantic_only", "motion_only")


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def demo_ds_config(out: Path, micro_batch: int) -> Path:
    """The repo's ds.json with the demo's micro batch (few clips, many epochs: fewer, larger steps)."""
    config = json.loads((REPO / "ds.json").read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ds.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="where the synthetic dataset, shards and features go")
    parser.add_argument("--out", default="runs/demo", help="where the ablation's runs, table and evaluation go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--train-per-class", type=int, default=80, help="training clips per class")
    parser.add_argument("--val-per-class", type=int, default=10, help="validation clips per class")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of each training run (from cached features)")
    parser.add_argument("--views", type=int, default=4, help="augmented views cached per training clip")
    parser.add_argument("--micro-batch", type=int, default=32, help="clips per training step")
    args, train_args = parser.parse_known_args(argv)

    start = time.time()
    data = REPO / args.data
    raw, shards, features = data / "raw", data / "shards", data / "features"
    out = REPO / args.out
    py = sys.executable
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if not (raw / "labels" / "labels.json").is_file():
        run([py, "-m", "sharding.synthetic", "--out", str(raw), "--seed", str(args.seed),
             "--train-per-class", str(args.train_per_class), "--val-per-class", str(args.val_per_class), "--test", "0"])
    else:
        print(f"reusing the synthetic dataset in {raw}")
    for split in ("train", "validation"):
        run([py, "sharding/make_shards.py", "--root", str(raw), "--split", split, "--out", str(shards / split)])
    run([py, "launch/ablate.py", "--config", "launch/configs/debug.yaml", "--data", str(shards), "--features", str(features),
         "--out", str(out), "--variants", *DEMO_VARIANTS, "--seeds", "0", "--epochs", str(args.epochs), "--views", str(args.views),
         # features of a few hundred clips load faster in the training process than through workers
         "--deepspeed", str(demo_ds_config(out, args.micro_batch)), "--data.num_workers", "0", *train_args])

    model_run = out / "runs" / "model" / "seed0"
    evaluation = out / "evaluation"
    run([py, "launch/evaluate.py", "--checkpoint", str(model_run), "--data.val", str(shards / "validation"),
         "--out", str(evaluation), "--temporal-views", "2", "--spatial-crops", "3", "--attention", "4"])
    report = json.loads((evaluation / "report.json").read_text())
    print(f"\ndemo finished in {time.time() - start:.0f} s\n")
    print((out / "ablation.md").read_text())
    top1, top5 = report.get("top1"), report.get("top5")
    if top1 is not None:
        print(f"the model, 2x3-view evaluation on the frame shards (live backbones): top-1 {top1:.3f}, top-5 {top5:.3f}")
    print(f"ablation:    {out / 'ablation.md'}, {out / 'ablation.png'}")
    print(f"curves:      {model_run / 'curves.png'} (each run has its own; metrics.jsonl, TensorBoard events beside it)")
    print(f"evaluation:  {evaluation / 'report.json'} (2x3 views), pictures: {evaluation}/*.png, {evaluation / 'attention'}/")
    print(f"features:    {features} (frame shards: {shards})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
