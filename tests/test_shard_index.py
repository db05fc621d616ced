"""The sample index (sharding/shard_index.py) and the ranged reads it allows: a loader lane
reads the bytes of its own samples and nothing else, from a folder and from a real S3 server.

Shards are the tiny ones of tests/test_data.py; make_shards' own are checked against a scan.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from fusion.data import DataConfig, ShardSet, TarStream, train_loader, train_plan, val_loader, val_plan
from fusion.data.common import FrameLimits
from fusion.data.read import _checked_piece_sample, _PieceReader, _shard_samples
from sharding import storage
from sharding.shard_index import SampleCrcs, crc32c, index_manifest, sample_offsets
from tests.test_data import write_shards

REPO = Path(__file__).resolve().parents[1]


def members_of(piece: bytes) -> list[str]:
    """Member names of a run of tar members read as a stream (as the loader reads a range)."""
    return [member.name for member in tarfile.open(fileobj=io.BytesIO(piece), mode="r|")]


def test_offsets_cut_a_shard_into_exactly_its_samples(tmp_path):
    keys = write_shards(tmp_path, [5, 3])
    assert index_manifest(str(tmp_path), progress=False) == (2, 0)
    shardset = ShardSet.open(str(tmp_path))
    first = 0
    for name, size in zip(shardset.shards, shardset.shard_sizes):
        data, offsets = (tmp_path / name).read_bytes(), shardset.offsets(name)
        assert offsets[0] == 0 and len(offsets) == size + 1
        assert set(data[offsets[-1]:]) == {0}  # only the end-of-archive blocks follow the last sample
        for index in range(size):
            names = members_of(data[offsets[index]:offsets[index + 1]])
            assert {n.split(".", 1)[0] for n in names} == {keys[first + index]} and len(names) == 4 + 2
        # any run of samples is a tar stream of exactly those samples
        assert len(members_of(data[offsets[1]:offsets[size]])) == (size - 1) * 6
        first += size


def test_make_shards_writes_the_index_a_scan_finds(synthetic_shards):
    manifest = json.loads((synthetic_shards / "train" / "manifest.json").read_text())
    for entry in manifest["shards"]:
        with open(synthetic_shards / "train" / entry["name"], "rb") as handle:
            streamed = sample_offsets(io.BufferedReader(io.BytesIO(handle.read())))  # read through, as from S3
        assert entry["offsets"] == streamed and len(streamed) == entry["num_samples"] + 1
        data = (synthetic_shards / "train" / entry["name"]).read_bytes()
        assert entry["crc32c"] == [crc32c(data[a:b]) for a, b in zip(streamed, streamed[1:])]


def test_the_sample_checksums_find_the_damaged_sample_in_any_chunking(synthetic_shards):
    """sharding.shard_index.SampleCrcs (the node cache's check as a shard downloads): fed a
    shard in pieces of any size, it checks every sample, and names the one a flipped byte hit."""
    entry = json.loads((synthetic_shards / "train" / "manifest.json").read_text())["shards"][0]
    data = (synthetic_shards / "train" / entry["name"]).read_bytes()
    damaged = bytearray(data)
    damaged[(entry["offsets"][1] + entry["offsets"][2]) // 2] ^= 1  # inside sample 1
    for chunk in (7, 512, 1000, 1 << 20):
        for content, failed in ((data, []), (bytes(damaged), [1])):
            crcs = SampleCrcs(entry["offsets"])
            for start in range(0, len(content), chunk):
                crcs.update(content[start:start + chunk])
            assert crcs.complete and crcs.mismatches(entry["crc32c"]) == failed


def test_the_scan_command_indexes_old_shards_and_refuses_foreign_ones(tmp_path):
    write_shards(tmp_path, [4, 2])
    command = [sys.executable, "-m", "sharding.shard_index", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "indexed 2 shard(s)" in result.stdout, result.stderr
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "indexed 0 shard(s), 2 already had offsets and crc32c" in again.stdout

    # a manifest indexed before the checksums existed gets them; a shard that is not the
    # manifest's (its sha256) is refused, not indexed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    checksums = [entry.pop("crc32c") for entry in manifest["shards"]]
    manifest["shards"][0]["sha256"] = hashlib.sha256((tmp_path / "shard-000000.tar").read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert index_manifest(str(tmp_path), progress=False) == (2, 0)
    assert [entry["crc32c"] for entry in json.loads((tmp_path / "manifest.json").read_text())["shards"]] == checksums
    manifest["shards"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="shard-000000.tar has sha256 .* the manifest says 000000000000"):
        index_manifest(str(tmp_path), progress=False)
    manifest["shards"][0]["sha256"] = ""
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["num_samples"] = 3  # the manifest no longer describes the file
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    refused = subprocess.run([*command, "--force"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "holds 2 samples, the manifest says 3" in refused.stderr
    assert "Traceback" not in refused.stderr

    manifest["shards"][1]["num_samples"] = 2
    manifest["shards"][1]["offsets"] = manifest["shards"][1]["offsets"][::-1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="offsets do not increase.*sharding.shard_index --force"):
        ShardSet.open(str(tmp_path))


def _publish(folder: Path, where: str, request) -> str:
    if where == "local":
        return str(folder)
    url = f"s3://{request.getfixturevalue('s3_env')}/index-{folder.parent.name}"
    for path in folder.iterdir():
        storage.write_bytes(storage.join(url, path.name), path.read_bytes())
    return url


def _read_epoch(shardset: ShardSet, cfg: DataConfig, world: int, batch: int) -> tuple[Counter, int, int]:
    """What all ranks' loaders read in one training epoch, and the bytes and samples of their plans."""
    read, planned_bytes, planned_samples = Counter(), 0, 0
    for rank in range(world):
        loader = train_loader(cfg, shardset, batch_size=batch, rank=rank, world_size=world, epoch=1, seed=0)
        assert sum(1 for _ in loader) == len(loader)
        read.update(loader.stats)
        for plan in train_plan(shardset, batch_size=batch, rank=rank, world_size=world, epoch=1, seed=0,
                               lanes=max(1, cfg.num_workers)):
            planned_bytes += sum(shardset.sample_bytes(segment) or 0 for segment in plan.segments)
            planned_samples += plan.num_samples
    return read, planned_bytes, planned_samples


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lanes_read_their_own_samples_and_nothing_else(where, tmp_path, request):
    folder = tmp_path / "shards"
    write_shards(folder, [5, 5, 5, 5, 4])  # lanes of 6 samples: every other lane starts mid-shard
    index_manifest(str(folder), progress=False)
    shardset = ShardSet.open(_publish(folder, where, request))
    cfg = DataConfig(num_workers=2, crop_size=16, shuffle_window=3)

    read, planned_bytes, planned_samples = _read_epoch(shardset, cfg, world=2, batch=2)
    assert read["samples_read"] == planned_samples == 24
    assert read["bytes_read"] == planned_bytes  # byte for byte: no sample outside the plan, no tar padding

    # validation too: ranks and lanes cut the manifest order mid-shard
    val_read, val_bytes = Counter(), 0
    for rank in range(2):
        loader = val_loader(cfg, shardset, batch_size=2, rank=rank, world_size=2)
        list(loader)
        val_read.update(loader.stats)
        val_bytes += sum(shardset.sample_bytes(s) for p in val_plan(shardset, batch_size=2, rank=rank, world_size=2, lanes=2)
                         for s in p.segments)
    assert val_read["samples_read"] == 24 and val_read["bytes_read"] == val_bytes

    # the control: the same shards without the index read the start of every shard a lane enters mid-way
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["offsets"], entry["crc32c"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    legacy, _, _ = _read_epoch(ShardSet.open(_publish(folder, where, request)), cfg, world=2, batch=2)
    assert legacy["bytes_read"] > planned_bytes * 1.1


@pytest.mark.parametrize("skip", [1, 2, 4])
def test_a_resumed_loader_reads_only_the_samples_still_to_come(skip, tmp_path):
    """Mid-epoch resume (``skip_batches``): whole windows before the resume point are not
    read, and of the window it falls in only the samples still to come; the batches are the
    uninterrupted loader's."""
    folder = tmp_path / "shards"
    write_shards(folder, [5, 5, 5, 5, 4])
    index_manifest(str(folder), progress=False)
    shardset = ShardSet.open(str(folder))
    for workers in (0, 2):
        cfg = DataConfig(num_workers=workers, crop_size=16, shuffle_window=3)
        args = dict(batch_size=2, rank=1, world_size=2, epoch=1, seed=0)
        whole = [b["keys"] for b in train_loader(cfg, shardset, **args)]
        resumed = train_loader(cfg, shardset, skip_batches=skip, **args)
        batches = [b["keys"] for b in resumed]
        assert batches == whole[skip:]
        assert resumed.stats["samples_read"] == sum(len(keys) for keys in batches)


def test_a_whole_shard_is_checked_by_its_samples_checksums_or_read_whole_for_its_sha256(synthetic_shards, tmp_path):
    """make_shards' shards carry per-sample CRC-32Cs: a lane that reads a shard whole reads
    exactly its samples, each checked. Shards indexed before the checksums (offsets and a
    sha256 only) are hashed whole instead: the file is read entire (its end-of-archive blocks
    are the only bytes beyond the samples)."""
    shardset = ShardSet.open(str(synthetic_shards / "train"))
    cfg = DataConfig(num_workers=0, crop_size=16, frames=4)
    read, planned_bytes, planned_samples = _read_epoch(shardset, cfg, world=1, batch=2)
    assert read["samples_read"] == planned_samples and read["bytes_read"] == planned_bytes

    manifest = json.loads((synthetic_shards / "train" / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["crc32c"]
    folder = tmp_path / "sha256-only"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for entry in manifest["shards"]:
        (folder / entry["name"]).symlink_to(synthetic_shards / "train" / entry["name"])
    read, planned_bytes, planned_samples = _read_epoch(ShardSet.open(str(folder)), cfg, world=1, batch=2)
    assert read["samples_read"] == planned_samples
    tails = sum(entry["bytes"] - entry["offsets"][-1] for entry in manifest["shards"])
    assert planned_bytes < read["bytes_read"] <= planned_bytes + tails


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_damaged_byte_costs_its_sample_only_and_before_it_is_used(where, tmp_path, request, caplog):
    """One label digit flipped in storage: the tar still parses and the sample still decodes,
    so only the index's CRC-32C can tell. The sample is skipped before anyone uses it, counted
    and named, in training (a ranged read mid-shard; the position holds, the batch refills) and
    in validation; every other sample of the shard is read. Without the checksums (the control)
    the wrong label is trained on, silently."""
    folder = tmp_path / "shards"
    keys = write_shards(folder, [4, 4, 4], label_of=lambda n: 3)  # 2 ranks x 3 batches of 2: all used
    index_manifest(str(folder), progress=False)
    shard = folder / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    label = next(m for m in tarfile.open(fileobj=io.BytesIO(bytes(data))) if m.name == "100005.cls")
    assert data[label.offset_data] == ord("3")
    data[label.offset_data] = ord("7")
    shard.write_bytes(bytes(data))
    url = _publish(folder, where, request)
    cfg = DataConfig(num_workers=0, crop_size=16, shuffle_window=3)

    def epoch(shardset: ShardSet) -> tuple[dict[str, int], Counter]:
        labels, stats = {}, Counter()
        for rank in range(2):  # every read is a ranged one, by the index
            loader = train_loader(cfg, shardset, batch_size=2, rank=rank, world_size=2, epoch=0, seed=0)
            for batch in loader:
                labels.update(zip(batch["keys"], batch["labels"].tolist()))
            stats.update(loader.stats)
        return labels, stats

    labels, stats = epoch(ShardSet.open(url))
    assert set(labels) == set(keys) - {"100005"} and set(labels.values()) == {3}
    assert stats["corrupt_samples"] == 1 and stats["corrupt_shards"] == 0 and stats["refilled_samples"] == 1
    assert "skipping sample number 1 of" in caplog.text and "shard-000001.tar" in caplog.text and "CRC-32C" in caplog.text

    loader = val_loader(cfg, ShardSet.open(url), batch_size=2, rank=0, world_size=1)
    assert sorted(key for batch in loader for key in batch["keys"]) == sorted(set(keys) - {"100005"})
    assert loader.stats["corrupt_samples"] == 1

    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["crc32c"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    labels, stats = epoch(ShardSet.open(_publish(folder, where, request)))
    assert labels["100005"] == 7 and stats["corrupt_samples"] == 0


def test_an_index_that_does_not_fit_its_shard_costs_speed_not_samples(tmp_path, caplog):
    """Offsets without checksums (an index made before them) that no longer fit the shard: the
    lanes read the shards from their start instead. (With checksums, the samples whose bytes
    are not the indexed ones are skipped as damaged: see the test above.)"""
    folder = tmp_path / "shards"
    keys = write_shards(folder, [5, 5, 4])
    index_manifest(str(folder), progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:  # every inner offset one block into a member: a stale index
        del entry["crc32c"]
        entry["offsets"] = [entry["offsets"][0]] + [o + 512 for o in entry["offsets"][1:-1]] + [entry["offsets"][-1]]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cfg = DataConfig(num_workers=0, crop_size=16, shuffle_window=3)
    seen, stats = [], Counter()
    for rank in range(2):  # lanes that start mid-shard read at the stale offsets
        loader = train_loader(cfg, ShardSet.open(str(folder)), batch_size=1, rank=rank, world_size=2, epoch=0, seed=0)
        seen += [key for batch in loader for key in batch["keys"]]
        stats.update(loader.stats)
    assert sorted(seen) == sorted(keys)
    assert stats["corrupt_shards"] == 0 and stats["refilled_samples"] == 0
    assert "python -m sharding.shard_index --force" in caplog.text


def test_a_sample_too_large_to_hold_is_streamed_not_read_whole(tmp_path, monkeypatch, caplog):
    """A sample that the index says is larger than a reader holds in memory (a hostile member
    inside it) is not read in one piece: its shard is streamed, the oversized member skipped."""
    import fusion.data.read

    folder = tmp_path / "shards"
    keys = write_shards(folder, [3, 3], extra_member={"pad.bin": b"p" * 20_000})
    index_manifest(str(folder), progress=False)
    monkeypatch.setattr(fusion.data.read, "MAX_PIECE_BYTES", 16_000)
    loader = val_loader(DataConfig(num_workers=0, crop_size=16), ShardSet.open(str(folder)), batch_size=2, rank=0, world_size=1)
    assert sorted(key for batch in loader for key in batch["keys"]) == sorted(keys)
    assert loader.stats["corrupt_samples"] == loader.stats["corrupt_shards"] == 0
    assert "more than the 16000 a sample is read whole at" in caplog.text


def _both_parsers(piece: bytes, limits: FrameLimits) -> tuple[dict | None, list[dict] | Exception]:
    """What the fast parser of a checked piece and the general one make of ``piece``, members as bytes."""
    def plain(sample):
        return {name: bytes(value) if isinstance(value, memoryview) else value for name, value in sample.items()}

    fast = _checked_piece_sample(piece, "u", limits)
    try:
        general = [plain(s) for s in _shard_samples(_PieceReader(piece), "u", 0, 2, limits, verify_headers=False)]
    except (tarfile.TarError, ValueError) as error:
        general = error
    return (None if fast is None else plain(fast)), general


def test_the_fast_parser_of_checked_pieces_is_the_general_one_or_steps_aside(synthetic_shards, tmp_path):
    """``_checked_piece_sample`` parses every sample make_shards and webdataset's writer pack,
    exactly as ``_shard_samples`` does; any piece it does not take whole (long names, PAX
    records, directories, a member over its limit, two keys, a name twice, a cut member) it
    leaves to the general parser (None), never a different sample."""
    write_shards(tmp_path / "wds", [3])
    index_manifest(str(tmp_path / "wds"), progress=False)
    for folder in (synthetic_shards / "train", tmp_path / "wds"):
        shardset = ShardSet.open(str(folder))
        for name in shardset.shards:
            data, offsets = (folder / name).read_bytes(), shardset.offsets(name)
            for start, end in zip(offsets, offsets[1:]):
                fast, general = _both_parsers(data[start:end], shardset.limits)
                assert fast is not None and [fast] == general

    limits = FrameLimits(24, 96)  # frames of at most 79,360 bytes
    plain = [("123.000.jpg", b"x" * 700), ("123.001.jpg", b""), ("123.cls", b"5"), ("123.json", b"{}")]
    variants = {
        "plain": (plain, True),
        "a member it does not read": (plain + [("123.txt", b"t"), ("999.txt", b"other key, unread")], True),
        "a dotted extension": ([("7.b.cls", b"3"), ("7.000.jpg", b"y")], True),
        "a directory": ([("123", None)] + plain, False),
        "a long name": (plain + [("k" * 120 + ".000.jpg", b"z")], False),
        "a non-ASCII name (PAX)": ([("\u00e9t\u00e9.cls", b"5")], None),
        "a member over its limit": (plain + [("123.002.jpg", b"b" * 80_000)], False),
        "two keys": (plain + [("124.002.jpg", b"q")], False),
        "a name twice": (plain + [("123.cls", b"7")], False),
        "a slash": ([("d/123.cls", b"5")], False),
    }
    for layout in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for what, (members, taken) in variants.items():
            buffer = io.BytesIO()
            try:
                with tarfile.open(fileobj=buffer, mode="w", format=layout) as archive:
                    for name, data in members:
                        info = tarfile.TarInfo(name)
                        if data is None:
                            info.type = tarfile.DIRTYPE
                            archive.addfile(info)
                        else:
                            info.size = len(data)
                            archive.addfile(info, io.BytesIO(data))
            except ValueError:  # ustar cannot name it
                continue
            piece = buffer.getvalue().rstrip(b"\0")
            piece += bytes(-len(piece) % tarfile.BLOCKSIZE)  # one sample's members, without the end blocks
            fast, general = _both_parsers(piece, limits)
            assert fast is None or [fast] == general, (layout, what)
            if taken is not None:
                assert (fast is not None) == taken, (layout, what)
            assert _checked_piece_sample(piece[:-1], "u", limits) is None, (layout, what)  # a cut member


@pytest.mark.parametrize("layout", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_loaders_tar_reader_reads_what_tarfile_writes(layout):
    """fusion.data.TarStream against the standard library's writer in its three formats:
    long names (ustar prefix, GNU long name, PAX path), non-ASCII names, empty members,
    directories, members skipped unread; a broken header or a cut stream is a ReadError."""
    members = {"a" * 120 + "/123.000.jpg": b"x" * 700, "d/\u00e9t\u00e9.cls": b"5", "123.json": b"", "big.bin": b"y" * 5000,
               "b" * 130 + ".000.jpg": b"z" * 513}
    if layout == tarfile.USTAR_FORMAT:
        del members["b" * 130 + ".000.jpg"]  # ustar cannot name it (no slash to split at)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=layout) as archive:
        directory = tarfile.TarInfo("real-dir")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()

    tar = TarStream(io.BytesIO(data))
    read = {name: tar.data() for name, _ in tar.members() if name != "big.bin"}  # big.bin skipped unread
    assert read == {k: v for k, v in members.items() if k != "big.bin"}

    broken = bytearray(data)
    broken[100] ^= 0x55  # a header byte: its checksum fails
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(TarStream(io.BytesIO(bytes(broken))).members())
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        cut = TarStream(io.BytesIO(data[: data.index(b"y" * 100) + 2000]))  # inside big.bin
        for _ in cut.members():
            cut.data()
