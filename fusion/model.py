"""The whole classifier: two frozen backbones that turn uint8 clips into features, and the
trainable :class:`~fusion.heads.FusionHead` that turns features into logits.

Start reading at :func:`build_model`. :class:`ModelConfig` is the ``model:`` section of a
config file; :func:`parameter_report` counts what trains and what is frozen (the table that
``python -m fusion`` prints).

``model.size`` picks the backbones' size only: ``debug`` builds tiny backbones with the same
builders (for tests, CI and the CPU demo). The head's size always comes from ``model.dim``,
``model.heads`` and ``model.layers``; ``launch/configs/debug.yaml`` sets a small ``dim`` beside
``size: debug``, so there is a single builder path and no hidden second set of defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fusion.backbones import MotionConfig, SemanticConfig, build_motion, build_semantic
from fusion.config import ConfigError, option
from fusion.heads import Attention, FusionHead
from sharding.ssv2 import NUM_CLASSES

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """The ``model:`` section of a config: backbones, fusion variant and head size."""

    size: Literal["full", "debug"] = option(
        "full", "backbone size: full (the published architectures) or debug (tiny, same builders; tests and the CPU demo)"
    )
    semantic: SemanticConfig = option(factory=SemanticConfig, doc="semantic (per-frame) backbone")
    motion: MotionConfig = option(factory=MotionConfig, doc="motion (per-segment) backbone")
    fusion: Literal["xattn", "concat", "elementwise", "semantic_only", "motion_only"] = option(
        "xattn",
        "the fusion operator, the one thing the variants do not share: xattn (bidirectional cross-attention), "
        "concat (concatenation per time step), elementwise (product per time step), semantic_only or motion_only "
        "(one stream; a second self-attention in place of fusion)",
    )
    heads: int = option(8, "attention heads in the head; must divide model.dim")
    dim: int = option(512, "width both streams are projected to")
    layers: int = option(1, "layers in the head; each is a temporal self-attention block then a fusion block, per stream")
    num_classes: int = option(NUM_CLASSES, "classifier outputs (174 for SSv2)")
    dropout: float = option(0.1, "dropout on projections, attention weights, residual branches and before the classifier")
    ffn_mult: int = option(4, "hidden width of each block's feed-forward layer, in multiples of model.dim")
    pool: Literal["mean", "attn"] = option(
        "mean", "temporal pooling of each stream: mean, or attn (a learned softmax-weighted mean)"
    )
    max_time: int = option(64, "longest feature sequence (frames or motion segments) the learned time embeddings cover")
    dtype: Literal["auto", "fp32", "bf16"] = option(
        "auto", "dtype of the frozen backbones: auto (bf16 on GPUs with compute capability 8.0+, else fp32), fp32 or bf16"
    )

    def __post_init__(self) -> None:
        for name in ("heads", "dim", "layers", "num_classes", "ffn_mult", "max_time"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            divisors = [h for h in (1, 2, 4, 8, 16, 32) if self.dim % h == 0]
            raise ConfigError(
                f"model.heads={self.heads} does not divide model.dim={self.dim}; "
                f"choose heads from {divisors} or change model.dim"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


# bf16 arithmetic needs Ampere (compute capability 8.0) or newer; older GPUs emulate it slowly.
BF16_MIN_CAPABILITY = (8, 0)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The backbones' dtype for ``model.dtype``: ``auto`` is bf16 on a CUDA device that has
    bf16 (compute capability 8.0+), fp32 on older GPUs (with a warning) and on CPUs."""
    if name == "auto":
        device = torch.device(device)
        if device.type != "cuda":
            return torch.float32
        capability = tuple(torch.cuda.get_device_capability(device))
        if capability >= BF16_MIN_CAPABILITY:
            return torch.bfloat16
        warnings.warn(
            f"model.dtype auto: {device} has compute capability {capability[0]}.{capability[1]}, without bf16 "
            f"(needs {BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}+): the frozen backbones run in fp32, "
            "about half as fast as bf16 on a newer GPU",
            stacklevel=2,
        )
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class FrozenBackbones(nn.Module):
    """Both backbones, frozen: no gradients, always in eval mode, features returned in fp32."""

    def __init__(self, semantic: nn.Module, motion: nn.Module) -> None:
        super().__init__()
        self.semantic = semantic
        self.motion = motion
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenBackbones:
        # A parent's .train() must not switch BatchNorm statistics or dropout on in frozen parts.
        return super().train(False)

    def set_dtype(self, dtype: torch.dtype) -> FrozenBackbones:
        """Cast parameters and buffers (call after ``.to(device)``; bf16 on GPUs)."""
        return self.to(dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.no_grad()
    def forward(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 clips [B, T, 3, H, W] -> (semantic [B, T, Ds], motion [B, T', Dm]), fp32."""
        # no_grad rather than inference_mode: the head saves these features for its backward.
        return self.semantic(clips).float(), self.motion(clips).float()


class FusionClassifier(nn.Module):
    """Frozen backbones followed by the trainable head. Only ``head`` has trainable parameters.

    Built for feature shards (``build_model(..., frozen_on_meta=True)``), the backbones exist
    as shapes only, on the meta device: they are counted in reports but never run."""

    def __init__(self, cfg: ModelConfig, backbones: FrozenBackbones, head: FusionHead) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbones = backbones
        self.head = head

    @property
    def runs_backbones(self) -> bool:
        return not next(self.backbones.parameters()).is_meta

    def features(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """(semantic [B, T, Ds], motion [B, T', Dm]) in fp32 without gradients; cacheable."""
        if not self.runs_backbones:
            raise RuntimeError("this model was built for feature shards (backbones on the meta device): it cannot "
                               "turn clips into features; build it with frozen_on_meta=False")
        return self.backbones(clips)

    def forward(self, clips: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Attention]:
        """uint8 clips [B, T, 3, H, W] -> logits [B, num_classes] (and attention weights if asked)."""
        semantic, motion = self.features(clips)
        return self.head(semantic, motion, return_attention=return_attention)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None,
                frozen_on_meta: bool = False) -> FusionClassifier:
    """Backbones from ``cfg.semantic`` / ``cfg.motion`` at ``cfg.size``, a head sized from their
    widths, everything on ``device`` and the backbones in ``resolve_dtype(cfg.dtype, device)``.

    ``seed``: the random initialisation of backbones without weight files and of the head, each
    from ``seed`` (the head's does not depend on what the backbones drew, so a head built for
    feature shards starts where one built with live backbones does). ``frozen_on_meta``: the
    backbones as shapes only (no memory, no weight files read), for training from features.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if frozen_on_meta:
        from fusion.backbones.weights import RandomWeightsWarning

        shapes_only = dataclasses.replace(cfg, semantic=dataclasses.replace(cfg.semantic, weights=None),
                                          motion=dataclasses.replace(cfg.motion, weights=None))
        weights_log = logging.getLogger("fusion.backbones.weights")
        was_disabled, weights_log.disabled = weights_log.disabled, True  # shapes only: "random weights" is no news
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore", RandomWeightsWarning)
                semantic, motion = build_semantic(shapes_only.semantic, cfg.size), build_motion(shapes_only.motion, cfg.size)
        finally:
            weights_log.disabled = was_disabled
    else:
        semantic, motion = build_semantic(cfg.semantic, cfg.size), build_motion(cfg.motion, cfg.size)
    backbones = FrozenBackbones(semantic, motion)
    if seed is not None:
        torch.manual_seed(seed)
    head = FusionHead(cfg, semantic_dim=semantic.out_dim, motion_dim=motion.out_dim).to(device)
    if not frozen_on_meta:
        backbones = backbones.to(device)
        backbones.set_dtype(resolve_dtype(cfg.dtype, device))
    return FusionClassifier(cfg, backbones, head)


def optimizer_groups(head: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The head's trainable parameters in two AdamW groups: ``weight_decay`` on weight
    matrices, none on norms, biases and the head's ``no_weight_decay()`` names (the time
    embeddings), the usual split of timm and nanoGPT. Each group carries ``names``."""
    from timm.optim import param_groups_weight_decay

    # timm decides the split (ndim <= 1, ``.bias`` or a listed name); we only add the names.
    skip = head.no_weight_decay() if hasattr(head, "no_weight_decay") else ()
    groups = param_groups_weight_decay(head, weight_decay=1.0, no_weight_decay_list=skip)
    name_of = {id(param): name for name, param in head.named_parameters()}
    out = []
    for group in groups:
        decayed = group["weight_decay"] > 0
        out.append({"params": group["params"], "weight_decay": weight_decay if decayed else 0.0,
                    "names": [name_of[id(param)] for param in group["params"]]})
    return out


def weight_decay_summary(groups: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Tensors and parameters with and without weight decay, for the report and the log."""
    summary = {"decayed": {"tensors": 0, "params": 0}, "not_decayed": {"tensors": 0, "params": 0}}
    for group in groups:
        row = summary["decayed" if group["weight_decay"] > 0 else "not_decayed"]
        row["tensors"] += len(group["params"])
        row["params"] += sum(param.numel() for param in group["params"])
    return summary


def _count(module: nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def parameter_report(model: FusionClassifier) -> dict[str, Any]:
    """Parameter counts: ``total``, ``trainable``, ``frozen``, ``trainable_percent`` and
    ``modules``, one row per backbone, the head, and each of the head's direct sub-modules
    (rows ``head.*`` add up to ``head``)."""
    cfg = model.cfg
    rows = [
        {"module": "backbones.semantic", "label": f"semantic backbone ({cfg.semantic.name})", **_count(model.backbones.semantic)},
        {"module": "backbones.motion", "label": f"motion backbone ({cfg.motion.name})", **_count(model.backbones.motion)},
        {"module": "head", "label": f"fusion head ({cfg.fusion})", **_count(model.head)},
    ]
    for name, child in model.head.named_children():
        counts = _count(child)
        if counts["total"]:
            rows.append({"module": f"head.{name}", "label": name, **counts})
    totals = _count(model)
    percent = 100.0 * totals["trainable"] / totals["total"] if totals["total"] else 0.0
    # which head tensors AdamW decays (the split is the same whatever ds.json's weight_decay)
    decay = weight_decay_summary(optimizer_groups(model.head, weight_decay=1.0))
    return {**totals, "trainable_percent": round(percent, 3), "modules": rows, "weight_decay": decay}


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned text table."""
    header = ("module", "total", "trainable", "frozen", "% trainable")
    lines = [
        (("  " if r["module"].startswith("head.") else "") + r["label"], r["total"], r["trainable"], r["frozen"])
        for r in report["modules"]
    ]
    lines.append(("all", report["total"], report["trainable"], report["frozen"]))
    cells = [header] + [
        (label, f"{total:,}", f"{trainable:,}", f"{frozen:,}", f"{100.0 * trainable / total:.1f}" if total else "-")
        for label, total, trainable, frozen in lines
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def render(row: tuple[str, ...]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])

    rule = "-" * len(render(header))
    body = [render(row) for row in cells[1:-1]]
    summary = (
        f"trainable: {report['trainable'] / 1e6:.2f}M of {report['total'] / 1e6:.2f}M parameters "
        f"({report['trainable_percent']:.1f}%)"
    )
    lines = [render(header), rule, *body, rule, render(cells[-1]), summary]
    if "weight_decay" in report:
        on, off = report["weight_decay"]["decayed"], report["weight_decay"]["not_decayed"]
        lines.append(
            f"weight decay: on {on['tensors']} weight matrices ({on['params']:,} parameters), off on {off['tensors']} "
            f"norm, bias and time-embedding tensors ({off['params']:,} parameters)"
        )
    return "\n".join(lines)
