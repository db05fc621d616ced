"""The research brief's ablation study, from cached features, in one resumable command.

    python launch/ablate.py --data data/synthetic/shards --out runs/ablation
    python launch/ablate.py --data s3://bucket/ssv2 --features s3://bucket/ssv2-features --out runs/ablation \\
        --config launch/configs/default.yaml --weights clip_vitb16=weights/clip_b16.pth --seeds 0 1 2

The grid (``--variants`` picks a subset; ``--list`` shows it): the fusion operator
(cross-attention, concatenation, element-wise product), the number of attention heads (4, 8,
16), the two single-stream baselines, and the semantic (DINOv2, CLIP, supervised ViT) and
motion (I3D, R(2+1)D, C3D) backbones. Every variant is the ``--config`` model with one thing
changed (see ``fusion/heads.py`` for what the fusion variants share).

How it runs:

1. **Features.** Each pair of backbones needs its own feature shards, under
   ``FEATURES/<semantic>+<motion>/{train,validation}``. Missing ones are extracted from the
   frame shards of ``--data`` with ``launch/extract_features.py`` (``--views`` augmented views
   per training clip; extra ``--section.key`` arguments apply here too); without ``--data``, variants whose features do not exist are skipped
   and the table says so. Backbone weights come from the config for its own backbones and from
   ``--weights NAME=PATH`` for the others (random otherwise, with a warning).
2. **Runs.** Each variant trains ``len(--seeds)`` heads with ``launch/train.py`` from its
   features (``--epochs``; extra ``--section.key`` arguments go to every run), in
   ``OUT/runs/<variant>/seed<S>``. A finished run leaves ``result.json`` there and is not run
   again: kill the study and start it again, it continues.
3. **Report.** ``OUT/ablation.md`` (mean and standard deviation over seeds of the last
   validation's top-1 and top-5, trainable parameters, minutes per run, and the difference
   to the model with whether it exceeds twice its standard error), ``OUT/ablation.png`` and
   ``OUT/ablation.json`` (every run's figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/ablate.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusion.config import ConfigError, load
from launch.train import RunConfig, default_config_path, resolve_data_url
from sharding import storage

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    """One row of the study: the model config with ``overrides`` applied."""

    name: str
    group: str
    change: str
    overrides: dict[str, str] = field(default_factory=dict)

    def backbones(self, cfg: RunConfig) -> tuple[str, str]:
        return (self.overrides.get("model.semantic.name", cfg.model.semantic.name),
                self.overrides.get("model.motion.name", cfg.model.motion.name))

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.name)


def grid(cfg: RunConfig) -> list[Variant]:
    """The brief's variants, the config's model first (the reference of every difference)."""
    model = cfg.model
    variants = [Variant("model", "reference", f"{model.fusion}, {model.heads} heads, {model.semantic.name} + {model.motion.name}")]
    for fusion in ("xattn", "concat", "elementwise"):
        if fusion != model.fusion:
            variants.append(Variant(f"fusion={fusion}", "fusion operator", f"fusion {fusion}", {"model.fusion": fusion}))
    for heads in (4, 8, 16):
        if heads != model.heads and model.dim % heads == 0:
            variants.append(Variant(f"heads={heads}", "attention heads", f"{heads} heads", {"model.heads": str(heads)}))
    for single in ("semantic_only", "motion_only"):
        variants.append(Variant(single, "single stream", single.replace("_", " "), {"model.fusion": single}))
    for name in ("dinov2_vits14", "clip_vitb16", "vit_s16_sup"):
        if name != model.semantic.name:
            variants.append(Variant(f"semantic={name}", "semantic backbone", f"semantic backbone {name}",
                                    {"model.semantic.name": name}))
    for name in ("i3d_r50", "r2plus1d_18", "c3d"):
        if name != model.motion.name:
            variants.append(Variant(f"motion={name}", "motion backbone", f"motion backbone {name}", {"model.motion.name": name}))
    return variants


def parse_command_line(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="launch/ablate.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="frame shards root (train/ and validation/ inside): features missing are extracted from it")
    parser.add_argument("--features", help="where the feature shards are or go (default: OUT/features)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"), help="the study's folder")
    parser.add_argument("--config", type=Path, help="the model and loader config every variant starts from")
    parser.add_argument("--variants", nargs="+", help="names from --list (default: all)")
    parser.add_argument("--list", action="store_true", help="print the grid and exit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="a head per seed and variant")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each run")
    parser.add_argument("--views", type=int, default=4, help="augmented views per training clip in extracted features")
    parser.add_argument("--weights", nargs="+", default=[], metavar="NAME=PATH",
                        help="weight files of backbones the config does not name (e.g. clip_vitb16=weights/clip.pth)")
    parser.add_argument("--launcher", default=sys.executable,
                        help="how each run starts, before 'launch/train.py' (e.g. 'torchrun --nproc_per_node 8')")
    parser.add_argument("--deepspeed", type=Path, default=REPO / "ds.json", help="DeepSpeed config of every run")
    args, extra = parser.parse_known_args(argv)
    if args.config is None:
        args.config = default_config_path()
    for item in args.weights:
        if "=" not in item:
            parser.error(f"--weights {item!r}: expected NAME=PATH")
    if extra and any(not arg.startswith("--") for arg in extra[:1]):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args, extra


def run_logged(command: list[str], log: Path) -> int:
    """Run ``command`` with its output in ``log``; returns its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        return subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode


def backbone_overrides(cfg: RunConfig, semantic: str, motion: str, weights: dict[str, str]) -> list[str]:
    """The config's model with these backbones, and their weight files (the config's own for
    the backbones it names, ``--weights`` for the others, none otherwise)."""
    out = ["--model.semantic.name", semantic, "--model.motion.name", motion]
    semantic_weights = weights.get(semantic) or (cfg.model.semantic.weights if semantic == cfg.model.semantic.name else None)
    motion_weights = weights.get(motion) or (cfg.model.motion.weights if motion == cfg.model.motion.name else None)
    out += ["--model.semantic.weights", semantic_weights or "null", "--model.motion.weights", motion_weights or "null"]
    return out


def ensure_features(args: argparse.Namespace, cfg: RunConfig, semantic: str, motion: str, weights: dict[str, str],
                    features_root: str, extra: list[str]) -> tuple[str | None, str]:
    """The feature folder of this backbone pair, extracted first if missing and possible;
    (None, why) when neither."""
    folder = storage.join(features_root, f"{semantic}+{motion}")
    have = all(storage.exists(storage.join(storage.join(folder, split), "manifest.json")) for split in ("train", "validation"))
    if have:
        return folder, "cached"
    if not args.data:
        return None, f"no features at {folder} and no --data to extract them from"
    print(f"extracting {semantic} + {motion} features -> {folder}", flush=True)
    command = [sys.executable, "launch/extract_features.py", "--config", str(args.config), "--data", args.data, "--out", folder,
               "--views", str(args.views), *backbone_overrides(cfg, semantic, motion, weights), *extra]
    log = args.out / "logs" / f"extract_{semantic}+{motion}.log"
    started = time.monotonic()
    if run_logged(command, log) != 0:
        raise RuntimeError(f"feature extraction for {semantic} + {motion} failed: see {log}")
    print(f"  {time.monotonic() - started:.0f} s", flush=True)
    return folder, "extracted"


def last_validation(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    complete = [row for row in rows if "val_top1" in row and row.get("val_complete", 1) == 1]
    if not complete:
        raise RuntimeError(f"{run} has no complete validation pass in metrics.jsonl")
    return complete[-1]


def train_variant(args: argparse.Namespace, cfg: RunConfig, variant: Variant, seed: int, features: str,
                  weights: dict[str, str], extra: list[str]) -> dict[str, Any]:
    """One head of one variant; its result.json (kept: a rerun reuses it)."""
    run = args.out / "runs" / variant.folder / f"seed{seed}"
    result_path = run / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    semantic, motion = variant.backbones(cfg)
    command = [*shlex.split(args.launcher), "launch/train.py", "--config", str(args.config), "--deepspeed", str(args.deepspeed),
               "--data.train", storage.join(features, "train"), "--data.val", storage.join(features, "validation"),
               "--out", str(run), "--resume", "--train.seed", str(seed), "--train.epochs", str(args.epochs),
               *backbone_overrides(cfg, semantic, motion, weights)]
    for key, value in variant.overrides.items():
        if key not in ("model.semantic.name", "model.motion.name"):
            command += [f"--{key}", value]
    command += extra
    started = time.monotonic()
    if run_logged(command, run / "train.log") != 0:
        raise RuntimeError(f"{variant.name} seed {seed} failed: see {run / 'train.log'}")
    last = last_validation(run)
    parameters = json.loads((run / "parameters.json").read_text())
    result = {"variant": variant.name, "seed": seed, "top1": last["val_top1"], "top5": last["val_top5"],
              "val_clips": last["val_clips"], "step": last["step"], "trainable": parameters["trainable"],
              "minutes": (time.monotonic() - started) / 60}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def summarise(variants: list[Variant], results: dict[str, list[dict[str, Any]]], skipped: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        runs = results.get(variant.name) or []
        if not runs:
            rows.append({"variant": variant.name, "group": variant.group, "change": variant.change, "skipped": skipped.get(variant.name, "not run")})
            continue
        top1, top5 = [r["top1"] for r in runs], [r["top5"] for r in runs]
        rows.append({"variant": variant.name, "group": variant.group, "change": variant.change, "seeds": len(runs),
                     "top1_mean": statistics.fmean(top1), "top1_std": spread(top1), "top5_mean": statistics.fmean(top5),
                     "top5_std": spread(top5), "trainable": runs[0]["trainable"], "minutes": statistics.fmean(r["minutes"] for r in runs),
                     "val_clips": int(runs[0]["val_clips"]), "top1_runs": top1})
    reference = rows[0] if "top1_mean" in rows[0] else None
    for row in rows[1:]:
        if reference is None or "top1_mean" not in row:
            continue
        difference = row["top1_mean"] - reference["top1_mean"]
        # standard error of a difference of two means over seeds
        error = math.sqrt(sum((r["top1_std"] ** 2) / r["seeds"] for r in (row, reference) if not math.isnan(r["top1_std"])))
        row["delta_top1"] = difference
        row["delta_error"] = error
        row["significant"] = bool(error > 0 and abs(difference) > 2 * error)
    return rows


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], command: str, num_classes: int | None) -> None:
    def pct(mean: float, std: float) -> str:
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if not math.isnan(std) else f"{100 * mean:.1f}"

    lines = ["# Ablation study", "", f"Made by `{command}`.", ""]
    done = [row for row in rows if "top1_mean" in row]
    if done:
        clips = done[0]["val_clips"]
        chance = f"; chance {100 / num_classes:.1f}%" if num_classes else ""
        lines += [f"Top-1 and top-5 (%) of the last validation pass over {clips} clips, mean ± standard deviation over "
                  f"{done[0]['seeds']} seed(s){chance}. Δ is the difference of mean top-1 to the model (first row); "
                  "'yes' when it exceeds twice its standard error.", ""]
    lines += ["| variant | changes | trainable | top-1 | top-5 | Δ top-1 | > 2 SE | min/run |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "top1_mean" not in row:
            lines.append(f"| {row['variant']} | {row['change']} | | skipped: {row['skipped']} | | | | |")
            continue
        delta, significant = "", ""
        if "delta_top1" in row:
            known = row["delta_error"] > 0  # one seed: no spread, no error to compare with
            delta = f"{100 * row['delta_top1']:+.1f}" + (f" ± {100 * row['delta_error']:.1f}" if known else "")
            significant = ("yes" if row["significant"] else "no") if known else "n/a"
        lines.append(f"| {row['variant']} | {row['change']} | {row['trainable']:,} | {pct(row['top1_mean'], row['top1_std'])} | "
                     f"{pct(row['top5_mean'], row['top5_std'])} | {delta} | {significant} | {row['minutes']:.1f} |")
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
    if done:
        plot(rows, args.out / "ablation.png", num_classes)


def plot(rows: list[dict[str, Any]], out: Path, num_classes: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if "top1_mean" in row]
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(done) + 1.6), constrained_layout=True)
    positions = list(range(len(done)))[::-1]
    groups = sorted({row["group"] for row in done}, key=[row["group"] for row in done].index)
    colours = {group: plt.get_cmap("tab10")(index) for index, group in enumerate(groups)}
    for y, row in zip(positions, done):
        std = 0.0 if math.isnan(row["top1_std"]) else row["top1_std"]
        axis.barh(y, 100 * row["top1_mean"], xerr=100 * std, color=colours[row["group"]], alpha=0.85, capsize=3,
                  label=row["group"])
        axis.scatter([100 * v for v in row["top1_runs"]], [y] * len(row["top1_runs"]), color="black", s=8, zorder=3)
    if num_classes:
        axis.axvline(100 / num_classes, color="grey", linestyle="--", linewidth=1, label="chance")
    axis.set_yticks(positions, [f"{row['variant']} ({row['trainable'] / 1e6:.2f}M)" for row in done])
    axis.set_xlabel("validation top-1 (%): mean ± std over seeds, dots = seeds")
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    axis.set_title(f"ablation over {done[0]['val_clips']} validation clips")
    axis.grid(alpha=0.3, axis="x")
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_command_line(argv)
    try:
        cfg, rest = load(RunConfig, args.config, extra)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rest:
        print(f"error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    variants = grid(cfg)
    if args.list:
        for variant in variants:
            print(f"{variant.name:28s} {variant.group:18s} {variant.change}")
        return 0
    if args.variants:
        names = {variant.name for variant in variants}
        unknown = [name for name in args.variants if name not in names]
        if unknown:
            print(f"error: unknown variants {unknown}; --list shows the grid", file=sys.stderr)
            return 2
        variants = [variant for variant in variants if variant.name == "model" or variant.name in args.variants]
    if args.data:
        args.data = resolve_data_url(args.data)
    weights = dict(item.split("=", 1) for item in args.weights)
    features_root = args.features or str(args.out / "features")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python launch/ablate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    feature_folders: dict[tuple[str, str], tuple[str | None, str]] = {}
    num_classes = None
    total = len(variants) * len(args.seeds)
    done = 0
    try:
        for variant in variants:
            pair = variant.backbones(cfg)
            if pair not in feature_folders:
                feature_folders[pair] = ensure_features(args, cfg, *pair, weights, features_root, extra)
            folder, why = feature_folders[pair]
            if folder is None:
                skipped[variant.name] = why
                print(f"skipping {variant.name}: {why}", flush=True)
                done += len(args.seeds)
                continue
            if num_classes is None:
                manifest = json.loads(storage.read_bytes(storage.join(storage.join(folder, "validation"), "manifest.json")))
                num_classes = len([label for label in manifest.get("label_counts", {}) if int(label) >= 0]) or None
            for seed in args.seeds:
                result = train_variant(args, cfg, variant, seed, folder, weights, extra)
                results.setdefault(variant.name, []).append(result)
                done += 1
                print(f"[{done}/{total}] {variant.name} seed {seed}: top-1 {result['top1']:.3f} top-5 {result['top5']:.3f} "
                      f"({result['minutes']:.1f} min)", flush=True)
            write_report(args, summarise(variants, results, skipped), command, num_classes)
    except (RuntimeError, ConfigError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        write_report(args, summarise(variants, results, skipped), command, num_classes)
        return 1
    write_report(args, summarise(variants, results, skipped), command, num_classes)
    print(f"ablation: {args.out / 'ablation.md'}, {args.out / 'ablation.png'} ({(time.monotonic() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
