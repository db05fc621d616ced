"""The frozen backbones: a semantic stream (one feature per frame) and a motion stream
(one feature per temporal segment), each built by one call from a small config.

Start reading at :func:`build_semantic` and :func:`build_motion`. Every backbone

- takes uint8 clips ``[B, T, 3, H, W]`` and normalises them itself;
- runs in the dtype of its parameters (the caller does ``.to(dtype)``);
- is frozen: no parameter requires grad and it stays in eval mode (``.train()`` is a no-op),
  the caller runs it under ``torch.no_grad()``;
- exposes ``out_dim``.

Sizes: ``full`` is the published architecture (and loads the published weights);
``debug`` is the same builder with a tiny width and depth, for tests and the CPU demo.

| choice          | module           | full out_dim | output                               |
|-----------------|------------------|--------------|--------------------------------------|
| dinov2_vits14   | semantic.py      | 384          | [B, T, 384] (+ patch [B, T, N, 384]) |
| clip_vitb16     | semantic.py      | 768          | [B, T, 768]                          |
| vit_s16_sup     | semantic.py      | 384          | [B, T, 384]                          |
| i3d_r50         | i3d.py           | 2048         | [B, T/2, 2048]                       |
| r2plus1d_18     | r2plus1d.py      | 512          | [B, T/8, 512]                        |
| c3d             | c3d.py           | 512          | [B, T/8, 512] (pooled conv5b)        |

Weight files are read by :mod:`fusion.backbones.weights`; each external layout is translated by
one pure ``*_filter`` function next to the model it fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from fusion.config import ConfigError, option

Size = Literal["full", "debug"]
SIZES: tuple[str, ...] = ("full", "debug")
SEMANTIC_NAMES: tuple[str, ...] = ("dinov2_vits14", "clip_vitb16", "vit_s16_sup")
MOTION_NAMES: tuple[str, ...] = ("i3d_r50", "r2plus1d_18", "c3d")


@dataclass(frozen=True)
class SemanticConfig:
    """The per-frame image backbone."""

    name: Literal["dinov2_vits14", "clip_vitb16", "vit_s16_sup"] = option(
        "dinov2_vits14",
        "per-frame image backbone: dinov2_vits14 (DINOv2 ViT-S/14, 384-d), clip_vitb16 "
        "(CLIP ViT-B/16, 768-d) or vit_s16_sup (supervised ImageNet ViT-S/16, 384-d)",
    )
    weights: str | None = option(
        None,
        "local weight file (original DINOv2 .pth, or timm .pth/.safetensors); "
        "none = random init (a warning says so)",
    )
    img_size: int = option(224, "frames are resized to img_size x img_size inside the backbone if they differ")
    patch_tokens: bool = option(False, "forward_features also returns the patch tokens [B, T, N, D]")

    def __post_init__(self) -> None:
        if self.name not in SEMANTIC_NAMES:
            raise ConfigError(f"semantic.name: {self.name!r} is not one of {', '.join(SEMANTIC_NAMES)}")
        if self.img_size <= 0:
            raise ConfigError(f"semantic.img_size must be positive, got {self.img_size}")


@dataclass(frozen=True)
class MotionConfig:
    """The clip-level video backbone."""

    name: Literal["i3d_r50", "r2plus1d_18", "c3d"] = option(
        "i3d_r50",
        "video backbone: i3d_r50 (pytorchvideo I3D R50, 2048-d, T/2 steps), r2plus1d_18 "
        "(torchvision R(2+1)D-18, 512-d, T/8 steps) or c3d (C3D pooled conv5b, 512-d, T/8 steps)",
    )
    weights: str | None = option(
        None,
        "local weight file (I3D_8x8_R50.pyth, torchvision r2plus1d_18 .pth, C3D .pth); "
        "none = random init (a warning says so)",
    )

    def __post_init__(self) -> None:
        if self.name not in MOTION_NAMES:
            raise ConfigError(f"motion.name: {self.name!r} is not one of {', '.join(MOTION_NAMES)}")


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ConfigError(f"backbone size {size!r} is not one of {', '.join(SIZES)}")


def build_semantic(cfg: SemanticConfig, size: Size) -> nn.Module:
    """The frozen per-frame backbone: ``forward(uint8 [B,T,3,H,W]) -> [B, T, out_dim]``.

    ``forward_features`` returns ``dict(cls=[B,T,D])`` plus ``patch=[B,T,N,D]`` when
    ``cfg.patch_tokens``.
    """
    from fusion.backbones.semantic import build_vit

    _check_size(size)
    return build_vit(cfg, size)


def build_motion(cfg: MotionConfig, size: Size) -> nn.Module:
    """The frozen video backbone: ``forward(uint8 [B,T,3,H,W]) -> [B, T', out_dim]``,
    pooled over space with time kept (T' = T/2 for I3D, T/8 for R(2+1)D and C3D)."""
    _check_size(size)
    if cfg.name == "i3d_r50":
        from fusion.backbones.i3d import build_i3d

        return build_i3d(cfg.weights, size)
    if cfg.name == "r2plus1d_18":
        from fusion.backbones.r2plus1d import build_r2plus1d

        return build_r2plus1d(cfg.weights, size)
    from fusion.backbones.c3d import build_c3d

    return build_c3d(cfg.weights, size)


__all__ = [
    "MOTION_NAMES",
    "SEMANTIC_NAMES",
    "MotionConfig",
    "SemanticConfig",
    "build_motion",
    "build_semantic",
]
