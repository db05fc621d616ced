"""Parameter report of a model config: how many parameters each part has and how many train.

    python -m fusion --config launch/configs/default.yaml [--model.heads 16 ...] [--json]

Only the ``model:`` section of the config is read, so a full training config works as is.
``--help`` lists every ``--model.*`` key.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion.backbones.weights import WeightsError
from fusion.config import ConfigError, load, option, render_help
from fusion.model import ModelConfig, build_model, format_report, parameter_report


@dataclass(frozen=True)
class ModelSection:
    """The part of a training config this tool reads."""

    model: ModelConfig = option(factory=ModelConfig, doc="the model")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusion",
        description="Print the parameter counts (total, trainable, frozen) of a model config.",
        epilog="model keys (override any of them as --model.KEY VALUE):\n" + render_help(ModelSection),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, help="YAML config; only its model: section is read (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        section, unknown = load(ModelSection, args.config, rest, sections={"model"})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        # Counting needs shapes only: on the meta device nothing is allocated or initialised.
        with torch.device("meta"):
            model = build_model(section.model, device="meta")
    except (FileNotFoundError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = parameter_report(model)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
