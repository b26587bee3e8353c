"""Exercises of chapter 11, "KTO": the value function, the probability weights, the reference
point and the loss."""

from __future__ import annotations

import numpy as np
import torch

from rlcourse import losses
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "11_kto"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


# ---- the Kahneman-Tversky value function ------------------------------------------------------
def _value_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t([-100.0, -1.0, 0.0, 1.0, 60.0, 100.0]), 0.88, 2.25), label="the classic values"),
        Case((_t(rng.normal(0, 10, 8)), 0.5, 3.0), label="alpha 0.5, lambda 3"),
        Case((_t(rng.normal(0, 10, 8)), 1.0, 1.0), label="alpha = lambda = 1: v(z) = z"),
    ]


def _value_no_lambda(z, alpha, lam):
    return torch.sign(z) * z.abs() ** alpha


def _value_lambda_on_gains(z, alpha, lam):
    return torch.where(z >= 0, lam * z.abs() ** alpha, -(z.abs() ** alpha))


register(Exercise(
    name="prospect_value",
    chapter=CHAPTER,
    reference=lambda z, alpha, lam: losses.prospect_value(z, alpha=alpha, lam=lam),
    cases=_value_cases,
    hint="v(z) = z^alpha for gains (z >= 0) and -lambda (-z)^alpha for losses; lambda > 1 "
         "makes a loss hurt more than an equal gain pleases.",
    wrong_answers=[
        (_value_no_lambda, "forgot lambda: no loss aversion"),
        (_value_lambda_on_gains, "put lambda on the gains instead of the losses"),
        (lambda z, alpha, lam: torch.where(z >= 0, z ** alpha, -lam * z.abs()),
         "forgot the exponent alpha on losses"),
    ],
))


# ---- the probability weighting function --------------------------------------------------------
def _weight_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t([0.0, 0.01, 0.2, 0.5, 0.8, 0.99, 1.0]), 0.61), label="gamma 0.61 (gains)"),
        Case((_t(rng.uniform(0.0, 1.0, 8)), 0.69), label="gamma 0.69 (losses)"),
        Case((_t(rng.uniform(0.0, 1.0, 8)), 1.0), label="gamma = 1: w(p) = p"),
    ]


def _weight_no_root(p, gamma):
    return p**gamma / (p**gamma + (1 - p) ** gamma)


register(Exercise(
    name="prospect_weight",
    chapter=CHAPTER,
    reference=lambda p, gamma: losses.prospect_weight(p, gamma=gamma),
    cases=_weight_cases,
    hint="w(p) = p^gamma / (p^gamma + (1 - p)^gamma)^(1/gamma); w(0) = 0, w(1) = 1, and small "
         "probabilities are overweighted.",
    wrong_answers=[
        (_weight_no_root, "forgot the power 1/gamma on the denominator"),
        (lambda p, gamma: p**gamma, "left out the normalising denominator"),
        (lambda p, gamma: p**gamma / (p**gamma + (1 - p) ** gamma) ** gamma,
         "raised the denominator to gamma instead of 1/gamma"),
    ],
))


# ---- the reference point z0 --------------------------------------------------------------------
def _z0_cases(rng: np.random.Generator) -> list[Case]:
    p = -rng.uniform(5, 40, 8)
    return [
        Case((_t(p), _t(p - rng.uniform(0.0, 2.0, 8))), label="policy above reference"),
        Case((_t(p), _t(p + rng.uniform(0.5, 2.0, 8))), label="negative mean: a KL is >= 0"),
        Case((_t(p), _t(p + rng.normal(0, 1, 8))), label="random"),
    ]


register(Exercise(
    name="kto_reference_point",
    chapter=CHAPTER,
    reference=losses.kto_reference_point,
    cases=_z0_cases,
    hint="z0 = max(0, mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)]) over the mismatched pairs; "
         "detach it (no gradient through z0). Return a 0-d tensor.",
    wrong_answers=[
        (lambda p, r: (p - r).mean().detach(), "did not clamp at 0: a KL cannot be negative"),
        (lambda p, r: (p - r).sum().clamp(min=0).detach(), "sum instead of mean"),
        (lambda p, r: (r - p).mean().clamp(min=0).detach(), "sign: policy minus reference"),
    ],
))


# ---- the KTO loss -----------------------------------------------------------------------------
def _kto_cases(rng: np.random.Generator) -> list[Case]:
    p = _t(-rng.uniform(5, 40, 8))
    r = p + _t(rng.normal(0, 5, 8))
    d = torch.tensor([True, False, True, True, False, False, True, False])
    return [
        Case((p, r, d, 0.5, 0.1, 1.0, 1.0), label="beta 0.1, equal weights"),
        Case((p, r, d, 0.0, 1.0, 1.33, 1.0), label="lambda_D = 1.33"),
        Case((p, r, d, 2.0, 0.5, 1.0, 3.0), label="lambda_U = 3"),
    ]


def _kto_no_weights(p, r, d, z0, beta, lam_d, lam_u):
    return losses.kto_loss(p, r, d, z0, beta=beta)


def _kto_same_sign(p, r, d, z0, beta, lam_d, lam_u):
    x = beta * (p - r - z0)
    return torch.where(d, lam_d * (1 - torch.sigmoid(x)), lam_u * (1 - torch.sigmoid(x)))


def _kto_log(p, r, d, z0, beta, lam_d, lam_u):
    x = beta * (p - r - z0)
    return torch.where(d, -lam_d * torch.nn.functional.logsigmoid(x),
                       -lam_u * torch.nn.functional.logsigmoid(-x))


register(Exercise(
    name="kto_loss",
    chapter=CHAPTER,
    reference=lambda p, r, d, z0, beta, lam_d, lam_u: losses.kto_loss(
        p, r, d, z0, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u),
    cases=_kto_cases,
    hint="r = log pi - log ref. Desirable: lam_D (1 - sigma(beta (r - z0))); undesirable: "
         "lam_U (1 - sigma(beta (z0 - r))). Pick per example with torch.where(desirable, ...).",
    wrong_answers=[
        (_kto_no_weights, "left out the weights lambda_D and lambda_U"),
        (_kto_same_sign, "undesirable answers need sigma(beta (z0 - r)): the sign flips"),
        (_kto_log, "used log sigma (DPO's form): KTO's value is sigma itself, bounded"),
    ],
))
