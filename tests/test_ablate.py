"""launch/ablate.py end to end on the tiny synthetic shards: features extracted as needed,
every variant trained per seed, the report written, a rerun that trains nothing, and variants
whose features are missing skipped with the reason in the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_train import REPO, SMALL, run_env, small_ds_json

# SMALL without its --config (ablate takes that itself)
OVERRIDES = SMALL[2:]


def ablate(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "launch/ablate.py", "--config", "launch/configs/debug.yaml", *args, *OVERRIDES]
    return subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def test_the_study_runs_resumes_and_reports(synthetic_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    common = ["--out", str(out), "--deepspeed", str(small_ds_json(tmp_path, micro=2)), "--seeds", "0", "1", "--epochs", "1",
              "--views", "1"]
    variants = ["--variants", "fusion=concat", "motion=c3d"]
    first = ablate("--data", str(synthetic_shards), *variants, *common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((out / "ablation.json").read_text())}
    assert list(rows) == ["model", "fusion=concat", "motion=c3d"]
    for row in rows.values():
        assert row["seeds"] == 2 and 0.0 <= row["top1_mean"] <= row["top5_mean"] <= 1.0
        assert row["val_clips"] == 3 and row["trainable"] > 0
        assert len(row["top1_runs"]) == 2
    # one change each: per layer and direction, concatenation has dim^2 + 2 dim fewer parameters
    assert rows["fusion=concat"]["trainable"] == rows["model"]["trainable"] - 2 * (64 * 64 + 2 * 64)
    assert (out / "features" / "dinov2_vits14+c3d" / "train" / "manifest.json").is_file()
    assert (out / "features" / "dinov2_vits14+i3d_r50" / "validation" / "manifest.json").is_file()
    table = (out / "ablation.md").read_text()
    assert "| fusion=concat | fusion concat |" in table and "python launch/ablate.py" in table
    assert (out / "ablation.png").stat().st_size > 10_000
    results = sorted(out.glob("runs/*/seed*/result.json"))
    assert len(results) == 6
    stamps = {path: path.stat().st_mtime_ns for path in results}

    # a rerun reuses every finished run and every feature set
    second = ablate("--data", str(synthetic_shards), *variants, *common)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "extracting" not in second.stdout
    assert {path: path.stat().st_mtime_ns for path in sorted(out.glob("runs/*/seed*/result.json"))} == stamps

    # without frame shards, a variant whose features do not exist is skipped and says why
    third = ablate("--variants", "semantic=clip_vitb16", *common)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((out / "ablation.json").read_text())}
    assert "no features at" in rows["semantic=clip_vitb16"]["skipped"]
    assert "skipped: no features at" in (out / "ablation.md").read_text()
