"""Training recipes (layer 3): one YAML file per method -> the trainer, from one command.

::

    python -m rlcourse.recipes recipes/dpo.yaml --model path/to/sft --data pairs.jsonl \\
        --output runs/dpo train.lr=5e-7 loss.beta=0.1
    accelerate launch --num_processes 4 -m rlcourse.recipes recipes/dpo.yaml ...

Every section key with its type, default and meaning: ``recipes/REFERENCE.md``, generated from
the config dataclasses' field docs by :func:`recipe_reference`
(``python -m rlcourse.recipes --write-reference``).

A recipe is thin wiring, not a trainer: it reads the YAML (:func:`load_recipe`), loads any local
causal LM with :func:`rlcourse.models.load_model`, reads the JSONL data with
:mod:`rlcourse.data`, and calls the functions the book teaches: :func:`rlcourse.engine.train`
with :func:`rlcourse.engine.sft_loss_fn` (SFT), :func:`rlcourse.preference.train_preference`
(DPO, IPO, R-DPO, KTO, ORPO, SimPO), :func:`rlcourse.reward_model.train_reward_model`,
:func:`rlcourse.ppo.train_ppo` and :func:`rlcourse.grpo.train_group_lm` (GRPO, RLOO). The
trained model is saved atomically to ``OUTPUT/model``.

A recipe file has these keys (``train`` holds :class:`rlcourse.engine.TrainConfig` fields,
``loss`` the keyword arguments of the method's loss function, e.g. ``beta`` of
:func:`rlcourse.preference.dpo_loss_fn`)::

    method: dpo                 # sft | reward_model | ppo | grpo | rloo | online_dpo | rsft
                                # | dpo | ipo | rdpo | kto | orpo | simpo
    model: path/to/model        # a local directory holding a causal LM and its tokenizer
    data: path/to/data.jsonl    # plain text or TRL's conversational form (rlcourse.data)
    eval_data: null             # held-out rows: loss and metrics every train.eval_every steps
    output: runs/dpo
    max_length: 512             # prompt + completion tokens
    truncation: error           # error | left | right
    dtype: null                 # weights at load: null (fp32 + mixed_precision), bf16, auto
    trust_remote_code: false    # a YAML boolean: "false" (quoted) is an error, not true
    reference_model: null       # a separate reference; default: a frozen copy of `model`
    reference_batch_size: 64    # sequences per forward of the reference-log-prob pass
    disable_dropout: true       # preference methods and reward_model: train with dropout off
    loss: {beta: 0.1}
    train: {lr: 5.0e-7, batch_size: 8, grad_accum_steps: 4, mixed_precision: auto,
            gradient_checkpointing: false, ...}
    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear, merge: false}

``lora`` (any method but PPO; :mod:`rlcourse.adapters`): train low-rank adapters of the frozen
model; the reference of DPO/IPO/R-DPO/KTO is then the model with its adapters disabled (no
second copy). ``OUTPUT/model`` holds the adapter and the tokenizer; ``merge: true`` also writes
``OUTPUT/merged``, a full model for ``AutoModelForCausalLM.from_pretrained``.

Every value is checked against the type its trainer declares (booleans are YAML ``true``/
``false``, integers are integers, ``dtype`` is one of null, auto, fp32, bf16, fp16) and against
its range (``lr``, ``beta``, ``tau`` > 0, ``label_smoothing`` in [0, 0.5), KTO's
``batch_size`` >= 2, ...): a bad one is a :class:`RecipeError` naming the file, the line and the
key. ``max_length`` must fit the model's position embeddings. Data errors (an empty file, a
malformed row, an over-long example) reach the command line as one line ``file:line: what``
with exit code 2; a run whose loss or weights turn NaN/inf stops with exit code 1, saving
nothing from that point (the last good checkpoint stays).

Watching a run: ``OUTPUT/history.jsonl`` gets one row per log step as training goes (flushed,
rewritten from the checkpoint when a run resumes, so no step appears twice); with ``eval_data``
the rows of every ``train.eval_every``-th step and of the last step also hold ``eval_loss`` and
the method's metrics on it (``eval_rewards/accuracies``, ...); ``train.report_to: tensorboard``
writes them to ``OUTPUT/tensorboard`` too (``train.logging_dir`` defaults to OUTPUT).
``tokens_per_s`` (rows) and ``tokens_per_second`` (``recipe.json``'s summary) count non-padding
tokens over the wall time of the training steps only (see the book's glossary).

PPO reads ``prompts`` (JSONL of ``{"prompt"}``) instead of ``data``, a trained
``reward_model`` directory, a ``ppo`` section (:class:`rlcourse.ppo.PPOConfig` fields) and a
``rollout`` section (:class:`PPORollout`); it resumes from ``OUTPUT/checkpoints`` like the
other recipes, and on N processes each answers ``rollout.batch_size / N`` prompts per step
(advantages whitened and losses averaged over every process's tokens).

GRPO and RLOO (``method: grpo`` / ``rloo``; :func:`rlcourse.grpo.train_group_lm`) read
``prompts`` too, and no ``train`` section::

    reward_model: runs/rm/model # the reward: a reward model directory, OR
    reward_fn: my_verifiers:exact_match   # a function 'module:function' or 'file.py:function',
                                # fn(prompts: list[str], completions: list[str]) -> floats
    reference_model: null       # used when group.kl_coef > 0; default: a frozen copy of model
    group: {advantage: grpo, loss_type: grpo, group_size: 8, n_prompts: 16, kl_coef: 0.04,
            clip_eps: 0.2, epochs: 1, minibatch_size: null, max_grad_norm: 1.0,
            temperature: 1.0}   # rlcourse.grpo.GroupConfig
    rollout: {steps: 200, max_new_tokens: 128, lr: 1.0e-6, weight_decay: 0.0, device: auto,
              mixed_precision: "no", checkpoint_every: 10, keep_checkpoints: 2}  # GroupRollout

``group.advantage``: ``grpo`` ((r - mean) / std) or ``dr_grpo`` (r - mean) for GRPO, ``rloo``
(r - mean of the other K-1) for RLOO. ``group.loss_type``: ``grpo`` (mean over each answer's
tokens, then over answers), ``dapo`` (mean over all tokens of the batch, counted over every
process) or ``dr_grpo`` (sum over tokens / (answers x max_new_tokens)). ``reward_fn`` is
imported when the recipe is read: a string that is not ``module:function``, a module that
cannot be imported, a missing or non-callable name are errors naming file, line and key.
Each of N processes answers ``n_prompts / N`` prompts of every step (the same samples one
process would draw), and checkpoints go to ``OUTPUT/checkpoints``.

Online (iterative) DPO and rejection-sampling fine-tuning (``method: online_dpo`` / ``rsft``;
:func:`rlcourse.online.online_dpo`, :func:`rlcourse.online.rejection_sampling_ft`) read
``prompts`` and the reward as GRPO does (``reward_model`` or ``reward_fn``), in rounds::

    online: {rounds: 8, prompts_per_round: null, pairs_per_prompt: 1, beta: 0.5, lr: 5.0e-4,
             epochs: 1.0, batch_size: 32, reference: sft, max_new_tokens: 48,
             max_length: 128, loss: dpo, device: auto}   # rlcourse.online.OnlineDPOConfig
    rsft: {rounds: 2, n: 8, samples_per_prompt: 1, lr: 5.0e-4, epochs: 1.0, batch_size: 32,
           max_new_tokens: 48, max_length: 128, device: auto}   # rlcourse.online.RSFTConfig

Online DPO: each round samples two answers per prompt from the current policy; the answer
with the higher reward is ``chosen`` (equal rewards: the pair is dropped;
:func:`rlcourse.online.reward_labeller`), then DPO epochs on the new pairs against the
starting model (``reference: sft``) or the round's starting policy (``previous``). RSFT:
each round keeps, per prompt, the answer of highest reward among ``n`` samples
(:func:`rlcourse.online.best_of_n`) and fine-tunes on those winners. Neither takes ``train``,
``max_length`` or ``truncation`` at the top (``online.max_length`` / ``rsft.max_length``), and
both run in one process (several are refused). After every round the policy, the round index
and the rows so far go atomically to ``OUTPUT/checkpoints/step-<rounds done>``; rerunning the
same command continues after the last finished round and gives the weights of an
uninterrupted run (a round cut short is redone).

Resuming: ``train.checkpoint_dir`` defaults to ``OUTPUT/checkpoints``; run the same command
again after a crash and training continues from the newest checkpoint, exactly where it stopped
(the engine restores optimiser, scheduler, RNG states and the position in the epoch; GRPO and
RLOO restore policy, optimizer, RNG states and step, and draw each step's samples from the
seed and the step alone).
``OUTPUT/run.json`` records the run's identity (every key that changes the trained model, the
SHA-256 of the data and of the file defining ``reward_fn``, a fingerprint of each model folder):
a rerun with another method, data or hyperparameter into the same
OUTPUT is an error naming the keys that differ, a rerun of a finished run says so and trains
nothing, and ``--overwrite`` starts afresh (removing only the files a run writes).

Several GPUs: every process runs this same module; :func:`rlcourse.engine.train` lets
``accelerate`` shard the batches (the global batch is ``batch_size * grad_accum_steps *
num_processes``), each process puts its model on its own device, and only the main process
writes files. Each process computes the reference log-probs once, of the examples training
reads (all of them for a full epoch; :func:`rlcourse.engine.planned_indices`).
Launched by ``torchrun`` on a machine without GPUs, the processes train together on the CPU
(gloo), as with ``train.device=cpu``; ``accelerate launch --cpu --num_processes N`` (which
starts one process) is refused with the command that works. Several processes give what one
process with the global batch gives (tested with 2 CPU processes: SFT's token mean, the reward
model, DPO, GRPO); logged metrics are averaged over processes. FSDP or DeepSpeed asked for by an
``accelerate`` config is refused (:func:`_refuse_sharding` says why): on CPU accelerate runs DDP
instead, and the saving is not shard-aware; on GPUs use DDP with ``lora`` and
``train.gradient_checkpointing``. KTO's reference point z0 is a mean over the whole global
batch (gathered from every process, as TRL does).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from rlcourse import grpo, online, ppo
from rlcourse.adapters import LoraSettings, apply_lora, is_lora, merge_lora
from rlcourse.config import FieldRangeError
from rlcourse.data import (
    TEXT,
    DataError,
    load_preferences,
    load_sft,
    load_unpaired,
    pad_collate,
    read_jsonl,
    tokenize_preferences,
    tokenize_sft,
)
from rlcourse.engine import (
    NonFiniteError,
    TrainConfig,
    loss_eval_fn,
    make_accelerator,
    sft_loss_fn,
    train,
)
from rlcourse.files import (
    atomic_directory_write,
    atomic_write_text,
    directory_fingerprint,
    file_sha256,
)
from rlcourse.grpo import GroupConfig
from rlcourse.models import (
    RewardModel,
    ValueHeadModel,
    freeze_untied_lm_head,
    load_model,
    save_model,
)
from rlcourse.online import OnlineDPOConfig, RSFTConfig
from rlcourse.ppo import PPOConfig
from rlcourse.preference import LOSS_FNS, prepare_items, train_preference
from rlcourse.reward_model import reward_loss_fn, train_reward_model

__all__ = [
    "METHODS",
    "GroupRollout",
    "PPORollout",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "load_reward_fn",
    "main",
    "parse_overrides",
    "run_recipe",
]

#: Every method a recipe can name.
METHODS = ("sft", "reward_model", "ppo", "grpo", "rloo", "online_dpo", "rsft", "dpo", "ipo",
           "rdpo", "kto", "orpo", "simpo")
PREFERENCE_METHODS = ("dpo", "ipo", "rdpo", "kto", "orpo", "simpo")
#: Methods that sample from the policy: they read ``prompts`` and have a ``rollout`` section.
ONLINE_METHODS = ("ppo", "grpo", "rloo")
GROUP_METHODS = ("grpo", "rloo")
#: Methods that learn in rounds from their own samples, scored by a reward (rlcourse.online):
#: they read ``prompts`` too, and have an ``online`` / ``rsft`` section.
ROUND_METHODS = ("online_dpo", "rsft")
#: Methods whose data file is ``prompts`` (JSONL of ``{"prompt"}``).
PROMPT_METHODS = ONLINE_METHODS + ROUND_METHODS

#: Top-level keys: common to every method, then those of one method only.
_COMMON_KEYS = {"method", "model", "output", "max_length", "truncation", "dtype",
                "trust_remote_code", "seed", "train"}
_METHOD_KEYS = {
    "sft": {"data", "loss"},
    "reward_model": {"data"},
    "ppo": {"prompts", "reward_model", "ppo", "rollout"},
    **{m: {"prompts", "reward_model", "reward_fn", "reference_model", "group", "rollout"}
       for m in GROUP_METHODS},
    "online_dpo": {"prompts", "reward_model", "reward_fn", "online"},
    "rsft": {"prompts", "reward_model", "reward_fn", "rsft"},
    # Only the methods with a reference model (OBJECTIVES[m].needs_reference) accept one.
    **{m: {"data", "loss", "reference_model", "disable_dropout"}
       for m in ("dpo", "ipo", "rdpo", "kto")},
    **{m: {"data", "loss", "disable_dropout"} for m in ("orpo", "simpo")},
}
_METHOD_KEYS["reward_model"] |= {"disable_dropout"}
for _m in ("sft", "reward_model", *PREFERENCE_METHODS):  # a held-out set, evaluated as it trains
    _METHOD_KEYS[_m] = _METHOD_KEYS[_m] | {"eval_data"}


# Memory (rlcourse.adapters): LoRA for every method trained on the engine, and the batch of the
# reference-log-prob pass for the methods that have one.
for _m in ("sft", "reward_model", *PREFERENCE_METHODS):
    _METHOD_KEYS[_m] = _METHOD_KEYS[_m] | {"lora"}
for _m in ("dpo", "ipo", "rdpo", "kto"):
    _METHOD_KEYS[_m] = _METHOD_KEYS[_m] | {"reference_batch_size"}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the line and the key."""


@dataclass
class PPORollout:
    """The ``rollout`` section of a PPO recipe: how many steps, how much is sampled per step.

    ``steps`` PPO iterations of ``batch_size`` prompts, each answered with at most
    ``max_new_tokens`` tokens; Adam at learning rate ``lr``. ``separate_critic``: actor and
    critic as two networks (DeepSpeed-Chat, the slides' four models) instead of one backbone
    with a value head. Every ``checkpoint_every`` steps (0: only at the end) actor, critic,
    Adam, RNG states, KL coefficient and step go to ``OUTPUT/checkpoints`` (the newest
    ``keep_checkpoints`` kept); rerunning the same command resumes. ``device``: ``auto`` or
    ``cpu`` (several processes over gloo); each of N processes answers ``batch_size / N``
    prompts of every step.
    """

    steps: int = 100
    """PPO iterations (sample a batch, score it, update)."""
    batch_size: int = 16
    """Prompts per iteration, over all processes (each of N answers ``batch_size / N``)."""
    max_new_tokens: int = 64
    """Longest answer sampled, in tokens."""
    lr: float = 1e-6
    """Adam learning rate of actor and critic."""
    separate_critic: bool = True
    """Actor and critic as two networks (DeepSpeed-Chat) instead of one backbone with a value
    head."""
    checkpoint_every: int = 10
    """Iterations between checkpoints in ``OUTPUT/checkpoints``; 0: only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    device: str = "auto"
    """``"auto"`` or ``"cpu"`` (several processes over gloo)."""


@dataclass
class GroupRollout:
    """The ``rollout`` section of a GRPO or RLOO recipe (:func:`rlcourse.grpo.train_group_lm`).

    ``steps`` updates, each on ``group.n_prompts`` prompts x ``group.group_size`` answers of at
    most ``max_new_tokens`` tokens; AdamW at ``lr`` with ``weight_decay``. ``device``:
    ``auto`` (a GPU per process if there is one) or ``cpu`` (several processes talk over gloo);
    ``mixed_precision``: ``no``, ``bf16``, ``fp16`` or ``auto``. Every ``checkpoint_every`` steps
    (0: only at the end) the policy, optimizer, RNG states and step go to
    ``OUTPUT/checkpoints`` (the newest ``keep_checkpoints`` kept); rerunning the same command
    resumes.
    """

    steps: int = 100
    """Updates, each on ``group.n_prompts * group.group_size`` answers."""
    max_new_tokens: int = 64
    """Longest answer sampled, in tokens."""
    lr: float = 1e-6
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    device: str = "auto"
    """``"auto"`` (a GPU per process if there is one) or ``"cpu"`` (gloo)."""
    mixed_precision: str = "no"
    """``"no"``, ``"bf16"``, ``"fp16"`` or ``"auto"``."""
    checkpoint_every: int = 10
    """Steps between checkpoints in ``OUTPUT/checkpoints``; 0: only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""


@dataclass
class Recipe:
    """A validated recipe: where things are, and the trainer's configuration.

    ``train`` is an :class:`rlcourse.engine.TrainConfig` (for PPO: ``None``), ``loss`` the
    loss function's keyword arguments, ``ppo``/``rollout`` PPO's sections, ``source`` the file.
    """

    method: str
    """The method: sft, reward_model, ppo, grpo, rloo, online_dpo, rsft, dpo, ipo, rdpo, kto, orpo
    or simpo."""
    model: str
    """A local directory holding a causal LM and its tokenizer (the starting policy)."""
    output: str
    """Directory of the run: the trained model, checkpoints, history and ``recipe.json``."""
    data: str | None = None
    """JSONL training data, plain text or TRL's conversational form (:mod:`rlcourse.data`)."""
    eval_data: str | None = None
    """Held-out JSONL rows: loss and metrics every ``train.eval_every`` steps and at the end."""
    prompts: str | None = None
    """JSONL of ``{"prompt"}`` rows (PPO, GRPO, RLOO, online DPO, RSFT)."""
    reward_model: str | None = None
    """Directory of a trained reward model (PPO; GRPO, RLOO, online DPO, RSFT unless
    ``reward_fn``)."""
    reference_model: str | None = None
    """A separate reference model directory; default: a frozen copy of ``model``."""
    max_length: int = 512
    """Longest prompt + completion, in tokens; must fit the model's position embeddings."""
    truncation: str = "error"
    """What an over-long example does: ``error``, ``left`` or ``right`` (the side cut)."""
    dtype: str | None = None
    """Weights' dtype at load: ``null`` (fp32, with ``train.mixed_precision``), ``auto``, ``fp32``,
    ``bf16`` or ``fp16``."""
    trust_remote_code: bool = False
    """Run the model directory's own Python code when loading (a YAML boolean)."""
    seed: int = 0
    """Seed of the run: ``train.seed`` defaults to it; it also seeds the sampling and the
    initialisation of LoRA adapters and value heads."""
    loss: dict[str, Any] = field(default_factory=dict)
    """The section of the loss function's keyword arguments (e.g. ``beta``); defaults in
    ``rlcourse.losses.DEFAULTS``."""
    train: Any = None
    """The ``train`` section (:class:`rlcourse.engine.TrainConfig`)."""
    ppo: Any = None
    """The ``ppo`` section (:class:`rlcourse.ppo.PPOConfig`)."""
    rollout: PPORollout | GroupRollout | None = None
    """The ``rollout`` section (:class:`PPORollout` or :class:`GroupRollout`)."""
    group: Any = None
    """The ``group`` section (:class:`rlcourse.grpo.GroupConfig`)."""
    online: Any = None
    """The ``online`` section (:class:`rlcourse.online.OnlineDPOConfig`)."""
    rsft: Any = None
    """The ``rsft`` section (:class:`rlcourse.online.RSFTConfig`)."""
    reward_fn: str | None = None
    """``module:function`` called as ``fn(prompts, completions)`` -> one float per completion,
    instead of ``reward_model``."""
    disable_dropout: bool = True
    """Train with dropout off (preference methods and reward_model)."""
    lora: Any = None
    """The ``lora`` section (:class:`rlcourse.adapters.LoraSettings`); absent: full fine-tuning."""
    reference_batch_size: int = 64
    """Sequences per forward pass of the reference-log-prob pass (DPO, IPO, R-DPO, KTO)."""
    source: str = "<recipe>"
    """The recipe file (set by :func:`load_recipe`; not a key)."""
    lines: dict[str, int] = field(default_factory=dict, repr=False)
    """Line of each key in the file, for error messages (not a key)."""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``OUTPUT/recipe.json`` records)."""
        from dataclasses import asdict

        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lines"}
        for key in ("train", "ppo", "rollout", "group", "online", "rsft"):
            if out[key] is not None:
                out[key] = asdict(out[key])
        if out["lora"] is not None:
            out["lora"] = out["lora"].to_dict()
        return out

    def where(self, key: str) -> str:
        """``"file:line: key"`` for error messages about ``key`` (a dotted path)."""
        return _where(self.source, self.lines, key)


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------
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
        out[key.strip()] = _number_or(value)
    return out


def _number_or(value: Any) -> Any:
    """``"5e-7"`` -> ``5e-07``: PyYAML reads exponents without a dot as strings."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------------------------
# Typed values: every key has the type its dataclass field or loss argument declares
# --------------------------------------------------------------------------------------------
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "a mapping", type(None): "null"}


def _type_name(value: Any) -> str:
    return f"{value!r} ({_KINDS.get(type(value), type(value).__name__)})"


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (``bool``, ``int``, ``float``, ``str``,
    ``X | None``, ``tuple[float, float]``); numbers written as strings (``"5e-7"``, which YAML
    1.1 reads as a string) are converted. A boolean must be a YAML boolean: ``"false"`` (a
    string) is an error, not ``True``."""
    import types
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _typed(value, inner[0], where) if len(inner) == 1 else value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {_type_name(value)}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = _number_or(value.strip())
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise RecipeError(f"{where}: expected an integer, got {_type_name(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {_type_name(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            hint_ = " (YAML reads unquoted no, yes, on, off as booleans: quote it)" \
                if isinstance(value, bool) else ""
            raise RecipeError(f"{where}: expected a string, got {_type_name(value)}{hint_}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} values, got "
                              f"{_type_name(value)}")
        return tuple(_typed(v, a, f"{where}[{i}]")
                     for i, (v, a) in enumerate(zip(value, args, strict=True)))
    return value


def _finite(v: float) -> bool:
    return math.isfinite(v)


#: Weight dtypes a recipe may name (``rlcourse.models.load_model``); fp8 training is not
#: supported by the trainers.
_DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
#: Allowed values beyond the type, by dotted key (``train.`` keys apply to every method,
#: ``loss.`` keys to every loss that has them): ``(test, what the value must be)``.
_RANGES: dict[str, tuple[Any, str]] = {
    "max_length": (lambda v: v >= 2, "an integer >= 2"),
    "reference_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "truncation": (lambda v: v in ("error", "left", "right"), "one of error, left, right"),
    "dtype": (lambda v: v is None or v in _DTYPES, f"null or one of {', '.join(_DTYPES)}"),
    "train.lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "train.max_steps": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "train.epochs": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.grad_accum_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.max_grad_norm": (lambda v: v is None or (_finite(v) and v > 0),
                            "null or a finite number > 0"),
    "train.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "train.schedule": (lambda v: v in ("cosine", "linear", "constant"),
                       "one of cosine, linear, constant"),
    "train.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "train.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "train.mixed_precision": (lambda v: v in ("no", "bf16", "fp16", "auto"),
                              "one of no, bf16, fp16, auto"),
    "train.log_every": (lambda v: v >= 1, "an integer >= 1"),
    "train.eval_every": (lambda v: v >= 0, "an integer >= 0"),
    "train.checkpoint_every": (lambda v: v >= 0, "an integer >= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, "an integer >= 1"),
    "train.device": (lambda v: v in ("auto", "cpu", "cuda", "mps"),
                     "one of auto, cpu, cuda, mps"),
    "train.report_to": (lambda v: v in ("none", "tensorboard"), "one of none, tensorboard"),
    "loss.beta": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "loss.tau": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "loss.lam": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "loss.gamma": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "loss.alpha": (lambda v: _finite(v), "a finite number"),
    "loss.label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "loss.desirable_weight": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "loss.undesirable_weight": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "loss.reduction": (lambda v: v in ("token", "sequence"), "one of token, sequence"),
    "rollout.steps": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "rollout.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "rollout.device": (lambda v: v in ("auto", "cpu", "cuda", "mps"),
                       "one of auto, cpu, cuda, mps"),
    "rollout.mixed_precision": (lambda v: v in ("no", "bf16", "fp16", "auto"),
                                "one of no, bf16, fp16, auto"),
    "rollout.checkpoint_every": (lambda v: v >= 0, "an integer >= 0"),
    "rollout.keep_checkpoints": (lambda v: v >= 1, "an integer >= 1"),
    "group.advantage": (lambda v: v in ("grpo", "rloo", "dr_grpo"),
                        "one of grpo, rloo, dr_grpo"),
    "group.loss_type": (lambda v: v in ("grpo", "dapo", "dr_grpo"),
                        "one of grpo, dapo, dr_grpo"),
    "group.group_size": (lambda v: v >= 2, "an integer >= 2 (a group baseline needs siblings)"),
    "group.n_prompts": (lambda v: v >= 1, "an integer >= 1"),
    "group.kl_coef": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "group.clip_eps": (lambda v: v is None or (_finite(v) and v > 0),
                       "null or a finite number > 0"),
    "group.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "group.minibatch_size": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "group.max_grad_norm": (lambda v: v is None or (_finite(v) and v > 0),
                            "null or a finite number > 0"),
    "group.temperature": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    **{f"{sec}.{key}": rule for sec in ("online", "rsft") for key, rule in {
        "rounds": (lambda v: v >= 1, "an integer >= 1"),
        "lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
        "epochs": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
        "batch_size": (lambda v: v >= 1, "an integer >= 1"),
        "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
        "max_length": (lambda v: v >= 2, "an integer >= 2"),
        "device": (lambda v: v in ("auto", "cpu", "cuda", "mps"), "one of auto, cpu, cuda, mps"),
    }.items()},
    "online.prompts_per_round": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "online.pairs_per_prompt": (lambda v: v >= 1, "an integer >= 1"),
    "online.beta": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "online.reference": (lambda v: v in ("sft", "previous"), "one of sft, previous"),
    "online.loss": (lambda v: v == "dpo", "dpo (the only paired loss taking beta alone)"),
    "rsft.n": (lambda v: v >= 1, "an integer >= 1"),
    "rsft.samples_per_prompt": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.kl_coef": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "ppo.ppo_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.minibatch_size": (lambda v: v >= 1, "an integer >= 1"),
    "ppo.temperature": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
}


def _check_range(key: str, value: Any, where: str) -> None:
    rule = _RANGES.get(key)
    if rule is not None and not rule[0](value):
        raise RecipeError(f"{where}: must be {rule[1]}, got {value!r}")


def _where(source: str, lines: Mapping[str, int], key: str) -> str:
    line = lines.get(key)
    if line == 0:  # set on the command line
        return f"{source} (command line): {key}"
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


def _check_keys(section: Mapping[str, Any], known: Sequence[str], prefix: str, source: str,
                lines: Mapping[str, int], what: str) -> None:
    unknown = [k for k in section if k not in known]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise RecipeError(
            f"{_where(source, lines, key)}: unknown key {unknown[0]!r} for {what}; "
            f"known keys: {', '.join(sorted(known))}")


def _section(raw: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{source}: {name}: expected a mapping of keys, got {value!r}")
    return dict(value)


def _dataclass_section(cls: type, values: Mapping[str, Any], prefix: str, source: str,
                       lines: Mapping[str, int]) -> Any:
    """Build dataclass ``cls`` from ``values``: unknown keys, wrong types and values out of
    range are named with file and line."""
    import typing

    hints = typing.get_type_hints(cls)
    _check_keys(values, [f.name for f in fields(cls)], prefix, source, lines, cls.__name__)
    kwargs = {}
    for k, v in values.items():
        where = _where(source, lines, f"{prefix}{k}")
        kwargs[k] = _typed(v, hints[k], where)
        _check_range(f"{prefix}{k}", kwargs[k], where)
    try:
        return cls(**kwargs)
    except FieldRangeError as error:  # the range declared beside the field (cls.RANGES)
        raise RecipeError(f"{_where(source, lines, prefix + error.key)}: must be {error.must}, "
                          f"got {error.value!r}") from None


def _loss_signature(method: str) -> dict[str, inspect.Parameter]:
    """Keyword parameters (with defaults and types) of the loss function a method trains with."""
    fn = sft_loss_fn if method == "sft" else LOSS_FNS[method]
    # num_tokens is the engine's to pass (the global batch's token count), not a recipe key.
    return {k: p for k, p in inspect.signature(fn, eval_str=True).parameters.items()
            if k not in ("model", "batch", "num_tokens")}


def load_recipe(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                text: str | None = None) -> Recipe:
    """Read and validate a recipe: YAML file ``path`` (or ``text``), then dotted ``overrides``.

    Every key is checked against what the trainer accepts: an unknown key (a typo such as
    ``betta``) is a :class:`RecipeError` naming the file, the line and the known keys, never
    silently ignored. Numbers written as ``5e-7`` (a string to YAML 1.1) are read as floats.
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

    method = str(raw.get("method", "")).lower()
    if method not in METHODS:
        raise RecipeError(f"{_where(source, lines, 'method')}: method must be one of "
                          f"{', '.join(METHODS)}, got {raw.get('method')!r}")
    known = _COMMON_KEYS | _METHOD_KEYS[method]
    _check_keys(raw, sorted(known), "", source, lines, f"a {method} recipe")
    needed = {"ppo": ("prompts", "reward_model"), **{m: ("prompts",) for m in
                                                     (*GROUP_METHODS, *ROUND_METHODS)}}
    for key in ("model", "output", *needed.get(method, ("data",))):
        if not raw.get(key):
            raise RecipeError(f"{source}: {key}: missing (give it in the file or on the "
                              f"command line, e.g. --{key.replace('_', '-')} PATH)")
    import typing

    hints = typing.get_type_hints(Recipe)
    top: dict[str, Any] = {}
    for key in sorted(known - {"method", "train", "loss", "ppo", "rollout", "lora", "group",
                               "online", "rsft"}):
        if key in raw:
            where = _where(source, lines, key)
            top[key] = _typed(raw[key], hints[key], where)
            _check_range(key, top[key], where)
    recipe = Recipe(method=method, source=source, lines=lines, **top)
    if method == "ppo":
        recipe.ppo = _dataclass_section(PPOConfig, _section(raw, "ppo", source), "ppo.",
                                        source, lines)
        recipe.rollout = _dataclass_section(PPORollout, _section(raw, "rollout", source),
                                            "rollout.", source, lines)
        if "train" in raw:
            raise RecipeError(f"{_where(source, lines, 'train')}: a PPO recipe takes its "
                              "settings from the 'ppo' and 'rollout' sections")
        return recipe
    if method in GROUP_METHODS:
        return _group_sections(recipe, raw, lines)
    if method in ROUND_METHODS:
        return _round_sections(recipe, raw, lines)
    train = _section(raw, "train", source)
    train.setdefault("seed", recipe.seed)
    train.setdefault("checkpoint_dir", str(Path(recipe.output) / "checkpoints"))
    train.setdefault("logging_dir", str(recipe.output))
    recipe.train = _dataclass_section(TrainConfig, train, "train.", source, lines)
    if recipe.train.eval_every and not recipe.eval_data:
        raise RecipeError(f"{_where(source, lines, 'train.eval_every')}: evaluates the "
                          "eval_data set, and the recipe gives none (add eval_data: FILE)")
    if method == "kto" and recipe.train.batch_size < 2:
        # KTO's reference point z0 is the batch mean of mismatched (prompt, completion) pairs;
        # with one example it is that example's own partner, so the loss degenerates (TRL
        # refuses it too).
        raise RecipeError(f"{_where(source, lines, 'train.batch_size')}: KTO needs "
                          f"batch_size >= 2 per process (its KL reference point is a batch "
                          f"mean), got {recipe.train.batch_size}")
    recipe.lora = _lora_section(raw, source, lines)
    if method != "reward_model":
        params = _loss_signature(method)
        loss = _section(raw, "loss", source)
        _check_keys(loss, list(params), "loss.", source, lines,
                    f"the {method} loss function")
        for k, v in loss.items():
            where = _where(source, lines, f"loss.{k}")
            recipe.loss[k] = _typed(v, params[k].annotation, where)
            _check_range(f"loss.{k}", recipe.loss[k], where)
    return recipe


def _group_sections(recipe: Recipe, raw: Mapping[str, Any], lines: Mapping[str, int]
                    ) -> Recipe:
    """GRPO / RLOO: the reward (a model directory or a function), ``group`` and ``rollout``."""
    source, method = recipe.source, recipe.method
    _check_reward(recipe, lines)
    if "train" in raw:
        raise RecipeError(f"{_where(source, lines, 'train')}: a {method} recipe takes its "
                          "settings from the 'group' and 'rollout' sections")
    group = _section(raw, "group", source)
    advantage = group.setdefault("advantage", method)
    allowed = ("grpo", "dr_grpo") if method == "grpo" else ("rloo",)
    if advantage not in allowed:
        raise RecipeError(f"{_where(source, lines, 'group.advantage')}: a {method} recipe "
                          f"takes advantage {' or '.join(allowed)}, got {advantage!r}")
    recipe.group = _dataclass_section(GroupConfig, group, "group.", source, lines)
    recipe.rollout = _dataclass_section(GroupRollout, _section(raw, "rollout", source),
                                        "rollout.", source, lines)
    return recipe


def _check_reward(recipe: Recipe, lines: Mapping[str, int]) -> None:
    """Exactly one of ``reward_model`` and ``reward_fn``; the function is imported now."""
    if bool(recipe.reward_model) == bool(recipe.reward_fn):
        key = "reward_fn" if recipe.reward_fn else "reward_model"
        raise RecipeError(f"{_where(recipe.source, lines, key)}: give exactly one of "
                          "reward_model (a reward model directory) and reward_fn (a Python "
                          "function 'module:function')")
    if recipe.reward_fn:
        load_reward_fn(recipe.reward_fn, _where(recipe.source, lines, "reward_fn"))


def _round_sections(recipe: Recipe, raw: Mapping[str, Any], lines: Mapping[str, int]
                    ) -> Recipe:
    """Online DPO / RSFT: the reward and the ``online`` / ``rsft`` section."""
    source, method = recipe.source, recipe.method
    _check_reward(recipe, lines)
    name, cls = ("online", OnlineDPOConfig) if method == "online_dpo" else ("rsft", RSFTConfig)
    for key in ("train", "max_length", "truncation"):
        if key in raw:
            raise RecipeError(f"{_where(source, lines, key)}: a {method} recipe takes its "
                              f"settings from the '{name}' section (lengths: {name}.max_length,"
                              f" {name}.max_new_tokens; prompts longer than max_length are cut)")
    section = _section(raw, name, source)
    section.setdefault("device", "auto")
    setattr(recipe, name, _dataclass_section(cls, section, f"{name}.", source, lines))
    return recipe


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


def _lora_section(raw: Mapping[str, Any], source: str, lines: Mapping[str, int]) -> Any:
    """The ``lora:`` section as :class:`rlcourse.adapters.LoraSettings` (``None`` if absent)."""
    if raw.get("lora") is None:
        return None
    section = _section(raw, "lora", source)
    _check_keys(section, LoraSettings.field_names(), "lora.", source, lines, "the lora section")
    for key, value in section.items():
        try:  # validate one key at a time, so that the error names it
            LoraSettings(**{key: _number_or(value)})
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{_where(source, lines, f'lora.{key}')}: {err}") from None
        section[key] = _number_or(value)
    return LoraSettings(**section)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
@dataclass
class RecipeResult:
    """What :func:`run_recipe` returns: the trained model and tokenizer, the history rows and
    the directory the model was saved to (``None`` when ``save=False``). ``finished_before``:
    the output folder already held this finished run, which was loaded, not trained again."""

    recipe: Recipe
    model: Any
    tokenizer: Any
    history: list[dict[str, Any]]
    saved_to: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    finished_before: bool = False


def _read_data(recipe: Recipe, key: str | None = None) -> list[Any]:
    """The JSONL rows of ``key`` (default ``data``; PPO ``prompts``; or ``eval_data``) in the
    format the method reads (KTO: unpaired rows, or pairs to split)."""
    key = key or ("prompts" if recipe.method in PROMPT_METHODS else "data")
    path = Path(getattr(recipe, key))
    if not path.is_file():
        raise RecipeError(f"{recipe.where(key)}: {path}: no such file")
    if recipe.method == "sft":
        return load_sft(path)
    if recipe.method == "kto":
        with open(path, encoding="utf-8") as fh:
            line = next((line for line in fh if line.strip()), "{}")
        try:
            first = json.loads(line)
        except json.JSONDecodeError:
            first = {"label": None}  # load_unpaired names the line and the problem
        paired = isinstance(first, dict) and "label" not in first
        return load_preferences(path) if paired else load_unpaired(path)
    if recipe.method in PREFERENCE_METHODS or recipe.method == "reward_model":
        return load_preferences(path)
    prompts = [r["prompt"] for r in read_jsonl(path, {"prompt": TEXT})]
    if not prompts:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return prompts


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (:func:`rlcourse.files.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# Guards before a run: how it was launched, what the output folder already holds, the model
# --------------------------------------------------------------------------------------------
#: Keys that do not change the trained model: a run may resume with other values of these.
_NOT_IDENTITY = {"source", "output", "train.progress", "train.log_every", "train.eval_every",
                 "train.checkpoint_every", "train.keep_checkpoints", "train.checkpoint_dir",
                 "train.device", "train.logging_dir", "train.report_to", "eval_data",
                 "rollout.checkpoint_every", "rollout.keep_checkpoints", "rollout.device",
                 "online.device", "rsft.device"}
#: What a run writes into OUTPUT (``--overwrite`` removes these and nothing else).
_RUN_FILES = ("run.json", "recipe.json", "history.json", "history.jsonl", "model", "merged",
              "checkpoints", "tensorboard")


def _launch_device(recipe: Recipe) -> str:
    """The device setting to train with, after checking how the processes were launched.

    ``torchrun``/``accelerate launch --multi_gpu`` set ``WORLD_SIZE``; without GPUs accelerate
    would then run every process alone (each trains the whole data, all write ``model/``), so
    on a machine without CUDA several processes train on the CPU over gloo, as with
    ``train.device=cpu``. ``accelerate launch --cpu --num_processes N`` starts ONE process
    (its simple launcher) and only leaves ``MASTER_PORT`` behind: that is refused.
    """
    import torch

    settings = next((s for s in (recipe.train, recipe.rollout, recipe.online, recipe.rsft)
                     if s is not None), None)
    device = getattr(settings, "device", "auto")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ("WORLD_SIZE" not in os.environ and "MASTER_PORT" in os.environ
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"):
        raise RecipeError(
            "accelerate launch --cpu started one process although --num_processes asked for "
            "more (accelerate's --cpu launcher runs a single process); for several CPU "
            "processes run: torchrun --nproc_per_node N -m rlcourse.recipes RECIPE ... "
            "train.device=cpu")
    if world > 1 and device == "auto" and not torch.cuda.is_available():
        if hasattr(settings, "device"):
            settings.device = "cpu"
        return "cpu"
    return device


def _file_digest(path: str | None) -> str | None:
    return file_sha256(path) if path and Path(path).is_file() else None


#: Identity keys added after runs had been recorded without them: a ``run.json`` that lacks one
#: was written before it existed, and is compared on the other keys only.
_ADDED_IDENTITY_KEYS = ("model (fingerprint)", "reward_model (fingerprint)",
                        "reference_model (fingerprint)", "reward_fn (source sha256)")


def _reward_fn_source(recipe: Recipe) -> str | None:
    """SHA-256 of the file that defines the recipe's ``reward_fn`` (its code, not its name)."""
    if not recipe.reward_fn:
        return None
    fn = load_reward_fn(recipe.reward_fn, recipe.where("reward_fn"))
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:  # a builtin or C function: nothing to read
        return None
    return _file_digest(source)


def _identity(recipe: Recipe) -> dict[str, Any]:
    """What makes two runs the same run: every recipe key that changes the trained model
    (dotted, e.g. ``train.lr``), the SHA-256 of each data file's content and of the file that
    defines ``reward_fn``, and a fingerprint of each model directory
    (:func:`rlcourse.files.directory_fingerprint`): a path names a folder, and another
    checkpoint saved into the same folder must not pass for the first."""
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for k, v in obj.items():
            if isinstance(v, Mapping) and v and k in ("train", "ppo", "rollout", "loss", "lora",
                                                      "group", "online", "rsft"):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v

    walk(recipe.to_dict(), "")
    for key in ("model", "data", "prompts", "reward_model", "reference_model"):
        if isinstance(flat.get(key), str):  # ./m and m are the same model
            flat[key] = os.path.abspath(flat[key])
    for key in ("data", "prompts"):
        if getattr(recipe, key, None):
            flat[f"{key} (content sha256)"] = _file_digest(getattr(recipe, key))
    for key in ("model", "reward_model", "reference_model"):
        if isinstance(flat.get(key), str):
            flat[f"{key} (fingerprint)"] = directory_fingerprint(flat[key])
    if getattr(recipe, "reward_fn", None):
        flat["reward_fn (source sha256)"] = _reward_fn_source(recipe)
    return {k: v for k, v in flat.items() if k not in _NOT_IDENTITY}


def _check_output(recipe: Recipe, overwrite: bool) -> str:
    """``"fresh"``, ``"resume"`` (a partial run of this same recipe) or ``"finished"``.

    A folder holding a run of another recipe (other method, data, hyperparameters) is an error
    that names the differing keys, unless ``overwrite``; a folder holding run files that this
    module did not describe (no ``run.json``) is an error too: it cannot be told apart.
    """
    out = Path(recipe.output)
    present = [n for n in _RUN_FILES if (out / n).exists()]
    if overwrite or not present:
        return "fresh"
    info_path = out / "run.json"
    if not info_path.is_file():
        raise RecipeError(
            f"{recipe.where('output')}: {out} already holds {', '.join(present)} but no "
            "run.json saying which recipe wrote them; pass --overwrite to start afresh, or "
            "choose another output")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    checkpoints = (Path(recipe.train.checkpoint_dir) if recipe.train.checkpoint_dir else None) \
        if recipe.train is not None else out / "checkpoints"  # GRPO/RLOO/PPO: OUTPUT/checkpoints
    if info.get("status") != "finished" and not (checkpoints and any(checkpoints.glob("step-*"))):
        return "fresh"  # stopped before its first checkpoint: nothing to resume or to protect
    before, now = info.get("identity", {}), _identity(recipe)
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                    and not (k in _ADDED_IDENTITY_KEYS and k not in before))
    if differ:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:8])
        kind = "a finished" if info.get("status") == "finished" else "an unfinished"
        raise RecipeError(
            f"{recipe.where(differ[0] if differ[0] in recipe.lines else 'output')}: {out} holds "
            f"{kind} run of a different recipe ({len(differ)} key(s) differ: {shown}"
            f"{' ...' if len(differ) > 8 else ''}); resuming it would "
            "mix two runs. Pass --overwrite to start afresh, or choose another output")
    return "finished" if info.get("status") == "finished" else "resume"


def _clear_output(out: Path) -> None:
    """Remove what a previous run wrote into ``out`` (only the run's own files)."""
    import shutil

    for name in _RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _max_positions(model: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no such limit)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _refuse_sharding(recipe: Recipe) -> None:
    """FSDP (and DeepSpeed) asked for by an ``accelerate`` config are refused, not ignored.

    On CPU, accelerate (1.16) turns FSDP on only for accelerator devices (``MULTI_GPU``,
    ``MULTI_XPU``, ...), never for ``MULTI_CPU``: an FSDP config with ``use_cpu: true`` runs
    plain DDP, and without it every process would train alone. On GPUs the recipes' checkpoints
    and ``OUTPUT/model`` are written by the main process from its unwrapped model, which under
    FSDP holds only its own shard of each weight. Either way the user would not get what the
    config says, so the run stops here.
    """
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() == "true":
            raise RecipeError(
                f"{recipe.source}: the accelerate config asks for {name} ({var}=true), which "
                "the recipes do not support: on CPU accelerate ignores FSDP and runs DDP, and "
                "the checkpoints and OUTPUT/model are written from the main process's "
                "unwrapped model (under sharding, only its shard). Use data parallelism "
                "(accelerate launch --multi_gpu, or torchrun) and fit a large model with "
                "lora: and train.gradient_checkpointing: true")


def _finished_result(recipe: Recipe, state: Any) -> RecipeResult:
    """The saved model and history of a finished run (nothing is trained again)."""
    out = Path(recipe.output)
    if state.is_main_process:
        print(f"{out} already holds the finished run of this recipe (model in {out / 'model'});"
              " nothing to train. Pass --overwrite to train it again.", file=sys.stderr)
    model, tokenizer = None, None
    # A full model is loaded back; a reward model or a LoRA adapter is left where it is.
    if recipe.method != "reward_model" and (out / "model" / "config.json").is_file():
        model, tokenizer = load_model(out / "model", device="cpu", dtype=recipe.dtype,
                                      trust_remote_code=recipe.trust_remote_code)
    history_file = out / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    saved = json.loads((out / "recipe.json").read_text()) if (out / "recipe.json").is_file() \
        else {}
    return RecipeResult(recipe, model, tokenizer, history, out / "model",
                        saved.get("summary", {}), finished_before=True)


def run_recipe(recipe: Recipe, save: bool = True, progress: bool = True,
               overwrite: bool = False) -> RecipeResult:
    """Load the model and data a recipe names, train, and save ``OUTPUT/model`` atomically.

    Also writes ``OUTPUT/history.json`` (the engine's metric rows), ``OUTPUT/recipe.json`` and
    ``OUTPUT/run.json`` (the run's identity: every key that changes the model, the data's and
    the reward function's SHA-256, each model folder's fingerprint; ``status`` running or
    finished). A rerun into the same OUTPUT resumes only when
    the identity is the same; a different one is a :class:`RecipeError` naming the keys that
    differ; a finished one is reported and not trained again. ``overwrite=True`` starts afresh.
    Every process of an ``accelerate launch`` runs this; the model goes to the process's own
    device (``accelerate.PartialState().device``), and only the main process writes files.
    """
    from accelerate import PartialState

    train_device = _launch_device(recipe)
    # The same flag the engine's Accelerator gets: with device "cpu" several processes
    # (torchrun / accelerate launch) talk over gloo; on GPUs each process takes its own GPU.
    _refuse_sharding(recipe)
    state = PartialState(cpu=train_device == "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world != state.num_processes:
        raise RecipeError(f"launched as {world} processes (WORLD_SIZE) but accelerate formed a "
                          f"group of {state.num_processes} ({state.distributed_type}); each "
                          "process would train alone. Set train.device to match the machine")
    if recipe.method in ROUND_METHODS and state.num_processes > 1:
        raise RecipeError(f"{recipe.where('method')}: {recipe.method} runs in one process "
                          f"(launched as {state.num_processes}): its rounds sample, label and "
                          "train on one device. Run it without accelerate launch / torchrun")
    if recipe.method in ONLINE_METHODS:
        per = recipe.group.n_prompts if recipe.method in GROUP_METHODS else \
            recipe.rollout.batch_size
        if per % state.num_processes:
            key = "group.n_prompts" if recipe.method in GROUP_METHODS else "rollout.batch_size"
            raise RecipeError(f"{recipe.where(key)}: {per} prompts per step cannot be split "
                              f"over {state.num_processes} processes (each answers whole "
                              "prompts): use a multiple of the number of processes")
    out = Path(recipe.output)
    status = _check_output(recipe, overwrite) if save else "fresh"
    if status == "finished":
        return _finished_result(recipe, state)
    device = str(state.device) if train_device == "auto" else train_device
    model, tokenizer = load_model(recipe.model, device=device, dtype=recipe.dtype,
                                  trust_remote_code=recipe.trust_remote_code)
    positions = _max_positions(model)
    rounds = recipe.online or recipe.rsft
    key, length = (("rollout.max_new_tokens", recipe.rollout.max_new_tokens)
                   if recipe.method in ONLINE_METHODS else
                   (f"{recipe.method.replace('online_dpo', 'online')}.max_length",
                    rounds.max_length) if rounds is not None else
                   ("max_length", recipe.max_length))
    if positions is not None and length > positions:  # else an IndexError deep in the model
        raise RecipeError(f"{recipe.where(key)}: {length} is longer than the model's "
                          f"{positions} positions (max_position_embeddings of {recipe.model})")
    rows = _read_data(recipe)
    eval_rows = _read_data(recipe, "eval_data") if recipe.eval_data else None
    state.wait_for_everyone()  # every process has read OUTPUT before the main one changes it
    if save and state.is_main_process:
        if status == "fresh":
            _clear_output(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "run.json", {"status": "running", "identity": _identity(recipe)})
    state.wait_for_everyone()
    model.train()
    model, lora_model = _with_lora(recipe, model)
    if recipe.train is not None and not progress:
        recipe.train.progress = False
    summary: dict[str, Any] = {}
    if recipe.method == "ppo":
        model, history = _run_ppo(recipe, model, tokenizer, rows, progress)
    elif recipe.method in GROUP_METHODS:
        model, history, summary = _run_group(recipe, model, tokenizer, rows, progress)
    elif recipe.method in ROUND_METHODS:
        model, history, summary = _run_rounds(recipe, model, tokenizer, rows, progress, save)
    else:
        model, history, summary = _TRAINERS[recipe.method](recipe, model, tokenizer, rows,
                                                           eval_rows)
    model.eval()
    summary["num_processes"] = state.num_processes
    saved = None
    if save and state.is_main_process:
        model, saved = _save_trained(recipe, model, lora_model, tokenizer, out)
        _write_json(out / "history.json", history)
        _write_json(out / "recipe.json", {**recipe.to_dict(), "summary": summary})
        _write_json(out / "run.json", {"status": "finished", "identity": _identity(recipe)})
    state.wait_for_everyone()
    return RecipeResult(recipe, model, tokenizer, history, saved, summary)


def _with_lora(recipe: Recipe, model: Any) -> tuple[Any, Any]:
    """``(model to train, peft model or None)``: with a ``lora`` section every base weight is
    frozen and adapters are trained. A reward model wraps the adapted backbone itself (its head
    stays fully trained)."""
    if recipe.lora is None:
        return model, None
    lora_model = apply_lora(model, recipe.lora, seed=recipe.seed)
    if recipe.method == "reward_model":
        return lora_model.get_base_model(), lora_model
    return lora_model, lora_model


def _save_trained(recipe: Recipe, model: Any, lora_model: Any, tokenizer: Any, out: Path
                  ) -> tuple[Any, Path]:
    """Save ``OUTPUT/model``: the full model, or under LoRA the adapter (``adapter_config.json``,
    ``adapter_model.safetensors``) and the tokenizer; with ``lora.merge`` also ``OUTPUT/merged``,
    the adapters folded into the weights (plain ``from_pretrained``). A reward model under LoRA
    is always saved merged (its loader reads a full backbone)."""
    if lora_model is not None and recipe.method == "reward_model":
        merge_lora(lora_model)  # in place: model.model is a plain transformers model again
        return model, save_model(model, tokenizer, out / "model")
    saved = save_model(model, tokenizer, out / "model")
    if recipe.lora is not None and recipe.lora.merge and is_lora(model):
        model = merge_lora(model)
        save_model(model, tokenizer, out / "merged")
    return model, saved


def _train_sft(recipe: Recipe, model: Any, tokenizer: Any, rows: list[Any],
               eval_rows: list[Any] | None = None):
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


def _throughput(history: Any) -> dict[str, float]:
    """``tokens_per_second`` of the run: the engine's non-padding tokens over the wall time of
    its training steps (evaluation, checkpoints and logging excluded)."""
    t = history.totals
    return {"tokens_per_second": round(t["tokens"] / t["step_seconds"], 1)} \
        if t.get("step_seconds") else {}


def _train_preference(recipe: Recipe, model: Any, tokenizer: Any, rows: list[Any],
                      eval_rows: list[Any] | None = None):
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


def _train_reward_model(recipe: Recipe, model: Any, tokenizer: Any, rows: list[Any],
                        eval_rows: list[Any] | None = None):
    eval_fn = None
    if eval_rows is not None:
        eval_items = tokenize_preferences(tokenizer, eval_rows, recipe.max_length,
                                          truncation="right")
        eval_fn = loss_eval_fn(reward_loss_fn, eval_items, recipe.train.batch_size)
    rm, history = train_reward_model(model, tokenizer, rows, recipe.train,
                                     max_length=recipe.max_length, seed=recipe.seed,
                                     eval_fn=eval_fn, disable_dropout=recipe.disable_dropout)
    return rm, history.to_rows(), {"n_pairs": len(rows), **_throughput(history)}


_TRAINERS = {"sft": _train_sft, "reward_model": _train_reward_model,
             **{m: _train_preference for m in PREFERENCE_METHODS}}


def _run_ppo(recipe: Recipe, model: Any, tokenizer: Any, prompts: list[str], progress: bool):
    """PPO with the four models of the slides: actor, critic, reward model, reference."""
    device = str(next(model.parameters()).device)
    reward = RewardModel.from_pretrained(recipe.reward_model, device=device, dtype=recipe.dtype,
                                         trust_remote_code=recipe.trust_remote_code)
    reference = ppo.freeze(model)
    r = recipe.rollout
    if r.separate_critic:
        critic = ValueHeadModel(copy.deepcopy(model), seed=recipe.seed)
        freeze_untied_lm_head(critic.model)  # the critic's logits are never used
        policy = ppo.ActorCritic(model, critic)
    else:
        policy = ValueHeadModel(model, seed=recipe.seed)
    accelerator = make_accelerator(TrainConfig(device=r.device))
    sampler = ppo.lm_sampler(tokenizer, prompts, r.batch_size, r.max_new_tokens,
                             temperature=recipe.ppo.temperature,
                             num_processes=accelerator.num_processes,
                             process_index=accelerator.process_index)
    history = ppo.train_ppo(policy, reference, ppo.reward_model_fn(reward), sampler,
                            recipe.ppo, r.steps, lr=r.lr, seed=recipe.seed, progress=progress,
                            checkpoint_dir=Path(recipe.output) / "checkpoints",
                            checkpoint_every=r.checkpoint_every,
                            keep_checkpoints=r.keep_checkpoints, accelerator=accelerator)
    return ppo.language_model(policy), history


def _run_group(recipe: Recipe, model: Any, tokenizer: Any, prompts: list[str],
               progress: bool):
    """GRPO / RLOO: sample K answers per prompt, score them with the reward model or the
    function, group advantages, clipped updates (:func:`rlcourse.grpo.train_group_lm`)."""
    device = str(next(model.parameters()).device)
    fn = _reward_function(recipe, tokenizer, device)
    reference = None
    if recipe.group.kl_coef:
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
        weight_decay=r.weight_decay, progress=progress)
    return model, history, {"n_prompts_in_file": len(prompts)}


def _reward_function(recipe: Recipe, tokenizer: Any, device: str) -> Any:
    """``fn(prompts, completions) -> floats``: the recipe's ``reward_fn``, or its reward model
    scoring each text as in its training (:func:`rlcourse.online.reward_model_scorer`)."""
    if recipe.reward_fn:
        return load_reward_fn(recipe.reward_fn, recipe.where("reward_fn"))
    rm = RewardModel.from_pretrained(recipe.reward_model, device=device, dtype=recipe.dtype,
                                     trust_remote_code=recipe.trust_remote_code)
    return online.reward_model_scorer(rm, tokenizer)


def _run_rounds(recipe: Recipe, model: Any, tokenizer: Any, prompts: list[str], progress: bool,
                save: bool = True):
    """Online DPO or RSFT, one checkpoint per finished round, resuming after the newest.

    ``OUTPUT/checkpoints/step-<k>`` (written atomically, the older ones removed after it) holds
    the policy after k rounds (``model``) and ``state.json`` (``rounds_done``, the rows so far).
    On a rerun the policy is loaded from it and the rounds after k run with the seeds and prompt
    draws they would have had (:func:`rlcourse.online.online_dpo`'s ``start_round``); the
    reference of ``online.reference: sft`` is the model of the recipe's ``model`` key.
    """
    import shutil

    device = str(next(model.parameters()).device)
    fn = _reward_function(recipe, tokenizer, device)
    config = recipe.online if recipe.method == "online_dpo" else recipe.rsft
    config = copy.copy(config)
    if config.device == "auto":
        config.device = device.split(":")[0]
    ckpt_dir = Path(recipe.output) / "checkpoints"
    found = sorted(ckpt_dir.glob("step-*")) if save else []
    done, rows, reference = 0, [], None
    if found:
        latest = found[-1]
        state = json.loads((latest / "state.json").read_text(encoding="utf-8"))
        done, rows = int(state["rounds_done"]), list(state["history"])
        if recipe.method == "online_dpo" and config.reference == "sft":
            reference = copy.deepcopy(model).eval()  # the starting model, as in a fresh run
        saved, _ = load_model(latest / "model", device=device, dtype=recipe.dtype,
                              trust_remote_code=recipe.trust_remote_code)
        model.load_state_dict(saved.state_dict())
        del saved
        if progress:
            print(f"resuming {recipe.method} after round {done} of {config.rounds} "
                  f"({latest})", file=sys.stderr)

    def after_round(k: int, row: dict[str, Any], policy: Any) -> None:
        rows.append(row)
        if progress:
            shown = ", ".join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}"
                              for key, v in row.items() if key != "round")
            print(f"{recipe.method} round {k + 1}/{config.rounds}: {shown}", file=sys.stderr)
        if not save:
            return
        name = f"step-{k + 1:08d}"

        def write(tmp: Path) -> None:
            save_model(policy, tokenizer, tmp / "model")
            _write_json(tmp / "state.json", {"rounds_done": k + 1, "history": rows})

        atomic_directory_write(ckpt_dir / name, write)
        for old in ckpt_dir.glob("step-*"):  # the new one is in place: the older are not needed
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    if recipe.method == "online_dpo":
        online.online_dpo(model, tokenizer, prompts, online.reward_labeller(fn), config,
                          seed=recipe.seed, callback=after_round, start_round=done,
                          reference_model=reference)
    else:
        online.rejection_sampling_ft(model, tokenizer, prompts, fn, config, seed=recipe.seed,
                                     callback=after_round, start_round=done)
    return model, rows, {"n_prompts_in_file": len(prompts), "rounds_resumed_after": done}


# --------------------------------------------------------------------------------------------
# The recipe key reference (recipes/REFERENCE.md), generated from the dataclasses' field docs
# --------------------------------------------------------------------------------------------
#: ``(section, the dataclass path, methods, what a recipe changes)``: one table each.
REFERENCE_SECTIONS = (
    ("", "rlcourse.recipes:Recipe", "every method", ""),
    ("train", "rlcourse.engine:TrainConfig", "sft, reward_model, dpo, ipo, rdpo, orpo, simpo, kto",
     "In a recipe ``checkpoint_dir`` defaults to ``OUTPUT/checkpoints`` and ``logging_dir`` to "
     "``OUTPUT``."),
    ("ppo", "rlcourse.ppo:PPOConfig", "ppo", ""),
    ("rollout", "rlcourse.recipes:PPORollout", "ppo", ""),
    ("rollout", "rlcourse.recipes:GroupRollout", "grpo, rloo", ""),
    ("group", "rlcourse.grpo:GroupConfig", "grpo, rloo", ""),
    ("online", "rlcourse.online:OnlineDPOConfig", "online_dpo",
     "In a recipe ``device`` defaults to ``auto``."),
    ("rsft", "rlcourse.online:RSFTConfig", "rsft", "In a recipe ``device`` defaults to ``auto``."),
    ("lora", "rlcourse.adapters:LoraSettings", "sft, reward_model and the preference methods",
     ""),
)
#: Dataclass fields that are not recipe keys (set in code only).
NOT_RECIPE_KEYS = {"rlcourse.adapters:LoraSettings": {"extra"},
                   "rlcourse.recipes:Recipe": {"source", "lines"}}
REFERENCE_PATH = Path(__file__).resolve().parent.parent / "recipes" / "REFERENCE.md"


def _import_path(path: str) -> type:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` from the attribute docstrings of dataclass ``cls``: the string literal
    right under each annotated field (the convention autodoc reads; CleanRL's). Fields without
    one are missing from the result."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _cell(text: str) -> str:
    """RST roles and line breaks out, pipes escaped: one Markdown table cell."""
    import re

    text = re.sub(r":(?:func|class|data|meth|mod):`~?([^`]+)`", r"``\1``", text)
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def recipe_reference() -> str:
    """The recipe key reference in Markdown: for each section (:data:`REFERENCE_SECTIONS`) a
    table of key, type, default and the field's doc, read from the dataclass declarations.
    Raises ``ValueError`` naming every field without a doc."""
    out = ["# Recipe key reference", "",
           "Generated by `python -m rlcourse.recipes --write-reference` from the field docs of "
           "the dataclasses below (`rlcourse.recipes.recipe_reference`); do not edit by hand. "
           "Which keys each method takes: the `rlcourse.recipes` module docstring (an unknown "
           "key is an error naming the known ones); `loss` takes the loss function's keyword "
           "arguments (`rlcourse.losses.DEFAULTS`).", ""]
    missing = []
    for section, path, methods, note in REFERENCE_SECTIONS:
        cls = _import_path(path)
        docs = field_docs(cls)
        title = f"`{section}`" if section else "Top level"
        out += [f"## {title} ({methods}): `{path.replace(':', '.')}`", ""]
        if note:
            out += [_cell(note), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            if f.name in NOT_RECIPE_KEYS.get(path, ()):
                continue
            if f.name not in docs:
                missing.append(f"{path}.{f.name}")
                continue
            if f.default_factory is not MISSING_FIELD:
                default = f"`{json.dumps(f.default_factory())}`"
            else:
                default = "required" if f.default is MISSING_FIELD else \
                    f"`{json.dumps(f.default)}`"
            key = f"{section}.{f.name}" if section else f.name
            out.append(f"| `{key}` | `{_cell(str(f.type))}` | {default} | "
                       f"{_cell(docs[f.name])} |")
        out.append("")
    if missing:
        raise ValueError(f"fields without a doc (a string literal under the field): {missing}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlcourse.recipes RECIPE.yaml [--model P] [--data P] [--output D] [k=v ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m rlcourse.recipes",
        description="Train a model with a recipe (a YAML file); key=value pairs override it, "
                    "e.g. train.lr=1e-4 loss.beta=0.5.")
    parser.add_argument("recipe", nargs="?", help="the recipe YAML, e.g. recipes/dpo.yaml")
    parser.add_argument("--write-reference", action="store_true",
                        help=f"regenerate {REFERENCE_PATH.name} (recipes/) from the field docs")
    parser.add_argument("--model", help="local model directory (overrides 'model')")
    parser.add_argument("--data", help="JSONL data (overrides 'data'; for PPO, GRPO, RLOO, "
                                       "online DPO and RSFT 'prompts')")
    parser.add_argument("--prompts", help="JSONL of {\"prompt\"} rows (overrides 'prompts')")
    parser.add_argument("--reward-model", help="PPO, GRPO, RLOO, online DPO, RSFT: reward "
                                               "model directory")
    parser.add_argument("--output", help="output directory (overrides 'output')")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the resolved recipe, train nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if the output folder holds another run")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    if args.write_reference:
        atomic_write_text(REFERENCE_PATH, recipe_reference())
        print(f"wrote {REFERENCE_PATH}")
        return 0
    if args.recipe is None:
        parser.error("the recipe YAML is required")
    try:
        overrides = parse_overrides(args.overrides)
        for key in ("model", "output", "reward_model", "prompts"):
            if getattr(args, key):
                overrides[key] = getattr(args, key)
        if args.data:
            import yaml

            method = (yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8")) or {}).get(
                "method", "")
            overrides["prompts" if str(method).lower() in PROMPT_METHODS else "data"] = args.data
        recipe = load_recipe(args.recipe, overrides)
        if args.dry_run:
            print(json.dumps(recipe.to_dict(), indent=1, default=str))
            return 0
        result = run_recipe(recipe, overwrite=args.overwrite)
    except (RecipeError, DataError, FileNotFoundError) as err:  # bad input: one line, code 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # training diverged: nothing saved, the checkpoints kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.finished_before:
        return 0
    if result.saved_to is not None:
        print(f"saved the trained model to {result.saved_to}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
