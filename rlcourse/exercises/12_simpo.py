"""Exercises of chapter 12, "SimPO": the length-normalised reward, the margin and the loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rlcourse import losses
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "12_simpo"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


def _pairs(rng: np.random.Generator, n: int = 8):
    lc = _t(rng.integers(3, 40, n))
    lr = _t(rng.integers(3, 40, n))
    return -_t(rng.uniform(0.2, 3.0, n)) * lc, -_t(rng.uniform(0.2, 3.0, n)) * lr, lc, lr


# ---- length-normalised reward -----------------------------------------------------------------
def _reward_cases(rng: np.random.Generator) -> list[Case]:
    pc, _, lc, _ = _pairs(rng)
    return [
        Case((pc, lc, 2.0), label="beta = 2"),
        Case((pc, lc, 10.0), label="beta = 10"),
        Case((_t([-12.0, -12.0]), _t([3.0, 12.0]), 1.0), label="same log-prob, other lengths"),
    ]


register(Exercise(
    name="simpo_reward",
    chapter=CHAPTER,
    reference=lambda logps, lengths, beta: losses.implicit_rewards(logps, None, beta, lengths),
    cases=_reward_cases,
    hint="SimPO's reward is beta times the MEAN token log-prob: beta * log pi(y|x) / |y|.",
    wrong_answers=[
        (lambda logps, lengths, beta: logps / lengths, "forgot beta"),
        (lambda logps, lengths, beta: beta * logps, "forgot to divide by the length"),
        (lambda logps, lengths, beta: beta * logps / (lengths + 1), "divided by |y| + 1"),
        (lambda logps, lengths, beta: beta * logps / (lengths - 1),
         "left the EOS token out of |y|: the lengths given already count it"),
    ],
))


# ---- the SimPO loss ---------------------------------------------------------------------------
def _simpo_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, lc, lr = _pairs(rng)
    return [
        Case((pc, pr, lc, lr, 2.0, 1.0), label="beta 2, gamma 1"),
        Case((pc, pr, lc, lr, 2.5, 0.0), label="gamma = 0"),
        Case((pc, pr, lc, lr, 10.0, 5.0), label="beta 10, gamma 5"),
    ]


def _simpo_gamma_inside(pc, pr, lc, lr, beta, gamma):
    return -F.logsigmoid(beta * (pc / lc - pr / lr - gamma))


register(Exercise(
    name="simpo_loss",
    chapter=CHAPTER,
    reference=lambda pc, pr, lc, lr, beta, gamma: losses.simpo_loss(pc, pr, lc, lr, beta=beta,
                                                                    gamma=gamma),
    cases=_simpo_cases,
    hint="-log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), gamma an "
         "absolute margin.",
    wrong_answers=[
        (lambda pc, pr, lc, lr, beta, gamma: -F.logsigmoid(beta * (pc - pr) - gamma),
         "no length normalisation (the 'w/o LN' ablation)"),
        (lambda pc, pr, lc, lr, beta, gamma: -F.logsigmoid(beta * (pc / lc - pr / lr) + gamma),
         "added the margin: the chosen reward must exceed the rejected one BY gamma"),
        (_simpo_gamma_inside, "multiplied gamma by beta (the authors' scripts pass gamma/beta)"),
    ],
))


# ---- how often is the margin met? -------------------------------------------------------------
def _margin_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, lc, lr = _pairs(rng, 16)
    return [
        Case((pc, pr, lc, lr, 2.0, 1.0), label="beta 2, gamma 1"),
        Case((pc, pr, lc, lr, 2.0, 0.0), label="gamma 0: plain accuracy"),
        Case((pc, pr, lc, lr, 5.0, 3.0), label="beta 5, gamma 3"),
    ]


def _margin_met(pc, pr, lc, lr, beta, gamma):
    margin = losses.implicit_rewards(pc, None, beta, lc) - losses.implicit_rewards(
        pr, None, beta, lr)
    return (margin > gamma).double().mean()


register(Exercise(
    name="simpo_margin_met",
    chapter=CHAPTER,
    reference=_margin_met,
    cases=_margin_cases,
    hint="The fraction of pairs whose reward margin beta (l_w - l_l) (mean log-probs) is larger "
         "than gamma; return a 0-d tensor.",
    wrong_answers=[
        (lambda pc, pr, lc, lr, beta, gamma: (beta * (pc / lc - pr / lr) > 0).double().mean(),
         "compared with 0, not with gamma"),
        (lambda pc, pr, lc, lr, beta, gamma: (beta * (pc - pr) > gamma).double().mean(),
         "used summed log-probs"),
        (lambda pc, pr, lc, lr, beta, gamma: (beta * (pc / lc - pr / lr) > gamma).double().sum(),
         "counted instead of the fraction"),
    ],
))
