"""Exercises of chapter 1, "Why reinforcement learning for language models"."""

from __future__ import annotations

import numpy as np

from rlcourse import bandit
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "01_why_rl"


def _logit_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((rng.normal(size=n) * 2,), label=f"{n} answers") for n in (2, 3, 6)]
    cases.append(Case((np.array([1000.0, 1001.0, 999.0]),), label="huge logits"))
    cases.append(Case((np.array([-5.0, -5.0, -5.0, -5.0]),), label="all equal"))
    return cases


def _naive_softmax(z):
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the mistake shown
        e = np.exp(np.asarray(z, dtype=float))
        return e / e.sum()


register(Exercise(
    name="softmax",
    chapter=CHAPTER,
    reference=bandit.softmax,
    cases=_logit_cases,
    hint="pi(y) = exp(z_y - m) / sum_j exp(z_j - m) with m = max_j z_j; subtracting m changes "
         "nothing mathematically but keeps exp from overflowing.",
    wrong_answers=[
        (_naive_softmax, "exp overflows for large logits: subtract the maximum first"),
        (lambda z: np.exp(z - np.max(z)), "forgot to divide by the sum (not a distribution)"),
        (lambda z: (np.asarray(z) - np.min(z)) / np.sum(np.asarray(z) - np.min(z)),
         "normalised the logits instead of their exponentials"),
    ],
))


def _grad_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for n in (2, 4, 6):
        cases.append(Case((rng.normal(size=n), int(rng.integers(n))), label=f"{n} answers"))
    cases.append(Case((np.zeros(3), 1), label="uniform policy"))
    return cases


register(Exercise(
    name="log_prob_grad",
    chapter=CHAPTER,
    reference=bandit.log_prob_grad,
    cases=_grad_cases,
    hint="d log pi(y) / d z_j = [j == y] - pi(j): the target logit goes up by 1 - pi(y), every "
         "other logit down by its own probability.",
    wrong_answers=[
        (lambda z, y: bandit.softmax(z) - np.eye(len(z))[y],
         "sign flipped: that is the gradient of -log pi(y), the loss"),
        (lambda z, y: np.eye(len(z))[y], "forgot the -pi term coming from the normaliser"),
        (lambda z, y: np.eye(len(z))[y] * (1 - bandit.softmax(z)[y]),
         "only the target logit moves here; the others must go down by pi(j)"),
    ],
))


def _pair_grad(logits, w, l, beta):
    return bandit.preference_grad(logits, np.array([w]), np.array([l]), beta)


def _pair_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for n, beta in ((3, 1.0), (5, 0.1), (6, 2.5)):
        w, l = rng.choice(n, size=2, replace=False)
        cases.append(Case((rng.normal(size=n) * 2, int(w), int(l), beta), label=f"beta={beta}"))
    cases.append(Case((np.zeros(4), 0, 3, 1.0), label="equal logits"))
    return cases


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _pair_no_weight(z, w, l, beta):
    g = np.zeros(len(z))
    g[w], g[l] = -beta, beta
    return g


def _pair_wrong_sigmoid(z, w, l, beta):
    g = np.zeros(len(z))
    s = beta * _sigmoid(beta * (z[w] - z[l]))
    g[w], g[l] = -s, s
    return g


def _pair_wrong_sign(z, w, l, beta):
    return -_pair_grad(z, w, l, beta)


register(Exercise(
    name="pair_preference_grad",
    chapter=CHAPTER,
    reference=_pair_grad,
    cases=_pair_cases,
    hint="loss = -log sigma(beta (z_w - z_l)); d/dx [-log sigma(x)] = -sigma(-x). Only z_w and "
         "z_l move: z_w gets -beta sigma(-beta h), z_l gets +beta sigma(-beta h).",
    wrong_answers=[
        (_pair_no_weight, "forgot the sigma(-beta h) factor: the push never fades"),
        (_pair_wrong_sigmoid, "used sigma(beta h) instead of sigma(-beta h)"),
        (_pair_wrong_sign, "sign flipped: this is the ascent direction, not the loss gradient"),
    ],
))


def _reward_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((rng.normal(size=n), rng.normal(size=n)), label=f"{n} answers")
             for n in (2, 4, 6)]
    cases.append(Case((np.zeros(3), np.array([1.0, 1.0, 1.0])), label="constant reward"))
    return cases


register(Exercise(
    name="expected_reward_grad",
    chapter=CHAPTER,
    reference=bandit.expected_reward_grad,
    cases=_reward_cases,
    hint="J = sum_y pi(y) r(y); dJ/dz = sum_y pi(y) r(y) (onehot(y) - pi) = pi * (r - J).",
    wrong_answers=[
        (lambda z, r: bandit.softmax(z) * r, "forgot to subtract the average reward J"),
        (lambda z, r: r - bandit.softmax(z) @ r, "forgot to weight by pi(y)"),
        (lambda z, r: bandit.softmax(z) * (r - np.mean(r)),
         "subtracted the plain mean of r instead of the expectation under pi"),
    ],
))
