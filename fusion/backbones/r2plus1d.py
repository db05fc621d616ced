"""R(2+1)D-18 (torchvision's ``r2plus1d_18`` trunk): a motion-stream alternative to I3D.

Built from torchvision's own ``BasicBlock`` and ``Conv2Plus1D`` with torchvision's module names
(``stem``, ``layer1``..``layer4``), so torchvision's Kinetics-400 file
(``r2plus1d_18-91a641e6.pth``) loads as is; only the width is a parameter, so that the debug size
comes from the same builder (torchvision's ``VideoResNet`` hard-codes 64..512 channels).
Strides: space /16, time /8 (layers 2-4 stride 2 in time too): [B, T/8, 512] after averaging
over space. Input normalisation: torchvision's Kinetics mean/std. Start at :func:`build_r2plus1d`.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D

from fusion.backbones.weights import FrozenBackbone, StateDict, check_clips

MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)
SIZES: dict[str, dict[str, object]] = {
    "full": dict(width=64, depths=(2, 2, 2, 2)),
    "debug": dict(width=8, depths=(1, 1, 1, 1)),
}


def _stem(width: int) -> nn.Sequential:
    """(1,7,7) spatial then (3,1,1) temporal conv; torchvision's 45 mid channels at width 64."""
    mid = 45 * width // 64
    return nn.Sequential(
        nn.Conv3d(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, (3, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


def _layer(dim_in: int, dim_out: int, depth: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or dim_in != dim_out:
        downsample = nn.Sequential(
            nn.Conv3d(dim_in, dim_out, 1, stride=Conv2Plus1D.get_downsample_stride(stride), bias=False),
            nn.BatchNorm3d(dim_out),
        )
    blocks = [BasicBlock(dim_in, dim_out, Conv2Plus1D, stride, downsample)]
    blocks += [BasicBlock(dim_out, dim_out, Conv2Plus1D) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class R2Plus1D(FrozenBackbone):
    """The R(2+1)D trunk without torchvision's ``avgpool``/``fc``."""

    def __init__(self, width: int = 64, depths: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.stem = _stem(width)
        self.layer1 = _layer(width, width, depths[0], stride=1)
        self.layer2 = _layer(width, width * 2, depths[1], stride=2)
        self.layer3 = _layer(width * 2, width * 4, depths[2], stride=2)
        self.layer4 = _layer(width * 4, width * 8, depths[3], stride=2)
        self.out_dim = width * 8

    def forward_features(self, clips: Tensor) -> Tensor:
        """uint8 [B, T, 3, H, W] -> layer4 map [B, out_dim, T/8, H/16, W/16]."""
        check_clips(clips, "r2plus1d_18")
        x = self.normalise(clips.permute(0, 2, 1, 3, 4), MEAN, STD, channel_dim=1).to(self.dtype)  # (B, 3, T, H, W)
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, clips: Tensor) -> Tensor:
        """uint8 [B, T, 3, H, W] -> [B, T/8, out_dim], averaged over space."""
        return self.forward_features(clips).mean(dim=(3, 4)).transpose(1, 2)


def torchvision_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """torchvision ``r2plus1d_18`` layout -> ours: same names, minus the Kinetics ``fc.*``."""
    return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def build_r2plus1d(weights: str | Path | None, size: str) -> R2Plus1D:
    """The frozen R(2+1)D-18 of ``size`` ("full" or "debug"), loaded from ``weights`` if given."""
    model = R2Plus1D(**SIZES[size])  # type: ignore[arg-type]
    model.finish("r2plus1d_18", weights, torchvision_filter)
    return model
