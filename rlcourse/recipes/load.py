"""Reading a recipe: a YAML file (or text) plus dotted command-line overrides -> a validated
:class:`Recipe`, every key checked against what the method's registry row and its trainer
accept (:func:`load_recipe`)."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlcourse.adapters import LoraSettings
from rlcourse.models import local_model_dir
from rlcourse.models.io import _HUB_ID
from rlcourse.recipes import registry
from rlcourse.recipes.schema import Recipe
from rlcourse.recipes.typed import (
    RecipeError,
    check_keys,
    check_range,
    dataclass_section,
    number_or,
    section,
    typed,
    where,
)

__all__ = ["load_recipe", "loss_signature", "parse_overrides"]


def _key_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of every mapping key, by dotted path (``"train.lr"``)."""
    import yaml

    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                lines[name] = key.start_mark.line + 1
                walk(value, f"{name}.")

    walk(root, "")
    return lines


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "loss.beta=0.5"]`` -> ``{"train.lr": 1e-4, "loss.beta": 0.5}``.

    Values are read as YAML (``true``, ``null``, numbers, ``[0.9, 0.95]``); numbers written
    ``1e-4`` become floats although YAML 1.1 would keep them as strings, and ``no``/``yes``/
    ``on``/``off`` stay strings (only ``true``/``false`` are booleans).
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"command line: override {item!r} is not of the form key=value")
        value = yaml.safe_load(text) if text.strip() else None
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            value = text.strip()  # YAML 1.1 reads no/yes/on/off as booleans: mixed_precision=no
        out[key.strip()] = number_or(value)
    return out


def loss_signature(row: registry.Method) -> dict[str, inspect.Parameter]:
    """Keyword parameters (with defaults and types) of the loss function a method trains with:
    the keys of its ``loss`` section."""
    if row.loss_fn is None:
        return {}
    # num_tokens is the engine's to pass (the global batch's token count), not a recipe key.
    return {k: p for k, p in inspect.signature(row.loss_fn, eval_str=True).parameters.items()
            if k not in ("model", "batch", "num_tokens")}


def _lora_section(raw: Mapping[str, Any], source: str, lines: Mapping[str, int]) -> Any:
    """The ``lora:`` section as :class:`rlcourse.adapters.LoraSettings` (``None`` if absent)."""
    if raw.get("lora") is None:
        return None
    values = section(raw, "lora", source)
    check_keys(values, LoraSettings.field_names(), "lora.", source, lines, "the lora section")
    for key, value in values.items():
        try:  # validate one key at a time, so that the error names it
            LoraSettings(**{key: number_or(value)})
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{where(source, lines, f'lora.{key}')}: {err}") from None
        values[key] = number_or(value)
    return LoraSettings(**values)


def load_recipe(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                text: str | None = None) -> Recipe:
    """Read and validate a recipe: YAML file ``path`` (or ``text``), then dotted ``overrides``.

    Every key is checked against what the method's registry row and trainer accept: an unknown
    key (a typo such as ``betta``) is a :class:`RecipeError` naming the file, the line and the
    known keys, never silently ignored. Numbers written as ``5e-7`` (a string to YAML 1.1) are
    read as floats. A ``model``, ``reward_model`` or ``reference_model`` shaped like a Hugging
    Face Hub id (``org/name``) that is no local folder is refused here, offline
    (:func:`rlcourse.models.local_model_dir`).
    """
    import yaml

    source = str(path) if path is not None else "<recipe>"
    if text is None:
        if path is None:
            raise RecipeError("load_recipe needs a path or a text")
        text = Path(path).read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    lines = _key_lines(text)
    for key, value in (overrides or {}).items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"command line: {key}: {p} is not a section")
        node[last] = value
        lines = {**lines, key: 0}

    row = registry.method(raw.get("method", ""), source, lines)
    known = row.top_keys()
    if "lora" in raw and not row.lora:
        takes = ", ".join(r.name for r in registry.methods().values() if r.lora)
        raise RecipeError(
            f"{where(source, lines, 'lora')}: {row.name} does not train adapters; a lora "
            f"section is taken by: {takes}")
    check_keys(raw, sorted(known), "", source, lines, f"a {row.name} recipe")
    for key in ("model", "output", *row.required):
        if not raw.get(key):
            raise RecipeError(f"{source}: {key}: missing (give it in the file or on the "
                              f"command line, e.g. --{key.replace('_', '-')} PATH)")
    for key in ("model", "reward_model", "reference_model"):
        value = raw.get(key)
        if isinstance(value, str) and _HUB_ID.match(value) and not Path(value).exists():
            try:  # refused now, offline: from_pretrained would try the Hub for a minute
                local_model_dir(value, key)
            except FileNotFoundError as err:
                raise RecipeError(f"{where(source, lines, key)}: {err}") from None
    hints = typing.get_type_hints(Recipe)
    top: dict[str, Any] = {}
    for key in sorted(known - {"method", "loss", "lora", "train"} - registry.section_names()):
        if key in raw:
            at = where(source, lines, key)
            top[key] = typed(raw[key], hints[key], at)
            check_range(key, top[key], at)
    recipe = Recipe(method=row.name, source=source, lines=lines, **top)
    if row.check_raw is not None:
        row.check_raw(recipe, raw)
    for sec in row.sections:
        values = section(raw, sec.name, source)
        if sec.defaults is not None:
            sec.defaults(values, recipe)
        recipe.sections[sec.name] = dataclass_section(sec.cls, values, f"{sec.name}.", source,
                                                      lines)
    if row.lora:
        recipe.lora = _lora_section(raw, source, lines)
    if row.loss_fn is not None:
        params = loss_signature(row)
        loss = section(raw, "loss", source)
        check_keys(loss, list(params), "loss.", source, lines, f"the {row.name} loss function")
        for k, v in loss.items():
            at = where(source, lines, f"loss.{k}")
            recipe.loss[k] = typed(v, params[k].annotation, at)
            check_range(f"loss.{k}", recipe.loss[k], at)
    if row.check is not None:
        row.check(recipe)
    return recipe
