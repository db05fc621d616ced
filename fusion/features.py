"""Feature shards: the frozen backbones' outputs, cached once, so that the head trains (and
every ablation of it runs) without the ~270 GFLOPs a clip of the backbones' forward pass.

``launch/extract_features.py`` writes them; ``fusion.data`` reads them wherever it reads frame
shards (the manifest's ``format`` says which), and ``launch/train.py`` then trains the same
head on them with the same checkpoints, resume, metrics and validation.

A feature shard is a WebDataset tar with, per clip ``KEY`` (the frame shard's key)::

    KEY.sem.npy    semantic features [V, T, Ds]   fp16 (default) or fp32, .npy without pickle
    KEY.mot.npy    motion features   [V, T', Dm]  same dtype
    KEY.cls        label id as ASCII digits (-1: unlabelled)
    KEY.json       {"labels": [label of each view]}: a view cut flipped has SSv2's mirrored label

``V`` is the number of views. A training split's view ``v`` is exactly what the training loader
would cut from the frames in epoch ``v`` with the extraction's seed (random frame per segment,
random resized crop, flip), and a training run's epoch ``e`` reads view ``e mod V``: with
``V`` views the first ``V`` epochs from features see the crops a run from frames would see.
Other splits hold one view, the centre one the validation loader cuts. Arrays are read with ``allow_pickle=False`` and
checked against the manifest's shapes and dtype before use: a sample that fails is skipped and
counted like a corrupt frame sample.

The manifest (``manifest.json``, format :data:`FEATURES_FORMAT`) lists the shards as a frame
manifest does (name, num_samples, bytes, sha256) and records in ``features`` what made them:
the backbones (name, size, image size, weight file and its sha256, or the seed of a random
initialisation), their dtype, the frames and crop of the loader, the views, the array shapes
and the frame shards they came from. :func:`check_compatible` compares that with a run's config
and refuses features made by another model, naming every difference.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.config import ConfigError

FEATURES_FORMAT = "ssv2-features/1"
SEMANTIC_MEMBER, MOTION_MEMBER = "sem.npy", "mot.npy"
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
# A .npy header is 128 bytes for these shapes; allow a little more, never a different size.
NPY_HEADER_SLACK = 4096


class CorruptFeatures(ValueError):
    """A feature sample whose members do not match the manifest."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class FeatureSpec:
    """What every sample of a feature shard set holds, from its manifest."""

    views: int
    semantic_shape: tuple[int, int]  # (T, Ds)
    motion_shape: tuple[int, int]  # (T', Dm)
    dtype: str

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> "FeatureSpec":
        info = manifest["features"]
        return cls(views=int(info["views"]), semantic_shape=tuple(info["semantic_shape"]),
                   motion_shape=tuple(info["motion_shape"]), dtype=str(info["dtype"]))

    def member_limit(self, extension: str) -> int:
        """Largest acceptable member size in bytes (the tar reader skips larger ones unread)."""
        if extension in (SEMANTIC_MEMBER, MOTION_MEMBER):
            shape = self.semantic_shape if extension == SEMANTIC_MEMBER else self.motion_shape
            itemsize = np.dtype(STORE_DTYPES[self.dtype]).itemsize
            return self.views * shape[0] * shape[1] * itemsize + NPY_HEADER_SLACK
        return 1 << 20


def _array(sample: dict[str, Any], extension: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    data = sample.get(extension)
    if not isinstance(data, (bytes, memoryview)):  # a memoryview: of the sample's piece (fusion.data.read)
        raise CorruptFeatures(f"no readable {extension} member" + (f" ({data})" if data is not None else ""))
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:  # also what a pickled (object) array raises with allow_pickle=False
        raise CorruptFeatures(f"{extension} is not a plain .npy array: {error}") from None
    except (OSError, EOFError) as error:
        raise CorruptFeatures(f"{extension} is truncated or not .npy: {error}") from None
    if array.dtype != np.dtype(STORE_DTYPES[dtype]) or array.shape != shape:
        raise CorruptFeatures(f"{extension} is {array.dtype} {list(array.shape)}, the manifest says {dtype} {list(shape)}")
    if not np.isfinite(array).all():
        raise CorruptFeatures(f"{extension} holds NaN or infinite values")
    return array


def decode_features(sample: dict[str, Any], spec: FeatureSpec, view: int, label: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One feature sample -> (semantic fp32 [T, Ds], motion fp32 [T', Dm], label) of view
    ``view``; ``label`` is the sample's ``.cls``, replaced by the view's own label when the
    view was cut flipped (SSv2's left/right classes swap). Raises :class:`CorruptFeatures`."""
    semantic = _array(sample, SEMANTIC_MEMBER, (spec.views, *spec.semantic_shape), spec.dtype)
    motion = _array(sample, MOTION_MEMBER, (spec.views, *spec.motion_shape), spec.dtype)
    if isinstance(sample.get("json"), (bytes, memoryview)) and label >= 0:
        try:
            labels = json.loads(bytes(sample["json"]))["labels"]
            label = int(labels[view])
        except (ValueError, KeyError, IndexError, TypeError):
            raise CorruptFeatures("the json member is not a record of the views' labels") from None
    return torch.from_numpy(semantic[view].astype(np.float32)), torch.from_numpy(motion[view].astype(np.float32)), label


# ----------------------------------------------------------------------------- what made them


def backbone_record(name: str, size: str, weights: str | None, init_seed: int, **extra: Any) -> dict[str, Any]:
    """How one backbone was built: enough to tell whether a config would build the same."""
    record = {"name": name, "size": size, **extra, "weights": str(weights) if weights else None,
              "weights_sha256": file_sha256(weights) if weights else None}
    if not weights:
        record["init_seed"] = init_seed  # random weights: the same seed builds the same backbone
    return record


def expected_record(model_cfg: Any, frames: int, crop_size: int, semantic_dim: int, motion_dim: int, seed: int) -> dict[str, Any]:
    """What feature shards made with this model config, ``frames`` per clip and ``crop_size``
    crops record (the fields that :func:`check_compatible` compares)."""
    return {
        "semantic": backbone_record(model_cfg.semantic.name, model_cfg.size, model_cfg.semantic.weights, seed,
                                    img_size=model_cfg.semantic.img_size, dim=semantic_dim),
        "motion": backbone_record(model_cfg.motion.name, model_cfg.size, model_cfg.motion.weights, seed, dim=motion_dim),
        "frames": frames,
        "crop_size": crop_size,
    }


def check_compatible(manifest: dict[str, Any], where: str, expected: dict[str, Any]) -> None:
    """Refuse feature shards that another model made: every difference between the manifest's
    record and ``expected`` (from :func:`expected_record`) is named in one ConfigError."""
    info = manifest.get("features") or {}
    differences = []
    for stream in ("semantic", "motion"):
        made, wanted = info.get(stream) or {}, expected[stream]
        for key in ("name", "size", "img_size", "dim", "weights_sha256"):
            if key in wanted and made.get(key) != wanted[key]:
                what = {"weights_sha256": "weights"}.get(key, key)
                made_value = made.get("weights") or "random" if key == "weights_sha256" else made.get(key)
                wanted_value = wanted.get("weights") or "random" if key == "weights_sha256" else wanted[key]
                differences.append(f"model.{stream}.{what}: features {made_value}, config {wanted_value}")
    for key, config_key in (("frames", "data.frames"), ("crop_size", "data.crop_size")):
        if info.get(key) != expected[key]:
            differences.append(f"{config_key}: features {info.get(key)}, config {expected[key]}")
    if differences:
        raise ConfigError(
            f"{where} holds features made by another model or loader ({'; '.join(differences)}): extract features with "
            "this config (launch/extract_features.py --config ...) or train with the config that made them"
        )
