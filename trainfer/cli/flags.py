"""Command-line flags generated from settings dataclasses, so a default, a choice or a help text is written once.

Each field of a settings class becomes a flag named after it (`max_tokens` -> `--max-tokens`): its type gives
the parsing (`bool` a switch, `Literal[...]` the choices, `list[X]` a repeatable flag, `tuple[X, ...]` a
comma-separated list, `X | None` an optional value, a dataclass its own fields' flags), its default the
flag's default (a field without one is required), and the string literal under the field (an attribute
docstring, read from the source as vLLM reads EngineArgs') the help. Where a library function owns a default,
the field reads it from the function's signature with `default_of`, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal


def arg(default: Any = dataclasses.MISSING, *, positional: bool = False, flags: tuple[str, ...] = (),
        metavar: str | None = None, choices: tuple[Any, ...] = (), only: tuple[str, ...] = ()) -> Any:  # fmt: skip
    """A field with how its flag differs from the plain rule: a positional argument, other flag names
    (`flags=("-n",)`), a metavar, choices a library keeps in a tuple, or, for a nested settings class, `only`
    the fields to offer."""
    meta = {"positional": positional, "flags": flags, "metavar": metavar, "choices": choices, "only": only}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(fn: Callable[..., Any], name: str) -> Any:
    """The default a library function gives its parameter `name`: the one place that default is written."""
    default = inspect.signature(fn).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{fn.__qualname__}({name}) has no default")
    return default


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the settings class `cls` (and of the settings classes it nests)."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            only = f.metadata.get("only") or tuple(g.name for g in dataclasses.fields(kind))
            _add_nested(parser, kind, only)
            continue
        _add_one(parser, f, kind, docs.get(f.name, ""))


def build(cls: type, namespace: argparse.Namespace) -> Any:
    """The settings object from parsed flags; a flag not given keeps the field's default."""
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            names = {g.name for g in dataclasses.fields(kind)} & set(vars(namespace))
            values[f.name] = kind(**{n: getattr(namespace, n) for n in names if getattr(namespace, n) is not None})
        elif getattr(namespace, f.name, None) is not None:
            values[f.name] = getattr(namespace, f.name)
    return cls(**values)


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written under it, for `cls` and the dataclasses it derives from."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):  # fmt: skip
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _add_nested(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...]) -> None:
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in only:
            _add_one(parser, f, hints[f.name], docs.get(f.name, ""))


def _add_one(parser: argparse.ArgumentParser, f: dataclasses.Field, kind: Any, doc: str) -> None:
    meta = f.metadata
    default = _default(f)
    required = default is dataclasses.MISSING
    kw: dict[str, Any] = {"help": _help(doc, default, kind)}
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    kind = _unwrap_optional(kind)
    origin = typing.get_origin(kind)
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
        kw["default"] = None
    elif origin is Literal:
        choices = typing.get_args(kind)
        kw.update(choices=choices, type=type(choices[0]))
    elif origin is list:
        kw.update(type=_parser_of(typing.get_args(kind)[0]), action="append")
    elif origin is tuple:
        kw.update(type=_comma_separated(typing.get_args(kind)[0]), metavar=kw.get("metavar") or "A,B,...")
    else:
        kw["type"] = _parser_of(kind)
    if meta.get("choices"):
        kw["choices"] = meta["choices"]
    if meta.get("positional"):
        if origin is list:
            kw.pop("action")
            kw["nargs"] = "+"
        elif not required:
            kw["nargs"] = "?"
        parser.add_argument(f.name, **kw)
        return
    names = meta.get("flags") or ("--" + f.name.replace("_", "-"),)
    parser.add_argument(*names, dest=f.name, required=required, **kw)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _help(doc: str, default: Any, kind: Any) -> str:
    """The field's docstring, with its default when the docstring does not already say it."""
    if default in (None, False, [], dataclasses.MISSING) or "default" in doc:
        return doc.replace("%", "%%")
    shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else default
    return f"{doc} (default {shown})".strip().replace("%", "%%")


def _unwrap_optional(kind: Any) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return kind


def _parser_of(kind: Any) -> Callable[[str], Any]:
    return kind if kind in (int, float, str, Path) else str


def _comma_separated(kind: Any) -> Callable[[str], tuple]:
    convert = _parser_of(kind)

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(t) for t in text.split(",") if t.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from e

    return parse


def _copy(value: Any) -> Any:
    return dataclasses.replace(value) if dataclasses.is_dataclass(value) else type(value)(value)
