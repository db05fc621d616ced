"""One GPU check: everything this project has never run on a GPU, measured in one short call.

    python -m launch.gpu_check --out DIR                 # on a CUDA machine: < 6 minutes on one H100/H200
    python -m launch.gpu_check --cpu-smoke --out DIR     # CI (tests/test_gpu_check.py): the same sections, debug sizes, on CPU

It writes ``DIR/gpu_check.json`` (every figure measured by this run, none typed in; a figure
that cannot be measured here is ``null`` with its reason under the section's ``not_measured``),
``DIR/gpu_check.md`` (the readable summary, also printed at the end) and ``DIR/gpu_check.log``
(the output of the training runs). Both files are rewritten after every section, so a run
killed half-way leaves the sections it finished. Sections, each with a time budget, each
failing on its own (``{"status": "error", "error": ...}``) while the others go on:

- ``environment``: device, driver, torch / CUDA / cuDNN / NCCL versions, a bf16 matrix product's
  TFLOP/s and the card's datasheet bf16 peak (a table by device name, :data:`BF16_DENSE_PEAK_TFLOPS`);
- ``data``: a synthetic SSv2 set (``sharding.synthetic``) packed by ``make_shards`` in a temp folder;
- ``precision``: full-size backbones (random weights) in bf16 against fp32 features of the same
  clips: the whole-module cast (today's ``model.dtype: auto``) and ``torch.autocast`` with fp32
  parameters; cosine similarity per stream, max abs error, speed; the faithful and fast one is kept;
- ``throughput``: frozen forward + head step (forward, backward, AdamW) in clips/s at the config's
  T and crop for each batch size, peak memory, FLOPs per clip counted by
  ``torch.utils.flop_counter`` and the model FLOPs utilisation; variants (autocast, channels-last
  I3D, explicit / SDPA / flash / cuDNN attention in timm's ViT, cudnn.benchmark): what helps is kept;
- ``latency``: one clip (batch 1) from decoded uint8 frames in host memory to the top-5 on the host;
- ``nvjpeg``: ``data.decode: gpu`` against CPU decoding of the same shards: pixel differences and clips/s;
- ``training``: ``deepspeed launch/train.py --deepspeed ds.json`` with the config (full size on a
  GPU), a checkpoint, then ``--resume`` to more steps; NCCL seen through ``NCCL_DEBUG``;
- ``loader``: the CPU-decode loader's clips/s by worker count against the model's clips/s: which
  one is the bottleneck, and how many CPU cores per GPU the CPU decode path needs; then
  ``data.resize_on: device`` (the crop on the device) at the fewest and most workers, and its
  pixels against the workers' crops of the same batch;
- ``compile``: ``torch.compile`` of the backbones (inductor on a GPU), in a child process with a timeout.

On a GPU machine of this workplace (no registry; its Python 3.12 has torch, torchvision, timm,
einops, tqdm, pyyaml; the rest travels as wheels): first, here, ``make gpu-bundle`` fills and
checks ``.whl/``; then one device call with ``carry: [".whl"]`` and ``timeout_s: 500``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 -m launch.gpu_check --out $OUT

(:data:`DEVICE_COMMAND`). The check's total budget is ``--budget-s`` (360 s on a GPU); a
watchdog writes what was measured and stops the run 20 s past it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

if __package__ in (None, ""):  # `python launch/gpu_check.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from launch import distributed  # first: sets DeepSpeed's environment before anything imports it

REPO = distributed.REPO_ROOT
FORMAT = "gpu_check/1"
SECTIONS = ("environment", "data", "precision", "throughput", "latency", "nvjpeg", "training", "loader", "compile")
# SSv2's videos are 12 frames a second: T frames of it span T / 12 s (16 frames: 1.33 s).
SSV2_FPS = 12.0
# A bf16 path is faithful when every feature vector of both streams has cosine >= this with fp32's.
FAITHFUL_COS = 0.99
# A variant "helps" when it is at least this much faster than today's path (beyond timing noise).
HELPS = 1.03
# nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling: equal "within JPEG tolerance" is
# a mean absolute difference and a 99th percentile of the absolute difference (0-255 levels) at most these.
JPEG_TOLERANCE = {"mean_abs": 1.5, "p99_abs": 10}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched as a
# substring of the device name, first match wins (so "H100 PCIe" before "H100", "GH200" before
# "H200" before "H20"). "NVIDIA H100 80GB HBM3" is the SXM part. A card not listed: MFU is null.
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl "
    "&& export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 -m launch.gpu_check --out $OUT"
)
# What the GPU machine's image lacks, carried as wheels for its Python 3.12 (`make gpu-bundle`),
# each at the version installed in this venv (the project's pins). Not carried: torch,
# torchvision, einops, tqdm, pyyaml, numpy, psutil, msgpack, ninja, py-cpuinfo, packaging,
# tensorboard, matplotlib (in the image); boto3/botocore (17 MB, only for s3:// shards: the check
# reads local ones).
BUNDLE: tuple[tuple[str, str], ...] = (
    ("webdataset", "the shard reader's tar iterator"),
    ("braceexpand", "webdataset's"),
    ("av", "synthetic videos and make_shards' decoding"),
    ("simplejpeg", "the loader's JPEG decoder"),
    ("turbojpeg", "its libturbojpeg 3: the loader's decode of a training crop's region"),
    ("google-crc32c", "the shard index's per-sample checksums"),
    ("timm", "the project's pin; the image has its own version"),
    ("deepspeed", "the training run (sdist: built here as a pure wheel, DS_BUILD_OPS=0)"),
    ("hjson", "deepspeed's"),
    ("pydantic", "deepspeed's"),
    ("pydantic-core", "pydantic's"),
    ("annotated-types", "pydantic's"),
    ("typing-inspection", "pydantic's"),
    ("typing-extensions", "pydantic's (>= 4.16)"),
)
BUILT_HERE = ("deepspeed",)
# What stands in for the image's own packages when the bundle is import-checked under a bare Python 3.12.
IMAGE_STAND_INS = ("numpy", "pyyaml")
# Modules the GPU machine's image has (its package list in the device docs, read 2026-11-17),
# and the modules the bundle brings: everything fusion/, launch/ and sharding/ import must be one
# of these (tests/test_gpu_check.py), except boto3/botocore, imported only for s3:// shards.
IMAGE_MODULES = ("torch", "torchvision", "timm", "einops", "tqdm", "yaml", "numpy", "psutil", "matplotlib", "tensorboard",
                 "safetensors", "urllib3", "pynvml", "PIL", "scipy", "msgpack", "packaging", "cpuinfo", "ninja", "triton")
BUNDLE_MODULES = ("webdataset", "braceexpand", "av", "simplejpeg", "turbojpeg", "google_crc32c", "timm", "deepspeed", "hjson", "pydantic", "pydantic_core",
                  "annotated_types", "typing_inspection", "typing_extensions")
S3_ONLY_MODULES = ("boto3", "botocore")
BUNDLE_IMPORTS = ("webdataset", "braceexpand", "av", "simplejpeg", "turbojpeg", "google_crc32c", "hjson", "pydantic", "annotated_types", "typing_inspection")
TREE_LIMIT_BYTES = 64 * 2**20  # what a device call carries: the working tree plus .whl/


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one mode (the GPU run or the CPU smoke)."""

    mode: str
    config: str
    overrides: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    ref_batch: int
    warmup: int
    iterations: int
    measure_s: float
    precision_clips: int
    latency_iterations: int
    classes: int
    train_per_class: int
    val_per_class: int
    clip_seconds: tuple[float, float]
    shard_size: int
    loader_repeat: int
    loader_workers: tuple[int, ...]
    loader_seconds: float
    nvjpeg_workers: tuple[int, ...]
    train_steps: tuple[int, int]
    train_args: tuple[str, ...]
    micro_batch: int | None
    compile_backend: str
    budget_s: float
    budgets: dict[str, tuple[float, float]]  # section -> (at most, at least: skipped when less is left)


GPU_PLAN = Plan(
    mode="gpu", config="launch/configs/default.yaml", overrides=(), batch_sizes=(8, 16, 32, 64), ref_batch=32,
    warmup=3, iterations=10, measure_s=3.0, precision_clips=4, latency_iterations=30,
    classes=10, train_per_class=32, val_per_class=4, clip_seconds=(1.5, 3.0), shard_size=32,
    loader_repeat=8, loader_workers=(1, 4, 8, 15), loader_seconds=3.0, nvjpeg_workers=(0, 4),
    train_steps=(20, 30), train_args=("--train.checkpoint_every", "10", "--train.log_every", "5"), micro_batch=None,
    compile_backend="inductor", budget_s=360.0,
    budgets={"environment": (20, 5), "data": (90, 30), "precision": (30, 10), "throughput": (70, 20), "latency": (15, 5),
             "nvjpeg": (30, 10), "training": (150, 60), "loader": (50, 10), "compile": (120, 30)},
)
CPU_PLAN = Plan(
    mode="cpu-smoke", config="launch/configs/debug.yaml", overrides=("--data.crop_size", "56", "--model.semantic.img_size", "56"),
    batch_sizes=(2, 4), ref_batch=2, warmup=1, iterations=3, measure_s=1.0, precision_clips=2, latency_iterations=5,
    classes=4, train_per_class=4, val_per_class=1, clip_seconds=(1.0, 2.0), shard_size=4,
    loader_repeat=4, loader_workers=(1, 2), loader_seconds=1.5, nvjpeg_workers=(0, 1),
    # no loader workers in the smoke's training runs: they are tested in tests/test_train.py, and
    # each run would spend seconds starting them on CI's 2 cores
    train_steps=(2, 4), train_args=("--data.num_workers", "0", "--train.log_every", "1"), micro_batch=2,
    # inductor takes ~40 s to compile the debug backbones on 2 cores; aot_eager still traces
    # them with Dynamo and AOTAutograd (graph breaks, guards) in a few seconds
    compile_backend="aot_eager", budget_s=200.0,
    budgets={"environment": (10, 2), "data": (30, 10), "precision": (20, 5), "throughput": (30, 5), "latency": (10, 2),
             "nvjpeg": (15, 3), "training": (90, 40), "loader": (20, 3), "compile": (40, 10)},
)
HARD_GRACE_S = 20.0  # the watchdog stops the run this long after the total budget


# ----------------------------------------------------------------------------- small helpers


def log(message: str) -> None:
    print(f"gpu_check: {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rounded(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}") if abs(value) < 1e5 else round(value, 1)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def not_measured(section: dict[str, Any], field: str, reason: str) -> None:
    """``field`` is null in this run, and why."""
    section[field] = None
    section.setdefault("not_measured", {})[field] = reason


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Budget:
    """Seconds a section may still spend."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 that is fp32: no TF32 in matrix products and convolutions (the reference)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compare_features(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of every feature vector (mean and minimum), max abs error and the
    relative error ||other - reference|| / ||reference||."""
    ref, got = reference.detach().double().flatten(0, -2), other.detach().double().flatten(0, -2)
    cosine = F.cosine_similarity(ref, got, dim=-1)
    return {"cos_mean": cosine.mean().item(), "cos_min": cosine.min().item(),
            "max_abs_err": (got - ref).abs().max().item(), "rel_err": ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item(),
            "ref_max_abs": ref.abs().max().item()}


def time_calls(call: Callable[[], Any], device: torch.device, *, warmup: int, iterations: int, max_s: float) -> list[float]:
    """Seconds of each of ``iterations`` calls after ``warmup`` (device synchronised around
    each), fewer when they would take more than ``max_s`` (two at least)."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iterations:
        begin = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - begin)
        if len(times) >= 2 and time.perf_counter() - start > max_s:
            break
    return times


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was read): the CUDA allocator's peak since the last reset, or on CPU the
    process's peak resident memory so far (it never goes down: an upper bound)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated since the row started"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS so far (ru_maxrss; CPU)"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bf16_peak(name: str) -> tuple[float | None, str | None]:
    for key, tflops in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops, key
    return None, None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- the backbones as a variant runs them


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


@dataclass(frozen=True)
class Variant:
    """How the frozen backbones run: ``precision`` fp32, cast_bf16 (the whole module cast, what
    ``model.dtype: auto`` does on a GPU) or autocast_bf16 (fp32 parameters under
    ``torch.autocast``); channels-last memory for I3D; timm's ViT attention: its default (SDPA,
    torch picks the kernel), explicit (``fused_attn = False``: softmax(QK^T)V by hand) or SDPA
    restricted to one kernel (flash, cudnn, efficient); ``torch.backends.cudnn.benchmark``."""

    name: str
    precision: str = "cast_bf16"
    channels_last: bool = False
    attention: str = "default"
    cudnn_benchmark: bool = False

    def settings(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "name"}


class Backbones:
    """A copy of the fp32 frozen backbones set up as ``variant`` says; calling it runs them."""

    def __init__(self, fp32_backbones: torch.nn.Module, variant: Variant, device: torch.device) -> None:
        self.variant, self.device = variant, device
        module = copy.deepcopy(fp32_backbones)
        if variant.precision == "cast_bf16":
            module = module.to(dtype=torch.bfloat16)
        elif variant.precision not in ("fp32", "autocast_bf16"):
            raise ValueError(f"unknown precision {variant.precision!r}")
        if variant.channels_last:
            module.motion.to(memory_format=torch.channels_last_3d)
        for sub in module.modules():
            if hasattr(sub, "fused_attn"):  # timm's Attention: SDPA when True
                sub.fused_attn = variant.attention != "explicit"
        self.module = module

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.variant.precision == "autocast_bf16":
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            if self.variant.attention in SDPA_BACKENDS:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[self.variant.attention])]))
            saved = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = self.variant.cudnn_benchmark
            stack.callback(setattr, torch.backends.cudnn, "benchmark", saved)
            yield

    def __call__(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.context():
            return self.module(clips)


# ----------------------------------------------------------------------------- the run's shared state


class Context:
    """What the sections share: the plan, folders, the device, the config, the data made by
    ``data``, the fp32 model, the model's rates from ``throughput``."""

    def __init__(self, plan: Plan, out: Path, work: Path, device: torch.device) -> None:
        from fusion.config import load
        from launch.train import RunConfig

        self.plan, self.out, self.work, self.device = plan, out, work, device
        self.cfg, rest = load(RunConfig, REPO / plan.config, list(plan.overrides))
        if rest:
            raise ValueError(f"unknown overrides {rest}")
        self.shards: dict[str, str] = {}
        self.children: list[subprocess.Popen] = []
        self.report: dict[str, Any] = {}
        self._model = None
        self._clips: torch.Tensor | None = None
        self.clip_source = "random uint8 (no shards)"
        self.kept: Variant | None = None
        self._reference: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.ds_json = json.loads((REPO / "ds.json").read_text())

    @property
    def frames(self) -> int:
        return self.cfg.data.frames or 16

    @property
    def crop(self) -> int:
        return self.cfg.data.crop_size

    @property
    def micro_batch(self) -> int:
        return self.plan.micro_batch or int(self.ds_json["train_micro_batch_size_per_gpu"])

    def today(self) -> Variant:
        """What ``build_model`` does today: the backbones cast whole to ``model.dtype`` (auto:
        bf16 on GPUs with bf16, fp32 on CPU), timm's default attention, nothing else."""
        from fusion.model import resolve_dtype

        dtype = resolve_dtype(self.cfg.model.dtype, self.device)
        return Variant("today", precision="cast_bf16" if dtype == torch.bfloat16 else "fp32")

    def head_dtype(self) -> torch.dtype:
        """The head's dtype in training: ds.json's bf16 on a GPU (DeepSpeed turns it off on CPU)."""
        config = distributed.adapt_ds_config(self.ds_json, total_steps=1, gpu=self.device.type == "cuda", log=lambda _: None)
        return torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32

    def model(self):
        """The model with fp32 backbones (random weights, seed 0) on the device; variants copy it."""
        if self._model is None:
            import logging

            from fusion.model import build_model

            logging.getLogger("fusion.backbones").setLevel(logging.ERROR)  # "RANDOM weights": known, said in the report
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._model = build_model(dataclasses.replace(self.cfg.model, dtype="fp32"), self.device)
        return self._model

    def clips(self, count: int) -> torch.Tensor:
        """``count`` uint8 clips [count, T, 3, S, S] on the CPU: the first clips of the training
        shards as validation reads them (segment middles, centre crop), random if there are none."""
        if self._clips is None or len(self._clips) < count:
            clips = None
            if "train" in self.shards:
                from fusion.data import ShardSet, val_loader

                cfg = dataclasses.replace(self.cfg.data, num_workers=0, decode="cpu")
                taken = []
                for batch in val_loader(cfg, ShardSet.open(self.shards["train"]), batch_size=max(1, count), rank=0, world_size=1):
                    taken.append(batch["clips"])
                    if sum(len(c) for c in taken) >= count:
                        break
                clips = torch.cat(taken)[:count] if taken else None
                if clips is not None and len(clips) == count:
                    self.clip_source = "clips of the synthetic training shards (segment middles, centre crop)"
                else:
                    clips = None
            if clips is None:
                generator = torch.Generator().manual_seed(0)
                clips = torch.randint(0, 256, (count, self.frames, 3, self.crop, self.crop), dtype=torch.uint8, generator=generator)
                self.clip_source = "random uint8 (no shards)"
            self._clips = clips
        return self._clips[:count]

    def reference(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(clips on the device, their fp32 features without TF32): what variants are held to."""
        if self._reference is None:
            clips = self.clips(self.plan.precision_clips).to(self.device)
            with exact_fp32():
                features = self.model().backbones(clips)
            self._reference = (clips, features)
        return self._reference


# ----------------------------------------------------------------------------- sections


def section_environment(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    device = ctx.device
    r["device_type"] = device.type
    r["python"] = platform.python_version()
    r["platform"] = platform.platform()
    r["torch"] = torch.__version__
    r["cpu_cores"] = len(os.sched_getaffinity(0))
    cpu_model = None
    with contextlib.suppress(OSError):
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), None)
    r["cpu_model"] = cpu_model
    if cpu_model is None:
        not_measured(r, "cpu_model", "no 'model name' in /proc/cpuinfo")
    names = ("torchvision", "timm", "deepspeed", "webdataset", "av", "simplejpeg", "numpy", "pydantic", "tensorboard")
    r["packages"] = {name: package_version(name) for name in names}
    missing = [name for name in names if r["packages"][name] is None]
    if missing:
        r.setdefault("not_measured", {})["packages"] = f"not installed: {', '.join(missing)}"
    try:
        version = torch.cuda.nccl.version()
        r["nccl"] = ".".join(map(str, version)) if isinstance(version, (tuple, list)) else str(version)
    except Exception as error:  # a build without NCCL
        not_measured(r, "nccl", f"torch.cuda.nccl.version(): {error}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        r["device"] = props.name
        r["compute_capability"] = f"{props.major}.{props.minor}"
        r["sm_count"] = props.multi_processor_count
        r["memory_gib"] = props.total_memory / 2**30
        r["cuda"] = torch.version.cuda
        r["cudnn"] = torch.backends.cudnn.version()
        r["driver"] = nvidia_smi_driver()
        if r["driver"] is None:
            not_measured(r, "driver", "nvidia-smi did not answer")
    else:
        r["device"] = cpu_model or platform.processor() or "cpu"
        for name in ("compute_capability", "sm_count", "memory_gib", "cuda", "cudnn", "driver"):
            not_measured(r, name, "no CUDA device: CPU smoke run")
    # the matrix-product ceiling, measured: bf16 on a GPU, fp32 (what the backbones use) on CPU
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (768, torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    times = time_calls(lambda: a @ b, device, warmup=3, iterations=20 if device.type == "cuda" else 5, max_s=min(3.0, budget.left()))
    r["matmul_tflops"] = 2 * size**3 / median(times) / 1e12
    r["matmul"] = f"{size}x{size}x{size} {str(dtype).removeprefix('torch.')} on random data, median of {len(times)}"
    del a, b
    peak, matched = bf16_peak(r["device"]) if device.type == "cuda" else (None, None)
    if peak is None:
        reason = ("no CUDA device: CPU smoke run" if device.type != "cuda"
                  else f"{r['device']!r} is not in BF16_DENSE_PEAK_TFLOPS (launch/gpu_check.py): add its datasheet figure")
        not_measured(r, "bf16_peak_tflops", reason)
    else:
        r["bf16_peak_tflops"] = peak
        r["bf16_peak_source"] = f"NVIDIA datasheet, dense bf16, matched {matched!r} in BF16_DENSE_PEAK_TFLOPS"


def nvidia_smi_driver() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=20)
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:  # nvidia-ml-py
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def section_data(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    from fusion.data import ShardSet
    from sharding.synthetic import DEFAULT_CLASSES

    # Both in processes of their own: the generator forks its workers (this process may hold a
    # CUDA context and its threads by now), and make_shards spawns its own, each of which would
    # import this module, torch and all, again as its main module.
    plan, cores = ctx.plan, len(os.sched_getaffinity(0))
    root = ctx.work / "ssv2"
    command = [sys.executable, "-m", "sharding.synthetic", "--out", str(root), "--seed", "0",
               "--classes", *map(str, list(DEFAULT_CLASSES)[: plan.classes]), "--train-per-class", str(plan.train_per_class),
               "--val-per-class", str(plan.val_per_class), "--test", "0", "--min-seconds", str(plan.clip_seconds[0]),
               "--max-seconds", str(plan.clip_seconds[1]), "--workers", str(cores), "--no-progress"]
    code, output, r["generate_s"] = run_logged(command, dict(os.environ), budget.left(), ctx, "sharding.synthetic")
    if code != 0:
        raise RuntimeError(f"sharding.synthetic {'timed out' if code is None else f'exited {code}'}: {output.strip()[-500:]}")
    start = time.perf_counter()
    for split in ("train", "validation"):
        out = ctx.work / "shards" / split
        command = [sys.executable, "-m", "sharding.make_shards", "--root", str(root), "--split", split, "--out", str(out),
                   "--shard-size", str(plan.shard_size), "--workers", str(cores), "--no-progress"]
        code, output, _ = run_logged(command, dict(os.environ), budget.left(), ctx, f"make_shards {split}")
        if code != 0:
            raise RuntimeError(f"make_shards {'timed out' if code is None else f'exited {code}'} on the synthetic {split} split: "
                               f"{output.strip()[-500:]}")
        ctx.shards[split] = str(out)
    r["shard_s"] = time.perf_counter() - start
    train, val = ShardSet.open(ctx.shards["train"]), ShardSet.open(ctx.shards["validation"])
    r["train_clips"], r["val_clips"] = train.num_samples, val.num_samples
    r["classes"] = plan.classes
    r["stored_frames"], r["short_side"] = train.frames, train.manifest.get("short_side")
    r["shard_bytes"] = sum(int(entry["bytes"]) for entry in train.manifest["shards"] + val.manifest["shards"])
    ctx.shards["loader"] = repeated_shards(train, ctx.work / "shards" / "loader", plan.loader_repeat)
    r["loader_set_clips"] = ShardSet.open(ctx.shards["loader"]).num_samples
    r["loader_set"] = f"the training shards linked {plan.loader_repeat} times under other names (epochs long enough to time)"


def repeated_shards(shardset, folder: Path, times: int) -> str:
    """A shard folder that lists ``shardset``'s shards ``times`` times, as symbolic links, so
    that a loader epoch is long enough to time many workers."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = copy.deepcopy(shardset.manifest)
    entries = []
    for copy_index in range(times):
        for entry in shardset.manifest["shards"]:
            name = f"r{copy_index:02d}-{entry['name']}"
            (folder / name).symlink_to(Path(shardset.url).resolve() / entry["name"])
            entries.append({**entry, "name": name})
    manifest.update(shards=entries, num_samples=sum(entry["num_samples"] for entry in entries))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def section_precision(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    device, plan = ctx.device, ctx.plan
    clips, (ref_semantic, ref_motion) = ctx.reference()
    r["inputs"] = f"{len(clips)} clips, T={ctx.frames}, {ctx.crop}x{ctx.crop}: {ctx.clip_source}"
    r["reference"] = "fp32 backbones, TF32 off" if device.type == "cuda" else "fp32 backbones"
    r["faithful_if"] = f"cosine >= {FAITHFUL_COS} for every feature vector of both streams"
    r["today"] = ctx.today().precision
    fp32 = ctx.model().backbones
    modes: dict[str, Any] = {}
    r["modes"] = modes

    def rerun(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # one clip at a time: other kernels, same maths
        with exact_fp32():
            parts = [fp32(batch[i : i + 1]) for i in range(len(batch))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    runs: list[tuple[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]] = [("fp32_rerun", rerun)]
    for precision in ("cast_bf16", "autocast_bf16"):
        runs.append((precision, Backbones(fp32, Variant(precision, precision=precision), device)))
    for name, run in runs:
        if budget.left() < 1 and name != "fp32_rerun":
            modes[name] = {"error": "section budget spent"}
            continue
        try:
            semantic, motion = run(clips)
            times = time_calls(lambda: run(clips), device, warmup=1, iterations=plan.iterations, max_s=min(plan.measure_s, budget.left()))
            modes[name] = {"semantic": compare_features(ref_semantic, semantic), "motion": compare_features(ref_motion, motion),
                           "ms_per_batch": 1000 * median(times), "dtype_out": str(semantic.dtype).removeprefix("torch.")}
            worst = min(modes[name]["semantic"]["cos_min"], modes[name]["motion"]["cos_min"])
            modes[name]["faithful"] = worst >= FAITHFUL_COS
        except Exception as error:  # one mode failing must not hide the others
            modes[name] = {"error": f"{type(error).__name__}: {error}"}
    # today's bf16 path (the whole-module cast, model.dtype bf16 or auto on a GPU) stays unless it
    # is not faithful, or autocast is faithful and faster by HELPS
    cast, autocast = modes.get("cast_bf16", {}), modes.get("autocast_bf16", {})
    if cast.get("faithful") and not (autocast.get("faithful") and autocast["ms_per_batch"] * HELPS <= cast["ms_per_batch"]):
        r["kept"], r["kept_because"] = "cast_bf16", "faithful, and autocast is not both faithful and faster by a factor >= HELPS"
    elif autocast.get("faithful"):
        r["kept"], r["kept_because"] = "autocast_bf16", ("faithful and faster by a factor >= HELPS than the cast" if cast.get("faithful")
                                                         else "faithful, and the cast is not")
    else:
        not_measured(r, "kept", "no bf16 path was faithful (see modes)")
    free_memory(device)


def head_step(backbones: Backbones, head_template: torch.nn.Module, head_dtype: torch.dtype, host: torch.Tensor,
              device: torch.device, num_classes: int) -> Callable[[], None]:
    """One training micro-step as ``launch/train.py`` takes it: uint8 clips to the device, the
    frozen forward, the head's forward and backward in its training dtype, an AdamW step."""
    head = copy.deepcopy(head_template).to(head_dtype).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4, weight_decay=0.05)
    labels = torch.randint(0, num_classes, (len(host),), device=device)

    def step() -> None:
        clips = host.to(device, non_blocking=True)
        semantic, motion = backbones(clips)
        logits = head(semantic.to(head_dtype), motion.to(head_dtype)).float()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(ctx: Context) -> dict[str, Any]:
    """FLOPs per clip of the frozen forward and of the head's forward + backward, counted by
    ``torch.utils.flop_counter`` on two clips (the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ctx.model()
    clips = torch.randint(0, 256, (2, ctx.frames, 3, ctx.crop, ctx.crop), dtype=torch.uint8, device=ctx.device)
    with FlopCounterMode(display=False) as counter:
        semantic, motion = model.backbones(clips)
    forward = counter.get_total_flops()
    head = copy.deepcopy(model.head).train()
    with FlopCounterMode(display=False) as counter:
        logits = head(semantic, motion)
        F.cross_entropy(logits, torch.zeros(2, dtype=torch.long, device=ctx.device)).backward()
    head_flops = counter.get_total_flops()
    return {"backbones_forward": forward / 2, "head_step": head_flops / 2, "total": (forward + head_flops) / 2,
            "counted_by": "torch.utils.flop_counter.FlopCounterMode on 2 clips (forward; head forward + backward)"}


def measure_variant(ctx: Context, variant: Variant, batch: int, host: torch.Tensor, budget: Budget) -> dict[str, Any]:
    """clips/s, ms/step and peak memory of ``variant``'s training step at ``batch``, and how far
    its features are from the fp32 reference."""
    device, plan = ctx.device, ctx.plan
    row: dict[str, Any] = {"name": variant.name, "batch": batch, **variant.settings()}
    backbones = None
    try:
        reset_peak_memory(device)
        backbones = Backbones(ctx.model().backbones, variant, device)
        clips, (ref_semantic, ref_motion) = ctx.reference()
        semantic, motion = backbones(clips)
        row["semantic_cos_min"] = compare_features(ref_semantic, semantic)["cos_min"]
        row["motion_cos_min"] = compare_features(ref_motion, motion)["cos_min"]
        row["faithful"] = min(row["semantic_cos_min"], row["motion_cos_min"]) >= FAITHFUL_COS
        step = head_step(backbones, ctx.model().head, ctx.head_dtype(), host[:batch], device, ctx.cfg.model.num_classes)
        times = time_calls(step, device, warmup=plan.warmup, iterations=plan.iterations, max_s=min(plan.measure_s, max(0.5, budget.left())))
        row["step_ms"] = 1000 * median(times)
        row["clips_per_s"] = batch / median(times)
        row["steps_timed"] = len(times)
        row["peak_memory_gib"], row["memory_read"] = peak_memory(device)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        del backbones
        free_memory(device)
    return row


def with_mfu(row: dict[str, Any], flops: dict[str, Any] | None, env: dict[str, Any]) -> dict[str, Any]:
    if flops is None or "clips_per_s" not in row:
        return row
    achieved = flops["total"] * row["clips_per_s"]
    row["achieved_tflops"] = achieved / 1e12
    row["mfu"] = achieved / (env["bf16_peak_tflops"] * 1e12) if env.get("bf16_peak_tflops") else None  # reason: the section's
    if env.get("matmul_tflops"):
        row["of_measured_matmul"] = achieved / (env["matmul_tflops"] * 1e12)
    return row


def section_throughput(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    device, plan = ctx.device, ctx.plan
    env = ctx.report["sections"].get("environment", {})
    r.update(frames=ctx.frames, crop=ctx.crop, batch_sizes=list(plan.batch_sizes), ref_batch=plan.ref_batch,
             head_dtype=str(ctx.head_dtype()).removeprefix("torch."), step="uint8 clips host->device, frozen forward, "
             "head forward + backward, AdamW step (torch's; DeepSpeed's step is timed in the training section)",
             inputs="random uint8 clips (pinned host memory on CUDA)")
    if not env.get("bf16_peak_tflops"):
        reason = (env.get("not_measured") or {}).get("bf16_peak_tflops", "the environment section measured no bf16 peak")
        r.setdefault("not_measured", {})["mfu (every row), best_mfu"] = reason
    try:
        flops = count_flops(ctx)
        r["flops_per_clip"] = flops
    except Exception as error:
        flops = None
        not_measured(r, "flops_per_clip", f"FlopCounterMode failed: {type(error).__name__}: {error}")
    largest = max(plan.batch_sizes)
    host = torch.randint(0, 256, (largest, ctx.frames, 3, ctx.crop, ctx.crop), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    if device.type == "cuda":
        host = host.pin_memory()
    today = ctx.today()
    other_precisions = [p for p in ("cast_bf16", "autocast_bf16") if p != today.precision]
    candidates = [today, *(Variant(p, precision=p) for p in other_precisions)]
    candidates += [dataclasses.replace(today, name="channels_last", channels_last=True),
                   dataclasses.replace(today, name="explicit_attention", attention="explicit"),
                   dataclasses.replace(today, name="flash_attention", attention="flash")]
    if device.type == "cuda":
        candidates += [dataclasses.replace(today, name="cudnn_attention", attention="cudnn"),
                       dataclasses.replace(today, name="cudnn_benchmark", cudnn_benchmark=True)]
    else:
        r.setdefault("not_measured", {})["variants.cudnn_attention, variants.cudnn_benchmark"] = "cuDNN is CUDA only"
    variants: list[dict[str, Any]] = []
    r["variants"] = variants
    for variant in candidates:
        if budget.left() < 2 and variants:
            variants.append({"name": variant.name, "error": "section budget spent"})
            continue
        variants.append(with_mfu(measure_variant(ctx, variant, plan.ref_batch, host, budget), flops, env))
    # today's path again, last: how much two measurements of the same path differ, and a base
    # that whatever warms up during the first measurement cannot favour
    again = with_mfu(measure_variant(ctx, dataclasses.replace(today, name="today_again"), plan.ref_batch, host, budget), flops, env)
    variants.append(again)
    rates = [row["clips_per_s"] for row in (variants[0], again) if row.get("clips_per_s")]
    base = max(rates) if rates else None
    if len(rates) == 2:
        r["repeat_spread"] = abs(rates[0] - rates[1]) / max(rates)
    for row in variants:
        if base and row.get("clips_per_s"):
            row["speedup"] = row["clips_per_s"] / base

    # a change helps when it is faithful and faster than today's path by more than HELPS and
    # more than two measurements of today's path differ
    threshold = max(HELPS, 1 + r.get("repeat_spread", 0.0))
    r["helps_if_speedup_at_least"] = threshold

    def helps(name: str) -> bool:
        row = next((v for v in variants if v["name"] == name), {})
        return bool(row.get("faithful") and row.get("speedup", 0) >= threshold)

    precision = max(((v["clips_per_s"], v["precision"]) for v in variants if v["name"] in other_precisions and helps(v["name"])),
                    default=(0, today.precision))[1]
    best_attention = max(((v["clips_per_s"], v["attention"]) for v in variants
                          if v["name"].endswith("_attention") and helps(v["name"])), default=(0, "default"))[1]
    best = Variant("best", precision=precision, channels_last=helps("channels_last"),
                   attention=best_attention, cudnn_benchmark=helps("cudnn_benchmark"))
    if best.settings() != today.settings() and budget.left() > 2:
        variants.append(with_mfu(measure_variant(ctx, best, plan.ref_batch, host, budget), flops, env))
        if base and variants[-1].get("clips_per_s"):
            variants[-1]["speedup"] = variants[-1]["clips_per_s"] / base
        if not (variants[-1].get("faithful") and variants[-1].get("speedup", 0) >= threshold):
            best = dataclasses.replace(today, name="best")
    else:
        best = dataclasses.replace(today, name="best")
    r["kept"] = best.settings()
    r["kept_rule"] = (f"each change faithful and >= {HELPS:.2f}x today's clips/s at batch {plan.ref_batch} (and beyond the spread of "
                      "two measurements of today's path), then measured together and kept if that holds together too")
    ctx.kept = best
    sweep: dict[str, list[dict[str, Any]]] = {"today": []}
    r["sweep"] = sweep
    paths = [("today", today)] + ([("best", best)] if best.settings() != today.settings() else [])
    for path, variant in paths:
        sweep[path] = []
        for batch in plan.batch_sizes:
            if budget.left() < 1:
                sweep[path].append({"batch": batch, "error": "section budget spent"})
                continue
            sweep[path].append(with_mfu(measure_variant(ctx, variant, batch, host, budget), flops, env))
    if "best" not in sweep:
        r.setdefault("not_measured", {})["sweep.best"] = "nothing beat today's path: the best path is today's"
    rows = [row for rows in sweep.values() for row in rows if row.get("clips_per_s")]
    if rows:
        top = max(rows, key=lambda row: row["clips_per_s"])
        r["best_clips_per_s"], r["best_batch"], r["best_path"] = top["clips_per_s"], top["batch"], top["name"]
        r["best_mfu"] = top.get("mfu")
    micro = next((row for row in sweep["today"] if row.get("batch") == ctx.micro_batch and row.get("clips_per_s")), None)
    if micro is not None:
        r["today_at_micro_batch"] = {"batch": ctx.micro_batch, "clips_per_s": micro["clips_per_s"]}
    del host
    free_memory(device)


def section_latency(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    device, plan = ctx.device, ctx.plan
    r["clip_span_s"] = ctx.frames / SSV2_FPS
    r["what"] = ("one decoded uint8 clip [1, T, 3, S, S] in host memory -> device -> frozen backbones -> head (fp32, eval, as "
                 "launch/predict.py loads it) -> softmax -> top-5 ids back on the host")
    clip = ctx.clips(1)
    if device.type == "cuda":
        clip = clip.pin_memory()
    r["input"] = ctx.clip_source
    head = copy.deepcopy(ctx.model().head).float().eval()
    paths = [ctx.today()] + ([ctx.kept] if ctx.kept is not None and ctx.kept.settings() != ctx.today().settings() else [])
    rows = []
    r["paths"] = rows
    for variant in paths:
        backbones = Backbones(ctx.model().backbones, variant, device)

        @torch.inference_mode()
        def infer() -> torch.Tensor:
            semantic, motion = backbones(clip.to(device, non_blocking=True))
            logits = head(semantic, motion).float()
            return logits.softmax(dim=-1).topk(5, dim=-1).indices.cpu()

        top5 = infer()
        times = time_calls(infer, device, warmup=3, iterations=plan.latency_iterations, max_s=max(1.0, min(5.0, budget.left() / 2)))
        row = {"name": variant.name, **variant.settings(), "median_ms": 1000 * median(times), "p90_ms": 1000 * percentile(times, 90),
               "min_ms": 1000 * min(times), "calls": len(times), "top5_shape": list(top5.shape)}
        row["realtime_factor"] = r["clip_span_s"] / (row["median_ms"] / 1000)
        row["real_time"] = row["median_ms"] / 1000 < r["clip_span_s"]
        rows.append(row)
        del backbones
        free_memory(device)
    r["median_ms"] = min(row["median_ms"] for row in rows)
    r["real_time"] = any(row["real_time"] for row in rows)


def collect_clips(cfg, shardset, device: torch.device | None) -> tuple[torch.Tensor, list[str], float, int]:
    """Every clip of ``shardset`` through ``val_loader`` (centre crop, segment middles):
    (uint8 clips on the CPU, keys, clips/s of the loader, clips decoded on the CPU after all)."""
    from fusion.data import val_loader

    clips, keys = [], []
    start = time.perf_counter()
    loader = val_loader(cfg, shardset, batch_size=8, rank=0, world_size=1, device=device)
    for batch in loader:
        clips.append(batch["clips"])
        keys += batch["keys"]
    if device is not None:
        synchronize(device)
    elapsed = time.perf_counter() - start
    # clips data.decode gpu decoded on the CPU after all (JPEGs the device decoder refused): a GPU figure must not be a CPU one
    return torch.cat([c.cpu() for c in clips]), keys, len(keys) / elapsed, loader.stats["cpu_decode_fallbacks"]


def timed_clips(loader, warmup: int, device: torch.device | None, budget: Budget, max_s: float) -> tuple[int, float, int]:
    """(clips, seconds, the workers' CPU microseconds) of what a loader delivers after its first
    ``warmup`` batches (start-up: every worker's first batch), for at most ``max_s``."""
    seen, start, index, worker_cpu = 0, None, 0, 0
    stream = iter(loader)
    try:
        for batch in stream:
            index += 1
            if index <= warmup:
                start, worker_cpu = time.perf_counter(), loader.stats["worker_cpu_us"]
                continue
            seen += len(batch["keys"])
            if time.perf_counter() - start > min(max_s, budget.left()):
                break
    finally:
        stream.close()
    worker_cpu = loader.stats["worker_cpu_us"] - worker_cpu
    if device is not None:
        synchronize(device)
    return seen, time.perf_counter() - start if start else float("nan"), worker_cpu


def loader_rate(cfg, shardset, device: torch.device | None, budget: Budget, max_s: float) -> tuple[float, int]:
    """clips/s through ``val_loader`` with ``cfg``'s workers, for at most ``max_s`` (the
    first batch, the start-up, is not counted), and the clips it decoded on the CPU after all."""
    from fusion.data import val_loader

    loader = val_loader(cfg, shardset, batch_size=8, rank=0, world_size=1, device=device)
    seen, seconds, _ = timed_clips(loader, 1, device, budget, max_s)
    return (seen / seconds if seen else float("nan")), loader.stats["cpu_decode_fallbacks"]


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Absolute differences of two uint8 clip tensors, in 0-255 levels, against JPEG_TOLERANCE."""
    counts = torch.zeros(256, dtype=torch.int64)
    total, largest = 0, 0
    for left, right in zip(a.split(16), b.split(16)):
        diff = (left.to(torch.int16) - right.to(torch.int16)).abs().flatten()
        counts += torch.bincount(diff, minlength=256)
        largest = max(largest, int(diff.max()))
        total += diff.numel()
    levels = torch.arange(256, dtype=torch.float64)
    mean = float((counts.double() * levels).sum() / total)
    cumulative = counts.cumsum(0).double() / total
    p99 = int((cumulative >= 0.99).nonzero()[0])
    stats = {"pixels": total, "mean_abs": mean, "p99_abs": p99, "max_abs": largest, "equal_fraction": float(counts[0] / total),
             "tolerance": JPEG_TOLERANCE}
    stats["within_jpeg_tolerance"] = mean <= JPEG_TOLERANCE["mean_abs"] and p99 <= JPEG_TOLERANCE["p99_abs"]
    return stats


def decoder_difference(shardset, device: torch.device, limit: int) -> dict[str, Any]:
    """The decoders alone, on whole stored frames of the first shard: simplejpeg (the loader's
    CPU decoder) against ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA), one
    batched call, timed on its second run (the first initialises the decoder)."""
    import tarfile

    import simplejpeg
    from torchvision.io import decode_jpeg

    frames = []
    with tarfile.open(Path(shardset.url) / shardset.shards[0]) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                frames.append(tar.extractfile(member).read())
                if len(frames) == limit:
                    break
    # flattened frame by frame: clips of one shard may differ in size (the GPU run's had 320 and 352 px wide)
    cpu = [torch.from_numpy(simplejpeg.decode_jpeg(frame, colorspace="RGB")).permute(2, 0, 1) for frame in frames]
    data = [torch.frombuffer(bytearray(frame), dtype=torch.uint8) for frame in frames]
    decode_jpeg(data, device=device)
    synchronize(device)
    start = time.perf_counter()
    decoded = decode_jpeg(data, device=device)
    synchronize(device)
    seconds = time.perf_counter() - start
    stats = pixel_difference(torch.cat([frame.flatten() for frame in cpu])[None], torch.cat([frame.cpu().flatten() for frame in decoded])[None])
    sizes = sorted({tuple(frame.shape[-2:]) for frame in cpu})
    return {"frames": len(frames), "sizes": [list(size) for size in sizes], "frames_per_s": len(frames) / seconds,
            "decoder": "nvJPEG (torchvision.io.decode_jpeg on cuda)" if device.type == "cuda" else "torchvision.io.decode_jpeg on the CPU",
            **stats}


def section_nvjpeg(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    from fusion.data import ShardSet

    device, plan = ctx.device, ctx.plan
    shardset = ShardSet.open(ctx.shards["train"])
    cpu_cfg = dataclasses.replace(ctx.cfg.data, num_workers=0, decode="cpu")
    gpu_cfg = dataclasses.replace(cpu_cfg, decode="gpu")
    r["shards"] = f"the synthetic training shards, {shardset.num_samples} clips, as val_loader reads them (centre crop {ctx.crop})"
    cpu_clips, cpu_keys, cpu_rate, _ = collect_clips(cpu_cfg, shardset, None)
    r["clips"] = len(cpu_keys)
    r["cpu_decode"] = [{"workers": 0, "clips_per_s": cpu_rate}]
    r["gpu_decode"] = []
    if device.type == "cuda":
        try:  # the decoders alone first: if nvJPEG fails here, the loader would fall back to the CPU silently
            r["decoders"] = decoder_difference(shardset, device, 256)
        except Exception as error:
            r["decoders"] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        gpu_clips, gpu_keys, gpu_rate, r["cpu_fallback_clips"] = collect_clips(gpu_cfg, shardset, device)
        r["gpu_decode"].append({"workers": 0, "clips_per_s": gpu_rate})
        r["same_clips"] = gpu_keys == cpu_keys
        r["equality"] = pixel_difference(cpu_clips, gpu_clips)
        del gpu_clips
        not_measured(r, "bytes_path_on_cpu", "measured on CPU smoke runs only (the nvJPEG path itself is measured here)")
    else:
        reason = "no CUDA device: nvJPEG needs one (CPU smoke run)"
        not_measured(r, "equality", reason)
        not_measured(r, "same_clips", reason)
        r.setdefault("not_measured", {})["gpu_decode"] = reason
        # the same bytes-only path and decoder call, on the CPU: the comparison's own check
        r["decoders"] = decoder_difference(shardset, torch.device("cpu"), 64)
        cpu_bytes, bytes_keys, bytes_rate, r["cpu_fallback_clips"] = collect_clips(gpu_cfg, shardset, torch.device("cpu"))
        r["bytes_path_on_cpu"] = {"clips_per_s": bytes_rate, "same_clips": bytes_keys == cpu_keys,
                                  **pixel_difference(cpu_clips, cpu_bytes)}
    del cpu_clips
    for workers in plan.nvjpeg_workers[1:]:
        if budget.left() < 2:
            break
        rate, _ = loader_rate(dataclasses.replace(cpu_cfg, num_workers=workers), shardset, None, budget, plan.loader_seconds)
        r["cpu_decode"].append({"workers": workers, "clips_per_s": rate})
        if device.type == "cuda":
            rate, fallbacks = loader_rate(dataclasses.replace(gpu_cfg, num_workers=workers), shardset, device, budget,
                                          plan.loader_seconds)
            r["gpu_decode"].append({"workers": workers, "clips_per_s": rate})
            r["cpu_fallback_clips"] += fallbacks
    if device.type != "cuda":
        r["gpu_decode"] = None


def run_logged(command: list[str], env: dict[str, str], timeout: float, ctx: Context, title: str) -> tuple[int | None, str, float]:
    """Run ``command`` in its own process group; (exit status or None on timeout, its output, seconds).
    The output is appended to ``gpu_check.log``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    ctx.children.append(process)
    try:
        output, _ = process.communicate(timeout=max(1.0, timeout))
        code = process.returncode
    except subprocess.TimeoutExpired:
        kill_group(process)
        output, _ = process.communicate()
        code = None
    finally:
        ctx.children.remove(process)
    with open(ctx.out / "gpu_check.log", "a") as file:
        file.write(f"\n===== {title}: {' '.join(command)}\n(exit {code}, {time.perf_counter() - start:.1f} s)\n{output[-400_000:]}\n")
    return code, output, time.perf_counter() - start


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def section_training(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    plan, gpu = ctx.plan, ctx.device.type == "cuda"
    run_out = ctx.work / "run"
    ds_json = REPO / "ds.json"
    if plan.micro_batch is not None:  # a few clips on CPU: the repo's ds.json with a smaller micro batch
        config = dict(ctx.ds_json, train_micro_batch_size_per_gpu=plan.micro_batch)
        ds_json = ctx.work / "ds.json"
        ds_json.write_text(json.dumps(config))
    first, total = plan.train_steps
    base = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(distributed._free_port()),
            "launch/train.py", "--deepspeed", str(ds_json), "--config", plan.config, *plan.overrides, *plan.train_args,
            "--data.train", ctx.shards["train"], "--data.val", ctx.shards["validation"], "--out", str(run_out)]
    env = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if gpu:
        env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT")
    r["command"] = " ".join(["deepspeed", *base[3:], "--train.max_steps", str(first)]).replace(str(ctx.work), "$WORK")
    r["config"] = plan.config
    r["ds_json"] = "the repo's ds.json" if plan.micro_batch is None else f"the repo's ds.json, micro batch {plan.micro_batch}"
    try:
        from deepspeed.accelerator import get_accelerator

        r["backend_expected"] = get_accelerator().communication_backend_name()
    except Exception as error:
        not_measured(r, "backend_expected", f"deepspeed's accelerator: {type(error).__name__}: {error}")
    runs = []
    r["runs"] = runs
    for index, (steps, extra) in enumerate(((first, []), (total, ["--resume"]))):
        timeout = budget.left() * (0.55 if index == 0 else 1.0)
        code, output, seconds = run_logged([*base, "--train.max_steps", str(steps), *extra], env, timeout, ctx,
                                           f"training run {index + 1}")
        done = max((step for run in runs for step in run["steps_logged"]), default=0)
        rows = [row for row in metrics_rows(run_out) if "loss" in row and row["step"] > done]
        run = {"max_steps": steps, "resume": bool(extra), "exit": code, "seconds": seconds, "timed_out": code is None,
               "latest_checkpoint": distributed.latest_tag(run_out)}
        resumed = re.search(r"resumed \S+ at step (\d+)", output)
        if extra:
            run["resumed_at_step"] = int(resumed.group(1)) if resumed else None
        rates = [row["clips_per_s"] for row in rows if "clips_per_s" in row]
        if rates:
            run["clips_per_s"] = median(rates[1:] if len(rates) > 1 else rates)  # the first row includes start-up
            run["data_wait"] = median([row["data_wait"] for row in rows if "data_wait" in row][1:] or
                                      [row["data_wait"] for row in rows if "data_wait" in row])
        if code != 0:
            run["output_tail"] = output[-2500:]
        run["steps_logged"] = [row["step"] for row in rows]
        runs.append(run)
        if code != 0:
            raise RuntimeError(f"training run {index + 1} {'timed out' if code is None else f'exited {code}'}: "
                               f"{output.strip().splitlines()[-1] if output.strip() else 'no output'}")
        if index == 0:
            nccl = re.findall(r"NCCL INFO.*", output)
            r["nccl_lines"] = len(nccl)
            version = re.search(r"NCCL version (\S+)", output)
            r["nccl_version_seen"] = version.group(1) if version else None
            if not gpu:
                r.setdefault("not_measured", {})["nccl_lines, nccl_version_seen"] = "no CUDA device: the CPU run uses DeepSpeed's CPU backend"
            r["device_line"] = next((line.strip() for line in output.splitlines() if " rank(s) on " in line), None)
    rows = metrics_rows(run_out)
    train_rows = [row for row in rows if "loss" in row]
    r["steps_logged"] = [row["step"] for row in train_rows]
    r["val_rows"] = len([row for row in rows if "val_top1" in row])
    r["first_loss"], r["last_loss"] = (train_rows[0]["loss"], train_rows[-1]["loss"]) if train_rows else (None, None)
    r["checkpoints"] = sorted(p.name for p in (run_out / "checkpoints").glob("step*") if p.is_dir())
    r["head_pt"] = (run_out / "head.pt").is_file()
    ds_config = json.loads((run_out / "ds_config.json").read_text()) if (run_out / "ds_config.json").exists() else {}
    r["bf16"] = bool(ds_config.get("bf16", {}).get("enabled"))
    steps = r["steps_logged"]
    r["resumed"] = bool(runs[1].get("resumed_at_step") == first and steps and steps[-1] == total
                        and steps == sorted(set(steps)) and runs[1]["latest_checkpoint"] == f"step{total:08d}")
    r["clips_per_s"] = runs[-1].get("clips_per_s")


def loader_row(cfg, shardset, batch: int, workers: int, device: torch.device | None, budget: Budget, seconds: float) -> dict[str, Any]:
    """clips/s of one ``train_loader`` configuration, after every worker's first batch (start-up)."""
    from fusion.data import train_loader

    loader = train_loader(dataclasses.replace(cfg, num_workers=workers), shardset, batch_size=batch, rank=0, world_size=1,
                          epoch=0, seed=0, device=device)
    seen, elapsed, worker_us = timed_clips(loader, max(1, workers), device, budget, seconds)
    # the workers' CPU a clip, their hand-over of batches included, and batches whose pixels did
    # not fit the shared regions they hand batches over in (fusion.data.loader.FrameSlots)
    row = {"workers": workers, "resize_on": cfg.resize_on, "clips_per_s": seen / elapsed if seen else None, "clips": seen,
           "seconds": elapsed, "frame_slot_misses": loader.stats["frame_slot_misses"]}
    if seen and workers:
        row["worker_cpu_ms_per_clip"] = worker_us / 1e3 / seen
    return row


def section_loader(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    from fusion.data import ShardSet

    plan = ctx.plan
    cores = len(os.sched_getaffinity(0))
    shardset = ShardSet.open(ctx.shards["loader"])
    cfg = dataclasses.replace(ctx.cfg.data, decode="cpu", resize_on="worker")
    batch = ctx.micro_batch
    workers = sorted({w for w in plan.loader_workers if w <= cores} | ({cores - 1} if cores > 2 else set()))
    r.update(cores=cores, batch=batch, crop=ctx.crop, frames=ctx.frames, clips_available=shardset.num_samples,
             what="train_loader (decode cpu, random resized crops), clips/s after every worker's first batch")
    rows = []
    r["rows"] = rows
    for count in workers:
        if budget.left() < 2:
            rows.append({"workers": count, "error": "section budget spent"})
            continue
        rows.append(loader_row(cfg, shardset, batch, count, None, budget, plan.loader_seconds))
    rates = [row for row in rows if row.get("clips_per_s")]
    if not rates:
        raise RuntimeError("no loader configuration delivered clips")
    one = next((row for row in rates if row["workers"] == 1), rates[0])
    r["clips_per_s_per_worker"] = one["clips_per_s"] / one["workers"]
    r["best_clips_per_s"] = max(row["clips_per_s"] for row in rates)
    top = max(rates, key=lambda row: row["workers"])
    r["scaling_efficiency"] = top["clips_per_s"] / (top["workers"] * r["clips_per_s_per_worker"])
    r["device_crop"] = device_crop = measure_device_crop(ctx, cfg, shardset, batch, (one["workers"], top["workers"]), budget)
    throughput = ctx.report["sections"].get("throughput", {})
    model_rates = {"today_at_micro_batch": (throughput.get("today_at_micro_batch") or {}).get("clips_per_s"),
                   "best": throughput.get("best_clips_per_s")}
    r["model_clips_per_s"] = model_rates
    if not any(model_rates.values()):
        for name in ("bottleneck", "cpu_cores_per_gpu"):
            not_measured(r, name, "the throughput section measured no model rate")
        return
    verdicts = {}
    per_worker_device = device_crop.get("clips_per_s_per_worker")
    for name, rate in model_rates.items():
        if rate:
            verdicts[name] = {"bottleneck": "loader" if r["best_clips_per_s"] < rate else "model",
                              "cpu_cores_per_gpu": math.ceil(rate / r["clips_per_s_per_worker"]),
                              "cpu_cores_per_gpu_device_crop": math.ceil(rate / per_worker_device) if per_worker_device else None}
    r["verdicts"] = verdicts
    main = verdicts.get("today_at_micro_batch") or verdicts.get("best")
    r["bottleneck"], r["cpu_cores_per_gpu"] = main["bottleneck"], main["cpu_cores_per_gpu"]
    r["note"] = ("sharding.synthetic's textured clips at 240 px; real SSv2 frames (VP9 camera footage) may decode at "
                 "another rate: measure on them before sizing a cluster")


def measure_device_crop(ctx: Context, cfg, shardset, batch: int, counts: tuple[int, ...], budget: Budget) -> dict[str, Any]:
    """``data.resize_on: device``: workers only decode, the crop, resize and flip of the batch run
    on the check's device. Its pixels against the workers' crops of the same batch, and its clips/s
    at the fewest and most workers measured above."""
    from fusion.data import train_loader

    device = ctx.device
    moved = dataclasses.replace(cfg, resize_on="device")
    out: dict[str, Any] = {"device": str(device)}
    first = {}
    for name, c in (("worker", cfg), ("device", moved)):
        stream = iter(train_loader(dataclasses.replace(c, num_workers=0), shardset, batch_size=batch, rank=0, world_size=1,
                                   epoch=0, seed=0, device=device))
        try:
            first[name] = next(stream)
        finally:
            stream.close()
    worker_clips, device_clips = first["worker"]["clips"], first["device"]["clips"]
    difference = (worker_clips.to(device).int() - device_clips.int()).abs()
    out.update(same_keys=first["worker"]["keys"] == first["device"]["keys"], clips_on=str(device_clips.device),
               pixels_max_abs_difference=int(difference.max()), pixels_mean_abs_difference=float(difference.float().mean()))
    rows = []
    out["rows"] = rows
    for count in sorted(set(counts)):
        if budget.left() < 2:
            rows.append({"workers": count, "resize_on": "device", "error": "section budget spent"})
            continue
        rows.append(loader_row(moved, shardset, batch, count, device, budget, ctx.plan.loader_seconds))
    rates = [row for row in rows if row.get("clips_per_s")]
    if rates:
        fewest = min(rates, key=lambda row: row["workers"])
        out["clips_per_s_per_worker"] = fewest["clips_per_s"] / fewest["workers"] if fewest["workers"] else fewest["clips_per_s"]
        out["best_clips_per_s"] = max(row["clips_per_s"] for row in rates)
    else:
        not_measured(out, "clips_per_s_per_worker", "the section budget was spent before the device-crop rows")
    return out


def section_compile(ctx: Context, r: dict[str, Any], budget: Budget) -> None:
    """Run :func:`compile_in_child` in a child process (it may take long or hang: it is killed
    at the budget)."""
    variant = ctx.kept or ctx.today()
    child_out = ctx.work / "compile"
    command = [sys.executable, "-m", "launch.gpu_check", "--only", "compile", "--out", str(child_out),
               "--variant", json.dumps(dataclasses.asdict(variant))] + (["--cpu-smoke"] if ctx.plan.mode == "cpu-smoke" else [])
    code, output, seconds = run_logged(command, dict(os.environ, PYTHONUNBUFFERED="1"), budget.left(), ctx, "torch.compile")
    r["child_seconds"] = seconds
    result = child_out / "gpu_check.json"
    if result.exists():
        r.update(json.loads(result.read_text())["sections"].get("compile", {}))
    if code is None:
        raise RuntimeError(f"torch.compile did not finish within {budget.seconds:.0f} s (killed)")
    if code != 0:
        raise RuntimeError(r.pop("error_in_child", None) or f"the compile child exited {code}: "
                           f"{output.strip().splitlines()[-1] if output.strip() else 'no output'}")


def compile_in_child(ctx: Context, r: dict[str, Any], budget: Budget, variant: Variant) -> None:
    device, plan = ctx.device, ctx.plan
    r.update(backend=plan.compile_backend, variant=variant.settings(), batch=plan.ref_batch, what="torch.compile of the frozen backbones")
    host = torch.randint(0, 256, (plan.ref_batch, ctx.frames, 3, ctx.crop, ctx.crop), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    if device.type == "cuda":
        host = host.pin_memory()
    clips = host.to(device)  # the step's own batch: no second compilation for another shape
    eager = Backbones(ctx.model().backbones, variant, device)
    head, head_dtype, classes = ctx.model().head, ctx.head_dtype(), ctx.cfg.model.num_classes
    eager_features = eager(clips)
    times = time_calls(head_step(eager, head, head_dtype, host, device, classes), device, warmup=plan.warmup,
                       iterations=plan.iterations, max_s=plan.measure_s)
    r["eager_clips_per_s"] = plan.ref_batch / median(times)
    compiled = Backbones(ctx.model().backbones, variant, device)
    compiled.module = torch.compile(compiled.module, backend=plan.compile_backend, dynamic=False)
    start = time.perf_counter()
    step = head_step(compiled, head, head_dtype, host, device, classes)
    step()
    synchronize(device)
    r["compile_s"] = time.perf_counter() - start
    features = compiled(clips)
    r["semantic_cos_min"] = compare_features(eager_features[0], features[0])["cos_min"]
    r["motion_cos_min"] = compare_features(eager_features[1], features[1])["cos_min"]
    r["faithful"] = min(r["semantic_cos_min"], r["motion_cos_min"]) >= FAITHFUL_COS
    times = time_calls(step, device, warmup=plan.warmup, iterations=plan.iterations, max_s=plan.measure_s)
    r["compiled_clips_per_s"] = plan.ref_batch / median(times)
    r["speedup"] = r["compiled_clips_per_s"] / r["eager_clips_per_s"]
    r["kept"] = bool(r["faithful"] and r["speedup"] >= HELPS)
    with contextlib.suppress(Exception):
        import torch._dynamo.utils as dynamo_utils

        r["graph_breaks"] = int(sum(dynamo_utils.counters["graph_break"].values()))


SECTION_FUNCTIONS: dict[str, Callable[[Context, dict[str, Any], Budget], None]] = {
    "environment": section_environment, "data": section_data, "precision": section_precision, "throughput": section_throughput,
    "latency": section_latency, "nvjpeg": section_nvjpeg, "training": section_training, "loader": section_loader,
    "compile": section_compile,
}
NEEDS_DATA = {"nvjpeg", "training", "loader"}


# ----------------------------------------------------------------------------- the run


class Check:
    """Runs the sections in order within their budgets, writing the report after each."""

    def __init__(self, ctx: Context, sections: list[str], command: str) -> None:
        self.ctx, self.sections = ctx, sections
        self.started = time.monotonic()
        self.current: str | None = None
        self.lock = threading.Lock()
        ctx.report.update(format=FORMAT, mode=ctx.plan.mode, command=command,
                          started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          settings={"config": ctx.plan.config, "overrides": list(ctx.plan.overrides), "frames": ctx.frames,
                                    "crop": ctx.crop, "batch_sizes": list(ctx.plan.batch_sizes), "ref_batch": ctx.plan.ref_batch,
                                    "micro_batch": ctx.micro_batch, "budget_s": ctx.plan.budget_s,
                                    "cpu_threads": torch.get_num_threads(),
                                    "faithful_cos": FAITHFUL_COS, "helps": HELPS, "ssv2_fps": SSV2_FPS,
                                    "weights": "random (no weight files): speed and numerics only, no accuracy"},
                          sections={})

    def remaining(self) -> float:
        return self.ctx.plan.budget_s - (time.monotonic() - self.started)

    def run(self) -> None:
        plan = self.ctx.plan
        for index, name in enumerate(self.sections):
            cap, least = plan.budgets[name]
            reserve = sum(plan.budgets[later][1] for later in self.sections[index + 1 :])
            seconds = min(cap, self.remaining() - reserve)
            record: dict[str, Any] = {"budget_s": round(seconds, 1)}
            self.ctx.report["sections"][name] = record
            if seconds < least:
                record.update(status="skipped", error=f"only {max(0.0, seconds):.0f} s of the total budget left for it (needs {least} s)")
                log(f"[{index + 1}/{len(self.sections)}] {name}: skipped ({record['error']})")
                self.write()
                continue
            missing = NEEDS_DATA & {name} and "train" not in self.ctx.shards
            if missing:
                record.update(status="skipped", error="the data section made no shards")
                log(f"[{index + 1}/{len(self.sections)}] {name}: skipped (no shards)")
                self.write()
                continue
            log(f"[{index + 1}/{len(self.sections)}] {name} (budget {seconds:.0f} s) ...")
            self.current = name
            start = time.perf_counter()
            try:
                SECTION_FUNCTIONS[name](self.ctx, record, Budget(seconds))
                record["status"] = "ok"
            except Exception as error:
                record["status"] = "error"
                record["error"] = f"{type(error).__name__}: {error}"[:2000]
                record["traceback"] = traceback.format_exc()[-3000:]
            finally:
                record["seconds"] = round(time.perf_counter() - start, 2)
                self.current = None
            log(f"{name}: {record['status']} in {record['seconds']:.1f} s" + (f": {record['error'][:300]}" if "error" in record else ""))
            self.write()

    def abort(self, reason: str) -> None:
        """From the watchdog: record why, write what there is, stop children and the process."""
        with contextlib.suppress(Exception):
            if self.current is not None:
                record = self.ctx.report["sections"][self.current]
                record.update(status="error", error=reason)
            for process in list(self.ctx.children):
                kill_group(process)
            self.write()
            log(f"stopped: {reason}")
        os._exit(3)

    def write(self) -> None:
        report = self.ctx.report
        with self.lock:
            for _ in range(3):
                try:
                    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                    report["wall_s"] = round(time.monotonic() - self.started, 1)
                    report["verdict"] = verdict(report)
                    report["unmeasured"] = unmeasured(report)
                    text = json.dumps(rounded(report), indent=1, sort_keys=False)
                    break
                except RuntimeError:  # the main thread changed a dict under the watchdog: try again
                    time.sleep(0.05)
            else:
                return
            out = self.ctx.out
            for name, content in (("gpu_check.json", text + "\n"), ("gpu_check.md", summary(json.loads(text)))):
                staging = out / f".{name}.tmp"
                staging.write_text(content)
                os.replace(staging, out / name)


def watchdog(check: Check, hard_s: float) -> None:
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if time.monotonic() - check.started > hard_s:
                check.abort(f"the whole check ran past {hard_s:.0f} s (budget {check.ctx.plan.budget_s:.0f} s + {HARD_GRACE_S:.0f} s)")

    threading.Thread(target=watch, name="gpu_check watchdog", daemon=True).start()


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The answers, picked from the sections (each null when its section did not measure it)."""
    sections = report.get("sections", {})
    get = lambda section, key: (sections.get(section) or {}).get(key)  # noqa: E731
    compile_ = sections.get("compile") or {}
    return {
        "device": get("environment", "device"),
        "bf16_kept": get("precision", "kept"),
        "bf16_kept_at_ref_batch": (get("throughput", "kept") or {}).get("precision"),
        "throughput_kept": get("throughput", "kept"),
        "best_clips_per_s": get("throughput", "best_clips_per_s"),
        "best_batch": get("throughput", "best_batch"),
        "best_mfu": get("throughput", "best_mfu"),
        "latency_ms": get("latency", "median_ms"),
        "real_time": get("latency", "real_time"),
        "nvjpeg_within_tolerance": (get("nvjpeg", "equality") or {}).get("within_jpeg_tolerance"),
        "nvjpeg_cpu_fallback_clips": get("nvjpeg", "cpu_fallback_clips") if get("nvjpeg", "equality") else None,
        "training_resumed": get("training", "resumed"),
        "training_clips_per_s": get("training", "clips_per_s"),
        "bottleneck": get("loader", "bottleneck"),
        "cpu_cores_per_gpu_cpu_decode": get("loader", "cpu_cores_per_gpu"),
        "compile_kept": compile_.get("kept"),
        "compile_speedup": compile_.get("speedup"),
    }


def unmeasured(report: dict[str, Any]) -> list[str]:
    """Every figure this run did not measure, with the reason."""
    lines = []
    for name, section in report.get("sections", {}).items():
        if section.get("status") in ("error", "skipped"):
            lines.append(f"{name}: {section.get('status')}: {section.get('error', '')[:200]}")
        for field, reason in (section.get("not_measured") or {}).items():
            lines.append(f"{name}.{field}: {reason}")
        for group in ("variants", "paths"):
            for row in section.get(group) or []:
                if isinstance(row, dict) and "error" in row:
                    lines.append(f"{name}.{group}.{row.get('name')}: {row['error'][:200]}")
        for path, rows in (section.get("sweep") or {}).items():
            for row in rows:
                if "error" in row:
                    lines.append(f"{name}.sweep.{path}.batch {row.get('batch')}: {row['error'][:200]}")
    return lines


# ----------------------------------------------------------------------------- the readable summary


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]


def summary(report: dict[str, Any]) -> str:
    s = report.get("sections", {})
    lines = [f"# GPU check ({report.get('mode')}): {fmt((s.get('environment') or {}).get('device'))}", "",
             f"`{report.get('command')}` started {report.get('started')}, {fmt(report.get('wall_s'))} s; "
             f"random weights (speed and numerics, no accuracy).", ""]
    status = [[name, sec.get("status", "running"), sec.get("seconds"), sec.get("budget_s"), (sec.get("error") or "")[:120]]
              for name, sec in s.items()]
    lines += table(["section", "status", "s", "budget s", "error"], status) + [""]
    env = s.get("environment") or {}
    if env.get("status") == "ok":
        lines += ["## Environment", ""]
        lines += table(["device", "driver", "torch", "CUDA", "cuDNN", "NCCL", "cores", "bf16 peak TFLOP/s", "matmul TFLOP/s (measured)"],
                       [[env.get("device"), env.get("driver"), env.get("torch"), env.get("cuda"), env.get("cudnn"), env.get("nccl"),
                         env.get("cpu_cores"), env.get("bf16_peak_tflops"), env.get("matmul_tflops")]]) + [""]
    prec = s.get("precision") or {}
    if prec.get("modes"):
        lines += ["## bf16 against fp32 features", "", f"{prec.get('inputs')}; reference {prec.get('reference')}.", ""]
        rows = []
        for name, mode in prec["modes"].items():
            if "error" in mode:
                rows.append([name, mode["error"][:80], None, None, None, None, None])
                continue
            rows.append([name, fmt(mode["semantic"]["cos_min"], 6), fmt(mode["motion"]["cos_min"], 6), mode["semantic"]["max_abs_err"],
                         mode["motion"]["max_abs_err"], mode["ms_per_batch"], mode.get("faithful")])
        lines += table(["mode", "semantic cos min", "motion cos min", "semantic max abs err", "motion max abs err", "ms/batch", "faithful"], rows)
        lines += ["", f"Kept: **{fmt(prec.get('kept'))}** (today: {prec.get('today')}).", ""]
    thr = s.get("throughput") or {}
    if thr.get("variants"):
        flops = thr.get("flops_per_clip") or {}
        lines += ["## Frozen forward + head step", "",
                  f"T={thr.get('frames')}, crop {thr.get('crop')}, head {thr.get('head_dtype')}; FLOPs per clip "
                  f"{fmt(flops.get('total'))} ({fmt(flops.get('backbones_forward'))} backbones forward, "
                  f"{fmt(flops.get('head_step'))} head step).", ""]
        lines += table(["variant (batch %s)" % thr.get("ref_batch"), "precision", "channels-last", "attention", "clips/s", "speed-up",
                        "cos min (sem/mot)", "faithful"],
                       [[v.get("name"), v.get("precision"), v.get("channels_last"), v.get("attention"), v.get("clips_per_s"),
                         v.get("speedup"), f"{fmt(v.get('semantic_cos_min'), 5)}/{fmt(v.get('motion_cos_min'), 5)}",
                         v.get("faithful") if "error" not in v else v["error"][:60]] for v in thr["variants"]])
        lines += ["", f"Kept: {thr.get('kept')}.", ""]
        for path, rows in (thr.get("sweep") or {}).items():
            lines += table([f"{path}: batch", "clips/s", "ms/step", "peak GiB", "MFU (bf16 peak)", "of measured matmul"],
                           [[row.get("batch"), row.get("clips_per_s"), row.get("step_ms"), row.get("peak_memory_gib"), row.get("mfu"),
                             row.get("of_measured_matmul")] if "error" not in row else [row.get("batch"), row["error"][:60], None, None,
                                                                                       None, None] for row in rows]) + [""]
    lat = s.get("latency") or {}
    if lat.get("paths"):
        lines += ["## Latency of one clip (decoded frames to top-5)", ""]
        lines += table(["path", "precision", "median ms", "p90 ms", "clip span s", "real-time factor"],
                       [[p["name"], p["precision"], p["median_ms"], p["p90_ms"], lat.get("clip_span_s"), p["realtime_factor"]]
                        for p in lat["paths"]]) + [""]
    jpg = s.get("nvjpeg") or {}
    if jpg.get("cpu_decode"):
        lines += ["## JPEG decoding: nvJPEG (data.decode gpu) against the CPU", ""]
        rows = [["cpu", d["workers"], d["clips_per_s"]] for d in jpg["cpu_decode"]]
        rows += [["gpu (nvJPEG)", d["workers"], d["clips_per_s"]] for d in jpg.get("gpu_decode") or []]
        lines += table(["decode", "loader workers", "clips/s"], rows) + [""]
        eq = jpg.get("equality") or jpg.get("bytes_path_on_cpu")
        if eq:
            which = ("loader clips, data.decode gpu vs cpu" if jpg.get("equality")
                     else "loader clips, data.decode gpu's bytes path decoded on the CPU vs cpu")
            lines += [f"Pixels ({which}): mean abs diff {fmt(eq['mean_abs'])}, p99 {eq['p99_abs']}, max {eq['max_abs']}, "
                      f"equal {fmt(eq['equal_fraction'])}; within JPEG tolerance: {fmt(eq['within_jpeg_tolerance'])}; clips the "
                      f"loader decoded on the CPU after all: {fmt(jpg.get('cpu_fallback_clips'))}.", ""]
        dec = jpg.get("decoders")
        if dec and "error" in dec:
            lines += [f"Decoders alone: {dec['error']}", ""]
        elif dec:
            lines += [f"Decoders alone ({dec['decoder']} vs simplejpeg, {dec['frames']} whole frames of "
                      f"{', '.join('x'.join(map(str, size)) for size in dec['sizes'])}): mean abs diff "
                      f"{fmt(dec['mean_abs'])}, p99 {dec['p99_abs']}, max {dec['max_abs']}; {fmt(dec['frames_per_s'])} frames/s.", ""]
    tr = s.get("training") or {}
    if tr.get("runs"):
        lines += ["## Training run (deepspeed launcher)", "", f"`{tr.get('command')}`", ""]
        lines += table(["run", "max steps", "exit", "s", "clips/s", "data wait", "latest checkpoint", "resumed at"],
                       [[i + 1, run["max_steps"], run["exit"], run["seconds"], run.get("clips_per_s"), run.get("data_wait"),
                         run.get("latest_checkpoint"), run.get("resumed_at_step")] for i, run in enumerate(tr["runs"])])
        lines += ["", f"bf16 head: {fmt(tr.get('bf16'))}; backend expected {fmt(tr.get('backend_expected'))}, NCCL lines "
                      f"{fmt(tr.get('nccl_lines'))} (version {fmt(tr.get('nccl_version_seen'))}); steps logged {tr.get('steps_logged')}; "
                      f"resumed exactly: {fmt(tr.get('resumed'))}.", ""]
    ld = s.get("loader") or {}
    if ld.get("rows"):
        lines += ["## Loader (CPU decode) against the model", ""]
        crop = ld.get("device_crop") or {}
        rows = [[row["workers"], "worker", row.get("clips_per_s"), row.get("worker_cpu_ms_per_clip"), row.get("frame_slot_misses")]
                for row in ld["rows"]]
        rows += [[row["workers"], f"device ({crop.get('device')})", row.get("clips_per_s"), row.get("worker_cpu_ms_per_clip"),
                  row.get("frame_slot_misses")] for row in crop.get("rows", [])]
        lines += table(["workers", "crop and resize on", "clips/s", "worker CPU ms/clip", "slot misses"], rows) + [""]
        if "pixels_max_abs_difference" in crop:
            lines += [f"data.resize_on device against the workers' crops of the same batch: same keys "
                      f"{fmt(crop.get('same_keys'))}, pixels max abs difference {crop['pixels_max_abs_difference']}, mean "
                      f"{fmt(crop.get('pixels_mean_abs_difference'))}.", ""]
        model = ", ".join(f"{fmt(rate)} ({name.replace('_', ' ')})" for name, rate in (ld.get("model_clips_per_s") or {}).items())
        lines += [f"Per worker {fmt(ld.get('clips_per_s_per_worker'))} clips/s; model {model} clips/s; bottleneck: "
                  f"**{fmt(ld.get('bottleneck'))}**; CPU cores per GPU for CPU decoding: **{fmt(ld.get('cpu_cores_per_gpu'))}** "
                  f"({fmt(((ld.get('verdicts') or {}).get('today_at_micro_batch') or {}).get('cpu_cores_per_gpu_device_crop'))} with "
                  f"the crop on the device). "
                  f"{ld.get('note', '')}", ""]
    cp = s.get("compile") or {}
    if cp.get("eager_clips_per_s"):
        lines += ["## torch.compile", "", f"backend {cp.get('backend')}: compile {fmt(cp.get('compile_s'))} s, eager "
                  f"{fmt(cp.get('eager_clips_per_s'))} -> compiled {fmt(cp.get('compiled_clips_per_s'))} clips/s "
                  f"(x{fmt(cp.get('speedup'))}), faithful {fmt(cp.get('faithful'))}, kept {fmt(cp.get('kept'))}.", ""]
    if report.get("unmeasured"):
        lines += ["## Not measured in this run", ""] + [f"- {line}" for line in report["unmeasured"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the wheel bundle


def bundle_requirements(which: str) -> list[str]:
    """``name==version`` of the bundle's wheels (``downloads``: from PyPI; ``built``: built here),
    each at the version installed in this environment."""
    names = [name for name, _ in BUNDLE if (name in BUILT_HERE) == (which == "built")]
    if which == "stand-ins":
        names = list(IMAGE_STAND_INS)
    missing = [name for name in names if package_version(name) is None]
    if missing:
        raise SystemExit(f"gpu_check: {', '.join(missing)} not installed here: run `make venv` first")
    return [f"{name}=={package_version(name)}" for name in names]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_problems(folder: Path) -> tuple[list[str], dict[str, int]]:
    """What is wrong with the wheels in ``folder`` for the GPU machine (Python 3.12, x86-64 Linux):
    a bundle distribution missing, at another version than here or present twice, a wheel
    nobody asked for, or one that does not install on cp312 manylinux x86_64. Also each wheel's size."""
    problems, sizes, seen = [], {}, {}
    expected = {_normal(req.split("==")[0]): req.split("==")[1] for req in bundle_requirements("downloads") + bundle_requirements("built")}
    for path in sorted(folder.glob("*.whl")):
        sizes[path.name] = path.stat().st_size
        parts = path.name[: -len(".whl")].split("-")
        if len(parts) < 5:
            problems.append(f"{path.name}: not a wheel file name")
            continue
        name, version, python, abi, plat = _normal(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]
        seen.setdefault(name, []).append(version)
        if name not in expected:
            problems.append(f"{path.name}: not in the bundle (launch/gpu_check.py BUNDLE)")
        elif version != expected[name]:
            problems.append(f"{path.name}: version {version}, but {expected[name]} is installed here")
        pythons = python.split(".")
        fits_python = any(tag in ("py3", "cp312") or (abi == "abi3" and re.fullmatch(r"cp3(\d+)", tag) and int(tag[3:]) <= 12)
                          for tag in pythons)
        fits_abi = abi in ("none", "abi3", "cp312")
        fits_platform = plat == "any" or all("x86_64" in p and p.startswith(("manylinux", "linux")) for p in plat.split("."))
        if not (fits_python and fits_abi and fits_platform):
            problems.append(f"{path.name}: does not install on CPython 3.12 / x86-64 Linux")
    for name, version in expected.items():
        if name not in seen:
            problems.append(f"{name}=={version}: missing from {folder}")
    for name, versions in seen.items():
        if len(versions) > 1:
            problems.append(f"{name}: {len(versions)} wheels ({', '.join(versions)}): keep one, two stop the whole install")
    return problems, sizes


def tree_bytes() -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / name).stat().st_size for name in listed.decode().split("\0") if name and (REPO / name).is_file())


def check_bundle(folder: Path, python312: str | None) -> int:
    """``--check-bundle``: the wheels are the right ones, the call stays within 64 MiB, and
    (with ``--python312``) they install with the device's exact pip command and import."""
    problems, sizes = wheel_problems(folder)
    wheels, tree = sum(sizes.values()), tree_bytes()
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        print(f"  {size / 2**20:8.2f} MiB  {name}")
    print(f"wheels {wheels / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {(wheels + tree) / 2**20:.1f} MiB "
          f"of the {TREE_LIMIT_BYTES / 2**20:.0f} MiB a device call carries")
    if wheels + tree > TREE_LIMIT_BYTES:
        problems.append(f"{(wheels + tree) / 2**20:.1f} MiB is over the {TREE_LIMIT_BYTES / 2**20:.0f} MiB a device call carries")
    if python312 and not problems:
        problems += install_check(folder, python312)
    for problem in problems:
        print(f"gpu_check: bundle: {problem}", file=sys.stderr)
    if not problems:
        print(f"bundle OK: {len(sizes)} wheels in {folder}" + (f"; installed and imported with {python312}" if python312 else ""))
    return 1 if problems else 0


def install_check(folder: Path, python312: str) -> list[str]:
    """Install the wheels with the device's exact pip command under ``python312`` into a temp
    target, with the image's numpy and pyyaml (downloaded for the check, not carried) beside it,
    and import what can be imported without torch (which has no Python 3.12 build here)."""
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as scratch:
        site, image = Path(scratch) / "site", Path(scratch) / "image"
        wheels = sorted(str(p) for p in folder.glob("*.whl"))
        install = [python312, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                   "--target", str(site), *wheels]
        result = subprocess.run(install, capture_output=True, text=True)
        if result.returncode != 0:
            return [f"the device's pip command failed under {python312}: {result.stderr.strip()[-1500:]}"]
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(image / "wheels"), *bundle_requirements("stand-ins")]
        result = subprocess.run(download, capture_output=True, text=True)
        if result.returncode != 0:
            return [f"could not download the image's stand-ins ({', '.join(IMAGE_STAND_INS)}): {result.stderr.strip()[-800:]}"]
        result = subprocess.run([python312, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(image / "site"),
                                 *map(str, (image / "wheels").glob("*.whl"))], capture_output=True, text=True)
        if result.returncode != 0:
            return [f"could not install the stand-ins: {result.stderr.strip()[-800:]}"]
        code = ("import importlib, sys\n"
                f"for name in {list(BUNDLE_IMPORTS)!r}:\n"
                "    module = importlib.import_module(name)\n"
                "    assert module.__file__.startswith(sys.argv[1]), (name, module.__file__)\n"
                "import av, simplejpeg, numpy\n"
                "frame = av.VideoFrame.from_ndarray(numpy.zeros((16, 16, 3), numpy.uint8), format='rgb24')\n"
                "assert simplejpeg.decode_jpeg(simplejpeg.encode_jpeg(frame.to_ndarray(format='rgb24'))).shape == (16, 16, 3)\n"
                "import compileall\n"
                "assert compileall.compile_dir(sys.argv[1] + '/deepspeed', quiet=2, legacy=False, optimize=0)\n"
                "assert compileall.compile_dir(sys.argv[1] + '/timm', quiet=2, legacy=False, optimize=0)\n"
                "print('imported', ', '.join(" + repr(list(BUNDLE_IMPORTS)) + "), 'under', sys.version.split()[0])\n")
        env = dict(os.environ, PYTHONPATH=f"{site}:{image / 'site'}", PYTHONDONTWRITEBYTECODE="1")
        result = subprocess.run([python312, "-c", code, str(site)], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return [f"importing the bundle under {python312} failed: {result.stderr.strip()[-1500:]}"]
        print(result.stdout.strip() + " (deepspeed and timm need torch, which has no Python 3.12 build here: byte-compiled only)")
    return []


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__.split("\n\n")[0],
                                     epilog="sections: " + ", ".join(SECTIONS) + ". The device call: " + DEVICE_COMMAND,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md and gpu_check.log (created)")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU with the debug config and small sizes (CI)")
    parser.add_argument("--sections", help="comma-separated subset of the sections, in their order (default: all)")
    parser.add_argument("--budget-s", type=float, help="total seconds for the sections (default: 360 on a GPU, 200 for --cpu-smoke)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder with the data and the training run")
    parser.add_argument("--check-bundle", type=Path, metavar="DIR", help="check the wheels in DIR (`make gpu-bundle`) and exit")
    parser.add_argument("--python312", metavar="PYTHON", help="with --check-bundle: install and import them with this Python 3.12")
    parser.add_argument("--bundle-list", choices=("downloads", "built"), help="print the bundle's name==version list and exit")
    parser.add_argument("--only", choices=("compile",), help=argparse.SUPPRESS)  # the compile section's child process
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and not (args.check_bundle or args.bundle_list):
        parser.error("--out DIR is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bundle_list:
        print(" ".join(bundle_requirements(args.bundle_list)))
        return 0
    if args.check_bundle:
        return check_bundle(args.check_bundle, args.python312)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: run on a GPU machine, or pass --cpu-smoke for the reduced CPU run", file=sys.stderr)
        return 2
    plan = CPU_PLAN if args.cpu_smoke else GPU_PLAN
    if args.budget_s:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    sections = list(SECTIONS)
    if args.sections:
        sections = [name.strip() for name in args.sections.split(",") if name.strip()]
        unknown = [name for name in sections if name not in SECTIONS]
        if unknown:
            print(f"gpu_check: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
        sections = [name for name in SECTIONS if name in sections]
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        # One intra-op thread here and in every child (the training ranks, the compile child):
        # CI's 2 cores are shared, and torch's spinning OpenMP threads, two per process, slowed the
        # same step 70x beside another torch process (950 ms against 14 ms with one thread).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(plan, args.out, work, device)
    command = "python -m launch.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.only == "compile":  # the child of the compile section
            variant = Variant(**json.loads(args.variant)) if args.variant else ctx.today()
            check = Check(ctx, [], command)
            record: dict[str, Any] = {}
            ctx.report["sections"]["compile"] = record
            try:
                compile_in_child(ctx, record, Budget(plan.budgets["compile"][0]), variant)
            except Exception as error:  # what was measured before it stays, with the error
                record["error_in_child"] = f"{type(error).__name__}: {error}"[:2000]
                record["traceback"] = traceback.format_exc()[-3000:]
                check.write()
                raise
            check.write()
            return 0
        if "data" not in sections and NEEDS_DATA & set(sections):
            sections.insert(0 if "environment" not in sections else 1, "data")
        check = Check(ctx, sections, command)
        watchdog(check, plan.budget_s + HARD_GRACE_S)
        log(f"{plan.mode} on {device}: sections {', '.join(sections)}; budget {plan.budget_s:.0f} s; writing {args.out}")
        check.run()
        check.write()
        print(summary(json.loads((args.out / "gpu_check.json").read_text())), flush=True)
        log(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} in {time.monotonic() - check.started:.0f} s")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
