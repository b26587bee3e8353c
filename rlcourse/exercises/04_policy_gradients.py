"""Exercises of chapter 4, "From values to policies: policy gradients and actor-critic".

Inputs are torch tensors of shape (B, T): B texts, T tokens each, ``rewards[:, t]`` the reward
that follows token ``t``.
"""

from __future__ import annotations

import numpy as np
import torch

from rlcourse import rl
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "04_policy_gradients"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ---- returns to go ------------------------------------------------------------------------------
def _returns(rewards, gamma):
    return rl.discounted_returns(rewards, gamma)


def _returns_cases(rng: np.random.Generator) -> list[Case]:
    end_only = np.zeros((2, 4))
    end_only[:, -1] = [1.0, -2.0]
    return [
        Case((_t([[1.0, 2.0, 3.0]]), 0.5), label="hand example: 1 + .5*2 + .25*3 = 2.75"),
        Case((_t(end_only), 0.9), label="reward only at the end, as for a text"),
        Case((_t(rng.normal(size=(3, 6))), 0.95), label="random rewards"),
        Case((_t(rng.normal(size=(2, 5))), 1.0), label="gamma = 1"),
    ]


def _returns_no_discount(rewards, gamma):
    return torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])


def _returns_forward(rewards, gamma):
    T = rewards.shape[1]
    out = torch.zeros_like(rewards)
    acc = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in range(T):
        acc = gamma * acc + rewards[:, t]
        out[:, t] = acc
    return out


def _returns_exclusive(rewards, gamma):
    G = rl.discounted_returns(rewards, gamma)
    return G - rewards


register(Exercise(
    name="returns_to_go",
    chapter=CHAPTER,
    reference=_returns,
    cases=_returns_cases,
    hint="G_t = r_t + gamma G_{t+1}, from the last token backwards (G after the end is 0).",
    wrong_answers=[
        (_returns_no_discount, "forgot to discount by gamma"),
        (_returns_forward, "accumulated from the start: a return looks forward in time"),
        (_returns_exclusive, "left out the reward of token t itself"),
    ],
))


# ---- REINFORCE ----------------------------------------------------------------------------------
def _reinforce(logprobs, returns, baseline):
    return rl.reinforce_loss(logprobs, returns, baseline=baseline)


def _reinforce_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((_t([[-1.0, -2.0]]), _t([[3.0, 1.0]]), _t([[1.0, 1.0]])),
                  label="hand example: -((3-1)(-1) + (1-1)(-2)) = 2")]
    for B, T in ((4, 3), (2, 6)):
        cases.append(Case((_t(-rng.exponential(size=(B, T))), _t(rng.normal(size=(B, T)) * 2),
                           _t(rng.normal(size=(B, T)))), label=f"{B} texts of {T} tokens"))
    return cases


register(Exercise(
    name="reinforce_loss",
    chapter=CHAPTER,
    reference=_reinforce,
    cases=_reinforce_cases,
    hint="loss = -(1/B) sum_b sum_t (G_t - b_t) log pi(a_t|s_t): sum over the tokens of a text, "
         "mean over texts, and a minus sign because optimisers minimise.",
    wrong_answers=[
        (lambda lp, G, b: ((G - b) * lp).sum(-1).mean(), "wrong sign: we maximise J"),
        (lambda lp, G, b: -(G * lp).sum(-1).mean(), "forgot to subtract the baseline"),
        (lambda lp, G, b: -((G - b) * lp).mean(), "mean over tokens instead of sum per text"),
    ],
))


# ---- the slides' one-step advantage -------------------------------------------------------------
def _advantage(rewards, values, gamma):
    return rl.td_errors(rewards, values, gamma)


def _advantage_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t([[0.0, 0.0, 1.0]]), _t([[0.5, 0.2, 0.8]]), 0.9),
             label="hand example: [-0.32, 0.52, 0.2]"),
        Case((_t(rng.normal(size=(3, 5))), _t(rng.normal(size=(3, 5))), 0.95), label="random"),
        Case((_t(rng.normal(size=(2, 4))), _t(rng.normal(size=(2, 4)) + 3), 1.0),
             label="gamma = 1"),
    ]


def _adv_roll(rewards, values, gamma):
    return rewards + gamma * torch.roll(values, -1, dims=1) - values


def _adv_no_gamma(rewards, values, gamma):
    return rl.td_errors(rewards, values, 1.0)


def _adv_wrong_sign(rewards, values, gamma):
    return -rl.td_errors(rewards, values, gamma)


register(Exercise(
    name="one_step_advantage",
    chapter=CHAPTER,
    reference=_advantage,
    cases=_advantage_cases,
    hint="Adv_t = R_t + gamma V_{t+1} - V_t, and V after the last token is 0 (the text is done).",
    wrong_answers=[
        (_adv_roll, "torch.roll wraps around: the last token must see V = 0, not V_0"),
        (_adv_no_gamma, "forgot gamma in front of V_{t+1}"),
        (_adv_wrong_sign, "sign flipped: V_t - (R_t + gamma V_{t+1})"),
    ],
))


# ---- the score function of a softmax policy -----------------------------------------------------
def _grad_log_softmax(logits, action):
    z = logits.clone().requires_grad_(True)
    torch.log_softmax(z, -1)[action].backward()
    return z.grad.detach()


def _gls_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t([0.0, 0.0, 0.0]), 1), label="uniform over 3: [-1/3, 2/3, -1/3]"),
        Case((_t(rng.normal(size=5) * 2), 3), label="5 tokens"),
        Case((_t(rng.normal(size=4)), 0), label="4 tokens"),
    ]


def _onehot(n, a):
    e = torch.zeros(n, dtype=torch.float64)
    e[a] = 1.0
    return e


register(Exercise(
    name="grad_log_softmax",
    chapter=CHAPTER,
    reference=_grad_log_softmax,
    cases=_gls_cases,
    hint="d/dz_j log softmax(z)_a = 1[j = a] - softmax(z)_j.",
    wrong_answers=[
        (lambda z, a: torch.softmax(z, -1) - _onehot(len(z), a), "sign flipped"),
        (lambda z, a: _onehot(len(z), a) - z, "subtracted the logits, not the probabilities"),
        (lambda z, a: _onehot(len(z), a) * (1 - torch.softmax(z, -1)),
         "only the diagonal term: every logit moves, not only the chosen one"),
    ],
))
