"""The method registry: every method a recipe can name is ONE row, a :class:`Method`.

A row declares the method's sections (:class:`Section`: a name and the dataclass it is parsed
into), the top-level keys it takes beyond :data:`COMMON_KEYS`, whether it takes a reference
model, LoRA and held-out data, the loss function whose keyword arguments are its ``loss``
section, its checks, how it reads its data and its runner. Loading (:mod:`.load`), the launch
checks (:mod:`.checks`), the run (:mod:`.run`), the run identity (:mod:`.output`), the command
line and the generated key reference read the rows; nothing else in the package names a method.

The rows live beside their runners, one file per family: :mod:`.offline_methods` (sft,
reward_model, and one row per preference loss of :data:`rlcourse.losses.OBJECTIVES` that has a
trainer loss function in :data:`rlcourse.preference.LOSS_FNS`, built when asked, so a loss
registered there is a method with no edit here), :mod:`.rl_methods` (ppo, grpo, rloo) and
:mod:`.round_methods` (online_dpo, rsft).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlcourse.recipes.typed import RecipeError, where

__all__ = ["COMMON_KEYS", "Method", "Section", "method", "methods", "section_names"]

#: Top-level keys every method takes (``train``, ``max_length`` and ``truncation`` are refused
#: with a pointer to the right section by the methods that have none).
COMMON_KEYS = frozenset({"method", "model", "output", "max_length", "truncation", "dtype",
                         "trust_remote_code", "seed", "train"})


@dataclass(frozen=True)
class Section:
    """A section of a recipe: its key, the dataclass it is parsed into, and ``defaults``
    (``defaults(values, recipe)`` fills values that depend on the recipe, e.g. ``train``'s
    ``checkpoint_dir``, and may refuse one). ``not_identity``: its fields that do not change
    the trained model (a run may resume with other values). ``note``: what a recipe changes,
    for the generated reference."""

    name: str
    cls: type
    defaults: Callable[[dict[str, Any], Any], None] | None = None
    not_identity: frozenset[str] = frozenset()
    note: str = ""


@dataclass(frozen=True)
class Method:
    """One method a recipe can name (``method: NAME``).

    ``run(recipe, model, tokenizer, rows, eval_rows, progress, save)`` trains and returns
    ``(model, history rows, summary)``; ``read(recipe, path)`` reads its data file
    (``data_key``: ``data`` or ``prompts``). ``check_raw(recipe, raw)`` runs before the sections
    are parsed (keys it refuses, the reward), ``check(recipe)`` after. ``length_key``: the dotted
    key whose value must fit the model's positions; ``device_section``: the section whose
    ``device`` the launch reads; ``split_key``: a per-step count each process takes a share of.
    ``lora_backbone``: LoRA adapts the
    backbone of a model with a head, saved merged; ``saves_lm``: ``OUTPUT/model`` is a causal LM
    (loaded back when a finished run is rerun)."""

    name: str
    family: str
    sections: tuple[Section, ...]
    run: Callable[..., tuple[Any, list[dict[str, Any]], dict[str, Any]]]
    read: Callable[[Any, Any], list[Any]]
    data_key: str = "data"
    keys: frozenset[str] = frozenset()
    required: tuple[str, ...] = ()
    reference: bool = False
    lora: bool = False
    eval_data: bool = False
    loss_fn: Callable[..., Any] | None = None
    check_raw: Callable[[Any, Mapping[str, Any]], None] | None = None
    check: Callable[[Any], None] | None = None
    length_key: str = "max_length"
    device_section: str | None = None
    split_key: str | None = None
    lora_backbone: bool = False
    saves_lm: bool = True
    summary: str = field(default="", compare=False)

    def top_keys(self) -> frozenset[str]:
        """Every top-level key this method takes."""
        extra = {self.data_key, *self.keys, *(s.name for s in self.sections)}
        extra |= {"reference_model"} if self.reference else set()
        extra |= {"lora"} if self.lora else set()
        extra |= {"eval_data"} if self.eval_data else set()
        extra |= {"loss"} if self.loss_fn is not None else set()
        return COMMON_KEYS | extra

    def section(self, name: str) -> Section | None:
        """The section called ``name``, or None."""
        return next((s for s in self.sections if s.name == name), None)


def methods() -> dict[str, Method]:
    """Every registered method by name, in the order the documentation lists them. The
    preference rows are built from :data:`rlcourse.losses.OBJECTIVES` on each call."""
    from rlcourse.recipes import offline_methods, rl_methods, round_methods

    rows = (*offline_methods.ROWS, *rl_methods.ROWS, *round_methods.ROWS,
            *offline_methods.preference_rows())
    return {row.name: row for row in rows}


def method(name: Any, source: str = "<recipe>", lines: Mapping[str, int] | None = None
           ) -> Method:
    """The row of method ``name`` (case-insensitive); a :class:`RecipeError` at the recipe's
    ``method`` key naming the known methods otherwise."""
    rows = methods()
    row = rows.get(str(name or "").lower())
    if row is None:
        raise RecipeError(f"{where(source, lines or {}, 'method')}: method must be one of "
                          f"{', '.join(rows)}, got {name!r}")
    return row


def section_names() -> frozenset[str]:
    """The name of every section any method declares (``train``, ``ppo``, ``rollout``, ...)."""
    return frozenset(s.name for row in methods().values() for s in row.sections)
