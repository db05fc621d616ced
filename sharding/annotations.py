"""Read SSv2's annotation files: the label map (template -> id) and the split files (one
entry per clip, in the order they are packed).

SSv2 circulates with two namings of the same files, both accepted (:func:`find_label_files`):

- ``labels/labels.json``, ``labels/train.json``, ``labels/validation.json``, ``labels/test.json``
  (the current download);
- ``something-something-v2-labels.json``, ``-train.json``, ``-validation.json``, ``-test.json``
  (the original 20BN release, what mmaction2's preparation docs expect), in ``annotations/``,
  ``labels/`` or the root itself.

Files that are missing or malformed raise :class:`AnnotationError` naming the file: the
caller cannot go on without them. Problems with single clips (an unknown template, a
duplicate id) are not errors here; :func:`label_of` and the packer turn them into rejects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sharding.ssv2 import LABELS_DIR, template_key

SPLITS = ("train", "validation", "test")
# (label map, split file pattern) of each naming, the current download's first
NAMINGS = (("labels.json", "{split}.json"), ("something-something-v2-labels.json", "something-something-v2-{split}.json"))
# where an SSv2 root keeps them, searched in this order when no folder is given
LABEL_FOLDERS = (LABELS_DIR, "annotations", ".")


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


@dataclass(frozen=True)
class LabelFiles:
    """The label map and the split file one run reads."""

    labels: Path
    split: Path


def find_label_files(root: Path, split: str, folder: Path | None = None) -> LabelFiles:
    """The label map and ``split``'s file under ``folder`` (or, without it, ``root/labels``,
    ``root/annotations`` or ``root``), in either naming (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    folders = [Path(folder)] if folder is not None else [Path(root) / name for name in LABEL_FOLDERS]
    looked = []
    for candidate in folders:
        for labels_name, split_pattern in NAMINGS:
            labels, split_file = candidate / labels_name, candidate / split_pattern.format(split=split)
            if labels.is_file():
                if not split_file.is_file():
                    raise AnnotationError(f"label file not found: {split_file} (beside {labels}, which was found)")
                return LabelFiles(labels=labels, split=split_file)
            looked.append(str(labels))
    raise AnnotationError(
        f"label file not found: looked for {', '.join(looked)}; point --labels at the folder holding labels.json "
        "(or something-something-v2-labels.json) and the split files"
    )


def read_label_map(path: Path) -> dict[str, int]:
    """The label map file (``labels.json`` or ``something-something-v2-labels.json``) as
    {template without brackets: label id}."""
    path = Path(path)
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


def read_split(path: Path) -> list[ClipEntry]:
    """The clips of a split file, in file order."""
    path = Path(path)
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
