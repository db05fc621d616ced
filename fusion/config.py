"""Typed configuration: small frozen dataclasses per concern, loaded from YAML, overridden
from the command line with dotted keys (``--model.heads 16``).

Precedence is CLI > YAML > dataclass defaults. Every field is declared with :func:`option`,
whose ``doc`` is the ``--help`` text, so the documentation of a key lives next to its default.

Start reading at :func:`load`; :func:`render_help` prints every key of a config tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and why."""


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A documented dataclass field. ``doc`` becomes the ``--help`` line of the key."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return origin(_convert(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = tp(value) if tp is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking every key and value."""
    data = dict(data or {})
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key, names)
        tp = hints[name]
        if _is_config(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
            kwargs[name] = from_dict(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _convert(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The nested plain-dict form of a config (what a checkpoint or a log records)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _leaf_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of ``cls`` mapped to its dataclass field."""
    out: dict[str, Any] = {}
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            out.update(_leaf_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def parse_overrides(cls: type, argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``--a.b value`` / ``--a.b=value`` pairs that name keys of ``cls`` from the rest.

    Returns the overrides as a nested dict of raw strings and the arguments left over.
    A ``--key`` that looks like a config key (it has a dot) but names nothing is an error.
    """
    leaves = _leaf_keys(cls)
    top = {f.name for f in dataclasses.fields(cls)}
    overrides: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            if key in leaves or (key in top and key not in _section_names(cls)):
                if not eq:
                    if i + 1 >= len(argv):
                        raise ConfigError(f"--{key} needs a value")
                    value = argv[i + 1]
                    i += 1
                _set_dotted(overrides, key, value)
                i += 1
                continue
            if "." in key and key.split(".", 1)[0] in top:
                raise _unknown_key(key, [k.rsplit(".", 1)[-1] for k in leaves])
        rest.append(arg)
        i += 1
    return overrides, rest


def _section_names(cls: type) -> set[str]:
    hints = _type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if _is_config(hints[f.name])}


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` on top, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load(
    cls: type[T],
    config_path: str | Path | None = None,
    argv: list[str] | None = None,
    *,
    sections: set[str] | None = None,
) -> tuple[T, list[str]]:
    """Defaults, then the YAML file, then ``--dotted.key value`` overrides from ``argv``.

    ``sections`` restricts which top-level YAML sections are read (a tool that only needs the
    model reads a full training config's ``model:`` and ignores ``train:``). Returns the config
    and the arguments that were not config keys.
    """
    data: dict[str, Any] = read_yaml(config_path) if config_path else {}
    if sections is not None:
        data = {k: v for k, v in data.items() if k in sections}
    overrides, rest = parse_overrides(cls, list(argv or []))
    return from_dict(cls, merge_trees(data, overrides)), rest


def render_help(cls: type, prefix: str = "") -> str:
    """One line per dotted key: name, type, default and its documentation."""
    lines = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            lines.append(render_help(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  --{prefix}{f.name} ({tname}, default {default!r})\n      {f.metadata.get('doc', '')}")
    return "\n".join(line for line in lines if line)
