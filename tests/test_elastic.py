"""Resuming an epoch with another layout (fusion.data.Stint): a run stopped on 2 ranks x 2
workers continues on 1 rank x 1 worker, or on 2 ranks x 3 workers, or changes twice; the
epoch's clips are each trained once, and nothing the stopped run trained is read again.

Real loaders, real worker processes, indexed shards (ranged reads) on a local folder.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from fusion.data import DataConfig, ShardSet, Stint, batches_per_rank, epoch_positions, epoch_shard_order, train_loader
from sharding.shard_index import index_manifest
from tests.test_data import write_shards
from tests.test_train import REPO, run_env

WINDOW = 3
EPOCH, SEED = 1, 7


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[ShardSet, list[str]]:
    """50 samples in unequal shards with offsets: 2 x 2 = 4 a global batch leaves a tail of 2."""
    folder = tmp_path_factory.mktemp("elastic")
    keys = write_shards(folder, [9, 7, 12, 5, 11, 6])
    index_manifest(str(folder), progress=False)
    return ShardSet.open(str(folder)), keys


def run_keys(shardset: ShardSet, *, world_size: int, workers: int, batch_size: int, stints=(), batches: int | None = None
             ) -> tuple[list[str], list[Counter]]:
    """The keys every rank trains (its first ``batches``, or all), and each rank's read counters."""
    cfg = DataConfig(num_workers=workers, crop_size=16, shuffle_window=WINDOW)
    keys, reads = [], []
    for rank in range(world_size):
        loader = train_loader(cfg, shardset, batch_size=batch_size, rank=rank, world_size=world_size, epoch=EPOCH, seed=SEED,
                              stints=tuple(stints))
        stream = iter(loader)
        taken = 0
        try:
            for batch in stream:
                assert len(batch["keys"]) == batch_size
                keys += batch["keys"]
                taken += 1
                if taken == batches:
                    break
        finally:
            if hasattr(stream, "close"):
                stream.close()
        reads.append(Counter({key: loader.stats[key] for key in ("samples_read", "corrupt_samples", "refilled_samples")}))
    return keys, reads


def test_a_stopped_epoch_resumes_on_fewer_and_on_more_ranks_and_workers(indexed, no_hang):
    shardset, all_keys = indexed
    done = 5  # batches every rank of the first run finished before it stopped
    first, _ = run_keys(shardset, world_size=2, workers=2, batch_size=2, batches=done)
    assert len(first) == len(set(first)) == 2 * 2 * done
    stint = Stint(world_size=2, lanes=2, batch_size=2, shuffle_window=WINDOW, batches=done)
    for world_size, workers, batch_size in ((1, 1, 4), (2, 3, 2), (1, 0, 2)):
        rest, reads = run_keys(shardset, world_size=world_size, workers=workers, batch_size=batch_size, stints=[stint])
        # each clip at most once over the two runs, and all but the tail that fills no batch
        assert not set(rest) & set(first) and len(rest) == len(set(rest))
        covered = set(first) | set(rest)
        left = len(all_keys) - len(first)
        assert len(rest) == left - left % (world_size * batch_size)
        assert len(covered) == len(all_keys) - left % (world_size * batch_size)
        # nothing of the first run's clips is read again: every sample read is one trained
        assert sum(r["samples_read"] for r in reads) == len(rest)
        assert all(r["corrupt_samples"] == r["refilled_samples"] == 0 for r in reads)


def test_the_consumed_set_is_what_the_stopped_run_trained(indexed, no_hang):
    """The plan alone says which positions a run's first k batches took: the same keys the
    loaders gave, for several layouts."""
    shardset, all_keys = indexed
    by_shard, first = [], 0
    for size in shardset.shard_sizes:
        by_shard.append(all_keys[first:first + size])
        first += size
    sequence = [key for index in epoch_shard_order(shardset, SEED, EPOCH) for key in by_shard[index]]
    for world_size, workers, done in ((2, 2, 3), (3, 2, 2), (1, 3, 7), (2, 0, 4)):
        trained, _ = run_keys(shardset, world_size=world_size, workers=workers, batch_size=2, batches=done)
        stint = Stint(world_size=world_size, lanes=max(1, workers), batch_size=2, shuffle_window=WINDOW, batches=done)
        left = epoch_positions(shardset, seed=SEED, epoch=EPOCH, stints=(stint,))
        assert {sequence[p] for p in range(len(sequence)) if p not in set(left)} == set(trained)
        assert left == sorted(left)  # the rest keeps the epoch's order


def test_layout_changes_twice_in_one_epoch(indexed, no_hang):
    shardset, all_keys = indexed
    first, _ = run_keys(shardset, world_size=2, workers=2, batch_size=2, batches=4)
    stints = [Stint(2, 2, 2, WINDOW, 4)]
    second, _ = run_keys(shardset, world_size=1, workers=1, batch_size=4, stints=stints, batches=3)
    stints.append(Stint(1, 1, 4, WINDOW, 3))
    third, reads = run_keys(shardset, world_size=2, workers=3, batch_size=2, stints=stints)
    trained = first + second + third
    assert len(trained) == len(set(trained))
    assert len(trained) == len(all_keys) - (len(all_keys) - 16 - 12) % 4
    assert sum(r["samples_read"] for r in reads) == len(third)


def test_a_resume_in_the_new_layout_skips_into_the_replanned_rest(indexed, no_hang):
    """Stopped again after the layout change, resumed with the same new layout: the usual
    skip_batches path, on the replanned rest, gives the uninterrupted run's batches."""
    shardset, _ = indexed
    stints = (Stint(2, 2, 2, WINDOW, 5),)
    cfg = DataConfig(num_workers=2, crop_size=16, shuffle_window=WINDOW)
    whole = [b["keys"] for b in train_loader(cfg, shardset, batch_size=2, rank=1, world_size=3, epoch=EPOCH, seed=SEED,
                                             stints=stints)]
    resumed = [b["keys"] for b in train_loader(cfg, shardset, batch_size=2, rank=1, world_size=3, epoch=EPOCH, seed=SEED,
                                               stints=stints, skip_batches=2)]
    assert resumed == whole[2:] and len(whole) == batches_per_rank(50 - 20, 2, 3)


def test_a_stint_that_is_not_possible_is_refused(indexed):
    shardset, _ = indexed
    with pytest.raises(ValueError, match="stint 0: 99 batches done"):
        epoch_positions(shardset, seed=SEED, epoch=EPOCH, stints=(Stint(2, 2, 2, WINDOW, 99),))


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_training_stopped_on_2x2_resumes_on_1x1_and_on_2x3_and_trains_the_epoch_once(tmp_path):
    """The issue's acceptance, with launch/train.py under torchrun (real DeepSpeed ZeRO-2,
    gloo): 40 clips, global batch 4, stopped after 4 of the epoch's 10 steps on 2 ranks x 2
    workers, resumed on 1 rank x 1 worker (micro-batch 4) and on 2 ranks x 3 workers; from the
    clip ids every rank logs, epoch 0 trains each clip exactly once."""
    import json
    import shutil

    from tests.test_train import metrics, small_ds_json, torchrun, train

    train_keys = write_shards(tmp_path / "train", [9, 7, 12, 5, 7])
    index_manifest(str(tmp_path / "train"), progress=False)
    write_shards(tmp_path / "val", [4])
    args = ["--config", "launch/configs/debug.yaml", "--data.crop_size", "56", "--model.semantic.img_size", "56",
            "--data.frames", "4", "--data.shuffle_window", "5", "--train.log_every", "1", "--train.record_samples", "true",
            "--train.epochs", "2", "--data.train", str(tmp_path / "train"), "--data.val", str(tmp_path / "val")]
    (tmp_path / "ds2").mkdir()
    (tmp_path / "ds4").mkdir()
    first = tmp_path / "first"
    train(torchrun(2), "--deepspeed", str(small_ds_json(tmp_path / "ds2", micro=2)), *args, "--data.num_workers", "2",
          "--train.max_steps", "4", "--train.checkpoint_every", "4", "--out", str(first))

    def epoch_keys(out, epoch):
        rows = [json.loads(line) for path in sorted((out / "samples").glob("rank-*.jsonl")) for line in path.read_text().splitlines()]
        return [key for row in rows if row["epoch"] == epoch for key in row["keys"]]

    assert len(epoch_keys(first, 0)) == 16
    for name, ranks, workers, micro in (("one", 1, 1, 4), ("six", 2, 3, 2)):
        out = tmp_path / name
        shutil.copytree(first, out)
        ds_json = small_ds_json(tmp_path / f"ds{micro}", micro=micro)
        result = train(torchrun(ranks), "--deepspeed", str(ds_json), *args, "--data.num_workers", str(workers),
                       "--train.max_steps", "20", "--out", str(out), "--resume")
        assert f"resumed {out} at step 4 on a new layout" in result.stdout
        trained = epoch_keys(out, 0)
        assert len(trained) == len(set(trained)) == len(train_keys) and set(trained) == set(train_keys)
        assert sorted(epoch_keys(out, 1)) == sorted(train_keys)  # the next epoch, planned for the new layout
        rows, _ = metrics(out)
        assert [row["step"] for row in rows] == list(range(1, 21))  # no step twice, none missing
        assert all(row["loss"] == row["loss"] for row in rows)  # finite, not NaN

    # the global batch is what a resume keeps: another one is refused, with the reason
    out = tmp_path / "other"
    shutil.copytree(first, out)
    refused = subprocess.run([sys.executable, "launch/train.py", "--deepspeed", str(small_ds_json(tmp_path / "ds2", micro=2)),
                              *args, "--data.num_workers", "1", "--train.max_steps", "20", "--out", str(out), "--resume"],
                             cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "global batch was 4" in refused.stderr + refused.stdout
