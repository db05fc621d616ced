"""Evaluation, views, attention pictures and prediction (launch/evaluate.py, launch/predict.py,
launch/plot.py): the figures against a direct computation, views against a model whose output
is known, 1 rank against 2, prediction against evaluation on the same clips, and real
pictures on disk."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import webdataset as wds
from PIL import Image

from fusion.config import ConfigError
from fusion.data import DataConfig, Sampling, ShardSet, decode_clip, segment_bounds, val_loader, view_frame_indices
from launch.evaluate import build_report, evaluate_batches
from sharding.ssv2 import TEMPLATES
from tests.test_train import REPO, RUN_TIMEOUT_S, SMALL, run_env, small_ds_json, torchrun

# ----------------------------------------------------------------------------- pure parts


def test_report_equals_a_direct_computation():
    generator = np.random.default_rng(0)
    classes, clips = 12, 300
    probs = generator.dirichlet(np.ones(classes) * 0.3, size=clips).astype(np.float32)
    labels = generator.integers(0, classes, clips)
    labels[::17] = -1  # unlabelled clips are left out of every figure
    report, confusion = build_report(labels, probs, [f"template {i}" for i in range(classes)])
    keep = labels >= 0
    truth, logits = torch.from_numpy(labels[keep]), torch.from_numpy(probs[keep])
    top5 = logits.topk(5, dim=1).indices
    assert report["num_labelled"] == int(keep.sum())
    assert report["top1"] == pytest.approx((top5[:, 0] == truth).double().mean().item())
    assert report["top5"] == pytest.approx((top5 == truth[:, None]).any(dim=1).double().mean().item())
    direct = np.zeros((classes, classes), np.int64)
    for t, p in zip(truth.tolist(), top5[:, 0].tolist()):
        direct[t, p] += 1
    assert np.array_equal(confusion, direct)
    for label in range(classes):
        row = report["per_class"][str(label)]
        assert row["count"] == (truth == label).sum() and row["correct"] == direct[label, label]
        assert row["accuracy"] == pytest.approx(direct[label, label] / direct[label].sum())
    assert report["mean_class_accuracy"] == pytest.approx(np.mean([direct[i, i] / direct[i].sum() for i in range(classes)]))
    off = direct - np.diag(np.diag(direct))
    assert [(p["true"], p["predicted"], p["count"]) for p in report["most_confused"]][0][2] == off.max()
    assert len(report["most_confused"]) == 10 and all(p["true"] != p["predicted"] for p in report["most_confused"])


def test_unlabelled_split_has_no_accuracy():
    report, confusion = build_report(np.full(4, -1), np.full((4, 174), 1 / 174, np.float32), list(TEMPLATES))
    assert report["top1"] is None and report["num_labelled"] == 0 and not confusion.any()


# ----------------------------------------------------------------------------- frames and views

STORED, HEIGHT, SQUARE = 4, 24, 24


def view_shards(folder: Path, clips: int = 3) -> ShardSet:
    """Grey clips of 4 stored frames, 24 x 72: three 24-px squares of levels 40, 100, 160
    (left to right), plus 10 x the stored frame's index: every view has a known mean."""
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "shard-000000.tar"), encoder=False) as writer:
        for number in range(clips):
            sample = {"__key__": f"{500 + number}", "cls": str(number).encode(), "json": b"{}"}
            for t in range(STORED):
                image = np.zeros((HEIGHT, 3 * SQUARE, 3), np.uint8)
                for region in range(3):
                    image[:, region * SQUARE : (region + 1) * SQUARE] = 40 + 60 * region + 10 * t + 3 * number
                sample[f"{t:03d}.jpg"] = simplejpeg.encode_jpeg(image, quality=95, colorsubsampling="444")
            writer.write(sample)
    size = (folder / "shard-000000.tar").stat().st_size
    manifest = {"format": "ssv2-frames/1", "split": "validation", "frames": STORED, "short_side": HEIGHT, "jpeg_quality": 95,
                "templates": list(TEMPLATES), "num_samples": clips, "num_rejected": 0, "args": {},
                "shards": [{"name": "shard-000000.tar", "num_samples": clips, "bytes": size, "sha256": ""}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return ShardSet.open(str(folder))


class KnownHead(torch.nn.Module):
    """logits = (5, 0, -5) x the clip's mean grey level / 255: the probabilities of any view
    follow from its pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(1, 3, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[5.0], [0.0], [-5.0]]))

    def forward_features(self, semantic, motion, return_attention=False):
        return semantic.mean(dim=1), {}


class KnownModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = KnownHead()

    def features(self, clips):
        level = clips.float().mean(dim=(2, 3, 4)) / 255  # [N, T]
        return level[..., None], level[:, :1, None]


def test_views_average_the_softmax_over_exactly_the_views(tmp_path):
    shardset = view_shards(tmp_path / "shards")
    cfg = DataConfig(num_workers=0, crop_size=12, frames=2)
    loader = val_loader(cfg, shardset, batch_size=2, rank=0, world_size=1, temporal_views=2, spatial_crops=3)
    results = evaluate_batches(KnownModel(), loader, views=6, picture_view=1, keep=0, device=torch.device("cpu"))
    assert results.keys == ["500", "501", "502"]
    # the 2 temporal views take stored frames (0, 2) and (1, 3); the 3 crops the three squares
    assert [view_frame_indices(STORED, 2, v, 2) for v in range(2)] == [[0, 2], [1, 3]]
    weights = torch.tensor([[5.0], [0.0], [-5.0]])
    for number, probs in enumerate(results.probs):
        views = []
        for frames in ([0, 2], [1, 3]):
            for region in range(3):
                level = 40 + 60 * region + 10 * np.mean(frames) + 3 * number
                views.append(torch.softmax((weights * level / 255).flatten(), dim=0))
        expected = torch.stack(views).mean(dim=0)
        assert probs == pytest.approx(expected.numpy(), abs=2e-3)
        assert not probs == pytest.approx(torch.stack(views[:5]).mean(dim=0).numpy(), abs=2e-3)  # not 5 views


def test_views_the_shards_cannot_serve_are_refused(tmp_path):
    shardset = view_shards(tmp_path / "shards")
    with pytest.raises(ConfigError, match="3 temporal views of 2 frames need at least 6 stored frames.*make_shards --frames 6"):
        Sampling.of(DataConfig(frames=2), shardset, temporal_views=3)
    with pytest.raises(ConfigError, match="data.frames is 8 but .* holds 4 frames"):
        Sampling.of(DataConfig(frames=8), shardset)
    with pytest.raises(ConfigError, match="data.decode cpu"):
        val_loader(DataConfig(frames=2, decode="gpu"), shardset, batch_size=1, rank=0, world_size=1, temporal_views=2)


def test_training_draws_a_random_frame_from_each_segment(tmp_path):
    shardset = view_shards(tmp_path / "shards", clips=1)
    sample = next(iter(wds.WebDataset(str(tmp_path / "shards" / "shard-000000.tar"), shardshuffle=False)))
    sampling = Sampling.of(DataConfig(frames=2), shardset)
    cfg = DataConfig(frames=2, crop_size=12, min_crop_area=1.0)
    seen = set()
    for seed in range(40):
        clip, _ = decode_clip(sample, sampling, cfg, random.Random(seed), require_label=True)
        levels = clip.float().mean(dim=(1, 2, 3)).tolist()  # one crop of the frame: the stored index shows in the level
        picks = tuple(int(round(((level - 40) % 60) / 10)) for level in levels)
        assert picks[0] in (0, 1) and picks[1] in (2, 3)  # one of each segment, never outside it
        seen.add(picks)
    assert len(seen) == 4  # every combination turns up: the frame is drawn, not fixed
    assert segment_bounds(32, 16)[3] == (6, 8) and view_frame_indices(32, 16) == list(range(1, 32, 2))


# ----------------------------------------------------------------------------- a trained run, evaluated


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory):
    """The debug model trained until it knows the six training clips (a CI-sized run; no dropout,
    since memorising them is the point)."""
    folder = tmp_path_factory.mktemp("trained")
    out = folder / "run"
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--deepspeed", str(small_ds_json(folder)), *SMALL, "--data.train",
         str(synthetic_shards / "train"), "--data.val", str(synthetic_shards / "validation"), "--train.epochs", "30",
         "--data.min_crop_area", "0.8", "--model.dropout", "0.0", "--train.log_every", "6", "--out", str(out)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def evaluate(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), *([] if launcher else ["launch/evaluate.py"]), *args]
    result = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return result


def evaluate_torchrun(ranks: int) -> list[str]:
    return [*torchrun(ranks)[:-1], "launch/evaluate.py"]


def is_picture(path: Path) -> bool:
    with Image.open(path) as image:
        image.load()
        return image.size[0] > 200 and image.size[1] > 200 and len(set(image.convert("L").tobytes())) > 10


@pytest.mark.slow
def test_one_rank_and_two_ranks_give_the_same_report(trained_run, synthetic_shards, tmp_path):
    reports = {}
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}"
        launcher = None if ranks == 1 else evaluate_torchrun(2)
        result = evaluate("--checkpoint", str(trained_run), "--data.val", str(synthetic_shards / "validation"), "--out", str(out),
                          "--temporal-views", "2", "--spatial-crops", "3", "--attention", "2", launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[ranks] = json.loads((out / "report.json").read_text())
        assert (out / "confusion.csv").read_text().count("\n") == 175
    one, two = reports[1], reports[2]
    assert one["num_clips"] == one["num_expected"] == 3 and one["complete"] and one["views"]["temporal"] == 2
    for key in ("top1", "top5", "per_class", "most_confused", "num_clips", "num_labelled", "mean_class_accuracy"):
        assert one[key] == two[key], key
    assert (tmp_path / "eval1" / "confusion.csv").read_text() == (tmp_path / "eval2" / "confusion.csv").read_text()
    rows = {n: list(csv.DictReader(open(tmp_path / f"eval{n}" / "predictions.csv"))) for n in (1, 2)}
    assert [r["id"] for r in rows[1]] == [r["id"] for r in rows[2]]
    assert all(float(a["prob_1"]) == pytest.approx(float(b["prob_1"]), abs=1e-4) for a, b in zip(rows[1], rows[2]))
    for name in ("confusion.png", "per_class.png", "features.png"):
        assert is_picture(tmp_path / "eval1" / name), name
    attention = sorted((tmp_path / "eval1" / "attention").glob("*.png"))
    assert attention and all(is_picture(path) for path in attention)
    assert is_picture(trained_run / "curves.png")


@pytest.mark.slow
def test_the_test_split_gets_predictions_and_rejects_are_reported(trained_run, synthetic_root, tmp_path):
    from sharding import make_shards

    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    first = json.loads((root / "labels" / "test.json").read_text())[0]["id"]
    (root / "20bn-something-something-v2" / f"{first}.webm").write_bytes(b"")  # one clip cannot be packed
    assert make_shards.main(["--root", str(root), "--split", "test", "--out", str(tmp_path / "test"), "--no-progress"]) == 0
    result = evaluate("--checkpoint", str(trained_run / "head.pt"), "--data.val", str(tmp_path / "test"), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["top1"] is None and report["num_clips"] == 1 and report["num_rejected"] == 1
    assert "not comparable with published ones" in result.stderr
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["label"] == "" and rows[0]["template_1"] in TEMPLATES


@pytest.mark.slow
def test_predict_reads_a_video_as_the_shards_do(trained_run, synthetic_root, synthetic_shards, tmp_path):
    """The trained model knows its six training clips; predict on their .webm files gives the
    templates, and the same probabilities as evaluate on their shards."""
    result = evaluate("--checkpoint", str(trained_run), "--data.val", str(synthetic_shards / "train"), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["top1"] == 1.0, "the debug model did not learn its training clips"
    evaluated = {row["id"]: row for row in csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))}
    videos = synthetic_root / "20bn-something-something-v2"
    files = [videos / f"{key}.webm" for key in sorted(evaluated)]
    (tmp_path / "garbage.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.webm").write_bytes(b"")
    broken = [tmp_path / "garbage.webm", tmp_path / "empty.webm", tmp_path / "missing.webm"]
    run = subprocess.run([sys.executable, "launch/predict.py", *map(str, files[:3]), *map(str, broken), *map(str, files[3:]),
                          "--checkpoint", str(trained_run), "--json"],
                         cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 1  # some files failed, the others were still predicted
    answers = json.loads(run.stdout)
    assert len(answers) == 9
    for path, answer in zip([*files[:3], *broken, *files[3:]], answers):
        assert answer["file"] == str(path)
    for reason, name in (("undecodable_video", "garbage"), ("empty_video", "empty"), ("missing_video", "missing")):
        assert f"launch/predict.py: error: {tmp_path / name}.webm: {reason}" in run.stderr
    for answer in answers:
        if "error" in answer:
            continue
        key = Path(answer["file"]).stem
        assert answer["top5"][0]["id"] == int(evaluated[key]["label"])  # the template it learned
        assert answer["top5"][0]["template"] == TEMPLATES[int(evaluated[key]["label"])]
        assert answer["top5"][0]["probability"] == pytest.approx(float(evaluated[key]["prob_1"]), abs=1e-3)


def test_evaluate_errors_are_clear(tmp_path, synthetic_shards):
    result = evaluate("--checkpoint", str(tmp_path / "nothing"), "--data.val", str(synthetic_shards / "validation"), "--out", str(tmp_path))
    assert result.returncode == 2 and "does not exist: give a training --out folder" in result.stderr
    (tmp_path / "run").mkdir()
    result = evaluate("--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "holds neither head.pt nor checkpoints/latest" in result.stderr


def test_training_warns_when_the_validation_split_has_rejects(synthetic_shards, tmp_path, capsys):
    from fusion.config import load
    from launch.train import RunConfig, open_data

    val = tmp_path / "validation"
    shutil.copytree(synthetic_shards / "validation", val)
    manifest = json.loads((val / "manifest.json").read_text())
    manifest["num_rejected"] = 2
    (val / "manifest.json").write_text(json.dumps(manifest))
    cfg, _ = load(RunConfig, REPO / "launch" / "configs" / "debug.yaml", ["--data.train", str(synthetic_shards / "train"),
                                                                          "--data.val", str(val)])
    open_data(cfg)
    assert f"{val} lacks 2 clip(s) of its split" in capsys.readouterr().err
