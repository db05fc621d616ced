"""Faults lose nothing and say what happened: hostile bytes in a shard, a shard swapped for
another, a store that goes away under a running job, a full disk at checkpoint time, and the
checks that must come before a model is built.

The outages are real on the wire: the S3 server (SeaweedFS) sits behind
:class:`tests.conftest.FaultyProxy`, whose port stops listening and whose open connections
are cut for the outage. The full disk is a real, small tmpfs.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import simplejpeg
import torch
import webdataset as wds

from fusion.backbones.weights import RandomWeightsWarning
from fusion.data import ERROR_KEYS, DataConfig, ShardSet, train_loader, val_loader
from fusion.model import ModelConfig, build_model
from launch import distributed
from tests.conftest import FaultyProxy, describe_again, fill_up, small_filesystem
from tests.test_data import _frame, write_shards
from tests.test_train import REPO, RUN_TIMEOUT_S, SMALL, metrics, run_env, small_ds_json, torchrun, upload

OUTAGE_S = 30


def claim_size(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) claiming ``width`` x ``height`` pixels: a few KB
    of bytes that ask a decoder for gigabytes."""
    data = bytearray(jpeg)
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 7] = height.to_bytes(2, "big")
    data[at + 7 : at + 9] = width.to_bytes(2, "big")
    return bytes(data)


def rewrite_shard(folder: Path, index: int, change, *, update_manifest: bool = True) -> None:
    """Rewrite shard ``index`` of a shard folder with ``change(position, sample)`` applied; the
    manifest then describes the new bytes (the damage was there when it was packed) unless
    ``update_manifest`` is false."""
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = folder / manifest["shards"][index]["name"]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for position, sample in enumerate(samples):
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            writer.write(change(position, sample))
    if update_manifest:
        describe_again(folder, shard.name)


def with_sha256(folder: Path) -> None:
    """Fill in the sha256 of every shard (test_data's writer leaves it empty)."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = hashlib.sha256((folder / entry["name"]).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- hostile bytes


def test_frames_larger_than_the_manifest_allows_are_refused_before_decoding(tmp_path, caplog):
    keys = write_shards(tmp_path / "shards", [4, 4])
    jpeg = simplejpeg.encode_jpeg(_frame(0), quality=90)
    hostile = {
        keys[1]: ("001.jpg", claim_size(jpeg, 65500, 65500)),  # ~200 GB of pixels for 16 frames, from 5 KB
        keys[2]: ("000.jpg", claim_size(jpeg, 30000, 30000)),
        keys[5]: ("003.jpg", jpeg + b"\0" * 100_000),  # a valid JPEG dragging 100 KB behind it
    }

    def damage(position, sample):
        if sample["__key__"] in hostile:
            member, data = hostile[sample["__key__"]]
            sample[member] = data
        return sample

    for index in (0, 1):
        rewrite_shard(tmp_path / "shards", index, damage)
    shardset = ShardSet.open(str(tmp_path / "shards"))
    assert shardset.limits.max_frame_bytes < 100_000 + len(jpeg)  # short side 24: frames of at most 24x96
    caplog.set_level(logging.WARNING, logger="fusion.data")
    for decode in ("cpu", "gpu"):  # gpu: the bytes-only path the workers run for nvJPEG, here on the CPU
        loader = train_loader(DataConfig(num_workers=0, crop_size=16, decode=decode), shardset, batch_size=2, rank=0, world_size=1,
                              epoch=0, seed=0, device="cpu")
        seen = [key for batch in loader for key in batch["keys"]]
        assert len(seen) == 8 and not set(hostile) & set(seen)
        # the three are met again while refilling the epoch's last batches with repeats
        assert loader.stats["corrupt_samples"] >= 3 and loader.stats["refilled_samples"] == 3
    said = caplog.text
    assert "claims 65500x65500 pixels" in said and "claims 30000x30000 pixels" in said
    assert "frame 003.jpg is 1" in said and "bytes, over the" in said
    loader = val_loader(DataConfig(num_workers=2, crop_size=16), shardset, batch_size=3, rank=0, world_size=1)
    assert len([key for batch in loader for key in batch["keys"]]) == 5 and loader.stats["corrupt_samples"] == 3


def test_frame_headers_equal_to_the_first_are_not_parsed_again(monkeypatch):
    """``_frame_size`` parses the first frame's header and skips frames whose header bytes are
    the same (libjpeg reads those bytes and no others, so it would answer the same); any frame
    whose header differs is parsed and judged as before."""
    import numpy as np

    from fusion.data import decode
    from fusion.data.common import FrameLimits

    texture = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    frames = [simplejpeg.encode_jpeg(np.roll(texture, t, axis=1), quality=90, colorsubsampling="420") for t in range(8)]
    names = [f"{t:03d}.jpg" for t in range(8)]
    limits = FrameLimits(24, 96)
    parsed = []
    real = simplejpeg.decode_jpeg_header
    monkeypatch.setattr(simplejpeg, "decode_jpeg_header", lambda data: parsed.append(1) or real(data))

    def frame_size(replaced: dict[int, bytes]) -> tuple[int, int]:
        parsed.clear()
        sample = {name: memoryview(replaced.get(t, frame)) for t, (name, frame) in enumerate(zip(names, frames))}
        return decode._frame_size(sample, names, limits)

    header = decode._jpeg_header_bytes(frames[0])
    assert header is not None and frames[0].startswith(header) and header.endswith(frames[0][len(header) - 10 : len(header)])
    for frame in frames:  # the bytes after the header change nothing libjpeg's header parse says
        assert real(frame[: len(header)] + b"\0" * 64) == real(frame) == real(frames[0])
    assert frame_size({}) == (24, 40) and len(parsed) == 1

    # a frame that claims another size, one of another true size, a header of other tables
    with pytest.raises(decode.CorruptSample, match="claims 65500x65500"):
        frame_size({5: claim_size(frames[5], 65500, 65500)})
    wide = simplejpeg.encode_jpeg(np.ascontiguousarray(np.tile(texture, (1, 2, 1))), quality=90, colorsubsampling="420")
    with pytest.raises(decode.CorruptSample, match="frame 003.jpg is 80x24, frame 000.jpg 40x24"):
        frame_size({3: wide})
    other_tables = simplejpeg.encode_jpeg(texture, quality=50, colorsubsampling="420")
    assert frame_size({6: other_tables}) == (24, 40) and len(parsed) == 2
    # a first frame whose markers the walk does not follow (a fill byte): every frame is parsed
    padded = frames[0][:2] + b"\xff" + frames[0][2:]
    assert real(padded) == real(frames[0]) and decode._jpeg_header_bytes(padded) is None
    assert frame_size({0: padded}) == (24, 40) and len(parsed) == 8


def test_a_training_run_outlives_a_bad_header(synthetic_shards, tmp_path):
    """The 5 KB frame that claims 65500x65500 made the worker allocate ~96 GiB and die, and
    --resume replayed the same batch: now it is one skipped, counted clip."""
    shards = tmp_path / "train"
    shutil.copytree(synthetic_shards / "train", shards)

    def damage(position, sample):
        if position == 0:
            sample["002.jpg"] = claim_size(sample["002.jpg"], 65500, 65500)
        return sample

    rewrite_shard(shards, 0, damage)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--deepspeed", str(small_ds_json(tmp_path)), *SMALL, "--data.train", str(shards),
         "--data.val", str(synthetic_shards / "validation"), "--train.epochs", "2", "--data.max_skipped_fraction", "0.5",
         "--out", str(out)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train_data_corrupt_samples" in line]
    assert [row["train_data_corrupt_samples"] for row in rows] == [1.0, 1.0]
    # each warning on a line of its own, never glued to the progress bar
    warned = [segment for line in result.stderr.splitlines() for segment in line.split("\r") if "claims 65500x65500" in segment]
    assert len(warned) == 2 and all(segment.startswith("warning: skipping sample") for segment in warned)


# ----------------------------------------------------------------------------- shards that are not the manifest's


def test_a_swapped_shard_is_caught(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fusion.data")
    keys = write_shards(tmp_path / "a", [5, 4, 4])
    with_sha256(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["shards"][0]["bytes"] != manifest["shards"][1]["bytes"]
    # another shard's bytes, another size: refused before a sample of it is used
    shutil.copy(tmp_path / "a" / "shard-000000.tar", tmp_path / "a" / "shard-000001.tar")
    loader = val_loader(DataConfig(num_workers=0, crop_size=16), ShardSet.open(str(tmp_path / "a")), batch_size=4, rank=0,
                        world_size=1)
    seen = [key for batch in loader for key in batch["keys"]]
    assert loader.stats["corrupt_shards"] == 1 and "shard-000001.tar" in caplog.text and "the manifest says" in caplog.text
    assert sorted(seen) == sorted(keys[:5] + keys[9:])  # shard 0's clips once, none of the swapped one
    # the same size (the manifest agrees on it): the sha256, computed while streaming, catches it
    manifest["shards"][1]["bytes"] = manifest["shards"][0]["bytes"]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    shardset = ShardSet.open(str(tmp_path / "a"))
    loader = val_loader(DataConfig(num_workers=0, crop_size=16), shardset, batch_size=4, rank=0, world_size=1)
    list(loader)
    assert loader.stats["corrupt_shards"] == 1
    assert "shard-000001.tar" in caplog.text and "its sha256 is" in caplog.text and "were already used" in caplog.text
    # an intact set passes the same checks without a word
    write_shards(tmp_path / "b", [4, 4])
    with_sha256(tmp_path / "b")
    caplog.clear()
    loader = val_loader(DataConfig(num_workers=2, crop_size=16), ShardSet.open(str(tmp_path / "b")), batch_size=4, rank=0, world_size=1)
    assert len([k for b in loader for k in b["keys"]]) == 8 and not any(loader.stats[key] for key in ERROR_KEYS) and not caplog.text


# ----------------------------------------------------------------------------- the store goes away


def run_with_outage(cmd: list[str], out: Path, proxy: FaultyProxy, *, outage_s: float | None, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Start a training run, take the store down at its first logged step, bring it back
    ``outage_s`` later (never, for None); the finished run's result."""
    process = subprocess.Popen(cmd, cwd=REPO, env=run_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output: dict[str, str] = {}
    reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), process.communicate(timeout=RUN_TIMEOUT_S))))
    reader.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.05)
    proxy.down()
    if outage_s is not None:
        time.sleep(outage_s)
        proxy.up()
    reader.join()
    return subprocess.CompletedProcess(cmd, process.returncode, output.get("stdout", ""), output.get("stderr", ""))


@pytest.fixture
def proxied_bucket(s3_server, s3_env, synthetic_shards, tmp_path):
    """The synthetic shards in a bucket, reached through a proxy that can go down."""
    client = s3_server.client()
    urls = {split: upload(client, synthetic_shards / split, s3_env, f"ssv2/{split}") for split in ("train", "validation")}
    proxy = FaultyProxy(urlsplit(s3_server.endpoint).port)
    env = dict(s3_server.env(), AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
    yield urls, proxy, env
    proxy.close()


def training(tmp_path: Path, train_url: str, val_url: str, out: Path, *extra: str) -> list[str]:
    return [*torchrun(2), "--deepspeed", str(small_ds_json(tmp_path)), *SMALL, "--data.train", train_url, "--data.val", val_url,
            "--train.epochs", "3", "--out", str(out), *extra]


@pytest.mark.slow
def test_a_storage_outage_in_training_is_waited_out(proxied_bucket, synthetic_shards, tmp_path):
    (urls, proxy, env) = proxied_bucket
    out = tmp_path / "run"
    result = run_with_outage(training(tmp_path, urls["train"], str(synthetic_shards / "validation"), out), out, proxy,
                             outage_s=OUTAGE_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, val_rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 10))
    data = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train_data_read_retries" in line]
    assert sum(r["train_data_read_retries"] for r in data) >= 1  # it did wait
    assert all(r["train_data_refilled_samples"] == 0 and r["train_data_corrupt_shards"] == 0 for r in data)  # and lost nothing
    assert all(r["val_complete"] == 1 and r["val_clips"] == 3 for r in val_rows)
    assert "waiting for storage" in result.stderr and "data.storage_timeout_s" in result.stderr and "storage is back" in result.stderr


@pytest.mark.slow
def test_a_storage_outage_in_validation_is_waited_out(proxied_bucket, synthetic_shards, tmp_path):
    (urls, proxy, env) = proxied_bucket
    out = tmp_path / "run"
    result = run_with_outage(training(tmp_path, str(synthetic_shards / "train"), urls["validation"], out), out, proxy,
                             outage_s=OUTAGE_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    _, val_rows = metrics(out)
    assert len(val_rows) == 3 and all(r["val_complete"] == 1 and r["val_clips"] == 3 == r["val_clips_expected"] for r in val_rows)
    data = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_data_read_retries" in line]
    assert sum(r["val_data_read_retries"] for r in data) >= 1
    assert "waiting for storage" in result.stderr and "INCOMPLETE" not in result.stdout


@pytest.mark.slow
def test_storage_gone_for_good_stops_training_with_a_checkpoint(proxied_bucket, synthetic_shards, tmp_path):
    (urls, proxy, env) = proxied_bucket
    out = tmp_path / "run"
    cmd = training(tmp_path, urls["train"], str(synthetic_shards / "validation"), out, "--data.storage_timeout_s", "3")
    result = run_with_outage(cmd, out, proxy, outage_s=None, env=env)
    assert result.returncode != 0, result.stderr[-3000:]  # each rank exits 3; torchrun reports 1
    assert "launch/train.py: stopped: training data unreachable" in result.stderr and "data.storage_timeout_s = 3" in result.stderr
    assert "--resume" in result.stderr
    tag = distributed.latest_tag(out)
    assert tag is not None
    stopped_at = int(tag.removeprefix("step"))
    rows, _ = metrics(out)
    assert rows[-1]["step"] == stopped_at < 9  # it stopped where it stood, and nothing past it was trained
    data_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train_data_refilled_samples" in line]
    assert all(row["train_data_refilled_samples"] == 0 for row in data_rows)  # it never trained on repeats

    proxy.up()  # the store is back: the same command with --resume finishes the run
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=run_env(env), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows, _ = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 10))


@pytest.mark.slow
def test_validation_that_cannot_finish_is_marked_incomplete(proxied_bucket, synthetic_shards, tmp_path):
    (urls, proxy, env) = proxied_bucket
    out = tmp_path / "run"
    cmd = training(tmp_path, str(synthetic_shards / "train"), urls["validation"], out, "--data.storage_timeout_s", "2",
                   "--train.epochs", "1")
    result = run_with_outage(cmd, out, proxy, outage_s=None, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    incomplete = [r for r in rows if "val_complete" in r]
    assert incomplete and all(r["val_complete"] == 0 and r["val_clips_expected"] == 3 and r["val_clips"] < 3 for r in incomplete)
    assert "INCOMPLETE" in result.stdout and "not comparable" in result.stdout
    events = [p.name for p in (out / "tensorboard").iterdir()]
    assert events  # the figure went to val_incomplete/*, not val/*
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert "val_incomplete/top1" in tags and "val/top1" not in tags


# ----------------------------------------------------------------------------- a full disk


def debug_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        torch.manual_seed(0)
        head = build_model(ModelConfig(size="debug", dim=64, heads=4)).head
    ds_json = json.loads((REPO / "ds.json").read_text())
    return distributed.wrap_head(head, distributed.adapt_ds_config(ds_json, total_steps=10, gpu=False, log=lambda _: None))


def test_a_full_disk_at_checkpoint_time_says_so_and_leaves_no_partial_folder(one_rank, tmp_path):
    engine = debug_engine()
    with small_filesystem(tmp_path / "fs", "8m") as out:
        state = {"position": {"epoch": 0, "batch": 1}}
        first = distributed.save_checkpoint(engine, out, 1, state, keep=3, is_main=True)
        size = sum(f.stat().st_size for f in (out / "checkpoints" / first).rglob("*") if f.is_file())
        fill_up(out, leave_bytes=size // 2)

        # the space check: nothing is written at all
        with pytest.raises(distributed.CheckpointError) as error:
            distributed.save_checkpoint(engine, out, 2, state, keep=3, is_main=True)
        message = str(error.value)
        assert f"cannot write checkpoint {out / 'checkpoints' / 'step00000002'}: No space left on device" in message
        assert "step00000001" in message and "is intact" in message

        # the write itself fails (the space check bypassed, as when another job fills the disk)
        with pytest.raises(distributed.CheckpointError) as error:
            distributed.save_checkpoint(engine, out, 2, state, keep=3, is_main=True, check_space=False)
        message = str(error.value)
        assert f"could not write checkpoint {out / 'checkpoints' / 'step00000002'}: No space left on device" in message
        assert "the partial folder was removed" in message
        assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("zero_to")) == ["latest", "step00000001"]
        assert distributed.latest_tag(out) == "step00000001"
        assert distributed.load_checkpoint(engine, out)["position"] == state["position"]  # the previous one still loads


@pytest.mark.slow
def test_a_training_run_on_a_full_disk_stops_with_the_reason(synthetic_shards, tmp_path):
    with small_filesystem(tmp_path / "fs", "1m") as fs:
        out = fs / "run"
        result = subprocess.run(
            [*torchrun(2), "--deepspeed", str(small_ds_json(tmp_path)), *SMALL, "--data.train", str(synthetic_shards / "train"),
             "--data.val", str(synthetic_shards / "validation"), "--train.epochs", "2", "--out", str(out)],
            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        )
        assert result.returncode != 0
        assert f"cannot write checkpoint {out / 'checkpoints' / 'step00000003'}: No space left on device" in result.stderr
        assert "basic_ios" not in result.stderr and "unexpected pos" not in result.stderr
        assert not list((out / "checkpoints").glob("step*"))


# ----------------------------------------------------------------------------- checks before the model is built


def train_quickly(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *kwargs.pop("python_flags", []), "launch/train.py", *args], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_a_manifest_listing_other_files_is_refused_before_the_model_is_built(synthetic_shards, tmp_path):
    shards = tmp_path / "train"
    shutil.copytree(synthetic_shards / "train", shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][1]["name"] = "../../etc/passwd"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = train_quickly(*SMALL, "--data.train", str(shards), "--data.val", str(synthetic_shards / "validation"),
                           "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "'../../etc/passwd', not a plain NAME.tar" in result.stderr
    assert "Traceback" not in result.stderr and "trainable:" not in result.stdout  # no model was built


@pytest.mark.parametrize("section,value,expected", [
    ("optimizer", {"type": "AdamQ", "params": {"lr": 0.001}}, "optimizer type 'AdamQ' is neither one of DeepSpeed's"),
    ("scheduler", {"type": "CosineWarmup", "params": {}}, "scheduler type 'CosineWarmup' is not one of"),
])
def test_unknown_deepspeed_names_are_refused_before_the_model_is_built(synthetic_shards, tmp_path, section, value, expected):
    ds_json = json.loads((REPO / "ds.json").read_text())
    ds_json[section] = value
    (tmp_path / "ds.json").write_text(json.dumps(ds_json))
    result = train_quickly("--deepspeed", str(tmp_path / "ds.json"), *SMALL, "--data.train", str(synthetic_shards / "train"),
                           "--data.val", str(synthetic_shards / "validation"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and expected in result.stderr
    assert "Traceback" not in result.stderr and "trainable:" not in result.stdout


def test_config_errors_come_before_the_heavy_imports():
    result = train_quickly("--train.epoch", "3", python_flags=["-X", "importtime"])
    assert result.returncode == 2 and "did you mean 'train.epochs'" in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # the config classes live beside the model
    assert not {name for name in imported if name.split(".")[0] in ("deepspeed", "torchvision", "timm")}
