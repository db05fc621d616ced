"""The semantic stream: a frozen timm ViT applied to every frame, one feature per frame.

Choices (``SemanticConfig.name`` -> timm model, width, input normalisation):

- ``dinov2_vits14`` -> ``vit_small_patch14_dinov2``, 384, ImageNet mean/std;
- ``clip_vitb16``   -> ``vit_base_patch16_clip_quickgelu_224``, 768, OpenAI CLIP mean/std. OpenAI's
  CLIP was trained with QuickGELU (``x * sigmoid(1.702 x)``); timm's plain ``..._clip_224`` uses
  GELU, which gives the OpenAI weights different features in every block;
- ``vit_s16_sup``   -> ``vit_small_patch16_224``, 384, mean/std 0.5 (what timm's supervised
  ViT-S/16 weights, augreg in21k->in1k, were trained with).

The per-frame feature is the class token after the final norm; patch tokens are optional.
Weight files: the original DINOv2 release (``dinov2_vits14_pretrain.pth``, 518-px position
embedding, ``mask_token``) goes through :func:`dinov2_original_filter`; timm's own files (and
anything else timm's ``checkpoint_filter_fn`` reads, e.g. OpenAI CLIP) through :func:`timm_filter`.
Both resample the position embedding to ``img_size`` with timm's own code. Start at :func:`build_vit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from fusion.backbones import SemanticConfig
from fusion.backbones.weights import FrozenBackbone, StateDict, check_clips


@dataclass(frozen=True)
class Variant:
    timm_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


VARIANTS: dict[str, Variant] = {
    "dinov2_vits14": Variant("vit_small_patch14_dinov2", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "clip_vitb16": Variant("vit_base_patch16_clip_quickgelu_224", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "vit_s16_sup": Variant("vit_small_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# the debug size keeps patch size, token layout and normalisation; only width and depth shrink
DEBUG_ARCH = dict(embed_dim=32, depth=2, num_heads=2)


class FrameViT(FrozenBackbone):
    """A timm ViT over the frames of a clip: uint8 [B, T, 3, H, W] -> [B, T, D]."""

    def __init__(self, name: str, vit: VisionTransformer, img_size: int, patch_tokens: bool) -> None:
        super().__init__()
        self.name = name
        self.vit = vit
        self.img_size = img_size
        self.patch_tokens = patch_tokens
        self.out_dim = vit.embed_dim
        self.mean, self.std = VARIANTS[name].mean, VARIANTS[name].std

    def forward_features(self, clips: Tensor) -> dict[str, Tensor]:
        """``cls`` [B, T, D] and, when ``patch_tokens``, ``patch`` [B, T, N, D] (N = grid cells)."""
        check_clips(clips, self.name)
        batch, steps = clips.shape[:2]
        x = self.normalise(clips.flatten(0, 1), self.mean, self.std, channel_dim=1)  # (B*T, 3, H, W) fp32
        if x.shape[-2:] != (self.img_size, self.img_size):
            size = (self.img_size, self.img_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        tokens = self.vit.forward_features(x.to(self.dtype))  # (B*T, prefix + N, D), final norm applied
        out = {"cls": tokens[:, 0].unflatten(0, (batch, steps))}
        if self.patch_tokens:
            out["patch"] = tokens[:, self.vit.num_prefix_tokens :].unflatten(0, (batch, steps))
        return out

    def forward(self, clips: Tensor) -> Tensor:
        return self.forward_features(clips)["cls"]


def dinov2_original_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """facebookresearch/dinov2 layout (``mask_token``, 518-px ``pos_embed``) -> timm's ViT.

    timm's converter drops ``mask_token`` (only used for masked pre-training) and resamples
    ``pos_embed`` from the 37x37 grid to the model's grid.
    """
    if "mask_token" not in state_dict:
        raise ValueError("not a DINOv2 original checkpoint: it has no mask_token")
    return checkpoint_filter_fn(dict(state_dict), model)  # type: ignore[arg-type]


def timm_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """timm's own layout (and what timm converts: OpenAI/OpenCLIP) -> our head-less ViT.

    The classifier ``head.*`` is dropped: we keep features and the fusion head classifies.
    """
    converted = checkpoint_filter_fn(dict(state_dict), model)  # type: ignore[arg-type]
    return {k: v for k, v in converted.items() if not k.startswith("head.")}


def semantic_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Pick the layout's filter: ``mask_token`` marks the original DINOv2 release."""
    if "mask_token" in state_dict:
        return dinov2_original_filter(state_dict, model)
    return timm_filter(state_dict, model)


def build_vit(cfg: SemanticConfig, size: str) -> FrameViT:
    """The frozen per-frame ViT for ``cfg`` at ``size`` ("full" or "debug")."""
    arch: dict[str, object] = dict(DEBUG_ARCH) if size == "debug" else {}
    if cfg.weights is not None:
        arch["weight_init"] = "skip"  # every tensor is overwritten by the file: save the slow init
    vit = timm.create_model(
        VARIANTS[cfg.name].timm_name, pretrained=False, num_classes=0, img_size=cfg.img_size, **arch
    )
    if cfg.weights is None:
        # DINOv2's LayerScale starts at 1e-5, which is right for training from scratch but makes
        # a random, frozen ViT ignore its input (every residual branch is scaled to ~0: the
        # class token comes out the same for every frame). A random backbone only serves tests
        # and the demo, where its features must still carry the image; a weight file
        # overwrites the scales anyway.
        for module in vit.modules():
            if isinstance(module, LayerScale):
                nn.init.ones_(module.gamma)
    model = FrameViT(cfg.name, vit, cfg.img_size, cfg.patch_tokens)
    model.finish(cfg.name, cfg.weights, semantic_filter, target=vit)
    return model
