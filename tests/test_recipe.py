"""The training recipe as a researcher would report it: which parameters AdamW decays, the
learning rate of the first steps, the activation CLIP's weights need, and the backbones'
dtype on GPUs without bf16.

The optimizer and schedule are checked on a real DeepSpeed ZeRO-2 engine (one CPU rank in
this process, gloo), built by the same :func:`launch.distributed.wrap_head` the training uses.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusion.backbones import SemanticConfig, build_semantic
from fusion.backbones.weights import RandomWeightsWarning
from fusion.config import ConfigError, load
from fusion.model import ModelConfig, build_model, format_report, parameter_report, resolve_dtype
from launch import distributed

REPO = Path(__file__).resolve().parents[1]
DEBUG_MODEL = dict(size="debug", dim=64, heads=4)


def repo_ds_config(total_steps: int) -> dict:
    """The repo's ds.json as train.py hands it to DeepSpeed on a CPU run."""
    ds_json = json.loads((REPO / "ds.json").read_text())
    return distributed.adapt_ds_config(ds_json, total_steps=total_steps, gpu=False, log=lambda _: None)


def debug_head(fusion: str = "xattn"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        torch.manual_seed(0)
        return build_model(ModelConfig(fusion=fusion, **DEBUG_MODEL)).head


@pytest.mark.parametrize("fusion", ["xattn", "concat", "motion_only"])
def test_weight_decay_skips_norms_biases_and_time_embeddings(one_rank, fusion):
    head = debug_head(fusion)
    config = repo_ds_config(total_steps=100)
    messages: list[str] = []
    engine = distributed.wrap_head(head, config, log=messages.append)
    decay = config["optimizer"]["params"]["weight_decay"]
    assert decay > 0
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    # ZeRO's optimizer groups hold flattened partitions: map them back through its bit16 groups
    groups = engine.optimizer.bit16_groups
    decayed, plain = set(), set()
    for group, params in zip(engine.optimizer.param_groups, groups):
        (decayed if group["weight_decay"] > 0 else plain).update(name_of[id(p)] for p in params)
        assert group["weight_decay"] in (0.0, decay)
    every = {n for n, p in head.named_parameters() if p.requires_grad}
    assert decayed | plain == every and not decayed & plain
    assert all(n.endswith(".time_embed") or n.endswith(".bias") or engine.module.get_parameter(n).ndim == 1 for n in plain)
    assert {n for n in every if n.endswith(".time_embed")} <= plain
    assert all(engine.module.get_parameter(n).ndim == 2 and not n.endswith("time_embed") for n in decayed)
    assert any(".norm" in n for n in plain) and any(n.endswith(".bias") for n in plain)
    assert any(f"on {len(decayed)} weight matrices; none on {len(plain)}" in m for m in messages)


def test_parameter_report_shows_the_weight_decay_split():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_model(ModelConfig(**DEBUG_MODEL))
    report = parameter_report(model)
    split = report["weight_decay"]
    assert split["decayed"]["params"] + split["not_decayed"]["params"] == report["trainable"]
    assert split["not_decayed"]["tensors"] > 0 and split["decayed"]["tensors"] > 0
    assert f"off on {split['not_decayed']['tensors']} norm, bias and time-embedding tensors" in format_report(report)


def test_the_first_optimizer_step_learns(one_rank):
    total = 40
    config = repo_ds_config(total_steps=total)
    params = config["scheduler"]["params"]
    warmup, peak = params["warmup_num_steps"], config["optimizer"]["params"]["lr"]
    assert params["warmup_type"] == "linear" and params["warmup_min_ratio"] == 0.0 and warmup == 4
    head = debug_head()
    engine = distributed.wrap_head(head, config)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    rates = []
    for step in range(total):
        semantic = torch.randn(2, 8, head.semantic_proj.proj.in_features)
        motion = torch.randn(2, 4, head.motion_proj.proj.in_features)
        loss = F.cross_entropy(engine(semantic, motion), torch.tensor([0, 1]))
        engine.backward(loss)
        rates.append(engine.get_lr()[0])  # the rate this step uses
        engine.step()
        if step == 0:
            moved = [n for n, p in engine.module.named_parameters() if not torch.equal(p, before[n])]
            assert moved, "the first optimizer step changed no weight"
    # linear warm-up: the first step already has 1/W of the peak; step W reaches it
    assert rates[:warmup] == pytest.approx([peak * (k + 1) / warmup for k in range(warmup)])
    assert max(rates) == pytest.approx(peak) and rates[-1] == pytest.approx(peak * params["cos_min_ratio"])
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1 :]))
    assert len({group["lr"] for group in engine.optimizer.param_groups}) == 1  # both decay groups follow it


def test_warmup_cosine_matches_its_definition_and_checks_its_keys():
    ratio = distributed.warmup_cosine_ratio
    assert ratio(0, total_num_steps=100, warmup_num_steps=10, warmup_type="linear") == pytest.approx(0.1)
    assert ratio(9, total_num_steps=100, warmup_num_steps=10, warmup_type="linear") == pytest.approx(1.0)
    assert ratio(0, total_num_steps=100, warmup_num_steps=10) == pytest.approx(math.log(2) / math.log(11))  # log warm-up
    assert ratio(54, total_num_steps=100, warmup_num_steps=10, cos_min_ratio=0.0) == pytest.approx(0.5)
    assert ratio(500, total_num_steps=100, warmup_num_steps=10, cos_min_ratio=0.01) == pytest.approx(0.01)
    assert ratio(0, total_num_steps=100, warmup_num_steps=10, warmup_min_ratio=0.5, warmup_type="linear") == pytest.approx(0.55)
    with pytest.raises(ConfigError, match="has no parameter"):
        distributed.check_warmup_cosine({"total_num_steps": 10, "warmup_steps": 3})
    with pytest.raises(ConfigError, match="warmup_type"):
        distributed.check_warmup_cosine({"total_num_steps": 10, "warmup_type": "cubic"})
    with pytest.raises(ConfigError, match="total_num_steps must be a positive integer"):
        distributed.check_warmup_cosine({"warmup_num_steps": 3})


def test_other_schedulers_are_left_to_deepspeed():
    config = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}
    assert distributed.split_scheduler(config) == (config, None)
    kept, params = distributed.split_scheduler({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 5}}, "x": 1})
    assert kept == {"x": 1} and params == {"total_num_steps": 5}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation, as its reference code defines it."""
    return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize("size", ["debug", "full"])
def test_clip_uses_quickgelu_in_every_block(size):
    with warnings.catch_warnings(), torch.device("meta" if size == "full" else "cpu"):
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_semantic(SemanticConfig(name="clip_vitb16", img_size=64), size)
    blocks = list(model.vit.blocks)
    assert len(blocks) == (12 if size == "full" else 2)
    x = torch.linspace(-6, 6, 1001)
    for index, block in enumerate(blocks):
        act = block.mlp.act  # parameter-free: it runs on a CPU tensor even in a meta-device model
        assert torch.allclose(act(x), quick_gelu(x), atol=1e-6), f"block {index}: not QuickGELU"
        assert not torch.allclose(act(x), F.gelu(x), atol=1e-3), f"block {index}: GELU"


def test_dinov2_keeps_gelu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_semantic(SemanticConfig(name="dinov2_vits14", img_size=56), "debug")
    x = torch.linspace(-6, 6, 1001)
    assert all(torch.allclose(block.mlp.act(x), F.gelu(x), atol=1e-6) for block in model.vit.blocks)


@pytest.mark.parametrize("capability,expected", [((7, 0), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16),
                                                 ((9, 0), torch.bfloat16)])
def test_auto_dtype_needs_a_gpu_with_bf16(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("auto", "cuda:0") == expected
    messages = [str(w.message) for w in caught]
    if expected == torch.float32:
        assert any(f"compute capability {capability[0]}.{capability[1]}, without bf16" in m for m in messages)
    else:
        assert not messages
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bf16", "cuda:0") == torch.bfloat16


def test_deterministic_switch_turns_on_deterministic_kernels(monkeypatch):
    from launch.train import RunConfig, deterministic_kernels

    cfg, _ = load(RunConfig, None, ["--train.deterministic", "true"])
    assert cfg.train.deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic


def test_the_whole_training_state_moves_into_another_engine(one_rank):
    """What a resume on another number of ranks loads: fp32 masters, AdamW's moments and
    step, the schedule and DeepSpeed's counters. Put into a fresh engine, the next step is the
    very step the first engine takes."""
    config = repo_ds_config(total_steps=20)
    head = debug_head()
    width_s, width_m = head.semantic_proj.proj.in_features, head.motion_proj.proj.in_features
    generator = torch.Generator().manual_seed(3)

    def batch():
        return (torch.randn(2, 8, width_s, generator=generator), torch.randn(2, 4, width_m, generator=generator),
                torch.tensor([0, 1]))

    def step(engine, semantic, motion, labels):
        engine.backward(F.cross_entropy(engine(semantic, motion), labels))
        engine.step()

    first = distributed.wrap_head(head, config)
    for _ in range(3):
        step(first, *batch())
    whole = distributed.whole_training_state(first, {"note": "client"})
    assert whole["optimizer_step"] == 3 and whole["global_steps"] == 3 and whole["moments"] == ["exp_avg", "exp_avg_sq"]
    assert all(entry["exp_avg"].abs().sum() > 0 for entry in whole["params"].values())

    second = distributed.wrap_head(debug_head(), repo_ds_config(total_steps=20))  # other weights, no state yet
    distributed.load_whole_training_state(second, whole)
    again = distributed.whole_training_state(second, {"note": "client"})
    for name, entry in whole["params"].items():
        for key, value in entry.items():
            assert torch.equal(again["params"][name][key], value), (name, key)
    assert again["scheduler"] == whole["scheduler"] and second.get_lr() == first.get_lr()

    same = batch()
    for engine in (first, second):
        torch.manual_seed(11)  # the same dropout masks
        step(engine, *same)
    for (name, a), (_, b) in zip(first.module.named_parameters(), second.module.named_parameters()):
        assert torch.equal(a, b), name
