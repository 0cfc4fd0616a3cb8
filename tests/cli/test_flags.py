"""Flags generated from settings dataclasses: each rule on a small class, then the real command table."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from trainfer.cli import COMMANDS, Group, build_parser
from trainfer.cli.flags import add_flags, arg, attribute_docs, build, default_of


def library(path: str, steps: int = 7, mode: str = "fast") -> None:
    """Stands in for a library function that owns its defaults."""


@dataclass(kw_only=True)
class Inner:
    alpha: float = 0.5
    """how much alpha"""
    beta: int = 3
    """not offered"""


@dataclass(kw_only=True)
class Settings:
    """a command"""

    path: Path = arg(positional=True)
    """where it goes"""
    out: str
    """required, no default"""
    steps: int = default_of(library, "steps")
    """how many steps"""
    mode: Literal["fast", "slow"] = "fast"
    """which way"""
    level: str = arg("b", choices=("a", "b"))
    verbose: bool = False
    """say more"""
    color: bool = True
    tag: list[str] = arg([], metavar="TAG")
    sizes: tuple[int, ...] = (1, 4, 16)
    limit: int | None = None
    n: int = arg(2, flags=("-n",))
    inner: Inner = arg(Inner(), only=("alpha",))


def parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, Settings)
    return build(Settings, parser.parse_args(list(argv)))


def test_defaults_come_from_the_fields_and_the_library():
    s = parse("p", "--out", "o")
    assert s == Settings(path=Path("p"), out="o")
    assert s.steps == 7 and s.sizes == (1, 4, 16) and s.inner == Inner() and s.color and not s.verbose


def test_each_type_parses_its_own_way():
    s = parse("p", "--out", "o", "--steps", "9", "--mode", "slow", "--level", "a", "--verbose", "--no-color",
              "--tag", "x", "--tag", "y", "--sizes", "2,8", "--limit", "5", "-n", "3", "--alpha", "0.25")  # fmt: skip
    assert (s.path, s.steps, s.mode, s.level, s.verbose, s.color) == (Path("p"), 9, "slow", "a", True, False)
    assert (s.tag, s.sizes, s.limit, s.n, s.inner) == (["x", "y"], (2, 8), 5, 3, Inner(alpha=0.25))


def test_a_repeatable_default_is_not_shared_between_runs():
    parse("p", "--out", "o", "--tag", "x")
    assert parse("p", "--out", "o").tag == []


@pytest.mark.parametrize(
    "argv",
    [
        ("p",),  # --out is required
        ("p", "--out", "o", "--mode", "medium"),
        ("p", "--out", "o", "--level", "c"),
        ("p", "--out", "o", "--sizes", "1,x"),
        ("p", "--out", "o", "--beta", "4"),  # a nested field not offered
        ("p", "--out", "o", "--steps", "many"),
    ],
)
def test_bad_flags_are_refused(argv):
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parse(*argv)


def test_help_is_the_attribute_docstring_with_the_default():
    assert attribute_docs(Settings)["steps"] == "how many steps"
    assert attribute_docs(Inner)["alpha"] == "how much alpha"
    parser = argparse.ArgumentParser()
    add_flags(parser, Settings)
    text = " ".join(parser.format_help().split())
    assert "how many steps (default 7)" in text and "how much alpha (default 0.5)" in text
    assert "--beta" not in text


def test_default_of_refuses_a_parameter_without_one():
    with pytest.raises(TypeError, match="no default"):
        default_of(library, "path")


def commands(table=COMMANDS, prefix=()):
    for name, entry in table.items():
        if isinstance(entry, Group):
            yield from commands(entry.commands, (*prefix, name))
        else:
            yield (*prefix, name), entry


def test_every_command_has_help_and_a_runner():
    parser = build_parser()
    for path, (settings, run) in commands():
        assert settings.__doc__ and callable(run), path
        sub = parser
        for name in path:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        sub.format_help()  # renders: no bad format strings, every metavar known


def test_every_documented_field_has_help():
    """A flag without a sentence is a flag a user has to guess; every field says what it is."""
    missing = []
    for path, (settings, _) in commands():
        docs = attribute_docs(settings)
        hints = typing.get_type_hints(settings)
        for f in dataclasses.fields(settings):
            if not dataclasses.is_dataclass(hints[f.name]) and not docs.get(f.name):
                missing.append(f"{' '.join(path)} --{f.name}")
    assert not missing, missing


def test_the_parser_does_not_import_the_web_stack():
    """Every command builds the whole parser; FastAPI, pydantic and prometheus-client cost ~0.4 s of start-up,
    so only `serve` imports them (the server's limits live in serve/limits.py for the flags to read)."""
    heavy = "{'fastapi', 'pydantic', 'prometheus_client'}"
    code = f"import sys, trainfer.cli; trainfer.cli.build_parser(); print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
