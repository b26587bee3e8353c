"""Exercises of chapter 9, "DPO": the loss, the implicit reward, IPO and R-DPO's sign."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rlcourse import losses
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "09_dpo"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


def _four(rng: np.random.Generator, n: int = 8, spread: float = 3.0):
    pc = -rng.uniform(5, 60, n)
    pr = -rng.uniform(5, 60, n)
    return (_t(pc), _t(pr), _t(pc + rng.normal(0, spread, n)), _t(pr + rng.normal(0, spread, n)))


# ---- the DPO loss --------------------------------------------------------------------------------
def _dpo_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, rc, rr = _four(rng)
    far = (_t([-10.0, -3000.0]), _t([-3000.0, -10.0]), _t([-20.0, -20.0]), _t([-20.0, -20.0]))
    return [
        Case((pc, pr, rc, rr, 0.1), label="random log-probs, beta = 0.1"),
        Case((pc, pr, rc, rr, 0.5), label="beta = 0.5"),
        Case((pc, pr, pc.clone(), pr.clone(), 0.1), label="policy = reference: ln 2"),
        Case((*far, 1.0), label="huge margins: use logsigmoid, not log(sigmoid)"),
    ]


def _dpo_ref(pc, pr, rc, rr, beta):
    return losses.dpo_loss(pc, pr, rc, rr, beta=beta)


register(Exercise(
    name="dpo_loss",
    chapter=CHAPTER,
    reference=_dpo_ref,
    cases=_dpo_cases,
    hint="h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); the loss per example "
         "is -log sigma(beta h). torch.nn.functional.logsigmoid stays finite where "
         "log(sigmoid(x)) gives -inf.",
    wrong_answers=[
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid((pc - rc) - (pr - rr)), "forgot beta"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pr - rr) - (pc - rc))),
         "swapped chosen and rejected: the loss should fall as the chosen answer gains"),
        (lambda pc, pr, rc, rr, beta: -torch.sigmoid(beta * ((pc - rc) - (pr - rr))),
         "used sigma instead of log sigma"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)),
         "left out the reference model's log-probs"),
        (lambda pc, pr, rc, rr, beta: -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr)))),
         "log(sigmoid(x)) underflows to -inf for very negative x: use logsigmoid"),
    ],
))


# ---- implicit rewards ------------------------------------------------------------------------
def _reward_cases(rng: np.random.Generator) -> list[Case]:
    pc, _, rc, _ = _four(rng)
    return [
        Case((pc, rc, 0.1), label="beta = 0.1"),
        Case((pc, rc, 2.0), label="beta = 2"),
        Case((rc, rc.clone(), 0.3), label="policy = reference: reward 0"),
    ]


register(Exercise(
    name="dpo_implicit_reward",
    chapter=CHAPTER,
    reference=lambda policy_logps, reference_logps, beta: losses.implicit_rewards(
        policy_logps, reference_logps, beta),
    cases=_reward_cases,
    hint="DPO's reward of an answer is beta times how much more likely the policy makes it "
         "than the reference does, in logs: beta (log pi(y|x) - log ref(y|x)).",
    wrong_answers=[
        (lambda p, r, beta: p - r, "forgot beta"),
        (lambda p, r, beta: beta * (r - p), "sign reversed: reference minus policy"),
        (lambda p, r, beta: beta * p, "left out the reference: log pi alone is not the reward"),
    ],
))


# ---- R-DPO ----------------------------------------------------------------------------------
def _rdpo_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, rc, rr = _four(rng)
    lc = _t(rng.integers(3, 40, 8))
    lr = _t(rng.integers(3, 40, 8))
    return [
        Case((pc, pr, rc, rr, lc, lr, 0.1, 0.05), label="random pairs"),
        Case((pc, pr, rc, rr, lc, lr, 0.5, 0.01), label="beta 0.5, alpha 0.01"),
        Case((pc, pr, pc.clone(), pr.clone(), _t([30.0] * 8), _t([10.0] * 8), 0.1, 0.05),
             label="policy = reference, chosen longer"),
    ]


def _rdpo_minus(pc, pr, rc, rr, lc, lr, beta, alpha):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)) - alpha * (lc - lr))


register(Exercise(
    name="rdpo_loss",
    chapter=CHAPTER,
    reference=lambda pc, pr, rc, rr, lc, lr, beta, alpha: losses.rdpo_loss(
        pc, pr, rc, rr, lc, lr, beta=beta, alpha=alpha),
    cases=_rdpo_cases,
    hint="Start from max E[r - alpha |y|] - beta KL: the optimal policy gives "
         "r = beta log(pi*/ref) + alpha |y| + beta log Z. Put that r into Bradley-Terry, "
         "sigma(r_w - r_l), and see which sign the length term gets.",
    wrong_answers=[
        (_rdpo_minus, "the minus sign of the slides' table: derive it from the objective"),
        (lambda pc, pr, rc, rr, lc, lr, beta, alpha: losses.dpo_loss(pc, pr, rc, rr, beta=beta),
         "left out the length term: that is plain DPO"),
        (lambda pc, pr, rc, rr, lc, lr, beta, alpha:
         -F.logsigmoid(beta * ((pc - rc) - (pr - rr) + alpha * (lc - lr))),
         "multiplied the length term by beta as well"),
    ],
))


# ---- IPO ------------------------------------------------------------------------------------
def _ipo_cases(rng: np.random.Generator) -> list[Case]:
    pc, pr, rc, rr = _four(rng, spread=1.0)
    return [
        Case((pc, pr, rc, rr, 0.1), label="tau = 0.1"),
        Case((pc, pr, rc, rr, 0.5), label="tau = 0.5"),
        Case((pc, pr, pc.clone(), pr.clone(), 0.25), label="policy = reference"),
    ]


register(Exercise(
    name="ipo_loss",
    chapter=CHAPTER,
    reference=lambda pc, pr, rc, rr, tau: losses.ipo_loss(pc, pr, rc, rr, tau=tau),
    cases=_ipo_cases,
    hint="IPO regresses the margin h (summed log-ratios here) onto the target 1/(2 tau): "
         "(h - 1/(2 tau))^2.",
    wrong_answers=[
        (lambda pc, pr, rc, rr, tau: ((pc - rc) - (pr - rr) - 1 / tau) ** 2,
         "target 1/tau instead of 1/(2 tau)"),
        (lambda pc, pr, rc, rr, tau: ((pc - rc) - (pr - rr) - 1 / (2 * tau)).abs(),
         "absolute value instead of the square"),
        (lambda pc, pr, rc, rr, tau: ((pc - rc) - (pr - rr) + 1 / (2 * tau)) ** 2,
         "sign of the target: the margin should approach +1/(2 tau)"),
    ],
))
