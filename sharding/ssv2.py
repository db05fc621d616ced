"""What the project knows about Something-Something-V2 itself: the 174 templates in label-id
order, how a bracketed template maps to its id, and which labels swap under a horizontal flip.

The template list is the project's own copy (``ssv2_templates.txt``, line N = id N-1), so no
run ever needs the dataset's ``labels.json`` to know the class names.
"""

from __future__ import annotations

from importlib import resources

NUM_CLASSES = 174
LABELS_DIR = "labels"
"""Where an SSv2 root keeps labels.json, train.json, validation.json and test.json."""
VIDEOS_DIR = "20bn-something-something-v2"
"""Where an SSv2 root keeps the ``<id>.webm`` clips."""


def _read_templates() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("ssv2_templates.txt").read_text(encoding="utf-8")
    templates = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(templates) == NUM_CLASSES, f"ssv2_templates.txt holds {len(templates)} templates, expected 174"
    return templates


TEMPLATES: tuple[str, ...] = _read_templates()
"""The 174 templates without brackets; index = label id."""

# Horizontal flip turns "left to right" into "right to left": a flip is only label-preserving
# if these ids are swapped (ids are 0-based, from the official labels.json).
LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = ((86, 87), (93, 94), (166, 167))
FLIP_LABEL: dict[int, int] = {a: b for a, b in LEFT_RIGHT_PAIRS} | {b: a for a, b in LEFT_RIGHT_PAIRS}


def template_key(template: str) -> str:
    """``"Holding [something] next to [something]"`` -> ``"Holding something next to something"``."""
    return template.replace("[", "").replace("]", "")


def flip_label(label: int) -> int:
    """The label of a horizontally flipped clip."""
    return FLIP_LABEL.get(label, label)
