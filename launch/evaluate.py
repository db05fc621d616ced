"""Evaluate a trained head on a split of frame shards: how good, where it fails, what it looks at.

    python launch/evaluate.py --checkpoint runs/xattn --data.val s3://bucket/ssv2-32f/validation --out runs/xattn/eval
        [--temporal-views 2 --spatial-crops 3] [--attention 8] [--batch-size 8] [--model.semantic.weights PATH ...]
    torchrun --nproc_per_node 8 launch/evaluate.py ...        # the same numbers as one rank

``--checkpoint`` is a training ``--out`` folder, one of its checkpoints or an exported
``head.pt`` (:mod:`launch.trained`); the model and data settings come from the run's saved
config, with ``--section.key`` overrides on top (``--data.val`` names the split to read).
Every clip of the split is read exactly once over all ranks; rank 0 writes into ``--out``:

- ``report.json``: ``top1``, ``top5``, ``mean_class_accuracy`` (fractions, over the labelled
  clips), ``num_clips`` / ``num_expected`` / ``complete``, ``num_rejected`` (clips of the split
  that ``make_shards`` could not pack: not 0 means not comparable with published numbers),
  ``per_class`` (template, count, correct, accuracy per label id), ``most_confused`` (the 10
  most frequent true -> predicted pairs), the views, the checkpoint and the step;
- ``confusion.csv`` (num_classes x num_classes counts, rows true, columns predicted),
  ``confusion.png`` and ``per_class.png``;
- ``predictions.csv``: per clip, the top-5 label ids, templates and probabilities; for an
  unlabelled split (SSv2's test set) this is the file to submit, and there is no accuracy;
- ``features.png``: the fused clip features (what the classifier reads) projected on their two
  principal components, coloured by class;
- ``attention/*.png`` with ``--attention N``: the cross-attention of the N/2 most confidently
  wrong and the N/2 most confidently right clips (frames x motion segments, both directions,
  mean over heads and each head, true and predicted templates).

Views (SSv2's multi-view protocol): the softmax is averaged over ``--temporal-views`` x
``--spatial-crops`` views. The shards store T_s frames a clip and the model sees T
(``data.frames``); temporal view ``v`` takes, from each of the T runs of T_s / T stored frames,
the ``v``-th of ``--temporal-views`` evenly spaced ones, so 2 temporal views of 16 frames need
shards made with ``make_shards --frames 32`` (the default); a request the shards cannot serve
is an error, never a quiet single view. Spatial crops are squares of the short side: 1 is the
centre, 3 are left (top), centre and right (bottom) along the long side.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

if __package__ in (None, ""):  # `python launch/evaluate.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from launch import distributed  # first: sets DeepSpeed's environment before anything imports it
from fusion.backbones.weights import WeightsError
from fusion.config import ConfigError
from fusion.data import ERROR_KEYS, READ_KEYS, Sampling, ShardSet, val_loader
from launch.train import RunConfig, resolve_data_url, route_warnings
from launch.trained import build_trained_model, load_trained, tool_parser, trained_config
from sharding import storage
from sharding.ssv2 import TEMPLATES

TOP_K = 5
MOST_CONFUSED = 10
# PCA of about this many clips' features: the picture needs no more, the gather stays small
FEATURE_CLIPS = 5000


@dataclass
class Candidate:
    """A clip kept for an attention picture."""

    confidence: float
    key: str
    label: int
    predicted: int
    frames: np.ndarray  # [T, S, S, 3] uint8, the view the picture shows
    attention: dict[str, np.ndarray]  # direction -> [heads, Tq, Tk] of the last layer


@dataclass
class Results:
    """What one rank saw: per clip key, label (-1: none) and view-averaged probabilities."""

    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)  # of about FEATURE_CLIPS clips (see feature_every)
    feature_labels: list[int] = field(default_factory=list)
    feature_keys: list[str] = field(default_factory=list)
    right: list[tuple[float, str, Candidate]] = field(default_factory=list)  # min-heaps by confidence
    wrong: list[tuple[float, str, Candidate]] = field(default_factory=list)


@torch.no_grad()
def classify(model: Any, clips: torch.Tensor, views: int, want_attention: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """uint8 clips ``[B, V, T, 3, S, S]`` -> (softmax averaged over the V views [B, C], fused
    features averaged over them [B, F], last-layer attention [B*V, heads, Tq, Tk] by direction)."""
    batch = clips.shape[0]
    semantic, motion = model.features(clips.flatten(0, 1))
    pooled, attention = model.head.forward_features(semantic, motion, return_attention=want_attention)
    logits = model.head.classifier(pooled).float()
    probs = torch.softmax(logits, dim=-1).unflatten(0, (batch, views)).mean(dim=1)
    features = pooled.float().unflatten(0, (batch, views)).mean(dim=1)
    last = {name: weights[-1] for name, weights in attention.items() if weights}
    return probs, features, last


def evaluate_batches(model: Any, batches: Iterable[dict[str, Any]], *, views: int, picture_view: int, keep: int,
                     device: torch.device, feature_every: int = 1, progress: bool = False) -> Results:
    """Run ``model`` over ``batches`` (clips ``[B, V, T, 3, S, S]`` or, for one view,
    ``[B, T, 3, S, S]``) and collect :class:`Results`; ``keep`` clips each of the most
    confidently right and wrong are kept with view ``picture_view`` for attention pictures;
    the fused features of one clip in ``feature_every`` (chosen by a hash of the key, so the
    same clips whatever the number of ranks) for the feature picture."""
    results = Results()
    for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True):
        if not batch["keys"]:
            continue
        clips = batch["clips"].to(device)
        if clips.dim() == 5:
            clips = clips.unsqueeze(1)
        probs, features, attention = classify(model, clips, views, want_attention=keep > 0)
        probs, features = probs.cpu().numpy(), features.cpu().numpy()
        labels = batch["labels"].tolist()
        for index, (key, label) in enumerate(zip(batch["keys"], labels)):
            results.keys.append(key)
            results.labels.append(label)
            results.probs.append(probs[index])
            if zlib.crc32(key.encode()) % feature_every == 0:
                results.features.append(features[index])
                results.feature_labels.append(label)
                results.feature_keys.append(key)
            if keep:
                _consider(results, keep, key, label, probs[index], clips[index, picture_view], attention, index * views + picture_view)
    return results


def _consider(results: Results, keep: int, key: str, label: int, probs: np.ndarray, clip: torch.Tensor,
              attention: dict[str, torch.Tensor], row: int) -> None:
    predicted = int(probs.argmax())
    confidence = float(probs[predicted])
    heap = results.right if label < 0 or predicted == label else results.wrong
    if len(heap) == keep and (confidence, key) <= heap[0][:2]:  # the order merge() uses
        return
    candidate = Candidate(confidence, key, label, predicted, clip.permute(0, 2, 3, 1).cpu().numpy(),
                          {name: weights[row].float().cpu().numpy() for name, weights in attention.items()})
    entry = (confidence, key, candidate)
    if len(heap) < keep:
        heapq.heappush(heap, entry)
    else:
        heapq.heapreplace(heap, entry)


def merge(parts: list[Results], keep: int) -> Results:
    """All ranks' results in one, clips ordered by key (so any number of ranks gives the same
    files), the ``keep`` most confident right and wrong clips over all."""
    merged = Results()
    for key, number, index in sorted((key, number, index) for number, part in enumerate(parts) for index, key in enumerate(part.keys)):
        merged.keys.append(key)
        merged.labels.append(parts[number].labels[index])
        merged.probs.append(parts[number].probs[index])
    kept = sorted((key, number, index) for number, part in enumerate(parts) for index, key in enumerate(part.feature_keys))
    merged.features = [parts[number].features[index] for _, number, index in kept]
    merged.feature_labels = [parts[number].feature_labels[index] for _, number, index in kept]
    merged.feature_keys = [key for key, _, _ in kept]
    merged.right = heapq.nlargest(keep, (e for part in parts for e in part.right), key=lambda e: (e[0], e[1]))
    merged.wrong = heapq.nlargest(keep, (e for part in parts for e in part.wrong), key=lambda e: (e[0], e[1]))
    return merged


def build_report(labels: np.ndarray, probs: np.ndarray, templates: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """Accuracy figures of view-averaged ``probs`` [N, C] against ``labels`` [N] (-1: no
    label, left out), and the confusion matrix [C, C] (rows true, columns predicted)."""
    classes = probs.shape[1] if probs.size else len(templates)
    labelled = labels >= 0
    truth, scores = labels[labelled], probs[labelled]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    report: dict[str, Any] = {"num_labelled": int(labelled.sum())}
    if not len(truth):
        report.update(top1=None, top5=None, mean_class_accuracy=None, per_class={}, most_confused=[])
        return report, confusion
    top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
    predicted = top[:, 0]
    np.add.at(confusion, (truth, predicted), 1)
    counts, correct = confusion.sum(axis=1), np.diag(confusion)
    per_class = {
        str(label): {"template": templates[label], "count": int(counts[label]), "correct": int(correct[label]),
                     "accuracy": float(correct[label] / counts[label])}
        for label in np.flatnonzero(counts)
    }
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    pairs = sorted(((int(off_diagonal[t, p]), int(t), int(p)) for t, p in zip(*np.nonzero(off_diagonal))), key=lambda x: (-x[0], x[1], x[2]))
    report.update(
        top1=float((predicted == truth).mean()),
        top5=float((top == truth[:, None]).any(axis=1).mean()),
        mean_class_accuracy=float(np.mean([row["accuracy"] for row in per_class.values()])),
        per_class=per_class,
        most_confused=[{"true": t, "true_template": templates[t], "predicted": p, "predicted_template": templates[p], "count": n}
                       for n, t, p in pairs[:MOST_CONFUSED]],
    )
    return report, confusion


def write_predictions(path: Path, keys: list[str], labels: np.ndarray, probs: np.ndarray, templates: list[str]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "label", *(f"pred_{k + 1}" for k in range(TOP_K)), *(f"template_{k + 1}" for k in range(TOP_K)),
                         *(f"prob_{k + 1}" for k in range(TOP_K))])
        for key, label, row in zip(keys, labels.tolist(), probs):
            top = np.argsort(-row, kind="stable")[:TOP_K]
            writer.writerow([key, "" if label < 0 else label, *top.tolist(), *(templates[i] for i in top),
                             *(f"{row[i]:.5f}" for i in top)])


def write_confusion_csv(path: Path, confusion: np.ndarray) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true\\predicted", *range(confusion.shape[1])])
        for label, row in enumerate(confusion):
            writer.writerow([label, *row.tolist()])


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The two principal components of ``features`` [N, F] (centred; SVD)."""
    centred = features - features.mean(axis=0, keepdims=True)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    return centred @ directions[:2].T


def write_pictures(out: Path, results: Results, report: dict[str, Any], confusion: np.ndarray, templates: list[str],
                   title: str) -> list[Path]:
    from launch import plot

    written = []
    if report["num_labelled"]:
        written.append(plot.plot_confusion(confusion, templates, out / "confusion.png",
                                           f"{title}: confusion, rows normalised (top-1 {report['top1']:.3f})"))
        written.append(plot.plot_per_class({int(k): v for k, v in report["per_class"].items()}, templates, out / "per_class.png",
                                           f"{title}: top-1 per class (mean {report['mean_class_accuracy']:.3f})"))
        labels = np.asarray(results.feature_labels)
        chosen = labels >= 0
        if chosen.sum() >= 3:
            points = pca_2d(np.stack(results.features)[chosen])
            written.append(plot.plot_features(points, labels[chosen], templates, out / "features.png",
                                              f"{title}: fused clip features, PCA of {int(chosen.sum())} clips"))
    pictures = out / "attention"
    for kind, entries in (("wrong", results.wrong), ("right", results.right)):
        for rank, (_, _, candidate) in enumerate(entries):
            if not candidate.attention:
                continue
            pictures.mkdir(exist_ok=True)
            truth = f"{candidate.label}: {templates[candidate.label]}" if candidate.label >= 0 else "unlabelled"
            caption = (f"{candidate.key} — true {truth} — predicted {candidate.predicted}: {templates[candidate.predicted]} "
                       f"(p = {candidate.confidence:.2f})")
            written.append(plot.plot_attention(candidate.frames, candidate.attention,
                                               pictures / f"{kind}_{rank + 1}_{candidate.key}.png", caption))
    return written


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser("launch/evaluate.py", __doc__, RunConfig)
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json, CSVs and pictures")
    parser.add_argument("--attention", type=int, default=0, metavar="N",
                        help="attention pictures of the N/2 most confidently wrong and N/2 right clips (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per rank per forward pass (each with all its views)")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher; LOCAL_RANK wins")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 for a config, checkpoint or data problem (named on stderr)."""
    parser = _parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.batch_size < 1 or args.attention < 0:
            raise ConfigError("--batch-size must be >= 1 and --attention >= 0")
        trained = load_trained(args.checkpoint)
        cfg, unknown = trained_config(RunConfig, trained, rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        val_set = ShardSet.open(resolve_data_url(cfg.data.val))
        if val_set.is_features:  # evaluation runs the backbones: read the frames the features came from
            source = (val_set.manifest.get("source") or {}).get("url")
            if not source:
                raise ConfigError(f"{val_set.url} holds features without a record of their frame shards: pass --data.val FRAMES")
            print(f"{val_set.url} holds features; evaluating on the frame shards they came from: {source}")
            val_set = ShardSet.open(resolve_data_url(source))
        sampling = Sampling.of(cfg.data, val_set, args.temporal_views, args.spatial_crops)
        if cfg.data.decode == "gpu" and sampling.views > 1:
            raise ConfigError("several views per clip are cut on the CPU: add --data.decode cpu")
        rank, _, _, _ = distributed.rendezvous_environment(args.local_rank)
        route_warnings(rank)
        ranks = distributed.init_distributed(args.local_rank)
        model = build_trained_model(trained, cfg.model, ranks.device, seed=cfg.train.seed)
    except (ConfigError, storage.StorageError, FileNotFoundError, ValueError, WeightsError) as error:
        print(f"launch/evaluate.py: error: {error}", file=sys.stderr)
        return 2
    templates = list(val_set.manifest.get("templates") or TEMPLATES)
    say = print if ranks.is_main else (lambda *a, **k: None)
    rejected = int(val_set.manifest.get("num_rejected") or 0)
    if rejected:
        say(f"warning: {val_set.url} lacks {rejected} clip(s) of its split that make_shards could not pack (rejects.jsonl): "
            "these figures are not comparable with published ones", file=sys.stderr)
    say(f"evaluating {trained.source} (step {trained.step}) on {val_set.num_samples} clips of {val_set.url}: "
        f"{sampling.temporal_views} temporal x {sampling.spatial_crops} spatial view(s) of {sampling.frames} frames "
        f"(of {sampling.stored} stored), {ranks.world_size} rank(s)")
    started = time.perf_counter()
    loader = val_loader(cfg.data, val_set, batch_size=args.batch_size, rank=ranks.rank, world_size=ranks.world_size,
                        device=ranks.device, temporal_views=sampling.temporal_views, spatial_crops=sampling.spatial_crops)
    keep = math.ceil(args.attention / 2)
    picture_view = sampling.spatial_crops // 2  # first temporal view, centre crop
    failure = None
    try:
        part = evaluate_batches(model, loader, views=sampling.views, picture_view=picture_view, keep=keep, device=ranks.device,
                                feature_every=max(1, math.ceil(val_set.num_samples / FEATURE_CLIPS)), progress=ranks.is_main)
    except (storage.StorageError, RuntimeError) as error:  # the loader's: storage gone, data unreadable
        failure, part = str(error), Results()
    if distributed.any_rank(failure is not None):  # every rank stops together, none waits in the gather
        print(f"launch/evaluate.py: error: {failure or 'the loader failed on another rank'}", file=sys.stderr)
        distributed.shutdown()
        return 2
    parts = distributed.gather_on_main(part)
    totals = dict(zip(ERROR_KEYS + READ_KEYS, (int(v) for v in distributed.sum_on_host(
        [float(loader.stats[key]) for key in ERROR_KEYS + READ_KEYS]))))
    data_errors = {key: totals[key] for key in ERROR_KEYS}
    if ranks.is_main:
        results = merge(parts, keep)
        labels = np.asarray(results.labels, dtype=np.int64)
        probs = np.stack(results.probs) if results.probs else np.zeros((0, len(templates)), np.float32)
        report, confusion = build_report(labels, probs, templates)
        report = {
            "checkpoint": str(trained.source), "step": trained.step, "data": val_set.url,
            "num_clips": len(results.keys), "num_expected": val_set.num_samples,
            "complete": len(results.keys) == val_set.num_samples, "num_rejected": rejected,
            "views": {"temporal": sampling.temporal_views, "spatial": sampling.spatial_crops, "frames": sampling.frames,
                      "stored_frames": sampling.stored},
            **report,
            "data_errors": data_errors,
            "data_read": {key: totals[key] for key in READ_KEYS},
            "seconds": round(time.perf_counter() - started, 1),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        write_predictions(args.out / "predictions.csv", results.keys, labels, probs, templates)
        write_confusion_csv(args.out / "confusion.csv", confusion)
        run_name = trained.source.parent.name if trained.source.name == "head.pt" else trained.source.name
        pictures = write_pictures(args.out, results, report, confusion, templates, f"{run_name} (step {trained.step})")
        print(summary(report, args.out, pictures))
    distributed.shutdown()
    return 0


def summary(report: dict[str, Any], out: Path, pictures: list[Path]) -> str:
    lines = []
    if report["top1"] is None:
        lines.append(f"{report['num_clips']} clips, none labelled: predictions in {out / 'predictions.csv'}")
    else:
        lines.append(f"top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}  mean class accuracy "
                     f"{report['mean_class_accuracy']:.4f}  ({report['num_labelled']} labelled clips)")
        for pair in report["most_confused"][:3]:
            lines.append(f"  confused {pair['count']}x: {pair['true_template']!r} -> {pair['predicted_template']!r}")
    if not report["complete"]:
        lines.append(f"warning: INCOMPLETE, {report['num_clips']} of {report['num_expected']} clips read (see the skipped "
                     "samples above): not comparable with a full pass")
    lines.append(f"report: {out / 'report.json'}")
    lines += [f"picture: {path}" for path in pictures]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
