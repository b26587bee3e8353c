"""The reward of the sampling methods (GRPO, RLOO, online DPO, RSFT): a reward model directory
or a Python function ``module:function`` (:func:`load_reward_fn`), checked when the recipe is
read (:func:`check_reward`) and built for the run (:func:`reward_function`)."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

from rlcourse import online
from rlcourse.data import prompt_text
from rlcourse.files import file_sha256
from rlcourse.models import RewardModel, load_tokenizer
from rlcourse.recipes.typed import RecipeError

__all__ = ["check_reward", "load_reward_fn", "load_reward_model", "reward_fn_source",
           "reward_function", "text_reward_model_fn"]


def load_reward_fn(spec: Any, where: str = "reward_fn") -> Any:
    """The function a recipe's ``reward_fn: module:function`` names, imported.

    ``module`` is a dotted module name (importable from the working directory or the Python
    path) or a path to a ``.py`` file. The function is called as ``fn(prompts, completions)``
    with two lists of strings and returns one float per completion. Any problem is a
    :class:`RecipeError` that starts with ``where`` (the file, line and key).
    """
    import importlib
    import importlib.util

    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RecipeError(f"{where}: expected 'module:function' (e.g. my_verifiers:exact_match "
                          f"or path/to/verifiers.py:exact_match), got {spec!r}")
    module_name, fn_name = (part.strip() for part in spec.split(":"))
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RecipeError(f"{where}: {path}: no such file")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does: the working directory
            module = importlib.import_module(module_name)
    except RecipeError:
        raise
    except ModuleNotFoundError as err:
        raise RecipeError(f"{where}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 -- any error while importing the user's module
        raise RecipeError(f"{where}: importing {module_name!r} failed: "
                          f"{type(err).__name__}: {err}") from None
    if not hasattr(module, fn_name):
        raise RecipeError(f"{where}: module {module_name!r} has no function {fn_name!r}")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RecipeError(f"{where}: {module_name}:{fn_name} is not callable")
    return fn


def check_reward(recipe: Any) -> None:
    """Exactly one of ``reward_model`` and ``reward_fn``; the function is imported now."""
    if bool(recipe.reward_model) == bool(recipe.reward_fn):
        key = "reward_fn" if recipe.reward_fn else "reward_model"
        raise RecipeError(f"{recipe.where(key)}: give exactly one of reward_model (a reward "
                          "model directory) and reward_fn (a Python function 'module:function')")
    if recipe.reward_fn:
        load_reward_fn(recipe.reward_fn, recipe.where("reward_fn"))


def load_reward_model(recipe: Any, device: str) -> tuple[Any, Any]:
    """``(reward model, its own tokenizer)`` from the recipe's ``reward_model`` folder: a reward
    model reads text with the tokenizer it was trained with, which need not be the policy's
    (another vocabulary, another family)."""
    rm = RewardModel.from_pretrained(recipe.reward_model, device=device, dtype=recipe.dtype,
                                     trust_remote_code=recipe.trust_remote_code)
    return rm, load_tokenizer(recipe.reward_model, trust_remote_code=recipe.trust_remote_code)


def reward_function(recipe: Any, tokenizer: Any, device: str) -> Any:
    """``fn(prompts, completions) -> floats``: the recipe's ``reward_fn``, or its reward model
    scoring each prompt and completion TEXT as in its training, tokenised with the reward
    model's own tokenizer (:func:`load_reward_model`,
    :func:`rlcourse.online.reward_model_scorer`); ``tokenizer`` (the policy's) is not used."""
    if recipe.reward_fn:
        return load_reward_fn(recipe.reward_fn, recipe.where("reward_fn"))
    rm, rm_tokenizer = load_reward_model(recipe, device)
    return online.reward_model_scorer(rm, rm_tokenizer)  # through the module: tests patch it


def text_reward_model_fn(score: Any, sample_fn: Any) -> tuple[Any, Any]:
    """PPO's ``(sample_fn, reward_fn)`` with a text scorer ``score(prompts, completions)`` (the
    recipe's reward model reading text: :func:`reward_function`).

    PPO calls ``reward_fn(input_ids, attention_mask, action_mask)`` on the batch
    ``sample_fn`` has just drawn, in the POLICY's token ids. The returned ``sample_fn``
    remembers that batch's prompts and decoded completions (``prompts``, ``texts``, which
    :func:`rlcourse.ppo.lm_sampler` returns with the ids), and ``reward_fn`` scores those texts
    with the reward model's own tokenizer (:func:`reward_function`), never the policy's ids.
    """
    import torch

    latest: dict[str, Any] = {}

    def sample(policy: Any, generator: Any) -> dict[str, Any]:
        batch = sample_fn(policy, generator)
        latest.clear()
        latest.update(batch)
        return batch

    def reward_fn(input_ids: Any, attention_mask: Any, action_mask: Any = None) -> Any:
        drawn = latest.get("input_ids")
        if drawn is None or not (input_ids is drawn or (input_ids.shape == drawn.shape and bool(
                torch.equal(input_ids.cpu(), drawn.cpu())))):
            raise RuntimeError("the reward model scores the texts of the batch just sampled, "
                               "and these ids are not that batch")
        prompts = [prompt_text(p) for p in latest["prompts"]]
        return torch.as_tensor(score(prompts, list(latest["texts"])), dtype=torch.float32,
                               device=input_ids.device)

    return sample, reward_fn


def reward_fn_source(recipe: Any) -> str | None:
    """SHA-256 of the file that defines the recipe's ``reward_fn`` (its code, not its name)."""
    if not recipe.reward_fn:
        return None
    fn = load_reward_fn(recipe.reward_fn, recipe.where("reward_fn"))
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:  # a builtin or C function: nothing to read
        return None
    return file_sha256(source) if source and Path(source).is_file() else None
