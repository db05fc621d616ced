"""The frozen backbones against their reference implementations and weight layouts.

- I3D R50 gives pytorchvideo's ``i3d_r50`` trunk output for the same weights, loaded from a
  ``.pyth`` file in pytorchvideo's layout; R(2+1)D gives torchvision's ``r2plus1d_18`` trunk output.
- DINOv2 weights in the original repository's layout (518-px position embedding, mask_token) and in
  timm's own layout give the features of timm's own loading of the same file.
- C3D loads the classic and mmaction2 layouts.
- Every choice x size runs at T in {8, 16} with the documented shapes, frozen and in eval mode.
- Missing or mismatching weight files are clear errors; no weights is a loud warning.

All models are random; nothing needs the network, a GPU or real weights.
"""

from __future__ import annotations

import os
import re
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fusion.backbones import (  # noqa: E402
    MOTION_NAMES,
    SEMANTIC_NAMES,
    MotionConfig,
    SemanticConfig,
    build_motion,
    build_semantic,
)
from fusion.backbones.weights import FrozenBackbone, RandomWeightsWarning, WeightsError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::fusion.backbones.weights.RandomWeightsWarning")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
FULL_OUT_DIMS = {
    "dinov2_vits14": 384,
    "clip_vitb16": 768,
    "vit_s16_sup": 384,
    "i3d_r50": 2048,
    "r2plus1d_18": 512,
    "c3d": 512,
}
TIME_STRIDE = {"i3d_r50": 2, "r2plus1d_18": 8, "c3d": 8}
PATCH = {"dinov2_vits14": 14, "clip_vitb16": 16, "vit_s16_sup": 16}
# full-size models run at a small size here to keep the tests fast: a 4x4 patch grid
FULL_RES = 48


def clips(batch: int, steps: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, steps, 3, size, size), dtype=torch.uint8, generator=generator)


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm distinct statistics and affine terms, so a swapped key changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            with torch.no_grad():
                module.weight.copy_(1 + 0.1 * torch.randn(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))


def video_input(frames: torch.Tensor, mean: float | tuple[float, ...], std: float | tuple[float, ...]) -> torch.Tensor:
    """The reference models' input: uint8 [B, T, 3, H, W] -> normalised float [B, 3, T, H, W]."""
    mean_t = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1, 1)
    return (frames.permute(0, 2, 1, 3, 4).float() / 255 - mean_t) / std_t


# --- I3D against pytorchvideo -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # inside pytorchvideo
def test_i3d_matches_pytorchvideo_and_loads_its_file(tmp_path: Path) -> None:
    pytest.importorskip("pytorchvideo")
    from pytorchvideo.models.hub import i3d_r50

    torch.manual_seed(0)
    reference = i3d_r50(pretrained=False).eval()
    randomise_norms(reference)
    path = tmp_path / "I3D_8x8_R50.pyth"
    torch.save({"model_state": reference.state_dict(), "epoch": 196}, path)

    ours = build_motion(MotionConfig(name="i3d_r50", weights=str(path)), "full")
    # same names: only the Kinetics classifier is left out, nothing is missing
    expected_keys = {k for k in reference.state_dict() if not k.startswith("blocks.6.")}
    assert set(ours.state_dict()) == expected_keys
    head_keys = {k for k in reference.state_dict() if k.startswith("blocks.6.")}
    assert head_keys == {"blocks.6.proj.weight", "blocks.6.proj.bias"}

    frames = clips(1, 8, 64)
    with torch.no_grad():
        x = video_input(frames, 0.45, 0.225)
        for block in reference.blocks[:-1]:  # the trunk: everything but the head
            x = block(x)
        expected = x.mean(dim=(3, 4)).transpose(1, 2)  # (B, T/2, 2048)
        got = ours(frames)
    assert got.shape == (1, 4, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frames", [1, 4, 16])
def test_i3d_stem_as_a_2d_conv_gives_the_3d_convs_output(frames: int) -> None:
    """On CUDA the stem runs its (5, 7, 7) conv as a 2-D conv over the temporal taps (cuDNN's
    bf16 3-D conv of 3 channels is 5x slower); it must be the same sums, edges in time included."""
    from fusion.backbones.i3d import Stem

    torch.manual_seed(0)
    stem = Stem(16).eval()
    x = torch.randn(2, 3, frames, 30, 38, dtype=torch.float64)
    stem = stem.double()
    with torch.no_grad():
        torch.testing.assert_close(stem.conv_as_2d(x), stem.conv(x), rtol=1e-10, atol=1e-10)


def test_stem_benchmark_runs_and_prints_every_form(capsys) -> None:
    from launch import bench_stem

    assert bench_stem.main(["--batch", "1", "--frames", "4", "--crop", "32", "--size", "debug", "--iterations", "1"]) == 0
    printed = capsys.readouterr().out
    for form in ("conv3d, channels padded to 8", "conv2d over temporal taps", "as built (conv3d on CPU)"):
        assert form in printed
    forms = printed.split("whole I3D")[0].splitlines()[2:]  # the first table's rows: ..., ms, ratio, error
    errors = [float(line.split()[-1]) for line in forms]
    assert len(errors) == 3 and max(errors) < 1e-5


def test_r2plus1d_matches_torchvision(tmp_path: Path) -> None:
    from torchvision.models.video import r2plus1d_18

    torch.manual_seed(0)
    reference = r2plus1d_18(weights=None).eval()
    randomise_norms(reference)
    path = tmp_path / "r2plus1d_18.pth"
    torch.save(reference.state_dict(), path)

    ours = build_motion(MotionConfig(name="r2plus1d_18", weights=str(path)), "full")
    frames = clips(1, 16, 32)
    mean, std = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
    with torch.no_grad():
        x = reference.stem(video_input(frames, mean, std))
        x = reference.layer4(reference.layer3(reference.layer2(reference.layer1(x))))
        expected = x.mean(dim=(3, 4)).transpose(1, 2)
        got = ours(frames)
    assert got.shape == (1, 2, 512)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- DINOv2 / timm layouts ----------------------------------------------------------------------

DINOV2_ORIGINAL_KEY = re.compile(
    r"^(cls_token|pos_embed|mask_token|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma)$"
)


@cache
def dinov2_518() -> nn.Module:
    """A random ViT-S/14 at DINOv2's training size (518 px, 37x37 grid), layer scales made large
    enough that every block matters (DINOv2's init of 1e-5 would hide wrong block weights)."""
    torch.manual_seed(0)
    # weight_init="skip" keeps torch's default (random) layer init and is much faster than timm's
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518, weight_init="skip"
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.2, 1.0)
        model.pos_embed.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
    return model.eval()


def timm_features(model: nn.Module, frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """timm's tokens for uint8 frames [B, T, 3, H, W] already at the model's size: [B*T, 1+N, D]."""
    with torch.no_grad():
        return model.forward_features((frames.flatten(0, 1).float() / 255 - mean) / std)


@pytest.mark.parametrize("layout", ["dinov2_original_pth", "timm_safetensors"])
def test_dinov2_file_gives_timm_features(tmp_path: Path, layout: str) -> None:
    state_dict = dinov2_518().state_dict()
    if layout == "dinov2_original_pth":
        path = tmp_path / "dinov2_vits14_pretrain.pth"
        original = {**state_dict, "mask_token": torch.randn(1, 384)}
        assert original["pos_embed"].shape == (1, 1370, 384)
        assert not [k for k in original if not DINOV2_ORIGINAL_KEY.match(k)]
        torch.save(original, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))

    ours = build_semantic(SemanticConfig(weights=str(path), img_size=112, patch_tokens=True), "full")
    reference = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=0,
        img_size=112,
        weight_init="skip",
    ).eval()
    # the 37x37 position grid was resampled to 8x8, by timm's own code in both
    assert ours.vit.pos_embed.shape == (1, 65, 384)
    torch.testing.assert_close(ours.vit.pos_embed, reference.pos_embed)

    frames = clips(1, 2, 112)
    tokens = timm_features(reference, frames, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        got = ours.forward_features(frames)
    torch.testing.assert_close(got["cls"], tokens[:, 0].unflatten(0, (1, 2)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["patch"], tokens[:, 1:].unflatten(0, (1, 2)), rtol=1e-4, atol=1e-4)
    assert got["patch"].shape == (1, 2, 64, 384)


def test_dinov2_filter_leaves_the_file_dict_alone() -> None:
    from fusion.backbones.semantic import dinov2_original_filter

    original = {**dinov2_518().state_dict(), "mask_token": torch.zeros(1, 384)}
    keys = set(original)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    converted = dinov2_original_filter(original, model)
    assert set(original) == keys  # pure: timm's converter pops mask_token from a copy
    assert "mask_token" not in converted and converted["pos_embed"].shape == (1, 257, 384)


def test_timm_classifier_head_is_dropped(tmp_path: Path) -> None:
    """A timm supervised ViT file carries its ImageNet head; the backbone keeps features only."""
    torch.manual_seed(0)
    reference = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=64, embed_dim=32, depth=2, num_heads=2
    ).eval()
    assert "head.weight" in reference.state_dict()
    path = tmp_path / "vit_s16.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    ours = build_semantic(SemanticConfig(name="vit_s16_sup", weights=str(path), img_size=64), "debug")
    frames = clips(2, 3, 64)
    half = torch.full((1, 3, 1, 1), 0.5)
    expected = timm_features(reference, frames, half, half)[:, 0].unflatten(0, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(ours(frames), expected, rtol=1e-4, atol=1e-4)


def test_semantic_resizes_frames_to_img_size() -> None:
    ours = build_semantic(SemanticConfig(img_size=56, patch_tokens=True), "debug")
    frames = clips(1, 2, 112)
    resized = nn.functional.interpolate(
        frames.flatten(0, 1).float(), size=(56, 56), mode="bilinear", align_corners=False, antialias=True
    )
    expected = timm_features(ours.vit, resized.clamp(0, 255).unsqueeze(0), IMAGENET_MEAN, IMAGENET_STD)
    # resizing before or after the (affine, per-channel) normalisation is the same up to rounding
    with torch.no_grad():
        got = ours.forward_features(frames)
    assert got["patch"].shape == (1, 2, 16, 32)
    torch.testing.assert_close(got["cls"], expected[:, 0].unflatten(0, (1, 2)), rtol=1e-3, atol=1e-3)


# --- C3D layouts --------------------------------------------------------------------------------

C3D_CLASSIC = [("conv1", 3, 64), ("conv2", 64, 128), ("conv3a", 128, 256), ("conv3b", 256, 256), ("conv4a", 256, 512),
               ("conv4b", 512, 512), ("conv5a", 512, 512), ("conv5b", 512, 512)]  # fmt: skip


@pytest.mark.parametrize("layout", ["classic", "mmaction2"])
def test_c3d_layouts_load(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    state_dict: dict[str, torch.Tensor] = {}
    for name, dim_in, dim_out in C3D_CLASSIC:
        if layout == "classic":
            key = name
        else:
            key = "backbone." + (name + "a" if name in ("conv1", "conv2") else name) + ".conv"
        state_dict[f"{key}.weight"] = torch.randn(dim_out, dim_in, 3, 3, 3)
        state_dict[f"{key}.bias"] = torch.randn(dim_out)
    prefix = "" if layout == "classic" else "backbone."
    state_dict[f"{prefix}fc6.weight"], state_dict[f"{prefix}fc6.bias"] = torch.randn(4096, 8192), torch.randn(4096)
    if layout == "mmaction2":
        state_dict["cls_head.fc_cls.weight"] = torch.randn(101, 4096)
    path = tmp_path / f"c3d_{layout}.pth"
    torch.save(state_dict, path)

    ours = build_motion(MotionConfig(name="c3d", weights=str(path)), "full")
    source = "conv1" if layout == "classic" else "backbone.conv1a.conv"
    torch.testing.assert_close(ours.state_dict()["conv1a.weight"], state_dict[f"{source}.weight"], rtol=0, atol=0)
    source = "conv5b" if layout == "classic" else "backbone.conv5b.conv"
    torch.testing.assert_close(ours.state_dict()["conv5b.bias"], state_dict[f"{source}.bias"], rtol=0, atol=0)


# --- every choice x size ------------------------------------------------------------------------


@cache
def cached_semantic(name: str, size: str) -> nn.Module:
    img_size = 4 * PATCH[name] if size == "full" else 56
    cfg = SemanticConfig(name=name, img_size=img_size, patch_tokens=True)  # type: ignore[arg-type]
    return build_semantic(cfg, size)  # type: ignore[arg-type]


@cache
def cached_motion(name: str, size: str) -> nn.Module:
    return build_motion(MotionConfig(name=name), size)  # type: ignore[arg-type]


def assert_frozen(model: nn.Module) -> None:
    assert isinstance(model, FrozenBackbone)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()  # a parent switching to training must not wake up dropout or batch-norm updates
    assert not any(m.training for m in model.modules())


CASES = [(size, res) for size in ("debug", "full") for res in ((64, 96) if size == "debug" else (FULL_RES,))]


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize(("size", "res"), CASES)
@pytest.mark.parametrize("name", SEMANTIC_NAMES)
def test_semantic_shapes(name: str, size: str, res: int, steps: int) -> None:
    model = cached_semantic(name, size)
    assert_frozen(model)
    batch = 2 if size == "debug" else 1
    with torch.no_grad():
        out = model.forward_features(clips(batch, steps, res))
        plain = model(clips(batch, steps, res)) if size == "debug" else out["cls"]
    dim = FULL_OUT_DIMS[name] if size == "full" else 32
    grid = (model.img_size // PATCH[name]) ** 2
    assert model.out_dim == dim
    assert out["cls"].shape == plain.shape == (batch, steps, dim)
    assert out["patch"].shape == (batch, steps, grid, dim)
    assert out["cls"].dtype == torch.float32 and torch.isfinite(out["patch"]).all()
    torch.testing.assert_close(out["cls"], plain)


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize(("size", "res"), CASES)
@pytest.mark.parametrize("name", MOTION_NAMES)
def test_motion_shapes(name: str, size: str, res: int, steps: int) -> None:
    model = cached_motion(name, size)
    assert_frozen(model)
    batch = 2 if size == "debug" else 1
    with torch.no_grad():
        out = model(clips(batch, steps, res))
    dim = FULL_OUT_DIMS[name] if size == "full" else model.out_dim
    assert model.out_dim == dim
    assert out.shape == (batch, steps // TIME_STRIDE[name], dim)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["dinov2_vits14", *MOTION_NAMES])
def test_backbones_run_in_their_parameter_dtype(name: str) -> None:
    if name in SEMANTIC_NAMES:
        model = build_semantic(SemanticConfig(name=name, img_size=56), "debug")  # type: ignore[arg-type]
    else:
        model = build_motion(MotionConfig(name=name), "debug")  # type: ignore[arg-type]
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(clips(1, 8, 64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --- errors and warnings ------------------------------------------------------------------------


def test_no_weights_warns_loudly() -> None:
    with pytest.warns(RandomWeightsWarning, match="i3d_r50 has RANDOM weights"):
        build_motion(MotionConfig(), "debug")
    with pytest.warns(RandomWeightsWarning, match="dinov2_vits14 has RANDOM weights"):
        build_semantic(SemanticConfig(img_size=56), "debug")


def test_missing_weight_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "I3D_8x8_R50.pyth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_motion(MotionConfig(weights=str(missing)), "debug")
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth"):
        build_semantic(SemanticConfig(weights=str(tmp_path / "dinov2_vits14_pretrain.pth")), "debug")


def test_mismatching_file_names_it_and_the_keys(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        debug_state = cached_motion("i3d_r50", "debug").state_dict()
    # a debug-size file into the full model: every tensor has the wrong shape
    path = tmp_path / "tiny_i3d.pyth"
    torch.save({"model_state": debug_state}, path)
    with pytest.raises(WeightsError, match=r"tiny_i3d\.pyth.*wrong shapes.*blocks\.0\.conv\.weight"):
        build_motion(MotionConfig(weights=str(path)), "full")

    # mmaction2's I3D names are another layout: missing and unexpected keys are listed
    renamed = {k.replace("blocks.0.conv", "backbone.conv1.conv"): v for k, v in debug_state.items()}
    path = tmp_path / "mmaction_i3d.pth"
    torch.save({"state_dict": renamed}, path)
    expected = r"mmaction_i3d\.pth.*missing keys: blocks\.0\.conv\.weight.*unexpected keys: backbone\.conv1\.conv\.weight"
    with pytest.raises(WeightsError, match=expected):
        build_motion(MotionConfig(weights=str(path)), "debug")

    # a ViT-S/14 file given for CLIP ViT-B/16
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in dinov2_518().state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match=r"dinov2\.safetensors.*wrong shapes"):
        build_semantic(SemanticConfig(name="clip_vitb16", weights=str(path), img_size=64), "debug")


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"notes\.pth cannot be read"):
        build_motion(MotionConfig(name="c3d", weights=str(path)), "debug")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match=r"list\.pth holds a list"):
        build_motion(MotionConfig(name="c3d", weights=str(path)), "debug")


def test_config_rejects_unknown_names() -> None:
    from fusion.config import ConfigError

    with pytest.raises(ConfigError, match="semantic.name"):
        SemanticConfig(name="resnet50")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="motion.name"):
        MotionConfig(name="slowfast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="size"):
        build_motion(MotionConfig(), "large")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["dinov2_vits14", "clip_vitb16", "vit_s16_sup"])
def test_random_semantic_backbone_still_sees_its_input(name):
    # DINOv2's LayerScale init (1e-5) would make a random frozen ViT return the same class token
    # for every frame; tests and the demo train on random backbones, so features must differ.
    with pytest.warns(RandomWeightsWarning):
        model = build_semantic(SemanticConfig(name=name, img_size=56), "debug")
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, 256, (1, 2, 3, 56, 56), dtype=torch.uint8, generator=generator) for _ in range(2))
    with torch.no_grad():
        a, b = model(first), model(second)
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()  # LayerScale 1e-5 gives ~1e-6
