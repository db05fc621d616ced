"""Turn one source video into T resized RGB frames and their JPEG bytes.

Start with :func:`decode_sampled`: it decodes the whole clip forward with PyAV (SSv2's WebM
files do not know their own frame count, and seeking lands on keyframes anyway), picks T
frames at the middles of T equal segments, and converts only those. Every way a file can be
unusable raises :class:`VideoError` with a short machine-readable ``reason``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import simplejpeg
from av.video.reformatter import Interpolation, VideoReformatter

# A decoded clip that ends this many frame durations before the length its header declares
# was cut short (a truncated download decodes "successfully", just with fewer frames).
TRUNCATION_TOLERANCE_FRAMES = 1.5


class VideoError(Exception):
    """A clip that cannot be packed; ``reason`` is one of missing_video, empty_video,
    unreadable_video, undecodable_video, truncated_video, no_frames."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SampledClip:
    frames: list[np.ndarray]  # T arrays, (H, W, 3) uint8 RGB, already resized
    frame_indices: list[int]  # which source frames they are (repeats when the clip is short)
    source_frames: int
    fps: float
    width: int
    height: int

    @property
    def repeated_frames(self) -> bool:
        return len(set(self.frame_indices)) < len(self.frame_indices)


def segment_middles(num_frames: int, count: int) -> list[int]:
    """Indices of the middle frame of ``count`` equal segments of ``num_frames`` frames.

    Integer arithmetic, so the choice never depends on float rounding. With fewer frames
    than ``count`` some indices repeat.
    """
    if num_frames <= 0 or count <= 0:
        raise ValueError(f"need positive frame counts, got num_frames={num_frames}, count={count}")
    return [((2 * j + 1) * num_frames) // (2 * count) for j in range(count)]


def target_size(width: int, height: int, short_side: int, upscale: bool) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side``, aspect kept; never larger
    than the source unless ``upscale``."""
    short = min(width, height)
    if short == short_side or (short < short_side and not upscale):
        return width, height
    scale = Fraction(short_side, short)
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def _frame_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _check_not_truncated(container, stream, decoded: int, last_end_s: float | None, fps: float) -> None:
    # MP4 headers may count frames that never decode (edit lists, priming): same tolerance.
    if stream.frames and decoded < stream.frames - TRUNCATION_TOLERANCE_FRAMES:
        raise VideoError("truncated_video", f"decoded {decoded} of the {stream.frames} frames the header declares")
    if container.duration and last_end_s is not None and fps > 0:
        declared_s = container.duration / av.time_base
        if last_end_s < declared_s - TRUNCATION_TOLERANCE_FRAMES / fps:
            raise VideoError("truncated_video", f"frames end at {last_end_s:.3f} s of a declared {declared_s:.3f} s")


def decode_sampled(
    path: str | os.PathLike, frames: int, short_side: int, upscale: bool = False, threads: int = 0
) -> SampledClip:
    """Decode ``path`` and return ``frames`` sampled frames resized to ``short_side``.

    ``threads``: decoder threads, 0 for FFmpeg's choice (all cores). The pixels do not
    depend on it (VP9 and H.264 decoding is bit-exact whatever the threading).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError("missing_video", f"no file {path}")
    if os.path.getsize(path) == 0:
        raise VideoError("empty_video", f"{path} is empty")
    try:
        return _decode_sampled(path, frames, short_side, upscale, threads)
    except PermissionError as error:
        raise VideoError("unreadable_video", f"{path}: {error}") from error
    # PyAV's errors subclass FFmpegError and ValueError/OSError; any of them means this file
    # is not a video we can use, never that the run should stop.
    except (av.FFmpegError, ValueError, OSError, IndexError) as error:
        raise VideoError("undecodable_video", f"{path}: {error}") from error


def _decode_sampled(path: str, frames: int, short_side: int, upscale: bool, threads: int) -> SampledClip:
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoError("undecodable_video", f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        fps = _frame_rate(stream)
        # Keep references to every decoded frame: the count is only known at the end, and
        # converting just the chosen ones afterwards is what saves the work.
        decoded: list[av.VideoFrame] = list(container.decode(stream))
        if not decoded:
            raise VideoError("no_frames", f"{path} holds no decodable frame")
        last = decoded[-1]
        last_end_s = last.time + 1.0 / fps if last.time is not None and fps > 0 else None
        _check_not_truncated(container, stream, len(decoded), last_end_s, fps)

    indices = segment_middles(len(decoded), frames)
    width, height = target_size(decoded[0].width, decoded[0].height, short_side, upscale)
    # Area averaging when shrinking avoids aliasing; bicubic when asked to enlarge. BITEXACT
    # and ACCURATE_RND keep swscale off CPU-specific SIMD shortcuts, so the same clip gives
    # the same pixels on any machine, not just on this one.
    shrinking = width * height < decoded[0].width * decoded[0].height
    scaler = Interpolation.AREA if shrinking else Interpolation.BICUBIC
    interpolation = scaler | Interpolation.BITEXACT | Interpolation.ACCURATE_RND
    # One reformatter for the clip: it reuses its scaling context, which frame.reformat()
    # would rebuild for every frame.
    reformatter = VideoReformatter()
    converted: dict[int, np.ndarray] = {}
    for index in dict.fromkeys(indices):
        rgb = reformatter.reformat(
            decoded[index], width=width, height=height, format="rgb24", interpolation=interpolation
        )
        converted[index] = rgb.to_ndarray()
    return SampledClip(
        frames=[converted[i] for i in indices],
        frame_indices=indices,
        source_frames=len(decoded),
        fps=fps,
        width=width,
        height=height,
    )


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG with 4:2:0 chroma (what decoders, GPU ones included, expect), with the
    accurate integer DCT: libjpeg-turbo gives it the same bytes with or without SIMD."""
    image = np.ascontiguousarray(frame)
    return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB", colorsubsampling="420", fastdct=False)
