"""Exercises of chapter 8, "PPO".

Per-token tensors have shape (B, T); ``mask`` is 1 on response tokens (one contiguous block per
row) and the state after the last response token is terminal.
"""

from __future__ import annotations

import numpy as np
import torch

from rlcourse import rl
from rlcourse.exercises import Case, Exercise, register
from rlcourse.exercises.solutions import _token_logprobs, ppo_iteration

CHAPTER = "08_ppo"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _masks(rng: np.random.Generator, B: int, T: int) -> torch.Tensor:
    m = np.zeros((B, T))
    for b in range(B):
        n = int(rng.integers(1, T + 1))
        m[b, :n] = 1  # right padding, lengths 1 .. T
    return _t(m)


# ---- the slides' KL-shaped reward --------------------------------------------------------------
def _kl_reward(logprobs, ref_logprobs, score, mask, kl_coef, clip_score):
    return rl.kl_shaped_rewards(logprobs, ref_logprobs, score, mask, kl_coef, clip_score)


def _prompt_masks(rng: np.random.Generator, B: int, T: int) -> torch.Tensor:
    """Response masks as PPO builds them over prompt + response: zeros over the prompt (length
    1 .. T-2), then the response block, then right padding."""
    m = np.zeros((B, T))
    for b in range(B):
        start = int(rng.integers(1, T - 1))
        m[b, start:int(rng.integers(start + 1, T + 1))] = 1
    return _t(m)


def _klr_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((_t([[-1.0, -2.0, -3.0]]), _t([[-1.5, -2.0, -2.0]]), _t([2.0]),
                   _t([[1, 1, 1]]), 0.1, 5.0), label="hand example: [-0.05, 0, 2.1]")]
    for B, T in ((3, 5), (4, 6)):
        cases.append(Case((_t(-rng.exponential(size=(B, T))), _t(-rng.exponential(size=(B, T))),
                           _t(rng.normal(size=B) * 6), _masks(rng, B, T), 0.2, 5.0),
                          label=f"{B} responses of different lengths, scores beyond the clip"))
    cases.append(Case((_t([[-0.3, -1.0, -2.0, -3.0, -0.1]]), _t([[-0.2, -1.5, -2.0, -2.0, -0.4]]),
                       _t([2.0]), _t([[0, 1, 1, 1, 0]]), 0.1, 5.0),
                      label="hand example after a one-token prompt: [0, -0.05, 0, 2.1, 0]"))
    B, T = 4, 8
    cases.append(Case((_t(-rng.exponential(size=(B, T))), _t(-rng.exponential(size=(B, T))),
                       _t(rng.normal(size=B) * 3), _prompt_masks(rng, B, T), 0.2, 5.0),
                      label="masks that start after the prompt, as in PPO"))
    return cases


def _klr_wrong_sign(lp, ref, score, mask, kl, clip):
    return rl.kl_shaped_rewards(ref, lp, score, mask, kl, clip)


def _klr_last_column(lp, ref, score, mask, kl, clip):
    r = -kl * (lp - ref) * mask
    r[:, -1] += score.clamp(-clip, clip)
    return r


def _klr_count_index(lp, ref, score, mask, kl, clip):
    r = -kl * (lp - ref) * mask
    last = (mask.sum(-1) - 1).long()
    r[torch.arange(r.shape[0]), last] += score.clamp(-clip, clip)
    return r


def _klr_no_clip(lp, ref, score, mask, kl, clip):
    return rl.kl_shaped_rewards(lp, ref, score, mask, kl, None)


register(Exercise(
    name="kl_shaped_rewards",
    chapter=CHAPTER,
    reference=_kl_reward,
    cases=_klr_cases,
    hint="R_t = -kl_coef (log pi - log pi_ref) on every response token; add clip(score, "
         "-clip_score, clip_score) at the LAST real token of each row; padding stays 0.",
    wrong_answers=[
        (_klr_wrong_sign, "log(pi_ref/pi) instead of log(pi/pi_ref): the penalty becomes a bonus"),
        (_klr_last_column, "added the score in the last column, which may be padding"),
        (_klr_count_index, "mask.sum(-1) - 1 is the last response token only when the mask starts "
                           "at column 0; PPO's masks start after the prompt"),
        (_klr_no_clip, "forgot to clip the score"),
    ],
))


# ---- GAE advantages ----------------------------------------------------------------------------
def _gae_adv(rewards, values, mask, gamma, lam):
    return rl.gae(rewards, values, gamma, lam, mask)[0]


def _gae_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((_t([[0.0, 0.0, 1.0]]), _t([[0.5, 0.2, 0.8]]), _t([[1, 1, 1]]), 0.9, 0.0),
                  label="lambda = 0: the slides' Adv_t")]
    for B, T, gamma, lam in ((3, 5, 1.0, 0.95), (2, 6, 0.9, 0.5)):
        cases.append(Case((_t(rng.normal(size=(B, T))), _t(rng.normal(size=(B, T))),
                           _masks(rng, B, T), gamma, lam),
                          label=f"gamma {gamma}, lambda {lam}, right padding"))
    return cases


def _gae_no_lambda(r, v, m, gamma, lam):
    return rl.gae(r, v, gamma, 1.0, m)[0]


def _gae_returns(r, v, m, gamma, lam):
    return rl.gae(r, v, gamma, lam, m)[1]


def _gae_bootstrap_pad(r, v, m, gamma, lam):
    return rl.gae(r * m, v, gamma, lam, None)[0] * m


register(Exercise(
    name="gae_advantages",
    chapter=CHAPTER,
    reference=_gae_adv,
    cases=_gae_cases,
    hint="delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last real token); then from the "
         "end A_t = delta_t + gamma lam A_{t+1}; 0 on padding.",
    wrong_answers=[
        (_gae_no_lambda, "used gamma alone as the decay of A: the decay is gamma * lambda"),
        (_gae_returns, "returned the returns A + V, not the advantages"),
        (_gae_bootstrap_pad, "bootstrapped from the values of padding positions"),
    ],
))


# ---- the clipped surrogate ---------------------------------------------------------------------
def _clip_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    return rl.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)[0]


def _clip_cases(rng: np.random.Generator) -> list[Case]:
    ratio = _t([[1.5, 0.5, 0.5, 1.5]])
    cases = [Case((ratio.log(), torch.zeros(1, 4, dtype=torch.float64),
                   _t([[1.0, -1.0, 1.0, -1.0]]), _t([[1, 1, 1, 1]]), 0.2),
                  label="hand example: both clipping sides -> 0.15")]
    for B, T in ((3, 5), (2, 7)):
        old = _t(-rng.exponential(size=(B, T)))
        cases.append(Case((old + _t(rng.normal(size=(B, T)) * 0.4), old,
                           _t(rng.normal(size=(B, T))), _masks(rng, B, T), 0.2),
                          label=f"{B} responses, ratios around 1"))
    return cases


def _clip_min(lp, old, adv, mask, eps):
    rho = torch.exp(lp - old)
    losses = torch.minimum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))
    return rl.masked_mean(losses, mask)


def _clip_no_clip(lp, old, adv, mask, eps):
    return rl.masked_mean(-adv * torch.exp(lp - old), mask)


def _clip_unmasked(lp, old, adv, mask, eps):
    return rl.ppo_policy_loss(lp, old, adv, None, eps)[0]


register(Exercise(
    name="ppo_clip_loss",
    chapter=CHAPTER,
    reference=_clip_loss,
    cases=_clip_cases,
    hint="rho = exp(logp - old_logp); per token max(-A rho, -A clip(rho, 1-eps, 1+eps)); "
         "masked mean over response tokens.",
    wrong_answers=[
        (_clip_min, "min of the LOSSES is the optimistic bound: PPO takes the pessimistic max"),
        (_clip_no_clip, "no clipping"),
        (_clip_unmasked, "averaged over padding too"),
    ],
))


# ---- k3 ----------------------------------------------------------------------------------------
def _k3(logprobs, ref_logprobs):
    return rl.k3(logprobs, ref_logprobs)


def _k3_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t([np.log(0.5)]), _t([np.log(0.25)])), label="hand example: ln 2 - 1/2"),
        Case((_t(-rng.exponential(size=6)), _t(-rng.exponential(size=6))), label="random"),
        Case((_t([-1.0, -2.0]), _t([-1.0 + 1e-6, -2.0 - 3e-7])), label="nearly equal"),
    ]


register(Exercise(
    name="k3_estimator",
    chapter=CHAPTER,
    reference=_k3,
    cases=_k3_cases,
    hint="log r = log pi_ref - log pi; k3 = (r - 1) - log r = expm1(log r) - log r.",
    wrong_answers=[
        (lambda lp, ref: torch.expm1(lp - ref) - (lp - ref), "log r has the wrong sign"),
        (lambda lp, ref: lp - ref, "that is k1"),
        (lambda lp, ref: 0.5 * (ref - lp) ** 2, "that is k2"),
    ],
))


# ---- build it yourself: one PPO iteration, graded on the exact optimum -------------------------
PPO_ITERATIONS, PPO_LR, PPO_BAR = 30, 0.1, 0.9


def grade_ppo_iteration(fn) -> tuple[bool, str]:
    """Train a tabular policy on the token MDP (3 tokens, 5 positions, 3 prompts, the
    "instructed" judge) with ``PPO_ITERATIONS`` calls of ``fn`` (Adam, lr ``PPO_LR``, seed 0).

    Passes when the exact expected return of the final policy reaches ``PPO_BAR`` of the exact
    optimum (the prefix-tree sweep of chapter 5; the solution reaches about 0.99).
    """
    from rlcourse.ppo import freeze
    from rlcourse.worlds.token_mdp import PrefixPolicy, TokenMDP

    world = TokenMDP(n_tokens=3, horizon=5, reward="instructed", n_prompts=3)
    torch.manual_seed(0)
    policy = PrefixPolicy(world, "tabular")
    reference = freeze(PrefixPolicy(world, "tabular"))  # the uniform policy
    optimizer = torch.optim.Adam(policy.parameters(), lr=PPO_LR)
    generator = torch.Generator().manual_seed(0)
    optimum = world.optimal_return()
    start = world.evaluate(policy).root / optimum
    for _ in range(PPO_ITERATIONS):
        fn(policy, reference, optimizer, world, generator)
    reached = world.evaluate(policy).root / optimum
    report = (f"exact return / optimum after {PPO_ITERATIONS} iterations: {reached:.3f} "
              f"(uniform start {start:.3f}; the bar is {PPO_BAR}, optimum {optimum:.3f})")
    return reached >= PPO_BAR, report


def _ppo_wrong(variant: str):
    def iteration(policy, reference, optimizer, world, generator, batch_size=64, kl_coef=0.02,
                  clip_eps=0.2, lam=0.95, epochs=4):
        batch = world.rollout(policy, batch_size, generator)
        ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].float()
        with torch.no_grad():
            logits, values = policy(ids)
            old = _token_logprobs(logits, ids)
            ref = _token_logprobs(reference(ids)[0], ids)
            values = values[:, :-1]
            rewards = -kl_coef * (old - ref) * mask
            if variant == "score_first":
                rewards[:, 0] += batch["rewards"]
            else:
                rewards = rl.kl_shaped_rewards(old, ref, batch["rewards"], mask, kl_coef)
            if variant == "rewards_as_advantages":
                advantages, returns = rewards, rewards
            else:
                advantages, returns = rl.gae(rewards, values, 1.0, lam, mask)
            advantages = rl.masked_whiten(advantages, mask)
        for _ in range(epochs):
            logits, v = policy(ids)
            pl, _ = rl.ppo_policy_loss(_token_logprobs(logits, ids), old, advantages, mask,
                                       clip_eps)
            if variant == "ascent_sign":
                pl = -pl
            loss = pl + 0.5 * rl.ppo_value_loss(v[:, :-1], values, returns, mask, 0.2)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float(batch["rewards"].mean())

    return iteration


register(Exercise(
    name="ppo_iteration",
    chapter=CHAPTER,
    reference=ppo_iteration,
    solution=ppo_iteration,
    cases=lambda rng: [],
    grade=grade_ppo_iteration,
    hint="world.rollout(policy, 64, generator) gives input_ids, completion_mask and the judge's "
         "rewards; under no_grad: old and reference log-probs (log_softmax of logits[:, :-1] "
         "gathered at ids[:, 1:]), old values[:, :-1], rl.kl_shaped_rewards, rl.gae, "
         "rl.masked_whiten; then a few epochs of rl.ppo_policy_loss + 0.5 rl.ppo_value_loss, "
         "optimizer.zero_grad(), backward, step.",
    wrong_answers=[
        (_ppo_wrong("ascent_sign"), "minimised +A rho: the policy learns to do worse"),
        (_ppo_wrong("score_first"), "the score added at the first response token, not the last"),
        (_ppo_wrong("rewards_as_advantages"),
         "used the per-token rewards as advantages: only the last token sees the score"),
    ],
))
