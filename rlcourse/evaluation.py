"""Evaluation in the assistant world: win rates with a bootstrap error, length control, KL.

A miniature AlpacaEval: sample an answer from the model and one from a baseline for every
held-out prompt, let the ground-truth judge (:meth:`AssistantWorld.true_score`, standing in for
GPT-4) decide which is better, and report the share of wins (ties count half) with a standard
error. Because judges, human or GPT-4, tend to prefer longer answers, AlpacaEval 2 also reports
a *length-controlled* win rate: the win rate a logistic model predicts when both answers have
the same length. And because a policy can win by drifting far from where it started, we also
estimate KL(π‖π_ref) on the model's own samples.

A win rate alone does not say how good a model is: against a baseline whose answers are often
already perfect, even a perfect assistant ties those and cannot reach 1. So every win rate here
comes with its **ceiling**, the win rate of an assistant that always gives the world's
``best_response`` against the same baseline answers, and the **share of gain**
(WR − ½)/(ceiling − ½), the part of the achievable improvement over the baseline a model
realised (:func:`share_of_gain`, :func:`oracle_best_of_n`).

Several training seeds judged against **one** draw of baseline answers are not independent
evaluations: the baseline's luck is shared by all of them. Their mean gets its error from a
paired bootstrap over prompts that resamples every seed and the baseline together
(:func:`seed_mean_paired`); and because the ceiling itself moves with the baseline draw, the
share of gain is reported over several draws (:func:`spread_over_draws`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlcourse.models import generate, sequence_logprobs
from rlcourse.worlds.assistant import DEFAULT_WORLD, AssistantWorld, tokens

__all__ = [
    "Comparison",
    "DrawSpread",
    "Evaluation",
    "LengthControlled",
    "SampleStats",
    "SeedMean",
    "WinRate",
    "ShareOfGain",
    "best_of_n_win_rates",
    "bootstrap_stderr",
    "ceiling_indicators",
    "ceiling_summary",
    "compare_texts",
    "evaluate_against",
    "oracle_best_of_n",
    "perfect_assistant_scores",
    "share_of_gain",
    "kl_to_reference",
    "length_controlled_win_rate",
    "sample_stats",
    "seed_mean_paired",
    "spread_over_draws",
    "win_indicators",
    "win_rate",
]


# --------------------------------------------------------------------------------------------
# Win rate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WinRate:
    """A win rate with its bootstrap standard error and the raw counts; when the best
    achievable score was given (``win_rate(..., best=...)``), also the ceiling (the perfect
    assistant's win rate against the same baseline) and the share of gain toward it."""

    rate: float
    stderr: float
    wins: int
    ties: int
    losses: int
    ceiling: float = math.nan
    share_of_gain: float = math.nan
    share_of_gain_stderr: float = math.nan

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def __str__(self) -> str:
        text = f"{self.rate:.3f} ± {self.stderr:.3f} (W/T/L {self.wins}/{self.ties}/{self.losses})"
        if not math.isnan(self.ceiling):
            text += (f"; ceiling {self.ceiling:.3f}, share of gain {self.share_of_gain:.2f} ± "
                     f"{self.share_of_gain_stderr:.2f}")
        return text


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
    best: float | Sequence[float] | None = None,
) -> WinRate:
    r"""Win rate of a over b, ties counting half, with a bootstrap standard error.

    .. math::  \mathrm{WR} = \frac{1}{n}\sum_{i=1}^{n} \Big([s^a_i > s^b_i]
               + \tfrac12 [s^a_i = s^b_i]\Big)

    The standard error resamples the n comparisons with replacement
    (:func:`bootstrap_stderr`). With ``best`` (the best achievable score, one number or one per
    comparison) the result also carries the ceiling C, the win rate of answers that score
    ``best`` against the same b (:func:`ceiling_indicators`), and the share of gain
    (WR − ½)/(C − ½) with its paired bootstrap error (:func:`share_of_gain`).
    """
    w = win_indicators(scores_a, scores_b)
    if w.size == 0:
        raise ValueError("win_rate needs at least one comparison")
    extra = {}
    if best is not None:
        c = ceiling_indicators(scores_b, best)
        gain = share_of_gain(w, c, n_bootstrap, seed)
        extra = {"ceiling": gain.ceiling, "share_of_gain": gain.value,
                 "share_of_gain_stderr": gain.stderr}
    return WinRate(
        rate=float(w.mean()),
        stderr=bootstrap_stderr(w, n_bootstrap, seed),
        wins=int((w == 1.0).sum()),
        ties=int((w == 0.5).sum()),
        losses=int((w == 0.0).sum()),
        **extra,
    )


# --------------------------------------------------------------------------------------------
# The ceiling: how far above one half a win rate can go against this baseline
# --------------------------------------------------------------------------------------------


def ceiling_indicators(
    baseline_scores: Sequence[float], best: float | Sequence[float]
) -> np.ndarray:
    r"""The perfect assistant's win indicators against the baseline's answers:

    .. math::  c_i = [s^* > s^b_i] + \tfrac12 [s^* = s^b_i] \in \{\tfrac12, 1\}

    with s* the best achievable score (one number, or one per comparison). Its mean is the
    ceiling C = 1 − ½·(share of baseline answers that already score s*): those tie.

    Raises ``ValueError`` if a baseline answer scores *above* ``best``: then ``best`` is not
    the best, and a ceiling computed from it would be silently too low.
    """
    b = np.asarray(baseline_scores, dtype=np.float64)
    top = np.broadcast_to(np.asarray(best, dtype=np.float64), b.shape)
    above = np.flatnonzero(b > top + 1e-12)
    if above.size:
        i = int(above[0])
        raise ValueError(f"baseline answer {i} scores {b[i]:g} > best {top[i]:g}: "
                         "'best' is not the best achievable score")
    return win_indicators(top, b)


@dataclass(frozen=True)
class ShareOfGain:
    """(WR − ½)/(C − ½): the share of the achievable gain over the baseline, with a paired
    bootstrap standard error; ``win_rate`` and ``ceiling`` are the two means it divides."""

    value: float
    stderr: float
    win_rate: float
    ceiling: float

    def __str__(self) -> str:
        return (f"{self.value:.2f} ± {self.stderr:.2f} of the gain (win rate {self.win_rate:.3f},"
                f" ceiling {self.ceiling:.3f})")


def share_of_gain(
    wins: Sequence[float],
    ceiling_wins: Sequence[float],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> ShareOfGain:
    r"""Share of the achievable gain a model realised over the baseline.

    With w_i the model's win indicators against the baseline answers b_i and c_i the perfect
    assistant's against the *same* b_i (:func:`ceiling_indicators`):

    .. math::  \mathrm{SoG} = \frac{\bar w - \tfrac12}{\bar c - \tfrac12}

    0 for a model no better than the baseline, 1 for the perfect assistant, negative for a
    worse model. The standard error is a **paired** bootstrap: every resample draws the
    comparisons i with replacement and takes *the same* i for numerator and denominator,
    SoG^{(k)} = (\bar w^{(k)} − ½)/(\bar c^{(k)} − ½), and the error is the standard deviation
    of the SoG^{(k)}. Pairing matters: both means are over the same baseline answers, so they
    move together (for the perfect assistant w = c, SoG^{(k)} = 1 in every resample and the error
    is exactly 0; resampling the two independently would report a spurious error). Resamples
    whose ceiling is ½ (no gain possible in them) are left out. SoG is NaN when the ceiling is ½.
    """
    w = np.asarray(wins, dtype=np.float64)
    c = np.asarray(ceiling_wins, dtype=np.float64)
    if w.shape != c.shape or w.ndim != 1 or w.size == 0:
        raise ValueError(f"wins and ceiling_wins must be two non-empty 1-d arrays of equal "
                         f"length, got {w.shape}, {c.shape}")
    wr, ceiling = float(w.mean()), float(c.mean())
    value = (wr - 0.5) / (ceiling - 0.5) if ceiling > 0.5 else math.nan
    stderr = math.nan
    if w.size >= 2 and n_bootstrap >= 2 and not math.isnan(value):
        rng = np.random.default_rng(seed)
        ratios = []
        chunk = max(1, 2_000_000 // w.size)
        for start in range(0, n_bootstrap, chunk):
            idx = rng.integers(w.size, size=(min(chunk, n_bootstrap - start), w.size))
            num, den = w[idx].mean(axis=1) - 0.5, c[idx].mean(axis=1) - 0.5
            ok = den > 0
            ratios.append(num[ok] / den[ok])
        r = np.concatenate(ratios)
        stderr = float(r.std(ddof=1)) if r.size >= 2 else math.nan
    return ShareOfGain(value=value, stderr=stderr, win_rate=wr, ceiling=ceiling)


# --------------------------------------------------------------------------------------------
# Several training seeds against one baseline draw; several baseline draws
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedMean:
    """Mean over training seeds judged against the same baseline answers
    (:func:`seed_mean_paired`): win rate, ceiling and share of gain with paired-bootstrap
    errors, and for comparison the naive error sd(per-seed win rates)/sqrt(S)."""

    win_rate: float
    win_rate_stderr: float
    naive_stderr: float
    ceiling: float
    share_of_gain: float
    share_of_gain_stderr: float
    per_seed: tuple[float, ...]
    n_prompts: int
    n_samples: int

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "per_seed"}
        return {**out, "per_seed": list(self.per_seed), "n_seeds": self.n_seeds}


def seed_mean_paired(
    wins: Any,
    ceiling_wins: Any,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> SeedMean:
    r"""Mean win rate and share of gain over S training seeds that share one baseline draw.

    ``wins[s, i, k]`` is seed s's win indicator against the baseline's k-th answer to prompt i
    (shape [S, P] for one answer per prompt, or [S, P, K]); ``ceiling_wins[i, k]`` the perfect
    assistant's against the *same* baseline answer (:func:`ceiling_indicators`). The estimates
    are the means over seeds of the per-seed means,

    .. math::  \overline{\mathrm{WR}} = \frac1S\sum_s \bar w_s,\qquad
               G = \frac{\overline{\mathrm{WR}} - \tfrac12}{\bar c - \tfrac12}.

    Their standard errors come from a **paired bootstrap over prompts across seeds**: each
    resample draws P prompt indices with replacement *once* and applies them to every seed's
    indicators and to the ceiling's (the prompt, with all of its answers, is the unit: answers
    to one prompt are not independent), then recomputes both statistics; the error is the
    standard deviation over resamples. With m_i the mean of prompt i's indicators over seeds
    and answers, the resampled win rate is the mean of P draws from the m_i, so its error tends
    to :math:`\sqrt{\tfrac1P\cdot\tfrac1P\sum_i (m_i - \bar m)^2}` (the ideal bootstrap).

    Why not the spread over seeds? ``naive_stderr`` = sd of the S per-seed win rates / √S sees
    only the training and model-sampling noise that differs between seeds. The baseline's
    answers are the same for every seed, so whatever luck they had (a prompt where the baseline
    happened to answer badly is won by every seed) moves all seeds together and is invisible in
    their spread; the paired bootstrap resamples it. Resamples whose ceiling is ½ are left out
    of the share-of-gain error, as in :func:`share_of_gain`.
    """
    w = np.asarray(wins, dtype=np.float64)
    c = np.asarray(ceiling_wins, dtype=np.float64)
    if w.ndim == 2:
        w = w[:, :, None]
    if c.ndim == 1:
        c = c[:, None]
    if w.ndim != 3 or w.shape[1:] != c.shape or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"wins must be [seeds, prompts(, answers)] and ceiling_wins "
                         f"[prompts(, answers)] with matching shapes, got {np.shape(wins)} "
                         f"and {np.shape(ceiling_wins)}")
    n_seeds, n_prompts, n_samples = w.shape
    per_seed = w.mean(axis=(1, 2))
    m = w.mean(axis=(0, 2))  # per prompt: mean over seeds and answers
    cp = c.mean(axis=1)
    wr, ceiling = float(m.mean()), float(cp.mean())
    gain = (wr - 0.5) / (ceiling - 0.5) if ceiling > 0.5 else math.nan
    wr_se = gain_se = math.nan
    if n_prompts >= 2 and n_bootstrap >= 2:
        rng = np.random.default_rng(seed)
        wr_b, g_b = [], []
        chunk = max(1, 2_000_000 // n_prompts)
        for start in range(0, n_bootstrap, chunk):
            idx = rng.integers(n_prompts, size=(min(chunk, n_bootstrap - start), n_prompts))
            num, den = m[idx].mean(axis=1), cp[idx].mean(axis=1) - 0.5
            wr_b.append(num)
            ok = den > 0
            g_b.append((num[ok] - 0.5) / den[ok])
        wr_se = float(np.concatenate(wr_b).std(ddof=1))
        g = np.concatenate(g_b)
        if not math.isnan(gain) and g.size >= 2:
            gain_se = float(g.std(ddof=1))
    naive = float(per_seed.std(ddof=1) / math.sqrt(n_seeds)) if n_seeds >= 2 else math.nan
    return SeedMean(win_rate=wr, win_rate_stderr=wr_se, naive_stderr=naive, ceiling=ceiling,
                    share_of_gain=gain, share_of_gain_stderr=gain_se,
                    per_seed=tuple(float(x) for x in per_seed), n_prompts=n_prompts,
                    n_samples=n_samples)


@dataclass(frozen=True)
class DrawSpread:
    """A statistic over several baseline draws: mean, sample standard deviation, range."""

    mean: float
    sd: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return f"{self.mean:.3f} (sd {self.sd:.3f}, {self.min:.3f}–{self.max:.3f}, {self.n} draws)"


def spread_over_draws(values: Sequence[float]) -> DrawSpread:
    r"""Mean, standard deviation (n − 1) and range of one statistic computed against each of
    several independent draws of the baseline's answers.

    A raw win rate and its ceiling C both move with the baseline draw (a draw with more perfect
    baseline answers leaves less to win); the share of gain (WR − ½)/(C − ½) divides much of
    that out. Reporting it over several draws shows how much is left.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {v.shape}")
    return DrawSpread(mean=float(v.mean()), sd=float(v.std(ddof=1)) if v.size > 1 else math.nan,
                      min=float(v.min()), max=float(v.max()), n=int(v.size))


def perfect_assistant_scores(
    prompts: Sequence[str], world: AssistantWorld | None = None
) -> np.ndarray:
    """The judge's score of :meth:`AssistantWorld.best_response` for every prompt: the perfect
    assistant's answers, scored like any model's (each distinct prompt judged once)."""
    world = world or DEFAULT_WORLD
    cache: dict[str, float] = {}
    for p in prompts:
        if p not in cache:
            cache[p] = world.true_score(p, world.best_response(p))
    return np.array([cache[p] for p in prompts], dtype=np.float64)


def best_of_n_win_rates(
    candidate_scores: np.ndarray,
    baseline_scores: Sequence[float],
    ns: Sequence[int],
    best: float | Sequence[float],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[int, WinRate]:
    r"""Best-of-n by the true score against the baseline, for each n in ``ns``.

    ``candidate_scores[i, j]`` is the true score of candidate j for comparison i; best-of-n
    keeps s_i^{(n)} = max_{j<n} candidate_scores[i, j] (the first n candidates, so the sets are
    nested) and compares it with baseline_scores[i] (:func:`win_rate` with ``best``: ceiling and
    share of gain included). An oracle: it picks with the hidden judge itself, which no trained
    method can do, so it shows how much a policy gains by merely *choosing* among its own
    samples.
    """
    s = np.asarray(candidate_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(baseline_scores):
        raise ValueError(f"candidate_scores must be [n_comparisons, n_candidates], got {s.shape} "
                         f"for {len(baseline_scores)} baseline scores")
    out = {}
    for n in ns:
        if not 1 <= n <= s.shape[1]:
            raise ValueError(f"n must be in 1..{s.shape[1]}, got {n}")
        out[int(n)] = win_rate(s[:, :n].max(axis=1), baseline_scores, n_bootstrap, seed,
                               best=best)
    return out


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
    """Two sets of answers to the same prompts, judged side by side. ``win`` carries the
    ceiling and share of gain; ``ceiling`` is the perfect assistant's :class:`WinRate` against
    the same b, ``floor`` that of an assistant that answers nothing (the empty answer)."""

    win: WinRate
    lc: LengthControlled
    a: SampleStats
    b: SampleStats
    scores_a: np.ndarray = field(repr=False)
    scores_b: np.ndarray = field(repr=False)
    ceiling: WinRate | None = None
    floor: WinRate | None = None


def compare_texts(
    prompts: Sequence[str],
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    world: AssistantWorld | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Judge answers a and b to the same prompts: win rate of a over b (± bootstrap error)
    with its ceiling and share of gain (the perfect assistant, :func:`perfect_assistant_scores`,
    against the same b answers), the length-controlled win rate (lengths in words), the floor
    (the empty answer against b) and both sets' :class:`SampleStats`."""
    world = world or DEFAULT_WORLD
    sa = np.array([world.true_score(p, t) for p, t in zip(prompts, texts_a, strict=True)])
    sb = np.array([world.true_score(p, t) for p, t in zip(prompts, texts_b, strict=True)])
    la = [len(tokens(t)) for t in texts_a]
    lb = [len(tokens(t)) for t in texts_b]
    best = perfect_assistant_scores(prompts, world)
    empty = np.array([world.true_score(p, "") for p in prompts])
    return Comparison(
        win=win_rate(sa, sb, n_bootstrap, seed, best=best),
        lc=length_controlled_win_rate(sa, sb, la, lb),
        a=sample_stats(prompts, texts_a, world),
        b=sample_stats(prompts, texts_b, world),
        scores_a=sa,
        scores_b=sb,
        ceiling=win_rate(best, sb, n_bootstrap, seed),
        floor=win_rate(empty, sb, n_bootstrap, seed, best=best),
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
        """A flat dict of the headline numbers (for printing or a results file): the win rate
        with its ceiling and share of gain (:func:`ceiling_summary`), LC, KL, sample stats."""
        out = {
            "win_rate": self.win.rate,
            "win_rate_stderr": self.win.stderr,
            "lc_win_rate": self.lc_win_rate,
            # below 0.05 the LC win rate is an extrapolation (LengthControlled.extrapolated)
            "lc_minority_share": self.comparison.lc.minority_share,
            "kl": self.kl,
            "kl_stderr": self.kl_stderr,
        }
        out.update(ceiling_summary(self.comparison))
        out.update({f"model_{k}": v for k, v in self.model.as_dict().items()})
        out.update({f"baseline_{k}": v for k, v in self.baseline.as_dict().items()})
        return out


def ceiling_summary(comparison: Comparison) -> dict[str, float]:
    """The ceiling fields of a results file, as :meth:`Evaluation.summary` writes them:
    ``ceiling`` (± ``ceiling_stderr``), ``share_of_gain`` (± ``share_of_gain_stderr``, paired
    bootstrap) and ``floor_empty_answer`` (the win rate of the empty answer)."""
    win, ceiling, floor = comparison.win, comparison.ceiling, comparison.floor
    out = {"ceiling": win.ceiling, "share_of_gain": win.share_of_gain,
           "share_of_gain_stderr": win.share_of_gain_stderr}
    if ceiling is not None:
        out["ceiling_stderr"] = ceiling.stderr
    if floor is not None:
        out["floor_empty_answer"] = floor.rate
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
    bootstrap stderr) beside its ceiling (the perfect assistant against the same baseline
    answers) and share of gain (WR − ½)/(ceiling − ½) with a paired bootstrap error, the
    length-controlled win rate, both models' :class:`SampleStats`, and KL(model ‖ reference)
    estimated on the model's samples (the reference defaults to the baseline; see
    :func:`kl_to_reference`). The baseline's answers use seed ``seed + 1``, so every
    evaluation with the same seed, baseline and prompts has the same ceiling.
    """
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


def oracle_best_of_n(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    ns: Sequence[int] = (1, 2, 4, 8),
    baseline_model: Any = None,
    world: AssistantWorld | None = None,
    n_samples: int = 1,
    max_new_tokens: int = 48,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Best-of-n by the hidden true score, against the baseline's answers.

    Draws the baseline's answers exactly as :func:`evaluate_against` does (``n_samples`` per
    prompt, seed ``seed + 1``; the baseline defaults to ``model``), then max(ns) candidate
    answers per comparison from ``model`` (candidate 0 with ``seed``, as
    :func:`evaluate_against`'s model samples; candidate j ≥ 1 with ``seed + 1 + j``), and
    returns ``{"ceiling": WinRate, "floor": WinRate, "best_of_n": {n: WinRate}, ...}``
    (:func:`best_of_n_win_rates`). With ``model`` the SFT model and the default baseline,
    best-of-1 is SFT against itself (≈ ½) and best-of-n climbs toward the ceiling.
    """
    world = world or DEFAULT_WORLD
    baseline_model = baseline_model if baseline_model is not None else model
    many = [p for p in prompts for _ in range(n_samples)]
    base = generate(baseline_model, tokenizer, many, max_new_tokens=max_new_tokens,
                    seed=seed + 1).texts
    sb = np.array([world.true_score(p, t) for p, t in zip(many, base, strict=True)])
    n_max = max(ns)
    cands = np.empty((len(many), n_max))
    for j in range(n_max):
        texts = generate(model, tokenizer, many, max_new_tokens=max_new_tokens,
                         seed=seed if j == 0 else seed + 1 + j).texts
        cands[:, j] = [world.true_score(p, t) for p, t in zip(many, texts, strict=True)]
    best = perfect_assistant_scores(many, world)
    empty = np.array([world.true_score(p, "") for p in many])
    return {
        "ceiling": win_rate(best, sb, n_bootstrap, seed),
        "floor": win_rate(empty, sb, n_bootstrap, seed, best=best),
        "best_of_n": best_of_n_win_rates(cands, sb, ns, best, n_bootstrap, seed),
        "baseline": sample_stats(many, base, world),
        "candidate_scores": cands,
        "baseline_scores": sb,
    }
