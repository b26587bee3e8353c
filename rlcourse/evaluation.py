"""Evaluation in the assistant world: win rates with a bootstrap error, length control, KL.

A miniature AlpacaEval: sample an answer from the model and one from a baseline for every
held-out prompt, let the ground-truth judge (:meth:`AssistantWorld.true_score`, standing in for
GPT-4) decide which is better, and report the share of wins (ties count half) with a standard
error. Because judges, human or GPT-4, tend to prefer longer answers, AlpacaEval 2 also reports
a *length-controlled* win rate: the win rate a logistic model predicts when both answers have
the same length. And because a policy can win by drifting far from where it started, we also
estimate KL(π‖π_ref) on the model's own samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlcourse.worlds.assistant import DEFAULT_WORLD, AssistantWorld, tokens

__all__ = [
    "Comparison",
    "Evaluation",
    "LengthControlled",
    "SampleStats",
    "WinRate",
    "bootstrap_stderr",
    "compare_texts",
    "evaluate_against",
    "kl_to_reference",
    "length_controlled_win_rate",
    "sample_stats",
    "win_indicators",
    "win_rate",
]


# --------------------------------------------------------------------------------------------
# Win rate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WinRate:
    """A win rate with its bootstrap standard error and the raw counts."""

    rate: float
    stderr: float
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def __str__(self) -> str:
        return f"{self.rate:.3f} ± {self.stderr:.3f} (W/T/L {self.wins}/{self.ties}/{self.losses})"


def win_indicators(scores_a: Sequence[float], scores_b: Sequence[float]) -> np.ndarray:
    """w_i = 1 if a_i > b_i, 1/2 if a_i = b_i, 0 if a_i < b_i (float64 array)."""
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores must be two 1-d arrays of equal length, got {a.shape}, {b.shape}")
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def bootstrap_stderr(values: Sequence[float], n_bootstrap: int = 1000, seed: int = 0) -> float:
    r"""Bootstrap standard error of a mean.

    Draw ``n_bootstrap`` resamples of the n values with replacement, take each resample's
    mean \bar v^{(k)}, and return their standard deviation
    :math:`\sqrt{\frac{1}{K-1}\sum_k (\bar v^{(k)} - \overline{\bar v})^2}`. For 0/1 values this
    approaches the binomial :math:`\sqrt{p(1-p)/n}`.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or n_bootstrap < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap)
    # In chunks, so 1000 resamples of 100k values do not build a 10^8 index array at once.
    chunk = max(1, 2_000_000 // v.size)
    for start in range(0, n_bootstrap, chunk):
        k = min(chunk, n_bootstrap - start)
        means[start : start + k] = v[rng.integers(v.size, size=(k, v.size))].mean(axis=1)
    return float(means.std(ddof=1))


def win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> WinRate:
    r"""Win rate of a over b, ties counting half, with a bootstrap standard error.

    .. math::  \mathrm{WR} = \frac{1}{n}\sum_{i=1}^{n} \Big([s^a_i > s^b_i]
               + \tfrac12 [s^a_i = s^b_i]\Big)

    The standard error resamples the n comparisons with replacement
    (:func:`bootstrap_stderr`).
    """
    w = win_indicators(scores_a, scores_b)
    if w.size == 0:
        raise ValueError("win_rate needs at least one comparison")
    return WinRate(
        rate=float(w.mean()),
        stderr=bootstrap_stderr(w, n_bootstrap, seed),
        wins=int((w == 1.0).sum()),
        ties=int((w == 0.5).sum()),
        losses=int((w == 0.0).sum()),
    )


@dataclass(frozen=True)
class LengthControlled:
    """Length-controlled win rate: σ(θ0), the fitted win probability at equal lengths."""

    rate: float
    win_rate: float
    intercept: float
    slope: float
    scale: float
    #: min(share of pairs with d_i ≥ 0, share with d_i ≤ 0): how much data lies on the thinner
    #: side of "equal length". Near 0 (one model always the shorter) σ(θ0) is an extrapolation.
    minority_share: float = 0.5

    @property
    def extrapolated(self) -> bool:
        """True when fewer than 5% of the pairs lie on one side of equal length: the rate is
        then read off the fitted curve where there is (almost) no data, and means little (a
        model that answers nothing at all can get an LC win rate near 1)."""
        return self.minority_share < 0.05


def length_controlled_win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    lengths_a: Sequence[float],
    lengths_b: Sequence[float],
    transform: str = "tanh",
    n_newton: int = 50,
    ridge: float = 1e-6,
) -> LengthControlled:
    r"""Win rate with the length effect regressed out, in the spirit of AlpacaEval 2 LC.

    Fit a logistic regression of the win indicator w_i ∈ {0, ½, 1} (ties are soft targets) on
    the length difference d_i = ℓ^a_i − ℓ^b_i:

    .. math::  P(a_i \succ b_i) = \sigma\big(\theta_0 + \theta_1\, x_i\big),\qquad
               x_i = \tanh(d_i / \mathrm{sd}(d))\ \text{(or } d_i/\mathrm{sd}(d)\text{ with
               ``transform="linear"``)}

    by maximum likelihood (Newton's method on the cross-entropy
    −Σ w_i log p_i + (1 − w_i) log(1 − p_i), a tiny ridge keeping the Hessian invertible), and
    report σ(θ0): the predicted win rate when both answers have the same length. With all
    lengths equal the fit gives σ(θ0) = the plain win rate. When one side is (almost) always
    the shorter, equal length lies outside the data and σ(θ0) is an extrapolation:
    ``LengthControlled.extrapolated`` says so (``minority_share`` < 5 %). AlpacaEval 2 uses the
    tanh form and adds a per-instruction difficulty term, which this miniature leaves out.
    """
    w = win_indicators(scores_a, scores_b)
    d = np.asarray(lengths_a, dtype=np.float64) - np.asarray(lengths_b, dtype=np.float64)
    if d.shape != w.shape:
        raise ValueError(f"lengths have shape {d.shape}, scores {w.shape}")
    if transform not in ("tanh", "linear"):
        raise ValueError(f"transform must be 'tanh' or 'linear', got {transform!r}")
    scale = float(d.std())
    scale = scale if scale > 0 else 1.0
    x = d / scale
    if transform == "tanh":
        x = np.tanh(x)
    X = np.stack([np.ones_like(x), x], axis=1)  # [n, 2]
    theta = np.zeros(2)
    for _ in range(n_newton):
        p = 1.0 / (1.0 + np.exp(-(X @ theta)))
        grad = X.T @ (p - w) + ridge * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return LengthControlled(
        rate=float(1.0 / (1.0 + math.exp(-theta[0]))),
        win_rate=float(w.mean()),
        intercept=float(theta[0]),
        slope=float(theta[1]),
        scale=scale,
        minority_share=float(min((d >= 0).mean(), (d <= 0).mean())) if d.size else 0.5,
    )


# --------------------------------------------------------------------------------------------
# Judging samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleStats:
    """What the judge finds in a set of samples: mean length and score, shares of flaws."""

    n: int
    mean_length: float
    mean_score: float
    share_false: float
    share_rude: float
    share_repetition: float
    share_off_topic: float
    share_garbled: float
    share_flawed: float
    share_best: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def sample_stats(
    prompts: Sequence[str], texts: Sequence[str], world: AssistantWorld | None = None
) -> SampleStats:
    """Judge every (prompt, text): mean length in words (punctuation included), mean true
    score, and the share of samples with a false fact, rude words or bias, repetition,
    off-topic content, garbled text, any flaw, and the best achievable score."""
    world = world or DEFAULT_WORLD
    b = [world.score_breakdown(p, t) for p, t in zip(prompts, texts, strict=True)]
    best = world.max_score()
    return SampleStats(
        n=len(b),
        mean_length=float(np.mean([x.n_tokens for x in b])),
        mean_score=float(np.mean([x.score for x in b])),
        share_false=float(np.mean([x.has_false for x in b])),
        share_rude=float(np.mean([x.has_rude for x in b])),
        share_repetition=float(np.mean([x.has_repetition for x in b])),
        share_off_topic=float(np.mean([x.n_off_topic > 0 for x in b])),
        share_garbled=float(np.mean([x.n_garbled > 0 for x in b])),
        share_flawed=float(np.mean([x.is_flawed for x in b])),
        share_best=float(np.mean([x.score >= best - 1e-9 for x in b])),
    )


@dataclass(frozen=True)
class Comparison:
    """Two sets of answers to the same prompts, judged side by side."""

    win: WinRate
    lc: LengthControlled
    a: SampleStats
    b: SampleStats
    scores_a: np.ndarray = field(repr=False)
    scores_b: np.ndarray = field(repr=False)


def compare_texts(
    prompts: Sequence[str],
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    world: AssistantWorld | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Judge answers a and b to the same prompts: win rate of a over b (± bootstrap error),
    length-controlled win rate (lengths in words), and both sets' :class:`SampleStats`."""
    world = world or DEFAULT_WORLD
    sa = np.array([world.true_score(p, t) for p, t in zip(prompts, texts_a, strict=True)])
    sb = np.array([world.true_score(p, t) for p, t in zip(prompts, texts_b, strict=True)])
    la = [len(tokens(t)) for t in texts_a]
    lb = [len(tokens(t)) for t in texts_b]
    return Comparison(
        win=win_rate(sa, sb, n_bootstrap, seed),
        lc=length_controlled_win_rate(sa, sb, la, lb),
        a=sample_stats(prompts, texts_a, world),
        b=sample_stats(prompts, texts_b, world),
        scores_a=sa,
        scores_b=sb,
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def kl_to_reference(
    model: Any, reference: Any, generation: Any, batch_size: int = 256
) -> tuple[float, float]:
    r"""Monte Carlo estimate of KL(π‖π_ref) from the model's own samples y_i ~ π(·|x_i):

    .. math::  \widehat{\mathrm{KL}} = \frac1n \sum_i \big(\log\pi(y_i|x_i)
               - \log\pi_\text{ref}(y_i|x_i)\big)

    (sequence log-probs summed over completion tokens, EOS included). Unbiased only when the
    samples come from π itself (temperature 1, no top-k/top-p). Returns (estimate, stderr).
    """
    import torch

    from rlcourse.models import sequence_logprobs

    ids, att, comp = (
        generation.full_ids,
        generation.full_attention_mask,
        generation.full_completion_mask,
    )
    diffs = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            lp = sequence_logprobs(model, *_on(model, ids[sl], att[sl], comp[sl]))
            lr = sequence_logprobs(reference, *_on(reference, ids[sl], att[sl], comp[sl]))
            diffs.append((lp - lr).double().cpu())
    d = torch.cat(diffs).numpy()
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return float(d.mean()), se


def _on(model: Any, *tensors: Any) -> list:
    device = next(model.parameters()).device
    return [t.to(device) for t in tensors]


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate_against`: a :class:`Comparison` of the model's samples
    with the baseline's, the KL estimate, and the samples themselves."""

    comparison: Comparison
    kl: float
    kl_stderr: float
    prompts: list[str] = field(repr=False)
    texts: list[str] = field(repr=False)
    baseline_texts: list[str] = field(repr=False)

    @property
    def win(self) -> WinRate:
        return self.comparison.win

    @property
    def lc_win_rate(self) -> float:
        return self.comparison.lc.rate

    @property
    def model(self) -> SampleStats:
        return self.comparison.a

    @property
    def baseline(self) -> SampleStats:
        return self.comparison.b

    def summary(self) -> dict[str, float]:
        """A flat dict of the headline numbers (for printing or a results file)."""
        out = {
            "win_rate": self.win.rate,
            "win_rate_stderr": self.win.stderr,
            "lc_win_rate": self.lc_win_rate,
            # below 0.05 the LC win rate is an extrapolation (LengthControlled.extrapolated)
            "lc_minority_share": self.comparison.lc.minority_share,
            "kl": self.kl,
            "kl_stderr": self.kl_stderr,
        }
        out.update({f"model_{k}": v for k, v in self.model.as_dict().items()})
        out.update({f"baseline_{k}": v for k, v in self.baseline.as_dict().items()})
        return out


def evaluate_against(
    model: Any,
    baseline_model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    world: AssistantWorld | None = None,
    n_samples: int = 1,
    reference_model: Any = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    n_bootstrap: int = 1000,
    baseline_tokenizer: Any = None,
) -> Evaluation:
    """A miniature AlpacaEval: the model against a baseline on held-out prompts.

    Samples ``n_samples`` answers per prompt from both models (different seeds), judges each
    pair with the world's true score, and returns the win rate of the model (ties half, ±
    bootstrap stderr), the length-controlled win rate, both models' :class:`SampleStats`, and
    KL(model ‖ reference) estimated on the model's samples (the reference defaults to the
    baseline; see :func:`kl_to_reference`).
    """
    from rlcourse.models import generate

    world = world or DEFAULT_WORLD
    reference_model = reference_model if reference_model is not None else baseline_model
    many = [p for p in prompts for _ in range(n_samples)]
    gen = generate(model, tokenizer, many, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    base = generate(baseline_model, baseline_tokenizer or tokenizer, many,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed + 1)
    comparison = compare_texts(many, gen.texts, base.texts, world, n_bootstrap, seed)
    kl, kl_se = kl_to_reference(model, reference_model, gen)
    return Evaluation(
        comparison=comparison,
        kl=kl,
        kl_stderr=kl_se,
        prompts=many,
        texts=list(gen.texts),
        baseline_texts=list(base.texts),
    )
