"""Exercises of chapter 15, "Beyond the slides": RLOO and GRPO advantages, and spreading a
group's advantages over the tokens of each response."""

from __future__ import annotations

import numpy as np
import torch

from rlcourse.critic_free import grpo_advantages, rloo_advantages
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "15_beyond"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)


def _reward_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t([[1.0, 0.0, 0.0, 3.0]]),), label="one group of 4"),
        Case((_t(rng.normal(0, 2, (5, 8))),), label="5 prompts x 8 samples"),
        Case((_t(rng.integers(0, 2, (6, 4))),), label="0/1 rewards (a verifier)"),
        Case((_t([[2.0, 2.0, 2.0], [0.0, 1.0, 5.0]]),), label="a group with equal rewards"),
        Case((_t([[0.0, 1.0]]),), label="K = 2"),
    ]


register(Exercise(
    name="rloo_advantages",
    chapter=CHAPTER,
    reference=rloo_advantages,
    cases=_reward_cases,
    hint="rewards has shape (n_prompts, K). Each sample's baseline is the mean of the OTHER K-1 "
         "rewards of its own prompt: (sum of the row - r_i) / (K - 1).",
    wrong_answers=[
        (lambda r: r - r.mean(1, keepdim=True), "the mean including the sample itself depends "
         "on y_i; leave it out (the result is K/(K-1) times this)"),
        (lambda r: r - (r.sum(1, keepdim=True) - r) / r.shape[1], "the other samples are K-1, "
         "not K"),
        (lambda r: r - r.mean(), "the baseline is per prompt (per row), not over the whole batch"),
    ],
))


register(Exercise(
    name="grpo_advantages",
    chapter=CHAPTER,
    reference=lambda r: grpo_advantages(r, eps=1e-4),
    cases=_reward_cases,
    hint="Per row: subtract the row's mean, divide by the row's SAMPLE standard deviation "
         "(torch.std, Bessel-corrected) plus eps = 1e-4. A row of equal rewards gives zeros.",
    wrong_answers=[
        (lambda r: (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False)
                                                     + 1e-4),
         "population std (unbiased=False); GRPO and TRL use the sample std (torch.std)"),
        (lambda r: r / (r.std(1, keepdim=True) + 1e-4), "forgot to centre: subtract the mean"),
        (lambda r: (r - r.mean()) / (r.std() + 1e-4), "normalise within each prompt's group "
         "(each row), not over the whole batch"),
        (lambda r: r - r.mean(1, keepdim=True), "that is Dr. GRPO: GRPO also divides by the std"),
    ],
))


def _token_adv(rewards: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    adv = grpo_advantages(rewards)
    return adv.reshape(-1, 1) * completion_mask[:, 1:].to(adv.dtype)


def _token_cases(rng: np.random.Generator) -> list[Case]:
    out = []
    for n, k, length in ((2, 3, 6), (3, 4, 9)):
        rewards = _t(rng.normal(0, 1, (n, k)))
        mask = torch.zeros(n * k, length, dtype=torch.long)
        for i in range(n * k):  # a prompt of 2 tokens, then a response of random length
            mask[i, 2 : 2 + int(rng.integers(1, length - 1))] = 1
        out.append(Case((rewards, mask), label=f"{n} prompts x {k} samples"))
    return out


register(Exercise(
    name="grpo_token_advantages",
    chapter=CHAPTER,
    reference=_token_adv,
    cases=_token_cases,
    hint="rewards (n, K); completion_mask (n*K, L), rows of a group consecutive (row g*K + i is "
         "sample i of prompt g). Return (n*K, L-1): grpo_advantages(rewards) of each row on each "
         "of its response tokens, 0 elsewhere. Column t belongs to token t+1 "
         "(completion_mask[:, 1:]).",
    wrong_answers=[
        (lambda r, m: grpo_advantages(r).reshape(-1, 1).expand(-1, m.shape[1] - 1),
         "mask the prompt and the padding: only response tokens carry the advantage"),
        (lambda r, m: grpo_advantages(r).T.reshape(-1, 1) * m[:, 1:],
         "rows of one group are consecutive: flatten (n, K) row by row (reshape), not transposed"),
        (lambda r, m: grpo_advantages(r).reshape(-1, 1) * m[:, :-1],
         "the shift: column t is the token at position t+1, so use completion_mask[:, 1:]"),
    ],
))
