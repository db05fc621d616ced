"""make_shards end to end: synthetic SSv2 -> shards -> read back with webdataset, on a local
folder and on a real S3 server; every bad input becomes a reject; errors that stop the run
write nothing; the output is byte-identical whatever --workers and survives kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import simplejpeg
from webdataset.tariterators import group_by_keys, tar_file_expander

from sharding import make_shards, storage
from sharding.ssv2 import template_key
from sharding.video import segment_middles, target_size
from tests.conftest import SYNTHETIC_SHARD_SIZE

REPO_ROOT = Path(__file__).resolve().parents[1]
VIDEOS = "20bn-something-something-v2"
STORED = 32  # make_shards' default --frames


# ------------------------------------------------------------------ helpers


def read_samples(out: str) -> list[dict]:
    """Every sample of the shards listed in ``out``'s manifest, read with webdataset."""
    manifest = json.loads(storage.read_bytes(storage.join(out, "manifest.json")))
    urls = [storage.join(out, shard["name"]) for shard in manifest["shards"]]
    sources = [{"url": url, "stream": storage.open_stream(url)} for url in urls]
    return list(group_by_keys(tar_file_expander(sources)))


def split_entries(root: Path, split: str) -> list[dict]:
    return json.loads((root / "labels" / f"{split}.json").read_text())


def label_ids(root: Path) -> dict[str, int]:
    return {template: int(i) for template, i in json.loads((root / "labels" / "labels.json").read_text()).items()}


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def run_main(*argv: str) -> int:
    return make_shards.main([*argv, "--no-progress"])


def write_webm(path: Path, frames: int, width: int = 128, height: int = 96, fps: int = 12) -> None:
    """A small VP9 clip whose frame i is a flat grey of level 8*i (so indices are visible)."""
    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 8 * i + 20, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def copy_root(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------ pure functions


def test_segment_middles():
    assert segment_middles(32, 16) == list(range(1, 32, 2))
    assert segment_middles(16, 16) == list(range(16))
    assert segment_middles(100, 4) == [12, 37, 62, 87]
    short = segment_middles(5, 16)
    assert len(short) == 16 and sorted(set(short)) == [0, 1, 2, 3, 4] and short == sorted(short)
    with pytest.raises(ValueError):
        segment_middles(0, 16)


def test_target_size_never_upscales_unless_asked():
    assert target_size(427, 240, 240, upscale=False) == (427, 240)
    assert target_size(427, 240, 120, upscale=False) == (214, 120)
    assert target_size(240, 427, 120, upscale=False) == (120, 214)
    assert target_size(128, 96, 240, upscale=False) == (128, 96)
    assert target_size(128, 96, 192, upscale=True) == (256, 192)


# ------------------------------------------------------------------ the happy path


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_clip_once_with_frames_and_labels(synthetic_root, synthetic_shards, split):
    out = synthetic_shards / split
    entries = split_entries(synthetic_root, split)
    labels = label_ids(synthetic_root)
    samples = read_samples(str(out))

    assert sorted(s["__key__"] for s in samples) == sorted(e["id"] for e in entries)
    by_id = {e["id"]: e for e in entries}
    for sample in samples:
        entry = by_id[sample["__key__"]]
        assert int(sample["cls"]) == labels[template_key(entry["template"])]
        frames = [simplejpeg.decode_jpeg(sample[f"{i:03d}.jpg"]) for i in range(STORED)]  # the default --frames
        assert f"{STORED:03d}.jpg" not in sample
        info = json.loads(sample["json"])
        assert all(frame.shape == (info["height"], info["width"], 3) for frame in frames)
        assert min(info["width"], info["height"]) == 240  # the synthetic clips are 240 high
        assert info["id"] == entry["id"] and info["template"] == entry["template"]
        assert info["label"] == entry["label"] and info["placeholders"] == entry["placeholders"]
        assert info["frame_indices"] == segment_middles(info["source_frames"], STORED)
        assert info["repeated_frames"] == (info["source_frames"] < STORED)
        assert info["fps"] == pytest.approx(12)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ssv2-frames/1" and manifest["split"] == split
    assert manifest["frames"] == STORED and manifest["short_side"] == 240 and manifest["jpeg_quality"] == 90
    assert manifest["num_samples"] == len(entries) and manifest["num_rejected"] == 0
    assert len(manifest["templates"]) == 174
    assert all(manifest["templates"][i] == t for t, i in labels.items())
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(entries)
    assert (out / "rejects.jsonl").read_text() == ""


def test_test_split_has_no_cls(synthetic_root, tmp_path):
    assert run_main("--root", str(synthetic_root), "--split", "test", "--out", str(tmp_path / "test")) == 0
    samples = read_samples(str(tmp_path / "test"))
    assert sorted(s["__key__"] for s in samples) == sorted(e["id"] for e in split_entries(synthetic_root, "test"))
    for sample in samples:
        assert "cls" not in sample and "000.jpg" in sample and "015.jpg" in sample
        assert json.loads(sample["json"])["template"] is None


def test_bytes_do_not_depend_on_workers(synthetic_root, synthetic_shards, tmp_path):
    """The fixture packed with 1 worker; 2 workers must give the same tars and manifest shards."""
    out = tmp_path / "train"
    argv = ["--root", str(synthetic_root), "--split", "train", "--out", str(out)]
    assert run_main(*argv, "--shard-size", str(SYNTHETIC_SHARD_SIZE), "--workers", "2") == 0
    reference = shard_files(synthetic_shards / "train")
    assert len(reference) >= 2 and shard_files(out) == reference
    assert _manifest_without_args(out) == _manifest_without_args(synthetic_shards / "train")


def test_short_clip_repeats_frames_and_resizes(tmp_path, synthetic_root):
    root = tmp_path / "root"
    (root / VIDEOS).mkdir(parents=True)
    shutil.copytree(synthetic_root / "labels", root / "labels")
    entry = dict(split_entries(synthetic_root, "train")[0], id="5001")
    (root / "labels" / "train.json").write_text(json.dumps([entry]))
    write_webm(root / VIDEOS / "5001.webm", frames=5, width=128, height=96)

    # smaller than asked and no --upscale: kept at its size
    args = ["--root", str(root), "--split", "train", "--frames", "8"]
    assert run_main(*args, "--out", str(tmp_path / "keep")) == 0
    (kept,) = read_samples(str(tmp_path / "keep"))
    info = json.loads(kept["json"])
    assert (info["width"], info["height"], info["source_frames"]) == (128, 96, 5)
    assert info["repeated_frames"] is True and info["frame_indices"] == segment_middles(5, 8)
    # the frames are the source frames named by the indices (grey level 8*i + 20)
    levels = [int(simplejpeg.decode_jpeg(kept[f"{i:03d}.jpg"]).mean()) for i in range(8)]
    assert levels == pytest.approx([8 * i + 20 for i in info["frame_indices"]], abs=3)

    assert run_main(*args, "--out", str(tmp_path / "small"), "--short-side", "48") == 0
    (small,) = read_samples(str(tmp_path / "small"))
    assert simplejpeg.decode_jpeg(small["007.jpg"]).shape == (48, 64, 3)

    assert run_main(*args, "--out", str(tmp_path / "big"), "--short-side", "192", "--upscale") == 0
    (big,) = read_samples(str(tmp_path / "big"))
    assert simplejpeg.decode_jpeg(big["000.jpg"]).shape == (192, 256, 3)


# ------------------------------------------------------------------ bad clips become rejects

BAD_CASES = {
    # reason: the id that must get it
    "missing_video": "missing",
    "empty_video": "empty",
    "truncated_video": "truncated",
    "undecodable_video": "garbage",
    "unknown_template": "unknown",
    "duplicate_id": "dup",
}


@pytest.fixture(scope="module")
def bad_input_run(synthetic_root, tmp_path_factory):
    """One run over a root holding every kind of bad clip beside good ones."""
    root = copy_root(synthetic_root, tmp_path_factory.mktemp("bad") / "root")
    videos = root / VIDEOS
    good = split_entries(synthetic_root, "train")
    template = good[0]
    source = (videos / f"{good[0]['id']}.webm").read_bytes()

    def add(clip_id: str, video: bytes | None, **changes) -> dict:
        if video is not None:
            (videos / f"{clip_id}.webm").write_bytes(video)
        return dict(template, id=clip_id, **changes)

    entries = [
        add("missing", None),
        add("empty", b""),
        add("truncated", source[: len(source) * 6 // 10]),
        add("garbage", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()),
        add("unknown", source, template="Juggling [something] while singing"),
        add("dup", source),
        *good,
        add("dup", source),
    ]
    (root / "labels" / "train.json").write_text(json.dumps(entries))
    out = tmp_path_factory.mktemp("bad_out") / "train"
    code = run_main("--root", str(root), "--split", "train", "--out", str(out), "--shard-size", "3", "--workers", "2")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return code, entries, read_samples(str(out)), rejects, out


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_clip_is_rejected_with_reason(bad_input_run, reason):
    code, _, samples, rejects, _ = bad_input_run
    assert code == 0
    clip_id = BAD_CASES[reason]
    assert [r["reason"] for r in rejects if r["id"] == clip_id] == [reason]
    packed = [s["__key__"] for s in samples]
    assert packed.count(clip_id) == (1 if reason == "duplicate_id" else 0)


def test_no_clip_is_lost(bad_input_run):
    _, entries, samples, rejects, out = bad_input_run
    accounted = Counter(s["__key__"] for s in samples) + Counter(r["id"] for r in rejects)
    assert accounted == Counter(e["id"] for e in entries)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == len(samples) and manifest["num_rejected"] == len(rejects) == len(BAD_CASES)


def test_strict_and_nothing_packed_fail(synthetic_root, tmp_path, capsys):
    root = copy_root(synthetic_root, tmp_path / "root")
    first = split_entries(root, "train")[0]["id"]
    (root / VIDEOS / f"{first}.webm").unlink()
    args = ["--root", str(root), "--split", "train", "--workers", "1"]
    assert run_main(*args, "--out", str(tmp_path / "lenient")) == 0
    assert run_main(*args, "--out", str(tmp_path / "strict"), "--strict") == 1
    assert "--strict" in capsys.readouterr().err

    assert run_main(*args, "--out", str(tmp_path / "one"), "--limit", "1") == 1
    assert "no clip of train could be packed" in capsys.readouterr().err
    rejects = [json.loads(line) for line in (tmp_path / "one" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [(first, "missing_video")]


# ------------------------------------------------------------------ files as users have them


ORIGINAL_NAMING = {"labels.json": "something-something-v2-labels.json", "train.json": "something-something-v2-train.json",
                   "validation.json": "something-something-v2-validation.json", "test.json": "something-something-v2-test.json"}


@pytest.mark.parametrize("place", ["annotations", "labels", "root", "--labels"])
def test_original_release_label_names_give_the_same_shards(synthetic_root, synthetic_shards, tmp_path, place, capsys):
    """The 20BN release's something-something-v2-*.json names (mmaction2's docs) read like labels/*.json."""
    root = tmp_path / "root"
    (root).mkdir()
    (root / VIDEOS).symlink_to(synthetic_root / VIDEOS)
    folder = {"annotations": root / "annotations", "labels": root / "labels", "root": root, "--labels": tmp_path / "elsewhere"}[place]
    folder.mkdir(exist_ok=True)
    for current, original in ORIGINAL_NAMING.items():
        shutil.copy(synthetic_root / "labels" / current, folder / original)
    out = tmp_path / "out"
    extra = ["--labels", str(folder)] if place == "--labels" else []
    assert run_main("--root", str(root), "--split", "train", "--out", str(out), "--shard-size", str(SYNTHETIC_SHARD_SIZE),
                    "--workers", "1", *extra) == 0
    assert shard_files(out) == shard_files(synthetic_shards / "train")
    said = capsys.readouterr().out
    assert f"labels: {folder / ORIGINAL_NAMING['labels.json']}; train: {folder / ORIGINAL_NAMING['train.json']}" in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["labels"] == str(folder / ORIGINAL_NAMING["labels.json"])


def test_missing_label_files_name_every_place_looked(tmp_path, capsys):
    (tmp_path / "root" / VIDEOS).mkdir(parents=True)
    assert run_main("--root", str(tmp_path / "root"), "--split", "train", "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    for looked in ("labels/labels.json", "annotations/something-something-v2-labels.json", "root/something-something-v2-labels.json"):
        assert looked in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()


def write_mp4(path: Path, frames: list[np.ndarray], *, faststart: bool = False, fps: int = 12) -> None:
    """H.264 in MP4, as ffmpeg re-encodes a phone clip (index at the end unless ``faststart``)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def set_display_rotation(path: Path, clockwise: int) -> None:
    """Write the track header's display matrix the way ffmpeg's MP4 muxer does for a clip to be
    shown turned ``clockwise`` degrees (``-metadata:s:v rotate=90``, phone footage)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    version = data[at + 4]
    # after type, version+flags, the times, track id, reserved and duration; then reserved(8),
    # layer, alternate group, volume and reserved (8): the 3x3 matrix of 36 bytes
    matrix_at = at + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    cos, sin = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[clockwise]
    fixed = [cos, sin, 0, -sin, cos, 0]
    words = [(v * 65536) & 0xFFFFFFFF for v in fixed] + [0, 0, 0x40000000]
    data[matrix_at : matrix_at + 36] = b"".join(w.to_bytes(4, "big") for w in words)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("clockwise", [0, 90, 180, 270])
def test_rotated_phone_clip_is_stored_upright(synthetic_root, tmp_path, clockwise):
    # upright, the clip is portrait, 64 wide and 96 tall, with a bright block in its top-left corner
    upright = np.full((96, 64, 3), 30, np.uint8)
    upright[:32, :24] = 230
    stored = np.ascontiguousarray(np.rot90(upright, k=clockwise // 90))  # what the sensor recorded
    root = tmp_path / "root"
    (root / VIDEOS).mkdir(parents=True)
    shutil.copytree(synthetic_root / "labels", root / "labels")
    entry = dict(split_entries(synthetic_root, "train")[0], id="7001")
    (root / "labels" / "train.json").write_text(json.dumps([entry]))
    video = root / VIDEOS / "7001.mp4"
    write_mp4(video, [stored] * 12)
    set_display_rotation(video, clockwise)
    with av.open(str(video)) as container:  # what ffprobe would say: rotation in the display matrix
        assert next(container.decode(video=0)).rotation == {0: 0, 90: -90, 180: -180, 270: 90}[clockwise]

    assert run_main("--root", str(root), "--split", "train", "--out", str(tmp_path / "out"), "--frames", "4",
                    "--short-side", "48") == 0
    (sample,) = read_samples(str(tmp_path / "out"))
    info = json.loads(sample["json"])
    assert (info["rotation"], info["width"], info["height"]) == (clockwise, 48, 72)  # short side = the upright width
    frame = simplejpeg.decode_jpeg(sample["002.jpg"])
    assert frame.shape == (72, 48, 3)
    assert frame[2:22, 2:16].mean() > 200 and frame[-20:, -20:].mean() < 60  # bright corner top-left, as shown


def test_a_truncated_file_is_truncated_in_every_container(synthetic_root, tmp_path):
    root = tmp_path / "root"
    (root / VIDEOS).mkdir(parents=True)
    shutil.copytree(synthetic_root / "labels", root / "labels")
    template = split_entries(synthetic_root, "train")[0]
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(24)]
    clips = {}
    for name, faststart in (("mp4_index_last", False), ("mp4_faststart", True)):
        write_mp4(root / VIDEOS / f"{name}.mp4", frames, faststart=faststart)
        clips[name] = (root / VIDEOS / f"{name}.mp4")
    write_webm(root / VIDEOS / "webm.webm", frames=24)
    clips["webm"] = root / VIDEOS / "webm.webm"
    whole = {name: path.read_bytes() for name, path in clips.items()}
    entries = []
    for name, path in clips.items():  # each whole, and cut at 60 % as a broken download is
        cut = path.with_name(f"{name}_cut{path.suffix}")
        cut.write_bytes(whole[name][: len(whole[name]) * 6 // 10])
        entries += [dict(template, id=name), dict(template, id=f"{name}_cut")]
    (root / "labels" / "train.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    assert run_main("--root", str(root), "--split", "train", "--out", str(out), "--frames", "4") == 0
    rejects = {r["id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {f"{name}_cut": "truncated_video" for name in clips}
    assert sorted(s["__key__"] for s in read_samples(str(out))) == sorted(clips)


# ------------------------------------------------------------------ errors that stop the run


def _break_missing_root(root: Path) -> Path:
    shutil.rmtree(root)
    return root


def _break_missing_labels(root: Path) -> Path:
    (root / "labels" / "labels.json").unlink()
    return root / "labels" / "labels.json"


def _break_malformed_labels(root: Path) -> Path:
    (root / "labels" / "labels.json").write_text('{"Holding something": "0",')
    return root / "labels" / "labels.json"


def _break_malformed_split(root: Path) -> Path:
    (root / "labels" / "train.json").write_text("[{]")
    return root / "labels" / "train.json"


@pytest.mark.parametrize(
    "breakage", [_break_missing_root, _break_missing_labels, _break_malformed_labels, _break_malformed_split]
)
def test_unusable_input_exits_2_and_writes_nothing(synthetic_root, tmp_path, breakage):
    root = copy_root(synthetic_root, tmp_path / "root")
    named = breakage(root)
    out = tmp_path / "out"
    # the script form, as a user runs it
    result = subprocess.run(
        [sys.executable, "sharding/make_shards.py", "--root", str(root), "--split", "train", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and str(named) in errors[0] and "Traceback" not in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------ S3


def test_s3_round_trip_matches_local(s3_env, s3_server, synthetic_root, synthetic_shards, capsys):
    url = f"s3://{s3_env}/ssv2/train"
    argv = ["--root", str(synthetic_root), "--split", "train", "--out", url]
    argv += ["--shard-size", str(SYNTHETIC_SHARD_SIZE), "--workers", "1"]
    assert run_main(*argv) == 0
    local = synthetic_shards / "train"
    names = storage.list_names(url)
    assert {"manifest.json", "rejects.jsonl"} <= set(names)
    assert {n for n in names if n.endswith(".tar")} == set(shard_files(local))
    for name, data in shard_files(local).items():
        assert storage.read_bytes(storage.join(url, name)) == data
    assert sorted(s["__key__"] for s in read_samples(url)) == sorted(s["__key__"] for s in read_samples(str(local)))

    # a rerun finds every shard finished in the bucket and uploads none again
    def uploaded() -> dict[str, object]:
        listing = s3_server.client().list_objects_v2(Bucket=s3_env, Prefix="ssv2/train/shard-")
        return {item["Key"]: item["LastModified"] for item in listing["Contents"]}

    before = uploaded()
    time.sleep(1.1)  # LastModified has one-second resolution
    capsys.readouterr()
    assert run_main(*argv) == 0
    assert f"{len(before)} kept from an earlier run" in capsys.readouterr().out
    assert uploaded() == before


def test_s3_wrong_credentials_exit_2(s3_env, s3_server, synthetic_root, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    code = run_main("--root", str(synthetic_root), "--split", "train", "--out", f"s3://{s3_env}/train")
    error = capsys.readouterr().err
    assert code == 2
    assert s3_env in error and "AWS_ACCESS_KEY_ID" in error and "AWS_SECRET_ACCESS_KEY" in error
    assert s3_server.client().list_objects_v2(Bucket=s3_env).get("KeyCount", 0) == 0


# ------------------------------------------------------------------ kill -9 and resume


def _bigger_root(synthetic_root: Path, target: Path, copies: int) -> Path:
    """The synthetic train split repeated under new ids, so a run lasts long enough to kill."""
    root = copy_root(synthetic_root, target)
    base = split_entries(root, "train")
    entries = []
    for copy in range(copies):
        for entry in base:
            new_id = f"{entry['id']}{copy:03d}"
            shutil.copyfile(root / VIDEOS / f"{entry['id']}.webm", root / VIDEOS / f"{new_id}.webm")
            entries.append(dict(entry, id=new_id))
    (root / "labels" / "train.json").write_text(json.dumps(entries))
    return root


def test_kill_9_then_rerun_keeps_finished_shards(synthetic_root, tmp_path):
    root = _bigger_root(synthetic_root, tmp_path / "root", copies=6)
    args = ["--root", str(root), "--split", "train", "--shard-size", "2", "--workers", "1", "--no-progress"]
    killed_out = tmp_path / "killed"

    script = [sys.executable, "sharding/make_shards.py", *args, "--out", str(killed_out)]
    # a killed run cannot remove its scratch folder: keep it inside the test's tmp_path
    process = subprocess.Popen(script, cwd=REPO_ROOT, env=dict(os.environ, TMPDIR=str(tmp_path)))
    deadline = time.monotonic() + 120
    while not list(killed_out.glob("shard-*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    survivors = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in killed_out.glob("shard-*.tar")}
    assert 1 <= len(survivors) < 18 and not (killed_out / "manifest.json").exists()

    module = [sys.executable, "-m", "sharding.make_shards", *args, "--out", str(killed_out)]
    rerun = subprocess.run(module, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(survivors)} kept from an earlier run" in rerun.stdout
    for name, (mtime_ns, data) in survivors.items():
        path = killed_out / name
        assert path.stat().st_mtime_ns == mtime_ns and path.read_bytes() == data
    assert not list(killed_out.glob(".*partial"))

    whole_out = tmp_path / "whole"
    assert run_main(*args[:-1], "--out", str(whole_out)) == 0
    assert shard_files(killed_out) == shard_files(whole_out)
    packed = Counter(s["__key__"] for s in read_samples(str(killed_out)))
    assert packed == Counter(e["id"] for e in split_entries(root, "train"))
    assert _manifest_without_args(killed_out) == _manifest_without_args(whole_out)


def _manifest_without_args(out: Path) -> dict:
    """The manifest minus "args", which names the output folder."""
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["args"]
    return manifest


def test_rerun_of_finished_output_rewrites_nothing(synthetic_root, tmp_path):
    out = tmp_path / "val"
    args = ["--root", str(synthetic_root), "--split", "validation", "--out", str(out), "--shard-size", "1", "--workers", "1"]
    assert run_main(*args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert run_main(*args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == before
    # other arguments: the stale shards are rewritten, not kept
    assert run_main(*args, "--frames", "4") == 0
    assert all(len([key for key in sample if key.endswith(".jpg")]) == 4 for sample in read_samples(str(out)))
    # fewer clips than before: the shards beyond the new end go, so a glob sees what the manifest lists
    assert len(list(out.glob("shard-*.tar"))) == 3
    assert run_main(*args, "--frames", "4", "--limit", "1") == 0
    assert [p.name for p in out.glob("shard-*.tar")] == ["shard-000000.tar"]
    assert [p.name for p in (out / "records").iterdir()] == ["shard-000000.json"]


def test_benchmark_prints_ratios(synthetic_root, capsys):
    from sharding import benchmark

    assert benchmark.main(["--root", str(synthetic_root), "--workers", "2", "--repeat", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("x floor") == 3 and "speed-up 1 -> 2 workers" in printed
