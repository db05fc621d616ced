"""What every stage of the loader shares: :class:`DataConfig` (the ``data.*`` keys),
:class:`ShardSet` (a shard folder or bucket prefix opened through its ``manifest.json``), the
limits a sample must keep (:class:`FrameLimits`) and the counters and warnings of bad data
(:class:`DataEvents`, :data:`ERROR_KEYS`, :data:`READ_KEYS`)."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from fusion.config import ConfigError, option
from fusion.features import FEATURES_FORMAT, FeatureSpec
from sharding import storage
from sharding.shard_index import check_checksums, check_offsets
from sharding.ssv2 import NUM_CLASSES, TEMPLATES

if TYPE_CHECKING:
    from fusion.data.plan import Segment


log = logging.getLogger("fusion.data")  # one logger for every stage (tests and the trainer listen to it)

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
    region_decode: bool = option(
        True, "decode only each training crop's region of the frames (libjpeg-turbo 3's cropped decode, from the "
              "turbojpeg wheel): the same pixels, 15-19 % less CPU a clip in a decode-only loader process "
              "(launch.bench_loader); false, or without that wheel, whole frames")
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
            if "offsets" in entry or "crc32c" in entry:
                problem = (check_offsets(entry.get("offsets"), entry["num_samples"], entry.get("bytes"))
                           or ("crc32c" in entry and check_checksums(entry["crc32c"], entry["num_samples"])))
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

    def checksums(self, name: str) -> list[int] | None:
        """The CRC-32C of each sample's bytes of shard ``name`` (:mod:`sharding.shard_index`), or
        None for a shard indexed before checksums were."""
        return self._entries[name].get("crc32c")

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
