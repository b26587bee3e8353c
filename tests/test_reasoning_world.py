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


def _read(question: str) -> tuple[int, str]:
    """An independent reading of a question, sentence by sentence: (answer, skeleton)."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
    skeleton = [str(value)]
    for s in sentences[1:-1]:
        n = int(re.search(r"(\d+)", s).group(1))
        if re.search(r"(buys|finds|gets) \d+ more$", s):
            value, op = value + n, "add"
        elif re.search(r"(eats|gives away|loses|sells) \d+$", s):
            value, op = value - n, "sub"
        elif s.endswith("times as large"):
            value, op = value * n, "mul"
        else:
            raise AssertionError(s)
        skeleton.append(f"{op} {n}")
    assert sentences[-1].startswith("how many")
    return value, "|".join(skeleton)


def _evaluate(question: str) -> int:
    return _read(question)[0]


def _split_of(question: str) -> str:
    digest = hashlib.sha256(_read(question)[1].encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= u < hi)


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
        slipped_any = any(eval(f"{a} {s} {b}") != int(c) for a, s, b, c in eqs)  # noqa: S307
        assert correct == (not slipped_any)  # errors compound: one slip makes it wrong
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
    # slips never cancel: right exactly when no step slipped
    clean = np.mean([world.clean_rate(p) for p in problems])
    assert abs(np.mean(right) - clean) < 0.05
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


def _load_build():
    import importlib.util
    import sys

    from rlcourse.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("data_build_reasoning",
                                                  REPO_ROOT / "data" / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build
    spec.loader.exec_module(build)
    return build


def test_reasoning_build_is_bit_for_bit_and_keeps_splits_apart(tmp_path):
    """data/build.py's reasoning step in miniature, twice: the same bytes; held-out problems
    are of their split and no RL or SFT problem is a held-out one."""
    import json

    from rlcourse.data import read_jsonl

    build = _load_build()
    cfg = build.ReasoningBuildConfig(n_layers=1, hidden_size=32, n_heads=2, n_sft=40,
                                     n_sft_shipped=10, sft_steps=2, warmup_steps=1,
                                     n_rl_prompts=12, n_validation=6, n_test=6,
                                     eval_samples_per_problem=2, max_new_tokens=8)
    digests = []
    for name in ("a", "b"):
        build.build_reasoning(tmp_path / name, cfg, log=lambda *a: None)
        manifest = build.write_manifest(tmp_path / name)
        digests.append({k: v["sha256"] for k, v in manifest["files"].items()})
    assert digests[0] == digests[1]
    assert {"reasoning/checkpoints/sft/model.safetensors", "reasoning/test.jsonl",
            "reasoning/results.json", "reasoning/rl_prompts.jsonl"} <= set(digests[0])
    root = tmp_path / "a" / "reasoning"
    for split in ("validation", "test"):  # read back from the text, split by its own hash
        for row in read_jsonl(root / f"{split}.jsonl", ("question", "answer")):
            assert _split_of(row["question"]) == split
            assert row["answer"].endswith(f"#### {_evaluate(row['question'])}")
    for name in ("rl_prompts", "sft_sample"):
        for row in read_jsonl(root / f"{name}.jsonl", ("prompt", "answer")):
            assert _split_of(row["prompt"]) == "train"
            assert row["answer"] == str(_evaluate(row["prompt"]))
    results = json.loads((root / "results.json").read_text())
    assert results["validation"]["n_problems"] == 6 and "1" in results["validation"]["pass_at_k"]


def test_shipped_reasoning_data_and_model():
    """data/reasoning (``python data/build.py --only reasoning``): the splits are what their
    names say, the model loads and its sampled pass@1 is far below its pass@8 and its greedy
    accuracy (the gap RL from a verifier can close)."""
    import json

    import torch

    from rlcourse.config import DATA_DIR
    from rlcourse.data import read_jsonl
    from rlcourse.models import load_model
    from rlcourse.verifiers import reference_answer

    root = DATA_DIR / "reasoning"
    for split in ("validation", "test"):
        rows = read_jsonl(root / f"{split}.jsonl", ("question", "answer"))
        assert len(rows) == 500
        for row in rows:
            assert _split_of(row["question"]) == split
            assert reference_answer(row["answer"]) == str(_evaluate(row["question"]))
    rl = read_jsonl(root / "rl_prompts.jsonl", ("prompt", "answer"))
    assert len(rl) == 4000 and len({r["prompt"] for r in rl}) == 4000
    assert all(_split_of(r["prompt"]) == "train" for r in rl[:500])
    results = json.loads((root / "results.json").read_text())
    val = results["validation"]
    assert val["greedy_accuracy"] >= 0.85
    assert val["pass_at_k"]["1"] <= 0.4 and val["pass_at_k"]["8"] - val["pass_at_k"]["1"] >= 0.3
    torch.set_num_threads(1)
    model, tok = load_model(root / "checkpoints" / "sft", device="cpu")
    assert sum(p.numel() for p in model.parameters()) == results["model"]["n_parameters"]
    assert len(tok.tokenize("#### 12")) == 2
