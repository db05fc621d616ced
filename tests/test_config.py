"""The config loader: defaults < YAML < CLI, typed coercion, clear errors for unknown keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from fusion.config import ConfigError, load, option, render_help, to_dict


@dataclass(frozen=True)
class Inner:
    heads: int = option(8, "attention heads")
    kind: Literal["a", "b"] = option("a", "which kind")
    weights: str | None = option(None, "a path or nothing")

    def __post_init__(self):
        if self.heads <= 0:
            raise ConfigError(f"inner.heads must be positive, got {self.heads}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = option(factory=Inner, doc="the inner section")
    rate: float = option(0.5, "a rate")
    flag: bool = option(False, "a switch")
    sizes: tuple[int, ...] = option((1, 2), "a list")


def test_defaults_yaml_cli_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  heads: 4\n  kind: b\nrate: 0.25\n")
    cfg, rest = load(Outer, path, ["--inner.heads", "16", "--flag=true", "--other", "x"])
    assert cfg.inner.heads == 16  # CLI beats YAML
    assert cfg.inner.kind == "b"  # YAML beats default
    assert cfg.rate == 0.25 and cfg.flag is True and cfg.sizes == (1, 2)
    assert rest == ["--other", "x"]  # not a config key: left for the caller


def test_coercion_of_cli_strings():
    cfg, _ = load(Outer, None, ["--inner.weights", "none", "--sizes", "3,4,5", "--rate", "1e-3"])
    assert cfg.inner.weights is None and cfg.sizes == (3, 4, 5) and cfg.rate == pytest.approx(1e-3)
    cfg, _ = load(Outer, None, ["--inner.weights", "/w.pth"])
    assert cfg.inner.weights == "/w.pth"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--inner.haeds", "4"], "unknown config key 'inner.haeds' (did you mean 'inner.heads'?)"),
        (["--inner.heads", "four"], "inner.heads: expected int"),
        (["--inner.kind", "c"], "inner.kind: 'c' is not one of a, b"),
        (["--inner.heads", "0"], "inner.heads must be positive"),
        (["--flag", "maybe"], "flag: expected true/false"),
        (["--rate"], "--rate needs a value"),
    ],
)
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load(Outer, None, argv)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load(Outer, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("innr:\n  heads: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'innr'"):
        load(Outer, unknown)


def test_sections_filter_and_help(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  heads: 2\ntrain:\n  epochs: 3\n")
    cfg, _ = load(Outer, path, [], sections={"inner"})
    assert to_dict(cfg)["inner"]["heads"] == 2
    text = render_help(Outer)
    assert "--inner.heads (int, default 8)" in text and "attention heads" in text
