"""Decoding a rectangle of a JPEG frame, and no more of it than libjpeg-turbo must.

A training crop covers 43 % of a stored SSv2-sized frame on average (58-100 % of its rows,
33-75 % of its columns), and the loader used to decode whole frames, then cut. libjpeg-turbo 3
decodes a region (``tj3SetCroppingRegion``): the entropy decoding still runs over every block
above it, but the inverse DCT, the chroma upsampling and the colour conversion only over the
region's columns and rows, and the rows below are not read. simplejpeg 1.9 does not expose it, so this module calls
the libturbojpeg 3.0 that the ``turbojpeg`` wheel bundles (its own Python API has no cropping)
through ctypes: measured on the demo's textured shards with their training crops, 0.69-0.87x
of the time of the same library's whole-frame decode (README, "Loader speed").

Exactness: the region asked of libjpeg-turbo is the crop box widened by :data:`MARGIN` pixels
on every side (its left edge further down to a multiple of :data:`BLOCK_COLUMNS`, which the
library requires): at the region's own edges the chroma upsampling sees an image edge and
the pixels there differ from a whole-frame decode, never inside. ``tests/test_region.py`` checks
the box's pixels against simplejpeg's whole frame for every subsampling.

Damage: libjpeg-turbo reads every row above a region to reach it, and data that ends or breaks
there is an error, as in a whole-frame decode; the rows below a region are never read, so damage
there goes unnoticed, as in a stored frame the clip does not use. Shards that make_shards packs
(or ``sharding.shard_index`` indexes) carry a CRC-32C of every sample, checked before any decode.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

# the widest block of a frame's MCU, in pixels, over every subsampling libjpeg-turbo decodes
# (8 for 4:4:4, 16 for 4:2:0 and 4:2:2, 32 for 4:1:1): a region's left edge on a multiple of
# it is valid whatever each frame of a clip is
BLOCK_COLUMNS = 32
MARGIN = 2  # pixels: a 2x chroma upsampling reads one chroma sample (two pixels) either side

_INIT_DECOMPRESS = 1
_PARAM_STOP_ON_WARNING = 0  # a recoverable error is an error, as simplejpeg's strict=True
_PIXEL_FORMAT_RGB = 0


class Region(NamedTuple):
    """Rows ``top``..``top + height`` and columns ``left``..``left + width`` of a frame."""

    top: int
    left: int
    height: int
    width: int


def widened(box: tuple[int, int, int, int], frame_height: int, frame_width: int) -> Region:
    """The region to decode for the crop ``box`` (top, left, h, w) of a frame of that size."""
    top, left, height, width = box
    region_top, region_left = max(top - MARGIN, 0), max(left - MARGIN, 0) // BLOCK_COLUMNS * BLOCK_COLUMNS
    bottom, right = min(top + height + MARGIN, frame_height), min(left + width + MARGIN, frame_width)
    return Region(region_top, region_left, bottom - region_top, right - region_left)


class _CRegion(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


@functools.cache
def _library() -> Any | None:
    """The libturbojpeg (3.x) of the ``turbojpeg`` wheel with its functions typed, or None
    where it is not installed."""
    try:
        import turbojpeg
    except ImportError:
        return None
    found = sorted((Path(turbojpeg.__file__).parent / "turbojpeg.libs").glob("libturbojpeg*.so*"))
    if not found:
        return None
    library = ctypes.CDLL(str(found[0]))
    handle, size = ctypes.c_void_p, ctypes.c_size_t
    for name, result, arguments in (
        ("tj3Init", handle, [ctypes.c_int]),
        ("tj3Set", ctypes.c_int, [handle, ctypes.c_int, ctypes.c_int]),
        ("tj3SetCroppingRegion", ctypes.c_int, [handle, _CRegion]),
        ("tj3DecompressHeader", ctypes.c_int, [handle, ctypes.c_void_p, size]),
        ("tj3Decompress8", ctypes.c_int, [handle, ctypes.c_void_p, size, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
        ("tj3GetErrorStr", ctypes.c_char_p, [handle]),
    ):
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments
    return library


def available() -> bool:
    """Whether region decoding can run here (the ``turbojpeg`` wheel is installed)."""
    return _library() is not None


@functools.cache  # one decompressor a process; a forked worker's copy is its own
def _handle() -> int:
    library = _library()
    handle = library.tj3Init(_INIT_DECOMPRESS)
    if not handle or library.tj3Set(handle, _PARAM_STOP_ON_WARNING, 1) != 0:
        raise RuntimeError("libturbojpeg could not make a decompressor")
    return handle


def region_decoder() -> Callable[[Any, Region, np.ndarray], None] | None:
    """``decode(jpeg, region, out)``, writing ``region`` of the JPEG ``jpeg`` (bytes or a
    memoryview) as RGB into ``out`` (uint8, ``[region.height, region.width, 3]``, C-contiguous);
    ValueError where the data does not decode (libjpeg-turbo's message). None where the library
    is missing."""
    library = _library()
    if library is None:
        return None
    handle = _handle()

    def decode(jpeg: Any, region: Region, out: np.ndarray) -> None:
        # the library writes region.height rows of region.width pixels at out's address
        if out.shape != (region.height, region.width, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"the output for a {region.width}x{region.height} region is {out.dtype} {out.shape}")
        data = np.frombuffer(jpeg, np.uint8)  # the bytes' address, without a copy
        address, size = data.ctypes.data, data.size
        if (library.tj3DecompressHeader(handle, address, size) != 0
                or library.tj3SetCroppingRegion(handle, _CRegion(region.left, region.top, region.width, region.height)) != 0
                or library.tj3Decompress8(handle, address, size, out.ctypes.data, region.width * 3, _PIXEL_FORMAT_RGB) != 0):
            raise ValueError(library.tj3GetErrorStr(handle).decode("utf-8", "replace"))

    return decode
