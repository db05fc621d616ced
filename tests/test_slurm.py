"""slurm/train.sbatch on a real Slurm (slurmctld and two slurmd on loopback, from Debian's
slurm-wlm), and preemption that loses nothing: under Slurm (SIGUSR1 before the time limit,
SIGTERM when the job is requeued) and under plain torchrun and the deepspeed launcher.

A run records which clips every micro-batch took (``train.record_samples``); an interrupted
and resumed run must have taken exactly the clips of an uninterrupted one, every clip once an
epoch, and end with bit-identical head weights (CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launch import distributed
from tests.conftest import SlurmCluster, _free_ports
from tests.test_train import REPO, RUN_TIMEOUT_S, SMALL, deepspeed_launcher, head_weights, metrics, run_env, small_ds_json, torchrun

EPOCHS = "30"  # 6 clips / 2 ranks = 3 steps an epoch: 90 steps, long enough to interrupt twice


def training_args(shards: Path, ds_json: Path, out: Path, epochs: str = EPOCHS) -> list[str]:
    return ["--deepspeed", str(ds_json), *SMALL, "--data.train", str(shards / "train"), "--data.val", str(shards / "validation"),
            "--train.epochs", epochs, "--train.log_every", "1", "--train.record_samples", "true", "--out", str(out)]


def samples(out: Path) -> dict[str, list[dict]]:
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()] for path in sorted((out / "samples").glob("*.jsonl"))}


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [row["step"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]
    return max(steps, default=0)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def reference(synthetic_shards, tmp_path_factory):
    """The uninterrupted run every interrupted one must match (2 ranks, torchrun)."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "run"
    result = subprocess.run([*torchrun(2), *training_args(synthetic_shards, small_ds_json(folder), out)], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_run(out: Path, reference: Path, train_keys: set[str]) -> None:
    taken, expected = samples(out), samples(reference)
    assert taken == expected, "the resumed run took other clips than the uninterrupted one"
    by_epoch: dict[int, list[str]] = {}
    for rows in taken.values():
        for row in rows:
            by_epoch.setdefault(row["epoch"], []).extend(row["keys"])
    assert len(by_epoch) == int(EPOCHS)
    assert all(sorted(keys) == sorted(train_keys) for keys in by_epoch.values()), "a clip twice, or missing, in an epoch"
    assert [r["step"] for r in metrics(out)[0]] == list(range(1, 3 * int(EPOCHS) + 1))
    ours, theirs = head_weights(out), head_weights(reference)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs), "head weights differ from the uninterrupted run"


def train_keys(shards: Path) -> set[str]:
    import webdataset as wds

    return {sample["__key__"] for sample in wds.WebDataset(str(shards / "train" / "shard-{000000..000002}.tar"), shardshuffle=False)}


# ----------------------------------------------------------------------------- plain launchers


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [torchrun, deepspeed_launcher], ids=["torchrun", "deepspeed"])
def test_sigterm_checkpoints_and_the_resumed_run_matches(launcher, reference, synthetic_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [*launcher(2), *training_args(synthetic_shards, small_ds_json(tmp_path), out)]
    process = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_until(lambda: last_step(out) >= 10 or process.poll() is not None, RUN_TIMEOUT_S, "step 10")
    # what a scheduler or a terminal does: SIGTERM to the launcher's whole process group
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode != 0
    assert "launch/train.py: stopped: SIGTERM received: stopped at step" in stderr, stderr[-3000:]
    stopped_at = int(distributed.latest_tag(out).removeprefix("step"))
    assert 10 <= stopped_at < 90 and last_step(out) == stopped_at  # every step it trained is in that checkpoint

    resumed = subprocess.run([*launcher(2), *cmd[len(launcher(2)):], "--resume"], cwd=REPO, env=run_env(), capture_output=True,
                             text=True, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {out} at step {stopped_at}" in resumed.stdout
    assert_same_run(out, reference, train_keys(synthetic_shards))


# ----------------------------------------------------------------------------- Slurm


def sbatch(cluster: SlurmCluster, log: Path, *args: str, **env: str) -> str:
    port = str(_free_ports(1)[0])
    result = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--nodes=2", f"--output={log}",
                             "slurm/train.sbatch", *args], cwd=REPO, env=cluster.env(MASTER_PORT=port, **run_env_extra(), **env),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def run_env_extra() -> dict[str, str]:
    env = run_env()
    return {key: env[key] for key in ("HF_HUB_OFFLINE", "DS_ACCELERATOR", "PYTHONUNBUFFERED", "TORCH_EXTENSIONS_DIR")}


def job_done(cluster: SlurmCluster, job: str) -> bool:
    return cluster.job(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.mark.slow
def test_sbatch_trains_one_world_over_two_nodes(slurm_cluster, synthetic_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "slurm.out"
    job = sbatch(slurm_cluster, log, *training_args(synthetic_shards, small_ds_json(tmp_path), out, epochs="2"))
    wait_until(lambda: job_done(slurm_cluster, job), RUN_TIMEOUT_S, f"job {job} to end")
    state = slurm_cluster.job(job)
    text = log.read_text(errors="replace")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-3000:]
    assert "2 node(s) [n1 n2], 1 rank(s) per node, world size 2" in text  # no GPU: one rank a node
    assert "2 rank(s) on cpu" in text and distributed.latest_tag(out) == "step00000006" and (out / "head.pt").is_file()
    # what every rank would say alike is said once
    assert text.count("backbone i3d_r50 has RANDOM weights") <= 2  # rank 0's log line and its Python warning
    assert text.count("deepspeed_shm_comm_op built successfully") <= 1


@pytest.mark.slow
def test_nproc_per_node_sets_the_ranks_of_every_node(slurm_cluster, synthetic_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "slurm.out"
    job = sbatch(slurm_cluster, log, *training_args(synthetic_shards, small_ds_json(tmp_path), out, epochs="1"),
                 "--train.max_steps", "1", "--data.num_workers", "0", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    wait_until(lambda: job_done(slurm_cluster, job), RUN_TIMEOUT_S, f"job {job} to end")
    text = log.read_text(errors="replace")
    assert slurm_cluster.job(job)["JobState"] == "COMPLETED", text[-3000:]
    assert "2 node(s) [n1 n2], 2 rank(s) per node, world size 4" in text and "4 rank(s) on cpu" in text


@pytest.mark.slow
def test_a_preempted_job_comes_back_and_loses_nothing(slurm_cluster, reference, synthetic_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "slurm.out"
    # one thread a rank, as torchrun gives the reference's two ranks on one node: the same sums
    # in the same order, so the weights can be compared bit for bit
    job = sbatch(slurm_cluster, log, *training_args(synthetic_shards, small_ds_json(tmp_path), out), OMP_NUM_THREADS="1")

    def requeued(times: int) -> bool:
        fields = slurm_cluster.job(job)
        return int(fields["Restarts"]) >= times and fields["JobState"] == "PENDING"

    # 1. the time-limit warning: the ranks checkpoint and rank 0 requeues the job itself
    wait_until(lambda: last_step(out) >= 10 or job_done(slurm_cluster, job), RUN_TIMEOUT_S, "step 10")
    slurm_cluster.run("scancel", "--signal=USR1", job)
    wait_until(lambda: requeued(1), RUN_TIMEOUT_S, "the job to requeue itself")
    first_stop = int(distributed.latest_tag(out).removeprefix("step"))
    slurm_cluster.run("scontrol", "update", f"jobid={job}", "starttime=now")  # skip Slurm's requeue delay (~2 min)

    # 2. preemption: Slurm requeues the job and sends SIGTERM to all of it
    wait_until(lambda: last_step(out) >= first_stop + 10 or job_done(slurm_cluster, job), RUN_TIMEOUT_S, "10 more steps")
    slurm_cluster.run("scontrol", "requeue", job)
    wait_until(lambda: requeued(2), RUN_TIMEOUT_S, "the requeue")
    second_stop = int(distributed.latest_tag(out).removeprefix("step"))
    slurm_cluster.run("scontrol", "update", f"jobid={job}", "starttime=now")

    wait_until(lambda: job_done(slurm_cluster, job), RUN_TIMEOUT_S, "the job to finish")
    text = log.read_text(errors="replace")
    assert slurm_cluster.job(job)["JobState"] == "COMPLETED", text[-3000:]
    assert "stopped: SIGUSR1 received" in text  # and it came back: rank 0 requeued it (the test did not)
    # no loader worker, forkserver or resource tracker died of the signals meant for the trainer
    assert "exited unexpectedly" not in text and "KeyError" not in text
    assert "stopped: SIGTERM received" in text
    assert "(restart 1)" in text and "(restart 2)" in text
    assert f"resumed {out} at step {first_stop}" in text and f"resumed {out} at step {second_stop}" in text
    assert first_stop < second_stop < 90
    assert_same_run(out, reference, train_keys(synthetic_shards))
