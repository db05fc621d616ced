"""Predict the SSv2 template of video files with a trained head.

    python launch/predict.py VIDEO [VIDEO ...] --checkpoint runs/xattn [--json]
        [--temporal-views 2 --spatial-crops 3] [--model.semantic.weights PATH --model.motion.weights PATH]

Each file is read exactly as the training clips were: ``make_shards``'s own ``pack_clip``
decodes it, samples the stored frames (as many as the training shards held, the middles of
equal segments), resizes the short side and encodes them as JPEG, then the loader's own
``decode_clip`` takes the model's frames and the centre crop (or the views asked for). Prints
the top-5 templates with their probabilities, or one JSON list with ``--json``.

A file that is not a readable video (missing, empty, cut short, not a video) gets an error line
naming it and the reason; the other files are still predicted, and the exit status is 1.
Exit status 2: the checkpoint or the config cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/predict.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fusion.backbones.weights import WeightsError
from fusion.config import ConfigError
from fusion.data import CorruptSample, Sampling, decode_clip
from launch.evaluate import TOP_K, classify
from launch.train import RunConfig
from launch.trained import build_trained_model, load_trained, tool_parser, trained_config
from sharding.annotations import ClipEntry
from sharding.make_shards import DEFAULT_JPEG_QUALITY, DEFAULT_SHORT_SIDE, ClipTask, PackOptions, pack_clip
from sharding.ssv2 import TEMPLATES


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser("launch/predict.py", __doc__, RunConfig)
    parser.add_argument("videos", nargs="+", type=Path, help="video files (.webm, .mp4, anything FFmpeg reads)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    return parser


def predict_file(path: Path, model: Any, cfg: RunConfig, shards: dict[str, Any], sampling: Sampling, templates: list[str],
                 device: torch.device) -> dict[str, Any]:
    """``{"file", "top5": [{"id", "template", "probability"}]}`` or ``{"file", "error", "reason"}``."""
    # as the training shards were made (make_shards' defaults for a head.pt that does not say)
    options = PackOptions(frames=sampling.stored, short_side=int(shards.get("short_side") or DEFAULT_SHORT_SIDE),
                          upscale=bool(shards.get("upscale", False)),
                          jpeg_quality=int(shards.get("jpeg_quality") or DEFAULT_JPEG_QUALITY))
    sample, reject = pack_clip(ClipTask(ClipEntry(id=path.stem), None, str(path)), options)
    if sample is None:
        return {"file": str(path), "error": reject["detail"], "reason": reject["reason"]}
    try:
        clip, _ = decode_clip(sample, sampling, cfg.data, None, require_label=False, multi_view=True)
    except CorruptSample as error:
        return {"file": str(path), "error": str(error), "reason": "undecodable_video"}
    probs, _, _ = classify(model, clip.unsqueeze(0).to(device), sampling.views, want_attention=False)
    top = probs[0].topk(TOP_K)
    return {"file": str(path), "top5": [{"id": int(i), "template": templates[int(i)], "probability": round(float(p), 5)}
                                        for p, i in zip(top.values, top.indices)]}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        trained = load_trained(args.checkpoint)
        cfg, unknown = trained_config(RunConfig, trained, rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        shards = trained.shards
        stored = int(shards.get("frames") or cfg.data.frames or 16)
        sampling = Sampling.for_stored(cfg.data, stored, f"the training shards of {trained.source}", args.temporal_views,
                                       args.spatial_crops)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_trained_model(trained, cfg.model, device, seed=cfg.train.seed)
    except (ConfigError, FileNotFoundError, ValueError, WeightsError) as error:
        print(f"launch/predict.py: error: {error}", file=sys.stderr)
        return 2
    templates = list(shards.get("templates") or TEMPLATES)
    results = []
    for path in args.videos:
        result = predict_file(path, model, cfg, shards, sampling, templates, device)
        results.append(result)
        if "error" in result:
            print(f"launch/predict.py: error: {path}: {result['reason']}: {result['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{path}")
            for rank, row in enumerate(result["top5"], start=1):
                print(f"  {rank}. {row['probability']:6.1%}  {row['id']:3d}  {row['template']}")
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    return 1 if any("error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
