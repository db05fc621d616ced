"""The synthetic SSv2 generator: exact SSv2 layout and JSON schema, VP9 clips with SSv2's
format, determinism (also across worker counts), appearance that does not give the class
away, and motion that does, measured on decoded frames; and the receptacle classes, which
need the receptacle's look and the motion together."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from sharding import synthetic
from sharding.ssv2 import NUM_CLASSES, TEMPLATES, flip_label, template_key
from sharding.ssv2 import LABELS_DIR, VIDEOS_DIR
from sharding.synthetic import WIDTHS, generate

# Left/right, up/down pushes and camera pans: the motion checks below need each of them; and
# the four receptacle templates (kind x direction).
CLASSES = [93, 94, 45, 43, 166, 167, 106, 148, 104, 147]
PUSH_RIGHT, PUSH_LEFT, MOVE_UP, MOVE_DOWN, CAMERA_LEFT, CAMERA_RIGHT, INTO, OUT_OF, BEHIND, FROM_BEHIND = CLASSES
RECEPTACLE_CLASSES = (INTO, OUT_OF, BEHIND, FROM_BEHIND)
PUTTING, TAKING = (INTO, BEHIND), (OUT_OF, FROM_BEHIND)
CONTAINER, BOARD = (INTO, OUT_OF), (BEHIND, FROM_BEHIND)
SMALL = dict(seed=3, classes=CLASSES, train_per_class=2, val_per_class=1, test_count=2, min_seconds=2.0, max_seconds=3.0)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "ssv2", workers=1, progress=False, **SMALL)


def _load(root: Path, name: str):
    return json.loads((root / LABELS_DIR / name).read_text())


def _labelled(root: Path) -> list[dict]:
    return _load(root, "train.json") + _load(root, "validation.json")


@functools.lru_cache(maxsize=64)
def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _label_id(labels: dict[str, str], annotation: dict) -> int:
    return int(labels[template_key(annotation["template"])])


def test_layout_and_json_schema(small_root: Path) -> None:
    label_files = sorted(p.name for p in (small_root / LABELS_DIR).iterdir())
    assert label_files == ["labels.json", "test.json", "train.json", "validation.json"]
    labels = _load(small_root, "labels.json")
    assert list(labels) == list(TEMPLATES) and list(labels.values()) == [str(i) for i in range(NUM_CLASSES)]

    ids: list[str] = []
    for split, per_class in (("train.json", 2), ("validation.json", 1)):
        entries = _load(small_root, split)
        assert len(entries) == per_class * len(CLASSES)
        counts = {c: 0 for c in CLASSES}
        for entry in entries:
            assert list(entry) == ["id", "label", "template", "placeholders"]
            assert "[" in entry["template"] and template_key(entry["template"]) in labels
            counts[_label_id(labels, entry)] += 1
            assert len(entry["placeholders"]) == entry["template"].count("[") >= 1
            filled = entry["template"]
            for name in entry["placeholders"]:
                filled = re.sub(r"\[[^\]]*\]", name, filled, count=1)
            assert entry["label"] == filled.lower()
            ids.append(entry["id"])
        assert set(counts.values()) == {per_class}
    test = _load(small_root, "test.json")
    assert len(test) == 2 and all(list(entry) == ["id"] for entry in test)
    ids += [entry["id"] for entry in test]

    assert all(i.isdigit() for i in ids) and len(set(ids)) == len(ids)
    assert sorted(p.name for p in (small_root / VIDEOS_DIR).iterdir()) == sorted(f"{i}.webm" for i in ids)


def test_clips_have_ssv2_video_format(small_root: Path) -> None:
    for path in sorted((small_root / VIDEOS_DIR).glob("*.webm")):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert container.format.name.split(",")[0] in ("matroska", "webm")
            assert stream.codec_context.name in ("vp9", "libvpx-vp9")
            assert (stream.height, stream.average_rate) == (240, 12)
            assert stream.width in WIDTHS
            seconds = container.duration / 1e6
            frames = sum(1 for _ in container.decode(video=0))
        assert 2.0 - 1 / 12 <= seconds <= 3.0 + 1 / 12, path.name
        assert abs(frames - seconds * 12) <= 1, path.name


def test_same_seed_gives_same_dataset_whatever_the_workers(small_root: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", workers=2, progress=False, **SMALL)
    for name in ("labels.json", "train.json", "validation.json", "test.json"):
        assert (again / LABELS_DIR / name).read_bytes() == (small_root / LABELS_DIR / name).read_bytes()
    clips = sorted((small_root / VIDEOS_DIR).glob("*.webm"))
    assert sorted(p.name for p in (again / VIDEOS_DIR).iterdir()) == [p.name for p in clips]
    for path in clips:
        assert (again / VIDEOS_DIR / path.name).read_bytes() == path.read_bytes(), path.name
    for path in clips[:3]:  # equal bytes already imply equal frames; decode a few to show it
        np.testing.assert_array_equal(_decode(again / VIDEOS_DIR / path.name), _decode(path))


def test_another_seed_gives_another_dataset(small_root: Path, tmp_path: Path) -> None:
    one_clip = dict(classes=[PUSH_RIGHT], train_per_class=1, val_per_class=0, test_count=0)
    other = generate(tmp_path / "other", workers=1, progress=False, **{**SMALL, **one_clip, "seed": 4})
    ours = [e for e in _load(small_root, "train.json") if e["template"] == "Pushing [something] from left to right"][0]
    theirs = _load(other, "train.json")[0]
    assert theirs != ours
    frames_ours = _decode(small_root / VIDEOS_DIR / f"{ours['id']}.webm")
    frames_theirs = _decode(other / VIDEOS_DIR / f"{theirs['id']}.webm")
    assert frames_ours.shape != frames_theirs.shape or not np.array_equal(frames_ours, frames_theirs)


PLAN_REST = dict(seed=0, val_per_class=0, test_count=0, min_seconds=2, max_seconds=6, fps=12, height=240)


def _receptacle_geometry(plan: synthetic.ClipPlan) -> tuple:
    r = synthetic.draw_appearance(plan)[2]
    return r.look.colour, r.noun, r.x, r.rim_y, r.width, r.rim, r.depth


def test_appearance_is_drawn_without_the_class() -> None:
    plan = synthetic.plan_clips(classes=[93], train_per_class=1, **PLAN_REST)[0]
    object_name = synthetic.placeholders(plan)[0]
    for label in {*synthetic.DEFAULT_CLASSES, *synthetic.MOTIONS}:
        relabelled = synthetic.ClipPlan(**{**plan.__dict__, "label": label})
        # The object, and where the receptacle stands, its size and colour, whatever the class...
        assert synthetic.placeholders(relabelled)[0] == object_name
        assert _receptacle_geometry(relabelled) == _receptacle_geometry(plan)
        kind = synthetic.MOTIONS[label].receptacle
        if kind is not None:  # ...only the receptacle's kind (and so its noun) is the class's.
            colour, noun = synthetic.placeholders(relabelled)[1].split()[-2:]
            assert colour == synthetic.draw_appearance(plan)[2].look.colour and noun in synthetic.RECEPTACLE_NOUNS[kind]
    # Over many planned clips every class meets most colours and shapes, and every receptacle
    # class most receptacle colours and every noun of its kind.
    plans = synthetic.plan_clips(classes=synthetic.DEFAULT_CLASSES, train_per_class=60, **PLAN_REST)
    for label in synthetic.DEFAULT_CLASSES:
        names = [synthetic.placeholders(p) for p in plans if p.label == label]
        looks = [n[0].split() for n in names]
        assert len({colour for colour, _ in looks}) >= 9 and len({shape for _, shape in looks}) == len(synthetic.SHAPES)
        kind = synthetic.MOTIONS[label].receptacle
        assert len(names[0]) == (1 if kind is None else 2)
        if kind is not None:
            receptacles = [n[1].split()[-2:] for n in names]
            assert len({colour for colour, _ in receptacles}) >= 9
            assert {noun for _, noun in receptacles} == set(synthetic.RECEPTACLE_NOUNS[kind])


def test_mean_colour_does_not_predict_the_class(small_root: Path) -> None:
    """Leave-one-out nearest neighbour on each clip's mean RGB: far from a perfect classifier."""
    labels = _load(small_root, "labels.json")
    entries = _labelled(small_root)
    colours = np.stack([_decode(small_root / VIDEOS_DIR / f"{e['id']}.webm").reshape(-1, 3).mean(0) for e in entries])
    classes = np.array([_label_id(labels, e) for e in entries])
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    accuracy = float((classes[distances.argmin(1)] == classes).mean())
    assert accuracy < 0.5, f"mean colour predicts the class for {accuracy:.0%} of clips"


def _moving_centroids(frames: np.ndarray) -> np.ndarray:
    """(x, y) centre of the pixels that change between consecutive frames, per frame pair."""
    gray = frames.astype(np.float32).mean(-1)
    centres = []
    for diff in np.abs(np.diff(gray, axis=0)):
        ys, xs = np.nonzero(diff > 25)
        if len(xs) > 20:
            centres.append((xs.mean(), ys.mean()))
    return np.array(centres)


def _scene_shift(frames: np.ndarray) -> np.ndarray:
    """Total (dx, dy) translation of the whole picture, summed over frame pairs, by phase
    correlation (meaningful when everything moves together, as in a camera pan)."""
    gray = frames.astype(np.float32).mean(-1)
    h, w = gray.shape[1:]
    total = np.zeros(2)
    gray = gray[::2]  # every other frame: half the FFTs, shifts still far below half the frame
    for a, b in zip(gray[:-1], gray[1:]):
        cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
        peak = np.unravel_index(np.argmax(np.abs(np.fft.ifft2(cross / (np.abs(cross) + 1e-6)))), (h, w))
        dy, dx = (p if p <= n // 2 else p - n for p, n in zip(peak, (h, w)))
        total += (dx, dy)
    return total


def _still_fraction(frames: np.ndarray) -> float:
    """Share of pixels that look the same in the first and the last frame."""
    gray = frames.astype(np.float32).mean(-1)
    return float((np.abs(gray[-1] - gray[0]) < 12).mean())


def test_motion_is_visible_in_decoded_frames(small_root: Path) -> None:
    labels = _load(small_root, "labels.json")
    for entry in _labelled(small_root):
        label = _label_id(labels, entry)
        frames = _decode(small_root / VIDEOS_DIR / f"{entry['id']}.webm")
        h, w = frames.shape[1:3]
        if label in (CAMERA_LEFT, CAMERA_RIGHT):
            # The whole scene slides: turning the camera left moves it right, and vice versa.
            assert _still_fraction(frames) < 0.5, entry["label"]
            direction = 1 if label == CAMERA_LEFT else -1
            assert direction * _scene_shift(frames)[0] > 0.2 * w, entry["label"]
            continue
        # The object moves over a still background: most of the picture does not change...
        assert _still_fraction(frames) > 0.8, entry["label"]
        # ...and what changes between frames travels the way the template says.
        centres = _moving_centroids(frames)
        third = len(centres) // 3
        travel = centres[-third:].mean(0) - centres[:third].mean(0)
        expected = {PUSH_RIGHT: (0, 1), PUSH_LEFT: (0, -1), MOVE_DOWN: (1, 1), MOVE_UP: (1, -1)}
        expected |= {label: (1, 1) for label in PUTTING} | {label: (1, -1) for label in TAKING}
        axis, sign = expected[label]
        assert sign * travel[axis] > 0.1 * (w, h)[axis], (entry["label"], travel)


@pytest.mark.parametrize("label", sorted(synthetic.MOTIONS))
def test_every_supported_template_renders_its_motion(label: int) -> None:
    plan = synthetic.ClipPlan(
        video_id="1", split="train", label=label, seed=0, index=0, width=352, height=240, fps=12, num_frames=36
    )
    track = synthetic.make_track(plan)
    motion = synthetic.MOTIONS[label]
    first, last = slice(0, 6), slice(-6, None)
    screen_x = 176 + (track.obj_x[:, 0] - track.cam_x) * track.zoom
    if motion.kind in ("translate", "pan"):
        dx, dy = motion.direction
        screen_y = 120 + (track.obj_y[:, 0] - track.cam_y) * track.zoom
        moved = (screen_x[last].mean() - screen_x[first].mean(), screen_y[last].mean() - screen_y[first].mean())
        assert dx * moved[0] + dy * moved[1] > 30
        camera_moved = np.ptp(track.cam_x) + np.ptp(track.cam_y)
        assert (camera_moved > 30) == (motion.kind == "pan")
    elif motion.kind == "scale":
        assert motion.direction[0] * np.log(track.obj_scale[-1, 0] / track.obj_scale[0, 0]) > 0.4
    elif motion.kind == "zoom":
        assert motion.direction[0] * np.log(track.zoom[-1] / track.zoom[0]) > 0.4
    elif motion.kind in ("spin", "spin_stop"):
        turned = np.abs(track.obj_angle[-1, 0] - track.obj_angle[0, 0])
        if motion.kind == "spin":
            assert turned > 2 * np.pi
        else:  # a fraction of a turn, then (nearly) still
            assert turned > 1.0 and np.abs(np.diff(track.obj_angle[-6:, 0])).max() < 0.1
    elif motion.kind == "pair":
        gap = np.hypot(track.obj_x[:, 1] - track.obj_x[:, 0], track.obj_y[:, 1] - track.obj_y[:, 0])
        assert motion.direction[0] * (gap[-1] - gap[0]) > 0.2 * 352
    elif motion.kind == "receptacle":
        # Straight down (putting) or up (taking) over the receptacle's middle, the camera still:
        # between wholly above the frame and wholly below the receptacle's rim.
        objects, _, receptacle = synthetic.draw_appearance(plan)
        radius, y = objects[0].radius, track.obj_y[:, 0]
        assert np.ptp(track.cam_x) == np.ptp(track.cam_y) == np.ptp(track.zoom) == 0
        assert np.abs(track.obj_x[:, 0] - receptacle.x).max() < 3
        above, below = (y[0], y[-1]) if motion.direction[1] > 0 else (y[-1], y[0])
        assert above + radius < 0 and below - radius > receptacle.rim_y + receptacle.rim
        assert motion.direction[1] * (y[-1] - y[0]) > 100
    else:  # still: a hand tremor of a few pixels at most
        assert np.ptp(track.obj_x[:, 0]) < 5 and np.ptp(track.obj_y[:, 0]) < 5 and np.ptp(track.cam_x) == 0
    frames = synthetic.render_clip(plan)
    assert frames.shape == (36, 240, 352, 3) and frames.dtype == np.uint8 and frames.std() > 10


def test_receptacle_templates_are_ssv2s_and_flip_invariant() -> None:
    assert [synthetic.bracketed_template(label) for label in RECEPTACLE_CLASSES] == [
        "Putting [something] into [something]",
        "Taking [something] out of [something]",
        "Putting [something] behind [something]",
        "Taking [something] from [somewhere]",
    ]
    assert all(template_key(synthetic.bracketed_template(label)) == TEMPLATES[label] for label in synthetic.MOTIONS)
    kinds = {label: synthetic.MOTIONS[label] for label in RECEPTACLE_CLASSES}
    assert {label: (m.receptacle, m.direction[1]) for label, m in kinds.items()} == {
        INTO: ("container", 1.0), OUT_OF: ("container", -1.0), BEHIND: ("board", 1.0), FROM_BEHIND: ("board", -1.0)
    }
    # Up/down only: a horizontal flip keeps these labels (and the tracks have no sideways travel).
    assert all(flip_label(label) == label and kinds[label].direction[0] == 0 for label in RECEPTACLE_CLASSES)
    # The default set has all four, and the plain up/down moves that share their motion.
    assert {*RECEPTACLE_CLASSES, MOVE_UP, MOVE_DOWN} <= set(synthetic.DEFAULT_CLASSES)
    assert len(synthetic.DEFAULT_CLASSES) == 12 and set(synthetic.DEFAULT_CLASSES) <= set(synthetic.MOTIONS)


@pytest.mark.parametrize("index", range(3))
def test_receptacle_clips_need_the_motion_and_the_receptacle(index: int) -> None:
    """Rendered (not encoded) frames: taking is putting backwards, frame for frame; the path is
    the same for both receptacles; the first and last frames are one and the same picture."""

    def plan(label: int) -> synthetic.ClipPlan:
        return synthetic.ClipPlan(
            video_id="1", split="train", label=label, seed=5, index=index, width=WIDTHS[index], height=240, fps=12,
            num_frames=24 + 9 * index,
        )

    frames = {label: synthetic.render_clip(plan(label)) for label in RECEPTACLE_CLASSES}
    tracks = {label: synthetic.make_track(plan(label)) for label in RECEPTACLE_CLASSES}
    for put, take in zip(PUTTING, TAKING):
        np.testing.assert_array_equal(frames[take], frames[put][::-1])
        # The same draws give the same first frame and the same last frame whichever the
        # direction, and the draws do not depend on the class: so no statistic of a first (or
        # last) frame can tell putting from taking.
        np.testing.assert_array_equal(frames[take][0], frames[put][0])
        np.testing.assert_array_equal(frames[take][-1], frames[put][-1])
    for container, board in zip(CONTAINER, BOARD):
        for field in ("obj_x", "obj_y", "obj_angle", "obj_scale", "cam_x", "cam_y", "zoom"):
            np.testing.assert_array_equal(getattr(tracks[container], field), getattr(tracks[board], field))
    for label, clip in frames.items():
        # Out of the frame at one end, behind the receptacle's front at the other: the same
        # picture, so neither end says which way the object went...
        np.testing.assert_array_equal(clip[0], clip[-1])
        # ...and in between the object is in sight.
        seen = (np.abs(clip.astype(np.int16) - clip[0]).max(-1) > 30).mean((1, 2))
        assert seen.max() > 0.01, TEMPLATES[label]
    # The kind shows in every frame, and only in the receptacle: container and board differ there.
    receptacle = synthetic.draw_appearance(plan(INTO))[2]
    rows, cols = np.nonzero(np.abs(frames[INTO][0].astype(np.int16) - frames[BEHIND][0]).max(-1) > 0)
    assert len(rows) > 0.5 * receptacle.width * receptacle.rim
    assert receptacle.x - receptacle.width / 2 - 3 <= cols.min() and cols.max() <= receptacle.x + receptacle.width / 2 + 3
    assert rows.min() >= receptacle.rim_y - receptacle.rim - 3


def _plans_by_id(**options) -> dict[str, synthetic.ClipPlan]:
    return {p.video_id: p for p in synthetic.plan_clips(fps=12, height=240, **options)}


def test_receptacle_clips_show_into_and_behind_in_decoded_frames(small_root: Path) -> None:
    """Decoded clips. Into a container: the object is seen inside the rim (over the opening)
    before it vanishes; behind a board: never over the board. Either way the object is out of
    sight in the last frame as in the first, which look the same."""
    labels = _load(small_root, "labels.json")
    plans = _plans_by_id(**SMALL)
    checked = set()
    for entry in _labelled(small_root):
        label = _label_id(labels, entry)
        if label not in RECEPTACLE_CLASSES:
            continue
        frames = _decode(small_root / VIDEOS_DIR / f"{entry['id']}.webm").astype(np.int16)
        receptacle = synthetic.draw_appearance(plans[entry["id"]])[2]
        assert np.abs(frames[-1] - frames[0]).mean() < 1.0, entry["label"]
        changed = np.abs(frames - frames[0]).max(-1) > 40  # (T, H, W): where the object is
        # The receptacle's upper part, inset from its outline: the container's opening (the
        # object passes in front of it) or the board's top face and top of its front.
        rows = slice(int(receptacle.rim_y - receptacle.rim) + 3, int(receptacle.rim_y + receptacle.rim) - 1)
        cols = slice(int(receptacle.x - receptacle.width / 2) + 4, int(receptacle.x + receptacle.width / 2) - 3)
        inner = changed[:, rows, cols]
        over = inner.sum((1, 2))
        if label in CONTAINER:
            assert over.max() > 0.1 * inner[0].size, (entry["label"], over.max(), inner[0].size)
        else:
            assert over.max() <= 0.01 * inner[0].size, (entry["label"], over.max(), inner[0].size)
        checked.add(label)
    assert checked == set(RECEPTACLE_CLASSES)


def test_receptacle_placeholders_read_naturally(small_root: Path) -> None:
    labels = _load(small_root, "labels.json")
    patterns = {
        INTO: r"putting (\w+) (\w+) into (\w+) (\w+)",
        OUT_OF: r"taking (\w+) (\w+) out of (\w+) (\w+)",
        BEHIND: r"putting (\w+) (\w+) behind (\w+) (\w+)",
        FROM_BEHIND: r"taking (\w+) (\w+) from behind (\w+) (\w+)",
    }
    for entry in _labelled(small_root):
        label = _label_id(labels, entry)
        if label in patterns:
            colour, thing, where_colour, where = re.fullmatch(patterns[label], entry["label"]).groups()
            assert colour in synthetic.COLOURS and thing in synthetic.SHAPES.values() and where_colour in synthetic.COLOURS
            assert where in synthetic.RECEPTACLE_NOUNS[synthetic.MOTIONS[label].receptacle], entry["label"]


def test_classes_by_id_or_template_and_clear_errors(tmp_path: Path) -> None:
    assert synthetic.resolve_classes(["93", "Pushing [something] from right to left", "holding something"]) == (93, 94, 16)
    with pytest.raises(ValueError, match="no synthetic motion"):
        synthetic.resolve_classes([5])
    with pytest.raises(ValueError, match="not an SSv2 template"):
        synthetic.resolve_classes(["Juggling something"])
    tiny = dict(classes=[16], train_per_class=1, val_per_class=0, test_count=0, min_seconds=0.5, max_seconds=0.5)
    out = generate(tmp_path / "d", workers=1, progress=False, **tiny)
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        generate(out, workers=1, progress=False, **tiny)
    generate(out, workers=1, progress=False, overwrite=True, **{**tiny, "classes": [139]})
    assert _load(out, "train.json")[0]["template"] == "Spinning [something] so it continues spinning"
    assert len(list((out / VIDEOS_DIR).iterdir())) == 1


def test_cli_help_and_run(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    help_text = capsys.readouterr().out
    options = ("--out", "--seed", "--classes", "--train-per-class", "--val-per-class", "--test", "--workers", "--min-seconds")
    for option in options:
        assert option in help_text
    sizes = ["--train-per-class", "1", "--val-per-class", "1", "--test", "1", "--min-seconds", "0.5", "--max-seconds", "1"]
    code = synthetic.main(["--out", str(tmp_path / "cli"), "--classes", "139", *sizes, "--workers", "1"])
    summary = capsys.readouterr().out
    assert code == 0 and "1 train / 1 validation / 1 test" in summary and str(tmp_path / "cli") in summary
    assert len(list((tmp_path / "cli" / VIDEOS_DIR).glob("*.webm"))) == 3
    assert synthetic.main(["--out", str(tmp_path / "bad"), "--classes", "5"]) == 2
