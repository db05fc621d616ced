"""Shared loading and freezing of the backbones' weights.

Start at :func:`load_weights`: read a local file (``.pth``/``.pyth``/``.pt`` through
``torch.load(weights_only=True)``, ``.safetensors`` through safetensors), unwrap the usual
``model_state`` / ``state_dict`` / ``model`` nesting, translate the layout with the backbone's
pure filter function, then load strictly. Anything that does not fit is an error naming the file
and the first mismatching keys, never a silent partial load. :func:`FrozenBackbone.finish`
ties loading, the "random weights" warning and freezing together for every backbone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
# A pure function from a file's state dict (already unwrapped) to the model's key layout.
Filter = Callable[[StateDict, nn.Module], StateDict]

_NESTING_KEYS = ("model_state", "state_dict", "model")
_SHOWN_KEYS = 5


class WeightsError(RuntimeError):
    """A weight file that cannot be read or does not fit the backbone; the message names it."""


class RandomWeightsWarning(UserWarning):
    """A backbone was built without weights: its features are noise."""


def read_state_dict(path: str | Path) -> StateDict:
    """The tensors of a local weight file, with ``model_state``/``state_dict``/``model`` unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weight file {path} does not exist; pass an existing local file, or none for random weights"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: object = load_file(str(path), device="cpu")
        else:
            # weights_only: a weight file is data, never code to run
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise WeightsError(
            f"weight file {path} cannot be read as a weights-only checkpoint ({exc}); if it is a "
            "trusted training checkpoint, re-save just its state dict with torch.save"
        ) from None
    while isinstance(data, Mapping):
        inner = next((data[k] for k in _NESTING_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping):
        raise WeightsError(f"weight file {path} holds a {type(data).__name__}, not a state dict")
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError(f"weight file {path} holds no tensors (keys: {_first(list(data))})")
    return tensors


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else "")


def check_fit(state_dict: Mapping[str, Tensor], model: nn.Module, source: str) -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    # BatchNorm fills a missing step counter itself (older files lack it; eval never reads it)
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes (file vs model): {_first(wrong_shape)}")
    if problems:
        raise WeightsError(
            f"weight file {source} does not fit {type(model).__name__}: {'; '.join(problems)}. "
            "Check the backbone name and size (only 'full' loads published weights)."
        )


def load_weights(model: nn.Module, path: str | Path, layout_filter: Filter) -> None:
    """Read ``path``, translate it with ``layout_filter`` and load it into ``model`` strictly."""
    state_dict = read_state_dict(path)
    try:
        state_dict = layout_filter(state_dict, model)
    except (ValueError, RuntimeError, KeyError) as exc:
        # a layout converter choking on the file (e.g. timm resampling a foreign pos_embed)
        raise WeightsError(f"weight file {path} does not fit {type(model).__name__}: {exc}") from None
    check_fit(state_dict, model, str(path))
    model.load_state_dict(state_dict, strict=True)
    log.info("loaded %s weights from %s", type(model).__name__, path)


def warn_random(name: str) -> None:
    """Say loudly that a backbone stays random (fine for tests, useless for training)."""
    message = (
        f"backbone {name} has RANDOM weights (no weight file given): its features are noise; "
        "set the backbone's weights to a local file for real training"
    )
    log.warning(message)
    warnings.warn(message, RandomWeightsWarning, stacklevel=3)


class FrozenBackbone(nn.Module):
    """Base of every backbone: frozen parameters, always in eval mode, uint8 in, own dtype.

    ``train(True)`` is ignored so that a parent module switching to training mode cannot turn
    on dropout or batch-norm statistics updates inside a frozen backbone.
    """

    out_dim: int

    def finish(
        self, name: str, weights: str | Path | None, layout_filter: Filter, target: nn.Module | None = None
    ) -> None:
        """Load ``weights`` into ``target`` (default: the whole backbone) or warn that there are
        none, then freeze. Builders call this last."""
        if weights is None:
            warn_random(name)
        else:
            load_weights(self if target is None else target, weights, layout_filter)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def normalise(self, frames: Tensor, mean: tuple[float, ...], std: tuple[float, ...], channel_dim: int) -> Tensor:
        """uint8 frames -> ``(x/255 - mean) / std`` in float32 (exact), channels at ``channel_dim``."""
        shape = [1] * frames.dim()
        shape[channel_dim] = len(mean)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(shape)
        std_t = torch.tensor(std, dtype=torch.float32, device=frames.device).view(shape)
        return (frames.float() / 255.0 - mean_t) / std_t


def check_clips(clips: Tensor, name: str) -> None:
    """Clips must be uint8 ``[B, T, 3, H, W]``; anything else is a caller bug worth a clear error."""
    if clips.dim() != 5 or clips.shape[2] != 3:
        raise ValueError(f"{name}: expected clips [B, T, 3, H, W], got shape {tuple(clips.shape)}")
    if clips.dtype != torch.uint8:
        raise ValueError(f"{name}: expected uint8 clips, got {clips.dtype}")
