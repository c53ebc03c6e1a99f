"""Settings dataclasses ↔ command-line options ↔ job argv, in one place.

Each stage describes what it can be asked in a typed `Settings` dataclass. The command line's
options are derived from it (so `python -m core pretrain --help` and the page's controls can never
disagree), and a background job is started from `(command, settings)`: `to_argv` writes the same
options back, so no page builds a command line by hand.

A field says how it appears on the command line through `option(...)`:

    @dataclass
    class Settings:
        start: str | None = option(None, flag="--from", metavar="RUN", help="run to start from")
        steps: int | None = option(None, group="budget", help="optimiser steps")
        minutes: float | None = option(None, group="budget", help="train for this many minutes")
        causal: bool = option(False, help="mask the future")

Booleans become `--flag` switches; fields sharing a `group` are mutually exclusive; `choices`
limits the values. A field without `option()` metadata gets `--field-name` from its name.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_NONE = type(None)


def option(default: Any = dataclasses.MISSING, *, flag: str | None = None, help: str | None = None,
           choices: tuple | None = None, group: str | None = None, metavar: str | None = None,
           positional: bool = False, default_factory: Any = dataclasses.MISSING, cli: bool = True):
    """A dataclass field with its command-line spelling. `cli=False` keeps it off the command line."""
    metadata = dict(flag=flag, help=help, choices=choices, group=group, metavar=metavar,
                    positional=positional, cli=cli)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation) -> type:
    """`int | None` → int, `tuple[str, ...]` → tuple, `float` → float."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not _NONE]
        return _base_type(args[0]) if args else str
    return origin or annotation


def _fields(cls) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, _base_type(hints[f.name])) for f in dataclasses.fields(cls)
            if f.metadata.get("cli", True)]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one option per field of the settings dataclass `cls`."""
    groups: dict[str, Any] = {}
    for f, kind in _fields(cls):
        meta = f.metadata
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        default = _default(f)
        kwargs: dict[str, Any] = dict(help=meta.get("help"), default=default)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif kind in (list, tuple):
            kwargs.update(type=_split_list, metavar=meta.get("metavar") or "A,B")
        else:
            kwargs["type"] = kind if kind in (int, float) else str
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        if meta.get("positional"):
            if default is None:
                kwargs["nargs"] = "?"  # an optional positional (`data list` vs `data fetch NAME`)
            else:
                kwargs.pop("default")
            target.add_argument(f.name, **kwargs)
        else:
            target.add_argument(flag_of(f), dest=f.name, **kwargs)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def settings_from_args(cls, args: argparse.Namespace):
    """The settings dataclass filled from parsed arguments (fields off the CLI keep defaults)."""
    given = {f.name: getattr(args, f.name) for f, _ in _fields(cls) if hasattr(args, f.name)}
    return cls(**given)


def to_argv(settings) -> list[str]:
    """The command-line options that give back `settings` (defaults left out)."""
    argv: list[str] = []
    for f, kind in _fields(type(settings)):
        value = getattr(settings, f.name)
        if f.metadata.get("positional"):
            if value is not None:
                argv.append(str(value))
            continue
        if value is None or value == _default(f):
            continue
        flag = flag_of(f)
        if kind is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif kind in (list, tuple):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv
