"""The type check every config dataclass runs on its fields: one place, shared by the TOML reader and the
Python API, so that ``VAEConfig(latent_dim=2.5)`` is refused at construction with the same one-line error a
config file's ``latent_dim = 2.5`` gets."""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
import typing
from typing import Any, Literal, get_args, get_origin

from elbox.errors import UserError

NONE_WORD = "none"  # TOML has no null; an unset optional value is written as the string "none"


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every field of a config dataclass."""
    hints = typing.get_type_hints(cls)  # each base class's annotations in its own module
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for ``T | None``, else (tp, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str, *, none_word: bool = True) -> Any:
    """Check (and lightly convert) one value against a field's type; UserError names ``where`` if it is wrong.

    ``none_word``: the string "none" stands for None in an optional field (as a TOML file writes it)."""
    inner, optional = unwrap_optional(tp)
    if optional and (value is None or (none_word and value == NONE_WORD)):
        return None
    if get_origin(inner) is Literal:
        if value not in get_args(inner):
            raise UserError(f"{where}={value!r} is not allowed; choose one of {', '.join(map(str, get_args(inner)))}")
        return value
    if get_origin(inner) is tuple:
        assert get_args(inner)[0] is int, f"{where}: only tuples of int are config types"
        items = value.tolist() if hasattr(value, "tolist") else value  # a numpy array or a tensor
        if not isinstance(items, (list, tuple)) or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
            raise UserError(f"{where}={value!r} must be a list of integers, e.g. [32, 64]")
        return tuple(int(v) for v in items)
    if inner is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}={value!r} must be true or false")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # a numpy integer too
            raise UserError(f"{where}={value!r} must be an integer")
        return int(value)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # a numpy number too
            raise UserError(f"{where}={value!r} must be a number")
        return float(value)
    if inner is str:
        if isinstance(value, os.PathLike):  # a pathlib.Path where a path is meant
            value = os.fspath(value)
        if not isinstance(value, str):
            raise UserError(f"{where}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {where}")


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass against its annotation, in place (a list becomes a tuple, an int
    in a float field a float); the first wrong one raises a UserError naming ``Class.field``."""
    name = type(config).__name__
    for key, tp in field_types(type(config)).items():
        setattr(config, key, coerce(getattr(config, key), tp, f"{name}.{key}", none_word=False))
