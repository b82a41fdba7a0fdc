"""One error type for bad input: the CLI prints its message as one line and exits non-zero; the type checks that
turn a mistyped value read from a file into such a line (``check_field_types``); and ``CheckedConfig``, the base of
the dataclass configs read from files (their one ``from_dict``/``to_dict``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Mapping, Optional


class PgolfError(Exception):
    """A user-facing error. The message names the file or field at fault and what was expected."""


class ConfigError(PgolfError, ValueError):
    """An invalid configuration value (names the field)."""


class DataError(PgolfError, ValueError):
    """Bad data on disk: a shard, a tokenizer, a data directory (names the file)."""


class ArtifactError(PgolfError, ValueError):
    """A truncated, corrupted, mismatched or over-budget artifact (names the file)."""


class CheckpointError(PgolfError, ValueError):
    """A missing, truncated, corrupted or mismatched checkpoint, or one that cannot be written (names the file)."""


def error_line(e: BaseException) -> str:
    """The one line for a PgolfError (its message) or an OSError (its path, then the reason)."""
    if isinstance(e, OSError) and not isinstance(e, PgolfError):
        what = e.strerror or str(e).strip() or type(e).__name__
        return f"{e.filename}: {what}" if e.filename else what
    return str(e)


# ---------------------------------------------------------------------------------------------------------
# Type checks of config values read from files (YAML outside the CLI, checkpoints, artifacts): a mistyped value is
# one line naming its field instead of a TypeError deep inside a ``validate``. Written here rather than taken from a
# library: jsonargparse (already a dependency) checks types under the CLI, but builds a parser per check and words
# its errors over several lines; typeguard or pydantic would be new dependencies for some 40 lines. (This file is
# part of the code an artifact is evaluated with, counted by quant/code_size.py.)
# ---------------------------------------------------------------------------------------------------------

_UNIONS = (typing.Union, types.UnionType)


def check_field_types(cls, values: dict[str, Any], section: str) -> None:
    """Raise a ``ConfigError`` naming ``section.field`` for the first value in ``values`` (from YAML, a checkpoint or
    an artifact) that does not have its dataclass field's type: plain ints, floats, bools and strings, ``Literal``,
    ``Optional`` and ``list[...]``; other annotations are not checked here."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and _type_matches(hint, value) is False:
            raise ConfigError(f"{section}.{name}: expected {_describe_type(hint)}, got {value!r}")


def _type_matches(hint: Any, value: Any) -> Optional[bool]:
    """True/False for the annotation forms listed in ``check_field_types``; None for any other form."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin in _UNIONS:
        results = [_type_matches(a, value) for a in args]
        return True if any(r is not False for r in results) else False
    if origin is list:
        return isinstance(value, list) and (not args or all(_type_matches(args[0], v) is not False for v in value))
    if hint is type(None):
        return value is None
    return None


def _describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in _UNIONS:
        return " or ".join(_describe_type(a) for a in args)
    if origin is list:
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], _describe_type(args[0]))}" if args else "a list"
    return str(hint)


@dataclasses.dataclass
class CheckedConfig:
    """Base of a dataclass config section read from YAML, a checkpoint or an artifact: ``from_dict`` names an unknown
    or mistyped field as ``<SECTION>.<field>`` in one line; ``to_dict`` is its inverse; ``replace`` goes through
    both. A dataclass without fields itself, so that jsonargparse reads its subclasses as plain dataclasses."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            where = cls.__module__.replace(".", "/")
            raise ConfigError(f"{cls.SECTION}: unknown field(s) {unknown}; known fields are listed in {where}.py")
        check_field_types(cls, dict(d), cls.SECTION)
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{cls.SECTION}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return type(self).from_dict({**self.to_dict(), **changes})
