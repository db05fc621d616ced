"""I3D ResNet-50 (pytorchvideo's ``i3d_r50`` architecture), written here so that ``fusion/``
needs no pytorchvideo, with the same module names so ``I3D_8x8_R50.pyth`` loads as is.

Layout (keys in brackets), 8x224x224 in -> res5 [2048, 4, 7, 7]:

- stem [blocks.0.{conv,norm}]: conv (5,7,7) stride (1,2,2), BN, ReLU, max-pool (1,3,3)/(1,2,2);
- res2 [blocks.1], then a parameter-free temporal max-pool (2,1,1) [blocks.2];
- res3..res5 [blocks.3..5]; each block ``res_blocks.M.{branch1_conv,branch1_norm}`` (shortcut,
  first block only) and ``res_blocks.M.branch2.{conv_a,norm_a,conv_b,norm_b,conv_c,norm_c}``.
  conv_a carries the temporal kernel: (3,1,1) in every res2 block, alternating (3,1,1)/(1,1,1)
  in res3 and res4, and (1,1,1),(3,1,1),(1,1,1) in res5; conv_b is (1,3,3) with the spatial
  stride (1,2,2,2 per stage).

The Kinetics-400 classifier of the file (``blocks.6.proj.*``) is dropped by :func:`pytorchvideo_filter`:
we only want features. Output: the res5 map averaged over space, time kept: [B, T/2, 2048].
Start at :func:`build_i3d`.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from fusion.backbones.weights import FrozenBackbone, StateDict, check_clips

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)

# conv_a temporal kernel per block, per stage; a stage repeats its pattern over its blocks
CONV_A_KERNELS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((3, 1, 1),),
    ((3, 1, 1), (1, 1, 1)),
    ((3, 1, 1), (1, 1, 1)),
    ((1, 1, 1), (3, 1, 1)),
)
SPATIAL_STRIDES = (1, 2, 2, 2)
SIZES: dict[str, dict[str, object]] = {
    "full": dict(width=64, depths=(3, 4, 6, 3)),
    # same builder, 8x narrower and one block per stage: fast on a laptop CPU
    "debug": dict(width=8, depths=(1, 1, 1, 1)),
}


def _same_padding(kernel: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class Stem(nn.Module):
    def __init__(self, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, dim_out, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False)
        self.norm = nn.BatchNorm3d(dim_out)
        self.activation = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.activation(self.norm(self.conv_as_2d(x) if x.is_cuda else self.conv(x))))

    def conv_as_2d(self, x: Tensor) -> Tensor:
        """``self.conv`` as a 2-D 7x7 conv over the B*T frames, whose input channels are the 5
        temporal taps of the 3 colours (15, padded to 16 with zeros): the same sums. cuDNN has no
        tensor-core kernel for a 3-D conv of 3 input channels in bf16 and falls back to a generic
        one; on an H100 at batch 32 (T=16, 224 px) that conv took 41 ms of I3D's 81, this 7.5 ms
        (padding the 3-D conv to 8 channels: 18 ms). On a CPU the plain conv is faster."""
        (taps, _, _), (pad_t, _, _) = self.conv.kernel_size, self.conv.padding
        assert self.conv.stride[0] == 1, "the taps below assume temporal stride 1"
        windows = F.pad(x, (0, 0, 0, 0, pad_t, pad_t)).unfold(2, taps, 1)  # [B, C, T, H, W, taps]
        batch, colours, steps, height, width, _ = windows.shape
        frames = windows.permute(0, 2, 1, 5, 3, 4).reshape(batch * steps, colours * taps, height, width)
        extra = -(colours * taps) % 8  # tensor-core kernels want a multiple of 8 channels
        weight = self.conv.weight.reshape(self.conv.out_channels, colours * taps, *self.conv.kernel_size[1:])
        out = F.conv2d(F.pad(frames, (0, 0, 0, 0, 0, extra)), F.pad(weight, (0, 0, 0, 0, 0, extra)), None,
                       self.conv.stride[1:], self.conv.padding[1:])
        return out.reshape(batch, steps, *out.shape[1:]).transpose(1, 2).contiguous()


class Bottleneck(nn.Module):
    """conv_a (temporal kernel) 1x1 -> conv_b 1x3x3 (spatial stride) -> conv_c 1x1, BN after each."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, kernel_a: tuple[int, int, int], stride: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv3d(dim_in, dim_inner, kernel_a, padding=_same_padding(kernel_a), bias=False)
        self.norm_a = nn.BatchNorm3d(dim_inner)
        self.act_a = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv3d(
            dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False
        )
        self.norm_b = nn.BatchNorm3d(dim_inner)
        self.act_b = nn.ReLU(inplace=True)
        self.conv_c = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.norm_c = nn.BatchNorm3d(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_a(self.norm_a(self.conv_a(x)))
        x = self.act_b(self.norm_b(self.conv_b(x)))
        return self.norm_c(self.conv_c(x))


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, kernel_a: tuple[int, int, int], stride: int) -> None:
        super().__init__()
        self.branch1_conv: nn.Module | None = None
        self.branch1_norm: nn.Module | None = None
        if dim_in != dim_out or stride != 1:
            self.branch1_conv = nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False)
            self.branch1_norm = nn.BatchNorm3d(dim_out)
        self.branch2 = Bottleneck(dim_in, dim_inner, dim_out, kernel_a, stride)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.activation(shortcut + self.branch2(x))


class ResStage(nn.Module):
    def __init__(
        self, depth: int, dim_in: int, dim_out: int, kernels_a: tuple[tuple[int, int, int], ...], stride: int
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(
                dim_in if i == 0 else dim_out,
                dim_out // 4,
                dim_out,
                kernels_a[i % len(kernels_a)],
                stride if i == 0 else 1,
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class I3D(FrozenBackbone):
    """I3D R50 trunk (``blocks.0``..``blocks.5`` of pytorchvideo's ``i3d_r50``)."""

    def __init__(self, width: int = 64, depths: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        blocks: list[nn.Module] = [Stem(width)]
        dim_in, dim_out = width, width * 4
        for stage, depth in enumerate(depths):
            blocks.append(ResStage(depth, dim_in, dim_out, CONV_A_KERNELS[stage], SPATIAL_STRIDES[stage]))
            if stage == 0:
                # halves time once, after res2: this is why T' = T/2
                blocks.append(nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1)))
            dim_in, dim_out = dim_out, dim_out * 2
        self.blocks = nn.ModuleList(blocks)
        self.out_dim = dim_in

    def forward_features(self, clips: Tensor) -> Tensor:
        """uint8 [B, T, 3, H, W] -> res5 map [B, out_dim, T/2, H/32, W/32]."""
        check_clips(clips, "i3d_r50")
        x = self.normalise(clips.permute(0, 2, 1, 3, 4), MEAN, STD, channel_dim=1).to(self.dtype)  # (B, 3, T, H, W)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, clips: Tensor) -> Tensor:
        """uint8 [B, T, 3, H, W] -> [B, T/2, out_dim], averaged over space."""
        return self.forward_features(clips).mean(dim=(3, 4)).transpose(1, 2)


def pytorchvideo_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """pytorchvideo ``i3d_r50`` layout (``I3D_8x8_R50.pyth``) -> ours: same names, minus the
    Kinetics classifier ``blocks.6.*`` (we keep features, the fusion head classifies)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("blocks.6.")}


def build_i3d(weights: str | Path | None, size: str) -> I3D:
    """The frozen I3D R50 of ``size`` ("full" or "debug"), loaded from ``weights`` if given."""
    model = I3D(**SIZES[size])  # type: ignore[arg-type]
    model.finish("i3d_r50", weights, pytorchvideo_filter)
    return model
