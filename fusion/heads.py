"""The trainable fusion head: per-frame semantic features and per-segment motion features in,
class logits out. It is the only part of the model that trains (and what DeepSpeed wraps).

Start reading at :class:`FusionHead`. The variants share every piece but the **fusion
operator**, so that an ablation changes one thing (``python -m fusion`` counts each one's
parameters; the ablation table prints them beside every result):

- **projection** per stream: ``Linear(in_dim, dim) -> LayerNorm`` plus a learned temporal
  position embedding (one table per stream, ``max_time`` rows) and dropout;
- ``layers`` **layers**, each two pre-norm blocks per stream: first a *temporal self-attention*
  block within the stream (the same in every variant), then a *fusion* block in which the
  stream receives a message from the other stream. Both blocks are ``x + op(norm(x), ...)``
  then ``x + FFN(norm(x))``; only ``op`` of the fusion block differs between variants, and
  both streams' fusion blocks read this layer's inputs (bidirectional, order-free);
- **pooling** over time (``pool``) of each stream (``mean``, or ``attn``: a learned softmax
  over time), the pooled vectors concatenated;
- **classifier**: ``LayerNorm -> Dropout -> Linear(num_classes)``.

The fusion operators, for a stream ``x`` [B, T, dim] receiving from the other ``y`` [B, T', dim]:

- ``xattn`` (the model): multi-head cross-attention, ``x`` queries ``y`` (q, k, v and output
  projections: 4 dim^2 weights per direction);
- ``concat``: ``y`` linearly interpolated in time onto ``x``'s time steps, concatenated with
  ``x`` per time step, ``Linear(2 dim, dim)`` then an output projection (3 dim^2);
- ``elementwise``: ``y`` aligned the same way, ``Linear(x) * Linear(y)`` per time step, then an
  output projection (3 dim^2);
- ``semantic_only`` / ``motion_only``: one stream alone; its fusion block's operator is a
  second temporal self-attention, so the stream keeps the same depth and per-stream width
  (the other stream's features are accepted and ignored).

So ``concat`` and ``elementwise`` have the same parameter count, and ``xattn`` has ``2 dim^2``
more per layer (about 4% of the full head at dim 512): the comparison is between operators at
the same depth and nearly the same size, not between heads of different shapes.

With ``return_attention=True`` the forward pass also returns the softmax attention weights
(before dropout): a dict mapping a direction to one [B, heads, Tq, Tk] tensor per layer. The
keys are ``semantic_self`` and ``motion_self`` (the within-stream blocks of two-stream
variants), ``semantic_queries_motion`` and ``motion_queries_semantic`` (``xattn``'s fusion
blocks), and ``self`` for the single-stream variants (two per layer: both of its blocks).
Without it attention runs through ``F.scaled_dot_product_attention`` (the fused kernels),
which never materialises the weights.
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


def align_time(x: Tensor, time: int) -> Tensor:
    """Linearly interpolate [B, T', D] to [B, time, D] (one stream onto the other's time steps)."""
    if x.shape[1] == time:
        return x
    return F.interpolate(x.transpose(1, 2), size=time, mode="linear", align_corners=False).transpose(1, 2)


class ConcatMix(nn.Module):
    """The ``concat`` operator: ``out(Linear([x_t ; y_t]))`` per time step of ``x``, with ``y``
    interpolated onto ``x``'s time steps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: Tensor, context: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        return self.out(self.mix(torch.cat([query, align_time(context, query.shape[1])], dim=-1))), None


class ProductMix(nn.Module):
    """The ``elementwise`` operator: ``out(Linear(x_t) * Linear(y_t))`` per time step of ``x``,
    with ``y`` interpolated onto ``x``'s time steps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.own = nn.Linear(dim, dim)
        self.other = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: Tensor, context: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        return self.out(self.own(query) * self.other(align_time(context, query.shape[1]))), None


def fusion_operator(fusion: str, dim: int, heads: int, dropout: float) -> nn.Module:
    """The operator of a fusion block (see the module docstring)."""
    if fusion == "concat":
        return ConcatMix(dim)
    if fusion == "elementwise":
        return ProductMix(dim)
    return MultiHeadAttention(dim, heads, dropout)  # xattn, and the single streams' second self-attention


class Block(nn.Module):
    """Pre-norm block ``x + op(norm(x), context)`` then ``x + FFN(norm(x))``. Without a
    ``context`` (self-attention) the operator reads ``x`` itself; with one (a fusion block),
    the other stream normalised with its own statistics."""

    def __init__(self, operator: nn.Module, dim: int, ffn_mult: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.op = operator
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        query = self.norm_query(x)
        kv = query if self.norm_context is None else self.norm_context(context)
        message, weights = self.op(query, kv, need_weights)
        x = x + self.drop(message)
        x = x + self.drop(self.ffn(self.norm_ffn(x)))
        return x, weights


class StreamLayer(nn.Module):
    """One layer of one stream: temporal self-attention, then the fusion block."""

    def __init__(self, fusion: str, dim: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.temporal = Block(MultiHeadAttention(dim, heads, dropout), dim, ffn_mult, dropout, cross=False)
        single = fusion in ("semantic_only", "motion_only")
        self.fuse = Block(fusion_operator(fusion, dim, heads, dropout), dim, ffn_mult, dropout, cross=not single)


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


class FusionHead(nn.Module):
    """Projections, per-stream layers with fusion blocks, temporal pooling and classifier; see
    the module docstring."""

    def __init__(self, cfg: ModelConfig, semantic_dim: int, motion_dim: int) -> None:
        super().__init__()
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"model.fusion={cfg.fusion!r} is not one of {', '.join(FUSIONS)}")
        self.fusion = cfg.fusion
        dim = cfg.dim
        self.streams = [name for name, used in (("semantic", cfg.fusion != "motion_only"),
                                                ("motion", cfg.fusion != "semantic_only")) if used]

        def stream_layers() -> nn.ModuleList:
            return nn.ModuleList(StreamLayer(cfg.fusion, dim, cfg.heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.layers))

        self.semantic_proj = StreamProjection(semantic_dim, dim, cfg.max_time, cfg.dropout) if "semantic" in self.streams else None
        self.motion_proj = StreamProjection(motion_dim, dim, cfg.max_time, cfg.dropout) if "motion" in self.streams else None
        self.semantic_layers = stream_layers() if "semantic" in self.streams else None
        self.motion_layers = stream_layers() if "motion" in self.streams else None
        width = len(self.streams) * dim
        self.pool = nn.ModuleList(TemporalPool(dim, cfg.pool) for _ in self.streams)
        self.classifier = nn.Sequential(nn.LayerNorm(width), nn.Dropout(cfg.dropout), nn.Linear(width, cfg.num_classes))

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay must not shrink besides norms and biases (which the
        optimizer groups exclude by shape): the learned time embeddings (timm's convention,
        like a ViT's ``pos_embed``)."""
        return {f"{name}_proj.time_embed" for name in self.streams}

    def forward(
        self, semantic: Tensor, motion: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Attention]:
        """``semantic`` [B, T, Ds], ``motion`` [B, T', Dm] -> logits [B, num_classes]."""
        pooled, attention = self.forward_features(semantic, motion, return_attention)
        logits = self.classifier(pooled)
        return (logits, attention) if return_attention else logits

    def forward_features(self, semantic: Tensor, motion: Tensor, return_attention: bool = False) -> tuple[Tensor, Attention]:
        """The fused clip feature the classifier reads, [B, streams * dim], and the attention
        weights (empty unless ``return_attention``)."""
        # Features arrive in fp32 from the frozen backbones; the head may run in bf16 (DeepSpeed).
        dtype = self.classifier[-1].weight.dtype
        inputs = {"semantic": semantic, "motion": motion}
        x = {name: getattr(self, f"{name}_proj")(inputs[name].to(dtype)) for name in self.streams}
        attention: Attention = {}

        def keep(key: str, weights: Tensor | None) -> None:
            if return_attention and weights is not None:
                attention.setdefault(key, []).append(weights)

        two = len(self.streams) == 2
        for depth in range(len(self.semantic_layers or self.motion_layers)):
            layers = {name: getattr(self, f"{name}_layers")[depth] for name in self.streams}
            for name in self.streams:
                x[name], weights = layers[name].temporal(x[name], need_weights=return_attention)
                keep(f"{name}_self" if two else "self", weights)
            if two:  # both fusion blocks read this layer's inputs: neither stream goes first
                (s, s_weights), (m, m_weights) = (layers["semantic"].fuse(x["semantic"], x["motion"], return_attention),
                                                  layers["motion"].fuse(x["motion"], x["semantic"], return_attention))
                x["semantic"], x["motion"] = s, m
                keep("semantic_queries_motion", s_weights)
                keep("motion_queries_semantic", m_weights)
            else:
                name = self.streams[0]
                x[name], weights = layers[name].fuse(x[name], need_weights=return_attention)
                keep("self", weights)
        pooled = torch.cat([pool(x[name]) for pool, name in zip(self.pool, self.streams)], dim=-1)
        return pooled, attention
