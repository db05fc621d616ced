"""C3D (Tran et al. 2015, the classic conv1a..conv5b layout): a motion-stream alternative to I3D.

Eight 3x3x3 convolutions (with bias, ReLU) and max-pools: pool1 (1,2,2), pool2..pool4 (2,2,2).
Our feature is conv5b averaged over space, time kept: [B, T/8, 512]. We do not use fc6 (4096-d):
it flattens time and space of a fixed 16x112x112 input, which would lose the time axis the fusion
head attends over and tie us to one input size. A file's ``fc6/fc7/fc8`` are accepted and dropped.

Layouts: ours and the classic PyTorch port (``conv1``, ``conv2``, ``conv3a`` ... ``fc8``) via
:func:`classic_filter`; mmaction2's (``[backbone.]conv1a.conv.weight`` ...) via
:func:`mmaction2_filter`. Input normalisation follows mmaction2's Sports-1M C3D: subtract
(104, 117, 128) on the 0-255 scale, no scaling. Start at :func:`build_c3d`.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor, nn

from fusion.backbones.weights import FrozenBackbone, StateDict, check_clips

# (104, 117, 128) on the 0-255 scale, std 1: expressed on the 0-1 scale normalise() works in
MEAN = (104 / 255, 117 / 255, 128 / 255)
STD = (1 / 255, 1 / 255, 1 / 255)
# (name, channel multiple of the width, pool after it): pool kernel (time, h, w)
LAYERS: tuple[tuple[str, int, tuple[int, int, int] | None], ...] = (
    ("conv1a", 1, (1, 2, 2)),
    ("conv2a", 2, (2, 2, 2)),
    ("conv3a", 4, None),
    ("conv3b", 4, (2, 2, 2)),
    ("conv4a", 8, None),
    ("conv4b", 8, (2, 2, 2)),
    ("conv5a", 8, None),
    ("conv5b", 8, None),
)
SIZES: dict[str, dict[str, int]] = {"full": dict(width=64), "debug": dict(width=8)}


class C3D(FrozenBackbone):
    """C3D conv1a..conv5b (no pool5, no fully connected layers)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        dim_in = 3
        self.pools = nn.ModuleDict()
        for name, multiple, pool in LAYERS:
            self.add_module(name, nn.Conv3d(dim_in, width * multiple, 3, padding=1))
            if pool is not None:
                self.pools[name] = nn.MaxPool3d(pool, stride=pool)
            dim_in = width * multiple
        self.relu = nn.ReLU(inplace=True)
        self.out_dim = dim_in

    def forward_features(self, clips: Tensor) -> Tensor:
        """uint8 [B, T, 3, H, W] -> conv5b map [B, out_dim, T/8, H/16, W/16]."""
        check_clips(clips, "c3d")
        x = self.normalise(clips.permute(0, 2, 1, 3, 4), MEAN, STD, channel_dim=1).to(self.dtype)  # (B, 3, T, H, W)
        for name, _, _ in LAYERS:
            x = self.relu(getattr(self, name)(x))
            if name in self.pools:
                x = self.pools[name](x)
        return x

    def forward(self, clips: Tensor) -> Tensor:
        """uint8 [B, T, 3, H, W] -> [B, T/8, out_dim], averaged over space."""
        return self.forward_features(clips).mean(dim=(3, 4)).transpose(1, 2)


_CLASSIC_RENAMES = {"conv1.": "conv1a.", "conv2.": "conv2a."}
_FULLY_CONNECTED = re.compile(r"^(fc\d|cls_head)\.")


def classic_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """The classic PyTorch C3D port (``conv1``, ``conv2``, ``conv3a`` ... ``fc8``) or ours -> ours:
    ``conv1``/``conv2`` gain their ``a``; the fully connected layers are dropped."""
    out = {}
    for key, value in state_dict.items():
        if _FULLY_CONNECTED.match(key):
            continue
        for old, new in _CLASSIC_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out


def mmaction2_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """mmaction2's C3D (``[backbone.]conv1a.conv.weight``, ``fc6``, ``fc7``, ``cls_head.*``) -> ours."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("backbone.")
        if _FULLY_CONNECTED.match(key):
            continue
        out[key.replace(".conv.", ".")] = value
    return out


def c3d_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Pick the layout's filter: mmaction2 wraps each conv in a ``ConvModule`` (``.conv.``)."""
    if any(".conv." in key for key in state_dict):
        return mmaction2_filter(state_dict, model)
    return classic_filter(state_dict, model)


def build_c3d(weights: str | Path | None, size: str) -> C3D:
    """The frozen C3D of ``size`` ("full" or "debug"), loaded from ``weights`` if given."""
    model = C3D(**SIZES[size])
    model.finish("c3d", weights, c3d_filter)
    return model
