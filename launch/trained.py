"""A trained head, found from what a user points at, and the model around it.

``--checkpoint`` of ``evaluate.py`` and ``predict.py`` takes any of:

- a training run's ``--out`` folder: its ``head.pt`` when that is as new as the latest
  checkpoint, else the latest checkpoint;
- one checkpoint folder, ``OUT/checkpoints/stepNNNNNNNN``;
- an exported ``head.pt`` file.

A checkpoint's fp32 weights are rebuilt from ZeRO's optimizer partitions with DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` (the module weights in it are bf16 after a bf16
run); ``head.pt`` already holds them. Both carry the run's config and what the shards were
(stored frames, short side, templates), so the tools rebuild the same model and read clips
the same way; ``--section.key`` overrides still apply (e.g. the backbones' weight files).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusion.config import ConfigError, from_dict, merge_trees, parse_overrides
from launch.distributed import CHECKPOINTS, LATEST

HEAD_FILE = "head.pt"


@dataclass(frozen=True)
class TrainedHead:
    """Weights and provenance of a trained head."""

    source: Path
    step: int
    config: dict[str, Any]  # the run's RunConfig as a plain dict
    shards: dict[str, Any]  # stored frames, short side, JPEG quality, templates of its training shards
    state: dict[str, torch.Tensor]  # fp32


def _from_head_file(path: Path) -> TrainedHead:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"--checkpoint {path} cannot be read as a head.pt ({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict) or "head" not in saved:
        raise ConfigError(f"--checkpoint {path} is not a head.pt written by launch/train.py")
    config = saved.get("config") or {"model": saved["model"]}
    return TrainedHead(path, int(saved.get("step", 0)), config, saved.get("shards") or {}, saved["head"])


def _from_checkpoint(folder: Path) -> TrainedHead:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = folder / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ConfigError(f"--checkpoint {folder} holds no mp_rank_00_model_states.pt: not a complete checkpoint")
    client = torch.load(states, map_location="cpu", weights_only=False)
    if "config" not in client:
        raise ConfigError(f"--checkpoint {folder} was not written by launch/train.py (it holds no run config)")
    with contextlib.redirect_stdout(io.StringIO()):  # it narrates every step on stdout
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return TrainedHead(folder, int(client.get("global_steps", 0)), client["config"], client.get("shards") or {},
                       {name: tensor.float() for name, tensor in state.items()})


def load_trained(path: str | Path) -> TrainedHead:
    """The head at ``path`` (see the module docstring for what ``path`` may be)."""
    path = Path(path)
    if path.is_file():
        return _from_head_file(path)
    if not path.is_dir():
        raise ConfigError(f"--checkpoint {path} does not exist: give a training --out folder, a checkpoint folder or a head.pt")
    if (path / "mp_rank_00_model_states.pt").is_file():
        return _from_checkpoint(path)
    marker = path / CHECKPOINTS / LATEST
    latest = marker.read_text().strip() if marker.is_file() else None
    if (path / HEAD_FILE).is_file():
        exported = _from_head_file(path / HEAD_FILE)
        if latest is None or exported.step >= int(latest.removeprefix("step")):
            return exported
    if latest is None:
        raise ConfigError(f"--checkpoint {path} holds neither {HEAD_FILE} nor {CHECKPOINTS}/{LATEST}: is it a training --out folder?")
    return _from_checkpoint(path / CHECKPOINTS / latest)


def trained_config(cls: type, trained: TrainedHead, argv: list[str]) -> tuple[Any, list[str]]:
    """``cls`` (a config tree with a ``model`` section, like the training's) built from the
    run's saved config with ``--section.key`` overrides from ``argv`` on top; returns it and the
    arguments that are not config keys. The model section's head shape cannot be overridden."""
    overrides, rest = parse_overrides(cls, argv)
    head_keys = {"fusion", "heads", "dim", "layers", "num_classes", "ffn_mult", "pool", "max_time"}
    changed = sorted(head_keys & set(overrides.get("model", {})))
    if changed:
        raise ConfigError(f"--model.{changed[0]} cannot change: it is the trained head's shape (from {trained.source})")
    names = set(cls.__dataclass_fields__)
    saved = {section: values for section, values in trained.config.items() if section in names}
    return from_dict(cls, merge_trees(saved, overrides)), rest


def build_trained_model(trained: TrainedHead, model_cfg: Any, device: torch.device | str, seed: int = 0):
    """The frozen backbones of ``model_cfg`` and the trained head, in eval mode on ``device``.

    ``seed`` is the run's ``train.seed``: training builds its backbones from it, so a backbone
    without a weight file (random: tests, the demo) comes out the same here as the one the head
    was trained on. A head trained from feature shards saw the backbones of the extraction's
    seed instead (its ``shards`` record says which), and gets those.
    """
    from fusion.model import build_model

    seed = int(trained.shards.get("backbone_seed", seed))
    model = build_model(model_cfg, device, seed=seed)
    missing, unexpected = model.head.load_state_dict(trained.state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"the head in {trained.source} does not fit model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.head.to(device=device, dtype=torch.float32)
    return model.eval()


def tool_parser(prog: str, doc: str, config_cls: type) -> argparse.ArgumentParser:
    """The command line every tool on a trained head shares: ``--checkpoint``, the views, and
    ``--section.key`` overrides of the run's config (listed in ``--help``)."""
    from fusion.config import render_help

    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog="config keys (from the run; override as --section.key VALUE):\n" + render_help(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="training --out folder, checkpoint folder or head.pt")
    parser.add_argument("--temporal-views", type=int, default=1, help="temporal views per clip, softmax averaged (SSv2: 2)")
    parser.add_argument("--spatial-crops", type=int, default=1, choices=(1, 3), help="spatial crops per view (SSv2: 3)")
    return parser
