r"""Critic-free RL for language models (layer 3): GRPO and RLOO, one group-sampling loop.

REINFORCE with a baseline needs, for each sampled response :math:`y_i` with reward :math:`r_i`,
a baseline :math:`b_i` that does not depend on :math:`y_i`:

.. math:: \nabla J \approx \frac{1}{N}\sum_i (r_i - b_i)\,\nabla\log\pi_\theta(y_i|x_i).

PPO learns a critic :math:`V_\phi` for :math:`b`. With a reward only at the end of the text, a
cheaper baseline is to sample :math:`K` responses to the **same prompt** and compare each with its
siblings (:mod:`rlcourse.critic_free`): ``"rloo"`` subtracts the mean of the other :math:`K-1`
rewards (the leave-one-out baseline), GRPO subtracts the group mean and divides by the group's
standard deviation, Dr. GRPO only subtracts the mean. Every token of response :math:`i` gets
advantage :math:`A_i`, and the update is PPO's clipped ratio (:func:`rlcourse.rl.ppo_policy_loss`)
plus an optional k3 KL penalty to a reference model (:func:`rlcourse.rl.k3`) in the loss, not in
the reward, whatever the advantage.

So ``advantage="rloo"`` is the leave-one-out advantage inside GRPO's update, not exactly RLOO as
Ahmadian et al. (2024) define it: theirs is REINFORCE (one on-policy pass, no clipping) with
the KL in the reward, :math:`r_i - \beta\log(\pi_\theta(y_i|x)/\pi_{ref}(y_i|x))`, before the
baseline. With ``epochs=1``, one minibatch (the ratio is 1, the clip inactive), ``kl_coef=0``
and a ``loss_type`` that sums each answer's token terms (``dapo``, ``dr_grpo``: REINFORCE on
:math:`\log\pi(y|x)` divided by a constant per batch; ``grpo`` weighs answer :math:`i` by
:math:`1/|y_i|`) the two are the same update; ``recipes/rloo.yaml`` runs that.

One :func:`group_step` = sample ``n_prompts`` prompts, ``group_size`` responses each (rows of
one group are consecutive), score them, group advantages, then ``epochs`` passes of minibatch
updates. The policy needs no value head: any model returning logits (a ``(logits, values)``
tuple is accepted, the values are ignored).

Two loops call :func:`group_update`, one per kind of world: :func:`train_group_lm` is *the*
loop for a language model (text rewards, several processes, checkpoints and resume; the
recipes, chapters 16 and 17 and the benchmarks run it), and :func:`train_group` is chapter
15's few-line loop for tensor worlds without a tokenizer (the token MDP, whose sampler has no
KV cache), kept because its lines map to the chapter's equations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rlcourse import rl
from rlcourse.config import (
    COUNT,
    NON_NEGATIVE,
    OPTIONAL_COUNT,
    OPTIONAL_POSITIVE,
    TEMPERATURE,
    check_ranges,
    optional,
    within,
)
from rlcourse.critic_free import grpo_advantages, rloo_advantages
from rlcourse.data import prompt_text
from rlcourse.engine import (
    RunLog,
    TrainConfig,
    check_resumed_settings,
    list_checkpoints,
    load_checkpoint,
    lr_param_groups,
    make_accelerator,
    mean_over_processes,
    rl_lr_schedule,
    save_checkpoint,
    stop_nonfinite,
)
from rlcourse.guards import check_finite_weights, checked_rewards
from rlcourse.memory import ModelRole
from rlcourse.models import generate, next_token_logprobs, shifted_mask
from rlcourse.ppo import (
    backward_and_step,
    gather_rows,
    global_minibatches,
    language_model,
    reference_logprobs,
    sample_tokens,
)
from rlcourse.verifiers import call_reward_fn

__all__ = [
    "ADVANTAGES",
    "GroupConfig",
    "group_advantages",
    "group_model_roles",
    "group_sampler",
    "group_loss_weights",
    "group_step",
    "group_update",
    "prompts_and_columns",
    "token_logprobs",
    "train_group",
    "train_group_lm",
]

#: Advantage estimators by name: (n_prompts, K) rewards -> (n_prompts, K) advantages.
ADVANTAGES: dict[str, Callable[[Tensor], Tensor]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "dr_grpo": lambda r: grpo_advantages(r, scale=False),
}


@dataclass
class GroupConfig:
    """Hyperparameters of the group methods.

    ``advantage``: ``"grpo"``, ``"rloo"`` or ``"dr_grpo"``. ``group_size`` K responses for each
    of ``n_prompts`` prompts per step. ``kl_coef`` β of the k3 penalty in the loss (GRPO uses
    0 to 0.04; 0 needs no reference model). ``epochs`` passes over each batch in minibatches of
    ``minibatch_size`` rows (``None``: the whole batch); with one pass and one minibatch the
    ratio is 1 and the update is REINFORCE with the group baseline.

    ``loss_type``: how the per-token terms ``l_it`` (clipped surrogate + ``kl_coef * k3``) of
    a minibatch of ``B`` responses become one loss (:func:`group_loss_weights`):

    - ``"grpo"`` (Shao et al., 2024): mean over tokens within each response, then over
      responses, ``(1/B) sum_i (1/|y_i|) sum_t l_it``;
    - ``"dapo"`` (Yu et al., 2025; the default, what chapter 15 writes): token-level mean over
      the whole minibatch, ``sum_{i,t} l_it / sum_i |y_i|``, with the token count summed over
      all processes;
    - ``"dr_grpo"`` (Liu et al., 2025): sum over tokens divided by a constant,
      ``sum_{i,t} l_it / (B * L_max)``, ``L_max`` the longest response the sampler allows
      (``max_tokens`` of :func:`group_update`); no length bias.
    """

    advantage: str = "grpo"
    """``"grpo"`` (group z-score), ``"rloo"`` (leave-one-out mean, in this same clipped update with
    the KL in the loss: see the module docstring) or ``"dr_grpo"`` (group mean, not divided by
    the std)."""
    group_size: int = 8
    """K: responses sampled for each prompt (at least 2)."""
    n_prompts: int = 32
    """Prompts per step; each step samples ``n_prompts * group_size`` responses."""
    kl_coef: float = 0.0
    """β of the k3 KL penalty in the loss; 0 needs no reference model."""
    clip_eps: float | None = 0.2
    """ε of the clipped ratio ``clip(r, 1-ε, 1+ε)``; ``None``: no clipping."""
    epochs: int = 1
    """Passes over each batch of samples."""
    minibatch_size: int | None = None
    """Responses per minibatch (an optimizer step each), over all processes (global, like
    ``n_prompts``; a multiple of the number of processes); ``None``: the whole batch."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient L2 norm to this before each step; ``None``: no clipping."""
    temperature: float = 1.0
    """Sampling temperature of the responses."""
    loss_type: str = "dapo"
    """How per-token terms become one loss: ``"grpo"``, ``"dapo"`` or ``"dr_grpo"`` (see the class
    docstring)."""

    #: Each field's range, checked when the config is built (a recipe names file and line).
    RANGES: ClassVar[dict[str, tuple[Any, str]]] = {
        "advantage": (lambda v: v in ADVANTAGES, "one of grpo, rloo, dr_grpo"),
        "loss_type": (lambda v: v in LOSS_TYPES, "one of grpo, dapo, dr_grpo"),
        "group_size": (lambda v: COUNT[0](v) and v >= 2,
                       "an integer >= 2 (a group baseline needs siblings)"),
        "n_prompts": COUNT,
        "kl_coef": NON_NEGATIVE,
        "clip_eps": (optional(within(1e-8, 1.0)), "null or a number in (0, 1]"),
        "epochs": COUNT,
        "minibatch_size": OPTIONAL_COUNT,
        "max_grad_norm": OPTIONAL_POSITIVE,
        "temperature": TEMPERATURE,
    }

    def __post_init__(self) -> None:
        check_ranges(self)


#: How a minibatch's per-token terms are averaged (see :class:`GroupConfig`).
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_loss_weights(mask: Tensor, loss_type: str, num_tokens: Tensor | float | None = None,
                       max_tokens: int | None = None) -> Tensor:
    """Weights ``w_it`` such that the minibatch loss is ``sum_{i,t} w_it l_it``.

    ``mask`` (B, T) marks response tokens. ``grpo``: ``w_it = m_it / (B |y_i|)``; ``dapo``:
    ``w_it = m_it / N`` with ``N = num_tokens`` (default ``sum m``; several processes pass
    the global count divided by the number of processes, since DDP averages gradients);
    ``dr_grpo``: ``w_it = m_it / (B * max_tokens)`` (default ``max_tokens = T``).
    """
    m = mask.float()
    g = m.shape[0]
    if loss_type == "grpo":
        return m / m.sum(-1, keepdim=True).clamp_min(1.0) / g
    if loss_type == "dapo":
        n = m.sum().clamp_min(1.0) if num_tokens is None else num_tokens
        return m / n
    if loss_type == "dr_grpo":
        return m / (g * (max_tokens or m.shape[1]))
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def group_advantages(rewards: Tensor, kind: str = "grpo") -> Tensor:
    """Advantages of ``rewards`` (n_prompts, K) with estimator ``kind`` (see :data:`ADVANTAGES`).

    ``grpo``: :math:`(r_i - \\bar r)/(\\mathrm{std}(r) + \\epsilon)`; ``rloo``:
    :math:`r_i - \\frac{1}{K-1}\\sum_{j\\ne i} r_j`; ``dr_grpo``: :math:`r_i - \\bar r`.
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"unknown advantage {kind!r}; expected one of {', '.join(ADVANTAGES)}")
    return ADVANTAGES[kind](rewards)


def token_logprobs(policy: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   temperature: float = 1.0) -> Tensor:
    """``log pi(input_ids[:, t+1] | input_ids[:, :t+1])``: (B, L) -> (B, L-1), float32.

    :func:`rlcourse.models.next_token_logprobs`: works for transformers models (position ids
    counted over real tokens, PEFT and DDP-wrapped ones too; no (B, L, V) logits) and for the
    toy policies of :mod:`rlcourse.worlds.token_mdp` (which return ``(logits, values)``).
    """
    return next_token_logprobs(policy, input_ids, attention_mask, temperature)


def group_sampler(prompt_fn: Callable[[int, torch.Generator | None], dict[str, Tensor]],
                  config: GroupConfig, max_new_tokens: int, eos_token_id: int | None = None
                  ) -> Callable[[nn.Module, torch.Generator | None], dict[str, Tensor]]:
    """A ``sample_fn(policy, generator)``: ``n_prompts`` prompts from ``prompt_fn(n, generator)``
    (a dict with left-padded ``input_ids``/``attention_mask``, e.g.
    :meth:`rlcourse.worlds.token_mdp.TokenMDP.prompt`), each repeated ``group_size`` times in
    consecutive rows, answered by :func:`rlcourse.ppo.sample_tokens`."""

    def sample(policy: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        prompt = prompt_fn(config.n_prompts, generator)
        repeated = {k: v.repeat_interleave(config.group_size, dim=0) for k, v in prompt.items()}
        return sample_tokens(policy, repeated, max_new_tokens, generator, config.temperature,
                             eos_token_id)

    return sample


def group_step(policy: nn.Module, ref_model: nn.Module | None, reward_fn: Callable[..., Tensor],
               sample_fn: Callable[[nn.Module, torch.Generator | None], dict[str, Tensor]],
               optimizer: torch.optim.Optimizer, config: GroupConfig,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One step: sample groups -> score -> group advantages -> clipped updates (+ β k3).

    ``reward_fn(input_ids, attention_mask, action_mask) -> (B,)`` scores the sampled rows;
    the rest is :func:`group_update`.
    """
    batch = sample_fn(policy, generator)
    mask = shifted_mask(batch["completion_mask"])
    with torch.no_grad():
        raw = reward_fn(batch["input_ids"], batch["attention_mask"], mask)
    scores = checked_rewards(raw, batch["input_ids"].shape[0], reward_fn)
    return group_update(policy, ref_model, batch, scores, optimizer, config, generator)


def group_update(policy: nn.Module, ref_model: nn.Module | None, batch: dict[str, Tensor],
                 scores: Tensor, optimizer: torch.optim.Optimizer, config: GroupConfig,
                 generator: torch.Generator | None = None, accelerator: Any = None,
                 max_tokens: int | None = None) -> dict[str, float]:
    """Group advantages of ``scores`` and ``epochs`` passes of clipped minibatch updates.

    Loss on a minibatch: ``sum_{i,t} w_it [ppo_term_it + kl_coef * k3_it]`` with the weights
    of :func:`group_loss_weights` (``config.loss_type``), ``ppo_term`` the clipped surrogate of
    :func:`rlcourse.rl.ppo_policy_loss` and ``k3`` (:func:`rlcourse.rl.k3`) against the
    reference. Returns metrics: ``score`` (mean reward), ``group_std`` (mean within-group std),
    ``zero_groups`` (share of groups whose K rewards are all equal: no signal),
    ``policy_loss``, ``kl_k3``, ``clip_frac``, ``approx_kl``.

    ``accelerator``: an ``accelerate.Accelerator`` that prepared ``policy`` and ``optimizer``
    (several processes, each holding whole groups): every process gathers the whole batch and
    takes its slice of each global minibatch (:func:`rlcourse.ppo.global_minibatches`,
    ``generator`` in the same state on every process), gradients are averaged over processes
    and the ``dapo`` token count is summed over them, so the update is the one of one process
    holding every group, for any minibatch size.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = shifted_mask(batch["completion_mask"])
    bare = accelerator.unwrap_model(policy) if accelerator is not None else policy
    # One pass over one minibatch: the ratio is pi/pi_old with pi_old the policy as it is, so
    # old = logp.detach() in the loop (TRL does the same with num_iterations=1); no forward.
    single_pass = config.epochs == 1 and config.minibatch_size is None
    with torch.no_grad():
        was = bare.training
        bare.eval()
        old = None if single_pass else token_logprobs(bare, ids, attn, config.temperature)
        bare.train(was)
        # kl_coef > 0: the reference model, or a LoRA policy with its adapters switched off
        ref = (reference_logprobs(ref_model, ids, attn, config.temperature, bare,
                                  score=token_logprobs) if config.kl_coef else None)
    groups = scores.view(-1, config.group_size)
    adv = group_advantages(groups, config.advantage).reshape(-1, 1).expand_as(mask)
    processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    rows = {"input_ids": ids, "attention_mask": attn, "mask": mask, "adv": adv.contiguous(),
            **({"old": old} if old is not None else {}),
            **({"ref": ref} if ref is not None else {})}
    if processes > 1:  # the whole batch on every process: minibatch sizes are global
        rows = gather_rows(rows, accelerator)
    ids, attn, mask, adv = (rows[k] for k in ("input_ids", "attention_mask", "mask", "adv"))
    old, ref = rows.get("old"), rows.get("ref")
    n = ids.shape[0]
    size = config.minibatch_size or n
    sums: dict[str, float] = {}
    count = 0
    for _ in range(config.epochs):
        for idx in global_minibatches(n, size, generator, processes, rank,
                                      "group.minibatch_size"):
            m = mask[idx]
            num_tokens = None
            if config.loss_type == "dapo" and accelerator is not None and processes > 1:
                num_tokens = accelerator.reduce(m.sum().to(accelerator.device), "sum")
                num_tokens = num_tokens.to(m.device) / processes
            w = group_loss_weights(m, config.loss_type, num_tokens, max_tokens)
            logp = token_logprobs(policy, ids[idx], attn[idx], config.temperature)
            # ppo_policy_loss returns sum(l w') / sum(w'); with w' = w / sum(w) (which sums to
            # 1, so masked_mean's clamp of the denominator at 1 never acts), times sum(w) it
            # is sum(l w).
            wsum = w.sum()
            old_mb = logp.detach() if old is None else old[idx]
            loss, stats = rl.ppo_policy_loss(logp, old_mb, adv[idx],
                                             w / wsum.clamp_min(1e-12), config.clip_eps)
            loss = loss * wsum
            stats = {"policy_loss": loss.detach(), **stats}
            if ref is not None:
                kl = (rl.k3(logp, ref[idx]) * w).sum()
                loss = loss + config.kl_coef * kl
                stats["kl_k3"] = kl.detach()
            optimizer.zero_grad(set_to_none=True)
            backward_and_step(loss, policy, optimizer, config.max_grad_norm, accelerator)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
    return {
        "score": float(scores.mean()),
        "group_std": float(groups.std(dim=1).mean()),
        "zero_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
        **{k: v / count for k, v in sums.items()},
    }


def train_group(policy: nn.Module, ref_model: nn.Module | None, reward_fn: Callable[..., Tensor],
                sample_fn: Callable[[nn.Module, torch.Generator | None], dict[str, Tensor]],
                config: GroupConfig, n_steps: int, lr: float = 1e-3, seed: int = 0,
                callback: Callable[[int, dict[str, float]], Any] | None = None,
                progress: bool = True) -> list[dict[str, float]]:
    """``n_steps`` of :func:`group_step` with Adam at ``lr``; returns the metric history.

    ``seed`` fixes sampling and minibatch order (a private ``torch.Generator``); the caller
    seeds the model initialisation. ``callback(step, metrics)`` runs after each step.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    steps: Any = range(n_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=config.advantage.upper(), leave=False)
    history = []
    for step in steps:
        with stop_nonfinite(config.advantage.upper(), step + 1, None, lr):
            metrics = group_step(policy, ref_model, reward_fn, sample_fn, optimizer, config,
                                 generator)
            check_finite_weights(policy)  # before the next sampling step reads them
        metrics["step"] = step
        history.append(metrics)
        if callback is not None:
            callback(step, metrics)
    return history


TextRewardFn = Callable[..., Any]


def prompts_and_columns(prompts: Sequence[Any]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Prompts given as text, as conversations, or as data rows: a row is a mapping with a
    ``prompt`` and other columns (GSM8K's ``answer``), which the reward function receives as
    keyword arguments (:func:`rlcourse.verifiers.call_reward_fn`). Returns the prompts and,
    for each, its other columns (``{}`` for a bare prompt)."""
    texts, columns = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            if "prompt" not in p:
                where = getattr(p, "where", f"prompt row {i}")
                raise KeyError(f"{where}: a prompt row needs a 'prompt' field, got "
                               f"{', '.join(map(str, p)) or 'none'}")
            texts.append(p["prompt"])
            columns.append({k: v for k, v in p.items() if k != "prompt"})
        else:
            texts.append(p)
            columns.append({})
    return texts, columns


def evaluate_prompts(policy: nn.Module, tokenizer: Any, prompts: Sequence[Any],
                     reward_fn: TextRewardFn, max_new_tokens: int, temperature: float = 1.0,
                     seed: int = 0) -> dict[str, float]:
    """One answer per held-out prompt, sampled with a seed fixed for the whole run (so that
    successive evaluations differ only by the policy), scored by ``reward_fn``:
    ``{"eval/reward": mean reward, "eval/response_length": mean answer tokens}``. Every process
    computes the same numbers (same prompts, same seed). Prompts may be data rows
    (:func:`prompts_and_columns`)."""
    prompts, columns = prompts_and_columns(prompts)
    was = policy.training
    policy.eval()
    gen = generate(language_model(policy), tokenizer, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, seed=_step_seed(seed, 0) + 3)
    policy.train(was)
    raw = call_reward_fn(reward_fn, [prompt_text(p) for p in prompts], list(gen.texts), columns)
    scores = checked_rewards(raw, len(prompts), reward_fn, gen.texts)
    return {"eval/reward": float(scores.mean()),
            "eval/response_length": float(gen.completion_mask.sum(-1).float().mean())}


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


#: Settings added to ``train_group_lm``'s checkpoints later, with the value an older checkpoint
#: (which lacks them) was written with.
ADDED_RUN_SETTINGS: dict[str, Any] = {"warmup_steps": 0, "lr_multipliers": {},
                                      "lr_decay": "constant"}


def train_group_lm(policy: nn.Module, tokenizer: Any, prompts: Sequence[str],
                   reward_fn: TextRewardFn, config: GroupConfig, n_steps: int, lr: float = 1e-6,
                   max_new_tokens: int = 64, ref_model: nn.Module | None = None, seed: int = 0,
                   checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
                   keep_checkpoints: int = 2, device: str = "auto",
                   mixed_precision: str = "no", weight_decay: float = 0.0,
                   warmup_steps: int = 0, lr_decay: str = "constant",
                   lr_multipliers: Mapping[str, float] | None = None,
                   progress: bool = True,
                   callback: Callable[[int, dict[str, float]], Any] | None = None,
                   logging_dir: str | Path | None = None,
                   eval_prompts: Sequence[Any] | None = None, eval_every: int = 0,
                   report_to: str = "none") -> list[dict[str, float]]:
    """GRPO / RLOO / Dr. GRPO of a transformers language model, on one or several processes,
    with checkpoints and resume: what ``recipes/grpo.yaml`` and ``recipes/rloo.yaml`` run.

    Step ``k`` (1-based), identical on every process: a generator seeded by ``(seed, k)``
    draws ``n_prompts`` prompts without replacement (cycling when there are fewer); process
    ``r`` of ``W`` takes prompts ``[r n/W, (r+1) n/W)`` and answers each ``group_size`` times
    with :func:`rlcourse.models.generate` (seeded by ``(seed, k)``, ``first_row`` = its first
    global row), so the samples are those one process would draw. ``reward_fn(prompts,
    completions, **columns) -> floats`` scores the texts (a verifier, or
    :func:`rlcourse.online.reward_model_scorer` of a reward model); a prompt given as a data row
    (a mapping with ``prompt`` and other columns, :func:`prompts_and_columns`) passes its other
    columns to ``reward_fn`` as keyword arguments, one list entry per completion, as TRL does
    (:func:`rlcourse.verifiers.call_reward_fn`: only those the function names, so a
    two-argument ``reward_fn(prompts, completions)`` works as before); :func:`group_update`
    updates with AdamW at ``lr`` (gradients averaged over processes), reached after
    ``warmup_steps`` steps of linear warm-up, then constant or (``lr_decay="linear"``) falling
    linearly to ``lr / (n_steps - warmup_steps)`` at the last step
    (:func:`rlcourse.engine.rl_lr_schedule`). ``lr_multipliers`` (parameter-name glob ->
    factor, :func:`rlcourse.engine.lr_param_groups`) trains the parameters it names at
    ``lr * factor``: with ``{"model.norm.weight": 200}`` the final norm's gain, the model's
    inverse temperature, learns 200 times faster (chapter 17).

    ``checkpoint_dir``: every ``checkpoint_every`` steps and at the end the policy, optimizer,
    RNG states, step and history go to ``checkpoint_dir/step-XXXXXXXX`` atomically
    (:mod:`rlcourse.engine`'s checkpoints); a later call with the same directory resumes from
    the newest and ends where an uninterrupted run would (sampling depends only on the seed
    and the step). Returns the history: one row per step, metrics averaged over processes.
    ``logging_dir``: each row is appended to ``logging_dir/history.jsonl`` as the run goes
    (:class:`rlcourse.engine.RunLog`; with ``report_to="tensorboard"`` also as TensorBoard
    scalars in ``logging_dir/tensorboard``). ``eval_prompts``: held-out prompts, each answered once
    with a fixed seed every ``eval_every`` steps and at the end; the row gains ``eval/reward``
    (the mean reward) and ``eval/response_length`` (:func:`evaluate_prompts`).
    """
    prompts, columns = prompts_and_columns(prompts)
    if not prompts:
        raise ValueError("no prompts")
    accelerator = make_accelerator(TrainConfig(device=device, mixed_precision=mixed_precision))
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.n_prompts % world:
        raise ValueError(f"n_prompts={config.n_prompts} must be a multiple of the number of "
                         f"processes ({world}): each process answers whole groups")
    local_n = config.n_prompts // world
    optimizer = torch.optim.AdamW(lr_param_groups(policy, lr, lr_multipliers), lr=lr,
                                  weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(policy, optimizer)
    scheduler = rl_lr_schedule(optimizer, warmup_steps, n_steps, lr_decay)
    run_config = {**asdict(config), "n_steps": n_steps, "lr": lr, "seed": seed,
                  "max_new_tokens": max_new_tokens, "num_processes": world,
                  "warmup_steps": warmup_steps, "lr_decay": lr_decay,
                  "lr_multipliers": {k: float(v) for k, v in (lr_multipliers or {}).items()}}
    history: list[dict[str, float]] = []
    start = 0
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    found = list_checkpoints(ckpt_dir) if ckpt_dir else []
    if found:
        state = load_checkpoint(found[-1], accelerator.unwrap_model(model), optimizer,
                                scheduler, accelerator.device)
        check_resumed_settings(found[-1], state["config"], run_config, ADDED_RUN_SETTINGS,
                               lr_decay)
        history, start = state["history"], state["step"]
        accelerator.print(f"resuming from {found[-1]} (step {start})")

    runlog = RunLog.to_folder(logging_dir, history, accelerator, report_to)
    steps: Any = range(start, n_steps)
    if progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=config.advantage.upper(), initial=start, total=n_steps,
                     leave=False)
    model.train()
    for k in steps:
        step = k + 1
        g = torch.Generator().manual_seed(_step_seed(seed, step))
        order = torch.cat([torch.randperm(len(prompts), generator=g)
                           for _ in range(math.ceil(config.n_prompts / len(prompts)))])
        mine = order[rank * local_n:(rank + 1) * local_n].tolist()
        many = [prompts[i] for i in mine for _ in range(config.group_size)]
        many_columns = [columns[i] for i in mine for _ in range(config.group_size)]
        gen = generate(language_model(accelerator.unwrap_model(model)), tokenizer, many,
                       max_new_tokens=max_new_tokens, temperature=config.temperature,
                       seed=_step_seed(seed, step) + 1,
                       first_row=rank * local_n * config.group_size)
        raw = call_reward_fn(reward_fn, [prompt_text(p) for p in many], list(gen.texts),
                             many_columns)
        scores = checked_rewards(raw, len(many), reward_fn, gen.texts)
        dev = accelerator.device
        batch = {"input_ids": gen.full_ids.to(dev),
                 "attention_mask": gen.full_attention_mask.to(dev),
                 "completion_mask": gen.full_completion_mask.to(dev)}
        # one minibatch order for every process (minibatches are global; each takes its slice)
        order_gen = torch.Generator().manual_seed(_step_seed(seed, step) + 2)
        with stop_nonfinite(config.advantage.upper(), step, ckpt_dir, lr):
            metrics = group_update(model, ref_model, batch, scores.to(dev), optimizer, config,
                                   order_gen, accelerator, max_tokens=max_new_tokens)
            # every step (one isfinite pass, small beside sampling): never sample from, save
            # or return a NaN model
            check_finite_weights(accelerator.unwrap_model(model), accelerator)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics["response_length"] = float(batch["completion_mask"].sum(-1).float().mean())
        metrics = mean_over_processes(accelerator, metrics)
        metrics["step"] = step
        if eval_prompts and ((eval_every and step % eval_every == 0) or step == n_steps):
            metrics.update(evaluate_prompts(accelerator.unwrap_model(model), tokenizer,
                                            eval_prompts, reward_fn, max_new_tokens,
                                            config.temperature, seed))
        history.append(metrics)
        runlog.flush(history)
        if ckpt_dir and (step == n_steps or (checkpoint_every and step % checkpoint_every == 0)):
            if accelerator.is_main_process:
                save_checkpoint(ckpt_dir, {"step": step, "history": history,
                                           "config": run_config},
                                accelerator.unwrap_model(model), optimizer, scheduler,
                                keep_checkpoints)
            accelerator.wait_for_everyone()
        if callback is not None:
            callback(step, metrics)
    runlog.close()
    model.eval()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return history


def group_model_roles(n_params: int, kl_penalty: bool = True, reward_model: bool = True
                      ) -> list[ModelRole]:
    """The models a group method holds (cf. :func:`rlcourse.memory.model_roles`): the trained
    policy; a frozen reference only with a KL penalty; a frozen reward model unless the reward
    is a rule (a verifier, unit tests). No critic."""
    roles = [ModelRole("policy", True, n_params)]
    if kl_penalty:
        roles.append(ModelRole("reference", False, n_params))
    if reward_model:
        roles.append(ModelRole("reward model", False, n_params))
    return roles
