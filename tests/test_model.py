"""The model: the head trains and the backbones never change, every ablation switch builds and
runs, attention weights come back well formed, the default stays under 20M trainable
parameters, and the ``python -m fusion`` report works from the command line.

Everything runs at debug size (tiny backbones from the real builders) except the one check of
the full default config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusion.__main__ import ModelSection, main
from fusion.backbones import MOTION_NAMES, SEMANTIC_NAMES
from fusion.config import ConfigError, from_dict, load
from fusion.heads import FUSIONS, FusionHead
from fusion.model import FusionClassifier, ModelConfig, build_model, parameter_report, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
SHIPPED_CONFIGS = sorted(CONFIGS.glob("*.yaml"))

pytestmark = pytest.mark.filterwarnings("ignore::fusion.backbones.weights.RandomWeightsWarning")


def model_config(name: str = "debug", **changes: object) -> ModelConfig:
    """The ``model:`` section of a shipped config, with ``changes`` applied."""
    section, _ = load(ModelSection, CONFIGS / f"{name}.yaml", sections={"model"})
    return dataclasses.replace(section.model, **changes)


def random_clips(batch: int = 2, frames: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, generator=generator)


def check_attention(attention: dict[str, list[torch.Tensor]], cfg: ModelConfig, batch: int, frames: int, segments: int) -> None:
    """Per layer and direction [B, heads, Tq, Tk] tensors whose rows are distributions: the
    within-stream blocks of every variant, the cross-attention of xattn's fusion blocks."""
    two_streams = {"semantic_self": ((batch, cfg.heads, frames, frames), 1),
                   "motion_self": ((batch, cfg.heads, segments, segments), 1)}
    shapes = {
        "xattn": {**two_streams,
                  "semantic_queries_motion": ((batch, cfg.heads, frames, segments), 1),
                  "motion_queries_semantic": ((batch, cfg.heads, segments, frames), 1)},
        "concat": two_streams,
        "elementwise": two_streams,
        # a single stream's fusion block is a second self-attention: two maps per layer
        "semantic_only": {"self": ((batch, cfg.heads, frames, frames), 2)},
        "motion_only": {"self": ((batch, cfg.heads, segments, segments), 2)},
    }[cfg.fusion]
    assert set(attention) == set(shapes)
    for direction, (shape, per_layer) in shapes.items():
        assert len(attention[direction]) == per_layer * cfg.layers
        for weights in attention[direction]:
            assert weights.shape == shape
            assert (weights >= 0).all()
            torch.testing.assert_close(weights.sum(dim=-1), torch.ones(shape[:-1]))


# ---- training touches the head only ------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_head_parameter_gets_a_gradient_and_no_backbone_parameter_does(fusion: str) -> None:
    torch.manual_seed(0)
    # two layers and attention pooling, so the last layer and the pooling scores must feed the loss
    model = build_model(model_config(fusion=fusion, layers=2, pool="attn"))
    model.train()
    loss = F.cross_entropy(model(random_clips()), torch.tensor([3, 5]))
    loss.backward()
    for name, param in model.head.named_parameters():
        assert param.grad is not None, f"head.{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"head.{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"head.{name} has an all-zero gradient"
    for name, param in model.backbones.named_parameters():
        assert not param.requires_grad and param.grad is None, f"backbones.{name} got a gradient"


def test_backbones_are_bit_identical_after_adamw_steps_and_stay_in_eval() -> None:
    torch.manual_seed(0)
    model = build_model(model_config())
    backbone_before = {k: v.clone() for k, v in model.backbones.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    # all parameters on purpose: weight decay would move a backbone weight that had slipped through
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    assert model.head.training
    assert not any(m.training for m in model.backbones.modules()), "a backbone module left eval mode"
    clips, labels = random_clips(seed=1), torch.tensor([0, 173])
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(clips), labels).backward()
        optimizer.step()
    # state_dict covers the BatchNorm running statistics too, which train mode would update
    for key, value in model.backbones.state_dict().items():
        assert torch.equal(value, backbone_before[key]), f"backbones.{key} changed"
    changed = [k for k, v in model.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert changed, "the optimizer moved no head parameter"


# ---- every ablation switch builds and runs -----------------------------------------------

DEFAULT_CASE = {"fusion": "xattn", "heads": 8, "semantic": "dinov2_vits14", "motion": "i3d_r50", "frames": 8, "size": 64}
AXES = {
    "fusion": FUSIONS,
    "heads": (4, 8, 16),
    "semantic": SEMANTIC_NAMES,
    "motion": MOTION_NAMES,
    "frames": (8, 16),
    "size": (64, 96),
}
# every value of every axis once, the other axes at their defaults (not the cartesian product)
CASES = [DEFAULT_CASE] + [
    {**DEFAULT_CASE, axis: value} for axis, values in AXES.items() for value in values if value != DEFAULT_CASE[axis]
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_variant_builds_and_runs(case: dict[str, object]) -> None:
    torch.manual_seed(0)
    base = model_config()
    cfg = dataclasses.replace(
        base,
        fusion=case["fusion"],
        heads=case["heads"],
        semantic=dataclasses.replace(base.semantic, name=case["semantic"]),
        motion=dataclasses.replace(base.motion, name=case["motion"]),
    )
    model = build_model(cfg).eval()
    clips = random_clips(frames=case["frames"], size=case["size"])
    semantic, motion = model.features(clips)
    assert semantic.dtype == motion.dtype == torch.float32
    assert semantic.shape == (2, case["frames"], model.backbones.semantic.out_dim)
    assert motion.shape[0] == 2 and motion.shape[2] == model.backbones.motion.out_dim
    assert 1 <= motion.shape[1] <= case["frames"]
    with torch.no_grad():
        logits = model(clips)
        logits_with_weights, attention = model(clips, return_attention=True)
    assert logits.shape == (2, cfg.num_classes) and torch.isfinite(logits).all()
    # the fused-kernel path and the explicit-weights path compute the same function
    torch.testing.assert_close(logits_with_weights, logits, rtol=1e-4, atol=1e-5)
    check_attention(attention, cfg, batch=2, frames=case["frames"], segments=motion.shape[1])


@pytest.mark.parametrize("fusion", ["xattn", "motion_only"])
def test_attention_weights_per_layer_and_direction(fusion: str) -> None:
    torch.manual_seed(0)
    cfg = model_config(fusion=fusion, layers=3, heads=4)
    head = FusionHead(cfg, semantic_dim=24, motion_dim=40).eval()
    semantic, motion = torch.randn(3, 8, 24), torch.randn(3, 5, 40)
    logits, attention = head(semantic, motion, return_attention=True)
    assert logits.shape == (3, cfg.num_classes)
    check_attention(attention, cfg, batch=3, frames=8, segments=5)
    assert isinstance(head(semantic, motion), torch.Tensor)


def test_head_accepts_fp32_features_when_it_runs_in_bf16() -> None:
    head = FusionHead(model_config(), semantic_dim=24, motion_dim=40).to(torch.bfloat16)
    logits = head(torch.randn(2, 8, 24), torch.randn(2, 4, 40))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_sequences_longer_than_the_time_embeddings_are_refused() -> None:
    head = FusionHead(model_config(max_time=8), semantic_dim=24, motion_dim=40)
    with pytest.raises(ValueError, match="model.max_time"):
        head(torch.randn(1, 9, 24), torch.randn(1, 4, 40))


# ---- frozen backbones and dtypes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("auto", torch.device("cuda", 1), torch.bfloat16),
        ("fp32", "cuda", torch.float32),
        ("bf16", "cpu", torch.bfloat16),
    ],
)
def test_resolve_dtype(name: str, device: str | torch.device, expected: torch.dtype, monkeypatch) -> None:
    # an H100's capability, faked: the choice needs no GPU (older GPUs: tests/test_recipe.py)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_dtype(name, device) is expected


def test_bf16_backbones_return_fp32_features() -> None:
    model = build_model(model_config(dtype="bf16"))
    assert model.backbones.dtype is torch.bfloat16
    assert all(p.dtype is torch.float32 for p in model.head.parameters())
    semantic, motion = model.features(random_clips(batch=1))
    assert semantic.dtype == motion.dtype == torch.float32
    assert torch.isfinite(model(random_clips(batch=1))).all()


# ---- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"heads": 7}, "model.heads=7 does not divide model.dim=512"),
        ({"dim": 100, "heads": 8}, "model.heads=8 does not divide model.dim=100"),
        ({"layers": 0}, "model.layers must be at least 1"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"fusion": "sum"}, "model.fusion: 'sum' is not one of"),
        ({"semantic": {"name": "resnet50"}}, "resnet50"),
    ],
)
def test_bad_model_values_are_config_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, changes, prefix="model.")


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_has_a_valid_model_section(path: Path) -> None:
    section, rest = load(ModelSection, path, [], sections={"model"})
    assert rest == []
    assert isinstance(section.model, ModelConfig)
    if section.model.size == "debug":
        model = build_model(section.model).eval()
        with torch.no_grad():
            assert model(random_clips(batch=1)).shape == (1, section.model.num_classes)


def test_the_config_offers_exactly_the_fusions_the_head_builds() -> None:
    assert typing.get_args(typing.get_type_hints(ModelConfig)["fusion"]) == FUSIONS


def test_shipped_configs_include_default_and_debug() -> None:
    assert {"default.yaml", "debug.yaml"} <= {p.name for p in SHIPPED_CONFIGS}
    assert model_config("default").size == "full"
    assert model_config("debug").size == "debug"


# ---- the real size and the parameter report ----------------------------------------------


@pytest.fixture(scope="module")
def full_default_model() -> FusionClassifier:
    """The full-size default config (random weights: ~50M backbone parameters, built once)."""
    return build_model(model_config("default"))


def test_full_default_trains_under_20m_parameters_and_the_report_adds_up(full_default_model: FusionClassifier) -> None:
    model = full_default_model
    report = parameter_report(model)
    head = sum(p.numel() for p in model.head.parameters())
    backbones = sum(p.numel() for p in model.backbones.parameters())
    assert report["trainable"] == head < 20_000_000
    assert report["frozen"] == backbones
    assert report["total"] == head + backbones
    rows = {row["module"]: row for row in report["modules"]}
    assert rows["backbones.semantic"]["trainable"] == rows["backbones.motion"]["trainable"] == 0
    assert rows["head"]["frozen"] == 0
    sub_modules = [row for name, row in rows.items() if name.startswith("head.")]
    assert {"head.semantic_proj", "head.motion_proj", "head.semantic_layers", "head.motion_layers", "head.classifier"} <= set(rows)
    assert sum(row["total"] for row in sub_modules) == rows["head"]["total"]
    assert report["trainable_percent"] == pytest.approx(100 * head / (head + backbones), abs=1e-3)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fusion", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_json_report_matches_the_model(full_default_model: FusionClassifier) -> None:
    result = run_cli("--config", str(CONFIGS / "default.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"total", "trainable", "frozen"} <= set(report)
    assert report == json.loads(json.dumps(parameter_report(full_default_model)))


def test_cli_rejects_heads_that_do_not_divide_dim() -> None:
    result = run_cli("--config", str(CONFIGS / "default.yaml"), "--model.heads", "7")
    assert result.returncode != 0
    assert "model.heads=7 does not divide model.dim=512" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_table_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(CONFIGS / "debug.yaml"), "--model.fusion", "concat", "--model.heads", "4"]) == 0
    table = capsys.readouterr().out
    assert "fusion head (concat)" in table
    for label in ("semantic backbone (dinov2_vits14)", "motion backbone (i3d_r50)", "  semantic_layers", "all"):
        assert label in table


def test_cli_names_a_missing_weight_file_without_a_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "I3D_8x8_R50.pyth"
    assert main(["--config", str(CONFIGS / "debug.yaml"), "--model.motion.weights", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def _leaf_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            keys += _leaf_keys(type(default), f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def test_cli_help_lists_every_model_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    keys = _leaf_keys(ModelConfig, "--model.")
    assert {"--model.semantic.name", "--model.motion.weights", "--model.heads", "--model.fusion"} <= set(keys)
    missing = [key for key in keys if key + " " not in text]
    assert not missing, f"--help does not list {missing}"


def test_variants_share_everything_but_the_fusion_operator() -> None:
    """An ablation changes one thing: the two-stream variants have the same parameters (names
    and shapes) outside the fusion blocks' operators, and a single stream is exactly one of
    the two-stream heads' streams with the operator replaced by a second self-attention."""

    def shapes(fusion: str) -> dict[str, tuple[int, ...]]:
        torch.manual_seed(0)
        head = build_model(model_config(fusion=fusion, layers=2)).head
        return {name: tuple(param.shape) for name, param in head.named_parameters()}

    heads = {fusion: shapes(fusion) for fusion in FUSIONS}
    outside = {fusion: {k: v for k, v in params.items() if ".fuse.op." not in k} for fusion, params in heads.items()}
    assert outside["xattn"] == outside["concat"] == outside["elementwise"]
    assert any(".fuse.op." in name for name in heads["concat"])
    # the operators: attention 4 dim^2 per direction, the per-step mixes 3 dim^2
    dim = model_config().dim

    def operator_weights(fusion: str) -> int:
        return sum(math.prod(shape) for name, shape in heads[fusion].items() if ".fuse.op." in name and name.endswith("weight"))

    per_layer_direction = 2 * 2  # layers x directions
    assert operator_weights("xattn") == per_layer_direction * 4 * dim * dim
    assert operator_weights("concat") == operator_weights("elementwise") == per_layer_direction * 3 * dim * dim
    for single, stream in (("semantic_only", "semantic"), ("motion_only", "motion")):
        mine = {k: v for k, v in heads[single].items() if not k.startswith("classifier")}
        theirs = {k: v for k, v in heads["xattn"].items() if k.startswith(f"{stream}_") and ".fuse.norm_context" not in k}
        assert mine == theirs, single
