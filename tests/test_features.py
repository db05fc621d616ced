"""Feature shards (launch/extract_features.py, fusion.features) and training from them.

Real subprocesses on the tiny synthetic shards of conftest.py, at the small crops of
test_train.py: extraction under 1 and 2 ranks, training from features against training from
frames, corrupt feature samples, and features that another model made.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion.data import DataConfig, ShardSet, train_loader, val_loader
from fusion.features import file_sha256
from sharding.shard_index import describe_shard
from tests.conftest import describe_again
from tests.test_train import REPO, RUN_TIMEOUT_S, SMALL, head_weights, metrics, run_env, small_ds_json, train

pytestmark = pytest.mark.filterwarnings("ignore::fusion.backbones.weights.RandomWeightsWarning")


def extract(data: Path, out: Path, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    command = [*launcher, "launch/extract_features.py", "--data", str(data), "--out", str(out), *SMALL, *args]
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, f"extraction failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def tar_keys(folder: Path) -> list[str]:
    """Every sample key of every tar in ``folder``, read with plain tarfile (as any reader would)."""
    keys = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as archive:
            keys += sorted({member.name.split(".", 1)[0] for member in archive.getmembers()})
    return keys


@pytest.fixture(scope="module")
def features(synthetic_shards: Path, tmp_path_factory) -> Path:
    """fp32 features of both splits, two views per training clip, seed 0 (as the training runs)."""
    out = tmp_path_factory.mktemp("features")
    extract(synthetic_shards, out, "--views", "2", "--store-dtype", "fp32")
    return out


def test_training_from_features_equals_training_from_frames(synthetic_shards: Path, features: Path, tmp_path: Path) -> None:
    """View v of the features is epoch v's training crop, so two epochs from features are the
    two epochs a run from frames trains on: the same head, up to float rounding."""
    ds = small_ds_json(tmp_path, micro=2)
    common = [*SMALL, "--deepspeed", str(ds), "--train.epochs", "2", "--train.seed", "0"]
    frames = train([sys.executable, "launch/train.py"], *common, "--data.train", str(synthetic_shards / "train"),
                   "--data.val", str(synthetic_shards / "validation"), "--out", str(tmp_path / "frames"))
    cached = train([sys.executable, "launch/train.py"], *common, "--data.train", str(features / "train"),
                   "--data.val", str(features / "validation"), "--out", str(tmp_path / "features"))
    assert "the backbones are not run" in cached.stdout and "the backbones are not run" not in frames.stdout
    live, from_cache = head_weights(tmp_path / "frames"), head_weights(tmp_path / "features")
    assert live.keys() == from_cache.keys()
    # atol 1e-4 against weights of ~0.1: the attention key biases get no gradient but float
    # noise, which Adam scales up to lr-sized steps (seen: 2e-5 apart); anything else is ~1e-7
    for name in live:
        torch.testing.assert_close(from_cache[name], live[name], rtol=1e-4, atol=1e-4, msg=name)
    steps_live, val_live = metrics(tmp_path / "frames")
    steps_cached, val_cached = metrics(tmp_path / "features")
    assert [row["step"] for row in steps_live] == [row["step"] for row in steps_cached]
    assert [row["loss"] for row in steps_cached] == pytest.approx([row["loss"] for row in steps_live], rel=1e-5)
    for a, b in zip(val_live, val_cached):
        assert a["val_top1"] == b["val_top1"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)

    # the control: with one view, epoch 1 reads epoch 0's crops again, and the runs part there
    one_view = tmp_path / "one_view"
    extract(synthetic_shards, one_view, "--views", "1", "--store-dtype", "fp32")
    train([sys.executable, "launch/train.py"], *common, "--data.train", str(one_view / "train"),
          "--data.val", str(one_view / "validation"), "--out", str(tmp_path / "repeated"))
    steps_repeated, _ = metrics(tmp_path / "repeated")
    first_epoch = len(steps_live) // 2
    losses = [row["loss"] for row in steps_repeated]
    assert losses[:first_epoch] == pytest.approx([row["loss"] for row in steps_live[:first_epoch]], rel=1e-5)
    assert losses[first_epoch:] != pytest.approx([row["loss"] for row in steps_live[first_epoch:]], rel=1e-3)
    repeated = head_weights(tmp_path / "repeated")
    assert max((repeated[name] - live[name]).abs().max().item() for name in live) > 1e-3


def test_two_ranks_write_every_clip_exactly_once(synthetic_shards: Path, features: Path, tmp_path: Path) -> None:
    out = tmp_path / "two_ranks"
    extract(synthetic_shards, out, "--views", "2", ranks=2)
    for split in ("train", "validation"):
        source = ShardSet.open(str(synthetic_shards / split))
        made = ShardSet.open(str(out / split))
        assert len(source.shards) >= 2  # so that both ranks had shards of their own
        assert tar_keys(out / split) == tar_keys(synthetic_shards / split)  # every clip, once, shard by shard
        assert made.num_samples == source.num_samples and made.manifest["num_skipped"] == 0
        assert made.shards == source.shards
        for entry in made.manifest["shards"]:  # the manifest describes what is on disk
            assert entry["bytes"] == (out / split / entry["name"]).stat().st_size
            assert entry["sha256"] == file_sha256(out / split / entry["name"])
            description = describe_shard(out / split / entry["name"])  # and its index, checksums included
            assert (entry["offsets"], entry["crc32c"]) == (description.offsets, description.crc32c)
        info = made.manifest["features"]
        assert info["dtype"] == "fp16" and info["views"] == (2 if split == "train" else 1)
        assert info["semantic"]["name"] == "dinov2_vits14" and info["motion"]["name"] == "i3d_r50"
        # fp16 halves the bytes of fp32's (same views of the validation split)
    fp16_bytes = sum(e["bytes"] for e in ShardSet.open(str(out / "validation")).manifest["shards"])
    fp32_bytes = sum(e["bytes"] for e in ShardSet.open(str(features / "validation")).manifest["shards"])
    assert fp16_bytes < 0.7 * fp32_bytes
    # a rerun finds every shard finished and writes nothing
    again = extract(synthetic_shards, out, "--views", "2")
    assert "(0 clips on rank 0)" in again.stdout
    # and a rerun with other settings refuses to mix its shards with these
    result = subprocess.run([sys.executable, "launch/extract_features.py", "--data", str(synthetic_shards), "--out", str(out),
                             *SMALL, "--views", "3"], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 2 and "another config" in result.stderr and "Traceback" not in result.stderr


def rewrite_sample(folder: Path, shard: str, key: str, member: str, data: bytes) -> None:
    """Replace one member of one sample; the manifest then describes the new shard (so that
    only the sample, not the shard, is bad)."""
    path = folder / shard
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(path, "w") as archive:
        for info, content in members:
            if info.name == f"{key}.{member}":
                content = data
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    describe_again(folder, shard)


@pytest.mark.parametrize("bad", ["garbage", "pickled", "wrong_shape"])
def test_a_corrupt_feature_sample_is_skipped_and_counted(features: Path, tmp_path: Path, bad: str) -> None:
    import shutil

    folder = tmp_path / "train"
    shutil.copytree(features / "train", folder)
    shardset = ShardSet.open(str(folder))
    shard = shardset.shards[0]
    with tarfile.open(folder / shard) as archive:
        key = archive.getmembers()[0].name.split(".", 1)[0]
    spec = shardset.feature_spec
    payload = {
        "garbage": b"\x93NUMPY not really",
        "pickled": _npy(np.array([{"a": 1}] * 2, dtype=object)),
        "wrong_shape": _npy(np.zeros((spec.views, spec.semantic_shape[0], spec.semantic_shape[1] + 1), np.float32)),
    }[bad]
    rewrite_sample(folder, shard, key, "sem.npy", payload)
    cfg = DataConfig(train=str(folder), num_workers=0, crop_size=56, frames=0)
    loader = train_loader(cfg, ShardSet.open(str(folder)), batch_size=2, rank=0, world_size=1, epoch=0, seed=0)
    batches = list(loader)
    assert loader.stats["corrupt_samples"] == 1 and loader.stats["corrupt_shards"] == 0
    assert loader.stats["refilled_samples"] == 1  # the batch was filled up to its size
    assert all(batch["semantic"].shape[1:] == spec.semantic_shape for batch in batches)
    seen = [k for batch in batches for k in batch["keys"]]
    assert key not in seen and len(seen) == len(batches) * 2


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_validation_reads_the_centre_view_once(features: Path) -> None:
    cfg = DataConfig(val=str(features / "validation"), num_workers=0, crop_size=56)
    shardset = ShardSet.open(str(features / "validation"))
    keys = [k for batch in val_loader(cfg, shardset, batch_size=2, rank=0, world_size=1) for k in batch["keys"]]
    assert sorted(keys) == sorted(tar_keys(features / "validation")) and len(keys) == shardset.num_samples


def test_features_of_another_model_or_loader_are_refused(synthetic_shards: Path, features: Path, tmp_path: Path) -> None:
    base = [sys.executable, "launch/train.py", *SMALL, "--deepspeed", str(small_ds_json(tmp_path, micro=2)),
            "--data.train", str(features / "train"), "--data.val", str(features / "validation")]
    cases = {
        ("--model.motion.name", "r2plus1d_18"): "model.motion.name: features i3d_r50, config r2plus1d_18",
        ("--data.frames", "8"): "data.frames: features 16, config 8",
        ("--data.crop_size", "112", "--model.semantic.img_size", "112"): "data.crop_size: features 56, config 112",
        ("--data.val", str(synthetic_shards / "validation")): "use one kind for both",
    }
    for number, (extra, message) in enumerate(cases.items()):
        result = subprocess.run([*base, *extra, "--out", str(tmp_path / f"run{number}")], cwd=REPO, env=run_env(),
                                capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 2, (extra, result.stdout[-2000:], result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, (extra, result.stderr[-2000:])


def test_a_head_trained_from_features_is_evaluated_with_the_backbones_that_made_them(features: Path, tmp_path: Path) -> None:
    """Evaluation runs live backbones on frame shards: for a head trained (with another seed)
    on random backbones' features, they must be the extraction's backbones, whose features of
    the centre view are the cached validation features."""
    from launch.train import RunConfig
    from launch.trained import build_trained_model, load_trained, trained_config

    out = tmp_path / "run"
    train([sys.executable, "launch/train.py", *SMALL, "--deepspeed", str(small_ds_json(tmp_path, micro=2)), "--train.epochs", "1",
           "--train.seed", "1", "--data.train", str(features / "train"), "--data.val", str(features / "validation"), "--out", str(out)])
    trained = load_trained(out)
    cfg, _ = trained_config(RunConfig, trained, ["--data.num_workers", "0"])
    assert cfg.train.seed == 1 and trained.shards["backbone_seed"] == 0
    model = build_trained_model(trained, cfg.model, "cpu", seed=cfg.train.seed)
    source = ShardSet.open(ShardSet.open(str(features / "validation")).manifest["source"]["url"])
    cached = {key: (s, m) for batch in val_loader(cfg.data, ShardSet.open(str(features / "validation")), batch_size=4, rank=0,
                                                   world_size=1)
              for key, s, m in zip(batch["keys"], batch["semantic"], batch["motion"])}
    for batch in val_loader(cfg.data, source, batch_size=4, rank=0, world_size=1):
        semantic, motion = model.features(batch["clips"])
        for key, s, m in zip(batch["keys"], semantic, motion):
            torch.testing.assert_close(s, cached[key][0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(m, cached[key][1], rtol=1e-4, atol=1e-4)
    # the control: the run's own seed would have built other backbones
    as_if_from_frames = dataclasses.replace(trained, shards={k: v for k, v in trained.shards.items() if k != "backbone_seed"})
    semantic, _ = build_trained_model(as_if_from_frames, cfg.model, "cpu", seed=cfg.train.seed).features(batch["clips"])
    assert not torch.allclose(semantic[0], cached[batch["keys"][0]][0], atol=1e-2)
