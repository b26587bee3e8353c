"""Exercise checks: ``check("name", reader_function)`` in a notebook.

Each exercise is registered with a reference implementation from ``rlcourse``, a generator of
random and edge-case inputs, a general hint and a list of *plausible wrong answers* (forgotten
discount, off-by-one, wrong sign, ...). The wrong answers serve twice: the test suite proves
each check rejects them, and when a reader's output matches one, the check names the mistake.

In a notebook::

    from rlcourse.exercises import check

    def discounted_return(rewards, gamma):
        raise NotImplementedError  # your code here

    check("discounted_return", discounted_return)   # -> "not attempted yet"

From a terminal, all checks of a chapter against the reader's own notebook::

    python -m rlcourse.exercises book/02_markov_processes.ipynb

**Build-it-yourself exercises** have a ``grade`` instead of input cases: the check runs a small
experiment with the reader's function (a PPO iteration, a DPO training loop, a reward model)
and grades the result against a bar measured on the exact answer or the hidden truth. Before
that experiment, their ``mechanism`` unit-tests the reader's function on small fixed cases (one
step's gradient on a fixed batch, the sign of the KL term, whether the critic's error falls,
a gradient left over from the previous step) and returns a :class:`Finding` for the first
check that fails. The registered wrong answers go through the same cases, and the one whose
finding matches the reader's is named, as for the other exercises. Their reference solutions
live in :mod:`rlcourse.exercises.solutions`, never in the chapter's stub cell;
``check(name, fn, show_solution=True)`` (or :func:`show_solution`) prints one on request.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Case",
    "CheckResult",
    "Exercise",
    "Finding",
    "REGISTRY",
    "allclose",
    "check",
    "exercises_for",
    "get",
    "register",
    "run_check",
    "show_solution",
]


@dataclass
class Case:
    """One input to an exercise: positional and keyword arguments, and a label for messages."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""


@dataclass
class Finding:
    """What a build-it-yourself exercise's mechanism check found wrong with a reader's function.

    ``check`` names the check that failed (e.g. ``"kl_sign"``), ``message`` says what it measured
    in the reader's terms, and ``evidence`` is what the check observed (a gradient direction, the
    critic's values), compared with a wrong answer's by ``Exercise.evidence_distance``.
    """

    check: str
    message: str
    evidence: Any = None


@dataclass
class Exercise:
    """An exercise: what the reader writes, checked against ``reference`` on ``cases(rng)``.

    ``wrong_answers`` holds ``(function, what_it_gets_wrong)`` pairs; at least two per exercise.
    ``compare(expected, received)`` decides equality (default: :func:`allclose`).

    A build-it-yourself exercise sets ``grade(fn) -> (passed, message)`` instead (``cases``
    returns no case then): it runs an experiment with the reader's function and judges the
    outcome. ``solution`` is the function :func:`show_solution` prints (default: ``reference``).
    Its ``mechanism(fn) -> Finding | None`` runs first: unit checks on small fixed cases, which
    every wrong answer must fail. A reader's finding names the wrong answer whose finding is on
    the same check at ``evidence_distance(reader, wrong) < 1`` (the closest; default distance:
    0 for the same check).
    """

    name: str
    chapter: str
    reference: Callable[..., Any]
    cases: Callable[[np.random.Generator], Sequence[Case]]
    hint: str
    wrong_answers: list[tuple[Callable[..., Any], str]] = field(default_factory=list)
    compare: Callable[[Any, Any], bool] | None = None
    seed: int = 0
    grade: Callable[[Callable[..., Any]], tuple[bool, str]] | None = None
    solution: Callable[..., Any] | None = None
    mechanism: Callable[[Callable[..., Any]], Finding | None] | None = None
    evidence_distance: Callable[[Finding, Finding], float] | None = None

    def equal(self, expected: Any, received: Any) -> bool:
        return (self.compare or allclose)(expected, received)


@dataclass
class CheckResult:
    """Outcome of a check: ``status`` is passed, failed, error or not_attempted."""

    name: str
    status: str
    message: str
    n_cases: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


REGISTRY: dict[str, Exercise] = {}
_LOADED = False


def register(exercise: Exercise) -> Exercise:
    """Add an exercise to the registry (names are unique across the book)."""
    if exercise.name in REGISTRY and REGISTRY[exercise.name] is not exercise:
        raise ValueError(f"exercise {exercise.name!r} is registered twice")
    REGISTRY[exercise.name] = exercise
    return exercise


def _load_all() -> None:
    """Import every ``rlcourse.exercises.<chapter>`` module so their exercises register."""
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in {"cli", "__main__"}:
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def get(name: str) -> Exercise:
    """The registered exercise called ``name``."""
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"no exercise called {name!r}; known exercises: {known}") from None


def exercises_for(chapter: str) -> list[Exercise]:
    """All exercises of a chapter (the notebook's file stem, e.g. ``"02_markov_processes"``)."""
    _load_all()
    return [ex for ex in REGISTRY.values() if ex.chapter == chapter]


def to_plain(value: Any) -> Any:
    """Torch tensors to NumPy arrays (detached), recursively through tuples, lists and dicts."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    if isinstance(value, (tuple, list)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def allclose(expected: Any, received: Any, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Structural closeness: same shapes, values within tolerance, dict keys and lengths equal."""
    expected, received = to_plain(expected), to_plain(received)
    if isinstance(expected, dict):
        return (
            isinstance(received, dict)
            and set(expected) == set(received)
            and all(allclose(expected[k], received[k], rtol, atol) for k in expected)
        )
    if isinstance(expected, (tuple, list)) and not _is_numeric_sequence(expected):
        return (
            isinstance(received, (tuple, list))
            and len(expected) == len(received)
            and all(allclose(e, r, rtol, atol) for e, r in zip(expected, received, strict=True))
        )
    try:
        exp = np.asarray(expected, dtype=float)
        rec = np.asarray(received, dtype=float)
    except (TypeError, ValueError):
        return bool(expected == received)
    if exp.shape != rec.shape:
        # A 0-d array and a length-1 array are different answers to a scalar question.
        return False
    return bool(np.allclose(exp, rec, rtol=rtol, atol=atol, equal_nan=False))


def _is_numeric_sequence(value: Sequence) -> bool:
    return all(isinstance(v, (int, float, np.number)) for v in value)


def _fmt(value: Any, limit: int = 300) -> str:
    value = to_plain(value)
    with np.printoptions(precision=5, suppress=True, threshold=40):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt_case(case: Case) -> str:
    parts = [_fmt(a) for a in case.args] + [f"{k}={_fmt(v)}" for k, v in case.kwargs.items()]
    return ", ".join(parts)


def _call(fn: Callable[..., Any], case: Case) -> Any:
    # Deep copies: a reader's function that modifies its input must not corrupt the next call.
    return fn(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))


def run_check(name: str, fn: Callable[..., Any]) -> CheckResult:
    """Run exercise ``name`` against ``fn`` and return the result (nothing is printed)."""
    exercise = get(name)
    if exercise.grade is not None:
        return _run_graded(exercise, fn)
    rng = np.random.default_rng(exercise.seed)
    cases = list(exercise.cases(rng))
    for index, case in enumerate(cases):
        expected = _call(exercise.reference, case)
        try:
            received = _call(fn, case)
        except NotImplementedError:
            return CheckResult(name, "not_attempted", f"… {name}: not attempted yet.")
        except Exception as error:  # the reader's code may raise anything
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            message = (
                f"✗ {name}: your function raised an error on case {index + 1}"
                f"{f' ({case.label})' if case.label else ''}.\n"
                f"  input:    {_fmt_case(case)}\n"
                f"  error:    {last}\n"
                f"  hint:     {exercise.hint}"
            )
            return CheckResult(name, "error", message, index)
        if not exercise.equal(expected, received):
            known = [
                why
                for wrong, why in exercise.wrong_answers
                if _matches(exercise, wrong, case, received)
            ]
            message = (
                f"✗ {name}: wrong answer on case {index + 1}"
                f"{f' ({case.label})' if case.label else ''}.\n"
                f"  input:    {_fmt_case(case)}\n"
                f"  expected: {_fmt(expected)}\n"
                f"  received: {_fmt(received)}\n"
                f"  hint:     {exercise.hint}"
            )
            if known:
                message += f"\n  likely mistake: {known[0]}"
            return CheckResult(name, "failed", message, index)
    return CheckResult(name, "passed", f"✓ {name}: passed all {len(cases)} cases.", len(cases))


def _run_graded(exercise: Exercise, fn: Callable[..., Any]) -> CheckResult:
    """A build-it-yourself exercise: its mechanism checks on small fixed cases first, then its
    experiment with ``fn``, graded on the outcome."""
    name = exercise.name
    try:
        finding = exercise.mechanism(fn) if exercise.mechanism is not None else None
        if finding is None:
            passed, report = exercise.grade(fn)
    except NotImplementedError:
        return CheckResult(name, "not_attempted", f"… {name}: not attempted yet.")
    except Exception as error:  # the reader's code may raise anything
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return CheckResult(name, "error", f"✗ {name}: your function raised an error.\n"
                                          f"  error:    {last}\n  hint:     {exercise.hint}")
    if finding is not None:
        message = (f"✗ {name}: failed the unit check \"{finding.check}\" (run before the "
                   f"experiment).\n  {finding.message}\n  hint:     {exercise.hint}")
        mistake = graded_mistake(exercise, finding)
        if mistake:
            message += f"\n  likely mistake: {mistake}"
        return CheckResult(name, "failed", message)
    if passed:
        return CheckResult(name, "passed", f"✓ {name}: passed. {report}", 1)
    return CheckResult(name, "failed", f"✗ {name}: not there yet. {report}\n"
                                       f"  hint:     {exercise.hint}")


# findings of the registered wrong answers, by exercise name: computed once, on the first failure
_WRONG_FINDINGS: dict[str, list[tuple[str, Finding | None]]] = {}


def wrong_answer_findings(exercise: Exercise) -> list[tuple[str, Finding | None]]:
    """``(what_it_gets_wrong, finding)`` for every wrong answer of a build-it-yourself exercise:
    the same mechanism checks the reader's function went through (cached)."""
    if exercise.name not in _WRONG_FINDINGS:
        found = []
        for wrong, why in exercise.wrong_answers:
            try:
                finding = exercise.mechanism(wrong)
            except Exception as error:  # pragma: no cover - a registered wrong answer crashed
                finding = Finding("error", repr(error))
            found.append((why, finding))
        _WRONG_FINDINGS[exercise.name] = found
    return _WRONG_FINDINGS[exercise.name]


def graded_mistake(exercise: Exercise, finding: Finding) -> str | None:
    """The registered wrong answer whose mechanism finding matches ``finding`` (same check,
    closest evidence at a distance below 1), or ``None``."""
    if exercise.mechanism is None:
        return None
    best, best_distance = None, 1.0
    for why, theirs in wrong_answer_findings(exercise):
        if theirs is None or theirs.check != finding.check:
            continue
        distance = (exercise.evidence_distance(finding, theirs)
                    if exercise.evidence_distance is not None else 0.0)
        if distance < best_distance:
            best, best_distance = why, distance
    return best


def solution_source(name: str) -> str:
    """The source of exercise ``name``'s solution (for build-it-yourself exercises, the function
    in :mod:`rlcourse.exercises.solutions`)."""
    exercise = get(name)
    return inspect.getsource(exercise.solution or exercise.reference)


def show_solution(name: str) -> Any:
    """Exercise ``name``'s solution as highlighted code (an ``IPython.display.Code`` in Jupyter,
    plain text elsewhere). The HTML book shows it collapsed, behind a toggle."""
    text = solution_source(name)
    try:
        from IPython.display import Code
    except ImportError:  # pragma: no cover
        return text
    return Code(text, language="python")


def _matches(exercise: Exercise, wrong: Callable[..., Any], case: Case, received: Any) -> bool:
    try:
        return exercise.equal(_call(wrong, case), received)
    except Exception:
        return False


def check(name: str, fn: Callable[..., Any], show_solution: bool = False) -> None:
    """Check the reader's ``fn`` for exercise ``name`` and print the verdict.

    Never raises for a wrong or unattempted answer, so a notebook with open exercises still
    runs top to bottom; the terminal command exits non-zero instead. ``show_solution=True``
    prints the solution's source after the verdict.
    """
    print(run_check(name, fn).message)
    if show_solution:
        print(f"\n--- a solution of {name} ---\n{solution_source(name)}")
