"""Stage 3, the decode: a raw sample to a clip, which frames (:class:`Sampling`), which crop
(:class:`ClipView`), JPEG headers checked before anything is allocated, frames decoded by
simplejpeg and cut (:func:`decode_clip`); or only the JPEG bytes for nvJPEG
(:func:`decode_on_device`), or whole frames for the device's crop (:func:`cut_on_device`)."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import simplejpeg
import torch

from fusion.config import ConfigError
from fusion.data import region
from fusion.data.common import ASPECT_RATIOS, MAX_FRAME_SIDE, DataConfig, FrameLimits, Oversize, ShardSet
from sharding.ssv2 import NUM_CLASSES, flip_label


@dataclass(frozen=True)
class Sampling:
    """Which of a clip's stored frames and which crops a loader takes.

    The shards hold ``stored`` frames per clip (the middles of ``stored`` equal segments of
    the video); the model sees ``frames`` of them, one from each of ``frames`` equal runs of
    stored frames: a random one in training (TSN's segment sampling, a cheap temporal
    augmentation), and in evaluation view ``v`` of ``temporal_views`` takes the ``v``-th of
    ``temporal_views`` evenly spaced ones (one view: the middle). ``spatial_crops`` squares of
    the short side are cut along the long side (1: the centre; 3: left/top, centre,
    right/bottom: SSv2's usual 2x3 views with two temporal views).
    """

    stored: int
    frames: int
    temporal_views: int = 1
    spatial_crops: int = 1

    @classmethod
    def of(cls, cfg: DataConfig, shardset: ShardSet, temporal_views: int = 1, spatial_crops: int = 1) -> "Sampling":
        """The sampling of ``cfg`` on ``shardset``; a ConfigError when the shards cannot serve it."""
        return cls.for_stored(cfg, shardset.frames, shardset.url, temporal_views, spatial_crops)

    @classmethod
    def for_stored(cls, cfg: DataConfig, stored: int, where: str, temporal_views: int = 1, spatial_crops: int = 1) -> "Sampling":
        """The sampling of ``cfg`` on clips of ``stored`` frames (``where`` names them in errors)."""
        frames = cfg.frames or stored
        if frames > stored:
            raise ConfigError(f"data.frames is {frames} but {where} holds {stored} frames a clip: set data.frames "
                              f"{stored} or less, or re-shard with make_shards --frames {frames} (or more)")
        if spatial_crops not in (1, 3):
            raise ConfigError(f"spatial crops: 1 (centre) or 3 (along the long side), got {spatial_crops}")
        shortest = min(hi - lo for lo, hi in segment_bounds(stored, frames))
        if not 1 <= temporal_views <= shortest:
            raise ConfigError(
                f"{temporal_views} temporal views of {frames} frames need at least {temporal_views * frames} stored frames a "
                f"clip; {where} holds {stored}: re-shard with make_shards --frames {temporal_views * frames}, or ask "
                f"for {max(1, shortest)} temporal view(s)"
            )
        return cls(stored, frames, temporal_views, spatial_crops)

    @property
    def views(self) -> int:
        return self.temporal_views * self.spatial_crops


def segment_bounds(stored: int, frames: int) -> list[tuple[int, int]]:
    """``frames`` runs of stored frame indices ``[lo, hi)``, as equal as integers allow."""
    return [(i * stored // frames, (i + 1) * stored // frames) for i in range(frames)]


def train_frame_indices(stored: int, frames: int, rng: random.Random) -> list[int]:
    """One stored frame at random from each segment (TSN)."""
    return [rng.randrange(lo, hi) for lo, hi in segment_bounds(stored, frames)]


def view_frame_indices(stored: int, frames: int, view: int = 0, views: int = 1) -> list[int]:
    """Temporal view ``view`` of ``views``: the ``view``-th of ``views`` evenly spaced frames of
    each segment (``views=1``: its middle)."""
    return [lo + (2 * view + 1) * (hi - lo) // (2 * views) for lo, hi in segment_bounds(stored, frames)]


def spatial_boxes(height: int, width: int, crops: int) -> list[tuple[int, int, int, int]]:
    """``(top, left, h, w)`` of ``crops`` squares of side ``min(height, width)``: the centre one,
    or (``crops=3``) the first, centre and last along the long side."""
    side = min(height, width)
    if crops == 1:
        return [center_box(height, width)]
    if width >= height:
        return [((height - side) // 2, left, side, side) for left in (0, (width - side) // 2, width - side)]
    return [(top, (width - side) // 2, side, side) for top in (0, (height - side) // 2, height - side)]




class CorruptSample(ValueError):
    """A sample whose members cannot be decoded."""


def _frame_names(sample: dict[str, Any], frames: int) -> list[str]:
    names, every = _stored_frame_names(frames)
    if not sample.keys() >= every:
        raise CorruptSample(f"missing frames {[name for name in names if name not in sample][:3]}")
    return names


@functools.lru_cache(maxsize=8)
def _stored_frame_names(frames: int) -> tuple[list[str], frozenset[str]]:
    """The member names ``000.jpg`` .. of ``frames`` stored frames, in order and as a set
    (shared: callers never modify them)."""
    names = [f"{index:03d}.jpg" for index in range(frames)]
    return names, frozenset(names)


def _frame_size(sample: dict[str, Any], names: list[str], limits: FrameLimits) -> tuple[int, int]:
    """(height, width) shared by every frame, from the JPEG headers alone; a frame that is too
    large in bytes or in claimed pixels, or differs from frame 000, raises :class:`CorruptSample`
    before a single pixel buffer is allocated (a 5 KB header may claim 65500x65500).

    A frame whose header bytes are the first frame's (an encoder writes the same tables and size
    for every frame of a clip) is not parsed again: libjpeg's header parse reads those bytes and
    no others (:func:`_jpeg_header_bytes`), so it would give the first frame's answer. Parsing
    all 32 headers of a sample took 0.05-0.08 ms of a loader process's ~4 ms a clip; comparing the
    31 copies ~0.02 ms."""
    size, header = None, None
    for name in names:
        data = sample[name]
        if isinstance(data, Oversize):
            raise CorruptSample(f"frame {name} is {data.size:,} bytes, over the {data.limit:,} any frame of these shards can need")
        if header is not None and bytes(data[: len(header)]) == header:
            continue
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as error:
            raise CorruptSample(f"JPEG header of frame {name} does not parse: {error}") from None
        if min(height, width) > limits.short_side or max(height, width) > limits.long_side:
            raise CorruptSample(f"frame {name} claims {width}x{height} pixels; these shards hold frames of short side at most "
                                f"{limits.short_side} and long side at most {limits.long_side}")
        if size is not None and (height, width) != size:
            raise CorruptSample(f"frame {name} is {width}x{height}, frame {names[0]} {size[1]}x{size[0]}")
        if size is None:
            header = _jpeg_header_bytes(data)
        size = (height, width)
    return size


# markers without a length field (TEM, RSTn, SOI, EOI), a fill byte, and a stray 00: libjpeg
# skips or stops at them, so a walk that meets one stands aside
_MARKERS_WITHOUT_LENGTH = frozenset([0x00, 0x01, *range(0xD0, 0xDA), 0xFF])
_START_OF_SCAN = 0xDA


def _jpeg_header_bytes(data: bytes | memoryview) -> bytes | None:
    """The bytes libjpeg reads to parse the header of ``data``, a JPEG whose header it has
    parsed: SOI, then length-prefixed marker segments through the start-of-scan segment (libjpeg
    refuses a segment whose contents disagree with its length, and stops after the SOS
    segment). None where anything else stands between them (fill bytes, stray data): then each
    frame is parsed."""
    if bytes(data[:2]) != b"\xff\xd8":
        return None
    position, end = 2, len(data)
    while position + 4 <= end:
        marker = data[position + 1]
        if data[position] != 0xFF or marker in _MARKERS_WITHOUT_LENGTH:
            return None
        position += 2 + (data[position + 2] << 8 | data[position + 3])
        if marker == _START_OF_SCAN:
            return bytes(data[:position]) if position <= end else None
    return None


def _label(sample: dict[str, Any], require: bool) -> int:
    if "cls" not in sample:
        if require:
            raise CorruptSample("no .cls label")
        return -1
    if isinstance(sample["cls"], Oversize):
        raise CorruptSample(f"the .cls member is {sample['cls'].size:,} bytes")
    try:
        label = int(bytes(sample["cls"]).decode("ascii").strip())  # bytes, or a memoryview of the sample's piece
    except (UnicodeDecodeError, ValueError):
        raise CorruptSample(f"label {bytes(sample['cls'][:20])!r} is not a number") from None
    if not 0 <= label < NUM_CLASSES:
        raise CorruptSample(f"label {label} is outside 0..{NUM_CLASSES - 1}")
    return label


def random_resized_box(rng: random.Random, height: int, width: int, min_area: float) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``min_area``..1 of the frame with an
    aspect ratio in 3/4..4/3 (torchvision's RandomResizedCrop, with our own generator so
    that the crop is reproducible per sample and epoch)."""
    area = height * width
    log_ratios = (np.log(ASPECT_RATIOS[0]), np.log(ASPECT_RATIOS[1]))
    for _ in range(10):
        target = area * rng.uniform(min_area, 1.0)
        ratio = float(np.exp(rng.uniform(*log_ratios)))
        w = int(round((target * ratio) ** 0.5))
        h = int(round((target / ratio) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return center_box(height, width)


def center_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The centred square of side ``min(height, width)``."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


@dataclass(frozen=True)
class ClipView:
    """How one clip is cut: crop box in source pixels and whether it is mirrored."""

    box: tuple[int, int, int, int]
    flip: bool


def _choose_view(cfg: DataConfig, height: int, width: int, rng: random.Random | None) -> ClipView:
    if rng is None:
        return ClipView(center_box(height, width), False)
    box = random_resized_box(rng, height, width, cfg.min_crop_area)
    return ClipView(box, cfg.flip and rng.random() < 0.5)


def _cut(frames: torch.Tensor, view: ClipView, size: int) -> torch.Tensor:
    """``[T, 3, H, W]`` uint8 -> ``[T, 3, size, size]`` uint8 (crop, resize, maybe mirror)."""
    top, left, h, w = view.box
    # imported here: torchvision's transforms pull in its model zoo (~1.5 s), which a training
    # process that fails on its config should not wait for
    import torchvision.transforms.v2.functional as TF

    clip = TF.resized_crop(frames, top, left, h, w, [size, size], antialias=True)
    if view.flip:
        clip = clip.flip(-1)
    return clip  # channels-last; the batch stack makes it contiguous in one copy


def decode_clip(sample: dict[str, Any], sampling: Sampling, cfg: DataConfig, rng: random.Random | None, require_label: bool,
                limits: FrameLimits = FrameLimits(MAX_FRAME_SIDE, MAX_FRAME_SIDE), multi_view: bool = False,
                cut: bool = True, out: Callable[[tuple[int, ...]], np.ndarray | None] | None = None) -> tuple[Any, int]:
    """One sample -> (uint8 ``[T, 3, S, S]``, label); with ``multi_view``, uint8
    ``[V, T, 3, S, S]``, the views temporal-major. ``rng`` given: training (random frame per
    segment, random resized crop, maybe the flip); None: the views of ``sampling``. Without
    ``cut`` (one view only), the chosen frames whole, ``dict(frames=uint8 [T, 3, H, W],
    view=ClipView)``, for :func:`cut_on_device` (``data.resize_on: device``). In training with
    ``data.region_decode`` (and the library, :mod:`fusion.data.region`) only a region around the
    crop is decoded: the frames are that region, and the view's box is relative to it.

    Raises :class:`CorruptSample`, also for frames beyond ``limits`` (every stored frame's
    header is checked before anything is allocated, whichever frames are then decoded).
    ``out(shape)``: where to decode the frames (``[N, H, W, 3]`` uint8), or None for a new array.
    """
    label = _label(sample, require_label)
    names = _frame_names(sample, sampling.stored)
    height, width = _frame_size(sample, names, limits)
    if rng is not None:
        picks = [train_frame_indices(sampling.stored, sampling.frames, rng)]
    else:
        picks = [view_frame_indices(sampling.stored, sampling.frames, v, sampling.temporal_views) for v in range(sampling.temporal_views)]
    needed = sorted({index for pick in picks for index in pick})
    row = {index: position for position, index in enumerate(needed)}
    view, decode_region = None, None
    if rng is not None:  # the crop is known before a pixel is decoded (the frames' choice drew first)
        view = _choose_view(cfg, height, width, rng)
        if view.flip:
            label = flip_label(label) if label >= 0 else label
        decode_region = region.region_decoder() if cfg.region_decode else None
    try:
        if decode_region is not None:
            # only the crop's region (widened for exact edges); the crop box moves with it
            area = region.widened(view.box, height, width)
            shape = (len(needed), area.height, area.width, 3)
            top, left, h, w = view.box
            view = ClipView((top - area.top, left - area.left, h, w), view.flip)
        else:
            shape = (len(needed), height, width, 3)
        pixels = out(shape) if out is not None else None
        if pixels is None:
            pixels = np.empty(shape, np.uint8)
        for position, index in enumerate(needed):  # decode in place: no per-frame arrays to stack
            if decode_region is not None:
                decode_region(sample[names[index]], area, pixels[position])
                continue
            frame = simplejpeg.decode_jpeg(sample[names[index]], colorspace="RGB", buffer=pixels[position])
            if frame.shape != (height, width, 3):
                raise ValueError(f"frame {names[index]} is {frame.shape[1]}x{frame.shape[0]}, frame 000 {width}x{height}")
    except ValueError as error:  # simplejpeg and libjpeg-turbo are strict: truncated or garbled data raises too
        raise CorruptSample(f"JPEG frames do not decode: {error}") from None
    except MemoryError:
        raise CorruptSample(f"JPEG frames of {width}x{height} do not fit in memory") from None
    video = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (N, 3, H, W), channels-last memory
    if rng is None and not cut:
        view = ClipView(center_box(height, width), False)  # the one view of plain validation
    if not cut:
        return dict(frames=_take(video, picks[0], row), view=view), label
    if rng is not None:
        return _cut(_take(video, picks[0], row), view, cfg.crop_size), label
    boxes = spatial_boxes(height, width, sampling.spatial_crops)
    clips = [_cut(frames, ClipView(box, False), cfg.crop_size) for frames in (_take(video, pick, row) for pick in picks) for box in boxes]
    return (torch.stack(clips) if multi_view else clips[0]), label


def _take(video: torch.Tensor, indices: list[int], row: dict[int, int]) -> torch.Tensor:
    """The decoded frames of stored ``indices`` (a view when they are all of them, in order)."""
    rows = [row[index] for index in indices]
    return video if rows == list(range(len(video))) else video[rows]


def _jpeg_bytes_clip(sample: dict[str, Any], sampling: Sampling, cfg: DataConfig, rng: random.Random | None, require_label: bool,
                     limits: FrameLimits = FrameLimits(MAX_FRAME_SIDE, MAX_FRAME_SIDE)) -> tuple[dict[str, Any], int]:
    """For ``decode: gpu``: check the headers only (also against ``limits``), choose the frames
    and the crop, and pass the chosen frames' bytes on (one view)."""
    label = _label(sample, require_label)
    names = _frame_names(sample, sampling.stored)
    height, width = _frame_size(sample, names, limits)
    if rng is not None:
        pick = train_frame_indices(sampling.stored, sampling.frames, rng)
    else:
        pick = view_frame_indices(sampling.stored, sampling.frames)
    view = _choose_view(cfg, height, width, rng)
    if view.flip:
        label = flip_label(label) if label >= 0 else label
    # bytes, not tensors: a worker's tensor crosses to the training process as a shared-memory
    # file of its own (16 a clip cost a worker ~5 ms a clip); bytes go through the pipe inline
    jpegs = [bytes(sample[names[index]]) for index in pick]
    return dict(jpegs=jpegs, view=view), label


def _decode_jpegs_on_cpu(clip: dict[str, Any], size: int) -> torch.Tensor:
    """The CPU fallback of :func:`decode_on_device` for one clip; ValueError if it does not decode."""
    pixels = np.stack([simplejpeg.decode_jpeg(jpeg, colorspace="RGB") for jpeg in clip["jpegs"]])
    return _cut(torch.from_numpy(pixels).permute(0, 3, 1, 2), clip["view"], size)


def cut_on_device(decoded: list[dict[str, Any]], size: int, device: torch.device) -> torch.Tensor:
    """Whole decoded frames of a non-empty batch (``data.resize_on: device``) -> uint8
    ``[B, T, 3, S, S]`` on ``device``: each clip's crop, resize and flip run there, the same
    :func:`_cut` the workers would run (so on a CPU the pixels are the same)."""
    # the DataLoader pinned the frames already when CUDA is there (Loader: pin_memory)
    return torch.stack([_cut(clip["frames"].to(device, non_blocking=True), clip["view"], size) for clip in decoded])


def decode_on_device(encoded: list[dict[str, Any]], size: int, device: torch.device) -> torch.Tensor:
    """JPEG bytes of a non-empty batch -> uint8 ``[B, T, 3, S, S]`` on ``device`` (one decode
    call, so nvJPEG decodes the whole batch at once on CUDA)."""
    from torchvision.io import decode_jpeg

    flat = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for clip in encoded for jpeg in clip["jpegs"]]
    frames = decode_jpeg(flat, device=device)
    per_clip = len(encoded[0]["jpegs"])
    clips = [_cut(torch.stack(frames[i * per_clip : (i + 1) * per_clip]), clip["view"], size) for i, clip in enumerate(encoded)]
    return torch.stack(clips)
