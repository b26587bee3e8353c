"""The offline methods, trained on the engine's one loop (:func:`rlcourse.engine.train`): SFT,
the Bradley–Terry reward model, and one row per preference loss.

The preference rows are built from :data:`rlcourse.losses.OBJECTIVES` when the registry is
read (:func:`preference_rows`): every objective with a trainer loss function in
:data:`rlcourse.preference.LOSS_FNS` is a method whose ``loss`` section is that function's
keyword arguments, with a reference model when ``needs_reference``, unpaired rows when its
``data_format`` is ``"unpaired"`` and a batch of at least two when it reads a batch
``reference_point`` (KTO's z0). Adding a loss there adds a method; nothing here changes.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from rlcourse.data import (
    load_preferences,
    load_sft,
    load_unpaired,
    pad_collate,
    tokenize_preferences,
    tokenize_sft,
)
from rlcourse.engine import TrainConfig, loss_eval_fn, sft_loss_fn, train
from rlcourse.losses import OBJECTIVES
from rlcourse.models import load_model
from rlcourse.preference import LOSS_FNS, prepare_items, train_preference
from rlcourse.recipes.registry import Method, Section
from rlcourse.recipes.typed import RecipeError
from rlcourse.reward_model import reward_loss_fn, train_reward_model

__all__ = ["ROWS", "preference_rows"]


def _train_defaults(values: dict[str, Any], recipe: Any) -> None:
    values.setdefault("seed", recipe.seed)
    values.setdefault("checkpoint_dir", str(Path(recipe.output) / "checkpoints"))
    values.setdefault("logging_dir", str(recipe.output))


#: The ``train`` section every engine method takes.
TRAIN = Section(
    "train", TrainConfig, _train_defaults,
    not_identity=frozenset({"progress", "log_every", "eval_every", "checkpoint_every",
                            "keep_checkpoints", "checkpoint_dir", "device", "logging_dir",
                            "report_to"}),
    note="In a recipe ``checkpoint_dir`` defaults to ``OUTPUT/checkpoints`` and "
         "``logging_dir`` to ``OUTPUT``.")


def _check_eval(recipe: Any) -> None:
    if recipe.train.eval_every and not recipe.eval_data:
        raise RecipeError(f"{recipe.where('train.eval_every')}: evaluates the eval_data set, "
                          "and the recipe gives none (add eval_data: FILE)")


def _check_batch_point(recipe: Any) -> None:
    """A loss reading a batch reference point (KTO's z0, a batch mean of mismatched pairs)
    needs two examples per process: with one, z0 is that example's own partner and the loss
    degenerates (TRL refuses it too)."""
    _check_eval(recipe)
    if recipe.train.batch_size < 2:
        raise RecipeError(f"{recipe.where('train.batch_size')}: {recipe.method.upper()} needs "
                          f"batch_size >= 2 per process (its KL reference point is a batch "
                          f"mean), got {recipe.train.batch_size}")


def _throughput(history: Any) -> dict[str, float]:
    """``tokens_per_second`` of the run: the engine's non-padding tokens over the wall time of
    its training steps (evaluation, checkpoints and logging excluded)."""
    t = history.totals
    return {"tokens_per_second": round(t["tokens"] / t["step_seconds"], 1)} \
        if t.get("step_seconds") else {}


# ---- SFT --------------------------------------------------------------------------------------
def _train_sft(recipe: Any, model: Any, tokenizer: Any, rows: list[Any],
               eval_rows: list[Any] | None, progress: bool, save: bool):
    """Supervised fine-tuning: :func:`rlcourse.engine.sft_loss_fn` on the shared loop."""
    items = tokenize_sft(tokenizer, rows, recipe.max_length, truncation=recipe.truncation)
    collate = partial(pad_collate, pad_id=tokenizer.pad_token_id or 0)
    loss_fn = partial(sft_loss_fn, **recipe.loss)
    eval_fn = None
    if eval_rows is not None:
        eval_items = tokenize_sft(tokenizer, eval_rows, recipe.max_length,
                                  truncation=recipe.truncation)
        eval_fn = loss_eval_fn(loss_fn, eval_items, recipe.train.batch_size, collate)
    history = train(model, loss_fn, items, recipe.train, eval_fn=eval_fn, collate_fn=collate)
    return model, history.to_rows(), {"n_examples": len(items), **_throughput(history)}


# ---- reward model -----------------------------------------------------------------------------
def _train_reward_model(recipe: Any, model: Any, tokenizer: Any, rows: list[Any],
                        eval_rows: list[Any] | None, progress: bool, save: bool):
    """A Bradley–Terry reward model (:func:`rlcourse.reward_model.train_reward_model`)."""
    eval_fn = None
    if eval_rows is not None:
        eval_items = tokenize_preferences(tokenizer, eval_rows, recipe.max_length,
                                          truncation=recipe.truncation)
        eval_fn = loss_eval_fn(reward_loss_fn, eval_items, recipe.train.batch_size)
    rm, history = train_reward_model(model, tokenizer, rows, recipe.train,
                                     max_length=recipe.max_length, seed=recipe.seed,
                                     eval_fn=eval_fn, disable_dropout=recipe.disable_dropout,
                                     truncation=recipe.truncation)
    return rm, history.to_rows(), {"n_pairs": len(rows), **_throughput(history)}


# ---- the preference losses --------------------------------------------------------------------
def _train_preference(recipe: Any, model: Any, tokenizer: Any, rows: list[Any],
                      eval_rows: list[Any] | None = None, progress: bool = True,
                      save: bool = True):
    """Any preference loss of the objectives table: tokenise, reference log-probs once, the
    shared loop (:func:`rlcourse.preference.train_preference`)."""
    items = prepare_items(recipe.method, rows, tokenizer, max_length=recipe.max_length,
                          seed=recipe.seed, truncation=recipe.truncation)
    eval_items = None if eval_rows is None else prepare_items(
        recipe.method, eval_rows, tokenizer, max_length=recipe.max_length, seed=recipe.seed,
        truncation=recipe.truncation)
    reference = None
    if recipe.reference_model:
        reference, _ = load_model(recipe.reference_model, device=str(model.device),
                                  dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code)
    run = train_preference(recipe.method, model, items, recipe.train, tokenizer=tokenizer,
                           reference_model=reference, max_length=recipe.max_length,
                           seed=recipe.seed, reference_batch_size=recipe.reference_batch_size,
                           disable_dropout=recipe.disable_dropout, eval_data=eval_items,
                           **recipe.loss)
    return model, run.history.to_rows(), {**run.summary(), "n_examples": len(items)}


def _read_pairs(recipe: Any, path: Path) -> list[Any]:
    return load_preferences(path)


def _read_unpaired(recipe: Any, path: Path) -> list[Any]:
    """Unpaired rows (prompt, completion, label), or pairs, which the trainer splits."""
    with open(path, encoding="utf-8") as fh:
        line = next((line for line in fh if line.strip()), "{}")
    try:
        first = json.loads(line)
    except json.JSONDecodeError:
        first = {"label": None}  # load_unpaired names the line and the problem
    paired = isinstance(first, dict) and "label" not in first
    return load_preferences(path) if paired else load_unpaired(path)


_ENGINE = dict(family="offline", sections=(TRAIN,), lora=True, eval_data=True,
               device_section="train", check=_check_eval)

ROWS = (
    Method("sft", run=_train_sft, read=lambda recipe, path: load_sft(path), loss_fn=sft_loss_fn,
           required=("data",), summary="supervised fine-tuning on prompt/completion rows",
           **_ENGINE),
    Method("reward_model", run=_train_reward_model, read=_read_pairs,
           keys=frozenset({"disable_dropout"}), required=("data",), lora_backbone=True,
           saves_lm=False, summary="a Bradley–Terry reward model on preference pairs",
           **_ENGINE),
)


def preference_rows() -> tuple[Method, ...]:
    """One row per objective of :data:`rlcourse.losses.OBJECTIVES` that has a trainer loss
    function (:data:`rlcourse.preference.LOSS_FNS`), read now."""
    rows = []
    for name, objective in OBJECTIVES.items():
        if name not in LOSS_FNS:  # bt: the reward model's loss, the reward_model row
            continue
        keys = {"disable_dropout"} | ({"reference_batch_size"} if objective.needs_reference
                                      else set())
        point = "reference_point" in objective.extra_inputs
        rows.append(Method(
            name, run=_train_preference, loss_fn=LOSS_FNS[name], keys=frozenset(keys),
            read=_read_unpaired if objective.data_format == "unpaired" else _read_pairs,
            reference=objective.needs_reference, required=("data",),
            summary=f"{objective.name} ({objective.paper})",
            **{**_ENGINE, "check": _check_batch_point if point else _check_eval}))
    return tuple(rows)
