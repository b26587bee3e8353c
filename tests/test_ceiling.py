"""The ceiling of a win rate and the share of gain, against hand-computed values and an exact
bootstrap distribution enumerated over every resample."""

import itertools
import math

import numpy as np
import pytest

from rlcourse.evaluation import (
    best_of_n_win_rates,
    ceiling_indicators,
    compare_texts,
    perfect_assistant_scores,
    share_of_gain,
    win_indicators,
    win_rate,
)
from rlcourse.worlds.assistant import DEFAULT_WORLD

RAIN = "what do you know about rain?"


def test_ceiling_and_share_of_gain_by_hand():
    baseline = [1.0, 0.5, -1.0, 1.0]  # two of four baseline answers already score the best
    # the perfect assistant ties the two best answers and beats the others: (0.5+1+1+0.5)/4
    np.testing.assert_array_equal(ceiling_indicators(baseline, 1.0), [0.5, 1.0, 1.0, 0.5])
    model = [1.0, 1.0, 0.0, 0.5]  # tie, win, win, loss: (0.5 + 1 + 1 + 0) / 4 = 0.625
    wr = win_rate(model, baseline, best=1.0)
    assert wr.rate == 0.625 and wr.ceiling == 0.75
    assert wr.share_of_gain == pytest.approx((0.625 - 0.5) / (0.75 - 0.5))  # = 0.5
    assert "ceiling 0.750, share of gain 0.50" in str(wr)
    # without best, nothing about the ceiling is claimed
    plain = win_rate(model, baseline)
    assert math.isnan(plain.ceiling) and "ceiling" not in str(plain)
    # one best score per comparison works as well
    per = win_rate(model, baseline, best=[1.0, 1.0, 1.0, 1.0])
    assert (per.ceiling, per.share_of_gain) == (wr.ceiling, wr.share_of_gain)


def test_perfect_assistant_has_share_one_and_the_baseline_share_zero_with_zero_error():
    rng = np.random.default_rng(0)
    baseline = rng.choice([-1.0, 0.0, 0.5, 1.0], size=300)
    perfect = np.ones_like(baseline)
    top = win_rate(perfect, baseline, n_bootstrap=500, best=1.0)
    assert top.rate == top.ceiling == pytest.approx(1 - 0.5 * np.mean(baseline == 1.0))
    assert top.share_of_gain == 1.0
    # paired: every resample has numerator == denominator, so the error is exactly 0
    assert top.share_of_gain_stderr == 0.0
    # the baseline against its own answers: all ties, share 0, error 0
    same = win_rate(baseline, baseline, n_bootstrap=500, best=1.0)
    assert same.rate == 0.5 and same.share_of_gain == 0.0 and same.share_of_gain_stderr == 0.0


def test_an_unpaired_bootstrap_would_report_an_error_where_there_is_none():
    # The test above can fail: resampling numerator and denominator independently (a plausible
    # mistake) gives the perfect assistant a clearly non-zero error on the same data.
    rng = np.random.default_rng(0)
    baseline = rng.choice([-1.0, 0.0, 0.5, 1.0], size=300)
    c = ceiling_indicators(baseline, 1.0)
    w = c.copy()
    boot = np.random.default_rng(1)
    i, j = boot.integers(300, size=(2, 500, 300))
    unpaired = ((w[i].mean(1) - 0.5) / (c[j].mean(1) - 0.5)).std(ddof=1)
    assert unpaired > 0.02
    assert share_of_gain(w, c, 500, seed=1).stderr == 0.0


def test_share_of_gain_stderr_matches_the_exact_bootstrap_distribution():
    # n = 4 comparisons: all 4^4 = 256 equally likely resamples enumerated by hand; resamples
    # with ceiling 1/2 (only comparison 2, which the baseline already answers best) are left out,
    # as the implementation does.
    w = np.array([1.0, 0.0, 0.5, 1.0])
    c = np.array([1.0, 1.0, 0.5, 1.0])
    ratios = []
    for idx in itertools.product(range(4), repeat=4):
        num, den = w[list(idx)].mean() - 0.5, c[list(idx)].mean() - 0.5
        if den > 0:
            ratios.append(num / den)
    exact_se = float(np.std(ratios))
    got = share_of_gain(w, c, n_bootstrap=40_000, seed=3)
    assert got.value == pytest.approx((0.625 - 0.5) / (0.875 - 0.5))
    assert got.win_rate == 0.625 and got.ceiling == 0.875
    assert got.stderr == pytest.approx(exact_se, rel=0.03)
    # a constant ceiling (the baseline never best): the error is 2 x the win rate's error
    c1 = np.ones(4)
    exact = 2 * np.std([w[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    assert share_of_gain(w, c1, 40_000, seed=4).stderr == pytest.approx(exact, rel=0.03)


def test_share_of_gain_guards():
    # no gain possible (every baseline answer is already perfect): NaN, not a division by zero
    none = share_of_gain([0.5, 0.5], [0.5, 0.5])
    assert math.isnan(none.value) and math.isnan(none.stderr)
    with pytest.raises(ValueError):
        share_of_gain([1.0, 0.5], [1.0])
    # a baseline answer above "best": best is not the best, the ceiling would be wrong
    with pytest.raises(ValueError, match="baseline answer 1 scores 1.5 > best 1"):
        ceiling_indicators([0.0, 1.5], 1.0)
    with pytest.raises(ValueError, match="baseline answer 1"):
        win_rate([0.0, 0.0], [0.0, 1.5], best=1.0)


def test_best_of_n_by_hand():
    cands = np.array([[0.0, 1.0], [-1.0, 0.5], [1.0, 1.0]])
    baseline = [0.5, 0.0, 1.0]
    got = best_of_n_win_rates(cands, baseline, (1, 2), best=1.0, n_bootstrap=100)
    # n=1: [0, -1, 1] vs [0.5, 0, 1]: loss, loss, tie; n=2: [1, 0.5, 1]: win, win, tie
    assert got[1].rate == pytest.approx(0.5 / 3) and got[2].rate == pytest.approx(2.5 / 3)
    assert got[2].ceiling == pytest.approx(2.5 / 3) and got[2].share_of_gain == pytest.approx(1)
    with pytest.raises(ValueError):
        best_of_n_win_rates(cands, baseline, (3,), best=1.0)


def test_perfect_assistant_scores_are_the_best_score_on_every_prompt():
    prompts = DEFAULT_WORLD.prompts()
    np.testing.assert_array_equal(perfect_assistant_scores(prompts), DEFAULT_WORLD.max_score())


def test_compare_texts_carries_ceiling_and_floor():
    prompts = [RAIN] * 4
    good = ["rain is wet. snow is cold."] * 4
    bad = ["rain is wet. rain is dry.", "rain is wet. snow is cold. you are dumb.",
           "rain is wet. rain is wet.", "rain is wet. snow is cold."]  # -0.5, 0, 0, 1
    result = compare_texts(prompts, good, bad, n_bootstrap=200)
    # ceiling: beat three, tie the perfect one; good answers are perfect, so share 1
    assert result.ceiling.rate == result.win.ceiling == pytest.approx(3.5 / 4)
    assert result.win.share_of_gain == pytest.approx(1.0)
    # floor: the empty answer scores 0: beats -0.5, ties 0 and 0, loses to 1
    assert result.floor.rate == pytest.approx(2 / 4)
    np.testing.assert_array_equal(win_indicators(np.zeros(4), result.scores_b),
                                  [1.0, 0.5, 0.5, 0.0])


@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("rlcourse.models")
    torch.set_num_threads(1)
    tok = models.build_tokenizer(DEFAULT_WORLD.vocabulary())
    return tok, models.build_model(tok, seed=0, n_layers=1, hidden_size=32, n_heads=2)


def test_oracle_best_of_n_is_consistent_with_evaluate_against(tiny):
    from rlcourse.evaluation import evaluate_against, oracle_best_of_n

    tok, model = tiny
    prompts = DEFAULT_WORLD.prompts()[::40]
    ev = evaluate_against(model, model, tok, prompts, n_samples=2, max_new_tokens=10, seed=7,
                          n_bootstrap=50)
    oracle = oracle_best_of_n(model, tok, prompts, ns=(1, 2, 4), n_samples=2, max_new_tokens=10,
                              seed=7, n_bootstrap=50)
    # the same baseline answers, so the same ceiling; best-of-1 is evaluate_against's samples
    np.testing.assert_array_equal(oracle["baseline_scores"], ev.comparison.scores_b)
    assert oracle["ceiling"].rate == ev.win.ceiling == ev.summary()["ceiling"]
    assert oracle["best_of_n"][1].rate == ev.win.rate
    rates = [oracle["best_of_n"][n].rate for n in (1, 2, 4)]
    assert rates == sorted(rates) and rates[-1] <= oracle["ceiling"].rate  # nested sets
    s = ev.summary()
    assert {"ceiling", "ceiling_stderr", "share_of_gain", "share_of_gain_stderr",
            "floor_empty_answer"} <= set(s)
    assert s["share_of_gain"] == pytest.approx((s["win_rate"] - 0.5) / (s["ceiling"] - 0.5))
