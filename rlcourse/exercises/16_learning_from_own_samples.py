"""Exercises of chapter 16, "Learning from the policy's own samples": the KL of best-of-n, an
unbiased best-of-n estimate from N samples, and where Gao et al.'s RL curve peaks."""

from __future__ import annotations

import math

import numpy as np

from rlcourse.exercises import Case, Exercise, register
from rlcourse.online import best_of_n_expectation, best_of_n_kl, peak_rl

CHAPTER = "16_learning_from_own_samples"


register(Exercise(
    name="best_of_n_kl",
    chapter=CHAPTER,
    reference=lambda n: float(best_of_n_kl(n)),
    cases=lambda rng: [Case((n,), label=f"n = {n}") for n in (1, 2, 3, 4, 16, 64, 1000)],
    hint="The winner's rank quantile u has density n u^(n-1) on [0, 1]; integrate "
         "n u^(n-1) log(n u^(n-1)). The answer is log n - (n-1)/n (0 for n = 1).",
    wrong_answers=[
        (lambda n: math.log(n), "log n is an upper bound (the KL of keeping 1 of n outcomes), "
         "not the KL of best-of-n"),
        (lambda n: math.log(n) - 1, "log n - 1 is only the large-n limit; it is negative for "
         "n = 1 and 2"),
        (lambda n: (n - 1) / n, "only the second term"),
    ],
))


def _bon_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for rows, big_n, n in ((1, 4, 2), (3, 6, 3), (2, 5, 1), (2, 5, 5), (4, 8, 4)):
        cases.append(Case((rng.normal(size=(rows, big_n)), rng.normal(size=(rows, big_n)), n),
                          label=f"{rows} prompts, N = {big_n}, n = {n}"))
    return cases


register(Exercise(
    name="best_of_n_expectation",
    chapter=CHAPTER,
    reference=best_of_n_expectation,
    cases=_bon_cases,
    hint="Sort each row by proxy. The i-th smallest (1-based) is the best of a random n-subset "
         "with probability C(i-1, n-1) / C(N, n); sum those weights times the gold values.",
    wrong_answers=[
        (lambda p, g, n: np.take_along_axis(g, p.argmax(1)[:, None], 1)[:, 0],
         "that is best-of-N (all samples), not best-of-n"),
        (lambda p, g, n: np.sort(g, 1)[:, -n:].mean(1) if n > 0 else None,
         "the mean of the top n is not the expected best of n; and rank by the proxy, not gold"),
        (lambda p, g, n: np.take_along_axis(g, np.argsort(p, 1), 1)[:, -n:].mean(1),
         "the mean of the n highest by proxy is not the expected winner of a random n-subset"),
    ],
))


register(Exercise(
    name="peak_rl",
    chapter=CHAPTER,
    reference=peak_rl,
    cases=lambda rng: [Case((a, b), label=f"alpha {a}, beta {b}")
                       for a, b in ((1.0, 0.5), (0.3, 0.2), (2.0, 1.0), (0.1, 0.4))],
    hint="Differentiate d (alpha - beta log d): alpha - beta log d - beta = 0.",
    wrong_answers=[
        (lambda a, b: math.exp(a / b), "forgot the -beta from the product rule"),
        (lambda a, b: a / (2 * b), "that is the best-of-n form d (alpha - beta d)"),
    ],
))

