"""The RL methods: PPO (:func:`rlcourse.ppo.train_ppo`) and the group methods GRPO and RLOO
(:func:`rlcourse.grpo.train_group_lm`). Each samples answers to ``prompts`` every step, scores
them with a reward and updates the policy; none has a ``train`` section."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

from rlcourse import grpo, ppo
from rlcourse.adapters import is_lora
from rlcourse.data import TEXT, DataError, read_jsonl
from rlcourse.engine import TrainConfig, lr_param_groups, make_accelerator
from rlcourse.grpo import GroupConfig
from rlcourse.models import ValueHeadModel, freeze_untied_lm_head, load_model
from rlcourse.ppo import PPOConfig
from rlcourse.recipes.registry import Method, Section
from rlcourse.recipes.rewards import check_reward, reward_function, text_reward_model_fn
from rlcourse.recipes.schema import GroupRollout, PPORollout
from rlcourse.recipes.typed import RecipeError

__all__ = ["ROWS", "read_prompt_rows", "read_prompts"]


def read_prompts(recipe: Any, path: Path) -> list[str]:
    """The ``prompt`` of every row of a JSONL file (at least one)."""
    prompts = [r["prompt"] for r in read_jsonl(path, {"prompt": TEXT})]
    if not prompts:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return prompts


def read_prompt_rows(recipe: Any, path: Path) -> list[Any]:
    """Every row of a JSONL file (at least one) with its ``prompt`` (or GSM8K's ``question``,
    read as the prompt) and its other columns, which the reward function receives as keyword
    arguments (TRL's convention: a verifier reads the row's ``answer``; see
    :func:`rlcourse.grpo.prompts_and_columns`)."""
    rows = read_jsonl(path, {"prompt": TEXT}, aliases={"question": "prompt"})
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return rows


def _no_train(sections: str, upper: bool = False):
    def check(recipe: Any, raw: Any) -> None:
        name = recipe.method.upper() if upper else recipe.method
        if "train" in raw:
            raise RecipeError(f"{recipe.where('train')}: a {name} recipe takes its settings "
                              f"from the {sections} sections")
        for key in ("max_length", "truncation"):  # accepted and ignored before
            if key in raw:
                raise RecipeError(
                    f"{recipe.where(key)}: a {name} recipe samples its answers and cuts no "
                    "training rows: the answer's length is rollout.max_new_tokens, and every "
                    "prompt plus it must fit the model's positions (checked when sampling)")
    return check


# ---- PPO --------------------------------------------------------------------------------------
def _run_ppo(recipe: Any, model: Any, tokenizer: Any, prompts: list[str], eval_rows: Any,
             progress: bool, save: bool):
    """PPO with the four models of the slides: actor, critic, reward model, reference."""
    device = str(next(model.parameters()).device)
    # Under LoRA the reference is the policy with its adapters switched off (no copy), and the
    # critic is a value head on the same adapted backbone (a copy would duplicate the base).
    reference = None if is_lora(model) else ppo.freeze(model)
    r = recipe.rollout
    if r.separate_critic:  # (refused with lora by _ppo_checks)
        critic = ValueHeadModel(copy.deepcopy(model), seed=recipe.seed)
        freeze_untied_lm_head(critic.model)  # the critic's logits are never used
        policy = ppo.ActorCritic(model, critic)
    else:
        policy = ValueHeadModel(model, seed=recipe.seed)
    accelerator = make_accelerator(TrainConfig(device=r.device))
    # The reward model reads the sampled TEXT with its own tokenizer (not the policy's ids).
    score = reward_function(recipe, None, device)
    sampler, reward_fn = text_reward_model_fn(score, ppo.lm_sampler(
        tokenizer, prompts, r.batch_size, r.max_new_tokens, temperature=recipe.ppo.temperature,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index))
    history = ppo.train_ppo(policy, reference, reward_fn, sampler,
                            recipe.ppo, r.steps, lr=r.lr, seed=recipe.seed, progress=progress,
                            checkpoint_dir=Path(recipe.output) / "checkpoints",
                            checkpoint_every=r.checkpoint_every,
                            keep_checkpoints=r.keep_checkpoints, accelerator=accelerator,
                            logging_dir=Path(recipe.output) if save else None,
                            eval_fn=_prompt_eval(recipe, tokenizer, score, eval_rows),
                            eval_every=r.eval_every, report_to=r.report_to,
                            warmup_steps=r.warmup_steps, lr_decay=r.lr_decay)
    return ppo.language_model(policy), history, {}


def _prompt_eval(recipe: Any, tokenizer: Any, score: Any, eval_rows: Any):
    """``policy -> {"eval/reward", "eval/response_length"}`` on the ``eval_data`` prompts, scored
    by the run's text scorer ``score`` (:func:`rlcourse.grpo.evaluate_prompts`, as GRPO's);
    None without ``eval_data``."""
    if not eval_rows:
        return None
    return partial(grpo.evaluate_prompts, tokenizer=tokenizer, prompts=eval_rows,
                   reward_fn=score,
                   max_new_tokens=recipe.rollout.max_new_tokens,
                   temperature=recipe.ppo.temperature, seed=recipe.seed)


def _eval_needs_data(recipe: Any, raw: Any) -> None:
    if (raw.get("rollout") or {}).get("eval_every") and not raw.get("eval_data"):
        raise RecipeError(f"{recipe.where('rollout.eval_every')}: evaluates the eval_data "
                          "prompts, and the recipe gives none (add eval_data: FILE)")


def _ppo_checks(recipe: Any, raw: Any) -> None:
    _no_train("'ppo' and 'rollout'", upper=True)(recipe, raw)
    _eval_needs_data(recipe, raw)
    if "lora" in raw and (raw.get("rollout") or {}).get("separate_critic", True):
        raise RecipeError(
            f"{recipe.where('rollout.separate_critic')}: with lora the critic is a value head on "
            "the adapted policy (a separate critic would copy the frozen base weights): set "
            "rollout.separate_critic: false")


# ---- GRPO and RLOO ----------------------------------------------------------------------------
def _run_group(recipe: Any, model: Any, tokenizer: Any, prompts: list[Any], eval_rows: Any,
               progress: bool, save: bool):
    """GRPO / RLOO: sample K answers per prompt, score them with the reward model or the
    function, group advantages, clipped updates (:func:`rlcourse.grpo.train_group_lm`)."""
    device = str(next(model.parameters()).device)
    try:  # a pattern that names no trainable parameter stops here, before any sampling
        lr_param_groups(model, recipe.rollout.lr, recipe.rollout.lr_multipliers)
    except ValueError as error:
        raise RecipeError(f"{recipe.where('rollout.lr_multipliers')}: "
                          f"{str(error).removeprefix('lr_multipliers: ')}") from None
    fn = reward_function(recipe, tokenizer, device)
    reference = None
    if recipe.group.kl_coef and not (is_lora(model) and not recipe.reference_model):
        # (under LoRA without a reference_model the reference is the policy with its
        # adapters switched off: ppo.reference_logprobs, no copy of the weights)
        if recipe.reference_model:
            reference, _ = load_model(recipe.reference_model, device=device, dtype=recipe.dtype,
                                      trust_remote_code=recipe.trust_remote_code)
            reference = ppo.freeze(reference)
        else:
            reference = ppo.freeze(model)
    r = recipe.rollout
    history = grpo.train_group_lm(
        model, tokenizer, prompts, fn, recipe.group, r.steps, lr=r.lr,
        max_new_tokens=r.max_new_tokens, ref_model=reference, seed=recipe.seed,
        checkpoint_dir=Path(recipe.output) / "checkpoints", checkpoint_every=r.checkpoint_every,
        keep_checkpoints=r.keep_checkpoints, device=r.device, mixed_precision=r.mixed_precision,
        weight_decay=r.weight_decay, warmup_steps=r.warmup_steps, lr_decay=r.lr_decay,
        lr_multipliers=r.lr_multipliers, progress=progress,
        logging_dir=Path(recipe.output) if save else None,
        eval_prompts=eval_rows, eval_every=r.eval_every, report_to=r.report_to)
    return model, history, {"n_prompts_in_file": len(prompts)}


def _group_checks(recipe: Any, raw: Any) -> None:
    check_reward(recipe)
    _no_train("'group' and 'rollout'")(recipe, raw)
    _eval_needs_data(recipe, raw)


def _advantage(allowed: tuple[str, ...]):
    """``group.advantage`` defaults to the method's name and must be one it allows."""
    def defaults(values: dict[str, Any], recipe: Any) -> None:
        advantage = values.setdefault("advantage", recipe.method)
        if advantage not in allowed:
            raise RecipeError(f"{recipe.where('group.advantage')}: a {recipe.method} recipe "
                              f"takes advantage {' or '.join(allowed)}, got {advantage!r}")
    return defaults


_ROLLOUT_NOT_IDENTITY = frozenset({"checkpoint_every", "keep_checkpoints", "device",
                                   "eval_every", "report_to"})


def _group_row(name: str, allowed: tuple[str, ...], summary: str) -> Method:
    return Method(
        name, family="rl", run=_run_group, read=read_prompt_rows, data_key="prompts",
        sections=(Section("group", GroupConfig, _advantage(allowed)),
                  Section("rollout", GroupRollout, not_identity=_ROLLOUT_NOT_IDENTITY)),
        keys=frozenset({"reward_model", "reward_fn"}), required=("prompts",), reference=True,
        lora=True, eval_data=True, check_raw=_group_checks, length_key="rollout.max_new_tokens",
        device_section="rollout",
        split_key="group.n_prompts", summary=summary)


ROWS = (
    Method("ppo", family="rl", run=_run_ppo, read=read_prompts, data_key="prompts",
           sections=(Section("ppo", PPOConfig),
                     Section("rollout", PPORollout, not_identity=_ROLLOUT_NOT_IDENTITY)),
           keys=frozenset({"reward_model"}), required=("prompts", "reward_model"),
           check_raw=_ppo_checks, lora=True, eval_data=True,
           length_key="rollout.max_new_tokens", device_section="rollout",
           split_key="rollout.batch_size",
           summary="PPO with a critic, a reward model and a KL-shaped reward"),
    _group_row("grpo", ("grpo", "dr_grpo"), "GRPO: group-normalised advantages, no critic"),
    _group_row("rloo", ("rloo",), "RLOO: leave-one-out baselines, no critic"),
)
