"""PPO for language models (layer 3): rollout -> score -> KL-shaped reward -> GAE -> updates.

The four models of the slides:

- **actor** (the policy being trained, initialised from the SFT model) and **critic** (a value
  head): one ``policy`` module whose ``forward(input_ids, attention_mask)`` returns
  ``(logits (B, L, V), values (B, L))`` — a :class:`rlcourse.models.ValueHeadModel`, an
  :class:`ActorCritic` pair of separate networks, or a toy
  :class:`rlcourse.worlds.token_mdp.PrefixPolicy`;
- **reward model**: any ``reward_fn(input_ids, attention_mask, action_mask) -> scores (B,)``
  (a :class:`rlcourse.models.RewardModel` through :func:`reward_model_fn`, or a rule);
- **reference** (frozen copy of the SFT model): ``ref_model(input_ids, attention_mask)``
  returning logits (or ``(logits, values)``, or an object with ``.logits``).

One :func:`ppo_step` = sample responses, score them, turn scores into the slides' per-token
KL-shaped rewards, compute advantages and returns with GAE, then several epochs of minibatch
updates of the clipped actor and critic losses (:mod:`rlcourse.rl`).

Alignment: for a sequence ``input_ids[0..L-1]``, per-token tensors have length ``L-1`` and
column ``t`` belongs to the token ``input_ids[:, t+1]`` chosen in the state ``input_ids[:, :t+1]``:
``logprobs[:, t] = log pi(input_ids[:, t+1] | input_ids[:, :t+1])`` and ``values[:, t] =
V(input_ids[:, :t+1])``. ``action_mask[:, t] = 1`` when that token is a response token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rlcourse import rl
from rlcourse.adapters import adapters_disabled, is_lora
from rlcourse.config import (
    COUNT,
    NON_NEGATIVE,
    OPTIONAL_POSITIVE,
    POSITIVE,
    TEMPERATURE,
    check_ranges,
    optional,
    within,
)
from rlcourse.engine import (
    RunLog,
    check_resumed_settings,
    list_checkpoints,
    load_checkpoint,
    mean_over_processes,
    rl_lr_schedule,
    save_checkpoint,
    stop_nonfinite,
)
from rlcourse.guards import check_finite_loss, check_finite_weights, checked_rewards
from rlcourse.models import (
    call_model,
    generate,
    output_logits,
    score_sequences,
    shifted_mask,
    unwrap_model,
)

__all__ = [
    "ActorCritic",
    "PPOConfig",
    "Rollout",
    "forward_policy",
    "freeze",
    "lm_sampler",
    "make_experience",
    "ppo_step",
    "ppo_update",
    "reference_logprobs",
    "reward_model_fn",
    "sample_tokens",
    "sampler_from_prompts",
    "train_ppo",
]


@dataclass
class PPOConfig:
    """Hyperparameters of PPO for language models.

    Defaults follow DeepSpeed-Chat (the slides' formulation) where it has one: ``kl_coef`` 0.1,
    ``clip_score`` 5, ``clip_eps`` 0.2, ``clip_eps_v`` 0.2, ``gamma`` 1, ``lam`` 0.95; and TRL
    for the rest: 4 PPO epochs, ``vf_coef`` 0.1, whitened advantages. ``clip_eps=None`` and
    ``clip_eps_v=None`` switch clipping off; ``lam=0`` gives the slides' one-step advantage.
    ``adaptive_kl`` uses Ziegler et al.'s controller (``kl_target``, ``kl_horizon``) starting at
    ``kl_coef``.
    """

    kl_coef: float = 0.1
    """β of the per-token KL penalty ``-β (log π - log π_ref)`` added to the rewards (the start
    value when ``adaptive_kl``)."""
    adaptive_kl: bool = False
    """Adapt ``kl_coef`` with Ziegler et al.'s controller towards ``kl_target``."""
    kl_target: float = 6.0
    """Target KL per sequence (nats) of the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive controller, in samples: ``β ← β (1 + e n / kl_horizon)`` after a
    step of ``n`` samples, ``e = clip(KL / kl_target - 1, -0.2, 0.2)``."""
    clip_score: float | None = 5.0
    """Clip the reward model's score to ``[-clip_score, clip_score]``; ``None``: no clipping."""
    clip_eps: float | None = 0.2
    """ε of the clipped policy ratio ``clip(r, 1-ε, 1+ε)``; ``None``: no clipping."""
    clip_eps_v: float | None = 0.2
    """Clip range of the value update around the old values; ``None``: no clipping."""
    gamma: float = 1.0
    """Discount per token (1: undiscounted)."""
    lam: float = 0.95
    """λ of GAE; 0: the one-step advantage ``r + γV' - V``, 1: Monte-Carlo returns minus V."""
    ppo_epochs: int = 4
    """Passes of PPO updates over each batch of experience."""
    minibatch_size: int = 64
    """Sequences per PPO minibatch (an optimizer step each), over all processes (global, like
    the rollout's batch size; a multiple of the number of processes)."""
    vf_coef: float = 0.1
    """Weight of the value loss in ``policy_loss + vf_coef * value_loss - ent_coef * entropy``."""
    ent_coef: float = 0.0
    """Weight of the mean per-token entropy bonus in the loss (0: none)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 over the response tokens of the whole batch
    (all processes)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient L2 norm to this before each step; ``None``: no clipping."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; the policy's and the reference's log-probs are
    taken at the same temperature."""

    #: Each field's range, checked when the config is built (a recipe names file and line).
    RANGES: ClassVar[dict[str, tuple[Any, str]]] = {
        "kl_coef": NON_NEGATIVE,
        "kl_target": POSITIVE,
        "kl_horizon": POSITIVE,
        "clip_score": OPTIONAL_POSITIVE,
        "clip_eps": (optional(within(1e-8, 1.0)), "null or a number in (0, 1]"),
        "clip_eps_v": OPTIONAL_POSITIVE,
        "gamma": (within(0.0, 1.0), "a number in [0, 1]"),
        "lam": (within(0.0, 1.0), "a number in [0, 1]"),
        "ppo_epochs": COUNT,
        "minibatch_size": COUNT,
        "vf_coef": NON_NEGATIVE,
        "ent_coef": NON_NEGATIVE,
        "max_grad_norm": OPTIONAL_POSITIVE,
        "temperature": TEMPERATURE,
    }

    def __post_init__(self) -> None:
        check_ranges(self)

    def kl_controller(self) -> rl.FixedKLController | rl.AdaptiveKLController:
        """The KL-coefficient controller this configuration asks for."""
        if self.adaptive_kl:
            return rl.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
        return rl.FixedKLController(self.kl_coef)


@dataclass
class Rollout:
    """One batch of experience; per-token tensors are (B, L-1), see the module docstring."""

    input_ids: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    scores: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class ActorCritic(nn.Module):
    """Actor and critic as two separate networks (DeepSpeed-Chat's layout, the slides' picture).

    ``actor``: a causal LM (or anything returning logits); ``critic``: a model returning
    ``(logits, values)`` (e.g. :class:`rlcourse.models.ValueHeadModel`) or values alone.
    ``forward`` returns ``(actor logits, critic values)``.
    """

    def __init__(self, actor: nn.Module, critic: nn.Module):
        super().__init__()
        self.actor, self.critic = actor, critic

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = output_logits(call_model(self.actor, input_ids, attention_mask))
        out = call_model(self.critic, input_ids, attention_mask)
        values = out[1] if isinstance(out, (tuple, list)) else out
        return logits, values


def freeze(model: nn.Module) -> nn.Module:
    """A frozen deep copy (no gradients, eval mode): the reference model."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def forward_policy(policy: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """One pass of actor and critic: ``(logprobs, values, entropy)``, each (B, L-1).

    ``logprobs[:, t] = log pi(a_{t+1} | s_t)``, ``values[:, t] = V(s_t)``, ``entropy[:, t] =
    H(pi(.|s_t))`` where ``s_t = input_ids[:, :t+1]``.
    """
    scored = score_sequences(policy, input_ids, attention_mask, temperature)
    if scored.values is None:
        raise TypeError("the PPO policy must return (logits, values): e.g. a ValueHeadModel "
                        "or an ActorCritic")
    return scored.logprobs, scored.values[:, :-1].float(), scored.entropy()


@torch.no_grad()
def reference_logprobs(ref_model: nn.Module | None, input_ids: Tensor, attention_mask: Tensor,
                       temperature: float = 1.0, policy: nn.Module | None = None,
                       score: Callable[..., Tensor] | None = None) -> Tensor:
    """``log pi_ref(a_{t+1} | s_t)`` for every position: (B, L-1), no gradient.

    ``ref_model=None`` with a LoRA ``policy``: the reference is the policy's language model with
    its adapters switched off (:func:`rlcourse.adapters.adapters_disabled`), as for DPO under
    LoRA, with no second copy of the weights. Without either, a ``ValueError``: a KL penalty
    with no reference would silently be no penalty. ``score(model, input_ids, attention_mask,
    temperature)``: how the log-probs are computed, the policy's own way (default
    ``score_sequences(...).logprobs``, PPO's), so that a reference equal to the policy gives a KL
    of exactly 0."""
    if score is None:
        def score(model, ids, mask, t):
            return score_sequences(model, ids, mask, t).logprobs
    with torch.no_grad():
        if ref_model is not None:
            return score(ref_model, input_ids, attention_mask, temperature)
        lm = language_model(unwrap_model(policy)) if policy is not None else None
        if lm is None or not is_lora(lm):
            raise ValueError("a KL penalty needs a reference model (or a LoRA policy, whose "
                             "adapters switched off are the reference); got neither")
        with adapters_disabled(lm):
            return score(lm, input_ids, attention_mask, temperature)


def reward_model_fn(reward_model: nn.Module) -> Callable[..., Tensor]:
    """Wrap a :class:`rlcourse.models.RewardModel` (scalar at the last real token) as a
    ``reward_fn(input_ids, attention_mask, action_mask) -> scores (B,)``."""

    @torch.no_grad()
    def score(input_ids: Tensor, attention_mask: Tensor, action_mask: Tensor | None = None
              ) -> Tensor:
        was = reward_model.training
        reward_model.eval()
        out = reward_model(input_ids, attention_mask).float()
        reward_model.train(was)
        return out

    return score


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_tokens(policy: nn.Module, prompt: dict[str, Tensor], max_new_tokens: int,
                  generator: torch.Generator | None = None, temperature: float = 1.0,
                  eos_token_id: int | None = None, pad_token_id: int = 0) -> dict[str, Tensor]:
    """Sample responses token by token (no KV cache: for the small policies of the toy worlds).

    ``prompt``: ``input_ids`` and ``attention_mask`` (B, P), left-padded. Returns
    ``input_ids`` and ``attention_mask`` (B, P + N) and ``completion_mask`` (B, P + N), 1 on
    response tokens (up to and including EOS; padding after it is 0).
    """
    ids, attn = prompt["input_ids"], prompt["attention_mask"]
    alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    comp = torch.zeros_like(ids)
    for _ in range(max_new_tokens):
        logits = output_logits(call_model(policy, ids, attn))[:, -1].float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))
        m = alive.long()
        ids = torch.cat([ids, nxt[:, None]], 1)
        attn = torch.cat([attn, m[:, None]], 1)
        comp = torch.cat([comp, m[:, None]], 1)
        if eos_token_id is not None:
            alive = alive & (nxt != eos_token_id)
            if not alive.any():
                break
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def sampler_from_prompts(prompt: dict[str, Tensor], max_new_tokens: int,
                         temperature: float = 1.0, eos_token_id: int | None = None
                         ) -> Callable[[nn.Module, torch.Generator | None], dict[str, Tensor]]:
    """A ``sample_fn(policy, generator)`` that always starts from the same prompt batch."""

    def sample(policy: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        return sample_tokens(policy, prompt, max_new_tokens, generator, temperature,
                             eos_token_id)

    return sample


def lm_sampler(tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               num_processes: int = 1, process_index: int = 0
               ) -> Callable[[nn.Module, torch.Generator | None], dict[str, Tensor]]:
    """A ``sample_fn(policy, generator)`` for transformers models: each call samples
    ``batch_size`` prompts (with replacement, from ``generator``) and generates responses with
    :func:`rlcourse.models.generate` (KV cache) from the policy's language model.

    For exact PPO ratios keep ``temperature=1``, ``top_k=0``, ``top_p=1``: the log-probs PPO
    uses are those of the raw model.

    Several processes (``num_processes``, each calling with the same generator state): every
    process draws the whole batch's prompts and seed, and answers rows ``[i b/N, (i+1) b/N)``
    (``i = process_index``) with the samples one process would draw for them.
    """
    prompts = list(prompts)
    if batch_size % num_processes:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the number of "
                         f"processes ({num_processes})")
    per = batch_size // num_processes
    lo = process_index * per

    def sample(policy: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        idx = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        gen = generate(language_model(policy), tokenizer, [prompts[i] for i in idx[lo:lo + per]],
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, first_row=lo)
        return {"input_ids": gen.full_ids, "attention_mask": gen.full_attention_mask,
                "completion_mask": gen.full_completion_mask, "texts": gen.texts,
                "prompts": gen.prompts}

    return sample


def language_model(policy: nn.Module) -> nn.Module:
    """The causal LM inside a policy: ``ValueHeadModel.model``, ``ActorCritic.actor``, or itself."""
    if isinstance(policy, ActorCritic):
        return language_model(policy.actor)
    if hasattr(policy, "model") and hasattr(policy, "head"):
        return policy.model
    return policy


# --------------------------------------------------------------------------------------------
# the PPO step
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def make_experience(policy: nn.Module, ref_model: nn.Module, reward_fn: Callable[..., Tensor],
                    batch: dict[str, Tensor], config: PPOConfig, kl_coef: float) -> Rollout:
    """Score a batch of sampled responses and turn it into PPO's training data.

    1. ``score = reward_fn(...)`` (the reward model reads the whole prompt + response);
    2. ``log pi_old``, ``V_old`` (actor and critic) and ``log pi_ref`` (reference) per token;
    3. the slides' KL-shaped rewards :func:`rlcourse.rl.kl_shaped_rewards`;
    4. advantages and returns with :func:`rlcourse.rl.gae`.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    action_mask = shifted_mask(batch["completion_mask"])
    was = policy.training
    policy.eval()
    raw = reward_fn(ids, attn, action_mask)
    scores = checked_rewards(raw, ids.shape[0], reward_fn).to(ids.device)
    logprobs, values, _ = forward_policy(policy, ids, attn, config.temperature)
    policy.train(was)
    ref_logprobs = reference_logprobs(ref_model, ids, attn, config.temperature, policy)
    rewards = rl.kl_shaped_rewards(logprobs, ref_logprobs, scores, action_mask, kl_coef,
                                   config.clip_score)
    advantages, returns = rl.gae(rewards, values, config.gamma, config.lam, action_mask)
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask",
                                                         "completion_mask")}
    return Rollout(ids, attn, action_mask, scores, logprobs * action_mask,
                   ref_logprobs * action_mask, values * action_mask, rewards, advantages,
                   returns, extra)


def _minibatches(n: int, size: int, generator: torch.Generator | None) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, size):
        yield order[start : start + size]


def gather_rows(tensors: dict[str, Tensor], accelerator: Any) -> dict[str, Tensor]:
    """Every process's rows of each ``(rows, length, ...)`` tensor, in process order (process 0's
    rows first), right-padded with zeros to the longest length over processes (a padded
    position has attention and action mask 0, so it changes no log-prob and no mean).

    Minibatch sizes are global, as ``batch_size`` is: each process gathers the whole batch
    (a few integer and float tensors of ``rows x length``) and takes its slice of every global
    minibatch (:func:`global_minibatches`), so the minibatches, and hence the optimisation, do
    not depend on how many processes run it."""
    out = {}
    for key, t in tensors.items():
        if t.dim() > 1:
            t = accelerator.pad_across_processes(t, dim=1, pad_index=0, pad_first=False)
        out[key] = accelerator.gather(t.contiguous())
    return out


def global_minibatches(n: int, size: int, generator: torch.Generator | None,
                       processes: int = 1, rank: int = 0, what: str = "minibatch_size"
                       ) -> Iterator[Tensor]:
    """This process's rows of each minibatch of a global batch of ``n`` rows: a permutation from
    ``generator`` (in the same state on every process), cut into minibatches of ``size`` rows,
    each split evenly over the ``processes`` (process ``rank`` takes the ``rank``-th part).

    One process gets exactly :func:`_minibatches`; ``P`` processes get the same minibatches,
    ``size / P`` rows each, which is why ``size`` must be a multiple of ``P``."""
    if processes > 1 and size % processes:
        raise ValueError(f"{what}={size} is global (rows per optimizer step over all "
                         f"processes) and must be a multiple of the number of processes "
                         f"({processes})")
    for idx in _minibatches(n, size, generator):
        yield idx.tensor_split(processes)[rank] if processes > 1 else idx


def _whiten_over_processes(x: Tensor, mask: Tensor, accelerator: Any, eps: float = 1e-8
                           ) -> Tensor:
    """:func:`rlcourse.rl.masked_whiten` with the mean and the (Bessel-corrected) variance taken
    over the real tokens of EVERY process, as one process holding the whole batch would."""
    m = mask.to(x.dtype)
    sums = accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), "sum")
    n = sums[1]
    mean = sums[0] / n.clamp_min(1.0)
    sq = accelerator.reduce(((x - mean) ** 2 * m).sum(), "sum")
    var = sq / n.clamp_min(1.0) * n / (n - 1).clamp_min(1.0)
    return (x - mean) * torch.rsqrt(var + eps) * m


def backward_and_step(loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                      max_grad_norm: float | None, accelerator: Any = None) -> None:
    """One optimizer step: backward (through ``accelerate`` when given, which syncs gradients
    across processes), clip the global gradient norm to ``max_grad_norm``, step.

    Every RL loop steps through here, so here is the guard: a NaN or infinite loss on any
    process raises :class:`rlcourse.guards.NonFiniteError` before the step (the weights stay
    as they were), and so does a non-finite gradient norm when clipping.
    """
    check_finite_loss(loss, "the loss", accelerator)
    if accelerator is not None:
        accelerator.backward(loss)
        if max_grad_norm is not None:
            norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            check_finite_loss(torch.as_tensor(norm), "the gradient norm")
    else:
        loss.backward()
        if max_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            check_finite_loss(norm, "the gradient norm")
    optimizer.step()


def ppo_update(policy: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout,
               config: PPOConfig, generator: torch.Generator | None = None,
               accelerator: Any = None) -> dict[str, float]:
    """Several epochs of minibatch updates on one rollout.

    ``loss = policy_loss + vf_coef * value_loss - ent_coef * entropy`` with PPO's clipped
    policy loss and clipped value loss (:func:`rlcourse.rl.ppo_policy_loss`,
    :func:`rlcourse.rl.ppo_value_loss`); advantages whitened over the whole batch first.
    Returns the metrics averaged over minibatches.

    ``accelerator`` (an ``accelerate.Accelerator`` that prepared ``policy`` and ``optimizer``;
    each process holds its share of the rollout): advantages are whitened over every process's
    tokens, every process gathers the whole batch and takes its slice of each global minibatch
    (:func:`global_minibatches`, the order from ``generator`` in the same state everywhere), and
    each process's token means are weighted by its share of the minibatch's tokens
    (``n_local * processes / n_all``) before DDP averages the gradients, so the update is the
    one of one process holding the whole batch, for any minibatch size.
    """
    adv = rollout.advantages
    processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    if config.whiten_advantages and processes > 1:
        adv = _whiten_over_processes(adv, rollout.action_mask, accelerator)
    elif config.whiten_advantages:
        adv = rl.masked_whiten(adv, rollout.action_mask)
    rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "action_mask": rollout.action_mask, "logprobs": rollout.logprobs,
            "values": rollout.values, "returns": rollout.returns, "advantages": adv}
    if processes > 1:  # the whole batch on every process: minibatch sizes are global
        rows = gather_rows(rows, accelerator)
    n_rows = rows["input_ids"].shape[0]
    policy.train()
    sums: dict[str, float] = {}
    count = 0
    for _ in range(config.ppo_epochs):
        for idx in global_minibatches(n_rows, config.minibatch_size, generator, processes, rank,
                                      "ppo.minibatch_size"):
            mask = rows["action_mask"][idx]
            logprobs, values, entropy = forward_policy(
                policy, rows["input_ids"][idx], rows["attention_mask"][idx], config.temperature)
            pg_loss, pg_stats = rl.ppo_policy_loss(logprobs, rows["logprobs"][idx],
                                                   rows["advantages"][idx], mask, config.clip_eps)
            vf_loss, vf_stats = rl.ppo_value_loss(values, rows["values"][idx],
                                                  rows["returns"][idx], mask, config.clip_eps_v)
            ent = rl.masked_mean(entropy, mask)
            loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * ent
            stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": ent,
                     **pg_stats, **vf_stats}
            optimizer.zero_grad(set_to_none=True)
            if accelerator is not None and processes > 1:
                # every term is a token mean: weigh by this process's share of the tokens
                n = mask.sum()
                share = (n * processes / accelerator.reduce(n.detach().clone(), "sum")
                         .clamp_min(1.0)).detach()
                loss = loss * share
                stats = {k: v * share for k, v in stats.items()}
            backward_and_step(loss, policy, optimizer, config.max_grad_norm, accelerator)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


def ppo_step(policy: nn.Module, ref_model: nn.Module, reward_fn: Callable[..., Tensor],
             sample_fn: Callable[[nn.Module, torch.Generator | None], dict[str, Tensor]],
             optimizer: torch.optim.Optimizer, config: PPOConfig,
             kl_ctl: rl.FixedKLController | rl.AdaptiveKLController | None = None,
             generator: torch.Generator | None = None, accelerator: Any = None,
             order_generator: torch.Generator | None = None
             ) -> tuple[dict[str, float], Rollout]:
    """One PPO iteration: rollout -> score -> KL-shaped reward -> GAE -> minibatch epochs.

    ``sample_fn(policy, generator)`` returns ``input_ids``, ``attention_mask`` and
    ``completion_mask`` of freshly sampled prompt + response sequences. Returns the metrics
    (``score``, ``kl`` = mean over responses of ``sum_t log pi/pi_ref``, ``kl_coef``,
    ``return``, ``explained_variance``, the losses, ``clip_frac``, ``approx_kl``, ``entropy``,
    ``response_length``) and the rollout the update was computed from.
    """
    kl_ctl = kl_ctl or config.kl_controller()
    batch = sample_fn(policy, generator)
    rollout = make_experience(policy, ref_model, reward_fn, batch, config, kl_ctl.value)
    m = rollout.action_mask
    kl_per_seq = (rl.k1(rollout.logprobs, rollout.ref_logprobs) * m).sum(-1)
    metrics = {
        "score": float(rollout.scores.mean()),
        "kl": float(kl_per_seq.mean()),
        "kl_k3": float((rl.k3(rollout.logprobs, rollout.ref_logprobs) * m).sum(-1).mean()),
        "kl_coef": float(kl_ctl.value),
        "return": float(rollout.rewards.sum(-1).mean()),
        "explained_variance": float(rl.explained_variance(rollout.values, rollout.returns, m)),
        "value_mean": float(rl.masked_mean(rollout.values, m)),
        "response_length": float(m.sum(-1).mean()),
    }
    metrics.update(ppo_update(policy, optimizer, rollout, config, order_generator or generator,
                              accelerator))
    n_rows = len(rollout)
    if accelerator is not None and accelerator.num_processes > 1:
        # Means over processes (each holds as many rows). Row means (score, kl, return,
        # response_length) and the loss terms are then those of the whole batch;
        # explained_variance and value_mean are averages of per-process values.
        metrics = mean_over_processes(accelerator, metrics)
        n_rows *= accelerator.num_processes
    kl_ctl.update(metrics["kl"], n_rows)
    return metrics, rollout


def train_ppo(policy: nn.Module, ref_model: nn.Module, reward_fn: Callable[..., Tensor],
              sample_fn: Callable[[nn.Module, torch.Generator | None], dict[str, Tensor]],
              config: PPOConfig, n_steps: int, lr: float = 1e-3, seed: int = 0,
              callback: Callable[[int, dict[str, float], Rollout], None] | None = None,
              progress: bool = True, checkpoint_dir: str | Path | None = None,
              checkpoint_every: int = 0, keep_checkpoints: int = 2,
              accelerator: Any = None, logging_dir: str | Path | None = None,
              eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
              eval_every: int = 0, report_to: str = "none", warmup_steps: int = 0,
              lr_decay: str = "constant") -> list[dict[str, float]]:
    """Run ``n_steps`` PPO steps with Adam at learning rate ``lr``, reached after
    ``warmup_steps`` steps of linear warm-up, then constant or (``lr_decay="linear"``) falling
    linearly to ``lr / (n_steps - warmup_steps)`` at the last step
    (:func:`rlcourse.engine.rl_lr_schedule`);
    returns the metric history (``lr``: the rate each step used).

    ``seed`` fixes sampling and minibatch order (a private ``torch.Generator``); the caller
    seeds the model initialisation. ``callback(step, metrics, rollout)`` runs after each step.

    ``accelerator``: an ``accelerate.Accelerator`` for one or several processes (DDP). Then
    ``sample_fn`` must sample this process's share of each step's batch from the shared
    generator (:func:`lm_sampler` with ``num_processes``/``process_index``), minibatch order
    comes from a second, per-process generator, and :func:`ppo_update` whitens and averages
    over every process's tokens; only the main process writes checkpoints.

    ``checkpoint_dir``: every ``checkpoint_every`` steps and at the end, the policy (actor and
    critic), Adam's state, the generator's and the global RNG states, the KL coefficient, the
    step and the history go atomically to ``checkpoint_dir/step-XXXXXXXX`` (the engine's
    checkpoints, newest ``keep_checkpoints`` kept). A later call with the same directory resumes
    from the newest one and ends where an uninterrupted run would. ``ref_model`` is not saved:
    the caller rebuilds it from the initial model.

    ``logging_dir``: each step's metrics are appended to ``logging_dir/history.jsonl`` as the
    run goes (:class:`rlcourse.engine.RunLog`; a resumed run rewrites it from its checkpoint);
    with ``report_to="tensorboard"`` also as TensorBoard scalars in ``logging_dir/tensorboard``.

    ``eval_fn(policy) -> metrics`` (e.g. :func:`rlcourse.grpo.evaluate_prompts` on held-out
    prompts) runs every ``eval_every`` steps and after the last, its metrics joining that step's
    row; it must not touch the sampling generator (a resumed run would diverge).
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    kl_ctl = config.kl_controller()
    model, bare, order_generator, sample, main = policy, policy, None, sample_fn, True
    if accelerator is not None:
        model, optimizer = accelerator.prepare(policy, optimizer)
        bare = accelerator.unwrap_model(model)
        # The same minibatch order on every process (minibatches are global; each process
        # takes its slice of each), seeded as one process's order always was.
        order_generator = torch.Generator().manual_seed(seed + 1_000_003)

        def sample(_: nn.Module, g: torch.Generator | None) -> dict[str, Tensor]:
            return sample_fn(bare, g)  # generate from the bare model, not the DDP wrapper

        main = accelerator.is_main_process
    history: list[dict[str, float]] = []
    start = 0
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    # refuses a negative warm-up, an unknown decay
    scheduler = rl_lr_schedule(optimizer, warmup_steps, n_steps, lr_decay)
    run_config = {**asdict(config), "n_steps": n_steps, "lr": lr, "seed": seed,
                  "warmup_steps": warmup_steps, "lr_decay": lr_decay}
    if ckpt_dir is not None:
        found = list_checkpoints(ckpt_dir)
        if found:
            device = next(bare.parameters()).device
            state = load_checkpoint(found[-1], bare, optimizer, scheduler, device)
            # (checkpoints written before PPO recorded its settings hold none: not compared)
            check_resumed_settings(found[-1], state.get("config"), run_config, decay=lr_decay)
            generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
            if order_generator is not None:
                order_generator.set_state(torch.tensor(state["order_generators"][
                    accelerator.process_index], dtype=torch.uint8))
            kl_ctl.value = state["kl_coef"]
            history, start = state["history"], state["step"]
            print(f"resuming from {found[-1]} (step {start})")
    runlog = RunLog.to_folder(logging_dir, history, accelerator, report_to)
    steps: Any = range(start, n_steps)
    if progress and main:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="PPO", leave=False, initial=start, total=n_steps)
    for step in steps:
        with stop_nonfinite("PPO", step + 1, ckpt_dir, lr):
            metrics, rollout = ppo_step(model, ref_model, reward_fn, sample, optimizer, config,
                                        kl_ctl, generator, accelerator, order_generator)
            # every step (one isfinite pass, small beside sampling): never sample from, save
            # or return a NaN model
            check_finite_weights(bare, accelerator)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        done = step + 1
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == n_steps):
            metrics.update(eval_fn(bare))
        metrics["step"] = step
        history.append(metrics)
        runlog.flush(history)
        if ckpt_dir is not None and (done == n_steps or (checkpoint_every
                                                         and done % checkpoint_every == 0)):
            state = {"step": done, "history": history, "kl_coef": float(kl_ctl.value),
                     "generator": generator.get_state().tolist(), "config": run_config}
            if order_generator is not None:  # every process's minibatch-order generator
                mine = order_generator.get_state().to(accelerator.device)
                state["order_generators"] = [t.cpu().tolist()
                                             for t in accelerator.gather(mine[None])]
            if main:
                save_checkpoint(ckpt_dir, state, bare, optimizer, scheduler, keep_checkpoints)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        if callback is not None:
            callback(step, metrics, rollout)
    runlog.close()
    if accelerator is not None:
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return history


def config_dict(config: PPOConfig) -> dict[str, Any]:
    """The configuration as a plain dict (for results files)."""
    return asdict(config)
