"""The exercise checker itself: verdicts, messages, the terminal command, and every registered
exercise accepting its reference while rejecting each of its plausible wrong answers."""

import json

import numpy as np
import pytest

from rlcourse import exercises
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
