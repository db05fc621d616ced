"""Ranks, DeepSpeed and checkpoints: everything the training knows about processes.

``launch/train.py`` is the loop; this module is the glue under it:

- :func:`environment_defaults` runs at import, before ``deepspeed`` is imported (DeepSpeed
  picks its accelerator then): ``DS_ACCELERATOR=cpu`` on a machine without CUDA, and
  ``TORCH_EXTENSIONS_DIR=<repo>/.venv/torch_extensions`` when unset and the repo has a
  ``.venv``, so the CPU comm op DeepSpeed JIT-builds at start (~70 s cold) is built once per
  checkout and reused by every process, test and launcher; elsewhere torch's default cache.
- :func:`init_distributed` works under the ``deepspeed`` launcher (``--local_rank=N``),
  under ``torchrun`` (environment only) and as a plain single process (it fills in the
  rendezvous variables itself); it sizes torch's CPU threads to the cores each rank gets.
- :func:`batch_plan` and :func:`adapt_ds_config` check ``ds.json``'s batch arithmetic up front
  and fill in what only the data knows (the schedule's ``"auto"`` lengths).
- :func:`save_checkpoint` / :func:`load_checkpoint` wrap DeepSpeed's, moving ``latest`` only
  once every rank's files are on disk, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fusion.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = "checkpoints"
LATEST = "latest"
# The share of the run spent warming up when ds.json says "warmup_num_steps": "auto"
# (CAST: 5 warmup epochs of 50).
AUTO_WARMUP_FRACTION = 0.1


def environment_defaults() -> None:
    """Defaults that must be in place before ``deepspeed`` is imported; set values win."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    extensions = REPO_ROOT / ".venv" / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in os.environ and extensions.parent.is_dir():
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)


environment_defaults()

import deepspeed  # noqa: E402  (after environment_defaults: it reads them at import)
import torch.distributed as dist  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous_environment(local_rank_arg: int | None) -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from the launcher's environment.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; the deepspeed launcher
    sets the same but LOCAL_SIZE for the local world and also passes ``--local_rank``; a plain
    ``python launch/train.py`` sets nothing and becomes a one-process job on a free port.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_arg if local_rank_arg is not None else 0)
    local_world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), int(local_world)


def set_cpu_threads(local_world_size: int) -> int:
    """Give each rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    The deepspeed launcher does not set OMP_NUM_THREADS, and ranks that each take every core
    slow each other down (49 ms against 17 ms a step with two ranks on two cores).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def init_distributed(local_rank_arg: int | None) -> Ranks:
    """Join the process group (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    rank, world_size, local_rank, local_world_size = rendezvous_environment(local_rank_arg)
    set_cpu_threads(local_world_size)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    deepspeed.init_distributed(verbose=False)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    return Ranks(rank, world_size, local_rank, local_world_size, device)


def on_gpu(ranks: Ranks) -> bool:
    return ranks.device.type != "cpu"


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place, and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- ds.json


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON config at ``path``; a clear error when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist: pass --deepspeed PATH (the repo's ds.json is the template)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return config


@dataclass(frozen=True)
class BatchPlan:
    """Clips per rank per forward (micro), micro-batches per optimizer step, ranks."""

    micro: int
    accumulation: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world_size


def batch_plan(ds_config: dict[str, Any], world_size: int) -> BatchPlan:
    """Resolve and check ``train_micro_batch_size_per_gpu`` x ``gradient_accumulation_steps``
    x ranks = ``train_batch_size`` before DeepSpeed does (its assertion names no fix)."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    total = ds_config.get("train_batch_size")
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accumulation), ("train_batch_size", total)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"ds.json: {key} must be a positive integer, got {value!r}")
    if micro is None:
        if total is None:
            raise ConfigError("ds.json: set train_micro_batch_size_per_gpu (clips per rank per step) or train_batch_size")
        if total % (accumulation * world_size):
            raise ConfigError(
                f"ds.json: train_batch_size {total} does not divide by gradient_accumulation_steps {accumulation} x "
                f"{world_size} ranks = {accumulation * world_size}: make it a multiple of {accumulation * world_size}, "
                "or set train_micro_batch_size_per_gpu instead"
            )
        micro = total // (accumulation * world_size)
    elif total is not None and total != micro * accumulation * world_size:
        raise ConfigError(
            f"ds.json: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
            f"{accumulation} x {world_size} ranks = {micro * accumulation * world_size}: drop train_batch_size "
            "(it is derived) or make the three agree"
        )
    return BatchPlan(micro=micro, accumulation=accumulation, world_size=world_size)


def resolve_schedule(params: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """Scheduler params with ``"auto"`` filled in: ``total_num_steps`` = the run's optimizer
    steps (from the manifest, epochs and max_steps), ``warmup_num_steps`` = a tenth of them."""
    resolved = dict(params)
    for key, value in params.items():
        if value != "auto":
            continue
        if key == "total_num_steps":
            resolved[key] = total_steps
        elif key == "warmup_num_steps":
            resolved[key] = max(1, round(AUTO_WARMUP_FRACTION * total_steps))
        else:
            raise ConfigError(f"ds.json: scheduler param {key} cannot be \"auto\" (only total_num_steps and warmup_num_steps)")
    return resolved


def adapt_ds_config(ds_config: dict[str, Any], *, total_steps: int, gpu: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The config DeepSpeed gets: schedule lengths filled in; on CPU, mixed precision off
    (bf16 runs 6-60x slower than fp32 on CPUs without AVX-512 BF16)."""
    config = copy.deepcopy(ds_config)
    if not gpu:
        for key in ("bf16", "fp16"):
            if config.get(key, {}).get("enabled"):
                config[key]["enabled"] = False
                log(f"ds.json: {key} turned off on CPU (much slower than fp32 here); the head trains in fp32")
    scheduler = config.get("scheduler")
    if scheduler:
        scheduler["params"] = resolve_schedule(scheduler.get("params", {}), total_steps)
    return config


def wrap_head(head: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """DeepSpeed engine around the head only; the frozen backbones never enter DeepSpeed
    (ZeRO-2 with frozen parameters has open bugs, and bf16 would cast them)."""
    engine, _, _, _ = deepspeed.initialize(
        model=head, model_parameters=[p for p in head.parameters() if p.requires_grad], config=ds_config
    )
    return engine


def full_fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The head's weights in fp32 as the optimizer holds them (ZeRO keeps fp32 masters beside
    bf16 module weights). Every rank must call it: the masters are partitioned."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        state[name] = (master if master is not None else param.detach()).float().cpu().clone()
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    return state


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def latest_tag(out: Path) -> str | None:
    """The tag of the newest complete checkpoint under ``out``, or None."""
    marker = checkpoint_dir(out) / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def save_checkpoint(engine: Any, out: Path, step: int, client_state: dict[str, Any], *, keep: int, is_main: bool) -> str:
    """Save head, optimizer, scheduler and ``client_state`` under ``out/checkpoints/stepNNNNNNNN``.

    All ranks call this. ``latest`` moves (atomically) only after every rank has written its
    optimizer partition; then all but the ``keep`` newest checkpoints are deleted (0 keeps all).
    """
    directory = checkpoint_dir(out)
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if is_main:
        staging = directory / f".{LATEST}.tmp"
        staging.write_text(tag)
        os.replace(staging, directory / LATEST)
        if keep > 0:
            tags = sorted(p.name for p in directory.glob("step*") if p.is_dir())
            for old in tags[:-keep]:
                if old != tag:
                    shutil.rmtree(directory / old, ignore_errors=True)
    barrier()
    return tag


def load_checkpoint(engine: Any, out: Path) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint under ``out`` into ``engine``; its client state,
    or None when there is none.

    Rank 0's ``latest`` decides for every rank: were each rank to read its own, a node whose
    ``--out`` is not the shared folder would see no checkpoint and start over while the others
    resume, and the collectives would hang. Every rank must see the chosen checkpoint, or all
    stop with the reason.
    """
    tag = latest_tag(out)
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [tag]
        dist.broadcast_object_list(shared, src=0)
        tag = shared[0]
    if tag is None:
        return None
    device = get_accelerator().current_device_name()
    missing = all_reduce_sum(torch.tensor([0.0 if (checkpoint_dir(out) / tag).is_dir() else 1.0], device=device))
    if missing.item():
        raise ConfigError(
            f"checkpoint {checkpoint_dir(out) / tag} is missing on {int(missing.item())} rank(s): --out must be a folder "
            "that every node shares (e.g. a network filesystem)"
        )
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(out)), tag=tag)
    if path is None:
        raise ConfigError(f"checkpoint {checkpoint_dir(out) / tag} could not be loaded (incomplete?): delete it and fix {LATEST}")
    return client_state
