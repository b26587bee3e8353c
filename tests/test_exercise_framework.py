"""The exercise checker itself: verdicts, messages, the terminal command, and every registered
exercise accepting its reference while rejecting each of its plausible wrong answers."""

import json
import re

import numpy as np
import pytest
import torch

from rlcourse import exercises, losses
from rlcourse.exercises import Case, Exercise, run_check
from rlcourse.exercises.cli import check_notebook, main


def _square_sum(x):
    return float(np.sum(np.asarray(x) ** 2))


@pytest.fixture
def toy_exercise():
    ex = Exercise(
        name="_toy_square_sum",
        chapter="_toy",
        reference=_square_sum,
        cases=lambda rng: [Case((rng.normal(size=4),)), Case((np.zeros(0),), label="empty")],
        hint="square, then sum",
        wrong_answers=[
            (lambda x: float(np.sum(x)), "forgot to square"),
            (lambda x: float(np.sum(np.asarray(x) ** 2) + 1), "off by one"),
        ],
    )
    exercises.register(ex)
    yield ex
    exercises.REGISTRY.pop(ex.name)


def test_reference_passes(toy_exercise):
    assert run_check("_toy_square_sum", _square_sum).status == "passed"


def test_stub_is_not_attempted(toy_exercise):
    def stub(x):
        raise NotImplementedError

    result = run_check("_toy_square_sum", stub)
    assert result.status == "not_attempted"
    assert "not attempted yet" in result.message


def test_wrong_answer_message_names_input_expected_received_hint_and_mistake(toy_exercise):
    result = run_check("_toy_square_sum", lambda x: float(np.sum(x)))
    assert result.status == "failed"
    for word in ("input:", "expected:", "received:", "hint:", "forgot to square"):
        assert word in result.message


def test_crash_is_reported_not_raised(toy_exercise):
    result = run_check("_toy_square_sum", lambda x: 1 / 0)
    assert result.status == "error" and "ZeroDivisionError" in result.message


def test_input_mutation_does_not_leak_between_reference_and_reader(toy_exercise):
    def mutating(x):
        x[...] = 0
        return _square_sum(np.ones_like(x)) * 0 + 0.0

    assert run_check("_toy_square_sum", mutating).status == "failed"


def test_allclose_distinguishes_shapes_and_values():
    assert exercises.allclose(np.ones(3), [1.0, 1.0, 1.0])
    assert not exercises.allclose(np.ones(3), np.ones((3, 1)))
    assert not exercises.allclose(1.0, 1.01)
    assert exercises.allclose({"a": 1.0}, {"a": 1.0 + 1e-9})
    assert not exercises.allclose({"a": 1.0}, {"b": 1.0})


def _notebook(tmp_path, body):
    cells = [
        {"cell_type": "code", "source": "import numpy as np\nfrom rlcourse.exercises import check",
         "metadata": {}, "outputs": [], "execution_count": None},
        {"cell_type": "code", "source": body, "metadata": {}, "outputs": [],
         "execution_count": None},
        {"cell_type": "code", "source": 'x = heavy_experiment()\ncheck("_toy_square_sum", mine)',
         "metadata": {}, "outputs": [], "execution_count": None},
    ]
    path = tmp_path / "reader.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                "nbformat_minor": 5}))
    return path


def test_terminal_command_reads_readers_notebook(tmp_path, toy_exercise, capsys):
    good = _notebook(tmp_path, "def mine(x):\n    return float(np.sum(np.asarray(x) ** 2))")
    assert [r.status for r in check_notebook(good)] == ["passed"]
    assert main([str(good)]) == 0
    bad = _notebook(tmp_path, "def mine(x):\n    return float(np.sum(x))")
    assert main([str(bad)]) == 1
    assert "forgot to square" in capsys.readouterr().out


def _all_exercises():
    exercises._load_all()
    return sorted(
        (e for e in exercises.REGISTRY.values() if not e.name.startswith("_")),
        key=lambda e: e.name,
    )


ALL = _all_exercises()


@pytest.mark.parametrize("exercise", ALL, ids=[e.name for e in ALL])
def test_registered_exercise_accepts_reference_and_rejects_wrong_answers(exercise):
    assert run_check(exercise.name, exercise.reference).status == "passed"
    assert len(exercise.wrong_answers) >= 2, f"{exercise.name}: needs >= 2 plausible wrong answers"
    for wrong, why in exercise.wrong_answers:
        result = run_check(exercise.name, wrong)
        assert result.status in {"failed", "error"}, f"{exercise.name} accepted: {why}"


# ---- the mistakes the chapters warn about, written out here (not taken from the registry) -----
def _klr_count_index(lp, ref, score, mask, kl, clip):
    """Score at index mask.sum(-1) - 1: right only for masks that start at column 0."""
    r = -kl * (lp - ref) * mask
    rows = torch.arange(r.shape[0])
    r[rows, (mask.sum(-1) - 1).long()] += score.clamp(-clip, clip)
    return r


def _rm_count_index(token_scores, attention_mask):
    """The reward model read at attention_mask.sum() - 1: wrong with left padding."""
    last = (attention_mask.sum(-1) - 1).long()
    return token_scores[torch.arange(token_scores.shape[0]), last]


def _discount_off_by_one(rewards, gamma):
    """G_t = sum_k gamma^(k+1) R_{t+k+1}: chapter 2's 'bug in return code'."""
    r = np.asarray(rewards, dtype=float)
    return np.array([sum(gamma ** (k + 1) * x for k, x in enumerate(r[t:])) for t in range(len(r))])


NAMED_PITFALLS = [
    # chapter 17, "pass@k from n samples": the plug-in 1 - (1 - c/n)^k is biased
    ("pass_at_k", lambda n, c, k: 1 - (1 - c / n) ** k),
    # chapter 17, "Which number is the answer": the last number even when #### gives it
    ("extract_answer", lambda text: next(
        (n.replace(",", "").rstrip(".") for n in re.findall(r"-?\d[\d,]*\.?\d*", text)[-1:]),
        None)),
    # chapter 8, "Padding side": the score on the last real response token, not at a count
    ("kl_shaped_rewards", _klr_count_index),
    # chapter 10, section 4: log(1 - e^x) as it reads fails near x = 0 in float32
    ("orpo_log_odds", lambda m: m - torch.log1p(-torch.exp(m))),
    # chapter 10, "Mean, not sum": the odds of summed log-probs
    ("orpo_loss", lambda pc, pr, lc, lr, lam: -pc / lc - lam * torch.nn.functional.logsigmoid(
        losses.orpo_log_odds(pc) - losses.orpo_log_odds(pr))),
    # chapter 7, "Read at the last real token": left, right and two-sided padding
    ("reward_at_last_token", _rm_count_index),
    # chapter 12, "|y| counts the EOS token"
    ("simpo_reward", lambda logps, lengths, beta: beta * logps / (lengths - 1)),
    # chapter 12, "Two conventions for gamma": gamma/beta passed where gamma is meant
    ("simpo_loss", lambda pc, pr, lc, lr, beta, gamma: -torch.nn.functional.logsigmoid(
        beta * (pc / lc - pr / lr) - beta * gamma)),
    # chapter 2: R_{t+1} multiplied by gamma instead of gamma^0
    ("discounted_returns", _discount_off_by_one),
    # chapter 8, "Sum or mean": padding must be masked in every mean
    ("ppo_clip_loss", lambda lp, old, adv, mask, eps: torch.maximum(
        -adv * torch.exp(lp - old),
        -adv * torch.exp(lp - old).clamp(1 - eps, 1 + eps)).mean()),
    # chapter 7: log(sigmoid(x)) underflows; logsigmoid does not
    ("bradley_terry_loss", lambda w, r: -torch.log(torch.sigmoid(w - r)).mean()),
    # chapter 4, "Sum or mean over tokens": the policy gradient sums over a text's tokens
    ("reinforce_loss", lambda lp, G, b: -((G - b) * lp).mean()),
    # chapter 5, the shift: logits at t score token t + 1, so the mask is shifted too
    ("response_logprob", lambda logits, ids, mask: (torch.log_softmax(
        logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, :-1]).sum(-1)),
    # chapter 6, "The ceiling": a win rate of 0.65 is not 0.65 out of 1
    ("share_of_gain", lambda a, b, best: (float(np.mean(
        np.where(np.asarray(a) > b, 1.0, np.where(np.asarray(a) < b, 0.0, 0.5)))) - 0.5) / 0.5),
]


@pytest.mark.parametrize("name,wrong", NAMED_PITFALLS, ids=[n for n, _ in NAMED_PITFALLS])
def test_check_rejects_the_mistake_its_chapter_warns_about(name, wrong):
    result = run_check(name, wrong)
    assert result.status == "failed", f"{name} accepted the chapter's named pitfall"
    assert "likely mistake:" in result.message, f"{name}: the check does not name the mistake"


def test_underflowing_log_sigmoid_is_named_as_such():
    result = run_check("bradley_terry_loss", lambda w, r: -torch.log(torch.sigmoid(w - r)).mean())
    assert "use logsigmoid" in result.message


def test_kl_shaped_rewards_has_masks_that_start_after_the_prompt():
    cases = exercises.get("kl_shaped_rewards").cases(np.random.default_rng(0))
    assert any(bool((c.args[3][:, 0] == 0).any() & (c.args[3].sum(-1) > 0).any()) for c in cases)


def test_orpo_log_odds_accepts_the_log1mexp_answer_in_float32():
    # the answer the chapter teaches (expm1 near 0) passes, so the float32 cases are fair
    assert run_check("orpo_log_odds", lambda m: m - torch.log(-torch.expm1(m))).passed


# ---- build-it-yourself exercises ---------------------------------------------------------------
GRADED = {"ppo_iteration": "08_ppo", "dpo_train": "09_dpo",
          "build_reward_model": "07_reward_models"}


def test_graded_exercises_are_registered_with_a_grade_and_a_solution():
    from rlcourse.exercises import solutions

    for name, chapter in GRADED.items():
        ex = exercises.get(name)
        assert ex.chapter == chapter and ex.grade is not None
        assert ex.solution is getattr(solutions, name)


@pytest.mark.parametrize("name", sorted(GRADED))
def test_graded_stub_is_not_attempted(name):
    def stub(*args, **kwargs):
        raise NotImplementedError

    result = run_check(name, stub)
    assert result.status == "not_attempted" and "not attempted yet" in result.message


def test_graded_crash_is_reported_not_raised():
    result = run_check("build_reward_model", lambda pairs: 1 / 0)
    assert result.status == "error" and "ZeroDivisionError" in result.message


def test_check_prints_the_solution_only_on_request(capsys):
    def stub(pairs):
        raise NotImplementedError

    exercises.check("build_reward_model", stub)
    assert "def build_reward_model" not in capsys.readouterr().out
    exercises.check("build_reward_model", stub, show_solution=True)
    out = capsys.readouterr().out
    assert "not attempted yet" in out and "def build_reward_model(" in out
    assert "F.logsigmoid(diff @ w)" in out


@pytest.mark.parametrize("name", sorted(GRADED))
def test_solution_is_not_in_the_chapter_and_its_cell_is_collapsed(name):
    import inspect

    from rlcourse.config import REPO_ROOT
    from rlcourse.exercises import solutions

    notebook = json.loads((REPO_ROOT / "book" / f"{GRADED[name]}.ipynb").read_text())
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    body = [line.strip() for line in inspect.getsource(getattr(solutions, name)).splitlines()
            if len(line.strip()) > 40 and not line.strip().startswith(('"""', "#", "def "))]
    assert body, "the solution has no lines to look for"
    for line in body:
        assert not any(line in source for source in code), f"solution line in the chapter: {line}"
    shown = [c for c in notebook["cells"] if f'show_solution("{name}")' in "".join(c["source"])]
    assert len(shown) == 1, f"{GRADED[name]}: no cell shows the solution of {name}"
    assert "hide-output" in shown[0]["metadata"].get("tags", [])
    assert shown[0]["metadata"].get("jupyter", {}).get("outputs_hidden") is True
