"""The streaming pipeline (fusion/data/) against the complaints its peers' users filed:
unequal batches per rank, different orders per rank, no mid-epoch resume, hangs on bad data.

Ranks are simulated in one process by building one loader per ``rank``; tiny shards (a few
4-frame 24x32 clips) are written here with webdataset's TarWriter in the shard format of
architecture.md, so each test controls exactly how many samples sit in which shard.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import webdataset as wds

from fusion.config import ConfigError
from fusion.data import ERROR_KEYS, DataConfig, ShardSet, batches_per_rank, train_loader, val_loader
from fusion.data import loader as loader_module
from fusion.data.loader import FrameSlots, _LaneDataset
from sharding import storage
from sharding.ssv2 import LEFT_RIGHT_PAIRS, TEMPLATES, flip_label

FRAMES = 4
HEIGHT, WIDTH = 24, 32
WORLDS_AND_WORKERS = [(world, workers) for world in (1, 2, 3) for workers in (0, 2)]


def _frame(index: int, mirrored_marker: bool = False) -> np.ndarray:
    """A frame whose left half is dark and right half bright (so a flip is visible)."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:, WIDTH // 2 :] = 200
    image[0, 0] = index % 256  # sample identity survives in the bytes, not in the crop
    return image


def write_shards(folder: Path, sizes: list[int], *, label_of=lambda n: n % 174, extra_member: dict | None = None,
                 templates: list[str] | None = None) -> list[str]:
    """Shards ``shard-%06d.tar`` holding ``sizes[i]`` samples each, plus manifest.json; returns keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, entries, number = [], [], 0
    for shard_index, size in enumerate(sizes):
        name = f"shard-{shard_index:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as writer:
            for _ in range(size):
                key = f"{100000 + number}"
                jpeg = simplejpeg.encode_jpeg(_frame(number), quality=90)
                sample = {"__key__": key, "cls": str(label_of(number)).encode(), "json": json.dumps({"id": key}).encode()}
                sample.update({f"{t:03d}.jpg": jpeg for t in range(FRAMES)})
                sample.update(extra_member or {})
                writer.write(sample)
                keys.append(key)
                number += 1
        entries.append({"name": name, "num_samples": size, "bytes": (folder / name).stat().st_size, "sha256": ""})
    manifest = {
        "format": "ssv2-frames/1", "split": "train", "frames": FRAMES, "short_side": HEIGHT, "jpeg_quality": 90,
        "templates": list(TEMPLATES) if templates is None else templates, "num_samples": sum(sizes), "num_rejected": 0,
        "shards": entries, "args": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return keys


def epoch_keys(shardset: ShardSet, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, epoch: int = 0,
               seed: int = 0, skip_batches: int = 0) -> list[list[str]]:
    loader = train_loader(cfg, shardset, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch,
                          seed=seed, skip_batches=skip_batches)
    batches = [batch["keys"] for batch in loader]
    assert len(batches) == len(loader)
    return batches


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> tuple[ShardSet, list[str]]:
    """24 samples in 6 shards of 4: divides evenly for batch 2 on 1, 2 and 3 ranks."""
    folder = tmp_path_factory.mktemp("even")
    keys = write_shards(folder, [4] * 6)
    return ShardSet.open(str(folder)), keys


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> tuple[ShardSet, list[str]]:
    """9 samples in 3 unequal shards: fewer shards than ranks x workers for 2 and 3 ranks."""
    folder = tmp_path_factory.mktemp("uneven")
    keys = write_shards(folder, [5, 3, 1])
    return ShardSet.open(str(folder)), keys


@pytest.mark.parametrize("world_size,workers", WORLDS_AND_WORKERS)
def test_every_training_key_once_per_epoch_over_ranks(even_shards, world_size, workers, no_hang):
    shardset, keys = even_shards
    cfg = DataConfig(num_workers=workers, crop_size=16, shuffle_window=3)
    per_rank = [epoch_keys(shardset, cfg, batch_size=2, rank=rank, world_size=world_size) for rank in range(world_size)]
    seen = [key for batches in per_rank for batch in batches for key in batch]
    assert sorted(seen) == sorted(keys)
    assert {len(batches) for batches in per_rank} == {len(keys) // (2 * world_size)}


@pytest.mark.parametrize("world_size,workers", WORLDS_AND_WORKERS)
def test_equal_full_batches_per_rank_when_shards_do_not_divide(uneven_shards, world_size, workers, no_hang):
    shardset, keys = uneven_shards
    cfg = DataConfig(num_workers=workers, crop_size=16, shuffle_window=2)
    per_rank = [epoch_keys(shardset, cfg, batch_size=2, rank=rank, world_size=world_size) for rank in range(world_size)]
    expected = batches_per_rank(len(keys), 2, world_size)
    assert [len(batches) for batches in per_rank] == [expected] * world_size
    assert all(len(batch) == 2 for batches in per_rank for batch in batches)
    seen = [key for batches in per_rank for batch in batches for key in batch]
    assert len(seen) == len(set(seen)) == expected * 2 * world_size
    assert set(seen) <= set(keys)


def test_batches_carry_uint8_clips_and_labels(even_shards):
    shardset, keys = even_shards
    cfg = DataConfig(num_workers=0, crop_size=16)
    batch = next(iter(train_loader(cfg, shardset, batch_size=3, rank=0, world_size=1, epoch=0, seed=0)))
    assert batch["clips"].shape == (3, FRAMES, 3, 16, 16) and batch["clips"].dtype == torch.uint8
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == [keys.index(key) % 174 for key in batch["keys"]]


def test_order_changes_with_epoch_and_repeats_with_seed(even_shards):
    shardset, _ = even_shards
    cfg = DataConfig(num_workers=0, crop_size=16, shuffle_window=4)
    first = epoch_keys(shardset, cfg, batch_size=2, rank=0, world_size=2, epoch=0, seed=7)
    again = epoch_keys(shardset, cfg, batch_size=2, rank=0, world_size=2, epoch=0, seed=7)
    next_epoch = epoch_keys(shardset, cfg, batch_size=2, rank=0, world_size=2, epoch=1, seed=7)
    other_seed = epoch_keys(shardset, cfg, batch_size=2, rank=0, world_size=2, epoch=0, seed=8)
    assert first == again
    assert first != next_epoch
    assert first != other_seed


def test_same_order_with_and_without_worker_processes(even_shards):
    """Worker processes change where batches are made, not what is in them."""
    shardset, _ = even_shards
    cfg = DataConfig(num_workers=2, crop_size=16)
    loader = train_loader(cfg, shardset, batch_size=2, rank=1, world_size=2, epoch=0, seed=0)
    from_workers = [batch["keys"] for batch in loader]
    # the same dataset iterated in this process serves its two lanes round-robin itself
    in_process = [batch["keys"] for batch in loader.dataset]
    assert from_workers == in_process


@pytest.mark.parametrize("world_size,workers", WORLDS_AND_WORKERS)
def test_validation_sees_each_clip_exactly_once(uneven_shards, world_size, workers, no_hang):
    shardset, keys = uneven_shards
    cfg = DataConfig(num_workers=workers, crop_size=16)
    seen, total_batches = [], 0
    for rank in range(world_size):
        loader = val_loader(cfg, shardset, batch_size=2, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        total_batches += len(batches)
        for batch in batches:
            assert batch["clips"].shape[0] == len(batch["keys"]) <= 2
            seen.extend(batch["keys"])
    assert sorted(seen) == sorted(keys)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("skip", [1, 3, 5])
def test_skip_batches_resumes_exactly(even_shards, workers, skip, no_hang):
    shardset, _ = even_shards
    cfg = DataConfig(num_workers=workers, crop_size=16, shuffle_window=5)
    args = dict(batch_size=2, rank=1, world_size=2, epoch=3, seed=11)
    full = list(train_loader(cfg, shardset, **args))
    resumed = list(train_loader(cfg, shardset, skip_batches=skip, **args))
    assert len(resumed) == len(full) - skip
    assert [b["keys"] for b in full[:skip] + resumed] == [b["keys"] for b in full]
    for a, b in zip(full[skip:], resumed):
        assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["labels"], b["labels"])


def test_skip_batches_out_of_range_is_refused(even_shards):
    shardset, _ = even_shards
    with pytest.raises(ValueError, match="skip_batches"):
        train_loader(DataConfig(num_workers=0), shardset, batch_size=2, rank=0, world_size=1, epoch=0, seed=0, skip_batches=13)


def test_too_little_data_for_one_batch_per_rank_is_a_clear_error(uneven_shards):
    shardset, _ = uneven_shards
    with pytest.raises(ValueError, match="cannot fill one batch"):
        train_loader(DataConfig(num_workers=0), shardset, batch_size=4, rank=0, world_size=3, epoch=0, seed=0)


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory) -> tuple[ShardSet, list[str]]:
    """Shards where one sample has a garbage frame and one shard is cut in the middle."""
    folder = tmp_path_factory.mktemp("damaged")
    keys = write_shards(folder, [4, 4, 4, 4])
    bad_key = keys[1]
    # rewrite shard 0 with one unreadable JPEG inside sample keys[1]
    samples = list(wds.WebDataset(str(folder / "shard-000000.tar"), shardshuffle=False))
    with wds.TarWriter(str(folder / "shard-000000.tar"), encoder=False) as writer:
        for sample in samples:
            clean = {k: v for k, v in sample.items() if k in ("__key__",) or not k.startswith("__")}
            if clean["__key__"] == bad_key:
                clean["002.jpg"] = b"\xff\xd8 this is not a jpeg"
            writer.write(clean)
    shard = folder / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return ShardSet.open(str(folder)), keys


# batch sizes chosen so that the epoch reaches into every shard (the dropped tail is < 4)
@pytest.mark.parametrize("world_size,workers,batch_size", [(1, 0, 2), (2, 2, 2), (3, 0, 1), (3, 2, 1)])
def test_corrupt_sample_and_truncated_shard_are_skipped_counted_and_batches_stay_equal(damaged_shards, world_size, workers, batch_size, no_hang):
    shardset, keys = damaged_shards
    cfg = DataConfig(num_workers=workers, crop_size=16, shuffle_window=4)
    stats, lengths = [], []
    for rank in range(world_size):
        loader = train_loader(cfg, shardset, batch_size=batch_size, rank=rank, world_size=world_size, epoch=0, seed=0)
        batches = list(loader)
        lengths.append(len(batches))
        assert all(b["clips"].shape[0] == batch_size for b in batches)
        assert keys[1] not in {key for b in batches for key in b["keys"]}
        stats.append(loader.stats)
    assert lengths == [batches_per_rank(len(keys), batch_size, world_size)] * world_size
    assert sum(s["corrupt_samples"] for s in stats) >= 1
    assert sum(s["corrupt_shards"] for s in stats) >= 1


def test_damaged_data_still_resumes_exactly(damaged_shards, no_hang):
    shardset, _ = damaged_shards
    cfg = DataConfig(num_workers=0, crop_size=16, shuffle_window=3)
    args = dict(batch_size=2, rank=0, world_size=1, epoch=2, seed=5)
    full = [b["keys"] for b in train_loader(cfg, shardset, **args)]
    resumed = [b["keys"] for b in train_loader(cfg, shardset, skip_batches=4, **args)]
    assert full[:4] + resumed == full


def test_validation_skips_damaged_clips_and_counts_them(damaged_shards, no_hang):
    shardset, keys = damaged_shards
    loader = val_loader(DataConfig(num_workers=0, crop_size=16), shardset, batch_size=3, rank=0, world_size=1)
    seen = [key for batch in loader for key in batch["keys"]]
    assert len(seen) == len(set(seen)) and keys[1] not in seen
    assert set(keys[:4]) - {keys[1]} <= set(seen) and set(keys[12:]) <= set(seen)
    assert loader.stats["corrupt_samples"] == 1 and loader.stats["corrupt_shards"] == 1


def test_unreadable_shard_is_skipped_without_waiting(tmp_path, no_hang):
    """A shard that cannot be read for a reason that will not go away (here a folder where the
    file should be) is skipped and counted at once: only an unreachable store is waited for."""
    keys = write_shards(tmp_path / "shards", [2, 2, 2])
    shard = tmp_path / "shards" / "shard-000001.tar"
    shard.unlink()
    shard.mkdir()
    shardset = ShardSet.open(str(tmp_path / "shards"))
    loader = train_loader(DataConfig(num_workers=0, crop_size=16), shardset, batch_size=2, rank=0, world_size=1, epoch=0, seed=0)
    batches = [b["keys"] for b in loader]
    assert len(batches) == 3 and all(len(b) == 2 for b in batches)
    assert not {keys[2], keys[3]} & {key for b in batches for key in b}
    assert loader.stats["read_retries"] == 0 and loader.stats["corrupt_shards"] >= 1
    assert loader.stats["refilled_samples"] >= 2


def test_nothing_readable_is_a_clear_error_not_a_hang(tmp_path, no_hang):
    write_shards(tmp_path / "shards", [3], label_of=lambda n: 999)  # every label out of range
    shardset = ShardSet.open(str(tmp_path / "shards"))
    loader = train_loader(DataConfig(num_workers=0, crop_size=16), shardset, batch_size=1, rank=0, world_size=1, epoch=0, seed=0)
    with pytest.raises(RuntimeError, match="readable samples"):
        list(loader)


class _Trap:
    """Unpickling this creates ``path``: proof that a reader unpickled shard content."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    trap = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(str(trap)))
    write_shards(tmp_path / "shards", [3], extra_member={"pyd": payload, "pickle": payload})
    shardset = ShardSet.open(str(tmp_path / "shards"))
    cfg = DataConfig(num_workers=0, crop_size=16)
    keys = [key for b in train_loader(cfg, shardset, batch_size=1, rank=0, world_size=1, epoch=0, seed=0) for key in b["keys"]]
    keys += [key for b in val_loader(cfg, shardset, batch_size=1, rank=0, world_size=1) for key in b["keys"]]
    assert len(keys) == 6
    assert not trap.exists()


def test_flip_swaps_left_right_labels_with_the_pixels(tmp_path):
    pair = LEFT_RIGHT_PAIRS[0]
    write_shards(tmp_path / "shards", [16], label_of=lambda n: pair[n % 2])
    shardset = ShardSet.open(str(tmp_path / "shards"))
    # min_crop_area=1 with a non-square frame: always the centre square, so only the flip varies
    cfg = DataConfig(num_workers=0, crop_size=16, flip=True, min_crop_area=1.0)
    flipped = kept = 0
    for batch in train_loader(cfg, shardset, batch_size=4, rank=0, world_size=1, epoch=0, seed=0):
        for key, clip, label in zip(batch["keys"], batch["clips"], batch["labels"].tolist()):
            original = pair[(int(key) - 100000) % 2]
            mirrored = clip[..., :4].float().mean() > clip[..., -4:].float().mean()
            assert label == (flip_label(original) if mirrored else original)
            flipped += int(mirrored)
            kept += int(not mirrored)
    assert flipped and kept
    assert flip_label(86) == 87 and flip_label(87) == 86 and flip_label(5) == 5


def test_flip_is_refused_when_the_manifest_has_other_labels(tmp_path):
    # the left/right swap uses SSv2's ids: a relabelled dataset would get its labels corrupted
    swapped = list(TEMPLATES)
    swapped[86], swapped[5] = swapped[5], swapped[86]
    cases = {"relabelled": swapped, "partial": list(TEMPLATES[:10]), "none": []}
    for name, templates in cases.items():
        write_shards(tmp_path / name, [2], templates=templates)
        shardset = ShardSet.open(str(tmp_path / name))
        with pytest.raises(ConfigError, match="data.flip") as error:
            train_loader(DataConfig(num_workers=0, crop_size=16, flip=True), shardset, batch_size=1, rank=0, world_size=1,
                         epoch=0, seed=0)
        assert str(tmp_path / name) in str(error.value) and "set data.flip false" in str(error.value)
        # without flip the same shards are fine: the labels are used as they are
        assert len(train_loader(DataConfig(num_workers=0, crop_size=16), shardset, batch_size=1, rank=0, world_size=1,
                                epoch=0, seed=0)) == 2
    with pytest.raises(ConfigError) as error:
        ShardSet.open(str(tmp_path / "relabelled")).check_flip_labels()
    assert f"label 5 of {tmp_path / 'relabelled'}/manifest.json is {TEMPLATES[86]!r}, SSv2's is {TEMPLATES[5]!r}" in str(error.value)


def test_validation_is_a_centre_crop_without_flip(tmp_path):
    write_shards(tmp_path / "shards", [2], label_of=lambda n: 86)
    shardset = ShardSet.open(str(tmp_path / "shards"))
    cfg = DataConfig(num_workers=0, crop_size=HEIGHT, flip=True)
    batch = next(iter(val_loader(cfg, shardset, batch_size=2, rank=0, world_size=1)))
    left = (WIDTH - HEIGHT) // 2
    expected = torch.from_numpy(simplejpeg.decode_jpeg(simplejpeg.encode_jpeg(_frame(0), quality=90)))
    expected = expected.permute(2, 0, 1)[:, :, left : left + HEIGHT]
    assert torch.equal(batch["clips"][0, 0], expected)
    assert batch["labels"].tolist() == [86, 86]


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json.*make_shards"):
        ShardSet.open(str(tmp_path))


def test_bad_config_values_are_refused():
    with pytest.raises(ConfigError, match="num_workers"):
        DataConfig(num_workers=-1)
    with pytest.raises(ConfigError, match="min_crop_area"):
        DataConfig(min_crop_area=0.0)


@pytest.mark.slow
def test_reads_shards_from_a_real_s3_bucket(s3_env, s3_server, tmp_path, no_hang):
    keys = write_shards(tmp_path / "shards", [3, 2, 2])
    client = s3_server.client()
    for path in sorted((tmp_path / "shards").iterdir()):
        client.upload_file(str(path), s3_env, f"train/{path.name}")
    shardset = ShardSet.open(f"s3://{s3_env}/train")
    cfg = DataConfig(num_workers=2, crop_size=16)
    seen = [key for rank in range(2)
            for batch in val_loader(cfg, shardset, batch_size=2, rank=rank, world_size=2) for key in batch["keys"]]
    assert sorted(seen) == sorted(keys)
    trained = [key for batch in train_loader(cfg, shardset, batch_size=2, rank=0, world_size=1, epoch=0, seed=0) for key in batch["keys"]]
    assert len(trained) == len(set(trained)) == 6


@pytest.mark.slow
def test_refused_credentials_mid_run_stop_the_loader(s3_env, s3_server, tmp_path, monkeypatch, no_hang):
    write_shards(tmp_path / "shards", [2, 2])
    client = s3_server.client()
    for path in sorted((tmp_path / "shards").iterdir()):
        client.upload_file(str(path), s3_env, f"train/{path.name}")
    shardset = ShardSet.open(f"s3://{s3_env}/train")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "expired")  # as when a token expires during a run
    loader = train_loader(DataConfig(num_workers=0, crop_size=16), shardset, batch_size=2, rank=0, world_size=1, epoch=0, seed=0)
    with pytest.raises(storage.StorageAccessError, match="HTTP 403"):
        list(loader)


@pytest.mark.slow
def test_s3_errors_are_clear_before_training(s3_env, s3_server, monkeypatch):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardSet.open(f"s3://{s3_env}/nothing-here")
    with pytest.raises(storage.StorageError, match="does not exist"):
        ShardSet.open(f"s3://{s3_env}-missing/train")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(storage.StorageError, match="denied"):
        ShardSet.open(f"s3://{s3_env}/train")


@pytest.mark.slow
def test_reads_make_shards_output(synthetic_shards, no_hang):
    shardset = ShardSet.open(str(synthetic_shards / "train"))
    cfg = DataConfig(num_workers=0, crop_size=32)
    loader = train_loader(cfg, shardset, batch_size=2, rank=0, world_size=1, epoch=0, seed=0)
    batch = next(iter(loader))
    assert batch["clips"].shape == (2, shardset.frames, 3, 32, 32)
    assert all(0 <= label < shardset.num_classes for label in batch["labels"].tolist())
    assert not any(loader.stats[key] for key in ERROR_KEYS) and loader.stats["samples_read"] >= 2


def test_bytes_only_path_decodes_the_same_clips(even_shards, no_hang):
    """``decode: gpu`` with device="cpu": workers move only JPEG bytes and crop boxes, the
    batch is decoded by torchvision in this process; same keys, labels and pixels."""
    shardset, _ = even_shards
    args = dict(batch_size=4, rank=0, world_size=1, epoch=0, seed=0)
    cpu = list(train_loader(DataConfig(num_workers=2, crop_size=16, flip=True), shardset, **args))
    raw = list(train_loader(DataConfig(num_workers=2, crop_size=16, flip=True, decode="gpu"), shardset, device="cpu", **args))
    assert [b["keys"] for b in raw] == [b["keys"] for b in cpu]
    for a, b in zip(cpu, raw):
        assert torch.equal(a["labels"], b["labels"])
        assert (a["clips"].int() - b["clips"].int()).abs().max() <= 2
    # what a worker sends holds plain bytes: a tensor would cross as a shared-memory file of its own
    sent = next(iter(train_loader(DataConfig(num_workers=2, crop_size=16, decode="gpu"), shardset, **args).dataset))
    assert {type(jpeg) for clip in sent["encoded"] for jpeg in clip["jpegs"]} == {bytes}


def test_bytes_only_path_skips_and_counts_a_clip_that_does_not_decode(damaged_shards, no_hang):
    shardset, keys = damaged_shards  # keys[1] has a frame whose header parses but whose data does not
    cfg = DataConfig(num_workers=0, crop_size=16, decode="gpu")
    loader = val_loader(cfg, shardset, batch_size=2, rank=0, world_size=1, device="cpu")
    batches = list(loader)
    seen = [key for batch in batches for key in batch["keys"]]
    assert keys[1] not in seen and loader.stats["corrupt_samples"] >= 1
    assert [tuple(b["clips"].shape[1:]) for b in batches] == [(shardset.frames, 3, 16, 16)] * len(batches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_matches_cpu_decode_in_shape_and_keys(even_shards):
    shardset, _ = even_shards
    args = dict(batch_size=4, rank=0, world_size=1, epoch=0, seed=0)
    cpu = next(iter(train_loader(DataConfig(num_workers=0, crop_size=16), shardset, **args)))
    gpu = next(iter(train_loader(DataConfig(num_workers=0, crop_size=16, decode="gpu"), shardset, **args)))
    assert gpu["keys"] == cpu["keys"] and gpu["clips"].is_cuda
    assert gpu["clips"].shape == cpu["clips"].shape
    # nvJPEG and libjpeg-turbo differ by a few levels per pixel at most
    assert (gpu["clips"].cpu().int() - cpu["clips"].int()).abs().float().mean() < 3


@pytest.mark.parametrize("workers", [0, 2])
def test_cropping_on_the_device_gives_the_workers_pixels(even_shards, workers, no_hang):
    """``data.resize_on: device`` moves the crop, resize and flip out of the workers; on a CPU
    the device is the CPU, and every batch must be what the workers would have made."""
    shardset, _ = even_shards
    made = {}
    for where in ("worker", "device"):
        cfg = DataConfig(num_workers=workers, crop_size=16, shuffle_window=3, flip=True, resize_on=where)
        loaders = [train_loader(cfg, shardset, batch_size=2, rank=0, world_size=1, epoch=1, seed=5),
                   val_loader(cfg, shardset, batch_size=4, rank=0, world_size=1)]
        assert [loader.dataset.cut_on_device for loader in loaders] == [where == "device"] * 2
        train, val = (list(loader) for loader in loaders)
        made[where] = [(b["keys"], b["labels"].tolist(), b["clips"]) for b in train + val]
    assert len(made["device"]) == len(made["worker"]) > 0
    for (keys, labels, clips), (keys_w, labels_w, clips_w) in zip(made["device"], made["worker"]):
        assert keys == keys_w and labels == labels_w
        assert clips.dtype == torch.uint8 and torch.equal(clips, clips_w)


@pytest.mark.parametrize("room", ["enough", "none", "no shared memory"])
def test_workers_send_batches_through_shared_slots(even_shards, room, monkeypatch, caplog, no_hang):
    """With workers, a batch's pixels (cut clips, or with ``data.resize_on: device`` whole
    frames) cross to the training process through :class:`FrameSlots`, a few regions each
    worker reuses in turn (here 3 for 6 batches a worker, so each region is reused), and every
    batch is still exactly what one process makes of the same lanes. Without room for a batch,
    it goes the DataLoader's way and is counted; without room in /dev/shm, every batch does."""
    shardset, _ = even_shards
    released = []
    monkeypatch.setattr(FrameSlots, "release", lambda self, placed, real=FrameSlots.release: (
        released.append((placed["worker"], placed["number"])), real(self, placed)))
    if room == "none":
        monkeypatch.setattr(_LaneDataset, "frame_slot_bytes", lambda self: 1)
    if room == "no shared memory":
        monkeypatch.setattr(loader_module, "shared_memory_fits", lambda size: False)
    args = dict(batch_size=2, rank=0, world_size=1, epoch=0, seed=3)
    made, misses = {}, {}
    for where in ("worker", "device"):
        cfg = DataConfig(num_workers=2, crop_size=16, shuffle_window=3, flip=True, resize_on=where, prefetch_batches=1)
        loader = train_loader(cfg, shardset, **args)
        made[where] = [(b["keys"], b["clips"]) for b in loader]
        misses[where] = loader.stats.get("frame_slot_misses", 0)
    # the same two lanes in this process, no slots, no hand-over
    cfg = DataConfig(num_workers=2, crop_size=16, shuffle_window=3, flip=True, prefetch_batches=1)
    reference = [(b["keys"], b["clips"]) for b in train_loader(cfg, shardset, **args).dataset]
    assert len(reference) == 12
    for where in ("worker", "device"):
        assert [keys for keys, _ in made[where]] == [keys for keys, _ in reference]
        assert all(torch.equal(clips, clips_r) for (_, clips), (_, clips_r) in zip(made[where], reference))
    batches = [(worker, number) for worker in (0, 1) for number in range(6)]
    if room == "enough":
        assert misses == {"worker": 0, "device": 0} and sorted(released) == sorted(batches * 2)
    elif room == "none":
        assert misses == {"worker": 12, "device": 12} and released == []
    else:
        assert misses == {"worker": 0, "device": 0} and released == []
        assert caplog.text.count("/dev/shm") == 2


def test_refills_cross_through_the_slots_too(damaged_shards, no_hang):
    """Lost samples make a lane decode stand-ins, some of which its next batch takes as its own
    (their frames then lie in the previous batch's region and are copied over); a worker decodes
    whole frames straight into its shared region: still every batch is the one-process batch."""
    shardset, _ = damaged_shards
    args = dict(batch_size=2, rank=0, world_size=1, epoch=0, seed=1)
    cfg = DataConfig(num_workers=2, crop_size=16, shuffle_window=3, resize_on="device", prefetch_batches=1)
    loader = train_loader(cfg, shardset, **args)
    made = [(b["keys"], b["clips"]) for b in loader]
    reference = [(b["keys"], b["clips"]) for b in train_loader(
        DataConfig(num_workers=2, crop_size=16, shuffle_window=3, prefetch_batches=1), shardset, **args).dataset]
    assert [keys for keys, _ in made] == [keys for keys, _ in reference] and len(made) == 8
    assert all(torch.equal(clips, clips_r) for (_, clips), (_, clips_r) in zip(made, reference))
    assert loader.stats["refilled_samples"] > 0 and loader.stats["frame_slot_misses"] == 0


def test_a_frame_slot_in_use_is_not_written():
    """A worker's region is written again only once the training process released the batch
    that used it: until then placing refuses (the batch goes the other way)."""
    slots = FrameSlots(workers=2, slots=2, slot_bytes=2 * 3 * 4 * 5)
    frames = [torch.arange(2 * 4 * 5 * 3, dtype=torch.uint8).view(2, 4, 5, 3).permute(0, 3, 1, 2)]
    first, second = (slots.place_frames(1, number, frames) for number in (0, 1))
    assert first is not None and second is not None and slots.place_frames(0, 0, frames) is not None
    assert torch.equal(slots.frames(first)[0], frames[0]) and slots.frames(first)[0].shape == (2, 3, 4, 5)
    assert slots.place_frames(1, 2, frames) is None  # batch 0's region: still in use
    slots.release(first)
    third = slots.place_frames(1, 2, [frames[0].flip(0)])
    assert third is not None and third["layout"] == first["layout"]
    assert torch.equal(slots.frames(third)[0], frames[0].flip(0)) and torch.equal(slots.frames(second)[0], frames[0])
    assert slots.place_frames(1, 3, frames * 2) is None  # two clips do not fit one region
    # a batch of cut clips: stacked into the region, copied out, the region released
    clips = [torch.full((1, 3, 2, 2), value, dtype=torch.uint8) for value in (7, 9)]
    assert slots.place_batch(1, 3, clips) is None  # batch 1's region: still in use
    slots.release(second)
    placed = slots.place_batch(1, 3, clips)
    batch = slots.take_batch(placed, pin=False)
    assert torch.equal(batch, torch.stack(clips)) and int(slots.released[1]) == 4
    assert slots.place_batch(0, 1, clips * 6) is None  # 144 bytes: more than a region


def test_bench_loader_times_every_path(synthetic_shards):
    """``launch.bench_loader`` on real shards: a row for each reference and each loader path,
    each with its ratio to the floor; too few clips for two batches is a clear error."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "launch.bench_loader", "--shards", str(synthetic_shards / "train"), "--batch-size", "2",
               "--frames", "4", "--workers", "0,1", "--rounds", "2", "--in-memory"]
    before = set(Path("/dev/shm").glob("bench_loader_*"))
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # timed on a copy in tmpfs, removed afterwards
    assert result.stdout.startswith("shards: /dev/shm/bench_loader_") and set(Path("/dev/shm").glob("bench_loader_*")) == before
    rows = {line[:50].strip(): line[50:].split() for line in result.stdout.splitlines() if line[50:].rstrip().endswith("x")}
    assert set(rows) == {
        "JPEG decode only (simplejpeg, floor)", "JPEG decode into kept clip arrays", "train_loader, 0 workers, crop 224",
        "train_loader, 1 workers, crop 224", "loader process, resize_on device (decode only)", "loader process, decode only, whole frames",
        "loader process, decoder stubbed (its own work)", "train_loader, resize_on device = this CPU", "1 workers -> trainer, resize_on device",
        "loader process, decode gpu (bytes only)", "1 workers -> trainer, decode gpu (here: cpu)",
        "naive: PyAV .webm decode + sample T frames"}
    assert rows["JPEG decode only (simplejpeg, floor)"][3] == "1.00x"
    assert all(float(row[3].rstrip("x")) > 0 for row in rows.values())
    assert rows["1 workers -> trainer, resize_on device"][5] != "-"  # the workers' share of the CPU

    short = subprocess.run(command[:-5] + ["--batch-size", "8"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert short.returncode != 0 and "needs at least two batches of --batch-size 8" in short.stderr


def test_bench_loader_names_the_paths_that_waited_and_copies_only_local_folders(tmp_path):
    """A one-process path whose CPU time falls short of its wall time (a loader waiting for
    its reads) is named with the share it waited; worker paths (CPU of two processes) are not
    judged; ``--in-memory`` refuses what is not a local folder, saying what to do."""
    from launch.bench_loader import in_memory_copy, off_cpu_paths

    paths = [("floor", 1, None), ("waits", 1, None), ("workers", 1, None)]
    rates = {"floor": [250.0], "waits": [100.0, 90.0, 110.0], "workers": [100.0]}  # 4 and 10 ms a clip
    cpu = {"floor": [3.9], "waits": [8.0, 8.1, 7.9], "workers": [5.0]}
    worker_cpu = {"floor": [], "waits": [], "workers": [4.0]}
    assert off_cpu_paths(paths, rates, cpu, worker_cpu) == [("waits", pytest.approx(0.2))]
    assert off_cpu_paths(paths, rates, {**cpu, "waits": [9.6]}, worker_cpu) == []  # within 5 %

    for shards in ("s3://bucket/train", str(tmp_path / "missing")):
        with pytest.raises(SystemExit, match="copies a local shard folder"):
            in_memory_copy(shards, tmp_path)


def test_bench_loader_floor_decodes_the_frames_the_loader_decodes(synthetic_shards):
    """The floor of ``launch.bench_loader`` decodes the same bytes as the loader it is compared
    with: the frames the timed loader decodes, of the clips it delivers after its first batch,
    in its order (the decode-only loader's frames are those bytes, decoded)."""
    from launch.bench_loader import loader_clips

    shardset = ShardSet.open(str(synthetic_shards / "train"))
    keys, jpegs = loader_clips(shardset, batch_size=2, crop_size=32, clips=4, frames=3)
    # whole frames, to compare with the floor's (region decoding is exact: its own test)
    cfg = DataConfig(num_workers=0, crop_size=32, frames=3, shuffle_window=2, resize_on="device", region_decode=False)
    loader = train_loader(cfg, shardset, batch_size=2, rank=0, world_size=1, epoch=0, seed=0)
    batches = [batch for _, batch in zip(range(3), loader.dataset)][1:]  # the first batch is not timed
    assert keys == [key for batch in batches for key in batch["keys"]] and len(keys) == 4
    decoded = [clip["frames"] for batch in batches for clip in batch["decoded"]]
    for frames, clip_jpegs in zip(decoded, jpegs):
        assert len(clip_jpegs) == 3
        expected = np.stack([simplejpeg.decode_jpeg(jpeg, colorspace="RGB") for jpeg in clip_jpegs])
        assert torch.equal(frames.permute(0, 2, 3, 1), torch.from_numpy(expected))
