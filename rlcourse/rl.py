"""Reinforcement-learning math for language models (layer 1): torch, vectorised, masked.

Every function works on per-token tensors of shape ``(B, T)``: ``B`` responses, ``T`` positions.
Index convention (as in :mod:`rlcourse.mdp.returns` and the slides): position ``t`` is the
action ``A_t`` (the ``t``-th response token) taken in state ``S_t`` (the text so far);
``rewards[:, t]`` is the reward that follows it and ``values[:, t]`` is ``V(S_t)``, the value of
the state *before* the token was chosen.

``mask[:, t] = 1`` marks real response tokens, ``0`` padding (prompt or after the end). In every
row the ones form one contiguous block (left- or right-padded); the state after the last real
token is terminal, so its value is 0. Masked positions of every output are 0.

Contents: returns, TD errors and GAE (a plain loop and a vectorised form); the KL estimators
``k1``, ``k2``, ``k3``; the slides' KL-shaped reward; the slides' actor and critic losses; PPO's
clipped policy and value losses; masked statistics; KL-coefficient controllers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "discounted_cumsum",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "gae_loop",
    "k1",
    "k2",
    "k3",
    "kl_shaped_rewards",
    "last_token_index",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "next_values",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_loss",
    "slides_actor_loss",
    "slides_critic_loss",
    "td_errors",
]


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------
def _mask_like(x: Tensor, mask: Tensor | None) -> Tensor:
    """``mask`` as a float tensor like ``x`` (all ones when ``mask`` is None)."""
    if mask is None:
        return torch.ones_like(x)
    if mask.shape != x.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(x.shape)}")
    return mask.to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Mean over the real tokens: ``sum(x * m) / sum(m)`` (over ``dim``, or over everything).

    An all-masked input gives 0, not NaN (the denominator is clamped at 1).
    """
    m = _mask_like(x, mask)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance over the real tokens, ``sum(m (x - mean)^2) / (n - 1)`` (``/ n`` if not unbiased).

    The unbiased form (Bessel's correction) is what TRL uses for whitening.
    """
    m = _mask_like(x, mask)
    mean = masked_mean(x, m)
    n = m.sum()
    var = ((x - mean) ** 2 * m).sum() / n.clamp_min(1.0)
    if unbiased:
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True,
                  eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and variance over the real tokens.

    ``shift_mean=False`` only rescales (adds the mean back). Masked positions come out 0.
    """
    m = _mask_like(x, mask)
    mean, var = masked_mean(x, m), masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def explained_variance(predicted: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """``1 - Var[target - predicted] / Var[target]`` over the real tokens.

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse.
    """
    var_target = masked_var(target, mask, unbiased=False)
    var_error = masked_var(target - predicted, mask, unbiased=False)
    return 1.0 - var_error / var_target.clamp_min(1e-12)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution at every position: ``H = -sum_a p_a log p_a``.

    ``logits``: (..., V) -> (...). Computed as ``logsumexp(z) - sum_a p_a z_a`` (stable).
    """
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# --------------------------------------------------------------------------------------------
# returns, TD errors, GAE
# --------------------------------------------------------------------------------------------
def next_values(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """``V_{t+1}`` at every position: the value one step later, 0 after the last real token.

    ``values``: (B, T) -> (B, T). The state after the final token is terminal, so its value is 0
    (the response is over; nothing more will be earned).
    """
    m = _mask_like(values, mask)
    v = values * m
    nxt = torch.zeros_like(v)
    nxt[:, :-1] = v[:, 1:]
    return nxt


def discounted_cumsum(x: Tensor, discount: float, mask: Tensor | None = None) -> Tensor:
    """``y_t = sum_{l >= 0} discount^l x_{t+l}`` over the real tokens, for every ``t`` at once.

    Vectorised as one matrix product ``y = x D^T`` with ``D[t, s] = discount^(s - t)`` for
    ``s >= t`` (0 below the diagonal). Masked entries of ``x`` count as 0 and masked outputs are
    0. O(T^2) memory, fine for responses of up to a few thousand tokens.
    """
    m = _mask_like(x, mask)
    T = x.shape[-1]
    idx = torch.arange(T, device=x.device)
    lag = idx[None, :] - idx[:, None]  # lag[t, s] = s - t
    powers = torch.tensor(float(discount), dtype=x.dtype, device=x.device) ** lag.clamp_min(0)
    D = torch.where(lag >= 0, powers, torch.zeros((), dtype=x.dtype, device=x.device))
    return ((x * m) @ D.T) * m


def discounted_returns(rewards: Tensor, gamma: float, mask: Tensor | None = None) -> Tensor:
    """Returns ``G_t = r_t + gamma r_{t+1} + gamma^2 r_{t+2} + ... = sum_l gamma^l r_{t+l}``.

    ``rewards[:, t]`` is the reward after token ``t`` (the slides' ``R_{t+1}``); (B, T) -> (B, T).
    """
    return discounted_cumsum(rewards, gamma, mask)


def td_errors(rewards: Tensor, values: Tensor, gamma: float, mask: Tensor | None = None
              ) -> Tensor:
    """One-step TD errors ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` after the end is 0).

    This is the slides' advantage ``Adv_t = R_t + gamma V_{t+1} - V_t``. (B, T) -> (B, T).
    """
    m = _mask_like(rewards, mask)
    return (rewards + gamma * next_values(values, m) - values) * m


def gae(rewards: Tensor, values: Tensor, gamma: float = 1.0, lam: float = 0.95,
        mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016), vectorised.

    ``A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}``, ``delta_t = r_t + gamma V_{t+1} - V_t``,
    equivalently ``A_t = delta_t + gamma lam A_{t+1}``; the critic's targets (returns) are
    ``R_t = A_t + V_t``. ``lam = 0`` gives the one-step TD advantage of the slides; ``lam = 1``
    gives ``G_t - V_t`` (Monte Carlo return minus baseline).

    ``rewards``, ``values``, ``mask``: (B, T). Returns ``(advantages, returns)``, both (B, T),
    0 at masked positions. No gradient flows through either (they are targets).
    """
    with torch.no_grad():
        m = _mask_like(rewards, mask)
        deltas = td_errors(rewards, values, gamma, m)
        advantages = discounted_cumsum(deltas, gamma * lam, m)
        returns = (advantages + values) * m
    return advantages, returns


def gae_loop(rewards: Tensor, values: Tensor, gamma: float = 1.0, lam: float = 0.95,
             mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GAE written as the plain backward recursion, one response and one token at a time.

    For every row, walking the real tokens from the last to the first::

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last real token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A after the last real token = 0)
        R_t     = A_t + V_t

    Slow and obviously correct: the reference the vectorised :func:`gae` is tested against.
    """
    m = _mask_like(rewards, mask)
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for b in range(B):
        positions = [t for t in range(T) if m[b, t] > 0]
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(positions):
            r, v = float(rewards[b, t]), float(values[b, t])
            delta = r + gamma * next_value - v
            a = delta + gamma * lam * next_advantage
            advantages[b, t], returns[b, t] = a, a + v
            next_value, next_advantage = v, a
    return advantages, returns


# --------------------------------------------------------------------------------------------
# KL estimators and the KL-shaped reward
# --------------------------------------------------------------------------------------------
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k1 = -log r = log pi(a|s) - log pi_ref(a|s)``, with ``log r = log pi_ref - log pi``.

    Unbiased for ``KL(pi || pi_ref)`` when ``a ~ pi``, but a single sample can be negative.
    """
    return logprobs - ref_logprobs


def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k2 = (log r)^2 / 2``: always >= 0, biased, low variance (Schulman's "Approximating KL")."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k3 = (r - 1) - log r`` with ``log r = log pi_ref - log pi``: always >= 0.

    Its *value* is unbiased: for ``a ~ pi``, ``E[k3] = KL(pi || pi_ref)`` (``E[r] = 1``). Its
    *gradient* is not that of this KL. Used as a loss on samples from ``pi_theta`` (as GRPO does,
    the sampling not differentiated), ``grad k3 = (1 - r) grad log pi_theta(a)``, whose mean is
    ``-E_{pi_ref}[grad log pi_theta] = grad KL(pi_ref || pi_theta)``: the KL in the *other*
    direction, while ``grad KL(pi_theta || pi_ref) = E_{pi_theta}[-log r grad log pi_theta]``.
    The two agree only to first order near ``pi_theta = pi_ref``. ``tests/test_rl.py`` checks
    both by Monte Carlo on a small categorical.

    Computed as ``expm1(x) - x`` with ``x = log r``; for ``|x| < 1e-2`` the series
    ``x^2/2 + x^3/6 + x^4/24 + x^5/120`` is used, because ``exp(x) - 1 - x`` loses every digit
    to cancellation when ``x`` is small (the usual case: the policy is close to the reference).
    """
    x = ref_logprobs - logprobs
    series = x * x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x / 120.0)))
    direct = torch.expm1(x) - x
    return torch.where(x.abs() < 1e-2, series, direct).clamp_min(0.0)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real (mask 1) token of every row of ``mask`` (B, T) -> (B,).

    ``max_t { t : mask[b, t] = 1 }``, a scan over positions, so it is right for left, right and
    both-sided padding alike (``mask.sum(-1) - 1`` is right only for right padding and a mask
    that starts at column 0). A row without any real token gets 0, never ``T - 1``: a padding
    position there would silently score or reward padding.
    """
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).amax(-1)


def kl_shaped_rewards(logprobs: Tensor, ref_logprobs: Tensor, score: Tensor,
                      mask: Tensor | None = None, kl_coef: float = 0.1,
                      clip_score: float | None = None) -> Tensor:
    """The slides' per-token reward (DeepSpeed-Chat's formulation).

    ::

        R_t = -kl_ctl * log(P(A_t|S_t) / P_ref(A_t|S_t))                 t != T
        R_t = -kl_ctl * log(P(A_t|S_t) / P_ref(A_t|S_t)) + clip(score)   t == T

    where ``T`` is the last real token of each response and ``score`` the reward model's scalar
    for the whole prompt + response, clipped to ``[-clip_score, clip_score]`` if given.

    ``logprobs``, ``ref_logprobs``, ``mask``: (B, T); ``score``: (B,). Returns (B, T), 0 at
    masked positions. Rows with no real token get no score (there is no token to carry it).
    """
    m = _mask_like(logprobs, mask)
    rewards = -kl_coef * k1(logprobs, ref_logprobs) * m
    score = score.to(rewards.dtype)
    if clip_score is not None:
        score = score.clamp(-clip_score, clip_score)
    last = last_token_index(m)
    has_token = (m.sum(-1) > 0).to(rewards.dtype)
    # Add the score at (b, last[b]) only; scatter_add keeps the KL term already there.
    rewards = rewards.scatter_add(1, last[:, None], (score * has_token)[:, None])
    return rewards


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def reinforce_loss(logprobs: Tensor, returns: Tensor, mask: Tensor | None = None,
                   baseline: Tensor | float | None = None) -> Tensor:
    """REINFORCE (Williams, 1992), with an optional baseline ``b``:

    ``L = -(1/B) sum_b sum_t (G_t - b_t) log pi(a_t|s_t)``, so that
    ``-grad L = (1/B) sum_b sum_t (G_t - b_t) grad log pi(a_t|s_t)`` is an unbiased estimate of
    the policy gradient ``grad J = E[sum_t G_t grad log pi(a_t|s_t)]`` for any baseline that
    does not depend on the action ``a_t`` (it only changes the variance).

    That holds for ``gamma = 1`` only. ``returns`` is the reward-to-go ``G_t`` (the rewards
    before ``t`` dropped: they do not depend on ``a_t``; the whole return ``G_0`` at every ``t``
    is also unbiased, with more variance). With discounting, the gradient of
    ``J = E[G_0]`` is ``E[sum_t gamma^t G_t grad log pi(a_t|s_t)]``; this loss drops the
    ``gamma^t``, as REINFORCE and PPO do in practice, and follows a slightly different
    direction (Thomas, 2014).

    Tokens are summed per response (the return of one text), then averaged over responses.
    """
    m = _mask_like(logprobs, mask)
    weight = returns.detach()
    if baseline is not None:
        weight = weight - (baseline.detach() if isinstance(baseline, Tensor) else baseline)
    return -(weight * logprobs * m).sum(-1).mean()


def slides_actor_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None
                      ) -> Tensor:
    """The slides' actor loss ``-Adv_t log P(A_t|S_t)``, averaged over the real tokens.

    The advantage is a constant (detached): only ``log P`` carries the gradient, so the update
    raises the probability of tokens that did better than the critic expected.
    """
    return masked_mean(-advantages.detach() * logprobs, mask)


def slides_critic_loss(values: Tensor, rewards: Tensor, gamma: float = 1.0,
                       mask: Tensor | None = None) -> Tensor:
    """The slides' critic loss ``(R_t + gamma V_{t+1} - V_t)^2``, averaged over the real tokens.

    The target ``R_t + gamma V_{t+1}`` (reward now, plus the critic's own discounted estimate
    of what follows) is held fixed; only ``V_t`` receives gradient.
    """
    m = _mask_like(values, mask)
    target = (rewards + gamma * next_values(values, m)).detach()
    return masked_mean((target - values) ** 2, m)


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                    mask: Tensor | None = None, clip_eps: float | None = 0.2
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al., 2017), masked mean over the real tokens.

    ``rho_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))``,
    ``loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))``.

    ``clip_eps=None`` disables clipping (the loss is then ``-A rho``, whose gradient at
    ``rho = 1`` equals that of the slides' ``-A log P``). Returns the loss and metrics:
    ``clip_frac`` (share of tokens where the clipped term is the larger one, so the token gives
    no gradient) and ``approx_kl`` (``mean (log rho)^2 / 2``, the ``k2`` estimate of the
    KL between the old and the new policy, as in TRL).
    """
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    if clip_eps is None:
        losses = unclipped
        clipped_more = torch.zeros_like(unclipped)
    else:
        clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        losses = torch.maximum(unclipped, clipped)
        clipped_more = (clipped > unclipped).to(unclipped.dtype)
    loss = masked_mean(losses, mask)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clipped_more, mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, metrics


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor,
                   mask: Tensor | None = None, clip_eps_v: float | None = 0.2
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, ``0.5 * mean_t max((V_t - R_t)^2, (V^clip_t - R_t)^2)``.

    ``V^clip_t = clip(V_t, V^old_t - eps_v, V^old_t + eps_v)`` keeps the critic from moving far
    from the values it had when the batch was collected. ``clip_eps_v=None``: plain
    ``0.5 * mean (V - R)^2``. Returns the loss and ``{"vf_clip_frac": ...}``.
    """
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns) ** 2
    if clip_eps_v is None:
        losses = unclipped
        clipped_more = torch.zeros_like(unclipped)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip_eps_v, clip_eps_v)
        clipped = (v_clipped - returns) ** 2
        losses = torch.maximum(unclipped, clipped)
        clipped_more = (clipped > unclipped).to(unclipped.dtype)
    loss = 0.5 * masked_mean(losses, mask)
    with torch.no_grad():
        metrics = {"vf_clip_frac": masked_mean(clipped_more, mask)}
    return loss, metrics


# --------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------
@dataclass
class FixedKLController:
    """A constant KL coefficient ``beta`` (DeepSpeed-Chat's ``kl_ctl``, default 0.1)."""

    value: float = 0.1

    def update(self, current_kl: float, n_steps: int) -> float:
        """Nothing changes; returns ``beta``."""
        return self.value


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): steer the KL to a target by adapting ``beta``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta (1 + e * n_steps / horizon)``.
    Defaults from the paper and TRL: ``beta = 0.2``, ``target = 6``, ``horizon = 10000``.
    """

    value: float = 0.2
    target: float = 6.0
    horizon: float = 10000.0

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one update after ``n_steps`` samples whose mean KL was ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

