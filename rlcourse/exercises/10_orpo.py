"""Exercises of chapter 10, "ORPO": odds, the odds ratio and the loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rlcourse import losses
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "10_orpo"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


# ---- odds ratio of two probabilities -----------------------------------------------------------
def _or_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((0.8, 0.5), label="p_w = 0.8, p_l = 0.5"),
        Case((0.1, 0.3), label="rejected more likely"),
        Case((_t(rng.uniform(0.01, 0.99, 6)), _t(rng.uniform(0.01, 0.99, 6))), label="random"),
    ]


def _odds_ratio(p_w, p_l):
    return (p_w / (1 - p_w)) / (p_l / (1 - p_l))


register(Exercise(
    name="odds_ratio",
    chapter=CHAPTER,
    reference=_odds_ratio,
    cases=_or_cases,
    hint="odds(p) = p / (1 - p): how many times more likely yes is than no. OR = odds(p_w) / "
         "odds(p_l).",
    wrong_answers=[
        (lambda p_w, p_l: p_w / p_l, "a ratio of probabilities, not of odds"),
        (lambda p_w, p_l: (p_l / (1 - p_l)) / (p_w / (1 - p_w)), "inverted: rejected over chosen"),
        (lambda p_w, p_l: (p_w / (1 - p_w)) - (p_l / (1 - p_l)), "difference instead of ratio"),
    ],
))


# ---- log odds from a mean log-prob ------------------------------------------------------------
def _log_odds_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t(-rng.uniform(0.05, 3.0, 8)),), label="mean log-probs in [-3, -0.05]"),
        Case((_t([-np.log(2.0)]),), label="p = 1/2: log odds 0"),
        Case((_t([-1e-6, -20.0]),), label="near certain, near impossible"),
        Case((torch.tensor([-1e-8, -1e-6, -1e-4, -1e-3, -0.5], dtype=torch.float32),),
             label="float32, answers the model is almost sure of (mean log-prob near 0)"),
    ]


register(Exercise(
    name="orpo_log_odds",
    chapter=CHAPTER,
    reference=losses.orpo_log_odds,
    cases=_log_odds_cases,
    hint="With p = exp(l), log odds = log p - log(1 - p) = l - log(1 - exp(l)). "
         "torch.log(-torch.expm1(l)) computes log(1 - exp(l)) accurately near l = 0.",
    wrong_answers=[
        (lambda m: m, "returned log p, not the log odds"),
        (lambda m: m + torch.log(-torch.expm1(m)), "added log(1 - p) instead of subtracting it"),
        (lambda m: torch.log(torch.exp(m) / (1 - torch.exp(m)) + 1e-3),
         "fudged with an epsilon inside the log"),
        (lambda m: m - torch.log1p(-torch.exp(m)),
         "log1p(-exp(m)) as it reads: near m = 0 exp(m) rounds to 1 (float32: within about 3e-8) "
         "and the log odds become inf; use log(-expm1(m)) there (log1mexp)"),
    ],
))


# ---- the ORPO loss ----------------------------------------------------------------------------
def _orpo_cases(rng: np.random.Generator) -> list[Case]:
    lc = _t(rng.integers(3, 30, 8))
    lr = _t(rng.integers(3, 30, 8))
    pc = -_t(rng.uniform(0.1, 3.0, 8)) * lc
    pr = -_t(rng.uniform(0.1, 3.0, 8)) * lr
    return [
        Case((pc, pr, lc, lr, 0.1), label="lambda = 0.1 (TRL)"),
        Case((pc, pr, lc, lr, 1.0), label="lambda = 1"),
        Case((pc, pr, _t([1.0] * 8), _t([1.0] * 8), 0.5), label="one-token answers"),
    ]


def _orpo_logp_ratio(pc, pr, lc, lr, lam):
    mw, ml = pc / lc, pr / lr
    return -mw - lam * F.logsigmoid(mw - ml)


def _orpo_summed(pc, pr, lc, lr, lam):
    return -pc - lam * F.logsigmoid(losses.orpo_log_odds(pc / lc) - losses.orpo_log_odds(pr / lr))


def _orpo_summed_odds(pc, pr, lc, lr, lam):
    return -pc / lc - lam * F.logsigmoid(losses.orpo_log_odds(pc) - losses.orpo_log_odds(pr))


def _orpo_no_nll(pc, pr, lc, lr, lam):
    return -lam * F.logsigmoid(losses.orpo_log_odds(pc / lc) - losses.orpo_log_odds(pr / lr))


register(Exercise(
    name="orpo_loss",
    chapter=CHAPTER,
    reference=lambda pc, pr, lc, lr, lam: losses.orpo_loss(pc, pr, lc, lr, lam=lam),
    cases=_orpo_cases,
    hint="Inputs are summed log-probs and lengths. Mean l = logp/|y|, p = exp(l). Loss = "
         "-l_w - lam * log sigma(log odds(y_w) - log odds(y_l)).",
    wrong_answers=[
        (_orpo_logp_ratio, "log p instead of log odds inside the sigmoid"),
        (_orpo_summed, "NLL of the summed log-prob: the SFT term is per token"),
        (_orpo_no_nll, "forgot the SFT (NLL) term"),
        (_orpo_summed_odds, "summed log-probs in the odds: every p is about 0, every odds about "
                            "p, and ORPO turns into a length-biased log-ratio (use the mean)"),
    ],
))
