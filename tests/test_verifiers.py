"""The verifier (answer extraction, normalisation, rewards) and the unbiased pass@k estimator,
against hand-written cases and brute-force enumeration."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from rlcourse.verifiers import (
    answers_match,
    extract_answer,
    format_reward,
    gsm8k_exact_match,
    gsm8k_exact_match_with_reasoning,
    has_reasoning,
    normalise_number,
    pass_at_k,
    pass_at_k_curve,
    random_reward_fn,
    reference_answer,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("42", "42"), ("1,000", "1000"), ("$1,000.00", "1000"), ("+7", "7"), ("-0", "0"),
    ("\u22125", "-5"), ("3.50", "3.5"), ("3.0", "3"), ("0.25", "0.25"), ("1/2", "0.5"),
    ("2/6", "1/3"), ("12.", "12"), ("50%", "50"), ("-$3", "-3"), (".5", "0.5"),
    ("1,23", None), ("abc", None), ("", None), ("1/0", None), ("1,2345", None),
])
def test_normalise_number(text, expected):
    assert normalise_number(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    # GSM8K's marker: the first number after the last ####
    ("3 + 5 = 8. 8 - 2 = 6.\n#### 6", "6"),
    ("#### 1,234", "1234"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### -5", "-5"),
    ("#### $18.00 dollars", "18"),
    ("first #### 3, then #### 4", "4"),
    ("#### ", None),                      # a marker without a number is no answer
    ("it is 7. ####", None),              # ... and the text before it is not read
    # \boxed{} when there is no marker
    (r"so the answer is \boxed{72}.", "72"),
    (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{\$18}", "18"),
    (r"\boxed{\frac{3}{4}}", "0.75"),
    (r"\boxed{-\frac{1}{3}}", "-1/3"),
    (r"\boxed{\text{5}}", "5"),
    (r"first \boxed{3} then \boxed{4}", "4"),
    # the last number otherwise
    ("she has 12 - 3 = 9 apples left.", "9"),
    ("8 - 2 = 6", "6"),                   # "- 2" is a minus sign between numbers, not -2
    ("the answer is 1,000,000.", "1000000"),
    ("no number here", None),
    ("version2 has 3", "3"),              # a digit glued to a word is not a number
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_without_the_last_number_reads_only_markers():
    assert extract_answer("the answer is 9", read_last_number=False) is None
    assert extract_answer("#### 9", read_last_number=False) == "9"
    assert extract_answer(r"\boxed{9}", read_last_number=False) == "9"


def test_reference_answer_and_match():
    assert reference_answer("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18") == "18"
    assert reference_answer("72") == "72"
    assert reference_answer(72) == "72"
    assert reference_answer(2.5) == "2.5"
    assert reference_answer(float("nan")) is None
    with pytest.raises(TypeError):
        reference_answer(True)
    assert answers_match("0.5", "1/2")  # compared as exact rationals
    assert answers_match("0.5", "0.5") and answers_match("1000", "1000")
    assert not answers_match(None, "3") and not answers_match("3", None)
    assert not answers_match("3", "-3")


@pytest.mark.parametrize(("text", "expected"), [
    ("#### 42", False), ("42", False), (r"\boxed{42}.", False), ("$42.", False),
    ("6 * 7 = 42. #### 42", True), ("the answer is 42", True), (r"6*7: \boxed{42}", True),
])
def test_has_reasoning(text, expected):
    assert has_reasoning(text) is expected


def test_gsm8k_exact_match_on_rows():
    answers = ["He has 3 + 4 = 7.\n#### 7", "#### 1,000", "12", "#### -2", "0.5"]
    completions = ["3 + 4 = 7. #### 7", "so $1000", "#### 12.0", "#### 2", r"\boxed{1/2}"]
    assert gsm8k_exact_match(["p"] * 5, completions, answers) == [1.0, 1.0, 1.0, 0.0, 1.0]
    # TRL's convention: other columns arrive as keyword arguments and are ignored
    assert gsm8k_exact_match(["p"], ["#### 7"], answer=["7"], question=["q"], id=[3]) == [1.0]
    # a bare number earns nothing when reasoning is required
    bare = ["#### 7", "7", "3 + 4 = 7. #### 7"]
    assert gsm8k_exact_match(["p"] * 3, bare, ["7"] * 3, require_reasoning=True) == \
        [0.0, 0.0, 1.0]
    assert gsm8k_exact_match_with_reasoning(["p"] * 3, bare, ["7"] * 3) == [0.0, 0.0, 1.0]
    # the marker decides over the last number
    assert gsm8k_exact_match(["p"], ["#### 7 and then 8"], ["7"]) == [1.0]
    assert gsm8k_exact_match(["p"], ["it is 7"], ["7"], read_last_number=False) == [0.0]


def test_gsm8k_exact_match_rejects_bad_references():
    with pytest.raises(ValueError, match="2 completions but 1 reference"):
        gsm8k_exact_match(["p", "q"], ["1", "2"], ["1"])
    with pytest.raises(TypeError, match="one reference per completion"):
        gsm8k_exact_match(["p"], ["1"], "1")


def test_controls():
    texts = ["1 + 1 = 2. #### 2", "1 + 1 = 3. #### 3", "so the answer is 2.", "#### none"]
    assert format_reward(["p"] * 4, texts) == [1.0, 1.0, 0.0, 0.0]
    a = random_reward_fn(seed=3)(["p"] * 1000, ["x"] * 1000)
    b = random_reward_fn(seed=3)(["p"] * 1000, ["x"] * 1000)
    assert a == b and set(a) <= {0.0, 1.0} and 0.45 < np.mean(a) < 0.55
    assert random_reward_fn(p=0.0)(["p"], ["x"]) == [0.0]
    with pytest.raises(ValueError):
        random_reward_fn(p=1.5)


# ---- pass@k ------------------------------------------------------------------------------


def _brute_force(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (10, 3, 1, 0.3),                  # pass@1 is the share correct
    (5, 2, 2, 1 - 3 / 10),            # 1 - C(3,2)/C(5,2)
    (4, 1, 2, 1 - 3 / 6),             # 1 - C(3,2)/C(4,2)
    (6, 0, 3, 0.0), (6, 6, 3, 1.0),
    (6, 4, 3, 1.0),                   # n - c < k: every 3-subset holds a correct sample
    (8, 2, 8, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_matches_exact_binomials():
    n, c = 1000, 7
    for k in (1, 10, 256, 900):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    # vectorised over problems
    out = pass_at_k(256, np.array([0, 1, 128, 256]), 8)
    assert out.shape == (4,) and out[0] == 0.0 and out[-1] == 1.0
    assert out[1] == pytest.approx(8 / 256)


def test_pass_at_k_is_unbiased_for_one_minus_one_minus_p_to_the_k():
    """Average of the estimator over the binomial distribution of c equals 1 - (1 - p)^k."""
    n, p = 12, 0.3
    for k in (1, 2, 5, 12):
        mean = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * pass_at_k(n, c, k)
                   for c in range(n + 1))
        assert mean == pytest.approx(1 - (1 - p) ** k, abs=1e-12)


def test_pass_at_k_is_best_of_n_of_a_correctness_score():
    """An independent estimator: the expected best of k of the n samples, scored 0/1."""
    from rlcourse.online import best_of_n_expectation

    rng = np.random.default_rng(0)
    correct = rng.random((5, 16)) < 0.2
    for k in (1, 3, 16):
        expected = best_of_n_expectation(correct.astype(float), correct.astype(float), k)
        assert pass_at_k(16, correct.sum(1), k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in ((4, 1, 0), (4, 1, 5), (4, 5, 2), (4, -1, 2)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(4, np.array([0.5]), 1)


def test_pass_at_k_curve():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)
    curve = pass_at_k_curve(correct)
    assert sorted(curve) == [1, 2, 4]
    assert curve[1][0] == pytest.approx((0.25 + 0.5) / 2)
    assert curve[2][0] == pytest.approx((0.5 + (1 - 1 / 6)) / 2)
    assert curve[4][0] == 1.0 and curve[4][1] == 0.0
    assert curve[1][1] == pytest.approx(np.std([0.25, 0.5], ddof=1) / math.sqrt(2))
    with pytest.raises(ValueError):
        pass_at_k_curve(np.zeros(4, dtype=bool))
