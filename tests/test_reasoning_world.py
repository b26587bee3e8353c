"""The reasoning world: problems, worked solutions and their slips, splits, the verifier."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from rlcourse.verifiers import extract_answer
from rlcourse.worlds.reasoning import (
    DEFAULT_REASONING_WORLD,
    SPLITS,
    Difficulty,
    ReasoningWorld,
    SlipModel,
    is_hard_step,
    problem_split,
    reasoning_tokenizer,
)

WORLD = DEFAULT_REASONING_WORLD


def _evaluate(question: str) -> int:
    """An independent reading of a question: parse the story sentence by sentence."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
    for s in sentences[1:-1]:
        n = int(re.search(r"(\d+)", s).group(1))
        if re.search(r"(buys|finds|gets) \d+ more$", s):
            value += n
        elif re.search(r"(eats|gives away|loses|sells) \d+$", s):
            value -= n
        elif s.endswith("times as large"):
            value *= n
        else:
            raise AssertionError(s)
    assert sentences[-1].startswith("how many")
    return value


def test_problems_are_right_and_within_the_difficulty():
    d = Difficulty(min_steps=1, max_steps=3, max_start=10, max_operand=5, max_value=30)
    world = ReasoningWorld(d)
    for p in world.problems("train", 300, seed=1):
        assert _evaluate(p.question) == p.answer
        assert 1 <= len(p.steps) <= 3 and 2 <= p.start <= 10
        for s in p.steps:
            assert 0 <= s.after <= 30
            assert s.op == "mul" and s.operand in (2, 3) or 1 <= s.operand <= 5
        # the correct solution checks every step and ends with the answer line
        sol = p.solution()
        assert sol.endswith(f"#### {p.answer}") and extract_answer(sol) == str(p.answer)
        for a, sym, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", sol):
            assert eval(f"{a} {sym} {b}") == int(c)  # noqa: S307 -- digits and one operator


def test_difficulty_knob_changes_the_number_of_steps():
    # one step: about 19 * 20 skeletons, a tenth of them in the test split
    short = ReasoningWorld(Difficulty(min_steps=1, max_steps=1)).problems("test", 20, seed=0)
    long = ReasoningWorld(Difficulty(min_steps=6, max_steps=6)).problems("test", 20, seed=0)
    assert {len(p.steps) for p in short} == {1} and {len(p.steps) for p in long} == {6}
    with pytest.raises(ValueError):
        Difficulty(min_steps=3, max_steps=2)
    tiny = ReasoningWorld(Difficulty(min_steps=1, max_steps=1, max_start=3, max_operand=1))
    with pytest.raises(ValueError, match="too few problems"):
        tiny.problems("test", 50, seed=0)


def test_splits_never_share_a_problem_whatever_the_seed_or_wording():
    seen = {}
    for split in SPLITS:
        for seed in (0, 1):
            for p in WORLD.problems(split, 400, seed=seed):
                assert problem_split(p) == split
                assert seen.setdefault(p.skeleton(), split) == split
    # the split is the skeleton's hash, not the wording's
    p = WORLD.problem(seed=3)
    u = int.from_bytes(hashlib.sha256(p.skeleton().encode()).digest()[:8], "big") / 2**64
    lo, hi = SPLITS[problem_split(p)]
    assert lo <= u < hi
    # a stream holds no problem twice, and the same seed gives the same stream
    a = WORLD.problems("train", 300, seed=7)
    assert len({p.skeleton() for p in a}) == 300
    assert [p.question for p in a] == [p.question for p in WORLD.problems("train", 300, seed=7)]


def test_split_shares_follow_the_intervals():
    rng = np.random.default_rng(0)
    counts = {s: 0 for s in SPLITS}
    n = 4000
    for _ in range(n):
        counts[problem_split(WORLD.problem(rng))] += 1
    for split, (lo, hi) in SPLITS.items():
        assert abs(counts[split] / n - (hi - lo)) < 0.03


def test_slips_follow_the_slip_model():
    world = ReasoningWorld(slips=SlipModel(p_plain=0.1, p_carry=0.5), p_unmarked=0.0)
    problems = world.problems("train", 400, seed=2)
    rng = np.random.default_rng(0)
    hard = plain = hard_slips = plain_slips = 0
    right = []
    for p in problems:
        text, correct = world.worked_solution(p, rng)
        right.append(correct)
        assert correct == (extract_answer(text) == str(p.answer))
        eqs = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", text)
        assert len(eqs) == len(p.steps)
        for a, sym, b, c in eqs:
            true = eval(f"{a} {sym} {b}")  # noqa: S307
            op = {"+": "add", "-": "sub", "*": "mul"}[sym]
            slipped = int(c) != true
            assert not slipped or abs(int(c) - true) in (1, 2)
            if is_hard_step(op, int(a), true):
                hard, hard_slips = hard + 1, hard_slips + slipped
            else:
                plain, plain_slips = plain + 1, plain_slips + slipped
    assert abs(hard_slips / hard - 0.5) < 0.05 and abs(plain_slips / plain - 0.1) < 0.04
    # no slip, right answer: the share right is at least the clean rate (slips may cancel)
    clean = np.mean([world.clean_rate(p) for p in problems])
    assert clean - 0.05 < np.mean(right) < clean + 0.1
    # without slips every solution is the correct one
    for p in problems[:50]:
        assert world.worked_solution(p, rng, slips=False) == (p.solution(), True)


def test_unmarked_solutions_and_the_verifier():
    world = ReasoningWorld(p_unmarked=1.0)
    p = world.problem(seed=0)
    text, _ = world.worked_solution(p, seed=0, slips=False)
    assert "####" not in text and text.endswith(f"so the answer is {p.answer}.")
    assert world.reward([p.question], [text], [str(p.answer)]) == [1.0]
    assert world.reward([p.question], [f"#### {p.answer + 1}"], [p.answer]) == [0.0]


def test_sft_rows_and_tokenizer_cover_every_word():
    rows = WORLD.sft_rows(200, seed=0)
    tok = reasoning_tokenizer()
    unk = tok.unk_token_id
    assert len({r["prompt"] for r in rows}) == 200
    for r in rows:
        assert set(r) == {"prompt", "completion", "answer"}
        for text in (r["prompt"], r["completion"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert unk not in ids
            assert tok.decode(ids) == text  # decodes exactly as written, #### included
    assert len(tok.tokenize("#### 7")) == 2
