"""Win rates, bootstrap errors, the length-controlled win rate and the KL estimate, against hand
values, the binomial formula, a known generating model and brute-force log-probabilities."""

import math

import numpy as np
import pytest

from rlcourse.evaluation import (
    bootstrap_stderr,
    compare_texts,
    length_controlled_win_rate,
    sample_stats,
    win_indicators,
    win_rate,
)
from rlcourse.worlds.assistant import DEFAULT_WORLD

RAIN = "what do you know about rain?"


def test_win_rate_on_hand_examples():
    all_wins = win_rate([3, 2, 1], [0, 0, 0])
    assert (all_wins.rate, all_wins.wins, all_wins.ties, all_wins.losses) == (1.0, 3, 0, 0)
    assert all_wins.stderr == 0.0
    all_ties = win_rate([1, 1, 1, 1], [1, 1, 1, 1])
    assert all_ties.rate == 0.5 and all_ties.ties == 4
    mixed = win_rate([1, 1, 1, 0, 0], [0, 0, 0, 0, 1])  # 3 wins, 1 tie, 1 loss
    assert mixed.rate == pytest.approx((3 + 0.5) / 5)
    assert (mixed.wins, mixed.ties, mixed.losses, mixed.n) == (3, 1, 1, 5)
    assert "0.700" in str(mixed)
    np.testing.assert_array_equal(win_indicators([2, 1, 0], [1, 1, 1]), [1.0, 0.5, 0.0])


def test_win_rate_rejects_bad_shapes():
    with pytest.raises(ValueError):
        win_indicators([1, 2], [1])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_bootstrap_stderr_matches_the_binomial_formula():
    n, p = 2000, 0.7
    wins = int(n * p)
    a = np.r_[np.ones(wins), np.zeros(n - wins)]
    result = win_rate(a, np.full(n, 0.5), n_bootstrap=2000, seed=1)
    analytic = math.sqrt(p * (1 - p) / n)
    assert result.rate == pytest.approx(p)
    assert result.stderr == pytest.approx(analytic, rel=0.08)


def test_bootstrap_stderr_with_ties_matches_the_plug_in_formula():
    values = np.r_[np.ones(600), np.full(300, 0.5), np.zeros(100)]
    mean = (600 + 150) / 1000
    var = (600 * (1 - mean) ** 2 + 300 * (0.5 - mean) ** 2 + 100 * mean**2) / 1000
    assert bootstrap_stderr(values, 2000, seed=2) == pytest.approx(math.sqrt(var / 1000), rel=0.08)
    assert math.isnan(bootstrap_stderr([1.0]))
    assert bootstrap_stderr(values, 500, seed=3) == bootstrap_stderr(values, 500, seed=3)


@pytest.mark.parametrize("transform", ["tanh", "linear"])
def test_lc_win_rate_equals_win_rate_when_lengths_are_equal(transform):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    lengths = np.full(500, 12)
    lc = length_controlled_win_rate(a, b, lengths, lengths, transform=transform)
    assert lc.rate == pytest.approx(win_rate(a, b).rate, abs=1e-9)
    assert lc.win_rate == pytest.approx(win_rate(a, b).rate, abs=1e-12)


def _grouped_length_effect(slope, intercept, transform, per_group=20_000):
    """Comparisons whose win share at each length difference d is exactly
    σ(intercept + slope·x(d)) (up to rounding), x(d) as in the regression."""
    diffs = np.arange(-2, 7)
    scores_a, scores_b, len_a, len_b = [], [], [], []
    # the regression standardises d by its standard deviation over all comparisons
    scale = np.std(np.repeat(diffs, per_group))
    for d in diffs:
        x = d / scale if transform == "linear" else np.tanh(d / scale)
        wins = round(per_group / (1 + math.exp(-(intercept + slope * x))))
        scores_a += [1] * wins + [0] * (per_group - wins)
        scores_b += [0.5] * per_group
        len_a += [20 + d] * per_group
        len_b += [20] * per_group
    return scores_a, scores_b, len_a, len_b


@pytest.mark.parametrize("transform", ["tanh", "linear"])
def test_lc_win_rate_removes_a_pure_length_effect(transform):
    # equally good answers; the judge prefers the longer one; a is mostly longer
    data = _grouped_length_effect(slope=1.5, intercept=0.0, transform=transform)
    lc = length_controlled_win_rate(*data, transform=transform)
    assert lc.win_rate > 0.6  # the raw win rate is inflated by length
    assert lc.rate == pytest.approx(0.5, abs=0.005)
    assert lc.slope == pytest.approx(1.5, abs=0.02)


def test_lc_win_rate_keeps_a_real_quality_effect():
    data = _grouped_length_effect(slope=1.0, intercept=0.8, transform="tanh")
    lc = length_controlled_win_rate(*data)
    assert lc.rate == pytest.approx(1 / (1 + math.exp(-0.8)), abs=0.005)


def test_lc_win_rate_all_wins_stays_finite():
    lc = length_controlled_win_rate([1, 1, 1], [0, 0, 0], [3, 5, 9], [4, 4, 4])
    assert 0.99 < lc.rate <= 1.0 and math.isfinite(lc.intercept)


def test_compare_texts_and_sample_stats_on_hand_examples():
    prompts = [RAIN] * 4
    good = ["rain is wet. snow is cold."] * 4
    bad = [
        "rain is wet. rain is dry.",  # false
        "rain is wet. snow is cold. you are dumb.",  # rude
        "rain is wet. rain is wet.",  # repetition
        "rain is wet. snow is cold.",  # tie
    ]
    result = compare_texts(prompts, good, bad, n_bootstrap=200)
    assert result.win.rate == pytest.approx(3.5 / 4)
    np.testing.assert_allclose(result.scores_b, [-0.5, 0.0, 0.0, 1.0])
    stats = sample_stats(prompts, bad)
    assert (stats.share_false, stats.share_rude, stats.share_repetition) == (0.25, 0.25, 0.25)
    assert stats.share_flawed == 0.75 and stats.share_best == 0.25
    assert stats.mean_length == pytest.approx((8 + 12 + 8 + 8) / 4)
    assert stats.mean_score == pytest.approx((-0.5 + 0 + 0 + 1) / 4)
    assert result.a.share_best == 1.0 and result.a.mean_score == 1.0


# ---- models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("rlcourse.models")
    torch.set_num_threads(1)
    tok = models.build_tokenizer(DEFAULT_WORLD.vocabulary())
    a = models.build_model(tok, seed=0, n_layers=1, hidden_size=32, n_heads=2)
    b = models.build_model(tok, seed=1, n_layers=1, hidden_size=32, n_heads=2)
    return tok, a, b


def _brute_force_logprob(model, tok, prompt, completion_ids):
    """log π(y|x) summed token by token with one unpadded forward pass (float64 sums)."""
    import torch

    from rlcourse.models import format_prompt

    prompt_ids = tok(format_prompt(prompt, tok), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    total = 0.0
    for j, token in enumerate(completion_ids):
        total += float(logp[len(prompt_ids) + j - 1, token])
    return total


def test_evaluate_against_itself_has_zero_kl_and_kl_matches_brute_force(tiny_models):
    from rlcourse.evaluation import evaluate_against, kl_to_reference
    from rlcourse.models import generate

    tok, a, b = tiny_models
    prompts = DEFAULT_WORLD.prompts()[::50]
    same = evaluate_against(a, a, tok, prompts, n_samples=2, max_new_tokens=12, n_bootstrap=100)
    assert same.kl == pytest.approx(0.0, abs=1e-6)
    assert len(same.texts) == len(same.baseline_texts) == 2 * len(prompts)
    assert 0.0 <= same.win.rate <= 1.0 and same.win.n == 2 * len(prompts)
    assert set(same.summary()) >= {"win_rate", "win_rate_stderr", "lc_win_rate", "kl"}

    gen = generate(a, tok, prompts, max_new_tokens=12, seed=5)
    kl, _ = kl_to_reference(a, b, gen, batch_size=3)
    expected = []
    for i, prompt in enumerate(prompts):
        ids = gen.completion_ids[i][gen.completion_mask[i].bool()].tolist()
        expected.append(
            _brute_force_logprob(a, tok, prompt, ids) - _brute_force_logprob(b, tok, prompt, ids)
        )
    assert kl == pytest.approx(float(np.mean(expected)), abs=1e-4)


def test_lc_win_rate_flags_an_extrapolation_when_one_side_is_always_shorter():
    # The degenerate case a collapsed model produces: it answers nothing (length 0) and loses
    # most comparisons; "equal length" lies outside the data, so the fitted sigma(theta0) means
    # little and must be flagged.
    rng = np.random.default_rng(0)
    n = 400
    lengths_b = rng.integers(5, 30, size=n).astype(float)
    lengths_a = np.zeros(n)
    scores_b = rng.normal(size=n)
    scores_a = np.where(rng.random(n) < 0.25, scores_b + 1.0, scores_b - 1.0)  # wins 25 %
    lc = length_controlled_win_rate(scores_a, scores_b, lengths_a, lengths_b)
    assert lc.win_rate == pytest.approx(0.25, abs=0.06)
    assert lc.minority_share == 0.0 and lc.extrapolated
    # 3 of 400 pairs on the other side (0.75 %) still count as an extrapolation; 10 % do not
    for k, flagged in ((3, True), (40, False)):
        la = lengths_a.copy()
        la[:k] = lengths_b[:k] + 2
        got = length_controlled_win_rate(scores_a, scores_b, la, lengths_b)
        assert got.minority_share == pytest.approx(k / n)
        assert got.extrapolated is flagged
    # balanced lengths: half the pairs on each side (ties count on both)
    la = np.array([1.0, 3.0, 2.0, 5.0])
    lb = np.array([2.0, 2.0, 2.0, 4.0])
    got = length_controlled_win_rate([1, 0, 1, 0], [0, 1, 0, 1], la, lb)
    assert got.minority_share == pytest.approx(min(3 / 4, 2 / 4)) and not got.extrapolated


# ---- several seeds against one baseline draw: the paired bootstrap over prompts ---------------


def test_seed_mean_paired_on_a_hand_computable_case():
    from rlcourse.evaluation import seed_mean_paired

    # Two seeds, two prompts; both seeds win prompt 0 and lose prompt 1 (the baseline answered
    # prompt 0 badly and prompt 1 well). The per-prompt means are m = (1, 0), so the ideal
    # bootstrap of the mean of two draws from {1, 0} has sd sqrt(var(m)/2) = sqrt(1/8).
    r = seed_mean_paired([[1.0, 0.0], [1.0, 0.0]], [1.0, 0.5], n_bootstrap=40_000, seed=0)
    assert r.win_rate == 0.5 and r.ceiling == 0.75 and r.share_of_gain == 0.0
    assert r.per_seed == (0.5, 0.5) and r.n_seeds == 2
    assert r.naive_stderr == 0.0  # the seeds agree: their spread sees no error at all
    assert r.win_rate_stderr == pytest.approx(math.sqrt(1 / 8), rel=0.02)
    # Share of gain: resamples (0,0) -> G = (1 - .5)/(1 - .5) = 1 (prob 1/4); (1,1) has ceiling
    # 1/2 and is left out (1/4); (0,1), (1,0) -> G = 0 (1/2). Kept: G = 1 w.p. 1/3, 0 w.p. 2/3,
    # sd sqrt(2/9).
    assert r.share_of_gain_stderr == pytest.approx(math.sqrt(2 / 9), rel=0.02)
    # answers per prompt: the prompt is the unit, its answers are averaged first
    r3 = seed_mean_paired(np.array([[[1, 1], [0, 0]], [[1, 1], [0, 0]]], float),
                          np.array([[1, 1], [0.5, 0.5]]), n_bootstrap=40_000)
    assert (r3.n_prompts, r3.n_samples) == (2, 2)
    assert r3.win_rate_stderr == pytest.approx(math.sqrt(1 / 8), rel=0.02)
    with pytest.raises(ValueError, match="matching shapes"):
        seed_mean_paired([[1.0, 0.0]], [1.0, 0.5, 0.5])


def test_seed_mean_paired_matches_the_true_error_when_seeds_share_the_baseline():
    """Monte Carlo oracle: draw the baseline's answers and S seeds' answers again and again,
    the true standard error of the seed mean is the sd of its values over repetitions. The
    paired bootstrap (one repetition's data) recovers it; the spread over seeds cannot see the
    shared baseline and is much smaller."""
    from rlcourse.evaluation import seed_mean_paired

    rng = np.random.default_rng(0)
    n_prompts, n_seeds, reps = 300, 3, 2000

    def draw():
        # per prompt, the baseline answer is perfect (1) with prob 0.45, else a flawed 0;
        # each seed's answer is perfect with prob 0.8, flawed otherwise
        base = (rng.random(n_prompts) < 0.45).astype(float)
        seeds = (rng.random((n_seeds, n_prompts)) < 0.8).astype(float)
        return np.stack([win_indicators(s, base) for s in seeds]), win_indicators(
            np.ones(n_prompts), base)

    means = [draw()[0].mean() for _ in range(reps)]
    true_se = float(np.std(means, ddof=1))
    w, c = draw()
    r = seed_mean_paired(w, c, n_bootstrap=4000, seed=1)
    assert r.win_rate_stderr == pytest.approx(true_se, rel=0.15)
    assert r.naive_stderr < 0.8 * r.win_rate_stderr
    # the old rule sqrt(sum of per-seed bootstrap SEs^2)/S also treats seeds as independent
    independent = math.sqrt(sum(bootstrap_stderr(x, 2000, k) ** 2
                                for k, x in enumerate(w))) / n_seeds
    assert independent < 0.8 * r.win_rate_stderr


def test_spread_over_draws():
    from rlcourse.evaluation import spread_over_draws

    s = spread_over_draws([0.9, 0.95, 1.0])
    assert (s.mean, s.min, s.max, s.n) == (pytest.approx(0.95), 0.9, 1.0, 3)
    assert s.sd == pytest.approx(0.05)
    assert math.isnan(spread_over_draws([0.5]).sd)
    with pytest.raises(ValueError):
        spread_over_draws([])
