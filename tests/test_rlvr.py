"""RL from a verifier: reward functions see the data rows' other columns (TRL's convention) while
two-argument ones keep working, GSM8K rows are read by the group recipes, and
``recipes/grpo_gsm8k.yaml`` runs end to end on a tiny random model with the exact-match
verifier."""

from __future__ import annotations

import json

import pytest
import torch

from rlcourse import recipes
from rlcourse.config import REPO_ROOT
from rlcourse.data import DataError, read_jsonl, write_jsonl
from rlcourse.grpo import GroupConfig, prompts_and_columns, train_group_lm
from rlcourse.models import build_model, build_tokenizer, save_model
from rlcourse.recipes.rl_methods import read_prompt_rows
from rlcourse.verifiers import (
    call_reward_fn,
    gsm8k_exact_match,
    reference_answer,
    reward_keywords,
)

torch.set_num_threads(1)
TRICKY = REPO_ROOT / "tests" / "data" / "gsm8k_tricky.jsonl"


# ---- calling convention -------------------------------------------------------------------


def two_args(prompts, completions):
    return [1.0] * len(completions)


def named(prompts, completions, answer, level=None):
    return [float(a) for a in answer]


def everything(prompts, completions, **columns):
    return [float(len(columns))] * len(completions)


def test_reward_keywords_reads_the_signature():
    assert reward_keywords(two_args) == frozenset()
    assert reward_keywords(named) == {"answer", "level"}
    assert reward_keywords(everything) is True
    assert reward_keywords(lambda p, c, *, answer: c) == {"answer"}
    assert reward_keywords(len) == frozenset()  # no keyword a builtin could take


def test_call_reward_fn_passes_only_the_columns_a_function_takes():
    rows = [{"answer": "1", "id": 7}, {"answer": "0", "id": 8}]
    assert call_reward_fn(two_args, ["p", "q"], ["a", "b"], rows) == [1.0, 1.0]
    assert call_reward_fn(named, ["p", "q"], ["a", "b"], rows) == [1.0, 0.0]
    assert call_reward_fn(everything, ["p", "q"], ["a", "b"], rows) == [2.0, 2.0]
    assert call_reward_fn(everything, ["p"], ["a"], None) == [0.0]
    # a row without a column gives None there
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)

    call_reward_fn(spy, ["p", "q"], ["a", "b"], [{"answer": "1"}, {"hint": "h"}])
    assert seen == {"answer": ["1", None], "hint": [None, "h"]}
    with pytest.raises(ValueError, match="2 completions but 1 rows"):
        call_reward_fn(spy, ["p", "q"], ["a", "b"], [{"answer": "1"}])


def test_prompts_and_columns():
    texts, columns = prompts_and_columns(["a", {"prompt": "b", "answer": "3"}])
    assert texts == ["a", "b"] and columns == [{}, {"answer": "3"}]
    with pytest.raises(KeyError, match="needs a 'prompt' field"):
        prompts_and_columns([{"question": "q"}])


# ---- GSM8K rows ---------------------------------------------------------------------------


def test_gsm8k_rows_are_read_with_the_question_as_prompt(tmp_path):
    rows = read_prompt_rows(None, TRICKY)
    assert len(rows) == 6 and all(set(r) == {"prompt", "answer"} for r in rows)
    assert rows[0]["prompt"].startswith("Natalia") and rows[0].where.endswith(":1")
    both = tmp_path / "both.jsonl"
    write_jsonl(both, [{"prompt": "p", "question": "q", "answer": "1"}])
    with pytest.raises(DataError, match="both 'prompt' and its alias 'question'"):
        read_prompt_rows(None, both)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_prompt_rows(None, empty)


def test_exact_match_on_the_tricky_rows():
    rows = read_jsonl(TRICKY)
    refs = [reference_answer(r["answer"]) for r in rows]
    assert refs == ["72", "6000", "-5", "7.5", "0", "10"]
    right = ["48 + 24 = 72.\n#### 72", "So $6000.", "It is -5 degrees. #### -5",
             r"3 pens cost \boxed{\$7.5}", "None left: 10 - 10 = 0", "She earned $10.00. #### 10"]
    wrong = ["#### 7", "6,000 + 1 = 6,001", "#### 5", "#### 7.05", "#### 10", "0.2 x 50"]
    answers = [r["answer"] for r in rows]
    assert gsm8k_exact_match(None, right, answers) == [1.0] * 6
    assert gsm8k_exact_match(None, wrong, answers) == [0.0] * 6
    # a bare number earns nothing when the recipe asks for reasoning
    bare = ["72", "#### 6,000", "-5", r"\boxed{7.50}", "0", "10."]
    assert gsm8k_exact_match(None, bare, answers) == [1.0] * 6
    assert gsm8k_exact_match(None, bare, answers, require_reasoning=True) == [0.0] * 6


# ---- the loop and the recipe ----------------------------------------------------------------


def _tiny_model(words):
    tok = build_tokenizer(words)
    tok.add_tokens(["####"])
    return build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0), tok


def test_train_group_lm_passes_row_columns_to_the_reward():
    model, tok = _tiny_model(["what is 1 + 1 ? 2 3 4 ."])
    seen = []

    def verifier(prompts, completions, answer, **columns):
        seen.append((list(prompts), list(answer), columns))
        return gsm8k_exact_match(prompts, completions, answer)

    rows = [{"prompt": "what is 1 + 1 ?", "answer": "2", "id": 0},
            {"prompt": "what is 1 + 2 ?", "answer": "3", "id": 1}]
    config = GroupConfig(group_size=2, n_prompts=2, kl_coef=0.0)
    history = train_group_lm(model, tok, rows, verifier, config, 2, lr=1e-3, max_new_tokens=4,
                             device="cpu", progress=False)
    assert len(history) == 2 and len(seen) == 2
    for prompts, answers, columns in seen:
        # each completion's answer and id are its own prompt's
        for p, a, i in zip(prompts, answers, columns["id"], strict=True):
            assert {r["prompt"]: (r["answer"], r["id"]) for r in rows}[p] == (a, i)


SPY = '''
import json
from rlcourse.verifiers import gsm8k_exact_match

LOG = {log!r}


def spy(prompts, completions, answer, **columns):
    with open(LOG, "a") as fh:
        fh.write(json.dumps({{"prompts": list(prompts), "answer": list(answer),
                             "columns": sorted(columns)}}) + "\\n")
    return gsm8k_exact_match(prompts, completions, answer, **columns)
'''


@pytest.mark.parametrize("reward_fn", ["shipped", "spy"])
def test_grpo_gsm8k_recipe_runs_on_a_tiny_model(tmp_path, reward_fn):
    rows = read_jsonl(TRICKY)
    model, tok = _tiny_model([r["question"] + " " + r["answer"] for r in rows])
    save_model(model, tok, tmp_path / "model")
    out = tmp_path / "run"
    log = tmp_path / "calls.jsonl"
    extra = []
    if reward_fn == "spy":
        (tmp_path / "spy_verifier.py").write_text(SPY.format(log=str(log)))
        extra = [f"reward_fn={tmp_path / 'spy_verifier.py'}:spy"]
    code = recipes.main([
        str(REPO_ROOT / "recipes" / "grpo_gsm8k.yaml"), "--model", str(tmp_path / "model"),
        "--data", str(TRICKY), "--output", str(out), f"eval_data={TRICKY}",
        "group.group_size=2", "group.n_prompts=2", "group.minibatch_size=null",
        "group.kl_coef=0", "rollout.steps=2", "rollout.max_new_tokens=6",
        "rollout.mixed_precision=no", "rollout.device=cpu", "rollout.checkpoint_every=0",
        "rollout.eval_every=1", *extra])
    assert code == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert all(0.0 <= h["score"] <= 1.0 and 0.0 <= h["eval/reward"] <= 1.0 for h in history)
    if reward_fn == "spy":
        # every call (2 training steps, 2 evaluations) saw each question's own reference
        truth = {r["question"]: r["answer"] for r in rows}
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(calls) == 4 and [len(c["prompts"]) for c in calls] == [4, 6, 4, 6]
        for call in calls:
            assert call["columns"] == []  # the question became the prompt: no other column
            assert [truth[p] for p in call["prompts"]] == call["answer"]


# ---- the reasoning world's helpers ----------------------------------------------------------


def test_tracked_reward_pays_its_kind_and_records_the_truth():
    from rlcourse.worlds.reasoning import TrackedReward

    completions = ["1 + 1 = 2. #### 2", "1 + 1 = 3. #### 3", "so the answer is 2.", "#### x"]
    answers = ["2"] * 4
    correct = TrackedReward("correct")
    assert correct(["p"] * 4, completions, answers) == [1.0, 0.0, 1.0, 0.0]
    fmt = TrackedReward("format")
    assert fmt(["p"] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    coin = TrackedReward("random", seed=1)
    paid = coin(["p"] * 4, completions, answers)
    assert set(paid) <= {0.0, 1.0}
    for tracked in (correct, fmt, coin):  # whatever it pays, it records the truth
        row = tracked.rows[-1]
        assert row["accuracy"] == 0.5
        # words and symbols: "1 + 1 = 2 . #### 2" is 8, "so the answer is 2 ." is 6
        assert row["length_right"] == (8 + 6) / 2 and row["length_wrong"] == (8 + 2) / 2
    with pytest.raises(ValueError):
        TrackedReward("learned")


def test_sample_and_verify_agrees_with_the_verifier():
    from rlcourse.models import generate
    from rlcourse.worlds.reasoning import sample_and_verify

    model, tok = _tiny_model(["what is 1 + 1 ? 2 3 4 . ####"])
    questions, answers = ["what is 1 + 1 ?", "what is 1 + 2 ?"], ["2", "3"]
    v = sample_and_verify(model, tok, questions, answers, 5, seed=4, max_new_tokens=6)
    assert v.correct.shape == v.lengths.shape == v.logprob.shape == (2, 5)
    gen = generate(model, tok, [q for q in questions for _ in range(5)], max_new_tokens=6,
                   seed=4)
    assert v.texts == gen.texts
    expected = gsm8k_exact_match(None, gen.texts, [a for a in answers for _ in range(5)])
    assert v.correct.reshape(-1).tolist() == [bool(x) for x in expected]
    assert v.entropy_per_token == pytest.approx(
        float(-gen.logprobs.sum() / gen.completion_mask.sum()), rel=1e-6)
