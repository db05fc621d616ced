"""Decoding only a training crop's region of each frame (``fusion.data.region``): the same
pixels as a whole-frame decode, the same batches as the loader without it, damaged frames
refused where the region's rows are damaged."""

from __future__ import annotations

import random

import numpy as np
import pytest
import simplejpeg
import torch

from fusion.data import DataConfig, ShardSet, train_loader
from fusion.data.decode import CorruptSample, Sampling, decode_clip, random_resized_box
from fusion.data.region import BLOCK_COLUMNS, available, region_decoder, widened

pytestmark = pytest.mark.skipif(not available(), reason="the turbojpeg wheel (libturbojpeg 3) is not installed")


def textured_frame(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients with noise: chroma that changes from pixel to pixel, so that an
    upsampling that sees a false edge shows."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width]
    base = np.stack([rows * 255 / height, columns * 255 / width, (rows + columns) * 127 / (height + width)], -1)
    return np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def edge_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Boxes at the frame's edges and around the block columns a region's left edge snaps to."""
    boxes = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1), (0, width - 5, height, 5)]
    boxes += [(3, left, height - 6, 7) for left in (1, 2, BLOCK_COLUMNS - 1, BLOCK_COLUMNS, BLOCK_COLUMNS + 1) if left + 7 <= width]
    return boxes


@pytest.mark.parametrize("subsampling", ["420", "422", "444", "440", "411", "Gray"])
@pytest.mark.parametrize("size", [(240, 427), (239, 353), (61, 77)])
def test_a_region_decodes_to_the_whole_frames_pixels(subsampling, size):
    """Every box, at the edges and at random, decoded as its widened region, is exactly the
    box of simplejpeg's whole-frame decode (without the margin, the region's edge columns
    differ wherever chroma is upsampled)."""
    height, width = size
    decode = region_decoder()
    rng = random.Random(f"{subsampling}{size}")
    for seed in range(2):
        jpeg = simplejpeg.encode_jpeg(textured_frame(height, width, seed), quality=90, colorsubsampling=subsampling)
        whole = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
        boxes = edge_boxes(height, width) + [random_resized_box(rng, height, width, 0.08) for _ in range(25)]
        for top, left, h, w in boxes:
            area = widened((top, left, h, w), height, width)
            assert area.left % BLOCK_COLUMNS == 0 and area.top <= top and area.left <= left
            out = np.empty((area.height, area.width, 3), np.uint8)
            decode(memoryview(jpeg), area, out)  # a memoryview, as the loader's members are
            got = out[top - area.top : top - area.top + h, left - area.left : left - area.left + w]
            assert np.array_equal(got, whole[top : top + h, left : left + w]), (subsampling, size, (top, left, h, w))


def test_a_region_beyond_the_frame_or_a_wrong_output_is_refused():
    jpeg = simplejpeg.encode_jpeg(textured_frame(48, 64, 0), quality=90, colorsubsampling="420")
    decode = region_decoder()
    area = widened((0, 0, 48, 64), 48, 64)
    with pytest.raises(ValueError, match="region"):
        decode(jpeg, area, np.empty((area.height, area.width + 1, 3), np.uint8))
    too_wide = widened((0, 0, 48, 64), 48, 96)  # a frame that claimed to be wider than it is
    with pytest.raises(ValueError):
        decode(jpeg, too_wide, np.empty((too_wide.height, too_wide.width, 3), np.uint8))


def clip_sample(frames: list[bytes], label: int = 7) -> dict:
    return {"__key__": "clip", **{f"{index:03d}.jpg": jpeg for index, jpeg in enumerate(frames)}, "cls": str(label).encode()}


@pytest.mark.parametrize("cut", [True, False])
def test_decode_clip_with_regions_is_decode_clip_without(cut):
    """A training clip from its regions is the clip from whole frames: cut to the crop
    (``resize_on: worker``), or handed on with its view for the device's cut."""
    from fusion.data.decode import cut_on_device

    frames = [simplejpeg.encode_jpeg(textured_frame(240, 427, seed), quality=85, colorsubsampling="420") for seed in range(8)]
    sampling = Sampling(stored=8, frames=4)
    region_sizes = set()
    for seed in range(12):
        made = []
        for region_decode in (True, False):
            cfg = DataConfig(crop_size=32, flip=True, region_decode=region_decode)
            clip, label = decode_clip(clip_sample(frames), sampling, cfg, random.Random(seed), True, cut=cut)
            if not cut:
                if region_decode:
                    region_sizes.add(tuple(clip["frames"].shape[-2:]))
                clip = cut_on_device([clip], 32, torch.device("cpu"))[0]
            made.append((clip, label))
        (regions, label), (whole, whole_label) = made
        assert label == whole_label and torch.equal(regions, whole)
    if not cut:  # the device gets the regions, not whole frames
        assert len(region_sizes) > 1 and all(h <= 240 and w < 427 for h, w in region_sizes)


def test_a_frame_damaged_in_or_above_its_region_is_corrupt_and_below_it_unread():
    """Data that ends before the region's rows (libjpeg-turbo reads every row above a region to
    reach it) makes the clip corrupt; rows below a region are never read, so damage there leaves
    the region's pixels exact, as a stored frame the clip does not use is never read either."""
    frames = [simplejpeg.encode_jpeg(textured_frame(120, 160, seed), quality=85, colorsubsampling="420") for seed in range(4)]
    cfg, sampling = DataConfig(crop_size=32, region_decode=True), Sampling(stored=4, frames=4)
    header = len(simplejpeg.encode_jpeg(np.zeros((120, 160, 3), np.uint8), quality=85, colorsubsampling="420")) - 200
    early = frames[2][:header + 100]  # the entropy data cut short in the first rows
    with pytest.raises(CorruptSample, match="do not decode"):
        decode_clip(clip_sample(frames[:2] + [early] + frames[3:]), sampling, cfg, random.Random(0), True)

    decode, whole = region_decoder(), simplejpeg.decode_jpeg(frames[2], colorspace="RGB")
    top_rows = widened((0, 0, 16, 160), 120, 160)
    out = np.empty((top_rows.height, top_rows.width, 3), np.uint8)
    decode(frames[2][: len(frames[2]) * 3 // 4], top_rows, out)  # the last quarter of the data missing
    assert np.array_equal(out, whole[: top_rows.height])
    with pytest.raises(ValueError):  # the same damage under a region that reaches the bottom rows
        bottom_rows = widened((100, 0, 20, 160), 120, 160)
        decode(frames[2][: len(frames[2]) * 3 // 4], bottom_rows, np.empty((bottom_rows.height, bottom_rows.width, 3), np.uint8))


def test_the_loader_gives_the_same_batches_with_and_without_regions(synthetic_shards):
    """On make_shards' shards, both training modes: every batch equal, pixel for pixel."""
    shardset = ShardSet.open(str(synthetic_shards / "train"))
    for resize_on in ("worker", "device"):
        made = []
        for region_decode in (True, False):
            cfg = DataConfig(num_workers=0, crop_size=32, frames=4, shuffle_window=4, resize_on=resize_on, region_decode=region_decode)
            loader = train_loader(cfg, shardset, batch_size=2, rank=0, world_size=1, epoch=0, seed=3)
            made.append([(batch["keys"], batch["labels"].tolist(), batch["clips"]) for batch in loader])
        assert len(made[0]) == len(made[1]) > 0
        for (keys, labels, clips), (keys_whole, labels_whole, clips_whole) in zip(*made):
            assert keys == keys_whole and labels == labels_whole and torch.equal(clips, clips_whole)


def test_without_the_library_whole_frames_are_decoded(monkeypatch):
    """Where the turbojpeg wheel is missing (``region_decoder()`` None), ``region_decode: true``
    decodes whole frames: the device gets them whole, and the clip is the same."""
    from fusion.data import region

    frames = [simplejpeg.encode_jpeg(textured_frame(120, 160, seed), quality=85, colorsubsampling="420") for seed in range(4)]
    cfg, sampling = DataConfig(crop_size=32, region_decode=True), Sampling(stored=4, frames=4)
    with_regions, _ = decode_clip(clip_sample(frames), sampling, cfg, random.Random(5), True)
    monkeypatch.setattr(region, "region_decoder", lambda: None)
    whole, _ = decode_clip(clip_sample(frames), sampling, cfg, random.Random(5), True, cut=False)
    assert tuple(whole["frames"].shape) == (4, 3, 120, 160)
    assert torch.equal(decode_clip(clip_sample(frames), sampling, cfg, random.Random(5), True)[0], with_regions)
