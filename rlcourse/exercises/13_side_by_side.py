"""Exercises of chapter 13, "The methods side by side": which methods need a reference model,
and how hard each loss pushes on the margin (its gradient weight)."""

from __future__ import annotations

import numpy as np
import torch

from rlcourse.exercises import Case, Exercise, register
from rlcourse.losses import OBJECTIVES

CHAPTER = "13_side_by_side"
METHODS = ("dpo", "ipo", "rdpo", "kto", "orpo", "simpo")


# ---- which methods keep a reference model -----------------------------------------------------
def _needs_reference(method: str) -> bool:
    return OBJECTIVES[method].needs_reference


register(Exercise(
    name="needs_reference",
    chapter=CHAPTER,
    reference=_needs_reference,
    cases=lambda rng: [Case((m,), label=m) for m in METHODS],
    hint="Look at each objective: does it contain pi_ref? KTO's reward is a log-ratio to the "
         "reference, although its data are unpaired; ORPO and SimPO use only pi_theta.",
    wrong_answers=[
        (lambda m: m in ("dpo", "ipo", "rdpo"), "KTO needs a reference too: its reward is "
         "log pi_theta - log pi_ref, and z0 estimates KL(pi_theta || pi_ref)"),
        (lambda m: m != "orpo", "SimPO has no reference either: its reward is the "
         "length-normalised log pi_theta alone"),
        (lambda m: True, "ORPO and SimPO drop the reference model"),
    ],
))


# ---- gradient weights: -dL/dh ---------------------------------------------------------------
def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


def _margins(rng: np.random.Generator) -> torch.Tensor:
    return _t(np.concatenate([[-20.0, -1.0, 0.0, 1.0, 5.0, 50.0], rng.normal(0, 4, 6)]))


def _dpo_weight(h: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * torch.sigmoid(-beta * h)


register(Exercise(
    name="dpo_gradient_weight",
    chapter=CHAPTER,
    reference=_dpo_weight,
    cases=lambda rng: [Case((_margins(rng), 0.1), label="beta = 0.1"),
                       Case((_margins(rng), 0.5), label="beta = 0.5")],
    hint="L(h) = -log sigma(beta h). Differentiate: d/dx log sigma(x) = sigma(-x) = 1 - sigma(x). "
         "Return -dL/dh, the push towards a larger margin; it fades as the pair is learned.",
    wrong_answers=[
        (lambda h, beta: beta * torch.sigmoid(beta * h), "sign: the weight is sigma(-beta h), "
         "large for pairs the model still gets wrong (h < 0)"),
        (lambda h, beta: torch.sigmoid(-beta * h), "forgot the chain-rule factor beta"),
        (lambda h, beta: beta * (1 - torch.sigmoid(-h)), "beta must multiply h inside sigma too"),
    ],
))


def _ipo_weight(h: torch.Tensor, tau: float) -> torch.Tensor:
    return -2.0 * (h - 1.0 / (2.0 * tau))


register(Exercise(
    name="ipo_gradient_weight",
    chapter=CHAPTER,
    reference=_ipo_weight,
    cases=lambda rng: [Case((_margins(rng), 0.1), label="tau = 0.1: target 5"),
                       Case((_margins(rng), 0.5), label="tau = 0.5: target 1")],
    hint="L(h) = (h - 1/(2 tau))^2. Return -dL/dh: positive below the target margin, negative "
         "above it (IPO pulls an over-learned pair back), and it never saturates.",
    wrong_answers=[
        (lambda h, tau: 2.0 * (h - 1.0 / (2.0 * tau)), "sign: return -dL/dh, the push "
         "towards a larger margin"),
        (lambda h, tau: -(h - 1.0 / (2.0 * tau)), "the derivative of x^2 is 2x"),
        (lambda h, tau: -2.0 * (h - 1.0 / tau), "the target margin is 1/(2 tau), not 1/tau"),
        (lambda h, tau: torch.clamp(-2.0 * (h - 1.0 / (2.0 * tau)), min=0.0),
         "IPO's weight goes negative above the target: it is a regression, not a hinge"),
    ],
))


def _simpo_weight(m: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    return beta * torch.sigmoid(gamma - beta * m)


register(Exercise(
    name="simpo_gradient_weight",
    chapter=CHAPTER,
    reference=_simpo_weight,
    cases=lambda rng: [Case((_margins(rng) / 10, 2.0, 1.0), label="beta 2, gamma 1"),
                       Case((_margins(rng) / 10, 10.0, 3.0), label="beta 10, gamma 3"),
                       Case((_margins(rng) / 10, 2.0, 0.0), label="gamma 0")],
    hint="With m = mean log-prob(chosen) - mean log-prob(rejected), L(m) = -log sigma(beta m - "
         "gamma). Return -dL/dm; it stays large until beta m clears the margin gamma.",
    wrong_answers=[
        (lambda m, beta, gamma: beta * torch.sigmoid(-beta * m), "forgot the target margin "
         "gamma: it keeps the weight high until beta m exceeds gamma"),
        (lambda m, beta, gamma: beta * torch.sigmoid(beta * m - gamma), "sign inside sigma"),
        (lambda m, beta, gamma: torch.sigmoid(gamma - beta * m), "forgot the factor beta"),
    ],
))
