r"""Critic-free RL for language models (layer 3): GRPO and RLOO, one group-sampling loop.

REINFORCE with a baseline needs, for each sampled response :math:`y_i` with reward :math:`r_i`,
a baseline :math:`b_i` that does not depend on :math:`y_i`:

.. math:: \nabla J \approx \frac{1}{N}\sum_i (r_i - b_i)\,\nabla\log\pi_\theta(y_i|x_i).

PPO learns a critic :math:`V_\phi` for :math:`b`. With a reward only at the end of the text, a
cheaper baseline is to sample :math:`K` responses to the **same prompt** and compare each with its
siblings (:mod:`rlcourse.critic_free`): RLOO subtracts the mean of the other :math:`K-1` rewards,
GRPO subtracts the group mean and divides by the group's standard deviation, Dr. GRPO only
subtracts the mean. Every token of response :math:`i` gets advantage :math:`A_i`, and the update
is PPO's clipped ratio (:func:`rlcourse.rl.ppo_policy_loss`) plus an optional k3 KL penalty to
a reference model (:func:`rlcourse.rl.k3`) in the loss, not in the reward.

One :func:`group_step` = sample ``n_prompts`` prompts, ``group_size`` responses each (rows of
one group are consecutive), score them, group advantages, then ``epochs`` passes of minibatch
updates. The policy needs no value head: any model returning logits (a ``(logits, values)``
tuple is accepted, the values are ignored).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlcourse import rl
from rlcourse.critic_free import grpo_advantages, rloo_advantages
from rlcourse.memory import ModelRole
from rlcourse.models import logprobs_from_logits, position_ids_from_mask
from rlcourse.ppo import sample_tokens

__all__ = [
    "ADVANTAGES",
    "GroupConfig",
    "group_advantages",
    "group_model_roles",
    "group_sampler",
    "group_step",
    "token_logprobs",
    "train_group",
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
    """

    advantage: str = "grpo"
    group_size: int = 8
    n_prompts: int = 32
    kl_coef: float = 0.0
    clip_eps: float | None = 0.2
    epochs: int = 1
    minibatch_size: int | None = None
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0


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

    Works for transformers models (position ids counted over real tokens) and for the toy
    policies of :mod:`rlcourse.worlds.token_mdp` (which return ``(logits, values)``).
    """
    kwargs = {}
    if "position_ids" in inspect.signature(policy.forward).parameters:
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    out = policy(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    return logprobs_from_logits(logits[:, :-1] / temperature, input_ids[:, 1:])


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

    Loss on a minibatch: ``ppo_policy_loss(logp, logp_old, A, mask, clip_eps) + kl_coef *
    masked_mean(k3(logp, logp_ref))``, both means over the real response tokens. Returns metrics:
    ``score`` (mean reward), ``group_std`` (mean within-group std), ``zero_groups`` (share of
    groups whose K rewards are all equal: no signal), ``policy_loss``, ``kl``, ``clip_frac``.
    """
    batch = sample_fn(policy, generator)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:].float()
    with torch.no_grad():
        scores = reward_fn(ids, attn, mask).float()
        was = policy.training
        policy.eval()
        old = token_logprobs(policy, ids, attn, config.temperature)
        policy.train(was)
        ref = (token_logprobs(ref_model, ids, attn, config.temperature)
               if config.kl_coef and ref_model is not None else None)
    groups = scores.view(-1, config.group_size)
    adv = group_advantages(groups, config.advantage).reshape(-1, 1).expand_as(mask)
    n = ids.shape[0]
    size = config.minibatch_size or n
    sums: dict[str, float] = {}
    count = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            idx = order[start : start + size]
            logp = token_logprobs(policy, ids[idx], attn[idx], config.temperature)
            loss, stats = rl.ppo_policy_loss(logp, old[idx], adv[idx], mask[idx], config.clip_eps)
            stats = {"policy_loss": loss.detach(), **stats}
            if ref is not None:
                kl = rl.masked_mean(rl.k3(logp, ref[idx]), mask[idx])
                loss = loss + config.kl_coef * kl
                stats["kl_k3"] = kl.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
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
        metrics = group_step(policy, ref_model, reward_fn, sample_fn, optimizer, config,
                             generator)
        metrics["step"] = step
        history.append(metrics)
        if callback is not None:
            callback(step, metrics)
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
