"""Pictures of a run and of an evaluation, with matplotlib (headless).

    python -m launch.plot RUN              # RUN/curves.png from RUN/metrics.jsonl

- :func:`plot_curves`: loss, learning rate, top-1/top-5 (train and validation) and clips/s
  against optimizer steps, from ``metrics.jsonl`` (``launch/train.py`` writes it at the end);
- :func:`plot_confusion`, :func:`plot_per_class`, :func:`plot_attention`,
  :func:`plot_features`: the figures of ``launch/evaluate.py``.

Label ids are printed with their templates where they fit (at most :data:`NAMED_CLASSES`
classes on an axis); beyond that, ids alone, so that no label is drawn over another.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

NAMED_CLASSES = 30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(template: str, width: int = 48) -> str:
    return template if len(template) <= width else template[: width - 1] + "…"


# ----------------------------------------------------------------------------- training curves


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a row torn by a kill is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(metrics_path: Path, out: Path) -> Path:
    """``out``: four panels against steps: loss, top-1/top-5, learning rate, clips/s."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_top1" in r and r.get("val_complete", 1)]  # incomplete passes are not the figure
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (loss_axis, top_axis), (lr_axis, speed_axis) = axes

    def series(rows_, key):
        return [r["step"] for r in rows_ if key in r], [r[key] for r in rows_ if key in r]

    loss_axis.plot(*series(train, "loss"), label="train", color="tab:blue")
    loss_axis.plot(*series(val, "val_loss"), "o-", label="validation", color="tab:orange")
    loss_axis.set(title="loss", xlabel="step", ylabel="cross-entropy")
    for key, style, colour, label in (("top1", "-", "tab:blue", "train top-1"), ("top5", "--", "tab:blue", "train top-5"),
                                      ("val_top1", "o-", "tab:orange", "validation top-1"),
                                      ("val_top5", "o--", "tab:orange", "validation top-5")):
        top_axis.plot(*series(val if key.startswith("val") else train, key), style, color=colour, label=label)
    top_axis.set(title="accuracy", xlabel="step", ylabel="fraction of clips", ylim=(0, 1.02))
    lr_axis.plot(*series(train, "lr"), color="tab:green")
    lr_axis.set(title="learning rate", xlabel="step", ylabel="lr")
    speed_axis.plot(*series(train, "clips_per_s"), color="tab:purple")
    speed_axis.set(title="training speed", xlabel="step", ylabel="clips / s (all ranks)")
    for axis in (loss_axis, top_axis):
        axis.legend(loc="best", fontsize=9)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    figure.suptitle(f"{Path(metrics_path).parent.name}: {len(train)} logged steps, {len(val)} validations")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


# ----------------------------------------------------------------------------- evaluation


def plot_confusion(confusion: np.ndarray, templates: Sequence[str], out: Path, title: str) -> Path:
    """Row-normalised confusion matrix over the classes that occur (as truth or prediction)."""
    present = np.flatnonzero(confusion.sum(axis=0) + confusion.sum(axis=1))
    matrix = confusion[np.ix_(present, present)].astype(float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    named = len(present) <= NAMED_CLASSES
    plt = _pyplot()
    side = min(4 + 0.42 * len(present), 22) if named else 14
    figure, axis = plt.subplots(figsize=(side + (5 if named else 0), side), constrained_layout=True)
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.02, label="fraction of the true class's clips")
    if named:
        labels = [f"{i}: {_short(templates[i])}" for i in present]
        axis.set_xticks(range(len(present)), [str(i) for i in present], fontsize=8)
        axis.set_yticks(range(len(present)), labels, fontsize=8)
        for r, c in zip(*np.nonzero(matrix)):
            axis.text(c, r, int(matrix[r, c]), ha="center", va="center", fontsize=7,
                      color="white" if normalised[r, c] > 0.5 else "black")
    else:
        ticks = range(0, len(present), max(1, len(present) // 20))
        axis.set_xticks(list(ticks), [str(present[i]) for i in ticks], fontsize=7, rotation=90)
        axis.set_yticks(list(ticks), [str(present[i]) for i in ticks], fontsize=7)
    axis.set(xlabel="predicted label id", ylabel="true label" + (" (id: template)" if named else " id"), title=title)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_per_class(per_class: dict[int, dict[str, Any]], templates: Sequence[str], out: Path, title: str) -> Path:
    """Per-class top-1, sorted, one bar per class with clips."""
    rows = sorted(((row["accuracy"], label) for label, row in per_class.items() if row["count"]), reverse=True)
    named = len(rows) <= 40
    plt = _pyplot()
    if named:
        figure, axis = plt.subplots(figsize=(11, 1.5 + 0.32 * len(rows)), constrained_layout=True)
        positions = np.arange(len(rows))
        axis.barh(positions, [a for a, _ in rows], color="tab:blue")
        for position, (accuracy, _) in zip(positions, rows):
            axis.text(accuracy + 0.01, position, f"{accuracy:.2f}", va="center", fontsize=8)
        axis.set_yticks(positions, [f"{label}: {_short(templates[label], 60)} ({per_class[label]['count']})" for _, label in rows],
                        fontsize=8)
        axis.invert_yaxis()
        axis.set(xlim=(0, 1), xlabel="top-1 accuracy (clips in brackets)")
    else:
        figure, axis = plt.subplots(figsize=(16, 5), constrained_layout=True)
        axis.bar(np.arange(len(rows)), [a for a, _ in rows], width=1.0, color="tab:blue")
        axis.set(ylim=(0, 1.1), xlabel=f"{len(rows)} classes, sorted", ylabel="top-1 accuracy")
        # too many classes to name on the axis: the hardest ones in a box
        worst = "\n".join(f"{accuracy:.2f}  {label}: {_short(templates[label], 56)}" for accuracy, label in rows[-8:][::-1])
        axis.text(0.01, 0.04, "hardest classes:\n" + worst, transform=axis.transAxes, fontsize=8, va="bottom", family="monospace",
                  bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "grey"})
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="x" if named else "y")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_attention(frames: np.ndarray, attention: dict[str, np.ndarray], out: Path, title: str) -> Path:
    """One clip: its T frames along the top, then for each direction of cross-attention the
    weights (mean over heads, then each head) as frames x motion segments, the same axes for
    both directions (motion->semantic is transposed), so a bright cell reads "this frame and
    this motion segment attend to each other"."""
    plt = _pyplot()
    steps = frames.shape[0]
    directions = [(name, weights) for name, weights in attention.items()]
    heads = directions[0][1].shape[0]
    columns = max(steps, 2 + heads)
    figure = plt.figure(figsize=(max(14, 0.9 * columns), 3.2 + 3.6 * len(directions)), constrained_layout=True)
    grid = figure.add_gridspec(1 + 2 * len(directions), columns, height_ratios=[0.9] + [2.2, 1.4] * len(directions))
    for index in range(steps):
        axis = figure.add_subplot(grid[0, index])
        axis.imshow(frames[index])
        axis.set_axis_off()
        axis.set_title(f"frame {index}", fontsize=8)
    for row, (name, weights) in enumerate(directions):
        # every cross-attention map as [frames, motion segments]; self-attention as [query, key]
        maps = weights if name != "motion_queries_semantic" else np.swapaxes(weights, -1, -2)
        mean = maps.mean(axis=0)
        # each query's weights sum to 1 over its keys: uniform attention is 1 / keys
        uniform = 1.0 / weights.shape[-1]
        axis = figure.add_subplot(grid[1 + 2 * row, :])
        # the colours span this map's own range, so that structure shows even when weak
        image = axis.imshow(mean.T, aspect="auto", cmap="magma", interpolation="nearest")
        if name.endswith("self"):
            queries, x_label, y_label = "each time step over the others", "time step (query)", "time step (key)"
        elif name == "semantic_queries_motion":
            queries, x_label, y_label = "each frame over the motion segments", "frame", "motion segment"
        else:
            queries, x_label, y_label = "each motion segment over the frames", "frame", "motion segment"
        axis.set(xlabel=x_label, ylabel=y_label,
                 title=f"{name.replace('_', ' ')} ({queries}): mean over {heads} heads; uniform = {uniform:.3f}")
        axis.set_xticks(range(mean.shape[0]))
        axis.set_yticks(range(mean.shape[1]))
        figure.colorbar(image, ax=axis, fraction=0.02, pad=0.01, label="attention weight")
        for head in range(heads):
            axis = figure.add_subplot(grid[2 + 2 * row, head])
            axis.imshow(maps[head].T, aspect="auto", cmap="magma", interpolation="nearest")
            axis.set_title(f"head {head}", fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=11)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_features(points: np.ndarray, labels: np.ndarray, templates: Sequence[str], out: Path, title: str) -> Path:
    """A 2-D projection of clip features, one colour per class (a legend when it fits)."""
    plt = _pyplot()
    classes = sorted(set(labels.tolist()))
    figure, axis = plt.subplots(figsize=(13 if len(classes) <= 20 else 9, 8), constrained_layout=True)
    colours = plt.get_cmap("tab20" if len(classes) <= 20 else "hsv", max(len(classes), 1))
    for index, label in enumerate(classes):
        chosen = labels == label
        axis.scatter(points[chosen, 0], points[chosen, 1], s=16, color=colours(index), alpha=0.8,
                     label=f"{label}: {_short(templates[label], 40)}")
    if len(classes) <= 20:
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    axis.set(xlabel="principal component 1", ylabel="principal component 2", title=title)
    axis.grid(alpha=0.3)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plot", description="Draw RUN/curves.png from RUN/metrics.jsonl.")
    parser.add_argument("run", type=Path, help="a training --out folder")
    parser.add_argument("--out", type=Path, help="where the picture goes (default RUN/curves.png)")
    args = parser.parse_args(argv)
    metrics = args.run / "metrics.jsonl"
    if not metrics.is_file():
        print(f"launch.plot: error: no metrics.jsonl in {args.run}: is it a training --out folder?", file=sys.stderr)
        return 2
    print(plot_curves(metrics, args.out or args.run / "curves.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
