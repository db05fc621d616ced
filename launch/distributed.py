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

import contextlib
import copy
import functools
import json
import logging
import math
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fusion.config import ConfigError
from fusion.model import optimizer_groups, weight_decay_summary

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = "checkpoints"
LATEST = "latest"
# Beside DeepSpeed's files in each checkpoint: the head's whole training state, unpartitioned,
# which a run resumed on another number of ranks loads (DeepSpeed's own ZeRO files hold one
# optimizer partition per rank and load only at the world size that wrote them).
WHOLE_STATE = "whole_state.pt"
# The share of the run spent warming up when ds.json says "warmup_num_steps": "auto"
# (CAST: 5 warmup epochs of 50).
AUTO_WARMUP_FRACTION = 0.1
WARMUP_COSINE_KEYS = {"total_num_steps", "warmup_num_steps", "warmup_min_ratio", "cos_min_ratio", "warmup_type",
                      "last_batch_iteration"}


def environment_defaults() -> None:
    """Defaults that must be in place before ``deepspeed`` is imported; set values win."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    extensions = REPO_ROOT / ".venv" / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in os.environ and extensions.parent.is_dir():
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)


environment_defaults()

import torch.distributed as dist  # noqa: E402

# DeepSpeed itself is imported where it is used, not here: it takes seconds to import, and a
# config error should be reported before that (environment_defaults above is already in place).

_control_group = None  # gloo group for host-side votes (see any_rank)


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


@contextlib.contextmanager
def quiet_unless(speak: bool) -> Iterator[None]:
    """Send this process's stdout and stderr, C level included, to /dev/null unless ``speak``:
    what DeepSpeed and torch print while building ops is the same on every rank, so one rank
    says it. An exception still reaches the terminal: the streams are back before it is shown."""
    if speak:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def init_distributed(local_rank_arg: int | None) -> Ranks:
    """Join the process group (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    rank, world_size, local_rank, local_world_size = rendezvous_environment(local_rank_arg)
    set_cpu_threads(local_world_size)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    with quiet_unless(rank == 0):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(verbose=False)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        remove_shm_buffer_name(rank)
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    global _control_group
    # Votes about the host's state (did every rank get its batch?) travel on CPU tensors over
    # gloo: on NCCL they would need a device tensor and a host sync every micro-batch.
    _control_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Ranks(rank, world_size, local_rank, local_world_size, device)


def remove_shm_buffer_name(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer, once every rank has mapped
    every rank's buffer.

    Its ``deepspeed_shm_comm`` op (used when all ranks share one machine) puts a 69 MB buffer a
    rank in /dev/shm and never removes it: every CPU run left its ranks' buffers behind, and
    this machine's /dev/shm held 204 of them (14 GB) when it was noticed. The op opens the
    other ranks' buffers inside ``init_distributed``, so after a barrier nobody needs the
    names: the memory then goes when the last rank exits, however it exits. The name is the
    op's own (``deepspeed/ops/csrc/cpu/comm/shm.cpp``); where it made none, nothing happens."""
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    try:
        os.unlink(Path("/dev/shm") / name)
    except FileNotFoundError:
        pass


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: all ranks must call it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    vote = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(vote, op=dist.ReduceOp.SUM, group=_control_group)
    return vote.item() > 0


def gather_on_main(value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere); pickled over the CPU
    control group (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0, group=_control_group)
    return gathered


def sum_on_host(values: list[float]) -> list[float]:
    """``values`` summed over ranks on the CPU control group (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_control_group)
    return tensor.tolist()


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


def check_ds_config(config: dict[str, Any]) -> None:
    """What DeepSpeed would only refuse after the model is built: the optimizer and scheduler
    names (and our WarmupCosineLR's params), from DeepSpeed's own name lists. This imports
    DeepSpeed (a few seconds), after the config has been parsed; on ranks but 0 quietly."""
    rank = int(os.environ.get("RANK", "0"))
    with quiet_unless(rank == 0):
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    optimizer = config.get("optimizer")
    if optimizer is not None:
        name = optimizer.get("type") if isinstance(optimizer, dict) else None
        known = isinstance(name, str) and (name.lower() in DEEPSPEED_OPTIMIZERS or isinstance(getattr(torch.optim, name, None), type))
        if not known:
            raise ConfigError(f"ds.json: optimizer type {name!r} is neither one of DeepSpeed's ({', '.join(DEEPSPEED_OPTIMIZERS)}) "
                              "nor a torch.optim class (e.g. AdamW)")
    scheduler = config.get("scheduler")
    if scheduler is not None:
        name = scheduler.get("type") if isinstance(scheduler, dict) else None
        if name not in VALID_LR_SCHEDULES:
            raise ConfigError(f"ds.json: scheduler type {name!r} is not one of {', '.join(VALID_LR_SCHEDULES)}")
        if name == "WarmupCosineLR":
            check_warmup_cosine(scheduler.get("params", {}))


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


def split_scheduler(ds_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the config DeepSpeed gets, the WarmupCosineLR params this module runs itself or None).

    DeepSpeed's own ``WarmupCosineLR`` sets the learning rate for step ``k`` from iteration
    ``k - 2``: the first two optimizer steps run at ``lr * warmup_min_ratio``, i.e. exactly 0
    with the usual ratio 0 (observed: 0, 0, 1e-5, 2e-5 ...). The same schedule is therefore run
    as a torch ``LambdaLR`` (:func:`warmup_cosine_scheduler`), keeping ds.json's keys. Other
    scheduler types go to DeepSpeed unchanged.
    """
    scheduler = ds_config.get("scheduler")
    if not scheduler or scheduler.get("type") != "WarmupCosineLR":
        return ds_config, None
    config = {key: value for key, value in ds_config.items() if key != "scheduler"}
    return config, dict(scheduler.get("params", {}))


def warmup_cosine_ratio(step: int, *, total_num_steps: int, warmup_num_steps: int = 1000, warmup_min_ratio: float = 0.0,
                        cos_min_ratio: float = 0.0001, warmup_type: str = "log", **_: Any) -> float:
    """The learning-rate factor of optimizer step ``step + 1`` (``step`` steps done before it).

    Warm-up from ``warmup_min_ratio`` reaches 1 at step ``warmup_num_steps`` (linearly, or
    along ``log(k + 1) / log(W + 1)`` for ``warmup_type: log``); the very first step already
    has ``1/W`` of the way (``log 2 / log(W + 1)`` for log), not 0. Then a cosine decays to ``cos_min_ratio`` at
    ``total_num_steps`` and stays there. The parameters are DeepSpeed's, with its defaults.
    """
    k, warmup = step + 1, max(1, int(warmup_num_steps))
    if k <= warmup:
        progress = math.log(k + 1) / math.log(warmup + 1) if warmup_type == "log" else k / warmup
        return warmup_min_ratio + (1.0 - warmup_min_ratio) * progress
    decay = min(1.0, (k - warmup) / max(1, total_num_steps - warmup))
    return cos_min_ratio + (1.0 - cos_min_ratio) * (1.0 + math.cos(math.pi * decay)) / 2.0


def check_warmup_cosine(params: dict[str, Any]) -> None:
    """ds.json's WarmupCosineLR params, checked before anything is built."""
    unknown = set(params) - WARMUP_COSINE_KEYS
    if unknown:
        raise ConfigError(f"ds.json: WarmupCosineLR has no parameter(s) {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(sorted(WARMUP_COSINE_KEYS))}")
    for key in ("total_num_steps", "warmup_num_steps"):
        value = params.get(key, 1 if key == "warmup_num_steps" else None)
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"ds.json: WarmupCosineLR {key} must be a positive integer or \"auto\", got {value!r}")
    if params.get("warmup_type", "log") not in ("log", "linear"):
        raise ConfigError(f"ds.json: WarmupCosineLR warmup_type must be log or linear, got {params['warmup_type']!r}")


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, **params: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """ds.json's ``WarmupCosineLR`` as a ``LambdaLR`` (see :func:`split_scheduler` for why)."""
    check_warmup_cosine(params)
    params.pop("last_batch_iteration", None)  # resume restores the scheduler's own state instead
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_warmup_cosine_factor, params))


def _warmup_cosine_factor(params: dict[str, Any], step: int) -> float:
    return warmup_cosine_ratio(step, **params)


def wrap_head(head: torch.nn.Module, ds_config: dict[str, Any], log: Callable[[str], None] = lambda _: None) -> Any:
    """DeepSpeed engine around the head only; the frozen backbones never enter DeepSpeed
    (ZeRO-2 with frozen parameters has open bugs, and bf16 would cast them).

    The optimizer gets two parameter groups: ds.json's ``weight_decay`` on weight matrices,
    none on norms, biases and time embeddings (:func:`fusion.model.optimizer_groups`); a
    ``WarmupCosineLR`` in ds.json is run by :func:`warmup_cosine_scheduler`.
    """
    decay = float(ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
    groups = optimizer_groups(head, decay)
    summary = weight_decay_summary(groups)
    log(f"weight decay {decay:g} on {summary['decayed']['tensors']} weight matrices; none on "
        f"{summary['not_decayed']['tensors']} norm, bias and time-embedding tensors")
    config, schedule = split_scheduler(ds_config)
    scheduler = None if schedule is None else (lambda optimizer: warmup_cosine_scheduler(optimizer, **schedule))
    import deepspeed

    with quiet_unless(not dist.is_initialized() or dist.get_rank() == 0):
        engine, _, _, _ = deepspeed.initialize(
            model=head, model_parameters=[{k: v for k, v in g.items() if k != "names"} for g in groups],
            config=config, lr_scheduler=scheduler,
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


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _link_moments(engine: Any) -> None:
    """Point ZeRO's per-parameter fragments at the optimizer's current state. DeepSpeed 0.19.8
    links them once, right after the first group's first step (it steps one parameter group at
    a time), so the other groups' fragments stay empty and ``safe_get_full_optimizer_state``
    fails for them ("exp_avg not found"); linking again once every group has state fixes that."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked") and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _moment_keys(engine: Any) -> list[str]:
    """The optimizer's per-parameter state tensors (AdamW: ``exp_avg``, ``exp_avg_sq``)."""
    for state in _inner_optimizer(engine).state.values():
        return sorted(key for key, value in state.items() if key != "step" and torch.is_tensor(value) and value.dim() > 0)
    return []


def whole_training_state(engine: Any, client_state: dict[str, Any]) -> dict[str, Any]:
    """The head's training state, whole: fp32 master weights, optimizer moments and step,
    scheduler, DeepSpeed's counters and ``client_state``. Every rank must call it (ZeRO's
    partitions are gathered); it is the same on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_moments(engine)
    keys = _moment_keys(engine)
    params = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            params[name] = {"fp32": safe_get_full_fp32_param(param).float().cpu().clone(),
                            **{key: safe_get_full_optimizer_state(param, key).float().cpu().clone() for key in keys}}
    steps = [state["step"] for state in _inner_optimizer(engine).state.values() if "step" in state]
    scheduler = getattr(engine, "lr_scheduler", None)
    return {"params": params, "moments": keys, "buffers": {k: v.detach().cpu().clone() for k, v in engine.module.named_buffers()},
            "optimizer_step": float(steps[0]) if steps else 0.0, "scheduler": scheduler.state_dict() if scheduler else None,
            "global_steps": engine.global_steps, "global_samples": engine.global_samples, "client_state": client_state}


def load_whole_training_state(engine: Any, state: dict[str, Any]) -> None:
    """Put :func:`whole_training_state` into an engine of any number of ranks (all call it)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = _inner_optimizer(engine)
    if not inner.state:
        # torch optimizers make their state at the first step, and ZeRO links its fragments to
        # it only then (DeepSpeed's own universal-checkpoint loading does the same as below)
        if not hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            raise ConfigError(f"cannot load a whole training state into {type(engine.optimizer).__name__}: resume with the layout "
                              "the run was saved with")
        for group in inner.param_groups:
            for flat in group["params"]:
                inner.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                     **{key: torch.zeros_like(flat) for key in state["moments"]}}
    _link_moments(engine)
    keys = _moment_keys(engine)
    if keys != state["moments"]:
        raise ConfigError(f"the checkpoint's optimizer kept {state['moments']}, this one keeps {keys}: resume with the run's ds.json")
    named = dict(engine.module.named_parameters())
    if set(state["params"]) != {name for name, param in named.items() if param.requires_grad}:
        raise ConfigError("the checkpoint's head has other parameters than this one: resume with the run's model config")
    for name, entry in state["params"].items():
        param = named[name]
        safe_set_full_fp32_param(param, entry["fp32"].to(param.device))
        for key in keys:
            safe_set_full_optimizer_state(param, entry[key].to(param.device), key)
        with torch.no_grad():  # the module's own (bf16) copy: ZeRO refreshes it from the masters only after a step
            param.copy_(entry["fp32"].to(param.dtype))
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            buffer.copy_(state["buffers"][name])
    for optimizer_state in _inner_optimizer(engine).state.values():
        if "step" in optimizer_state:
            step = optimizer_state["step"]
            optimizer_state["step"] = (torch.full_like(step, state["optimizer_step"]) if torch.is_tensor(step)
                                       else type(step)(state["optimizer_step"]))
    if state["scheduler"] is not None and getattr(engine, "lr_scheduler", None) is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
        # the rate the next step uses: the scheduler set it on the groups after the last step
        for group, rate in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = rate
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]


def read_whole_state(out: Path, tag: str) -> dict[str, Any] | None:
    """The whole training state saved with checkpoint ``tag`` (memory-mapped), or None for a
    checkpoint written before it existed."""
    path = checkpoint_dir(out) / tag / WHOLE_STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def latest_tag(out: Path) -> str | None:
    """The tag of the newest complete checkpoint under ``out``, or None."""
    marker = checkpoint_dir(out) / LATEST
    return marker.read_text().strip() if marker.is_file() else None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the path and the cause."""


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes_estimate(engine: Any) -> int:
    """Bytes a first checkpoint of the head needs: its weights as the module holds them, plus
    ZeRO's fp32 master copy and Adam's two moments (12 bytes a parameter), plus 1 MiB."""
    params = list(engine.module.parameters())
    return sum(p.numel() * (p.element_size() + 12) for p in params) + (1 << 20)


def write_error(error: BaseException, target: Path) -> str:
    """What went wrong writing ``target``, in words: torch's C++ writer reports a full disk as
    ``basic_ios::clear: iostream error`` or ``unexpected pos``, so the free space decides."""
    if isinstance(error, OSError) and error.errno:
        return f"{os.strerror(error.errno)} ({error.filename or target})"
    free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
    if free < (1 << 20):
        return f"No space left on device ({free:,} bytes free where {target} is written; {type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def _shared(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective on the control group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def _gathered(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (a collective on the control group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_control_group)
    return values


def save_checkpoint(engine: Any, out: Path, step: int, client_state: dict[str, Any], *, keep: int, is_main: bool,
                    check_space: bool = True, whole_state: dict[str, Any] | None = None) -> str:
    """Save head, optimizer, scheduler and ``client_state`` under ``out/checkpoints/stepNNNNNNNN``.

    All ranks call this. ``latest`` moves (atomically) only after every rank has written its
    optimizer partition (and rank 0 ``whole_state``, :func:`whole_training_state`, as
    ``WHOLE_STATE``); then all but the ``keep`` newest checkpoints are deleted (0 keeps all).

    A checkpoint that cannot be written raises :class:`CheckpointError` on every rank, naming
    the path and the cause, and leaves no partial folder behind; ``latest`` and the previous
    checkpoint stay as they were. With ``check_space``, rank 0 first checks that the folder's
    filesystem has room for a checkpoint (the size of the previous one, or an estimate).
    """
    directory = checkpoint_dir(out)
    tag = f"step{step:08d}"
    target = directory / tag
    problem = None
    if is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            previous = latest_tag(out)
            if check_space:
                need = _tree_bytes(directory / previous) if previous and (directory / previous).is_dir() else checkpoint_bytes_estimate(engine)
                free = shutil.disk_usage(directory).free
                if free < need + need // 10:
                    problem = f"No space left on device: a checkpoint needs about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free there"
        except OSError as error:
            problem = write_error(error, target)
    problem = _shared(problem)
    if problem is not None:
        raise CheckpointError(f"cannot write checkpoint {target}: {problem}; {_previous_words(out)}")

    failure = None
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    except Exception as error:  # a full disk, a quota, a vanished mount: reported below on every rank
        failure = write_error(error, target)
        # DeepSpeed's collectives (a barrier after rank 0's makedirs, the tag check) come
        # before its writes, and the folder exists already (made above), so a failure can only
        # be in the writes; what is left is its closing barrier, where the others wait.
        barrier()
    if failure is None and is_main and whole_state is not None:
        try:
            torch.save(whole_state, target / f".{WHOLE_STATE}.tmp")
            os.replace(target / f".{WHOLE_STATE}.tmp", target / WHOLE_STATE)
        except Exception as error:
            failure = write_error(error, target / WHOLE_STATE)
    failures = _gathered(failure)
    if any(f is not None for f in failures):
        if is_main:
            shutil.rmtree(target, ignore_errors=True)
        barrier()
        reasons = sorted({f for f in failures if f is not None})
        raise CheckpointError(f"could not write checkpoint {target}: {'; '.join(reasons)}; the partial folder was removed; "
                              f"{_previous_words(out)}")
    problem = None
    if is_main:
        try:
            staging = directory / f".{LATEST}.tmp"
            staging.write_text(tag)
            os.replace(staging, directory / LATEST)
        except OSError as error:  # the checkpoint is whole, but `latest` still names the one before
            problem = write_error(error, directory / LATEST)
        if problem is None and keep > 0:
            tags = sorted(p.name for p in directory.glob("step*") if p.is_dir())
            for old in tags[:-keep]:
                if old != tag:
                    shutil.rmtree(directory / old, ignore_errors=True)
    problem = _shared(problem)
    if problem is not None:
        raise CheckpointError(f"checkpoint {target} was written but {directory / LATEST} could not be moved to it: {problem}; "
                              f"{_previous_words(out)}")
    return tag


def _previous_words(out: Path) -> str:
    previous = latest_tag(out)
    if previous is None:
        return "there is no earlier checkpoint"
    return f"the last checkpoint, {checkpoint_dir(out) / previous}, is intact (--resume continues from it)"


def load_checkpoint(engine: Any, out: Path) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint under ``out`` into ``engine``; its client state,
    or None when there is none.

    Rank 0's ``latest`` decides for every rank: were each rank to read its own, a node whose
    ``--out`` is not the shared folder would see no checkpoint and start over while the others
    resume, and the collectives would hang. Every rank must see the chosen checkpoint, or all
    stop with the reason.
    """
    tag = _shared(latest_tag(out))
    if tag is None:
        return None
    from deepspeed.accelerator import get_accelerator

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
