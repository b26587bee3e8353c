"""Training recipes (layer 3): one YAML file per method -> the trainer, from one command.

::

    python -m rlcourse.recipes recipes/dpo.yaml --model path/to/sft --data pairs.jsonl \\
        --output runs/dpo train.lr=5e-7 loss.beta=0.1
    rlcourse-train dpo --model path/to/sft ...    # the same: the shipped recipe of a method
    accelerate launch --num_processes 4 -m rlcourse.recipes recipes/dpo.yaml ...

Every section key with its type, default and meaning: ``recipes/REFERENCE.md``, generated from
the config dataclasses' field docs by :func:`recipe_reference`
(``python -m rlcourse.recipes --write-reference``).

A recipe is thin wiring, not a trainer: it reads the YAML (:func:`load_recipe`), loads any local
causal LM with :func:`rlcourse.models.load_model`, reads the JSONL data with
:mod:`rlcourse.data`, and calls the functions the book teaches: :func:`rlcourse.engine.train`
with :func:`rlcourse.engine.sft_loss_fn` (SFT), :func:`rlcourse.preference.train_preference`
(DPO, IPO, R-DPO, KTO, ORPO, SimPO, SLiC-HF's hinge, robust DPO),
:func:`rlcourse.reward_model.train_reward_model`, :func:`rlcourse.ppo.train_ppo` and
:func:`rlcourse.grpo.train_group_lm` (GRPO, RLOO). The trained model is saved atomically to
``OUTPUT/model``.

The package, one job per file: :mod:`.typed` (``RecipeError``, typed values, ranges and every
``file:line: key:`` message), :mod:`.schema` (:class:`Recipe`, :class:`PPORollout`,
:class:`GroupRollout`), :mod:`.load` (a file plus overrides -> a :class:`Recipe`),
:mod:`.registry` (the methods: one :class:`~.registry.Method` row each), the families
:mod:`.offline_methods` (sft, reward_model, the preference losses: one row per objective of
:data:`rlcourse.losses.OBJECTIVES` with a loss function in
:data:`rlcourse.preference.LOSS_FNS`), :mod:`.rl_methods` (ppo, grpo, rloo) and
:mod:`.round_methods` (online_dpo, rsft), :mod:`.rewards` (``reward_model`` / ``reward_fn``),
:mod:`.output` (run identity, resume, the output lock), :mod:`.checks` (launch checks),
:mod:`.run` (:func:`run_recipe`), :mod:`.reference` (``recipes/REFERENCE.md``) and
:mod:`.cli` (:func:`main`).

A recipe file has these keys (``train`` holds :class:`rlcourse.engine.TrainConfig` fields,
``loss`` the keyword arguments of the method's loss function, e.g. ``beta`` of
:func:`rlcourse.preference.dpo_loss_fn`)::

    method: dpo                 # sft | reward_model | ppo | grpo | rloo | online_dpo | rsft
                                # | a loss of rlcourse.losses.OBJECTIVES: dpo | ipo | rdpo
                                # | kto | orpo | simpo | hinge | robust
    model: path/to/model        # a local directory holding a causal LM and its tokenizer,
                                # or a LoRA run's OUTPUT/model (merged into its base first)
    data: path/to/data.jsonl    # plain text or TRL's conversational form (rlcourse.data)
    eval_data: null             # held-out rows: loss and metrics every train.eval_every steps
    output: runs/dpo
    max_length: 512             # prompt + completion tokens
    truncation: error           # error | left | right
    dtype: null                 # null/fp32, bf16 (fp32 master weights + bf16 autocast), auto,
                                # bf16-pure (bf16 weights: small updates are lost)
    trust_remote_code: false    # a YAML boolean: "false" (quoted) is an error, not true
    reference_model: null       # a separate reference; default: a frozen copy of `model`
    reference_batch_size: 64    # sequences per forward of the reference-log-prob pass
    disable_dropout: true       # preference methods and reward_model: train with dropout off
    loss: {beta: 0.1}
    train: {lr: 5.0e-7, batch_size: 8, grad_accum_steps: 4, mixed_precision: auto,
            gradient_checkpointing: false, ...}
    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear, merge: false}

``lora`` (every method; :mod:`rlcourse.adapters`): train low-rank adapters of the frozen
model; the reference of DPO/IPO/R-DPO/KTO, of online DPO's ``reference: sft``, of GRPO's and
RLOO's KL penalty and of PPO's KL-shaped reward is then the model with its adapters disabled (no
second copy); PPO's critic is then a value head on the adapted policy
(``rollout.separate_critic: false``).
``OUTPUT/model`` holds the adapter and the tokenizer; ``merge: true`` also writes
``OUTPUT/merged``, a full model for ``AutoModelForCausalLM.from_pretrained``.

Every value is checked against the type its trainer declares (booleans are YAML ``true``/
``false``, integers are integers, ``dtype`` is one of null, auto, fp32, bf16, fp16,
bf16-pure) and against its range (``lr``, ``beta``, ``tau`` > 0, ``label_smoothing`` in
[0, 0.5), KTO's ``batch_size`` >= 2, ...): a bad one is a :class:`RecipeError` naming the file,
the line and the key. ``max_length`` must fit the model's position embeddings. Data errors (an
empty file, a malformed row, an over-long example) reach the command line as one line
``file:line: what`` with exit code 2; a run whose loss or weights turn NaN/inf stops with exit
code 1, saving nothing from that point (the last good checkpoint stays).

Watching a run: ``OUTPUT/history.jsonl`` gets one row per log step as training goes (flushed,
rewritten from the checkpoint when a run resumes, so no step appears twice); with ``eval_data``
the rows of every ``train.eval_every``-th step and of the last step also hold ``eval_loss`` and
the method's metrics on it (``eval_rewards/accuracies``, ...); ``train.report_to: tensorboard``
writes them to ``OUTPUT/tensorboard`` too (``train.logging_dir`` defaults to OUTPUT); PPO,
GRPO and RLOO take ``rollout.report_to``, online DPO and RSFT ``online.report_to`` /
``rsft.report_to`` (one row per round).
``tokens_per_s`` (rows) and ``tokens_per_second`` (``recipe.json``'s summary) count non-padding
tokens over the wall time of the training steps only (see the book's glossary).

PPO reads ``prompts`` (JSONL of ``{"prompt"}``) instead of ``data``, a trained
``reward_model`` directory, a ``ppo`` section (:class:`rlcourse.ppo.PPOConfig` fields) and a
``rollout`` section (:class:`PPORollout`); it resumes from ``OUTPUT/checkpoints`` like the
other recipes, and on N processes each answers ``rollout.batch_size / N`` prompts per step
(advantages whitened and losses averaged over every process's tokens). PPO, GRPO and RLOO
take ``eval_data`` prompts too: every ``rollout.eval_every`` steps and after the last, one answer
per held-out prompt, sampled with a seed fixed for the run, is scored by the run's reward
(``eval/reward``, ``eval/response_length`` in the history).

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
``max_length`` or ``truncation`` at the top (``online.max_length`` / ``rsft.max_length``).
Under several processes (``torchrun``, ``accelerate launch``) each samples and scores its share
of a round's answers (the answers one process would draw), every process gets them all, and the
round's training splits the global ``batch_size`` over the processes (a multiple of their
number). After every round the policy, the round index
and the rows so far go atomically to ``OUTPUT/checkpoints/step-<rounds done>``; rerunning the
same command continues after the last finished round and gives the weights of an
uninterrupted run (a round cut short is redone, from the same samples). With
``online.checkpoint_every`` / ``rsft.checkpoint_every`` (optimizer steps), a round's training
also checkpoints into ``OUTPUT/checkpoints/round-<k>`` and a rerun continues inside the round
(its samples are drawn again from the saved weights with the round's seed: the same samples).

One run at a time per output folder: the run holds an exclusive lock on ``OUTPUT/.lock``
(``fcntl.flock``, the holder's pid written in it) from its start to its end; a second run into
the same folder stops at once with one line naming the folder and that pid, so two runs never
interleave ``history.jsonl`` or checkpoints.

Resuming: ``train.checkpoint_dir`` defaults to ``OUTPUT/checkpoints``; run the same command
again after a crash and training continues from the newest checkpoint, exactly where it stopped
(the engine restores optimiser, scheduler, RNG states and the position in the epoch; GRPO and
RLOO restore policy, optimizer, RNG states and step, and draw each step's samples from the
seed and the step alone).
``OUTPUT/run.json`` records the run's identity (every key that changes the trained model, the
SHA-256 of the data and of the file defining ``reward_fn``, a fingerprint of the files that
define each model: weights, config, tokenizer and adapter files directly in its folder, so a run
folder or ``.git`` inside the model folder changes nothing):
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
``accelerate`` config is refused (:func:`.checks.refuse_sharding` says why): on CPU accelerate
runs DDP instead, and the saving is not shard-aware; on GPUs use DDP with ``lora`` and
``train.gradient_checkpointing``. KTO's reference point z0 is a mean over the whole global
batch (gathered from every process, as TRL does).
"""

from __future__ import annotations

from typing import Any

from rlcourse.recipes.cli import main
from rlcourse.recipes.load import load_recipe, loss_signature, parse_overrides
from rlcourse.recipes.offline_methods import (  # the preference losses' runner (chapter 14)
    _train_preference as _train_preference,
)
from rlcourse.recipes.reference import (
    REFERENCE_PATH,
    field_docs,
    recipe_reference,
    reference_sections,
)
from rlcourse.recipes.registry import Method, Section, method, methods
from rlcourse.recipes.rewards import load_reward_fn
from rlcourse.recipes.run import RecipeResult, run_recipe
from rlcourse.recipes.schema import GroupRollout, PPORollout, Recipe
from rlcourse.recipes.typed import RecipeError

__all__ = [
    "METHODS",
    "REFERENCE_PATH",
    "GroupRollout",
    "Method",
    "PPORollout",
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "Section",
    "field_docs",
    "load_recipe",
    "load_reward_fn",
    "loss_signature",
    "main",
    "method",
    "methods",
    "parse_overrides",
    "recipe_reference",
    "reference_sections",
    "run_recipe",
]


def __getattr__(name: str) -> Any:
    """``METHODS``: every method a recipe can name, read from the registry now (a loss added
    to ``rlcourse.losses.OBJECTIVES`` at run time is among them)."""
    if name == "METHODS":
        return tuple(methods())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
