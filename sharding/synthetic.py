"""A small synthetic Something-Something-V2, written in SSv2's exact on-disk layout, whose
classes are decided by motion, and for some of them by motion and appearance together.

Why: SSv2 cannot be downloaded here, and a stand-in that a model could solve from single
frames (colour, shape, background) would prove nothing about the motion stream. So every
clip shows one textured object over a textured background, both drawn from the seeded RNG
independently of the class. For most templates the class decides only how things move over
time: the object translates (pushing, moving up/down), grows or shrinks (towards/away from
the camera), the whole scene pans or zooms (camera turning, approaching), the object spins in
place, or it is held nearly still.

SSv2 also has classes that need to know what an object is as well as how it moves
("Putting something into something" vs "Putting something behind something"), and a fusion of
an appearance stream with a motion stream should show its worth on those. So four templates
form a 2 x 2 of receptacle kind x direction: the scene holds a receptacle, either an open
container (cup, jar: a dark opening inside its rim) or an upright board (book, folder: a
closed top), and the object comes down from above the frame into it / behind it (putting) or
goes up out of it / from behind it and leaves the frame (taking). The object's path is the
same for both kinds and a taking clip is exactly a putting clip played backwards, so the
motion alone does not say which receptacle it is; the receptacle's kind is in every frame,
but the first and last frames are the same picture (the object is out of the frame or hidden
by the receptacle's front), so no single frame says which way the object went. Only
up/down motion: these classes do not change under a horizontal flip.

Layout written under ``out`` (the same as the unpacked dataset)::

    labels/labels.json       {template without brackets: label id as a string}, all 174
    labels/train.json        [{"id", "label", "template", "placeholders"}, ...]
    labels/validation.json   same
    labels/test.json         [{"id"}, ...]
    20bn-something-something-v2/<id>.webm   VP9, 12 fps, 240 px high

Start reading at :func:`generate`; :func:`plan_clips` decides everything about every clip
(ids, splits, labels, sizes, seeds) before any pixel is drawn, and :func:`render_clip` turns
one plan into frames, so the result does not depend on how many worker processes render it.

CLI: ``python -m sharding.synthetic --out DIR [--seed S] [--classes ...] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import av
import numpy as np
from tqdm import tqdm

from sharding.ssv2 import LABELS_DIR, NUM_CLASSES, TEMPLATES, VIDEOS_DIR, template_key

SPLITS = ("train", "validation", "test")

# Widths seen in SSv2 at 240 px height (4:3, 352x240 and 16:9); the width says nothing of the class.
WIDTHS = (320, 352, 427)

MotionKind = Literal["translate", "scale", "pan", "zoom", "spin", "spin_stop", "still", "pair", "receptacle"]
ReceptacleKind = Literal["container", "board"]


@dataclass(frozen=True)
class Motion:
    """How a template is rendered. ``direction`` is the on-screen direction of the object
    (translate, receptacle), of the scene content (pan), or +1/-1 for grow/shrink, apart/closer.
    ``receptacle`` is the kind of receptacle the object goes into or behind (kind "receptacle")."""

    kind: MotionKind
    direction: tuple[float, float] = (0.0, 0.0)
    receptacle: ReceptacleKind | None = None


# Templates this generator can render, by SSv2 label id. Image y grows downwards. Turning the
# camera left moves the filmed scene to the right on screen, hence the inverted pan directions.
MOTIONS: dict[int, Motion] = {
    0: Motion("zoom", (1.0, 0.0)),  # Approaching something with your camera
    16: Motion("still"),  # Holding something
    32: Motion("zoom", (-1.0, 0.0)),  # Moving away from something with your camera
    36: Motion("pair", (1.0, 0.0)),  # Moving something and something away from each other
    37: Motion("pair", (-1.0, 0.0)),  # Moving something and something closer to each other
    41: Motion("scale", (-1.0, 0.0)),  # Moving something away from the camera
    43: Motion("translate", (0.0, 1.0)),  # Moving something down
    44: Motion("scale", (1.0, 0.0)),  # Moving something towards the camera
    45: Motion("translate", (0.0, -1.0)),  # Moving something up
    93: Motion("translate", (1.0, 0.0)),  # Pushing something from left to right
    94: Motion("translate", (-1.0, 0.0)),  # Pushing something from right to left
    139: Motion("spin"),  # Spinning something so it continues spinning
    140: Motion("spin_stop"),  # Spinning something that quickly stops spinning
    165: Motion("pan", (0.0, -1.0)),  # Turning the camera downwards while filming something
    166: Motion("pan", (1.0, 0.0)),  # Turning the camera left while filming something
    167: Motion("pan", (-1.0, 0.0)),  # Turning the camera right while filming something
    168: Motion("pan", (0.0, 1.0)),  # Turning the camera upwards while filming something
    # Receptacle kind x direction: the object comes down from above the frame into an open
    # container / behind an upright board, or (taking) the same played backwards.
    104: Motion("receptacle", (0.0, 1.0), "board"),  # Putting something behind something
    106: Motion("receptacle", (0.0, 1.0), "container"),  # Putting something into something
    147: Motion("receptacle", (0.0, -1.0), "board"),  # Taking something from somewhere
    148: Motion("receptacle", (0.0, -1.0), "container"),  # Taking something out of something
}

DEFAULT_CLASSES: tuple[int, ...] = (93, 94, 45, 43, 44, 41, 166, 167, 106, 148, 104, 147)
"""Twelve templates. Eight are told apart by motion alone: left/right, up/down,
towards/away, camera left/right. Four need motion and appearance together: into / out of a
container, behind / from behind a board (up/down motion, a receptacle in every frame, see the
module docstring); with up/down they make three classes of downward and three of upward motion."""

DEFAULT_TRAIN_PER_CLASS = 20
DEFAULT_VAL_PER_CLASS = 5
DEFAULT_TEST_COUNT = 20

# Named colours, so a placeholder reads like SSv2's ("red ball"); jittered when drawn.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 35, 35),
    "green": (45, 160, 60),
    "blue": (40, 75, 205),
    "yellow": (230, 205, 45),
    "orange": (240, 130, 25),
    "purple": (130, 55, 165),
    "pink": (240, 125, 175),
    "white": (235, 235, 230),
    "black": (30, 30, 30),
    "brown": (125, 75, 35),
    "grey": (130, 130, 130),
    "cyan": (45, 190, 205),
}
# Receptacle kind -> nouns for its placeholder ("blue cup"); which one is an appearance draw.
RECEPTACLE_NOUNS: dict[str, tuple[str, ...]] = {
    "container": ("cup", "mug", "jar", "bucket", "pot"),
    "board": ("book", "board", "folder", "tablet", "frame"),
}
# Shape -> the noun used in the placeholder.
SHAPES: dict[str, str] = {
    "disc": "ball",
    "square": "box",
    "ellipse": "egg",
    "triangle": "pyramid",
    "hexagon": "nut",
    "cross": "cross",
}
OBJECT_PATTERNS = ("stripes", "halves", "checker", "dots")
BACKGROUND_PATTERNS = ("noise", "stripes", "checker", "blobs")


# --------------------------------------------------------------------------------------------
# Choosing classes and planning clips


def resolve_classes(classes: Sequence[int | str] | None) -> tuple[int, ...]:
    """Label ids from ids (``93``, ``"93"``) or template texts, with or without brackets.

    Only templates with a renderer in :data:`MOTIONS` are accepted; order is kept, duplicates
    are an error.
    """
    if classes is None:
        return DEFAULT_CLASSES
    by_text = {t.lower(): i for i, t in enumerate(TEMPLATES)}
    ids: list[int] = []
    for entry in classes:
        if isinstance(entry, int) or (isinstance(entry, str) and entry.strip().isdigit()):
            label = int(entry)
            if not 0 <= label < NUM_CLASSES:
                raise ValueError(f"class id {label} is out of range: SSv2 ids are 0..{NUM_CLASSES - 1}")
        else:
            key = template_key(str(entry)).strip().lower()
            if key not in by_text:
                raise ValueError(f"class {entry!r} is not an SSv2 template; give an id or the exact template text")
            label = by_text[key]
        if label not in MOTIONS:
            supported = ", ".join(f"{i} ({TEMPLATES[i]})" for i in sorted(MOTIONS))
            raise ValueError(f"class {label} ({TEMPLATES[label]!r}) has no synthetic motion; choose from: {supported}")
        if label in ids:
            raise ValueError(f"class {label} ({TEMPLATES[label]!r}) is listed twice")
        ids.append(label)
    if not ids:
        raise ValueError("classes is empty: name at least one template id")
    return tuple(ids)


def bracketed_template(label: int) -> str:
    """The template as train.json spells it, e.g. ``"Pushing [something] from left to right"``.

    Exact for every template in :data:`MOTIONS`, whose only placeholder words are "something"
    and, in "Taking [something] from [somewhere]", "somewhere".
    """
    return re.sub(r"\b(something|somewhere)\b", r"[\1]", TEMPLATES[label])


@dataclass(frozen=True)
class ClipPlan:
    """Everything that decides one clip; rendering it needs nothing else."""

    video_id: str
    split: str
    label: int
    seed: int
    index: int
    width: int
    height: int
    fps: int
    num_frames: int

    def rng(self, stream: Literal["appearance", "motion"]) -> np.random.Generator:
        """Independent RNG streams per clip: the appearance stream never sees the label."""
        which = {"appearance": 0, "motion": 1}[stream]
        return np.random.default_rng([self.seed, self.index, which])


def plan_clips(
    *,
    seed: int,
    classes: Sequence[int],
    train_per_class: int,
    val_per_class: int,
    test_count: int,
    min_seconds: float,
    max_seconds: float,
    fps: int,
    height: int,
) -> list[ClipPlan]:
    """Every clip of the dataset in writing order: train, validation, test (each shuffled).

    Test clips draw their (unpublished) class uniformly from ``classes``.
    """
    rng = np.random.default_rng([seed, 0x55B2])
    labels = {
        "train": np.repeat(np.asarray(classes), train_per_class),
        "validation": np.repeat(np.asarray(classes), val_per_class),
        "test": rng.choice(np.asarray(classes), size=test_count) if test_count else np.zeros(0, int),
    }
    total = sum(len(v) for v in labels.values())
    # Sparse random ids, like SSv2's, so neither the id nor the listing order hints at the class.
    ids = rng.choice(np.arange(1, 10 * total + 100), size=total, replace=False)
    plans: list[ClipPlan] = []
    for split in SPLITS:
        for label in rng.permutation(labels[split]):
            index = len(plans)
            seconds = rng.uniform(min_seconds, max_seconds)
            plans.append(
                ClipPlan(
                    video_id=str(int(ids[index])),
                    split=split,
                    label=int(label),
                    seed=seed,
                    index=index,
                    width=int(rng.choice(WIDTHS)),
                    height=height,
                    fps=fps,
                    num_frames=max(2, int(round(seconds * fps))),
                )
            )
    return plans


# --------------------------------------------------------------------------------------------
# Appearance: drawn from the clip's appearance stream only, so it cannot depend on the class


@dataclass(frozen=True)
class ObjectLook:
    shape: str
    colour: str
    rgb: np.ndarray  # (3,) float
    second_rgb: np.ndarray
    marker_rgb: np.ndarray
    pattern: str
    pattern_angle: float
    pattern_freq: float
    radius: float  # in pixels at 240 px height, before any scaling by the motion

    @property
    def description(self) -> str:
        return f"{self.colour} {SHAPES[self.shape]}"


@dataclass(frozen=True)
class Backdrop:
    rgb: np.ndarray
    second_rgb: np.ndarray
    noise: np.ndarray  # (64, 64) value-noise grid, tiled
    noise_cell: float
    fine: np.ndarray  # (64, 64) fine grain grid, tiled
    pattern: str
    pattern_angle: float
    pattern_period: float


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def draw_object(rng: np.random.Generator, height: int) -> ObjectLook:
    colour = str(rng.choice(list(COLOURS)))
    rgb = _jitter(rng, COLOURS[colour], 18)
    # A darker or lighter shade keeps the object's colour name true while giving it texture.
    second = rgb * rng.uniform(0.45, 0.65) if rng.random() < 0.5 else rgb + (255 - rgb) * rng.uniform(0.4, 0.6)
    marker = np.full(3, 20.0 if rgb.mean() > 128 else 240.0, np.float32)
    return ObjectLook(
        shape=str(rng.choice(list(SHAPES))),
        colour=colour,
        rgb=rgb,
        second_rgb=second.astype(np.float32),
        marker_rgb=marker,
        pattern=str(rng.choice(OBJECT_PATTERNS)),
        pattern_angle=float(rng.uniform(0, np.pi)),
        pattern_freq=float(rng.uniform(1.5, 3.0)),
        radius=float(rng.uniform(0.10, 0.17) * height),
    )


def draw_backdrop(rng: np.random.Generator, objects: Sequence[ObjectLook]) -> Backdrop:
    # Keep the background's colour away from the objects', or the object could vanish into it.
    for _ in range(100):
        rgb = rng.uniform(25, 230, 3).astype(np.float32)
        if all(np.abs(rgb - o.rgb).sum() > 120 for o in objects):
            break
    # A floor on the texture's contrast: a flat background would hide camera motion.
    lighter = 1.0 if rgb.mean() < 128 else -1.0
    second = np.clip(rgb + lighter * rng.uniform(70, 120) + rng.uniform(-30, 30, 3), 0, 255).astype(np.float32)
    return Backdrop(
        rgb=rgb,
        second_rgb=second,
        noise=rng.random((64, 64), dtype=np.float32),
        noise_cell=float(rng.uniform(14, 40)),
        fine=rng.random((64, 64), dtype=np.float32),
        pattern=str(rng.choice(BACKGROUND_PATTERNS)),
        pattern_angle=float(rng.uniform(0, np.pi)),
        pattern_period=float(rng.uniform(18, 60)),
    )


@dataclass(frozen=True)
class Receptacle:
    """Where a receptacle template's receptacle stands and how it looks; its kind (container or
    board) is the class's, everything here is drawn without the class. Pixels, image y down."""

    look: ObjectLook  # colours and texture: the clip's second object look
    noun: int  # which of the kind's RECEPTACLE_NOUNS names it
    x: float  # centre column
    rim_y: float  # the container's rim ellipse centre row = the board's front face top row
    width: float
    rim: float  # the rim ellipse's half height (container); the board's top face is as tall
    depth: float  # rows of the front face below rim_y (it may run off the frame's bottom)

    def description(self, kind: ReceptacleKind) -> str:
        nouns = RECEPTACLE_NOUNS[kind]
        return f"{self.look.colour} {nouns[self.noun % len(nouns)]}"


# Pixels of margin between an object's outline and the frame edge or the receptacle's front
# wall when it is meant to be out of sight (covers the hand tremor and the soft edge).
EDGE = 6.0


def draw_receptacle(rng: np.random.Generator, width: int, height: int, objects: Sequence[ObjectLook]) -> Receptacle:
    """Big enough for ``objects[0]`` to vanish behind its front, inside the frame sideways."""
    radius = objects[0].radius
    rim_width = radius * rng.uniform(2.8, 3.4)
    rim = rim_width * rng.uniform(0.10, 0.15)
    return Receptacle(
        look=objects[1],
        noun=int(rng.integers(len(RECEPTACLE_NOUNS["container"]))),
        x=float(rng.uniform(0.3, 0.7) * width),
        rim_y=float(rng.uniform(0.42, 0.58) * height),
        width=float(rim_width),
        rim=float(rim),
        depth=float((2 * radius + rim + 2 * EDGE) * rng.uniform(1.05, 1.3)),
    )


def draw_appearance(plan: ClipPlan) -> tuple[list[ObjectLook], Backdrop, Receptacle]:
    """Two objects (the second is used by two-object templates), the backdrop and a receptacle
    (used by the receptacle templates, which take its colours from the second object). Drawn
    for every clip in the same order, so none of it depends on the class."""
    rng = plan.rng("appearance")
    objects = [draw_object(rng, plan.height) for _ in range(2)]
    backdrop = draw_backdrop(rng, objects)
    return objects, backdrop, draw_receptacle(rng, plan.width, plan.height, objects)


def placeholders(plan: ClipPlan) -> list[str]:
    """The descriptions that fill the template's brackets, in order: "red ball"; for the
    receptacle templates also "blue cup", or "behind blue book" for "from [somewhere]"."""
    objects, _, receptacle = draw_appearance(plan)
    template = bracketed_template(plan.label)
    kind = MOTIONS[plan.label].receptacle
    if kind is None:
        return [o.description for o in objects[: template.count("[")]]
    where = receptacle.description(kind)
    # [somewhere] only occurs in "Taking [something] from [somewhere]", whose receptacle is a board.
    return [objects[0].description, f"behind {where}" if "[somewhere]" in template else where]


# --------------------------------------------------------------------------------------------
# Motion: per-frame poses of the camera and the objects


@dataclass(frozen=True)
class Track:
    """Per-frame poses, all arrays of shape (T,) or (T, K) for K objects. World coordinates are
    pixels of a frame seen by the camera at rest (centre (W/2, H/2), zoom 1)."""

    cam_x: np.ndarray
    cam_y: np.ndarray
    zoom: np.ndarray
    obj_x: np.ndarray  # (T, K)
    obj_y: np.ndarray
    obj_scale: np.ndarray
    obj_angle: np.ndarray


def _progress(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """0 -> 1 over a random window of the clip, eased, so start and speed vary per clip."""
    start, end = rng.uniform(0.0, 0.2), rng.uniform(0.8, 1.0)
    s = np.clip((t - start) / (end - start), 0.0, 1.0)
    return s * s * (3 - 2 * s)


def _wobble(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """A smooth hand tremor: low-passed random walk of about ``amplitude`` pixels."""
    steps = rng.normal(0, 1, n).cumsum()
    steps -= np.linspace(steps[0], steps[-1], n)
    return (amplitude * steps / (np.abs(steps).max() + 1e-6)).astype(np.float32)


def _sweep(rng: np.random.Generator, extent: float, p: np.ndarray, sign: float) -> np.ndarray:
    """A path across ``extent`` pixels centred near the middle; symmetric for both directions so
    the set of positions in a clip does not reveal the direction."""
    middle = rng.uniform(0.4, 0.6) * extent
    travel = rng.uniform(0.3, 0.5) * extent
    return middle + sign * travel * (p - 0.5)


def make_track(plan: ClipPlan) -> Track:
    rng = plan.rng("motion")
    motion = MOTIONS[plan.label]
    n, w, h = plan.num_frames, plan.width, plan.height
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    seconds = np.arange(n, dtype=np.float32) / plan.fps
    dx, dy = motion.direction
    p = _progress(rng, t)

    cam_x = np.full(n, w / 2, np.float32)
    cam_y = np.full(n, h / 2, np.float32)
    zoom = np.ones(n, np.float32)
    x = np.full((n, 2), rng.uniform(0.35, 0.65) * w, np.float32)
    y = np.full((n, 2), rng.uniform(0.35, 0.65) * h, np.float32)
    scale = np.ones((n, 2), np.float32)
    angle = np.full((n, 2), rng.uniform(-0.3, 0.3), np.float32)

    if motion.kind == "translate":
        if dx:
            x[:, 0] = _sweep(rng, w, p, dx)
        if dy:
            y[:, 0] = _sweep(rng, h, p, dy)
    elif motion.kind == "pan":
        # The object sits still in the world; the camera moves so the object's on-screen path
        # is what a push would give, and the background slides with it.
        screen_x = _sweep(rng, w, p, dx) if dx else x[:, 0]
        screen_y = _sweep(rng, h, p, dy) if dy else y[:, 0]
        x[:, 0], y[:, 0] = w / 2, h / 2
        cam_x = (w - screen_x).astype(np.float32)
        cam_y = (h - screen_y).astype(np.float32)
    elif motion.kind == "scale":
        ratio = rng.uniform(1.8, 2.6)
        scale[:, 0] = ratio ** (dx * (p - 0.5))
    elif motion.kind == "zoom":
        ratio = rng.uniform(1.6, 2.2)
        zoom = (ratio ** (dx * (p - 0.5))).astype(np.float32)
        cam_x += rng.uniform(-0.05, 0.05) * w
        cam_y += rng.uniform(-0.05, 0.05) * h
        x[:, 0], y[:, 0] = w / 2, h / 2
    elif motion.kind == "spin":
        turns_per_second = rng.uniform(0.4, 1.2) * rng.choice([-1, 1])
        angle[:, 0] += 2 * np.pi * turns_per_second * seconds
    elif motion.kind == "spin_stop":
        omega = 2 * np.pi * rng.uniform(1.0, 1.8) * rng.choice([-1, 1])
        tau = rng.uniform(0.3, 0.6)
        angle[:, 0] += omega * tau * (1 - np.exp(-seconds / tau))
    elif motion.kind == "pair":
        # Two objects along a random near-horizontal axis, their gap opening or closing.
        axis = rng.uniform(-0.5, 0.5)
        gap_small, gap_large = rng.uniform(0.3, 0.4) * w, rng.uniform(0.6, 0.75) * w
        gap = gap_small + (gap_large - gap_small) * (p if dx > 0 else 1 - p)
        cx, cy = rng.uniform(0.45, 0.55) * w, rng.uniform(0.4, 0.6) * h
        for k, side in enumerate((-0.5, 0.5)):
            x[:, k] = cx + side * gap * np.cos(axis)
            y[:, k] = cy + side * gap * np.sin(axis)
        scale *= 0.8
    elif motion.kind == "receptacle":
        # Straight down over the receptacle's centre, from wholly above the frame to wholly
        # behind the receptacle's front (for either kind: the same path for both). Where it
        # stands and how big it is are appearance draws, so the path says nothing of the kind.
        objects, _, receptacle = draw_appearance(plan)
        radius = objects[0].radius
        top = -(radius + EDGE)
        bottom = receptacle.rim_y + receptacle.rim + radius + EDGE
        x[:, 0] = receptacle.x
        y[:, 0] = top + (bottom - top) * p
    # "still" keeps the defaults: only the tremor below.

    x += _wobble(rng, n, 1.5)[:, None]
    y += _wobble(rng, n, 1.5)[:, None]
    angle += _wobble(rng, n, 0.04)[:, None]
    if motion.kind == "receptacle" and dy < 0:
        # Taking is putting played backwards, frame for frame (the same draws, reversed), so
        # the two directions share every statistic that ignores the order of the frames.
        x, y, angle = x[::-1].copy(), y[::-1].copy(), angle[::-1].copy()
    return Track(cam_x, cam_y, zoom, x, y, scale, angle)


# --------------------------------------------------------------------------------------------
# Rendering (numpy, per frame, vectorised over pixels)


def _lerp_indices(coords: np.ndarray, cell: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbouring cells of a ``size``-periodic grid at ``coords / cell`` and the weight of the
    second one."""
    pos = coords / cell
    base = np.floor(pos)
    lo = base.astype(np.int64) % size
    return lo, (lo + 1) % size, (pos - base).astype(np.float32)


def _value_noise(grid: np.ndarray, xs: np.ndarray, ys: np.ndarray, cell: float) -> np.ndarray:
    """Bilinear value noise at separable coordinates: interpolate rows, then columns (gathers,
    not BLAS, whose threads stall when the cores are shared)."""
    r0, r1, fy = _lerp_indices(ys, cell, grid.shape[0])
    c0, c1, fx = _lerp_indices(xs, cell, grid.shape[1])
    rows = grid[r0] * (1 - fy[:, None]) + grid[r1] * fy[:, None]  # (H, G)
    return rows[:, c0] * (1 - fx) + rows[:, c1] * fx  # (H, W)


def render_backdrop(b: Backdrop, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The background at world columns ``xs`` and rows ``ys``: (H, W, 3) float."""
    # Bilinear noise of uniform values bunches around 0.5: stretch it to use the full contrast.
    tex = 0.5 + 1.6 * (_value_noise(b.noise, xs, ys, b.noise_cell) - 0.5) + 0.3 * (_value_noise(b.fine, xs, ys, 4.0) - 0.5)
    if b.pattern != "noise":
        X, Y = xs[None, :], ys[:, None]
        if b.pattern == "stripes":
            u = X * np.cos(b.pattern_angle) + Y * np.sin(b.pattern_angle)
            extra = 0.5 + 0.5 * np.sin(2 * np.pi * u / b.pattern_period)
        elif b.pattern == "checker":
            extra = (np.floor(X / b.pattern_period) + np.floor(Y / b.pattern_period)) % 2
        else:  # blobs: thresholded coarse noise
            extra = (_value_noise(b.noise.T, xs, ys, b.pattern_period * 1.5) > 0.5).astype(np.float32)
        tex = 0.6 * tex + 0.4 * extra
    tex = np.clip(tex, 0.0, 1.0)[..., None]
    return b.rgb * (1 - tex) + b.second_rgb * tex


def _shape_distance(shape: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """< 1 inside the shape, in object-local units (radius 1)."""
    if shape == "disc":
        return np.hypot(a, b)
    if shape == "square":
        return np.maximum(np.abs(a), np.abs(b)) * 1.15
    if shape == "ellipse":
        return np.hypot(a, b / 0.62)
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(a), np.abs(b) / 0.38), np.maximum(np.abs(a) / 0.38, np.abs(b)))
    sides = {"triangle": 3, "hexagon": 6}[shape]
    angles = -np.pi / 2 + np.pi / sides + 2 * np.pi * np.arange(sides) / sides
    dots = np.stack([a * np.cos(t) + b * np.sin(t) for t in angles])
    return dots.max(axis=0) / np.cos(np.pi / sides)


def _pattern_mix(o: ObjectLook, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """0/1 per pixel: where the look's pattern shows its second colour, in local coordinates."""
    u = a * np.cos(o.pattern_angle) + b * np.sin(o.pattern_angle)
    if o.pattern == "stripes":
        return (np.sin(np.pi * o.pattern_freq * u) > 0).astype(np.float32)
    if o.pattern == "halves":
        return (u > 0).astype(np.float32)
    if o.pattern == "checker":
        return ((np.floor(a * o.pattern_freq) + np.floor(b * o.pattern_freq)) % 2).astype(np.float32)
    fa, fb = (a * o.pattern_freq) % 1 - 0.5, (b * o.pattern_freq) % 1 - 0.5  # dots
    return (fa * fa + fb * fb < 0.08).astype(np.float32)


def _object_texture(o: ObjectLook, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The object's colours in local coordinates (never rotation-symmetric, thanks to the
    off-centre marker), with a little shading for depth. (h, w, 3) float."""
    mix = _pattern_mix(o, a, b)
    rgb = o.rgb * (1 - mix[..., None]) + o.second_rgb * mix[..., None]
    marker = np.hypot(a - 0.42, b + 0.3) < 0.22
    rgb = np.where(marker[..., None], o.marker_rgb, rgb)
    shade = 1.0 - 0.18 * np.clip(a * a + b * b, 0, 1)
    return rgb * shade[..., None]


def _draw_object(frame: np.ndarray, o: ObjectLook, u: float, v: float, radius: float, angle: float) -> None:
    """Composite one object at screen position (u, v) with ``radius`` pixels, in place."""
    h, w, _ = frame.shape
    reach = radius * 1.5 + 2
    u0, u1 = max(0, int(u - reach)), min(w, int(u + reach) + 1)
    v0, v1 = max(0, int(v - reach)), min(h, int(v + reach) + 1)
    if u0 >= u1 or v0 >= v1:
        return
    px = (np.arange(u0, u1, dtype=np.float32) + 0.5 - u)[None, :]
    py = (np.arange(v0, v1, dtype=np.float32) + 0.5 - v)[:, None]
    cos, sin = np.cos(angle), np.sin(angle)
    a = (px * cos + py * sin) / radius
    b = (-px * sin + py * cos) / radius
    # One-pixel soft edge: the distance function is ~1/radius per pixel near the border.
    alpha = np.clip((1 - _shape_distance(o.shape, a, b)) * radius + 0.5, 0, 1)[..., None]
    patch = frame[v0:v1, u0:u1]
    patch *= 1 - alpha
    patch += alpha * _object_texture(o, a, b)


@dataclass(frozen=True)
class Layer:
    """A picture composited over frames at rows ``v0:``, columns ``u0:`` (``alpha`` and ``rgb``
    give its size)."""

    v0: int
    u0: int
    alpha: np.ndarray  # (h, w, 1) float
    rgb: np.ndarray  # (h, w, 3) float

    def over(self, frame: np.ndarray) -> None:
        h, w = self.alpha.shape[:2]
        patch = frame[self.v0 : self.v0 + h, self.u0 : self.u0 + w]
        patch *= 1 - self.alpha
        patch += self.alpha * self.rgb


def receptacle_layers(r: Receptacle, kind: ReceptacleKind, width: int, height: int) -> tuple[Layer | None, Layer]:
    """What is drawn behind the object (a container's opening) and in front of it (the
    container's front wall; the whole board). Both kinds fill about the same box: rows from
    ``rim_y - rim`` to about ``rim_y + depth``, ``width`` wide."""
    half = r.width / 2
    u0, u1 = max(0, int(r.x - half - 2)), min(width, int(r.x + half + 3))
    v0, v1 = max(0, int(r.rim_y - r.rim - 2)), min(height, int(r.rim_y + r.depth + r.rim + 3))
    dx = (np.arange(u0, u1, dtype=np.float32) + 0.5 - r.x)[None, :]
    dy = (np.arange(v0, v1, dtype=np.float32) + 0.5 - r.rim_y)[:, None]
    mix = _pattern_mix(r.look, dx / half, dy / half)[..., None]
    base = r.look.rgb * (1 - mix) + r.look.second_rgb * mix
    depth = np.clip(dy / r.depth, 0.0, 1.0)

    def layer(signed_distance: np.ndarray, rgb: np.ndarray) -> Layer:
        """``signed_distance``: pixels inside the shape's edge (one-pixel soft edge)."""
        alpha = np.clip(signed_distance + 0.5, 0.0, 1.0)[..., None].astype(np.float32)
        return Layer(v0, u0, alpha, np.broadcast_to(rgb, alpha.shape[:2] + (3,)).astype(np.float32))

    if kind == "board":
        # An upright board seen from a little above: a light top face ``rim`` rows tall over a
        # flat front face, with a dark line along the edge between them. Nothing behind.
        inside = np.minimum(np.minimum(half - np.abs(dx), dy + r.rim), r.depth - dy)
        front = base * (0.95 - 0.15 * depth)[..., None]
        top = r.look.rgb + (250 - r.look.rgb) * 0.6
        rgb = np.where((dy < 0)[..., None], top, front)
        rgb = np.where((np.abs(dy) < 1.0)[..., None], rgb * 0.45, rgb)
        return None, layer(inside, rgb)

    # An open container, slightly tapered: its opening (a dark ellipse ``rim`` rows high, with
    # the back of the rim) lies behind the object, its front wall (from the front of the rim
    # down, curved like a cylinder's) in front of it.
    across = np.clip(1 - (dx / half) ** 2, 0.0, 1.0)
    opening = (1 - np.hypot(dx / half, dy / r.rim)) * r.rim
    back_rgb = np.where((opening < 2.5)[..., None], base * 0.85, r.look.rgb * (0.16 + 0.12 * depth[..., None]) + 8)
    wall_half = half * (1 - 0.12 * depth)
    front_top = r.rim * np.sqrt(across)
    bottom = r.depth + 0.9 * r.rim * np.sqrt(np.clip(1 - (dx / wall_half) ** 2, 0.0, 1.0))
    inside = np.minimum(np.minimum(wall_half - np.abs(dx), dy - front_top), bottom - dy)
    shade = 0.7 + 0.3 * np.clip(1 - (dx / wall_half) ** 2, 0.0, 1.0)
    front = base * shade[..., None]
    front = np.where((dy - front_top < 2.5)[..., None], front + (255 - front) * 0.35, front)  # the lip
    return layer(opening, back_rgb), layer(inside, front)


def render_clip(plan: ClipPlan) -> np.ndarray:
    """The clip's frames, uint8 (T, H, W, 3) RGB."""
    objects, backdrop, receptacle = draw_appearance(plan)
    track = make_track(plan)
    motion = MOTIONS[plan.label]
    n_objects = 2 if motion.kind == "pair" else 1
    w, h = plan.width, plan.height
    cols = np.arange(w, dtype=np.float32) + 0.5 - w / 2
    rows = np.arange(h, dtype=np.float32) + 0.5 - h / 2
    camera_moves = bool(np.ptp(track.cam_x) or np.ptp(track.cam_y) or np.ptp(track.zoom))
    static_background = None if camera_moves else render_backdrop(backdrop, cols + w / 2, rows + h / 2)
    front = None
    if motion.receptacle is not None:
        assert static_background is not None, "a receptacle is drawn in screen coordinates: the camera must stay still"
        back, front = receptacle_layers(receptacle, motion.receptacle, w, h)
        if back is not None:
            back.over(static_background)
    frames = np.empty((plan.num_frames, h, w, 3), np.uint8)
    for i in range(plan.num_frames):
        zoom = float(track.zoom[i])
        if static_background is None:
            xs = track.cam_x[i] + cols / zoom
            ys = track.cam_y[i] + rows / zoom
            frame = render_backdrop(backdrop, xs, ys)
        else:
            frame = static_background.copy()
        for k in range(n_objects):
            # World -> screen for the object's centre; its size scales with the camera zoom.
            u = w / 2 + (track.obj_x[i, k] - track.cam_x[i]) * zoom
            v = h / 2 + (track.obj_y[i, k] - track.cam_y[i]) * zoom
            radius = objects[k].radius * float(track.obj_scale[i, k]) * zoom
            _draw_object(frame, objects[k], u, v, radius, float(track.obj_angle[i, k]))
        if front is not None:
            front.over(frame)
        frames[i] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return frames


# --------------------------------------------------------------------------------------------
# Encoding and writing


def encode_webm(frames: np.ndarray, path: Path, fps: int) -> None:
    """VP9 in WebM, byte-for-byte reproducible: realtime libvpx settings, one encoder thread,
    and the muxer's bitexact flag (otherwise it writes a random segment UID)."""
    tmp = path.with_suffix(".webm.part")
    with av.open(str(tmp), "w", format="webm", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0", "threads": "1", "row-mt": "0"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)


def _write_clip(plan: ClipPlan, video_dir: Path) -> str:
    encode_webm(render_clip(plan), video_dir / f"{plan.video_id}.webm", plan.fps)
    return plan.video_id


def _annotation(plan: ClipPlan) -> dict:
    template = bracketed_template(plan.label)
    filled = template
    names = placeholders(plan)
    for name in names:
        filled = re.sub(r"\[[^\]]*\]", name, filled, count=1)
    return {"id": plan.video_id, "label": filled.lower(), "template": template, "placeholders": names}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def write_labels(out: Path, plans: Sequence[ClipPlan]) -> None:
    """labels.json (all 174 templates) and the three split files."""
    labels = out / LABELS_DIR
    labels.mkdir(parents=True, exist_ok=True)
    _write_json(labels / "labels.json", {t: str(i) for i, t in enumerate(TEMPLATES)})
    for split, name in (("train", "train.json"), ("validation", "validation.json")):
        _write_json(labels / name, [_annotation(p) for p in plans if p.split == split])
    _write_json(labels / "test.json", [{"id": p.video_id} for p in plans if p.split == "test"])


def generate(
    out: Path,
    *,
    seed: int = 0,
    classes: Sequence[int | str] | None = None,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    val_per_class: int = DEFAULT_VAL_PER_CLASS,
    test_count: int = DEFAULT_TEST_COUNT,
    min_seconds: float = 2.0,
    max_seconds: float = 6.0,
    fps: int = 12,
    height: int = 240,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic SSv2 root under ``out`` and return ``out``.

    The same arguments give the same JSON, the same decoded frames and the same ``.webm`` bytes,
    whatever ``workers`` is (None: one per CPU). ``classes`` are SSv2 label ids or template
    texts (default :data:`DEFAULT_CLASSES`). ``out`` must not hold a dataset already unless
    ``overwrite`` (which replaces only ``labels/`` and the video folder).
    """
    out = Path(out)
    label_ids = resolve_classes(classes)
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class), ("test_count", test_count)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for one per CPU), got {workers}")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds} and {max_seconds}")
    if fps < 1 or height < 32 or height % 2:
        raise ValueError(f"need fps >= 1 and an even height >= 32, got fps={fps}, height={height}")
    existing = [out / LABELS_DIR, out / VIDEOS_DIR]
    if any(p.exists() for p in existing):
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a dataset (labels/ or {VIDEOS_DIR}/); choose an empty folder or pass overwrite"
            )
        for p in existing:
            shutil.rmtree(p, ignore_errors=True)

    started = time.perf_counter()
    plans = plan_clips(
        seed=seed,
        classes=label_ids,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        test_count=test_count,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        fps=fps,
        height=height,
    )
    video_dir = out / VIDEOS_DIR
    video_dir.mkdir(parents=True, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, max(1, len(plans)))
    if workers == 1:
        for plan in tqdm(plans, unit="clip", desc="synthetic ssv2", disable=not progress):
            _write_clip(plan, video_dir)
    else:
        # fork, so callers need no `if __name__ == "__main__"` guard (spawn re-imports the
        # caller's script); all workers are forked before tqdm starts its monitor thread.
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            futures = [pool.submit(_write_clip, plan, video_dir) for plan in plans]
            finished = as_completed(futures)
            for done in tqdm(finished, total=len(futures), unit="clip", desc="synthetic ssv2", disable=not progress):
                done.result()
    write_labels(out, plans)
    if progress:
        counts = " / ".join(f"{sum(p.split == s for p in plans)} {s}" for s in SPLITS)
        seconds = time.perf_counter() - started
        print(f"synthetic SSv2: {counts} clips, {len(label_ids)} classes, {seconds:.1f} s -> {out}")
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the epilog's one-template-per-line list as written."""


def main(argv: Sequence[str] | None = None) -> int:
    supported = "\n".join(
        f"  {i:3d}  {TEMPLATES[i]}" + (f"  [{MOTIONS[i].receptacle}: motion + appearance]" if MOTIONS[i].receptacle else "")
        for i in sorted(MOTIONS)
    )
    parser = argparse.ArgumentParser(
        prog="python -m sharding.synthetic",
        description="Write a small synthetic Something-Something-V2, in the real one's layout.\n"
        "Most classes differ only in motion. The receptacle ones (into / out of a container,\n"
        "behind / from behind a board) need motion and the receptacle's look together: the\n"
        "object moves the same way for both kinds, and no single frame shows which way it went.",
        epilog=f"templates with a synthetic motion (use the id or the text):\n{supported}",
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="folder to write labels/ and 20bn-something-something-v2/ into")
    add("--seed", type=int, default=0, help="the dataset is a pure function of the seed and the other options")
    add(
        "--classes",
        nargs="+",
        default=list(DEFAULT_CLASSES),
        metavar="ID_OR_TEMPLATE",
        help="SSv2 label ids or template texts to generate (see the list below)",
    )
    add("--train-per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS, help="train clips per class")
    add("--val-per-class", type=int, default=DEFAULT_VAL_PER_CLASS, help="validation clips per class")
    add("--test", type=int, default=DEFAULT_TEST_COUNT, help="unlabelled test clips, classes drawn at random")
    add("--min-seconds", type=float, default=2.0, help="shortest clip in seconds (SSv2: 2)")
    add("--max-seconds", type=float, default=6.0, help="longest clip in seconds (SSv2: 6)")
    add("--fps", type=int, default=12, help="frame rate (SSv2: 12)")
    add("--height", type=int, default=240, help="frame height in pixels (SSv2: 240)")
    add("--workers", type=int, default=None, help="worker processes (None: one per CPU); never changes the result")
    add("--overwrite", action="store_true", help="replace a dataset already in --out")
    add("--no-progress", action="store_true", help="no progress bar and no summary line")
    args = parser.parse_args(argv)
    try:
        generate(
            args.out,
            seed=args.seed,
            classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            test_count=args.test,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            fps=args.fps,
            height=args.height,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
