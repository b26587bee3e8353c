"""Typed parsing of recipe values, and every ``file:line: key: ...`` message, from one place.

:func:`where` names a key (``"dpo.yaml:12: train.lr"``; ``(command line)`` for an override);
:func:`typed` checks a value against the type its dataclass field or loss argument declares;
:func:`check_range` applies :data:`RANGES`, the ranges of keys no config dataclass owns (the
dataclasses declare theirs beside their fields, ``RANGES`` checked in ``__post_init__``);
:func:`dataclass_section` builds a section's dataclass and turns a
:class:`rlcourse.config.FieldRangeError` into a :class:`RecipeError` naming file, line and key.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from rlcourse.config import (
    COUNT,
    FINITE,
    NON_NEGATIVE,
    POSITIVE,
    FieldRangeError,
    at_least,
    one_of,
    optional,
)

__all__ = ["RANGES", "RecipeError", "check_keys", "check_range", "dataclass_section",
           "number_or", "section", "typed", "where"]


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the line and the key."""


def where(source: str, lines: Mapping[str, int], key: str) -> str:
    """``"file:line: key"`` (``"file (command line): key"`` for an override, line 0)."""
    line = lines.get(key)
    if line == 0:  # set on the command line
        return f"{source} (command line): {key}"
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


def number_or(value: Any) -> Any:
    """``"5e-7"`` -> ``5e-07``: PyYAML reads exponents without a dot as strings."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "a mapping", type(None): "null"}


def _type_name(value: Any) -> str:
    return f"{value!r} ({_KINDS.get(type(value), type(value).__name__)})"


def typed(value: Any, hint: Any, at: str) -> Any:
    """``value`` checked against the type ``hint`` (``bool``, ``int``, ``float``, ``str``,
    ``X | None``, ``tuple[float, float]``); numbers written as strings (``"5e-7"``, which YAML
    1.1 reads as a string) are converted. A boolean must be a YAML boolean: ``"false"`` (a
    string) is an error, not ``True``. ``at``: where the value is (:func:`where`)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return typed(value, inner[0], at) if len(inner) == 1 else value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{at}: expected true or false, got {_type_name(value)}")
        return value
    if hint is int:
        if isinstance(value, str):
            value = number_or(value.strip())
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise RecipeError(f"{at}: expected an integer, got {_type_name(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecipeError(f"{at}: expected a number, got {_type_name(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            hint_ = " (YAML reads unquoted no, yes, on, off as booleans: quote it)" \
                if isinstance(value, bool) else ""
            raise RecipeError(f"{at}: expected a string, got {_type_name(value)}{hint_}")
        return value
    if typing.get_origin(hint) is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{at}: expected a mapping of keys to values, got "
                              f"{_type_name(value)}")
        return dict(value)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{at}: expected a list of {len(args)} values, got "
                              f"{_type_name(value)}")
        return tuple(typed(v, a, f"{at}[{i}]")
                     for i, (v, a) in enumerate(zip(value, args, strict=True)))
    return value


#: A recipe's ``dtype`` (:func:`rlcourse.precision.resolve_precision`): the compute dtype of the
#: trained model (float32 master weights), or ``bf16-pure`` weights; fp8 training is not
#: supported by the trainers.
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "bf16-pure")
#: Ranges of the keys no config dataclass owns, by dotted key (``loss.`` keys apply to every
#: loss that has them): ``(test, what the value must be)``. The sections' dataclasses
#: (TrainConfig, PPOConfig, PPORollout, GroupRollout, GroupConfig, OnlineDPOConfig, RSFTConfig)
#: declare theirs in ``RANGES`` beside their fields.
RANGES: dict[str, tuple[Any, str]] = {
    "max_length": (at_least(2), "an integer >= 2"),
    "reference_batch_size": COUNT,
    "truncation": (one_of("error", "left", "right"), "one of error, left, right"),
    "dtype": (optional(one_of(*DTYPES)), f"null or one of {', '.join(DTYPES)}"),
    "loss.beta": POSITIVE,
    "loss.tau": POSITIVE,
    "loss.lam": NON_NEGATIVE,
    "loss.gamma": NON_NEGATIVE,
    "loss.alpha": FINITE,
    "loss.label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "loss.desirable_weight": POSITIVE,
    "loss.undesirable_weight": POSITIVE,
    "loss.reduction": (one_of("token", "sequence"), "one of token, sequence"),
}


def check_range(key: str, value: Any, at: str) -> None:
    """Raise a :class:`RecipeError` at ``at`` when ``value`` is outside ``RANGES[key]``."""
    rule = RANGES.get(key)
    if rule is not None and not rule[0](value):
        raise RecipeError(f"{at}: must be {rule[1]}, got {value!r}")


def check_keys(values: Mapping[str, Any], known: Sequence[str], prefix: str, source: str,
               lines: Mapping[str, int], what: str) -> None:
    """An unknown key (a typo such as ``betta``) is an error naming it and the known keys."""
    unknown = [k for k in values if k not in known]
    if unknown:
        raise RecipeError(
            f"{where(source, lines, prefix + unknown[0])}: unknown key {unknown[0]!r} for "
            f"{what}; known keys: {', '.join(sorted(known))}")


def section(raw: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    """The mapping under top-level key ``name`` (empty when absent or null)."""
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{source}: {name}: expected a mapping of keys, got {value!r}")
    return dict(value)


def dataclass_section(cls: type, values: Mapping[str, Any], prefix: str, source: str,
                      lines: Mapping[str, int]) -> Any:
    """Build dataclass ``cls`` from ``values``: unknown keys, wrong types and values out of
    range (``cls.RANGES``, checked by its ``__post_init__``) are named with file and line."""
    hints = typing.get_type_hints(cls)
    check_keys(values, [f.name for f in fields(cls)], prefix, source, lines, cls.__name__)
    kwargs = {}
    for k, v in values.items():
        at = where(source, lines, f"{prefix}{k}")
        kwargs[k] = typed(v, hints[k], at)
        check_range(f"{prefix}{k}", kwargs[k], at)
    try:
        return cls(**kwargs)
    except FieldRangeError as error:  # the range declared beside the field (cls.RANGES)
        raise RecipeError(f"{where(source, lines, prefix + error.key)}: must be {error.must}, "
                          f"got {error.value!r}") from None
