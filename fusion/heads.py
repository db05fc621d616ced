"""The trainable fusion head: per-frame semantic features and per-segment motion features in,
class logits out. It is the only part of the model that trains (and what DeepSpeed wraps).

Start reading at :class:`FusionHead`. Every variant shares the same pieces so that an ablation
changes one thing only:

- **projection** per stream: ``Linear(in_dim, dim) -> LayerNorm`` plus a learned temporal
  position embedding (one table per stream, ``max_time`` rows) and dropout;
- **encoder**: ``layers`` pre-norm transformer blocks (attention with a residual, then a GELU
  FFN with a residual);
- **pooling** over time (``pool``): ``mean`` averages each stream over time, ``attn`` weights
  each time step by a learned score (softmax over time); with two streams the two pooled vectors
  are concatenated;
- **classifier**: ``LayerNorm -> Dropout -> Linear(num_classes)``.

The ``fusion`` variants:

- ``xattn`` (the model): bidirectional cross-attention. In each layer the semantic sequence
  [B, T, dim] queries the motion sequence [B, T', dim] and, from the same inputs, the motion
  sequence queries the semantic one; both streams are pooled and concatenated (2*dim).
- ``concat``: the motion sequence is linearly interpolated in time from T' to T, the two
  projected streams are concatenated per time step and mapped back by ``Linear(2*dim, dim)``;
  then ``layers`` self-attention blocks, pooling, classifier.
- ``elementwise``: as ``concat``, but the two aligned streams are multiplied element-wise.
- ``semantic_only`` / ``motion_only``: one stream alone through ``layers`` self-attention
  blocks, pooling, classifier (the other stream's features are accepted and ignored).

With ``return_attention=True`` the forward pass also returns the softmax attention weights
(before dropout): a dict mapping a direction to one [B, heads, Tq, Tk] tensor per layer. The keys
are ``semantic_queries_motion`` and ``motion_queries_semantic`` for ``xattn`` and ``self`` for
the single-sequence variants. Without it attention runs through
``F.scaled_dot_product_attention`` (the fused kernels), which never materialises the weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from fusion.model import ModelConfig

Attention = dict[str, list[Tensor]]
"""Direction -> one [B, heads, Tq, Tk] weight tensor per layer."""

FUSIONS = ("xattn", "concat", "elementwise", "semantic_only", "motion_only")


class MultiHeadAttention(nn.Module):
    """Multi-head attention of ``query`` [B, Tq, dim] over ``context`` [B, Tk, dim].

    The training path is ``F.scaled_dot_product_attention``; the weights are computed
    explicitly only when asked for, by the same formula, so both paths give the same output.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, time, dim = x.shape
        return x.view(batch, time, self.heads, dim // self.heads).transpose(1, 2)  # (B, h, T, hd)

    def forward(self, query: Tensor, context: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        batch, time, dim = query.shape
        q = self._split_heads(self.q(query))
        k, v = (self._split_heads(t) for t in self.kv(context).chunk(2, dim=-1))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, Tq, Tk)
            y = F.dropout(weights, dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, h, Tq, hd)
        y = y.transpose(1, 2).reshape(batch, time, dim)
        return self.out(y), weights


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block; attends over ``context`` (cross) or over ``x`` itself (self)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        # Cross-attention normalises the other stream with its own statistics.
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        query = self.norm_query(x)
        kv = query if self.norm_context is None else self.norm_context(context)
        attended, weights = self.attn(query, kv, need_weights)
        x = x + self.drop(attended)
        x = x + self.drop(self.ffn(self.norm_ffn(x)))
        return x, weights


class BidirectionalLayer(nn.Module):
    """Semantic queries motion and motion queries semantic, both from this layer's inputs."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.semantic_block = AttentionBlock(dim, heads, ffn_mult, dropout, cross=True)
        self.motion_block = AttentionBlock(dim, heads, ffn_mult, dropout, cross=True)

    def forward(
        self, semantic: Tensor, motion: Tensor, need_weights: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        new_semantic, semantic_weights = self.semantic_block(semantic, motion, need_weights)
        new_motion, motion_weights = self.motion_block(motion, semantic, need_weights)
        return new_semantic, new_motion, semantic_weights, motion_weights


class StreamProjection(nn.Module):
    """Backbone features [B, T, in_dim] -> [B, T, dim] with a learned position per time step."""

    def __init__(self, in_dim: int, dim: int, max_time: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.time_embed = nn.Parameter(torch.zeros(max_time, dim))
        nn.init.trunc_normal_(self.time_embed, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        time = x.shape[1]
        if time > self.time_embed.shape[0]:
            raise ValueError(
                f"a sequence of {time} time steps is longer than model.max_time={self.time_embed.shape[0]}; "
                "raise model.max_time (a new head must be trained)"
            )
        return self.drop(self.norm(self.proj(x)) + self.time_embed[:time])


class TemporalPool(nn.Module):
    """[B, T, dim] -> [B, dim]: a plain mean, or a softmax-weighted mean with learned scores."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        # no bias: softmax over time ignores a constant shift, so a bias would never learn
        self.score = nn.Linear(dim, 1, bias=False) if mode == "attn" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.score is None:
            return x.mean(dim=1)
        weights = torch.softmax(self.score(x), dim=1)  # (B, T, 1)
        return (weights * x).sum(dim=1)


def align_time(x: Tensor, time: int) -> Tensor:
    """Linearly interpolate [B, T', D] to [B, time, D] (motion segments onto frame times)."""
    if x.shape[1] == time:
        return x
    return F.interpolate(x.transpose(1, 2), size=time, mode="linear", align_corners=False).transpose(1, 2)


class FusionHead(nn.Module):
    """Projections, fusion encoder, temporal pooling and classifier; see the module docstring."""

    def __init__(self, cfg: ModelConfig, semantic_dim: int, motion_dim: int) -> None:
        super().__init__()
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"model.fusion={cfg.fusion!r} is not one of {', '.join(FUSIONS)}")
        self.fusion = cfg.fusion
        dim = cfg.dim
        uses_semantic = cfg.fusion != "motion_only"
        uses_motion = cfg.fusion != "semantic_only"
        self.semantic_proj = StreamProjection(semantic_dim, dim, cfg.max_time, cfg.dropout) if uses_semantic else None
        self.motion_proj = StreamProjection(motion_dim, dim, cfg.max_time, cfg.dropout) if uses_motion else None
        self.combine = nn.Linear(2 * dim, dim) if cfg.fusion == "concat" else None
        if cfg.fusion == "xattn":
            self.layers = nn.ModuleList(
                BidirectionalLayer(dim, cfg.heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.layers)
            )
        else:
            self.layers = nn.ModuleList(
                AttentionBlock(dim, cfg.heads, cfg.ffn_mult, cfg.dropout, cross=False) for _ in range(cfg.layers)
            )
        streams = 2 if cfg.fusion == "xattn" else 1
        self.pool = nn.ModuleList(TemporalPool(dim, cfg.pool) for _ in range(streams))
        self.classifier = nn.Sequential(
            nn.LayerNorm(streams * dim), nn.Dropout(cfg.dropout), nn.Linear(streams * dim, cfg.num_classes)
        )

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay must not shrink besides norms and biases (which the
        optimizer groups exclude by shape): the learned time embeddings (timm's convention,
        like a ViT's ``pos_embed``)."""
        return {f"{name}.time_embed" for name in ("semantic_proj", "motion_proj") if getattr(self, name) is not None}

    def forward(
        self, semantic: Tensor, motion: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Attention]:
        """``semantic`` [B, T, Ds], ``motion`` [B, T', Dm] -> logits [B, num_classes]."""
        pooled, attention = self.forward_features(semantic, motion, return_attention)
        logits = self.classifier(pooled)
        return (logits, attention) if return_attention else logits

    def forward_features(self, semantic: Tensor, motion: Tensor, return_attention: bool = False) -> tuple[Tensor, Attention]:
        """The fused clip feature the classifier reads, [B, streams * dim], and the attention
        weights (empty lists unless ``return_attention``)."""
        # Features arrive in fp32 from the frozen backbones; the head may run in bf16 (DeepSpeed).
        dtype = self.classifier[-1].weight.dtype
        semantic, motion = semantic.to(dtype), motion.to(dtype)
        if self.fusion == "xattn":
            return self._cross(semantic, motion, return_attention)
        return self._single(self._sequence(semantic, motion), return_attention)

    def _cross(self, semantic: Tensor, motion: Tensor, need_weights: bool) -> tuple[Tensor, Attention]:
        s, m = self.semantic_proj(semantic), self.motion_proj(motion)  # (B, T, dim), (B, T', dim)
        attention: Attention = {"semantic_queries_motion": [], "motion_queries_semantic": []}
        for layer in self.layers:
            s, m, s_weights, m_weights = layer(s, m, need_weights)
            if need_weights:
                attention["semantic_queries_motion"].append(s_weights)
                attention["motion_queries_semantic"].append(m_weights)
        return torch.cat([self.pool[0](s), self.pool[1](m)], dim=-1), attention  # (B, 2*dim)

    def _sequence(self, semantic: Tensor, motion: Tensor) -> Tensor:
        """The one sequence the single-stream variants encode: [B, T, dim]."""
        if self.fusion == "semantic_only":
            return self.semantic_proj(semantic)
        if self.fusion == "motion_only":
            return self.motion_proj(motion)
        s = self.semantic_proj(semantic)
        m = align_time(self.motion_proj(motion), s.shape[1])
        if self.fusion == "concat":
            return self.combine(torch.cat([s, m], dim=-1))
        return s * m

    def _single(self, x: Tensor, need_weights: bool) -> tuple[Tensor, Attention]:
        attention: Attention = {"self": []}
        for block in self.layers:
            x, weights = block(x, need_weights=need_weights)
            if need_weights:
                attention["self"].append(weights)
        return self.pool[0](x), attention
