"""The round-based methods (:mod:`rlcourse.online`): online (iterative) DPO and rejection-
sampling fine-tuning. Each round samples answers to ``prompts`` from the current policy, scores
them with the reward, and trains on them; the run is checkpointed and resumed at round
boundaries and, with ``checkpoint_every``, inside a round. Under several processes each samples
(and scores) its share of a round's answers, every process gets them all, and the round trains
on the engine with the global ``batch_size`` split over the processes."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from accelerate import PartialState

from rlcourse import online
from rlcourse.adapters import is_lora
from rlcourse.engine import RunLog
from rlcourse.files import atomic_directory_write, atomic_write_text
from rlcourse.models import load_model, save_model
from rlcourse.online import OnlineDPOConfig, RSFTConfig
from rlcourse.recipes.registry import Method, Section
from rlcourse.recipes.rewards import check_reward, reward_function
from rlcourse.recipes.rl_methods import read_prompts
from rlcourse.recipes.typed import RecipeError

__all__ = ["ROWS", "run_rounds"]


def run_rounds(recipe: Any, model: Any, tokenizer: Any, prompts: list[str], eval_rows: Any,
               progress: bool, save: bool = True):
    """Online DPO or RSFT, one checkpoint per finished round, resuming after the newest.

    ``OUTPUT/checkpoints/step-<k>`` (written atomically, the older ones removed after it) holds
    the policy after k rounds (``model``) and ``state.json`` (``rounds_done``, the rows so far).
    On a rerun the policy is loaded from it and the rounds after k run with the seeds and prompt
    draws they would have had (:func:`rlcourse.online.online_dpo`'s ``start_round``); the
    reference of ``online.reference: sft`` is the model of the recipe's ``model`` key. With
    ``<section>.checkpoint_every``, each round's training also checkpoints every that many steps
    into ``OUTPUT/checkpoints/round-<k>`` and a rerun resumes inside the round (the round's
    samples are drawn again from the saved weights with the round's seed: the same samples).
    """
    device = str(next(model.parameters()).device)
    fn = reward_function(recipe, tokenizer, device)
    name = _ROUNDS[recipe.method]
    config = copy.copy(recipe.sections[name])
    if config.device == "auto":
        config.device = device.split(":")[0]
    ckpt_dir = Path(recipe.output) / "checkpoints"
    found = sorted(ckpt_dir.glob("step-*")) if save else []
    done, rows, start_model = 0, [], None
    if found:
        latest = found[-1]
        state = json.loads((latest / "state.json").read_text(encoding="utf-8"))
        done, rows = int(state["rounds_done"]), list(state["history"])
        if getattr(config, "reference", None) == "sft":  # online DPO's reference: the start
            start_model = copy.deepcopy(model).eval()  # the starting model, as in a fresh run
        if is_lora(model):  # the checkpoint holds the adapters (base weights never change)
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(
                str(latest / "model" / "adapter_model.safetensors"), device=device))
        else:
            saved, _ = load_model(latest / "model", device=device, dtype=recipe.dtype,
                                  trust_remote_code=recipe.trust_remote_code)
            model.load_state_dict(saved.state_dict())
            del saved
        if progress:
            print(f"resuming {recipe.method} after round {done} of {config.rounds} "
                  f"({latest})", file=sys.stderr)

    # OUTPUT/history.jsonl grows a row per finished round (rewritten from the checkpoint's
    # rows on a resume), as the other methods' grows per logged step
    state = PartialState()  # several processes: the main one writes, the others wait
    runlog = RunLog.to_folder(recipe.output if save else None, rows, state,
                              report_to=config.report_to)

    def after_round(k: int, row: dict[str, Any], policy: Any) -> None:
        rows.append(row)
        runlog.flush(rows)
        if progress and state.is_main_process:
            shown = ", ".join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}"
                              for key, v in row.items() if key != "round")
            print(f"{recipe.method} round {k + 1}/{config.rounds}: {shown}", file=sys.stderr)
        if not save:
            return
        if not state.is_main_process:  # the main process writes the round's checkpoint
            state.wait_for_everyone()
            return
        step = f"step-{k + 1:08d}"

        def write(tmp: Path) -> None:
            save_model(policy, tokenizer, tmp / "model")
            atomic_write_text(tmp / "state.json", json.dumps(
                {"rounds_done": k + 1, "history": rows}, indent=1, default=str))

        atomic_directory_write(ckpt_dir / step, write)
        for old in ckpt_dir.glob("step-*"):  # the new one is in place: the older are not needed
            if old.name != step:
                shutil.rmtree(old, ignore_errors=True)
        state.wait_for_everyone()

    _TRAINERS[recipe.method](model, tokenizer, prompts, fn, config, recipe.seed, after_round,
                             done, start_model, ckpt_dir if save else None)
    runlog.close()
    return model, rows, {"n_prompts_in_file": len(prompts), "rounds_resumed_after": done}


def _online_dpo(model, tokenizer, prompts, fn, config, seed, callback, done, start_model,
                round_checkpoints):
    # A resumed run's reference for ``reference: sft`` is the starting model, as in a fresh run.
    reference = start_model if config.reference == "sft" else None
    online.online_dpo(model, tokenizer, prompts, online.reward_labeller(fn), config, seed=seed,
                      callback=callback, start_round=done, reference_model=reference,
                      round_checkpoints=round_checkpoints)


def _rsft(model, tokenizer, prompts, fn, config, seed, callback, done, start_model,
          round_checkpoints):
    online.rejection_sampling_ft(model, tokenizer, prompts, fn, config, seed=seed,
                                 callback=callback, start_round=done,
                                 round_checkpoints=round_checkpoints)


_TRAINERS = {"online_dpo": _online_dpo, "rsft": _rsft}
_ROUNDS = {"online_dpo": "online", "rsft": "rsft"}


def _checks(section: str):
    def check(recipe: Any, raw: Any) -> None:
        check_reward(recipe)
        for key in ("train", "max_length", "truncation"):
            if key in raw:
                raise RecipeError(
                    f"{recipe.where(key)}: a {recipe.method} recipe takes its settings from the "
                    f"'{section}' section (lengths: {section}.max_length, "
                    f"{section}.max_new_tokens; prompts longer than max_length are cut)")
    return check


def _device_auto(values: dict[str, Any], recipe: Any) -> None:
    values.setdefault("device", "auto")


def _row(name: str, section: str, cls: type, summary: str) -> Method:
    return Method(
        name, family="rounds", run=run_rounds, read=read_prompts, data_key="prompts",
        sections=(Section(section, cls, _device_auto,
                          not_identity=frozenset({"device", "checkpoint_every", "report_to"}),
                          note="In a recipe ``device`` defaults to ``auto``."),),
        keys=frozenset({"reward_model", "reward_fn"}), required=("prompts",),
        check_raw=_checks(section), length_key=f"{section}.max_length",
        device_section=section, split_key=f"{section}.batch_size", lora=True,
        summary=summary)


ROWS = (
    _row("online_dpo", "online", OnlineDPOConfig,
         "online DPO: pairs of the policy's own answers, labelled by the reward, each round"),
    _row("rsft", "rsft", RSFTConfig,
         "rejection-sampling fine-tuning: SFT on the best of n samples, each round"),
)
