"""Training step time with the real loader against the same steps fed from memory.

    python launch/bench_train.py [--steps 30] [--warmup 3] [train.py's arguments: --config, --deepspeed, --data.*, --model.* ...]
    torchrun --nproc_per_node 2 launch/bench_train.py ...   (every rank measures; rank 0 prints)

Both passes run the real training step (frozen backbones, DeepSpeed head, optimizer step)
from the same set-up as ``launch/train.py``. The first pass pulls batches from the streaming
loader; the second replays batches already in memory, so their difference is what the data
path costs the training loop. The ratio (real / memory) is the figure: 1.0 means the loader
keeps up. Checkpoints and logs go to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # `python launch/bench_train.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fusion.config import ConfigError
from launch import distributed, train


def loader_batches(run: train.Run) -> Iterator[dict[str, Any]]:
    """Training batches of this rank, epoch after epoch."""
    for epoch in itertools.count():
        yield from train.train_loader(run.cfg.data, run.train_set, batch_size=run.plan.micro, rank=run.ranks.rank,
                                      world_size=run.ranks.world_size, epoch=epoch, seed=run.cfg.train.seed, device=run.ranks.device)


def timed_steps(run: train.Run, batches: Iterator[dict[str, Any]], steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per micro-step, seconds of it spent waiting for a batch) over ``steps`` after ``warmup``."""
    busy = waiting = 0.0
    for index in range(warmup + steps):
        distributed.barrier()  # ranks start each step together: a slow rank shows in every rank's time
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        train.train_micro_batch(run, batch, train.step_seed(0, run.ranks.rank, 0, index))
        if run.ranks.device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            busy += time.perf_counter() - start
            waiting += fetched - start
    return busy / steps, waiting / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=30, help="measured micro-steps per pass")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured micro-steps first (worker start, allocator)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        train_args, cfg = train.parse_command_line([*rest, "--out", str(out)])
        run, _ = train.setup(train_args, cfg)
        stream = loader_batches(run)
        real, real_wait = timed_steps(run, stream, args.steps, args.warmup)
        stream.close()  # its workers must not compete with the memory pass for the cores
        # the batches the memory pass replays, decoded once; cycled if there are fewer than the steps
        stream = loader_batches(run)
        cached = list(itertools.islice(stream, min(args.steps + args.warmup, 64)))
        stream.close()
        memory, _ = timed_steps(run, itertools.cycle(cached), args.steps, args.warmup)
        clips = run.plan.micro * run.ranks.world_size
        run.log(
            f"\n{run.ranks.world_size} rank(s) x {run.plan.micro} clips, {args.steps} steps, {cfg.data.num_workers} loader worker(s) per rank:\n"
            f"  real loader : {1000 * real:8.1f} ms/step  {clips / real:8.1f} clips/s  (waiting for data {100 * real_wait / real:.0f}%)\n"
            f"  from memory : {1000 * memory:8.1f} ms/step  {clips / memory:8.1f} clips/s\n"
            f"  ratio real/memory: {real / memory:.2f}"
        )
    except ConfigError as error:
        print(f"launch/bench_train.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
