"""Turn one source video into T resized RGB frames and their JPEG bytes.

Start with :func:`decode_sampled`: it decodes the whole clip forward with PyAV (SSv2's WebM
files do not know their own frame count, and seeking lands on keyframes anyway), picks T
frames at the middles of T equal segments, and converts only those, upright: a rotation in
the file's display matrix (phone footage) is applied as ffmpeg's autorotate does. Every way
a file can be unusable raises :class:`VideoError` with a short machine-readable ``reason``;
a file cut short is ``truncated_video`` whatever its container.
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
    width: int  # as stored, i.e. after rotation
    height: int
    rotation: int = 0  # degrees clockwise the source frames were turned to stand upright (0, 90, 180, 270)

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
        cut = container_truncation(path)
        if cut is not None:
            raise VideoError("truncated_video", f"{path}: {cut}")
        return _decode_sampled(path, frames, short_side, upscale, threads)
    except PermissionError as error:
        raise VideoError("unreadable_video", f"{path}: {error}") from error
    # PyAV's errors subclass FFmpegError and ValueError/OSError; any of them means this file
    # is not a video we can use, never that the run should stop.
    except (av.FFmpegError, ValueError, OSError, IndexError) as error:
        raise VideoError("undecodable_video", f"{path}: {error}") from error


# ISO BMFF (MP4/MOV) top-level box types a file may start with; EBML's magic (Matroska/WebM).
_BMFF_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin", b"styp")
_EBML_MAGIC, _MATROSKA_SEGMENT = b"\x1a\x45\xdf\xa3", b"\x18\x53\x80\x67"


def container_truncation(path: str) -> str | None:
    """Why the container of ``path`` was cut short, or None if its structure is whole (or it
    is not MP4/MOV/Matroska/WebM).

    FFmpeg cannot even open an MP4 whose ``moov`` index (written last by default) was cut off
    ("Invalid data found"), which would read as an undecodable file; a download cut short is
    a truncation whatever the container. Reads only the box / element headers.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(16)
        if len(head) >= 8 and head[4:8] in _BMFF_FIRST_BOXES:
            return _bmff_truncation(file, size)
        if head[:4] == _EBML_MAGIC:
            return _matroska_truncation(file, size)
    return None


def _bmff_truncation(file, size: int) -> str | None:
    offset, kinds = 0, []
    while offset + 8 <= size:
        file.seek(offset)
        header = file.read(16)
        box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if box_size == 1 and len(header) == 16:
            box_size = int.from_bytes(header[8:16], "big")
        elif box_size == 0:  # "to the end of the file"
            box_size = size - offset
        if box_size < 8:
            return None  # not a box: garbage, left to the decoder to call undecodable
        if offset + box_size > size:
            return f"its '{kind.decode('latin-1')}' box at byte {offset} declares {box_size} bytes; the file ends {size - offset} bytes into it"
        kinds.append(kind)
        offset += box_size
    if b"moov" not in kinds and b"moof" not in kinds:
        return f"it ends after {size} bytes without the 'moov' index box (MP4 writers put it last)"
    return None


def _ebml_vint(data: bytes, at: int) -> tuple[int, int] | None:
    """(value, length) of the EBML variable-size integer at ``data[at]``; None if malformed."""
    if at >= len(data) or data[at] == 0:
        return None
    length = 8 - data[at].bit_length() + 1
    if at + length > len(data):
        return None
    value = data[at] & (0xFF >> length)
    for byte in data[at + 1 : at + length]:
        value = (value << 8) | byte
    return value, length


def _matroska_truncation(file, size: int) -> str | None:
    file.seek(0)
    data = file.read(4096)
    header_size = _ebml_vint(data, 4)
    if header_size is None:
        return None
    segment_at = 4 + header_size[1] + header_size[0]
    if data[segment_at : segment_at + 4] != _MATROSKA_SEGMENT:
        return None
    segment_size = _ebml_vint(data, segment_at + 4)
    if segment_size is None:
        return None
    value, length = segment_size
    if value == (1 << (7 * length)) - 1:  # "unknown size" (live streams): nothing to check against
        return None
    end = segment_at + 4 + length + value
    if end > size:
        return f"its Segment declares {end} bytes in all; the file has {size}"
    return None


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
    rotation = clockwise_rotation(decoded[0])
    quarter_turn = rotation in (90, 270)
    # the short side is the short side of the upright picture; swscale scales the stored one
    upright = (decoded[0].height, decoded[0].width) if quarter_turn else (decoded[0].width, decoded[0].height)
    width, height = target_size(*upright, short_side, upscale)
    scaled_width, scaled_height = (height, width) if quarter_turn else (width, height)
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
            decoded[index], width=scaled_width, height=scaled_height, format="rgb24", interpolation=interpolation
        )
        converted[index] = np.ascontiguousarray(np.rot90(rgb.to_ndarray(), k=-rotation // 90))
    return SampledClip(
        frames=[converted[i] for i in indices],
        frame_indices=indices,
        source_frames=len(decoded),
        fps=fps,
        width=width,
        height=height,
        rotation=rotation,
    )


def clockwise_rotation(frame: av.VideoFrame) -> int:
    """How far to turn ``frame`` clockwise so that it stands as the file says it is shown
    (0, 90, 180 or 270), from the display matrix PyAV reports (counter-clockwise degrees).
    Like ffmpeg's autorotate, only an angle within a degree of a quarter turn is applied;
    any other is left alone (0)."""
    clockwise = -float(frame.rotation or 0) % 360.0
    quarter = round(clockwise / 90.0)
    return quarter % 4 * 90 if abs(clockwise - 90.0 * quarter) <= 1.0 else 0


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG with 4:2:0 chroma (what decoders, GPU ones included, expect), with the
    accurate integer DCT: libjpeg-turbo gives it the same bytes with or without SIMD."""
    image = np.ascontiguousarray(frame)
    return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB", colorsubsampling="420", fastdct=False)
