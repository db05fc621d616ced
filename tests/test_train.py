"""launch/train.py end to end on CPU: real ranks (torchrun and the deepspeed launcher, gloo),
real loader workers, a real SeaweedFS bucket, a real kill -9 and resume.

Runs are real subprocesses of the debug model on the tiny synthetic shards of conftest.py,
at 56-pixel crops so that a step costs milliseconds; the ds.json they use is the repo's own
with only the micro batch shrunk to fit six training clips.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusion.config import ConfigError, load, render_help
from launch import distributed
from tests.conftest import clean_env, describe_again
from launch.train import RunConfig, open_data, parse_command_line, resolve_data_url, step_seed, topk_correct

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300
# Small crops and frames keep a step cheap; the debug ViT's patch size 14 divides 56. Dropout on
# (the debug size has none) so that the exact-resume tests cover its random numbers too.
SMALL = ["--config", "launch/configs/debug.yaml", "--data.crop_size", "56", "--model.semantic.img_size", "56",
         "--data.num_workers", "2", "--train.log_every", "1", "--model.dropout", "0.1"]


def small_ds_json(tmp_path: Path, micro: int = 1) -> Path:
    config = json.loads((REPO / "ds.json").read_text())
    config["train_micro_batch_size_per_gpu"] = micro
    config["optimizer"]["params"]["lr"] = 3e-3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = clean_env(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.update(extra or {})
    return env


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "launch/train.py"]


def deepspeed_launcher(ranks: int) -> list[str]:
    port = distributed._free_port()
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), "launch/train.py"]


def train(cmd: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([*cmd, *args], cwd=REPO, env=run_env(env), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def metrics(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_top1" in r]


def head_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "head.pt", map_location="cpu", weights_only=True)["head"]


# ----------------------------------------------------------------------------- pure parts


def test_shipped_configs_load_and_help_lists_the_keys():
    for name in ("debug.yaml", "default.yaml"):
        cfg, rest = load(RunConfig, REPO / "launch" / "configs" / name, [])
        assert rest == [] and cfg.train.epochs >= 1
    text = render_help(RunConfig)
    for key in ("--data.train", "--data.val", "--train.epochs", "--train.max_steps", "--train.seed", "--model.heads"):
        assert key in text


def test_command_line_keys_and_launcher_arguments():
    args, cfg = parse_command_line(["--local_rank=1", "--deepspeed", "my.json", "--train.epochs", "3", "--data.train",
                                    "s3://b/train", "--out", "o", "--resume", "--config", "launch/configs/debug.yaml"])
    assert args.deepspeed == Path("my.json") and args.local_rank == 1 and args.resume and args.out == Path("o")
    assert cfg.train.epochs == 3 and cfg.data.train == "s3://b/train" and cfg.model.size == "debug"
    with pytest.raises(ConfigError, match="did you mean"):
        parse_command_line(["--train.epoch", "3"])


def test_relative_data_paths_fall_back_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_url("launch/configs") == str(REPO / "launch" / "configs")
    (tmp_path / "here").mkdir()
    assert resolve_data_url("here") == "here"  # the current folder first
    assert resolve_data_url("s3://bucket/train") == "s3://bucket/train"


def test_batch_arithmetic_must_divide():
    plan = distributed.batch_plan({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, world_size=3)
    assert plan.global_batch == 24
    assert distributed.batch_plan({"train_batch_size": 24, "gradient_accumulation_steps": 2}, world_size=3).micro == 4
    with pytest.raises(ConfigError, match="does not divide"):
        distributed.batch_plan({"train_batch_size": 25, "gradient_accumulation_steps": 2}, world_size=3)
    with pytest.raises(ConfigError, match="train_batch_size 32 != "):
        distributed.batch_plan({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, world_size=3)


def test_auto_schedule_lengths_come_from_the_run():
    params = {"total_num_steps": "auto", "warmup_num_steps": "auto", "cos_min_ratio": 0.01}
    assert distributed.resolve_schedule(params, 500) == {"total_num_steps": 500, "warmup_num_steps": 50, "cos_min_ratio": 0.01}
    assert distributed.resolve_schedule({"warmup_num_steps": 7}, 500) == {"warmup_num_steps": 7}
    config = distributed.adapt_ds_config(json.loads((REPO / "ds.json").read_text()), total_steps=100, gpu=False, log=lambda _: None)
    assert config["bf16"]["enabled"] is False and config["scheduler"]["params"]["total_num_steps"] == 100


def test_topk_correct_counts_hits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.2, 0.3, 0.5]])
    top1, top2 = topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert (top1.item(), top2.item()) == (1, 2)
    assert [t.item() for t in topk_correct(logits, torch.tensor([1, 2, 0]), ks=(5,))] == [3]  # k capped at the classes


def test_dropout_seed_depends_on_position_only():
    assert step_seed(0, 1, 2, 3) == step_seed(0, 1, 2, 3)
    assert len({step_seed(0, r, e, b) for r in range(2) for e in range(2) for b in range(2)}) == 8


def test_class_count_mismatch_is_a_clear_error(synthetic_shards):
    cfg, _ = load(RunConfig, None, ["--data.train", str(synthetic_shards / "train"), "--data.val",
                                    str(synthetic_shards / "validation"), "--model.num_classes", "10"])
    with pytest.raises(ConfigError, match="174 classes but model.num_classes is 10"):
        open_data(cfg)


def test_missing_manifest_fails_before_training(tmp_path, synthetic_shards):
    result = subprocess.run(
        [sys.executable, "launch/train.py", *SMALL, "--data.train", str(tmp_path), "--data.val", str(synthetic_shards / "validation"),
         "--out", str(tmp_path / "run")],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 2
    assert f"no manifest.json at {tmp_path}" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- real runs


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it at once (torchrun starts its ranks in
    sessions of their own, so killing its process group would leave them running)."""
    import psutil

    root = psutil.Process(process.pid)
    victims = [root, *root.children(recursive=True)]
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    process.wait()


def upload(client, folder: Path, bucket: str, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def with_one_corrupt_frame(folder: Path, tmp_path: Path) -> Path:
    """A copy of a shard folder whose first sample has one frame that is not a JPEG."""
    import shutil

    import webdataset as wds

    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["shards"][0]["name"]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for index, sample in enumerate(samples):
            sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            if index == 0:
                sample["003.jpg"] = b"\xff\xd8 not a jpeg"
            writer.write(sample)
    # packed that way: the manifest describes the damaged shard (else the whole shard is refused),
    # its sample index included
    describe_again(copy, shard.name)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [torchrun, deepspeed_launcher], ids=["torchrun", "deepspeed"])
def test_two_ranks_train_from_a_bucket(launcher, s3_server, s3_env, synthetic_shards, tmp_path):
    client = s3_server.client()
    # one training clip does not decode: it is skipped, counted, and the ranks stay in step
    train_url = upload(client, with_one_corrupt_frame(synthetic_shards / "train", tmp_path), s3_env, "ssv2/train")
    val_url = upload(client, synthetic_shards / "validation", s3_env, "ssv2/validation")
    out = tmp_path / "run"
    shm_buffers = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    # one clip of six is 17 % of an epoch, far over the default data-loss budget of 1 %
    result = train(launcher(2), "--deepspeed", str(small_ds_json(tmp_path)), *SMALL, "--data.train", train_url, "--data.val", val_url,
                   "--train.epochs", "4", "--data.max_skipped_fraction", "0.5", "--out", str(out), env=s3_server.env())
    assert "2 rank(s) on cpu" in result.stdout and "bf16 turned off on CPU" in result.stdout
    # DeepSpeed's CPU all-reduce buffers (69 MB a rank) are not left in /dev/shm
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_buffers
    rows, val_rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # 6 clips / (2 ranks x 1) = 3 steps a epoch
    assert len(val_rows) == 4 and all(r["val_clips"] == 3 for r in val_rows)  # every validation clip once
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert distributed.latest_tag(out) == "step00000012"
    assert (out / "checkpoints" / "step00000012").is_dir() and (out / "head.pt").is_file()
    data_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train_data_corrupt_samples" in line]
    assert len(data_rows) == 4 and all(r["train_data_corrupt_samples"] >= 1 for r in data_rows)  # every epoch meets it
    assert "corrupt samples" in result.stdout
    assert list((out / "tensorboard").iterdir())


@pytest.mark.slow
def test_compiled_backbones_train(synthetic_shards, tmp_path):
    """``train.compile_backbones`` puts the frozen backbones under torch.compile; aot_eager
    traces them (graph breaks, guards) without the minutes inductor needs on this CPU. An
    unknown backend is refused before anything is built."""
    args = ["--deepspeed", str(small_ds_json(tmp_path)), *SMALL, "--data.num_workers", "0", "--data.train",
            str(synthetic_shards / "train"), "--data.val", str(synthetic_shards / "validation"), "--train.max_steps", "2"]
    result = train([sys.executable, "launch/train.py"], *args, "--train.compile_backbones", "aot_eager", "--out",
                   str(tmp_path / "run"))
    assert "backbones: torch.compile, backend aot_eager" in result.stdout
    rows, val = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and val
    refused = subprocess.run([sys.executable, "launch/train.py", *args, "--train.compile_backbones", "fastest", "--out",
                              str(tmp_path / "other")], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "'fastest' is not a torch.compile backend" in refused.stderr


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(synthetic_shards, tmp_path):
    ds_json = small_ds_json(tmp_path)
    args = ["--deepspeed", str(ds_json), *SMALL, "--data.train", str(synthetic_shards / "train"), "--data.val",
            str(synthetic_shards / "validation"), "--train.epochs", "4", "--train.checkpoint_every", "2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(torchrun(2), *args, "--out", str(whole))

    # the same run, killed (SIGKILL, every process) as soon as its first checkpoint is complete
    process = subprocess.Popen([*torchrun(2), *args, "--out", str(broken)], cwd=REPO, env=run_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while distributed.latest_tag(broken) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(process)
    tag = distributed.latest_tag(broken)
    assert tag is not None and tag != "step00000012", f"the run was not interrupted mid-way (latest: {tag})"
    killed_at = int(tag.removeprefix("step"))

    result = train(torchrun(2), *args, "--out", str(broken), "--resume")
    assert f"resumed {broken} at step {killed_at}" in result.stdout
    rows, _ = metrics(broken)
    assert [r["step"] for r in rows] == list(range(1, 13))  # rows past the checkpoint were redone, none twice
    expected, resumed = head_weights(whole), head_weights(broken)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), f"{name} differs from the uninterrupted run"
    assert metrics(whole)[0][-1]["loss"] == rows[-1]["loss"]

    again = subprocess.run([sys.executable, "launch/train.py", *args, "--out", str(broken)], cwd=REPO, env=run_env(),
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # a finished run is not overwritten by accident
