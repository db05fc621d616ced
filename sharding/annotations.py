"""Read SSv2's annotation files: ``labels/labels.json`` (template -> id) and
``labels/{train,validation,test}.json`` (one entry per clip, in the order they are packed).

Files that are missing or malformed raise :class:`AnnotationError` naming the file: the
caller cannot go on without them. Problems with single clips (an unknown template, a
duplicate id) are not errors here; :func:`label_of` and the packer turn them into rejects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sharding.ssv2 import template_key

SPLITS = ("train", "validation", "test")
LABELS_FILE = "labels.json"


class AnnotationError(Exception):
    """A label file is missing or malformed; the message names it."""


@dataclass(frozen=True)
class ClipEntry:
    """One clip as the split file lists it; the test split has only ids."""

    id: str
    template: str | None = None  # with brackets, as in the split file
    label_text: str | None = None  # the template with its placeholders filled in
    placeholders: tuple[str, ...] = ()


def _read_json(path: Path):
    if not path.is_file():
        raise AnnotationError(f"label file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"malformed JSON in {path}: {error}") from error


def read_label_map(labels_dir: Path) -> dict[str, int]:
    """``labels.json`` as {template without brackets: label id}."""
    path = Path(labels_dir) / LABELS_FILE
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise AnnotationError(f"malformed {path}: expected a non-empty object mapping templates to ids")
    try:
        label_map = {template_key(str(template)): int(label_id) for template, label_id in raw.items()}
    except (TypeError, ValueError) as error:
        raise AnnotationError(f"malformed {path}: every id must be an integer ({error})") from error
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise AnnotationError(f"malformed {path}: ids must be 0..{len(label_map) - 1}, each once")
    return label_map


def templates_in_id_order(label_map: dict[str, int]) -> list[str]:
    return [template for template, _ in sorted(label_map.items(), key=lambda item: item[1])]


def read_split(labels_dir: Path, split: str) -> list[ClipEntry]:
    """The clips of ``split`` in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    path = Path(labels_dir) / f"{split}.json"
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise AnnotationError(f"malformed {path}: expected a list of clip entries")
    entries = []
    for position, item in enumerate(raw):
        if not isinstance(item, dict) or "id" not in item:
            raise AnnotationError(f"malformed {path}: entry {position} has no 'id'")
        placeholders = item.get("placeholders") or ()
        entries.append(
            ClipEntry(
                id=str(item["id"]),
                template=item.get("template"),
                label_text=item.get("label"),
                placeholders=tuple(str(p) for p in placeholders),
            )
        )
    return entries


def label_of(entry: ClipEntry, label_map: dict[str, int]) -> int | None:
    """The label id of a labelled clip, or None when its template is not in labels.json."""
    if entry.template is None:
        return None
    return label_map.get(template_key(entry.template))
