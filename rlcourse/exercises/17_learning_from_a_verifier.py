"""Exercises of chapter 17, "Learning from a verifier": the unbiased pass@k estimator, a
verifier's answer extraction, and GRPO's group advantage."""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from rlcourse.critic_free import grpo_advantages
from rlcourse.exercises import Case, Exercise, register
from rlcourse.verifiers import extract_answer, pass_at_k

CHAPTER = "17_learning_from_a_verifier"


def _pass_cases(rng: np.random.Generator) -> list[Case]:
    fixed = [(10, 3, 1), (5, 2, 2), (8, 0, 4), (8, 8, 1), (6, 4, 3), (256, 3, 8), (256, 1, 256),
             (1000, 7, 100)]
    rand = [(int(n), int(rng.integers(0, n + 1)), int(rng.integers(1, n + 1)))
            for n in rng.integers(2, 40, size=6)]
    return [Case((n, c, k), label=f"n = {n}, c = {c}, k = {k}") for n, c, k in fixed + rand]


register(Exercise(
    name="pass_at_k",
    chapter=CHAPTER,
    reference=lambda n, c, k: float(pass_at_k(n, c, k)),
    cases=_pass_cases,
    hint="pass@k = 1 - C(n-c, k) / C(n, k): one minus the chance that a random k-subset of the "
         "n samples holds no correct one. Compute the ratio as a product, "
         "prod over i = n-c+1..n of (1 - k/i), so that nothing overflows; it is 1 when n - c < k.",
    wrong_answers=[
        (lambda n, c, k: 1 - (1 - c / n) ** k,
         "the plug-in estimate 1 - (1 - c/n)^k is biased (low): it samples with replacement"),
        (lambda n, c, k: c / n, "that is pass@1 for every k"),
        (lambda n, c, k: math.comb(n - c, k) / math.comb(n, k),
         "that is the chance that none of the k is correct: one minus it"),
        (lambda n, c, k: min(1.0, k * c / n), "k c / n counts overlapping subsets twice"),
    ],
))


_TEXTS = [
    ("3 + 4 = 7. 7 * 2 = 14.\n#### 14", "GSM8K's marker"),
    ("#### 1,234", "a thousands comma"),
    ("It fell to -5 degrees.\n#### -5", "a negative answer"),
    ("The total is $18.00.\n#### 18.00", "decimals that are an integer"),
    ("Half of 7 is 3.50, so #### 3.50", "trailing zeros"),
    ("first #### 3, then #### 4", "two markers: the last one counts"),
    (r"so the answer is \boxed{72}.", r"\boxed{} without a marker"),
    (r"\boxed{1{,}000}", r"a LaTeX comma inside \boxed{}"),
    ("she has 12 - 3 = 9 apples left.", "no marker: the last number"),
    ("8 - 2 = 6", "a minus between numbers is not a sign"),
    ("I cannot tell.", "no number at all"),
    ("#### ", "a marker with no number"),
    ("#### 7 apples, not 8", "the first number after the marker"),
]


def _extract_cases(rng: np.random.Generator) -> list[Case]:
    return [Case((text,), label=what) for text, what in _TEXTS]


def _last_number_only(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def _marker_int(text: str) -> str | None:
    if "####" in text:
        m = re.search(r"-?\d+", text.rsplit("####", 1)[1])
        return m.group(0) if m else None
    return _last_number_only(text)


def _no_normalising(text: str) -> str | None:
    if "####" in text:
        m = re.search(r"-?[\d,.]*\d", text.rsplit("####", 1)[1])
        return m.group(0) if m else None
    return extract_answer(text)


register(Exercise(
    name="extract_answer",
    chapter=CHAPTER,
    reference=lambda text: extract_answer(text),
    cases=_extract_cases,
    compare=lambda expected, received: expected == received,
    hint="In order: the first number after the LAST '####' (nothing else if that has none); "
         r"else the number in the last \boxed{...}; else the last number of the text. Then "
         "normalise: drop $ and thousands commas, a leading +, trailing zeros of decimals "
         "('18.00' -> '18', '3.50' -> '3.5'); a '-' glued to digits is a sign, '8 - 2' is not. "
         "Return the number as text, or None when there is none.",
    wrong_answers=[
        (_last_number_only, "reads the last number even when '####' gives the answer"),
        (_marker_int, "reads only the integer part after the marker ('1,234' becomes '1')"),
        (_no_normalising, "does not normalise: '1,234' and '18.00' never equal '1234' and '18'"),
    ],
))


def _group_cases(rng: np.random.Generator) -> list[Case]:
    fixed = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0],
             [1.0, 1.0], [0.3, -1.2, 2.5, 0.0, 0.7]]
    rand = [rng.normal(size=int(k)).round(3).tolist() for k in rng.integers(2, 10, size=4)]
    return [Case((r,), label=f"rewards {r}") for r in fixed + rand]


def _grpo_reference(rewards: list[float]) -> list[float]:
    return grpo_advantages(torch.tensor([rewards], dtype=torch.float64))[0].tolist()


def _population_std(rewards: list[float]) -> list[float]:
    r = np.asarray(rewards, dtype=float)
    return ((r - r.mean()) / (r.std() + 1e-4)).tolist()


def _no_eps(rewards: list[float]) -> list[float]:
    r = np.asarray(rewards, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r - r.mean()) / r.std(ddof=1)).tolist()


register(Exercise(
    name="group_advantage",
    chapter=CHAPTER,
    reference=_grpo_reference,
    cases=_group_cases,
    hint="A_i = (r_i - mean(r)) / (std(r) + 1e-4) over the K rewards of one prompt's group, with "
         "the sample standard deviation (divide by K - 1, as torch.std does). A group whose "
         "rewards are all equal gets 0 everywhere, not NaN.",
    wrong_answers=[
        (lambda r: (np.asarray(r) - np.mean(r)).tolist(),
         "only centred: that is Dr. GRPO's advantage, not GRPO's"),
        (_population_std, "the population std (divide by K) instead of the sample std (K - 1)"),
        (_no_eps, "no epsilon: a group of equal rewards (all right or all wrong) gives NaN"),
        (lambda r: (np.asarray(r) / (np.std(r, ddof=1) + 1e-4)).tolist(),
         "scaled but not centred: every right answer is pushed up, even in a group of all-right"),
    ],
))
