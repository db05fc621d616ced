"""Train the fusion head with DeepSpeed ZeRO-2 on WebDataset shards (a folder or s3://).

    deepspeed launch/train.py --deepspeed ds.json                  # every GPU of this node
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds.json     # no GPU: 2 CPU ranks, gloo
    torchrun --nproc_per_node N launch/train.py --deepspeed ds.json
    python launch/train.py [--config launch/configs/NAME.yaml] [--data.train URL] [--data.val URL]
        [--model.KEY V] [--train.epochs N] [--train.max_steps N] [--train.seed S] [--out DIR] [--resume]

Without ``--config`` the run uses ``launch/configs/default.yaml`` when CUDA is present and
``launch/configs/debug.yaml`` (the CPU demo size) when not; without ``--data.*`` it reads the
synthetic shards ``make demo`` writes (``data/synthetic/shards/{train,validation}``).
Batch sizes, optimizer and schedule live in ``ds.json``; ``"auto"`` schedule lengths are
filled from the manifest (see :mod:`launch.distributed`). ``--help`` lists every config key.

The frozen backbones are plain modules on the device (bf16 on GPUs, fp32 on CPU); DeepSpeed
wraps only the head. ``data.train``/``data.val`` may instead be **feature shards** written by
``launch/extract_features.py`` (their manifest says so): then the backbones are never run, the
head trains on the cached features, and a manifest made by another model or loader config is
refused with the differences named. ``--out`` receives ``checkpoints/``, ``metrics.jsonl``, TensorBoard
events, the resolved configs and, at the end, ``head.pt`` (fp32 head weights + model config).

Resume: a checkpoint stores the data position (epoch, micro-batches done in it); the data
order is a pure function of (seed, epoch, rank, world size, workers, batch size), so the
resumed loader skips exactly the batches already trained on. Dropout is seeded per
micro-batch from the same coordinates, so a resumed run repeats the interrupted one exactly.
A resume on other ranks, workers or micro-batch (same global batch) loads the checkpoint's
whole training state instead of DeepSpeed's per-rank files and replans the epoch's untrained
rest for the new layout (:func:`restore`, :class:`fusion.data.Stint`).

Start reading at :func:`main`; the loop is :func:`fit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # `python launch/train.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from launch import distributed  # first: sets DeepSpeed's environment before anything imports it
from fusion.backbones.weights import RandomWeightsWarning, WeightsError
from fusion.config import ConfigError, load, option, render_help, to_dict
from fusion.features import check_compatible, expected_record
from fusion.data import ERROR_KEYS, DataConfig, Loader, Sampling, ShardSet, Stint, batches_per_rank, train_loader, val_loader
from fusion.model import FusionClassifier, ModelConfig, build_model, format_report, parameter_report
from launch.distributed import BatchPlan, Ranks
from sharding import storage

CONFIGS = distributed.REPO_ROOT / "launch" / "configs"
DS_JSON = distributed.REPO_ROOT / "ds.json"


@dataclass(frozen=True)
class TrainConfig:
    """How long to train and how often to log, validate and save (batch sizes: ds.json)."""

    epochs: int = option(10, "passes over the training shards")
    max_steps: int = option(0, "stop after this many optimizer steps in all (0: run every epoch); also shortens the schedule")
    seed: int = option(0, "seeds the head's initialisation, the data order and crops, and dropout")
    checkpoint_every: int = option(1000, "also checkpoint every N optimizer steps (0: only at the end of each epoch)")
    keep_checkpoints: int = option(3, "checkpoints kept in OUT/checkpoints, oldest deleted first (0: keep all)")
    log_every: int = option(20, "optimizer steps between rows of metrics.jsonl / TensorBoard")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    val_batch_size: int = option(0, "clips per rank per validation batch (0: ds.json's micro batch)")
    record_samples: bool = option(
        False, "write the clip ids of every micro-batch to OUT/samples/rank-R.jsonl (to audit the data order; resumes keep it exact)"
    )
    requeue_on_usr1: bool = option(
        True, "under Slurm, after the checkpoint SIGUSR1 (the time-limit warning) asks for, rank 0 requeues the job (scontrol requeue)"
    )
    deterministic: bool = option(
        False,
        "deterministic GPU kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG), so that a resumed "
        "run repeats an uninterrupted one bit for bit on GPUs too; CPU runs are deterministic without it; "
        "costs GPU speed (not measured here)",
    )
    compile_backbones: str = option(
        "",
        "torch.compile the frozen backbones with this backend: '' (off), 'inductor' (on one H100 it gave 1.31x clips/s "
        "and took 24 s to compile, measured before the I3D stem change; README: GPU check), or any backend "
        "torch._dynamo.list_backends() names ('aot_eager' traces without generating code: a quick check)",
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "keep_checkpoints", "val_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.compile_backbones:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backbones not in known:
                raise ConfigError(f"train.compile_backbones: {self.compile_backbones!r} is not a torch.compile backend; "
                                  f"known: {', '.join(known)} ('' turns it off)")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run reads from ``--config`` and ``--section.key`` overrides."""

    model: ModelConfig = option(factory=ModelConfig, doc="the model (python -m fusion --help)")
    data: DataConfig = option(factory=DataConfig, doc="the shards and the loader")
    train: TrainConfig = option(factory=TrainConfig, doc="the training loop")


@dataclass
class Position:
    """Where in the data the run stands: ``batch`` micro-batches of ``epoch`` are done. After
    a resume with another layout, ``stints`` lists the layouts that trained parts of this
    epoch before (:class:`fusion.data.Stint` as dicts), and ``batch`` counts in the rest."""

    epoch: int = 0
    batch: int = 0
    stints: list[dict[str, int]] = dataclasses.field(default_factory=list)

    def at(self, batch: int) -> "Position":
        """The same epoch and stints, ``batch`` micro-batches in."""
        return Position(self.epoch, batch, list(self.stints))


# ----------------------------------------------------------------------------- command line


def default_config_path() -> Path:
    return CONFIGS / ("default.yaml" if torch.cuda.is_available() else "debug.yaml")


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, RunConfig]:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train the fusion head with DeepSpeed (see the module docstring for launch commands).",
        epilog="config keys (YAML sections, or --section.key VALUE on the command line):\n" + render_help(RunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, help="YAML config (default: launch/configs/default.yaml with CUDA, debug.yaml without)")
    parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", type=Path, default=DS_JSON, metavar="DS_JSON",
                        help="DeepSpeed config: batch sizes, optimizer, schedule (default: the repo's ds.json)")
    parser.add_argument("--out", type=Path, help="run folder for checkpoints and logs (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (fresh start if none)")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher; LOCAL_RANK wins")
    args, rest = parser.parse_known_args(argv)
    args.config_chosen = args.config is not None
    if args.config is None:
        args.config = default_config_path()
    cfg, unknown = load(RunConfig, args.config, rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.out is None:
        args.out = Path("runs") / args.config.stem
    data = dataclasses.replace(cfg.data, train=resolve_data_url(cfg.data.train), val=resolve_data_url(cfg.data.val))
    return args, dataclasses.replace(cfg, data=data)


def resolve_data_url(url: str) -> str:
    """Relative shard folders are looked up from the current folder, then from the repo root
    (so the embedded default finds the demo's shards from anywhere)."""
    if storage.is_s3_url(url) or Path(url).is_absolute() or Path(url).exists():
        return url
    in_repo = distributed.REPO_ROOT / url
    return str(in_repo) if in_repo.exists() else url


# ----------------------------------------------------------------------------- set-up checks


def open_data(cfg: RunConfig) -> tuple[ShardSet, ShardSet]:
    """Both shard sets, with their class counts checked against the model's."""
    train_set, val_set = ShardSet.open(cfg.data.train), ShardSet.open(cfg.data.val)
    if train_set.is_features != val_set.is_features:
        kinds = {True: "feature shards", False: "frame shards"}
        raise ConfigError(f"data.train {train_set.url} holds {kinds[train_set.is_features]} and data.val {val_set.url} "
                          f"{kinds[val_set.is_features]}: use one kind for both (launch/extract_features.py makes features)")
    for name, shards in (("data.train", train_set), ("data.val", val_set)):
        if shards.num_classes != cfg.model.num_classes:
            raise ConfigError(
                f"{name} {shards.url} has {shards.num_classes} classes but model.num_classes is {cfg.model.num_classes}: "
                "set --model.num_classes to match or point at the right shards"
            )
    if cfg.data.flip:
        train_set.check_flip_labels()
    if train_set.is_features:
        return train_set, val_set  # what made them is checked against the model (check_features)
    train_sampling, val_sampling = Sampling.of(cfg.data, train_set), Sampling.of(cfg.data, val_set)
    if train_sampling.frames != val_sampling.frames:
        raise ConfigError(f"data.train holds {train_set.frames} frames per clip, data.val {val_set.frames}, and data.frames is 0 "
                          "(all of them): set data.frames to the frames the model sees, or shard both with the same --frames")
    if val_set.manifest.get("num_rejected") and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {val_set.url} lacks {val_set.manifest['num_rejected']} clip(s) of its split that could not be packed "
              "(its rejects.jsonl): validation figures are not comparable with published ones", file=sys.stderr)
    return train_set, val_set


def check_features(cfg: RunConfig, model: FusionClassifier, *shard_sets: ShardSet) -> None:
    """Feature shards must come from the backbones, weights, frames and crop of this config."""
    frames = cfg.data.frames or shard_sets[0].frames
    expected = expected_record(cfg.model, frames, cfg.data.crop_size, model.backbones.semantic.out_dim,
                               model.backbones.motion.out_dim, cfg.train.seed)
    for shards in shard_sets:
        check_compatible(shards.manifest, f"{shards.url}/manifest.json", expected)


def steps_per_epoch(train_set: ShardSet, plan: BatchPlan) -> int:
    """Optimizer steps per epoch; micro-batches beyond the last full accumulation are dropped."""
    try:
        batches = batches_per_rank(train_set.num_samples, plan.micro, plan.world_size)
    except ValueError as error:
        raise ConfigError(f"data.train {train_set.url}: {error} (train_micro_batch_size_per_gpu in ds.json)") from None
    if batches < plan.accumulation:
        raise ConfigError(
            f"data.train {train_set.url}: {batches} batches of {plan.micro} per rank over {plan.world_size} ranks is fewer "
            f"than gradient_accumulation_steps {plan.accumulation}: lower one of them in ds.json or add data"
        )
    return batches // plan.accumulation


def total_steps(train: TrainConfig, per_epoch: int) -> int:
    planned = train.epochs * per_epoch
    return min(planned, train.max_steps) if train.max_steps else planned


# ----------------------------------------------------------------------------- metrics


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """How many rows have their label among the k highest logits, for each k (k capped at
    the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices  # (B, kmax)
    hits = top == labels[:, None]
    return [hits[:, :k].any(dim=-1).sum() for k in ks]


def step_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The dropout seed of one micro-batch: a function of where it is, not of how the run got
    there, so an interrupted-and-resumed run draws the same masks as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, rank, epoch, batch]).generate_state(1)[0])


class Meter:
    """Training sums since the last log row, reduced over ranks on :meth:`reduce`."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device, self.world_size = device, world_size
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss*B, top-1, top-5, clips
        self.wait = 0.0
        self.start = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation, checkpoints) counts neither as training nor as waiting."""
        start = time.perf_counter()
        yield
        self.start += time.perf_counter() - start

    @contextmanager
    def waiting(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.wait += time.perf_counter() - start

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        top1, top5 = topk_correct(logits.detach(), labels)
        self.sums += torch.stack([loss.detach().double() * len(labels), top1.double(), top5.double(), torch.tensor(len(labels), dtype=torch.float64, device=self.device)])

    def reduce(self) -> dict[str, float]:
        """Global loss, top-1/top-5, clips/s and the share of time spent waiting for data."""
        elapsed = time.perf_counter() - self.start
        timing = torch.tensor([self.wait, elapsed], dtype=torch.float64, device=self.device)
        loss_sum, top1, top5, clips, wait, busy = distributed.all_reduce_sum(torch.cat([self.sums, timing])).tolist()
        self.reset()
        return {"loss": loss_sum / clips, "top1": top1 / clips, "top5": top5 / clips,
                "clips_per_s": clips / (busy / self.world_size), "data_wait": wait / busy}


def _step_of(row: str) -> float:
    """The step of a metrics.jsonl row; a row torn by a kill counts as past any checkpoint."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` and TensorBoard events; a no-op on the other ranks."""

    def __init__(self, out: Path, enabled: bool, resumed_step: int) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        if self.path.exists():  # rows a killed run wrote after its last checkpoint are redone
            rows = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resumed_step]
            self.path.write_text("".join(row + "\n" for row in rows))
        self.file = self.path.open("a")
        self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, group: str, step: int, epoch: int, values: dict[str, float], prefix: str | None = None) -> None:
        """One row of ``values`` (keys prefixed ``group_``, or ``prefix``) and TensorBoard scalars
        ``group/key``."""
        if not self.enabled:
            return
        if prefix is None:
            prefix = "" if group == "train" else f"{group}_"
        row = {"step": step, "epoch": epoch, **{prefix + k: round(v, 6) for k, v in values.items()}, "time": round(time.time(), 3)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """The parts of a training run that the loop needs."""

    cfg: RunConfig
    ranks: Ranks
    plan: BatchPlan
    model: FusionClassifier
    engine: Any
    train_set: ShardSet
    val_set: ShardSet
    steps_per_epoch: int
    total_steps: int
    out: Path
    ds_config: dict[str, Any]
    metrics: MetricsLog | None = None  # set once the resume step is known
    samples: Any = dataclasses.field(default_factory=lambda: SampleLog(Path("."), 0, False, Position()))  # set in setup
    stop: Any = dataclasses.field(default_factory=lambda: StopSignals())  # installed by main
    last_saved: int = -1
    last_validated: int = -1

    @property
    def step(self) -> int:
        return self.engine.global_steps

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.plan.accumulation

    def log(self, message: str) -> None:
        if self.ranks.is_main:
            tqdm.write(message)

    def layout(self) -> dict[str, Any]:
        """What the data order depends on beyond the epoch: a resumed run must match it."""
        return {"world_size": self.plan.world_size, "micro_batch": self.plan.micro, "accumulation": self.plan.accumulation,
                "num_workers": self.cfg.data.num_workers, "seed": self.cfg.train.seed, "train_samples": self.train_set.num_samples,
                "shuffle_window": self.cfg.data.shuffle_window}


def batch_features(run: Run, batch: dict[str, Any], rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic [B, T, Ds], motion [B, T', Dm]) fp32 on the device, without gradients: the
    frozen backbones' forward pass, or the cached features of feature shards; ``rows`` selects."""
    device = run.ranks.device
    if "semantic" in batch:
        semantic, motion = batch["semantic"], batch["motion"]
        if rows is not None:
            semantic, motion = semantic[rows.cpu()], motion[rows.cpu()]
        return semantic.to(device, non_blocking=True), motion.to(device, non_blocking=True)
    clips = batch["clips"].to(device, non_blocking=True)
    return run.model.features(clips if rows is None else clips[rows])


def train_micro_batch(run: Run, batch: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward the frozen backbones, then forward/backward/step the head; (loss, logits, labels)."""
    torch.manual_seed(seed)
    labels = batch["labels"].to(run.ranks.device, non_blocking=True)
    semantic, motion = batch_features(run, batch)
    dtype = next(run.engine.module.parameters()).dtype  # bf16 when ds.json's bf16 is on
    logits = run.engine(semantic.to(dtype), motion.to(dtype)).float()
    # A sum over max(1, B) rather than a mean: a batch emptied by undecodable clips (possible
    # only with GPU decoding) still steps in time with the other ranks, with zero gradients
    # instead of NaN ones.
    loss = F.cross_entropy(logits, labels, label_smoothing=run.cfg.train.label_smoothing, reduction="sum") / max(1, len(labels))
    run.engine.backward(loss)
    run.engine.step()
    return loss, logits, labels


@torch.no_grad()
def validate(run: Run, epoch: int) -> dict[str, float]:
    """Top-1/top-5 and loss over the whole validation set: each clip on one rank, sums reduced.

    A pass that did not see every clip of the manifest (clips skipped as corrupt, or storage
    unreachable past ``data.storage_timeout_s``) is not passed off as the figure: its row says
    ``val_complete: 0`` with the clips seen and expected, it goes to TensorBoard as
    ``val_incomplete/*``, and a warning says what is missing.
    """
    head, device = run.engine.module, run.ranks.device
    head.eval()
    dtype = next(head.parameters()).dtype
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*B, top-1, top-5, clips
    seen, failure = 0, None
    batch_size = run.cfg.train.val_batch_size or run.plan.micro
    loader = val_loader(run.cfg.data, run.val_set, batch_size=batch_size, rank=run.ranks.rank, world_size=run.ranks.world_size, device=device)
    batches = iter(tqdm(loader, desc="validate", leave=False, disable=not run.ranks.is_main))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (storage.StorageError, RuntimeError) as error:  # the loader's: storage gone, data unreadable
            failure = str(error)  # every rank still joins the sums below
            break
        seen += len(batch["keys"])
        labels = batch["labels"].to(device)
        labelled = labels >= 0
        if not labelled.any():
            continue
        semantic, motion = batch_features(run, batch, labelled)
        labels = labels[labelled]
        logits = head(semantic.to(dtype), motion.to(dtype)).float()
        top1, top5 = topk_correct(logits, labels)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([loss.double(), top1.double(), top5.double(), torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
    del batches
    head.train()
    record_data_errors(run, "val_data", epoch, loader)
    loss_sum, top1, top5, clips = distributed.all_reduce_sum(sums).tolist()
    seen_all, failed = distributed.sum_on_host([float(seen), float(failure is not None)])
    expected = run.val_set.num_samples
    complete = seen_all == expected and not failed
    if clips == 0 and complete:
        raise ConfigError(f"data.val {run.val_set.url} has no labelled clips to validate on")
    values = {"loss": loss_sum / max(clips, 1), "top1": top1 / max(clips, 1), "top5": top5 / max(clips, 1), "clips": clips,
              "clips_expected": float(expected), "complete": float(complete)}
    run.metrics.write("val" if complete else "val_incomplete", run.step, epoch, values, prefix="val_")
    summary = (f"top-1 {values['top1']:.4f}  top-5 {values['top5']:.4f}  loss {values['loss']:.4f}  "
               f"({int(clips)} labelled clips, {int(seen_all)} of {expected} read)")
    if complete:
        run.log(f"validation after step {run.step} (epoch {epoch}): {summary}")
    else:
        cause = f"the loader failed: {failure}" if failure else "see the skipped samples and shards above"
        if failed and not failure:
            cause = "the loader failed on another rank"
        run.log(f"warning: validation after step {run.step} (epoch {epoch}) is INCOMPLETE, {int(expected - seen_all)} of {expected} "
                f"clips missing ({cause}); not comparable with a full pass: {summary}")
    run.last_validated = run.step
    return values


def record_data_errors(run: Run, group: str, epoch: int, loader: Loader) -> None:
    """Skipped samples and shards, retries and refills of a loader, summed over ranks: the
    loader skips bad data instead of stopping, so this row is where it is counted."""
    counts = torch.tensor([float(loader.stats[key]) for key in ERROR_KEYS], dtype=torch.float64, device=run.ranks.device)
    errors = dict(zip(ERROR_KEYS, distributed.all_reduce_sum(counts).tolist()))
    run.metrics.write(group, run.step, epoch, errors)
    if any(errors.values()):
        run.log(f"{group} epoch {epoch}: " + ", ".join(f"{int(v)} {k.replace('_', ' ')}" for k, v in errors.items() if v))


def shard_info(shards: ShardSet) -> dict[str, Any]:
    """What the evaluation tools need to read clips as training did (kept with the weights):
    for feature shards, the frame shards they came from and the seed of their backbones."""
    if shards.is_features:
        source, made = shards.manifest.get("source") or {}, shards.manifest["features"]
        info = {key: source.get(key) for key in ("frames", "short_side", "jpeg_quality", "upscale")}
        return {**info, "templates": shards.manifest.get("templates"), "backbone_seed": made.get("seed")}
    info = {key: shards.manifest.get(key) for key in ("frames", "short_side", "jpeg_quality", "templates")}
    return {**info, "upscale": bool((shards.manifest.get("args") or {}).get("upscale", False))}


def checkpoint(run: Run, position: Position) -> None:
    state = {"position": dataclasses.asdict(position), "layout": run.layout(), "config": to_dict(run.cfg),
             "shards": shard_info(run.train_set), "ds_config": run.ds_config, "last_validated": run.last_validated}
    # gathered on every rank (a collective), written by rank 0: what a resume on another
    # number of ranks loads
    whole = distributed.whole_training_state(run.engine, state)
    tag = distributed.save_checkpoint(run.engine, run.out, run.step, state, keep=run.cfg.train.keep_checkpoints,
                                      is_main=run.ranks.is_main, whole_state=whole if run.ranks.is_main else None)
    run.last_saved = run.step
    run.log(f"checkpoint {run.out / distributed.CHECKPOINTS / tag} (epoch {position.epoch}, batch {position.batch})")


class DataStop(RuntimeError):
    """Training stopped because of its data (storage unreachable past its deadline, or more
    clips lost than ``data.max_skipped_fraction`` allows); a checkpoint was written first."""


def stop_for_data(run: Run, position: Position, reason: str) -> None:
    """Checkpoint where every rank stands (a collective) and raise :class:`DataStop`."""
    if run.last_saved != run.step:  # the same step twice would rewrite a good checkpoint
        checkpoint(run, position)
    tag = distributed.latest_tag(run.out)
    where = run.out / distributed.CHECKPOINTS / tag if tag else "none"
    raise DataStop(f"{reason}. Stopped at step {run.step} (epoch {position.epoch}, micro-batch {position.batch}); "
                   f"checkpoint: {where}. Fix the cause, then rerun the same command with --resume")


class Stopped(RuntimeError):
    """Training stopped on a signal (SIGTERM: preemption; SIGUSR1: a time-limit warning) after
    a checkpoint; ``signal`` is the signal's number."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal = signal_number


class StopSignals:
    """SIGTERM and SIGUSR1 only raise a flag here; the loop reads it at its next micro-batch
    (with every rank, see :func:`fit`), checkpoints and stops. A signal during validation or a
    checkpoint is acted on at the next micro-batch. Loader workers (and their forkserver) keep
    both signals blocked, so a signal sent to every process of a job, as Slurm does, does not
    kill them before the checkpoint (:func:`fusion.data.worker_context`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.pending = False  # set on every rank once any rank has seen a signal

    def install(self) -> "StopSignals":
        for number in self.SIGNALS:
            signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = number


def stop_for_signal(run: Run, position: Position) -> None:
    """Checkpoint where every rank stands (a collective) and raise :class:`Stopped`."""
    if run.last_saved != run.step:
        checkpoint(run, position)
    # the ranks may have seen different signals (or one rank none): SIGUSR1 anywhere means the warning
    warned = distributed.sum_on_host([float(run.stop.signal == signal.SIGUSR1)])[0] > 0
    number = signal.SIGUSR1 if warned else signal.SIGTERM
    if warned:
        # before any rank exits: under srun --kill-on-bad-exit a rank that exits first could end
        # the job before rank 0 has requeued it
        requeue_slurm_job(run)
        distributed.sum_on_host([0.0])  # every rank waits for it
    name = signal.Signals(number).name
    tag = distributed.latest_tag(run.out)
    raise Stopped(f"{name} received: stopped at step {run.step} (epoch {position.epoch}, micro-batch {position.batch}) after "
                  f"checkpoint {run.out / distributed.CHECKPOINTS / tag if tag else 'none'}; the same command with --resume "
                  "continues", number)


class SampleLog:
    """``OUT/samples/rank-R.jsonl`` (``train.record_samples``): one row per micro-batch with its
    epoch, part (how many layout changes came before it in the epoch), batch index, step and
    clip ids; rows past a resumed checkpoint are dropped, as the resumed run writes them again
    (rank 0 also trims the files of ranks a resume on fewer ranks no longer has)."""

    def __init__(self, out: Path, rank: int, enabled: bool, position: Position, world_size: int = 1) -> None:
        self.file = None
        if not enabled:
            return
        folder = out / "samples"
        path = folder / f"rank-{rank:05d}.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        mine = [path]
        if rank == 0:
            mine += [other for other in sorted(folder.glob("rank-*.jsonl")) if int(other.stem.split("-")[1]) >= world_size]
        for file in mine:
            if file.exists():
                self._trim(file, position)
        self.file = path.open("a")

    @staticmethod
    def _trim(path: Path, position: Position) -> None:
        kept = []
        here = (position.epoch, len(position.stints), position.batch)
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill
            if (row["epoch"], row.get("part", 0), row["batch"]) < here:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, position: Position, batch: int, step: int, keys: list[str]) -> None:
        if self.file is not None:
            row = {"epoch": position.epoch, "part": len(position.stints), "batch": batch, "step": step, "keys": keys}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def check_data_budget(run: Run, loader: Loader, position: Position) -> None:
    """Stop the run once this epoch has replaced more clips than ``data.max_skipped_fraction``
    of it (a collective; called at the same steps on every rank)."""
    epoch_clips = run.batches_per_epoch * run.plan.micro * run.ranks.world_size
    replaced, corrupt_shards = distributed.sum_on_host([float(loader.stats["refilled_samples"]), float(loader.stats["corrupt_shards"])])
    if replaced > run.cfg.data.max_skipped_fraction * epoch_clips:
        stop_for_data(run, position,
                      f"{int(replaced)} clips of epoch {position.epoch} had to be replaced by repeats ({int(corrupt_shards)} unreadable "
                      f"or mismatched shards; see the warnings above), more than data.max_skipped_fraction "
                      f"{run.cfg.data.max_skipped_fraction:g} of its {epoch_clips} clips: re-shard or restore {run.train_set.url}, "
                      "or raise data.max_skipped_fraction")


def fit(run: Run, position: Position) -> None:
    """Train from ``position`` until ``total_steps``: validate and checkpoint every epoch,
    checkpoint every ``checkpoint_every`` steps, log every ``log_every`` steps.

    Every rank tells the others, each micro-batch, whether it got its batch (a vote on the
    CPU): if storage is gone on one rank past ``data.storage_timeout_s``, all ranks write one
    checkpoint together and the run stops (:class:`DataStop`), instead of hanging in a
    collective or training on what is left.
    """
    cfg, engine, ranks = run.cfg, run.engine, run.ranks
    meter = Meter(ranks.device, ranks.world_size)
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not ranks.is_main, dynamic_ncols=True)
    try:
        for epoch in range(position.epoch, cfg.train.epochs):
            if run.step >= run.total_steps:
                break
            here = position if epoch == position.epoch else Position(epoch)
            first = here.batch
            loader = train_loader(cfg.data, run.train_set, batch_size=run.plan.micro, rank=ranks.rank, world_size=ranks.world_size,
                                  epoch=epoch, seed=cfg.train.seed, skip_batches=first, device=ranks.device,
                                  stints=tuple(Stint(**stint) for stint in here.stints))
            # after a layout change the epoch's rest is replanned: its own number of batches
            epoch_batches = (run.batches_per_epoch if not here.stints
                             else (first + len(loader)) // run.plan.accumulation * run.plan.accumulation)
            batches = iter(loader)
            index = first
            while index < epoch_batches and run.step < run.total_steps:
                failure = None
                with meter.waiting():
                    try:
                        batch = next(batches)
                    except (storage.StorageError, RuntimeError) as error:  # the loader's: storage gone, data unreadable
                        failure = str(error)
                # one vote a micro-batch, on the CPU: did every rank get its batch, and has any
                # been asked to stop (preemption)? So all ranks take the same turn.
                failed, signalled = distributed.sum_on_host([float(failure is not None), float(run.stop.signal is not None)])
                if failed:
                    del batches  # stop this epoch's loader workers
                    stop_for_data(run, here.at(index - index % run.plan.accumulation),
                                  f"training data unreachable: {failure or 'the loader failed on another rank'}")
                if signalled and index % run.plan.accumulation == 0:
                    del batches
                    stop_for_signal(run, here.at(index))
                run.stop.pending = run.stop.pending or bool(signalled)
                meter.add(*train_micro_batch(run, batch, step_seed(cfg.train.seed, ranks.rank, epoch, index)))
                run.samples.write(here, index, run.step, batch["keys"])
                index += 1
                if index % run.plan.accumulation:
                    continue
                if run.stop.pending:  # a signal mid-accumulation: this step is finished, stop here
                    del batches
                    stop_for_signal(run, here.at(index))
                bar.update(1)
                position = here.at(index)
                if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
                    values = {**meter.reduce(), "lr": engine.get_lr()[0]}
                    run.metrics.write("train", run.step, epoch, values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}", clips_s=f"{values['clips_per_s']:.1f}")
                    check_data_budget(run, loader, position)
                if cfg.train.checkpoint_every and run.step % cfg.train.checkpoint_every == 0 and index < epoch_batches:
                    with meter.paused():
                        checkpoint(run, position)
            del batches  # stop this epoch's loader workers before validation starts its own
            record_data_errors(run, "train_data", epoch, loader)
            check_data_budget(run, loader, position)
            if index == epoch_batches:
                position = Position(epoch + 1, 0)
                with meter.paused():
                    validate(run, epoch)
                    checkpoint(run, position)
    finally:
        bar.close()
    if run.last_validated != run.step:
        validate(run, position.epoch)
    if run.last_saved != run.step:
        checkpoint(run, position)


# ----------------------------------------------------------------------------- set-up


def prepare_out(out: Path, resume: bool) -> None:
    if not resume and distributed.latest_tag(out) is not None:
        raise ConfigError(f"--out {out} already holds a run (checkpoints/latest): pass --resume to continue it, or choose another --out")


# what a resume may change: the data order of the epoch's rest is replanned for the new layout
ELASTIC_KEYS = ("world_size", "micro_batch", "accumulation", "num_workers")


def restore(run: Run) -> Position:
    """Load the latest checkpoint in ``run.out`` (if any) and return the data position to go on from.

    With the layout it was written with, DeepSpeed's own files are loaded and the epoch goes on
    exactly where it stopped. With other ranks, workers, micro-batch or accumulation but the
    same global batch, the whole training state saved beside them is loaded into this layout
    (:func:`launch.distributed.load_whole_training_state`) and the stopped layout becomes a
    :class:`fusion.data.Stint` of the epoch: its rest is planned afresh, each clip not yet
    trained once. Anything else the data order depends on is refused, with the differences.
    """
    tag = distributed._shared(distributed.latest_tag(run.out))
    if tag is None:
        run.log(f"--resume: no checkpoint in {run.out}; starting from the beginning")
        return Position()
    whole = distributed.read_whole_state(run.out, tag)
    now = run.layout()
    saved = whole["client_state"]["layout"] if whole is not None else None
    changed_keys = {key for key in now if saved is not None and key in saved and saved[key] != now[key]}
    elastic = bool(changed_keys) and changed_keys <= set(ELASTIC_KEYS)
    if elastic:
        old_batch = saved["micro_batch"] * saved["accumulation"] * saved["world_size"]
        if old_batch != run.plan.global_batch:
            raise ConfigError(
                f"cannot resume {run.out} on this layout: its global batch was {old_batch} clips "
                f"({saved['world_size']} ranks x {saved['micro_batch']} x {saved['accumulation']} accumulation), now "
                f"{run.plan.global_batch}; keep the global batch (set train_batch_size in ds.json) so the schedule and the "
                "epoch's steps stay the run's"
            )
        state = whole["client_state"]
        _check_model(run, state)
        distributed.load_whole_training_state(run.engine, whole)
        position = Position(**state["position"])
        if position.batch:
            old_window = state["config"]["data"].get("shuffle_window", run.cfg.data.shuffle_window)
            position.stints.append(dataclasses.asdict(Stint(world_size=saved["world_size"], lanes=max(1, saved["num_workers"]),
                                                             batch_size=saved["micro_batch"], shuffle_window=old_window,
                                                             batches=position.batch)))
            position.batch = 0
        run.log(f"resumed {run.out} at step {run.step} on a new layout ({', '.join(_layout_changes(saved, now))}): epoch "
                f"{position.epoch}, its untrained rest replanned for this one")
    else:
        state = distributed.load_checkpoint(run.engine, run.out)
        saved = state["layout"]
        changed = _layout_changes(saved, now)
        if changed:
            can = " (a checkpoint with whole_state.pt could change ranks, workers or micro-batch)" if whole is None else ""
            raise ConfigError(
                f"cannot resume {run.out} exactly: {', '.join(changed)}; the data order depends on these, so resume with the "
                f"values the run started with (or start a new --out){can}"
            )
        _check_model(run, state)
        position = Position(**state["position"])
        run.log(f"resumed {run.out} at step {run.step}: epoch {position.epoch}, {position.batch} micro-batches into it")
    run.last_saved = run.step
    run.last_validated = state.get("last_validated", -1)
    return position


def _layout_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key old -> new`` for each layout value that differs (keys a checkpoint predates are not compared)."""
    return [f"{key} {saved[key]} -> {now[key]}" for key in now if key in saved and saved[key] != now[key]]


def _check_model(run: Run, state: dict[str, Any]) -> None:
    if state["config"]["model"] != to_dict(run.cfg.model):
        raise ConfigError(f"cannot resume {run.out}: its model config differs from this one; resume with the run's config ({run.out}/config.yaml)")


def deterministic_kernels() -> None:
    """Ask torch for deterministic kernels everywhere (``train.deterministic``). cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` when it starts, so this runs before anything touches CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # warn_only: an op without a deterministic kernel warns instead of stopping a long run
    torch.use_deterministic_algorithms(True, warn_only=True)


def setup(args: argparse.Namespace, cfg: RunConfig) -> tuple[Run, Position]:
    """Check everything that can be checked before the process group forms, then build the run."""
    rank, world_size, _, _ = distributed.rendezvous_environment(args.local_rank)
    main_rank = rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    chosen = "" if args.config_chosen else f" (the default {'with' if torch.cuda.is_available() else 'without'} CUDA; pass --config to choose)"
    say(f"config: {args.config}{chosen}")
    train_set, val_set = open_data(cfg)
    ds_json = distributed.read_ds_config(args.deepspeed)
    distributed.check_ds_config(ds_json)
    plan = distributed.batch_plan(ds_json, world_size)
    per_epoch = steps_per_epoch(train_set, plan)
    steps = total_steps(cfg.train, per_epoch)
    prepare_out(args.out, args.resume)

    if cfg.train.deterministic:
        deterministic_kernels()
    ranks = distributed.init_distributed(args.local_rank)
    gpu = distributed.on_gpu(ranks)
    ds_config = distributed.adapt_ds_config(ds_json, total_steps=steps, gpu=gpu, log=say)
    say(f"{world_size} rank(s) on {ranks.device.type}, {torch.get_num_threads()} CPU thread(s) each; batch {plan.micro} per rank x "
        f"{plan.accumulation} accumulation x {world_size} = {plan.global_batch} clips per step; {per_epoch} steps per epoch, {steps} in all")
    say(f"data: {train_set.num_samples} training clips at {cfg.data.train}, {val_set.num_samples} validation clips at {cfg.data.val}")

    # the same head initialisation on every rank, and the same from features as from frames
    model = build_model(cfg.model, ranks.device, seed=cfg.train.seed, frozen_on_meta=train_set.is_features)
    if train_set.is_features:
        check_features(cfg, model, train_set, val_set)
        say(f"feature shards: the backbones are not run ({train_set.feature_spec.views} view(s) per training clip)")
    say(format_report(parameter_report(model)))
    engine = distributed.wrap_head(model.head, ds_config, log=say)
    if main_rank:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (args.out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        (args.out / "parameters.json").write_text(json.dumps(parameter_report(model), indent=2) + "\n")
    distributed.barrier()
    if cfg.train.compile_backbones and not train_set.is_features:
        # after the parameter report, which walks the plain modules; compiled at the first batch
        model.backbones = torch.compile(model.backbones, backend=cfg.train.compile_backbones)
        say(f"backbones: torch.compile, backend {cfg.train.compile_backbones} (compiled at the first batch of each shape)")
    run = Run(cfg=cfg, ranks=ranks, plan=plan, model=model, engine=engine, train_set=train_set, val_set=val_set,
              steps_per_epoch=per_epoch, total_steps=steps, out=args.out, ds_config=ds_config)
    position = restore(run) if args.resume else Position()
    run.metrics = MetricsLog(args.out, main_rank, run.step)
    run.samples = SampleLog(args.out, rank, cfg.train.record_samples, position, world_size)
    return run, position


def export_head(run: Run) -> Path:
    """``OUT/head.pt``: the head's fp32 weights and the model config, for evaluation tools."""
    state = distributed.full_fp32_state_dict(run.engine)  # collective: every rank
    path = run.out / "head.pt"
    if run.ranks.is_main:
        staging = path.with_name(".head.pt.partial")
        try:
            torch.save({"model": to_dict(run.cfg.model), "config": to_dict(run.cfg), "shards": shard_info(run.train_set),
                        "head": state, "step": run.step}, staging)
            os.replace(staging, path)
        except Exception as error:
            staging.unlink(missing_ok=True)
            raise distributed.CheckpointError(f"could not write {path}: {distributed.write_error(error, path)}; "
                                              "the checkpoints hold the same weights") from None
        run.log(f"head weights: {path}")
    return path


class _TqdmHandler(logging.Handler):
    """Log records through ``tqdm.write``: on their own lines, never inside a progress bar."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.WARNING)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"{self.prefix}{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def route_warnings(rank: int) -> None:
    """The loader's and the backbones' warnings, printed above the progress bar, with the rank
    on any rank but 0."""
    for name in ("fusion", "sharding"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [_TqdmHandler("" if rank == 0 else f"[rank {rank}] ")]
        logger.propagate = False


def quiet_other_ranks(rank: int) -> None:
    """What every rank would say alike (random backbone weights), said by rank 0 only."""
    if rank != 0:
        warnings.filterwarnings("ignore", category=RandomWeightsWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecation notices
        logging.getLogger("fusion.backbones").setLevel(logging.ERROR)


def say_stopped(run: Run, error: Exception) -> None:
    """Every rank says why it stopped (a launcher may stop the others before rank 0 speaks)."""
    prefix = "" if run.ranks.is_main else f"[rank {run.ranks.rank}] "
    print(f"{prefix}launch/train.py: stopped: {error}", file=sys.stderr, flush=True)


def requeue_slurm_job(run: Run) -> None:
    """``scontrol requeue`` this Slurm job (rank 0, after the checkpoint): it goes back to the
    queue and, started again, resumes from that checkpoint."""
    job = os.environ.get("SLURM_JOB_ID")
    if not (job and run.ranks.is_main and run.cfg.train.requeue_on_usr1):
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"launch/train.py: could not requeue Slurm job {job}: {error}", file=sys.stderr)
        return
    said = (result.stdout + result.stderr).strip()
    print(f"launch/train.py: Slurm job {job} requeued" if result.returncode == 0 else
          f"launch/train.py: `scontrol requeue {job}` failed ({result.returncode}): {said}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 2 a config, input or storage problem found before training;
    3 stopped for its data (storage unreachable, data-loss budget) after a checkpoint:
    ``--resume`` continues; 4 a checkpoint could not be written (the earlier ones are intact);
    128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1) stopped on a signal after a
    checkpoint: ``--resume`` continues (under Slurm, after SIGUSR1, the job requeued itself)."""
    argv = sys.argv[1:] if argv is None else argv
    stop = StopSignals().install()  # first: a preemption during set-up is honoured at the first step
    rank = int(os.environ.get("RANK", "0"))
    try:
        args, cfg = parse_command_line(argv)
        route_warnings(rank)
        quiet_other_ranks(rank)
        run, position = setup(args, cfg)
    except (ConfigError, storage.StorageError, FileNotFoundError, ValueError, WeightsError) as error:
        print(f"launch/train.py: error: {error}", file=sys.stderr)
        return 2
    run.stop = stop
    try:
        fit(run, position)
        export_head(run)
        if run.ranks.is_main:
            from launch.plot import plot_curves

            try:
                run.log(f"training curves: {plot_curves(run.out / 'metrics.jsonl', run.out / 'curves.png')}")
            except Exception as error:  # a picture must not turn a finished run into a failed one
                run.log(f"warning: could not draw {run.out / 'curves.png'}: {type(error).__name__}: {error}")
    except Stopped as error:
        say_stopped(run, error)
        return 128 + error.signal
    except DataStop as error:
        say_stopped(run, error)
        return 3
    except distributed.CheckpointError as error:
        print(f"launch/train.py: error: {error}", file=sys.stderr)
        return 4
    finally:
        for log in (run.metrics, run.samples):
            if log is not None:
                log.close()
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
