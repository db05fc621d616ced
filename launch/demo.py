"""The embedded default, end to end: ``make demo`` runs this.

1. generate a small synthetic SSv2 (real on-disk format, motion-decided classes) under
   ``data/synthetic/raw`` with :mod:`sharding.synthetic`;
2. pack its train and validation splits into shards under ``data/synthetic/shards`` with
   ``sharding/make_shards.py`` (exactly what a user runs on real SSv2);
3. train the debug-size fusion model on them with ``launch/train.py --deepspeed ds.json``
   (DeepSpeed on CPU when there is no GPU), validating every epoch;
4. evaluate it with ``launch/evaluate.py`` (SSv2's 2 temporal x 3 spatial views, attention
   pictures of the most confidently right and wrong clips);
5. print where the results and pictures are.

Every step is resumable: a rerun reuses the generated videos and the complete shards.
Extra arguments are passed to ``launch/train.py`` (e.g. ``make demo ARGS="--train.epochs 2"``).
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


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="where the synthetic dataset and shards go")
    parser.add_argument("--out", default="runs/demo", help="where training writes checkpoints and logs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    args, train_args = parser.parse_known_args(argv)

    start = time.time()
    data = REPO / args.data
    raw, shards = data / "raw", data / "shards"
    py = sys.executable
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if not (raw / "labels" / "labels.json").is_file():
        run([py, "-m", "sharding.synthetic", "--out", str(raw), "--seed", str(args.seed)])
    else:
        print(f"reusing the synthetic dataset in {raw}")
    for split in ("train", "validation"):
        run([py, "sharding/make_shards.py", "--root", str(raw), "--split", split, "--out", str(shards / split)])
    run(
        [py, "launch/train.py", "--deepspeed", "ds.json", "--config", "launch/configs/debug.yaml",
         "--data.train", str(shards / "train"), "--data.val", str(shards / "validation"),
         "--out", args.out, "--resume", *train_args]  # a rerun continues (or just reports) the last one
    )

    out = REPO / args.out
    evaluation = out / "evaluation"
    run([py, "launch/evaluate.py", "--checkpoint", args.out, "--data.val", str(shards / "validation"), "--out", str(evaluation),
         "--temporal-views", "2", "--spatial-crops", "3", "--attention", "4"])
    metrics = out / "metrics.jsonl"
    last_val = None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "val_top1" in record:
                last_val = record
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    if last_val:
        print(f"last validation: top-1 {last_val['val_top1']:.3f}, top-5 {last_val.get('val_top5', float('nan')):.3f}")
    print(f"shards:      {shards}")
    print(f"metrics:     {metrics}")
    print(f"tensorboard: tensorboard --logdir {out}")
    print(f"checkpoints: {out / 'checkpoints'}")
    print(f"curves:      {out / 'curves.png'}")
    print(f"evaluation:  {evaluation / 'report.json'} (2x3 views), pictures: {evaluation}/*.png, {evaluation / 'attention'}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
