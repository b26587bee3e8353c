"""Exercises of chapter 6, "The small GPT: pretraining, SFT and what SFT cannot teach".

Log-probabilities follow the shift convention of :mod:`rlcourse.models`: ``logits[:, t]`` is the
distribution of the next token ``input_ids[:, t+1]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlcourse import evaluation
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "06_small_gpt"


def _t(x, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# ---- the SFT loss: mean NLL over completion tokens -----------------------------------------------
def _token_lp(logits, input_ids):
    logp = torch.log_softmax(logits[:, :-1], -1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _sft_loss(logits, input_ids, completion_mask):
    m = completion_mask[:, 1:].to(logits.dtype)
    return -(_token_lp(logits, input_ids) * m).sum() / m.sum()


def _sft_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for B, L, V in ((2, 6, 5), (3, 9, 7), (4, 8, 4)):
        mask = np.zeros((B, L), dtype=np.int64)
        for b in range(B):
            start = int(rng.integers(1, L - 2))
            end = int(rng.integers(start + 1, L + 1))
            mask[b, start:end] = 1  # the prompt before, padding after
        cases.append(Case((_t(rng.normal(size=(B, L, V)) * 2),
                           torch.as_tensor(rng.integers(0, V, size=(B, L))),
                           torch.as_tensor(mask)),
                          label=f"{B} prompt+completion sequences of {L} tokens"))
    return cases


def _sft_with_prompt(logits, input_ids, completion_mask):
    return -_token_lp(logits, input_ids).mean()


def _sft_no_shift(logits, input_ids, completion_mask):
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, :, None]).squeeze(-1)
    m = completion_mask.to(logits.dtype)
    return -(logp * m).sum() / m.sum()


def _sft_sequence_mean(logits, input_ids, completion_mask):
    m = completion_mask[:, 1:].to(logits.dtype)
    return (-(_token_lp(logits, input_ids) * m).sum(-1) / m.sum(-1)).mean()


def _sft_sum(logits, input_ids, completion_mask):
    m = completion_mask[:, 1:].to(logits.dtype)
    return -(_token_lp(logits, input_ids) * m).sum()


register(Exercise(
    name="sft_token_loss",
    chapter=CHAPTER,
    reference=_sft_loss,
    cases=_sft_cases,
    hint="L = -sum_{b,t} m[b,t+1] log_softmax(logits[b,t])[ids[b,t+1]] / sum_{b,t} m[b,t+1]: "
         "shift (position t predicts t+1), mask with completion_mask[:, 1:], divide by the "
         "number of completion tokens in the whole batch.",
    wrong_answers=[
        (_sft_with_prompt, "prompt and padding not masked: that is a pretraining loss"),
        (_sft_no_shift, "no shift: logits[:, t] scores the NEXT token, not token t"),
        (_sft_sequence_mean, "a mean per sequence, then over sequences: every sequence weighs "
                             "the same instead of every token"),
        (_sft_sum, "a sum, not a mean over tokens: the loss grows with the batch"),
    ],
))


# ---- win rate with ties counting half -----------------------------------------------------------
def _win_rate(scores_a, scores_b):
    return float(evaluation.win_indicators(scores_a, scores_b).mean())


def _wr_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case(([1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 1.0, 1.0]), label="win, tie, loss, tie")]
    for n in (10, 37):
        a = rng.integers(-2, 3, size=n) * 0.5
        b = rng.integers(-2, 3, size=n) * 0.5
        cases.append(Case((a, b), label=f"{n} comparisons with ties"))
    return cases


def _wr_ties_lose(scores_a, scores_b):
    return float(np.mean(np.asarray(scores_a) > np.asarray(scores_b)))


def _wr_ties_ignored(scores_a, scores_b):
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    wins, losses = np.sum(a > b), np.sum(a < b)
    return float(wins / (wins + losses))


def _wr_ties_win(scores_a, scores_b):
    return float(np.mean(np.asarray(scores_a) >= np.asarray(scores_b)))


register(Exercise(
    name="win_rate_with_ties",
    chapter=CHAPTER,
    reference=_win_rate,
    cases=_wr_cases,
    hint="WR = (wins + ties / 2) / n, with n counting every comparison, ties included.",
    wrong_answers=[
        (_wr_ties_lose, "ties counted as losses"),
        (_wr_ties_ignored, "ties dropped from the count"),
        (_wr_ties_win, "ties counted as wins"),
    ],
))


# ---- standard error of a win rate ---------------------------------------------------------------
def _wr_stderr(scores_a, scores_b):
    w = evaluation.win_indicators(scores_a, scores_b)
    return float(w.std() / math.sqrt(w.size))


def _se_binomial(scores_a, scores_b):
    p = _win_rate(scores_a, scores_b)
    return math.sqrt(p * (1 - p) / len(scores_a))


def _se_no_sqrt_n(scores_a, scores_b):
    return float(evaluation.win_indicators(scores_a, scores_b).std())


def _se_over_n(scores_a, scores_b):
    w = evaluation.win_indicators(scores_a, scores_b)
    return float(w.std() / w.size)


register(Exercise(
    name="win_rate_stderr",
    chapter=CHAPTER,
    reference=_wr_stderr,
    cases=_wr_cases,
    hint="The win rate is the mean of w_i in {0, 1/2, 1}; its standard error is sd(w)/sqrt(n) "
         "with the plug-in sd = sqrt(mean((w - mean(w))^2)). A tie (w = 1/2) varies less than "
         "a win or a loss.",
    wrong_answers=[
        (_se_binomial, "the binomial sqrt(p(1-p)/n) treats every tie as half a win and half a "
                       "loss, which overstates the spread"),
        (_se_no_sqrt_n, "that is the spread of a single comparison: divide by sqrt(n)"),
        (_se_over_n, "divide the standard deviation by sqrt(n), not by n"),
    ],
))


# ---- share of gain toward the ceiling ------------------------------------------------------------
def _gain(scores_model, scores_baseline, best):
    w = evaluation.win_indicators(scores_model, scores_baseline)
    c = evaluation.ceiling_indicators(scores_baseline, best)
    return float((w.mean() - 0.5) / (c.mean() - 0.5))


def _gain_cases(rng: np.random.Generator) -> list[Case]:
    # baseline: tie, best (tied by the perfect answer), loss, best -> ceiling 3/4, WR 5/8
    cases = [Case(([1.0, 1.0, 0.0, 0.5], [1.0, 0.5, -1.0, 1.0], 1.0),
                  label="4 comparisons, 2 baseline answers already best")]
    for n, p_best in ((40, 0.5), (73, 0.2)):
        b = np.where(rng.random(n) < p_best, 1.0, rng.integers(-2, 2, size=n) * 0.5)
        a = np.where(rng.random(n) < 0.6, 1.0, rng.integers(-2, 3, size=n) * 0.5)
        cases.append(Case((a, b, 1.0), label=f"{n} comparisons, about {p_best:.0%} already best"))
    return cases


def _gain_ceiling_one(scores_model, scores_baseline, best):
    return (_win_rate(scores_model, scores_baseline) - 0.5) / 0.5


def _gain_ties_lose(scores_model, scores_baseline, best):
    q = float(np.mean(np.asarray(scores_baseline, float) >= best))
    return (_win_rate(scores_model, scores_baseline) - 0.5) / (1 - q - 0.5)


def _gain_ratio(scores_model, scores_baseline, best):
    q = float(np.mean(np.asarray(scores_baseline, float) >= best))
    return _win_rate(scores_model, scores_baseline) / (1 - q / 2)


register(Exercise(
    name="share_of_gain",
    chapter=CHAPTER,
    reference=_gain,
    cases=_gain_cases,
    hint="Ceiling C = mean of c_i, c_i = 1 if the baseline answer scores below best and 1/2 if it "
         "already scores best (the perfect answer ties it): C = 1 - q/2. Then "
         "SoG = (WR - 1/2) / (C - 1/2), WR with ties counting half.",
    wrong_answers=[
        (_gain_ceiling_one, "the ceiling taken as 1: against a baseline whose answers are often "
                            "already perfect, even the perfect assistant cannot win them all"),
        (_gain_ties_lose, "the perfect answer's ties with already-perfect baseline answers "
                          "counted as losses: they count half"),
        (_gain_ratio, "WR / C is not a share of the gain: the gain starts at 1/2 (the "
                      "baseline against itself), so subtract 1/2 from both"),
    ],
))


# ---- length-controlled win rate -----------------------------------------------------------------
def _lc(scores_a, scores_b, lengths_a, lengths_b):
    return evaluation.length_controlled_win_rate(
        scores_a, scores_b, lengths_a, lengths_b, transform="linear"
    ).rate


def _lc_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for n, quality, length_effect in ((400, 0.0, 0.8), (600, 0.7, 0.5), (300, -0.5, 0.0)):
        la = rng.integers(10, 30, size=n).astype(float)
        lb = la - rng.integers(-2, 8, size=n)  # a tends to be longer
        d = (la - lb) / np.std(la - lb)
        p = 1 / (1 + np.exp(-(quality + length_effect * d)))
        sa = (rng.random(n) < p).astype(float)
        sb = np.full(n, 0.5)
        cases.append(Case((sa, sb, la, lb), label=f"{n} comparisons"))
    return cases


def _lc_raw(scores_a, scores_b, lengths_a, lengths_b):
    return _win_rate(scores_a, scores_b)


def _lc_no_intercept(scores_a, scores_b, lengths_a, lengths_b):
    return 0.5  # a model without an intercept predicts 1/2 at zero length difference


def _lc_at_mean(scores_a, scores_b, lengths_a, lengths_b):
    lc = evaluation.length_controlled_win_rate(
        scores_a, scores_b, lengths_a, lengths_b, transform="linear"
    )
    d = np.asarray(lengths_a, float) - np.asarray(lengths_b, float)
    return float(1 / (1 + np.exp(-(lc.intercept + lc.slope * d.mean() / lc.scale))))


register(Exercise(
    name="lc_win_rate",
    chapter=CHAPTER,
    reference=_lc,
    cases=_lc_cases,
    hint="Fit P(win_i) = sigmoid(t0 + t1 * x_i), x_i = (la_i - lb_i) / sd(la - lb), by maximum "
         "likelihood (a few Newton steps: t <- t - H^-1 g with g = X^T(p - w), "
         "H = X^T diag(p(1-p)) X), then report sigmoid(t0): the win rate at equal length.",
    wrong_answers=[
        (_lc_raw, "the raw win rate: the length effect is still in it"),
        (_lc_no_intercept, "no intercept: the model then says 1/2 at equal length, whatever "
                           "the quality"),
        (_lc_at_mean, "predicted at the mean length difference instead of at zero"),
    ],
    compare=lambda e, r: abs(float(e) - float(r)) < 2e-4,
))
