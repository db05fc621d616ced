"""launch/gpu_check.py: its CPU smoke mode for real (every section, the deepspeed launcher and
a resume included, ~1-2 min on 2 cores), how it reports a failing, skipped or runaway section,
and the checks of the wheel bundle for the GPU machine (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from launch import gpu_check
from tests.conftest import clean_env

REPO = Path(__file__).resolve().parents[1]
SMOKE_TIMEOUT_S = 300


def run_env() -> dict[str, str]:
    env = clean_env(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One real ``python -m launch.gpu_check --cpu-smoke`` run: (report, out folder, its output)."""
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run([sys.executable, "-m", "launch.gpu_check", "--cpu-smoke", "--out", str(out)], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert result.returncode == 0, f"gpu_check --cpu-smoke failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return json.loads((out / "gpu_check.json").read_text()), out, result.stdout


def nulls(value, path=""):
    """Paths of every null inside ``value`` (rows of lists by index)."""
    if value is None:
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "not_measured":
                yield from nulls(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from nulls(item, f"{path}[{index}]")


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_writes_both_files(smoke):
    report, out, stdout = smoke
    assert report["format"] == gpu_check.FORMAT and report["mode"] == "cpu-smoke"
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    failed = {name: section.get("error") for name, section in report["sections"].items() if section["status"] != "ok"}
    assert not failed, failed
    assert all(section["seconds"] <= section["budget_s"] + 5 for section in report["sections"].values())
    assert 0 < report["wall_s"] < gpu_check.CPU_PLAN.budget_s
    summary = (out / "gpu_check.md").read_text()
    assert summary.startswith("# GPU check (cpu-smoke)") and "## Training run" in summary and "## Not measured" in summary
    assert "# GPU check (cpu-smoke)" in stdout  # the summary is printed at the end too
    assert "training run 1" in (out / "gpu_check.log").read_text()


@pytest.mark.slow
def test_every_null_says_why(smoke):
    """Nothing is typed in: a figure this run could not measure is null, with its reason."""
    report, _, _ = smoke
    for name, section in report["sections"].items():
        reasons = " ".join(section.get("not_measured", {}))
        for path in nulls(section):
            field = path.split(".")[-1].split("[")[0]
            assert field in reasons, f"{name}.{path} is null without a reason in not_measured ({reasons!r})"
    assert report["unmeasured"] and all(":" in line for line in report["unmeasured"])
    assert any(line.startswith("nvjpeg.") for line in report["unmeasured"])  # no GPU here: said, not hidden


@pytest.mark.slow
def test_environment_is_read_from_this_machine(smoke):
    env = smoke[0]["sections"]["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["cpu_cores"] >= 1
    assert env["matmul_tflops"] > 0 and env["packages"]["deepspeed"] and env["packages"]["timm"]
    assert env["bf16_peak_tflops"] is None and "no CUDA" in env["not_measured"]["bf16_peak_tflops"]


@pytest.mark.slow
def test_precision_compares_bf16_with_fp32_features(smoke):
    precision = smoke[0]["sections"]["precision"]
    assert "synthetic training shards" in precision["inputs"]
    rerun = precision["modes"]["fp32_rerun"]  # fp32 against the fp32 reference: the comparison itself is sound
    for stream in ("semantic", "motion"):
        assert rerun[stream]["cos_min"] >= 0.9999 and rerun[stream]["rel_err"] < 1e-4
    for mode in ("cast_bf16", "autocast_bf16"):
        for stream in ("semantic", "motion"):
            figures = precision["modes"][mode][stream]
            assert gpu_check.FAITHFUL_COS <= figures["cos_min"] <= figures["cos_mean"] <= 1.0 + 1e-6
            assert 0 < figures["max_abs_err"] < figures["ref_max_abs"]
        assert precision["modes"][mode]["ms_per_batch"] > 0 and precision["modes"][mode]["dtype_out"] == "float32"
    assert precision["today"] == "fp32" and precision["kept"] in ("cast_bf16", "autocast_bf16")


@pytest.mark.slow
def test_throughput_variants_sweep_and_flops(smoke):
    throughput = smoke[0]["sections"]["throughput"]
    flops = throughput["flops_per_clip"]
    assert flops["backbones_forward"] > 0 and flops["head_step"] > 0
    assert flops["total"] == pytest.approx(flops["backbones_forward"] + flops["head_step"], rel=1e-4)
    names = [row["name"] for row in throughput["variants"]]
    assert names[:2] == ["today", "cast_bf16"] and "today_again" in names and "channels_last" in names
    for row in throughput["variants"]:
        assert "error" not in row, row
        assert row["clips_per_s"] > 0 and row["step_ms"] > 0 and row["speedup"] > 0
        assert row["semantic_cos_min"] >= gpu_check.FAITHFUL_COS and row["motion_cos_min"] >= gpu_check.FAITHFUL_COS
    today = throughput["variants"][0]
    assert today["precision"] == "fp32" and today["semantic_cos_min"] >= 0.9999 and today["motion_cos_min"] >= 0.9999
    assert set(throughput["kept"]) == {"precision", "channels_last", "attention", "cudnn_benchmark"}
    for path, rows in throughput["sweep"].items():
        assert [row["batch"] for row in rows] == list(gpu_check.CPU_PLAN.batch_sizes)
        for row in rows:
            assert row["clips_per_s"] > 0 and row["peak_memory_gib"] > 0 and row["achieved_tflops"] > 0
            assert row["mfu"] is None and row["of_measured_matmul"] > 0
    assert throughput["best_clips_per_s"] == max(row["clips_per_s"] for rows in throughput["sweep"].values() for row in rows)
    assert throughput["today_at_micro_batch"]["batch"] == gpu_check.CPU_PLAN.micro_batch


@pytest.mark.slow
def test_latency_of_one_clip(smoke):
    latency = smoke[0]["sections"]["latency"]
    assert latency["clip_span_s"] == pytest.approx(16 / gpu_check.SSV2_FPS, rel=1e-4)
    for row in latency["paths"]:
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] and row["top5_shape"] == [1, 5]
        assert row["realtime_factor"] == pytest.approx(latency["clip_span_s"] * 1000 / row["median_ms"], rel=1e-3)


@pytest.mark.slow
def test_nvjpeg_section_measures_the_cpu_side(smoke):
    nvjpeg = smoke[0]["sections"]["nvjpeg"]
    assert nvjpeg["gpu_decode"] is None and nvjpeg["equality"] is None and "nvJPEG" in nvjpeg["not_measured"]["gpu_decode"]
    assert nvjpeg["clips"] == smoke[0]["sections"]["data"]["train_clips"]
    assert [row["workers"] for row in nvjpeg["cpu_decode"]] == list(gpu_check.CPU_PLAN.nvjpeg_workers)
    assert all(row["clips_per_s"] > 0 for row in nvjpeg["cpu_decode"])
    # data.decode gpu's bytes-only path, decoded on the CPU by torchvision: the same pixels as simplejpeg
    bytes_path = nvjpeg["bytes_path_on_cpu"]
    assert bytes_path["same_clips"] and bytes_path["within_jpeg_tolerance"] and bytes_path["clips_per_s"] > 0
    assert bytes_path["pixels"] == nvjpeg["clips"] * 16 * 3 * 56 * 56
    assert nvjpeg["cpu_fallback_clips"] == 0  # the bytes path really decoded them (not the loader's silent fallback)
    decoders = nvjpeg["decoders"]  # the decoders alone, on whole stored frames
    assert decoders["frames"] > 0 and decoders["within_jpeg_tolerance"] and decoders["frames_per_s"] > 0
    assert decoders["sizes"] and all(size[0] == smoke[0]["sections"]["data"]["short_side"] for size in decoders["sizes"])


@pytest.mark.slow
def test_training_run_checkpoints_and_resumes(smoke):
    training = smoke[0]["sections"]["training"]
    first, total = gpu_check.CPU_PLAN.train_steps
    assert training["command"].startswith("deepspeed --num_gpus 1 ") and "launch/train.py --deepspeed" in training["command"]
    assert [run["exit"] for run in training["runs"]] == [0, 0]
    assert training["runs"][0]["latest_checkpoint"] == f"step{first:08d}" and training["runs"][1]["resumed_at_step"] == first
    assert training["steps_logged"] == list(range(1, total + 1))  # the resumed run neither repeats nor skips a step
    assert training["resumed"] and training["head_pt"] and f"step{total:08d}" in training["checkpoints"]
    assert training["clips_per_s"] > 0 and training["val_rows"] >= 2 and "1 rank(s) on cpu" in training["device_line"]
    assert training["bf16"] is False  # DeepSpeed's bf16 is turned off on CPU


@pytest.mark.slow
def test_loader_against_the_model(smoke):
    report = smoke[0]
    loader = report["sections"]["loader"]
    assert loader["rows"] and all(row["clips_per_s"] > 0 for row in loader["rows"])
    assert loader["bottleneck"] in ("loader", "model") and loader["cpu_cores_per_gpu"] >= 1
    model = loader["model_clips_per_s"]["today_at_micro_batch"]
    assert model == report["sections"]["throughput"]["today_at_micro_batch"]["clips_per_s"]
    expected = "loader" if loader["best_clips_per_s"] < model else "model"
    assert loader["bottleneck"] == expected and report["verdict"]["bottleneck"] == expected
    # data.resize_on: device, with the CPU as the device: the same keys and the very same pixels
    crop = loader["device_crop"]
    assert crop["same_keys"] and crop["clips_on"] == "cpu" and crop["pixels_max_abs_difference"] == 0
    assert crop["rows"] and all(row["resize_on"] == "device" and row["clips_per_s"] > 0 for row in crop["rows"])
    assert loader["verdicts"]["today_at_micro_batch"]["cpu_cores_per_gpu_device_crop"] >= 1
    # rows with workers: their CPU a clip, and every batch handed over through the shared regions
    with_workers = [row for row in loader["rows"] + crop["rows"] if row["workers"]]
    assert with_workers and all(row["worker_cpu_ms_per_clip"] > 0 and row["frame_slot_misses"] == 0 for row in with_workers)
    assert "worker CPU ms/clip" in (smoke[1] / "gpu_check.md").read_text()


@pytest.mark.slow
def test_compile_ran_in_its_child(smoke):
    compiled = smoke[0]["sections"]["compile"]
    assert compiled["backend"] == gpu_check.CPU_PLAN.compile_backend and compiled["compile_s"] > 0
    assert compiled["eager_clips_per_s"] > 0 and compiled["compiled_clips_per_s"] > 0 and compiled["faithful"]
    assert compiled["speedup"] == pytest.approx(compiled["compiled_clips_per_s"] / compiled["eager_clips_per_s"], rel=1e-3)


# ----------------------------------------------------------------------------- failures are recorded, not fatal


def test_a_failing_or_starved_section_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    def broken(ctx, record, budget):
        record["partial"] = 1.0
        raise RuntimeError("CUDA error: out of memory")

    def slow(ctx, record, budget):
        record["clips_per_s"] = 1.0
        time.sleep(2.5)  # past its budget: what is left is less than the next section needs

    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "environment", broken)
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "precision", slow)
    budgets = {"environment": (10, 0), "precision": (10, 0), "latency": (10, 3)}
    plan = gpu_check.dataclasses.replace(gpu_check.CPU_PLAN, budget_s=4.0, budgets=budgets)
    ctx = gpu_check.Context(plan, tmp_path, tmp_path / "work", torch.device("cpu"))
    check = gpu_check.Check(ctx, ["environment", "precision", "latency"], "test")
    check.run()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    environment, precision, latency = (report["sections"][name] for name in ("environment", "precision", "latency"))
    assert environment["status"] == "error" and "out of memory" in environment["error"] and environment["partial"] == 1.0
    assert precision["status"] == "ok" and precision["clips_per_s"] == 1.0
    assert latency["status"] == "skipped" and "budget" in latency["error"]
    assert any(line.startswith("environment: error") for line in report["unmeasured"])
    assert "| environment | error |" in (tmp_path / "gpu_check.md").read_text()


def test_the_watchdog_writes_what_was_measured_and_stops_a_runaway_section(tmp_path):
    code = textwrap.dedent(f"""
        import time, torch
        from launch import gpu_check
        def measured(ctx, record, budget):
            record["figure"] = 2.0
        def hangs(ctx, record, budget):
            record["started"] = True
            time.sleep(120)
        gpu_check.SECTION_FUNCTIONS.update(environment=measured, precision=hangs)
        plan = gpu_check.dataclasses.replace(gpu_check.CPU_PLAN, budget_s=3.0, budgets={{"environment": (1, 0), "precision": (1, 0)}})
        ctx = gpu_check.Context(plan, gpu_check.Path({str(tmp_path)!r}), gpu_check.Path({str(tmp_path / 'work')!r}), torch.device("cpu"))
        check = gpu_check.Check(ctx, ["environment", "precision"], "test")
        gpu_check.watchdog(check, 4.0)
        check.run()
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["environment"] == {**report["sections"]["environment"], "status": "ok", "figure": 2.0}
    hung = report["sections"]["precision"]
    assert hung["status"] == "error" and "ran past" in hung["error"] and hung["started"] is True


# ----------------------------------------------------------------------------- pure parts


def test_bf16_peaks_match_the_device_names_torch_reports():
    assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == (989.4, "H100")  # the SXM part
    assert gpu_check.bf16_peak("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_check.bf16_peak("NVIDIA H200")[0] == 989.4 and gpu_check.bf16_peak("NVIDIA GH200 480GB")[1] == "GH200"
    assert gpu_check.bf16_peak("NVIDIA H20")[0] == 148.0
    assert gpu_check.bf16_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert gpu_check.bf16_peak("Tesla T4") == (None, None)


def test_feature_and_pixel_comparisons():
    reference = torch.randn(2, 8, 16)
    same = gpu_check.compare_features(reference, reference.clone())
    assert same["cos_min"] == pytest.approx(1.0) and same["max_abs_err"] == 0
    noisy = gpu_check.compare_features(reference, reference + 0.5 * torch.randn_like(reference))
    assert noisy["cos_min"] < 0.99 and noisy["rel_err"] > 0.1
    clips = torch.randint(0, 256, (3, 4, 3, 8, 8), dtype=torch.uint8)
    assert gpu_check.pixel_difference(clips, clips)["within_jpeg_tolerance"]
    shifted = gpu_check.pixel_difference(clips, (clips.int() + 3).clamp(0, 255).to(torch.uint8))
    assert shifted["p99_abs"] == 3 and shifted["max_abs"] == 3 and not shifted["within_jpeg_tolerance"]
    assert gpu_check.pixel_difference(clips, 255 - clips)["mean_abs"] > 50


def fake_wheels(folder: Path, names: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"0" * 1000)
    return folder


def expected_wheel_names() -> list[str]:
    names = []
    for requirement in gpu_check.bundle_requirements("downloads") + gpu_check.bundle_requirements("built"):
        name, version = requirement.split("==")
        tag = "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64" if name in ("pydantic-core", "simplejpeg") else "py3-none-any"
        tag = "cp311-abi3-manylinux_2_28_x86_64" if name == "av" else tag
        names.append(f"{name.replace('-', '_')}-{version}-{tag}.whl")
    return names


def test_the_decoders_alone_take_frames_of_several_sizes(tmp_path):
    """The H100 run's shard held clips 320 and 352 px wide: the decoder comparison stacked them
    and failed. Frames of mixed sizes are compared frame by frame."""
    import types

    import numpy as np
    import simplejpeg
    import webdataset as wds

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for index, width in enumerate((32, 48, 32)):
            pixels = rng.integers(0, 256, (24, width, 3), dtype=np.uint8)
            sink.write({"__key__": f"clip{index}", "000.jpg": simplejpeg.encode_jpeg(pixels, quality=90)})
    shardset = types.SimpleNamespace(url=str(tmp_path), shards=["shard-000000.tar"])
    result = gpu_check.decoder_difference(shardset, torch.device("cpu"), 64)
    assert result["frames"] == 3 and result["sizes"] == [[24, 32], [24, 48]]
    assert result["pixels"] == 24 * (32 + 48 + 32) * 3 and result["within_jpeg_tolerance"]


def test_bundle_check_finds_missing_duplicate_foreign_and_unfit_wheels(tmp_path):
    good = expected_wheel_names()
    problems, sizes = gpu_check.wheel_problems(fake_wheels(tmp_path / "good", good))
    assert problems == [] and len(sizes) == len(gpu_check.BUNDLE)
    deepspeed = next(name for name in good if name.startswith("deepspeed-"))
    bad = [name for name in good if name != deepspeed and not name.startswith("av-")]
    bad += ["av-17.0.0-cp311-abi3-manylinux_2_28_x86_64.whl", "av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl",
            "boto3-1.0-py3-none-any.whl", "simplejpeg-9.9-cp313-cp313-macosx_11_0_arm64.whl"]
    problems, _ = gpu_check.wheel_problems(fake_wheels(tmp_path / "bad", bad))
    text = "\n".join(problems)
    assert "deepspeed==" in text and "missing" in text
    assert "av: 2 wheels" in text and "boto3-1.0-py3-none-any.whl: not in the bundle" in text
    assert "simplejpeg-9.9-cp313-cp313-macosx_11_0_arm64.whl: does not install on CPython 3.12" in text


def test_the_device_command_fits_one_call_and_is_documented():
    command = gpu_check.DEVICE_COMMAND
    assert len(command) <= 2000 and "--target /tmp/site .whl/*.whl" in command and "launch.gpu_check --out $OUT" in command
    assert command in (REPO / "README.md").read_text() and command in gpu_check.__doc__
    assert "gpu-bundle:" in (REPO / "Makefile").read_text() and "/.whl/" in (REPO / ".gitignore").read_text().splitlines()


def test_everything_the_project_imports_is_on_the_gpu_machine_or_in_the_bundle():
    """A new third-party import in fusion/, launch/ or sharding/ must be in the GPU image or in
    the bundle (launch/gpu_check.py), or the one GPU call fails on an ImportError."""
    import re

    statement = re.compile(r"^(\s*)(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.MULTILINE)
    known = set(gpu_check.IMAGE_MODULES) | set(gpu_check.BUNDLE_MODULES)
    unknown, top_level_s3 = set(), set()
    for folder in ("fusion", "launch", "sharding"):
        for path in (REPO / folder).rglob("*.py"):
            for indent, first, second in statement.findall(path.read_text()):
                module = (first or second).split(".")[0]
                if module in sys.stdlib_module_names or module in ("fusion", "launch", "sharding", "__future__"):
                    continue
                if module in gpu_check.S3_ONLY_MODULES:
                    if not indent:
                        top_level_s3.add(f"{path.relative_to(REPO)}: {module}")
                elif module not in known:
                    unknown.add(f"{path.relative_to(REPO)}: {module}")
    assert not unknown, f"imports neither on the GPU machine nor in the bundle: {sorted(unknown)}"
    assert not top_level_s3, f"boto3/botocore are not carried: import them where s3:// is used only: {sorted(top_level_s3)}"
    assert {name.replace("-", "_") for name, _ in gpu_check.BUNDLE} <= set(gpu_check.BUNDLE_MODULES)
