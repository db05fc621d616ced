"""The streaming data pipeline: WebDataset shards (a local folder or ``s3://bucket/prefix``)
to batches of uint8 clips ``[B, T, 3, H, W]``, split over ranks and loader workers.

Start reading at :func:`train_loader` and :func:`val_loader`; :class:`ShardSet` opens a shard
folder through its ``manifest.json`` (written by ``sharding.make_shards``).

How an epoch is planned (the whole order is decided up front, from the manifest alone, so
every rank takes the same decisions without talking to the others):

1. **Shard order.** The shard list is shuffled with ``(seed, epoch)``; its samples, in order,
   form one global sequence of ``num_samples`` positions. Every rank computes the same one
   (shuffling after the node split gave ranks different orders: WebDataset #233).
2. **Rank split by samples, not by shards.** Each rank takes ``L * batch_size`` consecutive
   positions, ``L = num_samples // (world_size * batch_size)`` (the tail that does not fill a
   batch on every rank is dropped, a different tail every epoch). Ranks therefore get exactly
   the same number of batches, also when there are fewer shards than ranks x workers: two
   ranks simply read different sample ranges of one shard (WebDataset #225, #188, #68; no
   ``with_epoch``/``resampled`` needed: #379, #303, #440).
3. **Lanes.** A rank's batches are dealt round-robin to ``lanes = max(1, num_workers)``
   lanes: batch ``i`` belongs to lane ``i % lanes``, and each lane owns one contiguous run of
   the rank's positions. A lane reads its run sequentially (a worker streams a few shards)
   and permutes it in windows of ``shuffle_window`` samples, each window with its
   own ``(seed, epoch, rank, lane, window)`` generator. Batch ``j`` of a lane is positions
   ``j*B .. (j+1)*B`` of that lane's stream. The contents of batch ``i`` are thus a pure
   function of ``(seed, epoch, rank, world_size, num_workers, batch_size)`` and the manifest;
   worker timing plays no part.
4. **Workers.** The DataLoader asks its workers in order and returns their batches in order
   (``in_order=True``), so worker ``w``'s ``m``-th batch is the rank's batch
   ``skip + m*workers + w``: a worker serves lane ``(skip + w) % lanes``.
5. **Mid-epoch resume.** ``skip_batches=k`` starts every lane at its first batch ``>= k``; the
   skipped positions of a lane are read as raw bytes and dropped without decoding. The resumed
   loader yields exactly the batches ``k..L-1`` of the uninterrupted one (MosaicML #880,
   LitData #213, WebDataset #177/#271), provided seed, world size, workers and batch size are
   the same. **With another layout** (ranks, workers or batch size), the old layout is passed
   as a :class:`Stint` (its batches done per rank): the positions its lanes consumed follow
   from its plan alone (a lane's first ``j`` batches are the first ``j*B`` positions of its
   run in window order), and the rest of the sequence, in order, is planned afresh for the new
   layout as in steps 2-3. Every clip the stopped run had not trained is trained once (but a
   tail that does not fill a batch on every rank), none it trained is read again, and stints
   chain when a run changes layout twice in an epoch. The next epoch plans the new layout
   from scratch. The assumption: the shards read as planned (a lost shard shifts a lane's
   windows, so after one the consumed set is approximate; such losses are counted anyway).
6. **Reads.** A shard whose manifest entry has ``offsets`` (:mod:`sharding.shard_index`) is
   read from the first byte of the segment's first sample to the last byte of its last (a
   seek, an S3 ``Range`` GET), so a lane that starts mid-shard reads nothing before its run;
   a whole shard with a sha256 is read entire, to check it. Without offsets (shards packed
   before the index) a segment streams its shard from the start. With ``data.cache_dir`` the
   same bytes come from the node's checked copy of the whole shard (:mod:`sharding.cache`).
   Lanes count what they read (``bytes_read``, ``samples_read``, ``cache_*`` in :attr:`Loader.stats`).
7. **Errors.** Only ``NNN.jpg``, ``cls`` and ``json`` members (and features' ``sem.npy`` and
   ``mot.npy``) are read; any other member
   (``.pyd``, ``.pickle`` ...) is never loaded, let alone unpickled. Bad data is skipped and
   counted in :attr:`Loader.stats`, with a warning the training process prints:

   - a sample that does not decode, or whose frames are larger than the manifest allows (in
     bytes from the tar header, in pixels from the JPEG header: both checked before anything is
     read or allocated, see :class:`FrameLimits`), is ``corrupt_samples``;
   - a shard that is not what the manifest says (another size, a tar error, missing, too few
     samples, another sha256, hashed as it streams) is ``corrupt_shards``;
   - an unreachable store is not bad data: it is waited for with backoff up to
     ``storage_timeout_s`` (``read_retries`` counts the re-opens), then the loader raises
     :class:`sharding.storage.StorageUnavailable` and the trainer stops with a checkpoint.

   A lane whose stream runs short (skipped samples
   or shards) fills its batches by reading further positions: past its run it reads the
   whole epoch's sample sequence with a fresh permutation (so a sample may then appear twice
   in an epoch). Every sample a batch takes in place of a lost one of its own ``B`` positions
   is counted as ``refilled_samples`` (so it equals the clips lost), which the trainer holds
   to its ``max_skipped_fraction`` budget. Batch ``j`` takes the first ``B`` good
   samples from position ``j*B`` on, so this depends only on positions: a run resumed with
   ``skip_batches`` still matches, and every rank still yields exactly ``L`` batches, so DDP
   never hangs (WebDataset #225).

Validation reads the manifest order unshuffled; rank ``r`` takes positions
``[r*N//W, (r+1)*N//W)`` and each lane a contiguous part of those, so each clip is seen
exactly once over all ranks (the last batch of a lane may be short).

Clips stay uint8 (the model normalises on the device). Training takes one random resized crop
for all ``T`` frames of a clip, validation the centre square; there is no plain horizontal
flip, only the optional flip that also swaps SSv2's left/right labels (``flip: true``).
With ``decode: gpu`` the workers only move JPEG bytes and crop boxes, and the batch is decoded
on the GPU with ``torchvision.io.decode_jpeg(..., device="cuda")``.

**Feature shards** (``launch/extract_features.py``, :mod:`fusion.features`) go through the same
plan, reads, skips and refills; their samples hold the frozen backbones' outputs instead of
frames (``sem.npy``, ``mot.npy``), and batches carry ``semantic`` and ``motion`` tensors
instead of ``clips``. A training epoch draws one of each clip's stored views at random.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
import random
import re
import signal
import sys
import tarfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import simplejpeg
import torch
from webdataset.tariterators import base_plus_ext

from fusion.config import ConfigError, option
from fusion.features import FEATURES_FORMAT, CorruptFeatures, FeatureSpec, decode_features
from sharding import storage
from sharding.cache import ShardCache
from sharding.shard_index import check_offsets
from sharding.ssv2 import NUM_CLASSES, TEMPLATES, flip_label

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ssv2-frames/1"
# The only members a reader ever loads; everything else in a shard stays unread bytes.
READ_MEMBER = re.compile(r"^[^/]+\.(\d{3}\.jpg|cls|json|sem\.npy|mot\.npy)$")
SHARD_NAME = re.compile(r"[^/\\]+\.tar")
ASPECT_RATIOS = (3 / 4, 4 / 3)
MAX_READ_PASSES = 4
ERROR_KEYS = ("corrupt_samples", "corrupt_shards", "read_retries", "refilled_samples")
# What the lanes read: bytes from storage (shards fetched into the node cache included) and
# samples; shards the cache fetched, and bytes read from it (the tests compare them with the plan).
READ_KEYS = ("bytes_read", "samples_read", "cache_fetches", "cache_bytes_read")
# A stored frame's long side is at most this many short sides (SSv2 is under 2:1); a JPEG
# header claiming more is not one of our frames, and is refused before any pixel is allocated.
MAX_ASPECT = 4
# Without a short side in the manifest (hand-made shards), no frame side may exceed this.
MAX_FRAME_SIDE = 4096
MAX_META_BYTES = 1 << 20  # a .cls or .json member larger than this is not ours either
# Backoff while storage is unreachable: 0.5 s doubling up to this.
MAX_BACKOFF_S = 15.0


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how clips are read from them."""

    train: str = option("data/synthetic/shards/train",
                        "training shards, frames or features (launch/extract_features.py): folder or s3://bucket/prefix "
                        "with manifest.json")
    val: str = option("data/synthetic/shards/validation", "validation shards, of the same kind: folder or s3://bucket/prefix")
    num_workers: int = option(2, "loader worker processes per rank (0: read in the training process; feature shards "
                                 "need few: they are not decoded)")
    crop_size: int = option(224, "side of the square crops fed to the model, in pixels")
    frames: int = option(
        0,
        "frames per clip the model sees, T, out of the T_s the shards hold: each of T equal segments of the stored "
        "frames gives one, at random in training (TSN-style jitter), its middle in validation; 0: all T_s",
    )
    min_crop_area: float = option(0.25, "training crops cover this fraction of the frame area or more")
    flip: bool = option(False, "flip half the training clips and swap their left/right labels")
    shuffle_window: int = option(256, "samples permuted together within a loader lane (memory: raw JPEG bytes)")
    decode: Literal["cpu", "gpu"] = option("cpu", "decode JPEGs in the workers (cpu) or on the GPU from bytes (gpu)")
    resize_on: Literal["worker", "device"] = option(
        "worker", "with decode cpu, where each clip's crop, resize and flip run: in the loader workers, or on the training "
                  "device in the training process (workers then only decode the chosen JPEG frames: on a GPU machine this "
                  "takes the resize off the CPU cores)")
    prefetch_batches: int = option(2, "batches each worker prepares ahead")
    storage_timeout_s: float = option(
        600.0,
        "how long an unreachable store (refused connections, timeouts, HTTP 5xx) is waited for, retrying with backoff, "
        "before the run stops with a checkpoint (keep it below the process group's 30-minute timeout)",
    )
    cache_dir: str = option("", "node-local folder that keeps whole shards read from storage, shared by the node's "
                                "ranks and workers, so later epochs read local disk (empty: no cache)")
    cache_gb: float = option(100.0, "size limit of data.cache_dir in GB; least recently used shards leave first")
    max_skipped_fraction: float = option(
        0.01,
        "stop training (with a checkpoint) once more than this fraction of an epoch's clips had to be replaced "
        "because they or their shard could not be read",
    )

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.crop_size < 8:
            raise ConfigError(f"data.crop_size: must be >= 8 pixels, got {self.crop_size}")
        if self.frames < 0:
            raise ConfigError(f"data.frames: must be >= 0 (0: every stored frame), got {self.frames}")
        if not 0.0 < self.min_crop_area <= 1.0:
            raise ConfigError(f"data.min_crop_area: must be in (0, 1], got {self.min_crop_area}")
        if self.shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window: must be >= 1, got {self.shuffle_window}")
        if self.prefetch_batches < 1:
            raise ConfigError(f"data.prefetch_batches: must be >= 1, got {self.prefetch_batches}")
        if self.storage_timeout_s < 0:
            raise ConfigError(f"data.storage_timeout_s: must be >= 0, got {self.storage_timeout_s}")
        if self.cache_gb <= 0:
            raise ConfigError(f"data.cache_gb: must be > 0, got {self.cache_gb}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"data.max_skipped_fraction: must be in [0, 1], got {self.max_skipped_fraction}")


@dataclass(frozen=True)
class ShardSet:
    """A shard folder and its manifest. Open with :meth:`ShardSet.open`."""

    url: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, url: str) -> "ShardSet":
        """Read ``manifest.json`` under ``url``; clear errors for bad credentials, a missing
        bucket, a missing or foreign manifest, all before any training starts."""
        url = str(url).rstrip("/") if storage.is_s3_url(url) else str(url)
        if storage.is_s3_url(url):
            storage.check_s3_access(url)
        manifest_url = storage.join(url, MANIFEST_NAME)
        try:
            manifest = json.loads(storage.read_bytes(manifest_url))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} at {manifest_url}: point the data path at a folder written by sharding.make_shards"
            ) from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_url} is not valid JSON ({error}): re-run sharding.make_shards") from None
        if manifest.get("format") not in (MANIFEST_FORMAT, FEATURES_FORMAT) or not manifest.get("shards"):
            raise ValueError(f"{manifest_url}: not an '{MANIFEST_FORMAT}' (frames) or '{FEATURES_FORMAT}' (features) manifest "
                             "with shards; re-run sharding.make_shards or launch/extract_features.py")
        for position, entry in enumerate(manifest["shards"]):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
                raise ValueError(f"{manifest_url}: shard {position} is {name!r}, not a plain NAME.tar in that folder; "
                                 "re-run sharding.make_shards")
            if not isinstance(entry.get("num_samples"), int) or entry["num_samples"] < 0:
                raise ValueError(f"{manifest_url}: shard {name} has no valid num_samples; re-run sharding.make_shards")
            if "offsets" in entry:
                problem = check_offsets(entry["offsets"], entry["num_samples"], entry.get("bytes"))
                if problem:
                    raise ValueError(f"{manifest_url}: shard {name}: {problem}; rebuild the index with "
                                     f"python -m sharding.shard_index --force {url}")
        return cls(url=url, manifest=manifest)

    @property
    def shards(self) -> list[str]:
        return [entry["name"] for entry in self.manifest["shards"]]

    @property
    def shard_sizes(self) -> list[int]:
        return [int(entry["num_samples"]) for entry in self.manifest["shards"]]

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def frames(self) -> int:
        return int(self.manifest["frames"])

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest's record of shard ``name``: num_samples, bytes, sha256."""
        return self._entries[name]

    def offsets(self, name: str) -> list[int] | None:
        """Where each sample of shard ``name`` starts, and where the last ends (bytes; see
        :mod:`sharding.shard_index`), or None for a shard packed without the index."""
        return self._entries[name].get("offsets")

    def sample_bytes(self, segment: "Segment") -> int | None:
        """The bytes of the samples of ``segment`` in its shard (None without the index)."""
        offsets = self.offsets(segment.shard)
        return offsets[segment.stop] - offsets[segment.start] if offsets else None

    @functools.cached_property
    def _entries(self) -> dict[str, dict[str, Any]]:
        return {entry["name"]: entry for entry in self.manifest["shards"]}

    @property
    def is_features(self) -> bool:
        """Feature shards (``launch/extract_features.py``) rather than frame shards."""
        return self.manifest.get("format") == FEATURES_FORMAT

    @functools.cached_property
    def feature_spec(self) -> FeatureSpec:
        if not self.is_features:
            raise ValueError(f"{self.url} holds frame shards, not features")
        try:
            return FeatureSpec.of(self.manifest)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.url}/{MANIFEST_NAME}: a features manifest without valid 'features' shapes; "
                             "re-run launch/extract_features.py") from None

    @functools.cached_property
    def limits(self) -> "FrameLimits | FeatureSpec":
        """What a member of these shards may be, from the manifest (see :class:`FrameLimits`;
        for feature shards the arrays' exact sizes, :class:`~fusion.features.FeatureSpec`)."""
        if self.is_features:
            return self.feature_spec
        short = self.manifest.get("short_side")
        if isinstance(short, int) and short > 0:
            return FrameLimits(short_side=short, long_side=MAX_ASPECT * short)
        return FrameLimits(short_side=MAX_FRAME_SIDE, long_side=MAX_FRAME_SIDE)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.get("templates") or ()) or NUM_CLASSES

    def shard_url(self, name: str) -> str:
        return storage.join(self.url, name)

    def check_flip_labels(self) -> None:
        """Refuse ``data.flip`` unless the manifest's templates are SSv2's, id for id.

        The flip swaps the fixed left/right label ids of :data:`sharding.ssv2.LEFT_RIGHT_PAIRS`;
        with another label order (a relabelled or partial ``labels.json``) the swap would
        corrupt labels silently, and a left/right template at another id would go unswapped.
        """
        templates = list(self.manifest.get("templates") or ())
        if templates == list(TEMPLATES):
            return
        if len(templates) != len(TEMPLATES):
            found = f"{len(templates)} templates" if templates else "no templates"
            raise ConfigError(
                f"data.flip: {self.url}/{MANIFEST_NAME} lists {found}, not SSv2's {len(TEMPLATES)}, so the left/right "
                "label swap cannot be trusted: set data.flip false (or re-shard with SSv2's labels.json)"
            )
        first = next(i for i, (a, b) in enumerate(zip(templates, TEMPLATES)) if a != b)
        raise ConfigError(
            f"data.flip: label {first} of {self.url}/{MANIFEST_NAME} is {templates[first]!r}, SSv2's is {TEMPLATES[first]!r}: "
            "the flip swaps SSv2's left/right label ids (86/87, 93/94, 166/167), which only fits SSv2's own label order; "
            "set data.flip false, or re-shard with SSv2's labels.json"
        )


@dataclass(frozen=True)
class FrameLimits:
    """The largest frame a shard may hold: sides from the manifest's ``short_side`` (the short
    side at most that, the long side at most :data:`MAX_ASPECT` times it), bytes at most twice
    the raw RGB pixels of such a frame. Anything larger is a corrupt sample, refused from its
    tar header or JPEG header before it is read or decoded."""

    short_side: int
    long_side: int

    @property
    def max_frame_bytes(self) -> int:
        return 2 * 3 * self.short_side * self.long_side + 65536

    def member_limit(self, extension: str) -> int:
        return self.max_frame_bytes if extension.endswith("jpg") else MAX_META_BYTES


@dataclass(frozen=True)
class Oversize:
    """Stands for a member too large to read (its bytes are skipped in the stream)."""

    size: int
    limit: int


class DataEvents:
    """What a loader lane met since its last batch: counts (:data:`ERROR_KEYS`) and warnings.
    Workers send both with each batch; the training process logs the warnings, each on its
    own line (a worker writing to stderr itself would land in the middle of a progress bar)."""

    def __init__(self, announce: bool = True) -> None:
        self.counts: Counter = Counter()
        self.messages: list[str] = []
        self.announce = announce

    def count(self, key: str, amount: int = 1) -> None:
        self.counts[key] += amount

    def warn(self, message: str, now: bool = False) -> None:
        """Queue ``message`` for the training process; ``now`` also prints it at once (on the
        announcing rank), for what cannot wait for the next batch: a wait for storage."""
        if now and self.announce:
            if torch.utils.data.get_worker_info() is None:
                log.warning("%s", message)
            else:  # a worker cannot reach the trainer's progress bar: start a fresh line instead
                sys.stderr.write(f"\nwarning: {message}\n")
                sys.stderr.flush()
            return
        self.messages.append(message)

    def take(self) -> tuple[dict[str, int], list[str]]:
        taken = dict(self.counts), list(self.messages)
        self.counts.clear()
        self.messages.clear()
        return taken


class ShardMismatch(ValueError):
    """A shard that is not the one the manifest describes (size or sha256)."""


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, stop)`` of one shard, in the shard's own sample order."""

    shard: str
    start: int
    stop: int


@dataclass(frozen=True)
class LanePlan:
    """One lane of one rank: the run of samples it reads and the batches it makes."""

    lane: int
    segments: tuple[Segment, ...]
    num_samples: int
    batch_ids: tuple[int, ...]  # the rank's batch indices this lane produces, in order
    refill: tuple[Segment, ...] = ()  # read (permuted afresh) when the lane's own run runs short


def batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """Training batches every rank yields per epoch (the same on all ranks)."""
    count = num_samples // (batch_size * world_size)
    if count == 0:
        raise ValueError(
            f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} ranks: "
            "lower the batch size or add data"
        )
    return count


def epoch_shard_order(shardset: ShardSet, seed: int, epoch: int) -> list[int]:
    """Shard indices in this epoch's order: identical on every rank."""
    order = list(range(len(shardset.shards)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def segments_for(shardset: ShardSet, order: list[int], start: int, stop: int) -> tuple[Segment, ...]:
    """The shard pieces that hold global positions ``[start, stop)`` of the sequence ``order``."""
    names, sizes = shardset.shards, shardset.shard_sizes
    segments, offset = [], 0
    for index in order:
        lo, hi = max(start, offset), min(stop, offset + sizes[index])
        if lo < hi:
            segments.append(Segment(names[index], lo - offset, hi - offset))
        offset += sizes[index]
    return tuple(segments)


def _balanced_bounds(total: int, parts: int, part: int) -> tuple[int, int]:
    return total * part // parts, total * (part + 1) // parts


@dataclass(frozen=True)
class Stint:
    """Part of an epoch that a run with another layout trained already, which a run resumed
    with a new layout must not repeat: that run's ranks, loader lanes (``max(1, num_workers)``),
    batch size and shuffle window, and how many batches each of its ranks finished."""

    world_size: int
    lanes: int
    batch_size: int
    shuffle_window: int
    batches: int


def _lane_runs(count: int, per_rank: int, batch_size: int, rank: int, lanes: int) -> Iterator[tuple[int, int, int, tuple[int, ...]]]:
    """(lane, start, stop, batch ids) of ``rank``'s lanes over a sequence of ``count`` positions."""
    offset = rank * per_rank * batch_size
    for lane in range(lanes):
        batch_ids = tuple(range(lane, per_rank, lanes))
        size = len(batch_ids) * batch_size
        yield lane, offset, offset + size, batch_ids
        offset += size


def _window_order(count: int, window: int, seed_text: str) -> list[int]:
    """The order :func:`_windowed` puts ``count`` samples in, as their indices."""
    order: list[int] = []
    for number, start in enumerate(range(0, count, window)):
        chunk = list(range(start, min(start + window, count)))
        random.Random(f"{seed_text}:{number}").shuffle(chunk)
        order += chunk
    return order


def _order_text(seed: int, epoch: int, rank: int, world_size: int, stints: int) -> str:
    """What seeds a lane's windows (with the lane, read pass and window number)."""
    return f"order:{seed}:{epoch}:{rank}:{world_size}" + (f":after{stints}" if stints else "")


def epoch_positions(shardset: ShardSet, *, seed: int, epoch: int, stints: tuple[Stint, ...] = ()) -> list[int]:
    """The positions of the epoch's sequence (step 1 of the module docstring) still to train,
    in order: all of them without ``stints``; after each stint, every position its layout's
    plan had not consumed yet. A lane's first ``j`` batches consumed the first ``j * B`` positions
    of its run in window order, so this needs nothing but the plan; the tail a stint's layout
    dropped stays in (those clips were not trained)."""
    positions = list(range(shardset.num_samples))
    for number, stint in enumerate(stints):
        per_rank = batches_per_rank(len(positions), stint.batch_size, stint.world_size)
        if not 0 <= stint.batches <= per_rank:
            raise ValueError(f"stint {number}: {stint.batches} batches done, but its layout has {per_rank} per rank")
        taken: set[int] = set()
        for rank in range(stint.world_size):
            text = _order_text(seed, epoch, rank, stint.world_size, number)
            for lane, start, stop, batch_ids in _lane_runs(len(positions), per_rank, stint.batch_size, rank, stint.lanes):
                done = sum(1 for batch_id in batch_ids if batch_id < stint.batches) * stint.batch_size
                order = _window_order(stop - start, stint.shuffle_window, f"{text}:{lane}:0")
                taken.update(positions[start + index] for index in order[:done])
        positions = [position for position in positions if position not in taken]
    return positions


def segments_of(shardset: ShardSet, order: list[int], positions: list[int]) -> tuple[Segment, ...]:
    """The shard pieces that hold ``positions`` of the sequence ``order``, in their order: runs
    of consecutive positions in one shard become one segment (one ranged read)."""
    names, sizes = shardset.shards, shardset.shard_sizes
    starts, offset = [], 0
    for index in order:
        starts.append(offset)
        offset += sizes[index]
    segments: list[Segment] = []
    current = None  # [shard slot, start, stop] in the shard's own positions
    for position in positions:
        slot = bisect.bisect_right(starts, position) - 1
        local = position - starts[slot]
        if current is not None and current[0] == slot and current[2] == local:
            current[2] += 1
            continue
        if current is not None:
            segments.append(Segment(names[order[current[0]]], current[1], current[2]))
        current = [slot, local, local + 1]
    if current is not None:
        segments.append(Segment(names[order[current[0]]], current[1], current[2]))
    return tuple(segments)


def train_plan(shardset: ShardSet, *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int, lanes: int,
               stints: tuple[Stint, ...] = ()) -> list[LanePlan]:
    """The lanes of ``rank`` for one training epoch (see the module docstring, steps 1-3); with
    ``stints``, for what they left of it (step 5)."""
    order = epoch_shard_order(shardset, seed, epoch)
    positions = epoch_positions(shardset, seed=seed, epoch=epoch, stints=stints) if stints else None
    count = shardset.num_samples if positions is None else len(positions)
    per_rank = batches_per_rank(count, batch_size, world_size)
    whole_epoch = segments_for(shardset, order, 0, shardset.num_samples)
    plans = []
    for lane, start, stop, batch_ids in _lane_runs(count, per_rank, batch_size, rank, lanes):
        segments = (segments_for(shardset, order, start, stop) if positions is None
                    else segments_of(shardset, order, positions[start:stop]))
        plans.append(LanePlan(lane, segments, stop - start, batch_ids, whole_epoch))
    return plans


def val_plan(shardset: ShardSet, *, batch_size: int, rank: int, world_size: int, lanes: int) -> list[LanePlan]:
    """The lanes of ``rank`` for validation: every clip on exactly one rank and lane."""
    order = list(range(len(shardset.shards)))
    rank_start, rank_stop = _balanced_bounds(shardset.num_samples, world_size, rank)
    plans = []
    for lane in range(lanes):
        lo, hi = _balanced_bounds(rank_stop - rank_start, lanes, lane)
        size = hi - lo
        num_batches = -(-size // batch_size)
        plans.append(LanePlan(lane, segments_for(shardset, order, rank_start + lo, rank_start + hi), size, tuple(range(num_batches))))
    return plans


# ----------------------------------------------------------------------------- reading


def read_segment(shardset: ShardSet, segment: Segment, cfg: DataConfig, events: DataEvents) -> Iterator[dict[str, Any]]:
    """Raw samples (member bytes by extension) of one shard segment.

    Three kinds of trouble, told apart:

    - **the shard is bad** (not the manifest's size, a tar error, missing, fewer samples than
      listed, a sha256 that does not match): deterministic, so it is not retried; the rest of
      the shard is skipped, counted as ``corrupt_shards`` and named in a warning. A shard read
      whole is hashed as it streams; a mismatch is only known at its end, when its samples
      were already used (the warning says so), while a wrong size is caught before any is;
    - **the store refuses the credentials**: :class:`storage.StorageAccessError`, raised;
    - **the store is unreachable** (refused connections, timeouts, HTTP 5xx after botocore's
      own retries): waited for, re-opening with backoff and continuing at the sample reached,
      for up to ``cfg.storage_timeout_s`` since the outage began; past that,
      :class:`storage.StorageUnavailable` is raised (the caller stops, never trains on less).
    """
    url = shardset.shard_url(segment.shard)
    entry = shardset.entry(segment.shard)
    expected_bytes = entry.get("bytes") or None
    expected_sha = entry.get("sha256") or None
    offsets = shardset.offsets(segment.shard)
    whole = segment.start == 0 and segment.stop == entry["num_samples"]
    cache = ShardCache(cfg.cache_dir, int(cfg.cache_gb * 1e9)) if cfg.cache_dir else None
    position, attempt, outage_since = segment.start, 0, None
    while position < segment.stop:
        stream = reader = cached = None
        ranged = offsets is not None  # this attempt starts at the index's offsets
        try:
            hashing = whole and expected_sha and position == 0
            if cache is not None:  # checked whole when fetched: no hashing here
                cached = cache.open_range(url, expected_bytes, expected_sha, offsets[position] if offsets else 0,
                                          offsets[segment.stop] if offsets else None)
            if cached is not None:
                stream, fetched = cached
                events.count("bytes_read", fetched)
                events.count("cache_fetches", int(fetched > 0))
                hashing, size = False, expected_bytes
                first, stop = (0, segment.stop - position) if offsets else (position, segment.stop)
            elif offsets is not None and not hashing:
                # only this segment's bytes cross the wire (a seek, an S3 Range GET)
                stream, size = storage.open_range(url, offsets[position], offsets[segment.stop])
                first, stop = 0, segment.stop - position
            else:
                stream, size = storage.open_sized(url)
                first, stop = position, segment.stop
            if expected_bytes is not None and size != expected_bytes:
                raise ShardMismatch(f"it is {size} bytes, the manifest says {expected_bytes}: not the shard that was packed")
            reader = _CountingReader(stream, hashing=bool(hashing))
            read_key = "cache_bytes_read" if cached is not None else "bytes_read"
            for sample in _shard_samples(reader, url, first, stop, shardset.limits):
                if outage_since is not None:
                    events.warn(f"storage is back: read {url} again after {time.monotonic() - outage_since:.0f} s")
                    outage_since, attempt = None, 0
                position += 1
                events.count("samples_read")
                events.count(read_key, reader.take())  # now: a lane may stop at its last sample
                yield sample
            if position < segment.stop:
                raise tarfile.ReadError(f"holds {position} samples, the manifest says {segment.stop}")
            if hashing:
                digest = reader.finish()
                if digest != expected_sha:
                    raise ShardMismatch(f"its sha256 is {digest[:12]}..., the manifest says {expected_sha[:12]}...: not the "
                                        f"shard that was packed, and its {segment.stop} samples were already used")
            return
        except (tarfile.TarError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
            if ranged and isinstance(error, tarfile.TarError):
                # no tar member where the index says one starts: the index, not the shard, may be
                # wrong (a hand-rewritten shard); read the shard from its start rather than lose it
                events.warn(f"shard {url}: no sample where the manifest's offsets say ({error}); reading it from its "
                            f"start instead. Rebuild the index: python -m sharding.shard_index --force {shardset.url}")
                offsets = None
                continue
            events.count("corrupt_shards")
            if position < segment.stop:
                events.warn(f"skipping the rest of shard {url} from sample {position}: {error}")
            else:
                events.warn(f"shard {url} does not match the manifest: {error}")
            return
        except storage.StorageAccessError:
            raise  # refused credentials (e.g. expired mid-run): skipping every shard would train on nothing
        except _transient_errors() as error:  # connection refused or dropped, timeouts, 5xx
            now = time.monotonic()
            if outage_since is None:
                outage_since = now
                events.warn(f"waiting for storage: {url} cannot be read ({type(error).__name__}: {error}); retrying for up "
                            f"to {cfg.storage_timeout_s:.0f} s (data.storage_timeout_s)", now=True)
            waited = now - outage_since
            if waited >= cfg.storage_timeout_s:
                raise storage.StorageUnavailable(
                    f"{url} could not be read for {waited:.0f} s (data.storage_timeout_s = {cfg.storage_timeout_s:.0f}); "
                    f"last error: {type(error).__name__}: {error}"
                ) from None
            events.count("read_retries")
            attempt += 1
            time.sleep(min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF_S, cfg.storage_timeout_s - waited))
        finally:
            if reader is not None:
                events.count(read_key, reader.take())
            if stream is not None:
                stream.close()


@functools.lru_cache(maxsize=1)
def _transient_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable store raises (waited for); anything else is a bug and propagates."""
    from http.client import HTTPException

    errors: tuple[type[BaseException], ...] = (OSError, HTTPException, storage.StorageError)
    try:  # only where S3 is used
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        errors += (BotoCoreError, HTTPError)
    except ImportError:
        pass
    return errors


class _CountingReader:
    """A read-only stream that counts (and with ``hashing``, hashes) what passes through it:
    what the tar reader reads, i.e. what came from storage (or the node cache)."""

    def __init__(self, stream: Any, hashing: bool = False) -> None:
        self.stream = stream
        self.sha = hashlib.sha256() if hashing else None
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        if self.sha is not None:
            self.sha.update(data)
        return data

    def take(self) -> int:
        """Bytes read since the last call."""
        count, self.count = self.count, 0
        return count

    def finish(self) -> str:
        """Read what is left (the tar's end blocks) and return the hex digest of it all."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def _shard_samples(stream: Any, url: str, first: int, stop: int, limits: FrameLimits) -> Iterator[dict[str, Any]]:
    """Samples ``[first, stop)`` of a tar stream, grouped by key as webdataset does.

    A member's size is checked from its tar header first, and one over the limit is skipped in
    the stream (read in blocks, never held) and stands as an :class:`Oversize` in its sample.
    Members of samples before ``first`` are skipped unread too. Only :data:`READ_MEMBER` names
    count; the rest are never read.
    """
    tar = TarStream(stream)
    index, key, sample = -1, None, None
    for name, size in tar.members():
        if not READ_MEMBER.match(name):
            continue
        prefix, extension = base_plus_ext(name)
        if prefix != key:
            if sample is not None:
                yield sample
                sample = None
            index, key = index + 1, prefix
            if index >= stop:
                return
            if index >= first:
                sample = {"__key__": prefix, "__url__": url}
        if sample is None:
            continue
        if extension in sample:
            raise ValueError(f"{name}: a second member named so in one sample")
        limit = limits.member_limit(extension)
        if size > limit:
            sample[extension] = Oversize(size, limit)
            continue
        sample[extension] = tar.data()
    if sample is not None:
        yield sample


class TarStream:
    """The regular files of a tar read as a stream: :meth:`members` yields ``(name, size)``;
    :meth:`data` then reads that member's bytes, or the member is skipped unread.

    Our own rather than ``tarfile``'s stream mode: on 32-frame textured shards (~500 KB a
    sample) that took 1.09 ms of CPU a sample (Python header parsing, 10 KiB reads through its
    ``_Stream``), ~15 % of decoding the sample's JPEGs; this takes 0.33 ms. It reads what this
    project's writers (webdataset's ``TarWriter``, GNU tar, Python's ``tarfile``) produce: ustar and GNU headers, PAX and GNU long names, base-256
    sizes; a header whose checksum fails is a :class:`tarfile.ReadError`, like a truncated one.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.pending = 0  # bytes of the current member (data and padding) not read yet
        self.size = 0

    def members(self) -> Iterator[tuple[str, int]]:
        long_name, pax = None, {}
        while True:
            self._skip(self.pending)
            header = self.stream.read(tarfile.BLOCKSIZE)
            if len(header) < tarfile.BLOCKSIZE or header == _ZERO_BLOCK:
                if header and header != _ZERO_BLOCK:
                    raise tarfile.ReadError("unexpected end of data in a tar header")
                return  # the end-of-archive blocks, or the end of a range
            name, size, kind = _parse_tar_header(header)
            padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if kind in (b"L", b"x", b"K", b"g"):  # metadata for the next member
                meta = self._read(padded)[:size]
                if kind == b"L":
                    long_name = meta.rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(meta)
                continue
            if long_name is not None:
                name, long_name = long_name, None
            if pax:
                name = pax.get("path", name)
                size = int(pax.get("size", size))
                padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                pax = {}
            self.pending, self.size = padded, size
            if kind in (b"0", b"\0", b"7"):  # regular files; directories and links are nobody's member
                yield name, size

    def data(self) -> bytes:
        """The bytes of the member just yielded."""
        block = self._read(self.pending)
        self.pending = 0
        return block[: self.size]

    def _read(self, count: int) -> bytes:
        block = self.stream.read(count)
        if len(block) < count:
            raise tarfile.ReadError("unexpected end of data in a tar member")
        return block

    def _skip(self, count: int) -> None:
        while count:
            block = self.stream.read(min(count, 1 << 20))
            if not block:
                raise tarfile.ReadError("unexpected end of data in a skipped tar member")
            count -= len(block)
        self.pending = 0


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _parse_tar_header(header: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of one 512-byte header; ReadError if its checksum fails."""
    stored = header[148:156].split(b"\0", 1)[0].strip()
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    try:
        valid = int(stored or b"-1", 8) == computed
    except ValueError:
        valid = False
    if not valid:
        raise tarfile.ReadError("invalid tar header (bad checksum): not a member where one should start")
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        size = int.from_bytes(field[1:], "big")
    else:
        size = int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    return name.decode("utf-8", "surrogateescape"), size, header[156:157]


def _pax_records(data: bytes) -> dict[str, str]:
    """``"LEN key=value\\n"`` records of a PAX extended header."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] not in (b"", b"\0"):
        length_text, _, _ = data[position:position + 20].partition(b" ")
        length = int(length_text)
        key, _, value = data[position + len(length_text) + 1 : position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _windowed(samples: Iterator[dict[str, Any]], window: int, seed_text: str, skip: int) -> Iterator[dict[str, Any]]:
    """Permute consecutive windows of ``window`` samples, each with its own generator; drop the
    first ``skip`` output positions without keeping whole skipped windows in memory."""
    number = 0
    while True:
        if skip >= window:
            dropped = sum(1 for _ in zip(range(window), samples))
            if dropped < window:
                return
            skip -= window
            number += 1
            continue
        buffer = [sample for _, sample in zip(range(window), samples)]
        if not buffer:
            return
        random.Random(f"{seed_text}:{number}").shuffle(buffer)
        yield from buffer[skip:]
        skip, number = 0, number + 1
        if len(buffer) < window:
            return


def _lane_stream(shardset: ShardSet, plan: LanePlan, cfg: DataConfig, seed_text: str | None, skip: int, events: DataEvents) -> Iterator[dict[str, Any]]:
    """The positions of a lane: its run, then (only if something was lost) the whole epoch's
    samples, each pass with a fresh permutation, so that even a lane whose own run is all
    damaged still fills its batches; the first ``skip`` positions are dropped undecoded."""
    for read_pass in range(MAX_READ_PASSES):
        read = Counter()
        segments = plan.segments if read_pass == 0 else plan.refill
        raw = _counted((sample for segment in segments for sample in read_segment(shardset, segment, cfg, events)), read)
        if seed_text is None:  # validation: manifest order, one pass
            yield from raw
            return
        for sample in _windowed(raw, cfg.shuffle_window, f"{seed_text}:{read_pass}", skip):
            if read_pass:
                sample["__refill__"] = True  # a repeat: never one of a batch's own positions
            yield sample
        if read["samples"] == 0 and read_pass > 0:
            return
        skip = max(0, skip - read["samples"])


def _counted(samples: Iterator[dict[str, Any]], counter: Counter) -> Iterator[dict[str, Any]]:
    for sample in samples:
        counter["samples"] += 1
        yield sample


# ----------------------------------------------------------------------------- which frames, which crops


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


# ----------------------------------------------------------------------------- decoding


class CorruptSample(ValueError):
    """A sample whose members cannot be decoded."""


def _frame_names(sample: dict[str, Any], frames: int) -> list[str]:
    names = [f"{index:03d}.jpg" for index in range(frames)]
    missing = [name for name in names if name not in sample]
    if missing:
        raise CorruptSample(f"missing frames {missing[:3]}")
    return names


def _frame_size(sample: dict[str, Any], names: list[str], limits: FrameLimits) -> tuple[int, int]:
    """(height, width) shared by every frame, from the JPEG headers alone; a frame that is too
    large in bytes or in claimed pixels, or differs from frame 000, raises :class:`CorruptSample`
    before a single pixel buffer is allocated (a 5 KB header may claim 65500x65500)."""
    size = None
    for name in names:
        data = sample[name]
        if isinstance(data, Oversize):
            raise CorruptSample(f"frame {name} is {data.size:,} bytes, over the {data.limit:,} any frame of these shards can need")
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as error:
            raise CorruptSample(f"JPEG header of frame {name} does not parse: {error}") from None
        if min(height, width) > limits.short_side or max(height, width) > limits.long_side:
            raise CorruptSample(f"frame {name} claims {width}x{height} pixels; these shards hold frames of short side at most "
                                f"{limits.short_side} and long side at most {limits.long_side}")
        if size is not None and (height, width) != size:
            raise CorruptSample(f"frame {name} is {width}x{height}, frame {names[0]} {size[1]}x{size[0]}")
        size = (height, width)
    return size


def _label(sample: dict[str, Any], require: bool) -> int:
    if "cls" not in sample:
        if require:
            raise CorruptSample("no .cls label")
        return -1
    if isinstance(sample["cls"], Oversize):
        raise CorruptSample(f"the .cls member is {sample['cls'].size:,} bytes")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptSample(f"label {sample['cls'][:20]!r} is not a number") from None
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
                cut: bool = True) -> tuple[Any, int]:
    """One sample -> (uint8 ``[T, 3, S, S]``, label); with ``multi_view``, uint8
    ``[V, T, 3, S, S]``, the views temporal-major. ``rng`` given: training (random frame per
    segment, random resized crop, maybe the flip); None: the views of ``sampling``. Without
    ``cut`` (one view only), the chosen frames whole, ``dict(frames=uint8 [T, 3, H, W],
    view=ClipView)``, for :func:`cut_on_device` (``data.resize_on: device``).

    Raises :class:`CorruptSample`, also for frames beyond ``limits`` (every stored frame's
    header is checked before anything is allocated, whichever frames are then decoded).
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
    try:
        pixels = np.empty((len(needed), height, width, 3), np.uint8)
        for position, index in enumerate(needed):  # decode in place: no per-frame arrays to stack
            frame = simplejpeg.decode_jpeg(sample[names[index]], colorspace="RGB", buffer=pixels[position])
            if frame.shape != (height, width, 3):
                raise ValueError(f"frame {names[index]} is {frame.shape[1]}x{frame.shape[0]}, frame 000 {width}x{height}")
    except ValueError as error:  # simplejpeg is strict: truncated or garbled data raises too
        raise CorruptSample(f"JPEG frames do not decode: {error}") from None
    except MemoryError:
        raise CorruptSample(f"JPEG frames of {width}x{height} do not fit in memory") from None
    video = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (N, 3, H, W), channels-last memory
    if rng is not None:
        view = _choose_view(cfg, height, width, rng)
        if view.flip:
            label = flip_label(label) if label >= 0 else label
    elif not cut:
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
    jpegs = [torch.frombuffer(bytearray(sample[names[index]]), dtype=torch.uint8) for index in pick]
    return dict(jpegs=jpegs, view=view), label


# ----------------------------------------------------------------------------- the dataset


class _LaneDataset(torch.utils.data.IterableDataset):
    """Yields whole batches (the DataLoader runs with ``batch_size=None``)."""

    def __init__(self, shardset: ShardSet, cfg: DataConfig, plans: list[LanePlan], *, sampling: Sampling, batch_size: int,
                 skip_batches: int, seed_text: str | None, crop_seed_text: str | None, fill: bool, require_label: bool,
                 announce: bool = True, feature_view: int = 0) -> None:
        self.shardset, self.cfg, self.plans, self.sampling = shardset, cfg, plans, sampling
        self.announce = announce  # print waits for storage at once (rank 0; the others report with their batches)
        self.batch_size, self.skip_batches = batch_size, skip_batches
        self.seed_text, self.crop_seed_text = seed_text, crop_seed_text
        self.fill, self.require_label = fill, require_label
        self.feature_view = feature_view  # feature shards: which stored view of each clip
        # data.resize_on: device: workers decode the chosen frames and the Loader cuts the batch
        self.cut_on_device = (cfg.decode == "cpu" and cfg.resize_on == "device" and sampling.views == 1
                              and not shardset.is_features)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if workers == 1:
            # one process serves every lane, interleaved exactly as the workers would be
            streams = [self._lane_batches(plan) for plan in self.plans]
            yield from _round_robin(streams, len(self.plans), self.skip_batches)
            return
        yield from self._lane_batches(self.plans[(self.skip_batches + worker) % len(self.plans)])

    def _lane_batches(self, plan: LanePlan) -> Iterator[dict[str, Any]]:
        """The lane's batches; if storage fails for good, one last ``{"fatal": ...}`` item that
        the :class:`Loader` turns back into the exception in the training process (a worker's
        own exception would arrive wrapped in a traceback dump)."""
        events = DataEvents(self.announce)
        try:
            yield from self._lane_batches_of(plan, events)
        except storage.StorageError as error:
            counts, messages = events.take()
            yield {"fatal": (type(error).__name__, str(error)), "errors": counts, "messages": messages}

    def _lane_batches_of(self, plan: LanePlan, events: DataEvents) -> Iterator[dict[str, Any]]:
        first = sum(1 for batch_id in plan.batch_ids if batch_id < self.skip_batches)
        seed_text = f"{self.seed_text}:{plan.lane}" if self.seed_text is not None else None
        stream = _lane_stream(self.shardset, plan, self.cfg, seed_text, first * self.batch_size, events)
        pending: deque = deque()  # [raw sample, decoded result or None]
        for lane_batch in range(first, len(plan.batch_ids)):
            want = self.batch_size if self.fill else min(self.batch_size, plan.num_samples - lane_batch * self.batch_size)
            chosen, index, own = [], 0, 0
            while len(chosen) < want:
                if index == len(pending):
                    sample = next(stream, None)
                    if sample is None:
                        break
                    pending.append([sample, None])
                item = pending[index]
                if item[1] is None:
                    item[1] = self._decode(item[0], events)
                if item[1] is not False:
                    chosen.append(item[1])
                    # a good sample of the batch's own B positions; any other stands in for a lost one
                    own += index < self.batch_size and not item[0].get("__refill__")
                index += 1
            if self.fill:
                events.count("refilled_samples", len(chosen) - own)
            if self.fill and len(chosen) < want:
                raise RuntimeError(
                    f"lane {plan.lane} of {self.shardset.url} found only {len(chosen)} readable samples for a batch of "
                    f"{want} after {MAX_READ_PASSES} passes: the shards are mostly corrupt, re-run sharding.make_shards"
                )
            for _ in range(min(self.batch_size if self.fill else index, len(pending))):
                pending.popleft()
            yield self._collate(chosen, events)

    def _decode(self, sample: dict[str, Any], events: DataEvents) -> Any:
        key = sample["__key__"]
        rng = random.Random(f"{self.crop_seed_text}:{key}") if self.crop_seed_text is not None else None
        try:
            if self.shardset.is_features:
                semantic, motion, label = decode_features(sample, self.shardset.feature_spec, self.feature_view,
                                                          _label(sample, self.require_label))
                clip = (semantic, motion)
            elif self.cfg.decode == "gpu":
                clip, label = _jpeg_bytes_clip(sample, self.sampling, self.cfg, rng, self.require_label, self.shardset.limits)
            else:
                clip, label = decode_clip(sample, self.sampling, self.cfg, rng, self.require_label, self.shardset.limits,
                                          multi_view=self.sampling.views > 1, cut=not self.cut_on_device)
        except (CorruptSample, CorruptFeatures) as error:
            events.count("corrupt_samples")
            events.warn(f"skipping sample {key} of {sample.get('__url__')}: {error}")
            return False
        return clip, label, key

    def _collate(self, chosen: list[tuple[Any, int, str]], events: DataEvents) -> dict[str, Any]:
        counts, messages = events.take()
        batch: dict[str, Any] = dict(
            labels=torch.tensor([label for _, label, _ in chosen], dtype=torch.int64),
            keys=[key for _, _, key in chosen],
            errors=counts,
            messages=messages,
        )
        if self.shardset.is_features:
            spec = self.shardset.feature_spec
            for position, (name, shape) in enumerate((("semantic", spec.semantic_shape), ("motion", spec.motion_shape))):
                batch[name] = (torch.stack([clip[position] for clip, _, _ in chosen]) if chosen
                               else torch.empty((0, *shape), dtype=torch.float32))
        elif self.cfg.decode == "gpu":
            batch["encoded"] = [clip for clip, _, _ in chosen]
        elif self.cut_on_device:
            batch["decoded"] = [clip for clip, _, _ in chosen]
        elif chosen:
            batch["clips"] = torch.stack([clip for clip, _, _ in chosen])
        else:
            size = self.cfg.crop_size
            views = (self.sampling.views,) if self.sampling.views > 1 else ()
            batch["clips"] = torch.empty((0, *views, self.sampling.frames, 3, size, size), dtype=torch.uint8)
        return batch


def _round_robin(streams: list[Iterator[dict[str, Any]]], lanes: int, skip: int) -> Iterator[dict[str, Any]]:
    active = [streams[(skip + offset) % lanes] for offset in range(lanes)]
    while active:
        still = []
        for stream in active:
            batch = next(stream, None)
            if batch is not None:
                yield batch
                still.append(stream)
        active = still


class Loader:
    """The batches of one rank for one epoch: ``len()`` of them, each
    ``dict(clips=uint8 [B, T, 3, S, S], labels=int64 [B], keys=list[str])``; from feature
    shards ``dict(semantic=float32 [B, T, Ds], motion=float32 [B, T', Dm], labels, keys)``.

    :attr:`stats` counts skipped samples and shards, retries and refills seen so far (the
    workers report them with each batch); log it, it is the only trace of bad data.
    """

    def __init__(self, dataset: _LaneDataset, cfg: DataConfig, num_batches: int, device: str | torch.device | None) -> None:
        self.dataset, self.cfg = dataset, cfg
        self.num_batches = num_batches
        self.device = torch.device(device) if device is not None else None
        self.stats: Counter = Counter({key: 0 for key in ERROR_KEYS + READ_KEYS})

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.cfg.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available() and self.cfg.decode == "cpu",
            prefetch_factor=self.cfg.prefetch_batches if workers else None,
            in_order=True,
            worker_init_fn=functools.partial(init_worker, dict(os.environ)),
            multiprocessing_context=worker_context() if workers else None,
        )
        for batch in loader:
            self.stats.update(batch.pop("errors"))
            for message in batch.pop("messages"):
                log.warning("%s", message)
            if "fatal" in batch:
                kind, message = batch["fatal"]
                raise (storage.StorageAccessError if kind == "StorageAccessError" else storage.StorageUnavailable)(message)
            if "encoded" in batch:
                batch = self._decode_on_device(batch)
            elif "decoded" in batch:
                decoded = batch.pop("decoded")
                device = self.device or torch.device("cpu")
                size, steps = self.cfg.crop_size, self.dataset.sampling.frames
                batch["clips"] = (cut_on_device(decoded, size, device) if decoded
                                  else torch.empty((0, steps, 3, size, size), dtype=torch.uint8, device=device))
            yield batch

    def _decode_on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded = batch.pop("encoded")
        device = self.device or torch.device("cuda")
        size, steps = self.cfg.crop_size, self.dataset.sampling.frames
        if not encoded:  # a short validation lane's empty last batch
            batch["clips"] = torch.empty((0, steps, 3, size, size), dtype=torch.uint8, device=device)
            return batch
        try:
            batch["clips"] = decode_on_device(encoded, self.cfg.crop_size, device)
            return batch
        except RuntimeError:  # one bad JPEG fails the whole call: find it clip by clip
            pass
        keep, clips = [], []
        for index, clip in enumerate(encoded):
            try:
                clips.append(decode_on_device([clip], self.cfg.crop_size, device)[0])
                keep.append(index)
                continue
            except RuntimeError:
                pass
            try:  # nvJPEG refuses some files libjpeg-turbo reads (e.g. unusual subsampling)
                clips.append(_decode_jpegs_on_cpu(clip, self.cfg.crop_size).to(device))
                keep.append(index)
            except ValueError as error:
                self.stats["corrupt_samples"] += 1
                log.warning("skipping sample %s: JPEG frames do not decode: %s", batch["keys"][index], error)
        batch["keys"] = [batch["keys"][i] for i in keep]
        batch["labels"] = batch["labels"][keep]
        batch["clips"] = torch.stack(clips) if clips else torch.empty((0, steps, 3, size, size), dtype=torch.uint8, device=device)
        return batch


@functools.lru_cache(maxsize=1)
def worker_context() -> Any:
    """Loader workers are forked from a forkserver, not from the training process.

    The training process has threads (gloo, TensorBoard's writer, tqdm, the feeder threads of
    the previous epoch's loader, still closing), and CPython 3.11 can deadlock a child forked
    while another thread is being created or torn down (seen here: a validation worker stuck in
    ``PyOS_AfterFork_Child`` after the training loader was stopped, once in ~10 runs of the
    Slurm preemption test). The forkserver is started once, single-threaded, with what the
    workers need preloaded, so a worker still starts in milliseconds; Python 3.14 made it the
    default for the same reason.
    """
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    context = multiprocessing.get_context("forkserver")
    # the server imports, once, what every worker needs: the main module (else each worker runs
    # it again), this module and torchvision's transforms (imported lazily here, ~1.5 s)
    context.set_forkserver_preload(["__main__", "fusion.data", "torchvision.transforms.v2.functional"])
    # A scheduler signals every process of a job, the server too: started with SIGTERM and
    # SIGUSR1 blocked (a signal mask survives fork and exec), it and the workers it forks never
    # take them, and the training process, which does, decides. Blocked, not ignored, here:
    # a signal arriving meanwhile is delivered when the mask is restored.
    # The same for multiprocessing's resource tracker (it ignores SIGTERM itself but would die
    # of SIGUSR1, and a new one would not know the semaphores to clean up); starting it
    # unblocks SIGTERM again, hence the second block before the server starts.
    job_signals = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, job_signals)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, job_signals)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context


def init_worker(environment: dict[str, str], worker_id: int) -> None:
    """A loader worker takes the training process's environment as it is now (a forkserver
    child would otherwise see the one the server started with: credentials exported since, for
    one), and ignores SIGTERM and SIGUSR1. A scheduler signals every process of a job (Slurm
    does, before preempting it), and torch's workers die on a SIGTERM that does not come from
    their parent; the training process instead finishes its step and checkpoints, then stops
    its workers the usual way (they also leave when it is gone)."""
    os.environ.clear()
    os.environ.update(environment)
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


def _decode_jpegs_on_cpu(clip: dict[str, Any], size: int) -> torch.Tensor:
    """The CPU fallback of :func:`decode_on_device` for one clip; ValueError if it does not decode."""
    pixels = np.stack([simplejpeg.decode_jpeg(jpeg.numpy().tobytes(), colorspace="RGB") for jpeg in clip["jpegs"]])
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

    flat = [jpeg for clip in encoded for jpeg in clip["jpegs"]]
    frames = decode_jpeg(flat, device=device)
    per_clip = len(encoded[0]["jpegs"])
    clips = [_cut(torch.stack(frames[i * per_clip : (i + 1) * per_clip]), clip["view"], size) for i, clip in enumerate(encoded)]
    return torch.stack(clips)


# ----------------------------------------------------------------------------- entry points


def crop_seed_text(seed: int, epoch: int) -> str:
    """What seeds a training clip's frames, crop and flip (with its key): feature extraction
    cuts view ``v`` with epoch ``v``'s, so cached views are the crops training would take."""
    return f"crop:{seed}:{epoch}"


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")


def train_loader(cfg: DataConfig, shardset: ShardSet, *, batch_size: int, rank: int, world_size: int, epoch: int, seed: int,
                 skip_batches: int = 0, device: str | torch.device | None = None, stints: tuple[Stint, ...] = ()) -> Loader:
    """Training batches of ``rank`` for ``epoch``: shuffled, random-resized-cropped, a random
    frame from each of ``data.frames`` segments, every rank the same number;
    ``skip_batches=k`` resumes at batch ``k`` of the epoch exactly.

    ``stints``: the parts of this epoch that runs with other layouts (ranks, workers, batch
    size) trained before a resume; the epoch's rest is planned afresh for this layout, each
    remaining clip once, and nothing they consumed is read (step 5 of the module docstring).

    ``len()`` is the number of batches still to come (``batches_per_rank(...) - k``).
    ``device`` is where ``decode: gpu`` decodes the batch (default ``cuda``; ``cpu`` runs the
    same bytes-only path without a GPU); unused with ``decode: cpu``. A sample that fails to
    decode there is dropped from its batch (which is then short) and counted.
    """
    _check_rank(rank, world_size, batch_size)
    if cfg.flip:
        shardset.check_flip_labels()
    sampling = Sampling.of(cfg, shardset)
    lanes = max(1, cfg.num_workers)
    plans = train_plan(shardset, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch, seed=seed, lanes=lanes,
                       stints=stints)
    per_rank = sum(len(plan.batch_ids) for plan in plans)
    if not 0 <= skip_batches <= per_rank:
        raise ValueError(f"skip_batches={skip_batches} is outside 0..{per_rank} (batches per rank this epoch)")
    dataset = _LaneDataset(
        shardset, cfg, plans, sampling=sampling, batch_size=batch_size, skip_batches=skip_batches,
        seed_text=_order_text(seed, epoch, rank, world_size, len(stints)), crop_seed_text=crop_seed_text(seed, epoch),
        fill=True, require_label=True, announce=rank == 0,
        feature_view=epoch % shardset.feature_spec.views if shardset.is_features else 0,
    )
    return Loader(dataset, cfg, per_rank - skip_batches, device)


def val_loader(cfg: DataConfig, shardset: ShardSet, *, batch_size: int, rank: int, world_size: int,
               device: str | torch.device | None = None, temporal_views: int = 1, spatial_crops: int = 1) -> Loader:
    """Validation batches of ``rank``: manifest order, each clip on exactly one rank once;
    batches may be short (or empty for a rank with no clips). Labels are -1 for unlabelled
    (test split) clips. One view (the segment middles, the centre square) gives clips
    ``[B, T, 3, S, S]``; ``temporal_views`` x ``spatial_crops`` views (see :class:`Sampling`)
    give ``[B, V, T, 3, S, S]``, temporal-major (``decode: cpu`` only)."""
    _check_rank(rank, world_size, batch_size)
    sampling = Sampling.of(cfg, shardset, temporal_views, spatial_crops)
    if sampling.views > 1 and shardset.is_features:
        raise ConfigError(f"{shardset.url} holds features of one view per clip: evaluate several views from frame shards")
    if sampling.views > 1 and cfg.decode == "gpu":
        raise ConfigError("several views per clip are cut on the CPU: set data.decode cpu for multi-view evaluation")
    lanes = max(1, cfg.num_workers)
    plans = val_plan(shardset, batch_size=batch_size, rank=rank, world_size=world_size, lanes=lanes)
    dataset = _LaneDataset(
        shardset, cfg, plans, sampling=sampling, batch_size=batch_size, skip_batches=0,
        seed_text=None, crop_seed_text=None, fill=False, require_label=False, announce=rank == 0,
    )
    return Loader(dataset, cfg, sum(len(plan.batch_ids) for plan in plans), device)
