"""Config files (TOML) read into frozen dataclasses, strictly: a typo or a wrong type is an error, never a default.

A dataclass's fields are its file's keys; a field whose type is itself a dataclass is a table
(`[model.unet]`). Field types understood: bool, int, float (ints accepted), str, tuple[T, ...]
(a TOML array), `T | U` (the first that fits), `T | None` (TOML has no null: None is only ever a
default) and dataclasses.
Checks that need more than a type (ranges, one of several names) belong in the dataclass's
`__post_init__`, raising an `SdtorchError`: its message gets the file and section prepended here.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import InvalidInputError, SdtorchError

T = TypeVar("T")


class _Mismatch(Exception):
    """A value is not of its field's type (turned into an InvalidInputError that names the key)."""


def load(cls: type[T], path: str | Path, *, kind: str = "config") -> T:
    """Read the TOML file `path` into the dataclass `cls`; every error names the file (`kind`: "recipe", ...)."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise InvalidInputError(f"cannot read {kind} {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInputError(f"{kind} {path} is not valid TOML: {e}") from None
    return from_table(cls, table, source=str(path))


def from_table(cls: type[T], table: Mapping[str, Any], *, source: str, section: str = "") -> T:
    """Build the dataclass `cls` from a parsed TOML table (nested tables build nested dataclasses).

    Unknown keys, values of the wrong type and missing required keys raise `InvalidInputError`
    naming `source` (the file), the section and the key. `section` is the table's dotted name
    ("" for the file's top level).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            name = f"[{_dotted(section, key)}]" if isinstance(value, Mapping) else _where(section, key)
            raise InvalidInputError(f"{source}: {name}: unknown key; {hint}valid keys: {', '.join(fields)}")
    missing = [
        f"[{_dotted(section, name)}]" if dataclasses.is_dataclass(hints[name]) else name
        for name, f in fields.items() if name not in table and _required(f)
    ]
    if missing:
        raise InvalidInputError(f"{source}: {_where(section, '')}needs {', '.join(missing)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        try:
            values[key] = _convert(value, hints[key], source, _dotted(section, key))
        except _Mismatch:
            raise InvalidInputError(
                f"{source}: {_where(section, key)}: expected {_describe(hints[key])}, got {value!r}"
                f" ({type(value).__name__})"
            ) from None
    try:
        return cls(**values)
    except SdtorchError as e:  # a check of the dataclass's own (__post_init__)
        raise InvalidInputError(f"{source}: {_where(section, '')}{e}") from e


def _where(section: str, key: str) -> str:
    """How a message names a key: "[vae] kl_weight", "seed" at the top level; "[vae] " for the section alone."""
    return f"[{section}] {key}" if section else key


def _dotted(section: str, key: str) -> str:
    """The dotted name of the table `key` of `section` ("model.unet")."""
    return f"{section}.{key}" if section else key


def _required(f: dataclasses.Field) -> bool:
    """Whether the field has no default (its key must be given)."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(value: Any, hint: Any, source: str, section: str) -> Any:
    """`value` as the type `hint` (a list becomes a tuple, an int a float); `_Mismatch` when it is not one."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return from_table(hint, value, source=source, section=section)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # T | U | None: a value given is the first of T, U it fits
        for inner in (a for a in args if a is not type(None)):
            try:
                return _convert(value, inner, source, section)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_convert(v, args[0], source, section) for v in value)
    if isinstance(value, bool) != (hint is bool):  # bool is an int to Python, not to a config
        raise _Mismatch
    if hint is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, hint):
        raise _Mismatch
    return value


def _describe(hint: Any) -> str:
    """A field type in words: "int", "a list of int", "a table"."""
    if dataclasses.is_dataclass(hint):
        return "a table"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(args[0])}"
    return hint.__name__


__all__ = ["from_table", "load"]
