r"""The reasoning world: arithmetic word problems with worked solutions and an exact verifier.

A problem is a start amount and a few operations on it, told as a short story::

    mia has 7 coins. mia finds 5 more. mia loses 3. how many coins does mia have now?

and its worked solution, one equation per step, ends in GSM8K's answer line::

    7 + 5 = 12. 12 - 3 = 9. #### 9

The verifier is exact (:func:`rlcourse.verifiers.gsm8k_exact_match` on the ``answer``
column), so a reward of 1 means the answer is right, and pass@k can be estimated without bias
(:func:`rlcourse.verifiers.pass_at_k`). The world is made to show what RL from a verifier can
and cannot do with a small model:

- **a difficulty knob** (:class:`Difficulty`): the number of steps and the size of the numbers;
- **slips**: the worked solutions the SFT model learns from carry arithmetic slips, the way
  people's do: a result off by one or two, most often when a step carries or borrows across a
  ten (:class:`SlipModel`). Later steps carry the wrong number on, so the final answer is
  wrong. A model that imitates such data knows the right result (it is the most likely one)
  but, sampled at temperature 1, slips as often as its teachers: its pass@1 is far below its
  pass@k, the situation in which RL from a verifier helps;
- **splits that never share a problem**: a problem is its numbers and operations (its
  *skeleton*, :meth:`Problem.skeleton`), whatever names and words tell it; the split is a
  function of the skeleton's SHA-256 (:func:`problem_split`), so the stream of fresh training
  problems never holds a test problem, reworded or not, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from rlcourse.verifiers import ANSWER_MARKER, extract_answer, gsm8k_exact_match

__all__ = [
    "DEFAULT_REASONING_WORLD",
    "Difficulty",
    "Problem",
    "REWARD_KINDS",
    "ReasoningWorld",
    "SPLITS",
    "SlipModel",
    "Step",
    "TrackedReward",
    "Verified",
    "is_hard_step",
    "problem_split",
    "reasoning_tokenizer",
    "sample_and_verify",
]

SeedLike = int | np.random.Generator | None

#: Each split's share of the skeleton space: a problem's split is a function of its numbers and
#: operations alone (:func:`problem_split`).
SPLITS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}

NAMES = ("tom", "mia", "sam", "ann", "ben", "eva", "leo", "zoe")
ITEMS = ("apples", "coins", "cards", "pens", "books", "eggs", "shells", "stamps")
#: How each operation is told; ``{n}`` is the operand, ``{who}`` the name.
PHRASES: dict[str, tuple[str, ...]] = {
    "add": ("{who} buys {n} more.", "{who} finds {n} more.", "{who} gets {n} more."),
    "sub": ("{who} eats {n}.", "{who} gives away {n}.", "{who} loses {n}.", "{who} sells {n}."),
    "mul": ("then the number of {items} is {n} times as large.",),
}
#: Draws without a new problem after which :meth:`ReasoningWorld.iter_problems` gives up.
MAX_MISSES = 20_000
#: The symbol of each operation in a worked solution.
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
QUESTION = "how many {items} does {who} have now?"
#: How a solution without the answer line ends (some SFT solutions forget the marker).
UNMARKED_ENDING = "so the answer is {n}."


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


@dataclass(frozen=True)
class Difficulty:
    """The knob: how many steps and how large the numbers.

    ``min_steps``..``max_steps`` operations (uniform); a start amount in ``2..max_start``;
    operands of ``+`` and ``-`` in ``1..max_operand``; ``*`` by 2 or 3 (weight ``p_mul`` among
    the operations, only while the product stays within ``max_value``); every intermediate
    result in ``0..max_value``.
    """

    min_steps: int = 2
    max_steps: int = 6
    max_start: int = 20
    max_operand: int = 9
    max_value: int = 60
    p_mul: float = 0.15

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, "
                             f"{self.max_steps}")
        if not 2 <= self.max_start <= self.max_value or self.max_operand < 1:
            raise ValueError("need 2 <= max_start <= max_value and max_operand >= 1")
        if not 0.0 <= self.p_mul < 1.0:
            raise ValueError(f"p_mul must be in [0, 1), got {self.p_mul}")


@dataclass(frozen=True)
class SlipModel:
    """How worked solutions go wrong: each step's written result is off by 1 or 2 with
    probability ``p_carry`` when the step carries or borrows across a ten or multiplies, else
    ``p_plain``. Later steps start from the number written, so a slip carries on to the final
    answer; a second slip goes the same way as the error already made (errors compound and
    never cancel), so a solution is right exactly when it has no slip."""

    p_plain: float = 0.2
    p_carry: float = 0.6

    def probability(self, op: str, before: int, after: int) -> float:
        """The chance that a solution slips at this step."""
        return self.p_carry if is_hard_step(op, before, after) else self.p_plain


def is_hard_step(op: str, before: int, after: int) -> bool:
    """A step that carries or borrows across a ten (``18 + 5``, ``12 - 3``) or multiplies."""
    return op == "mul" or before // 10 != after // 10


@dataclass(frozen=True)
class Step:
    """One operation: ``before <op> operand = after``."""

    op: str
    operand: int
    before: int
    after: int

    @property
    def equation(self) -> str:
        return f"{self.before} {SYMBOLS[self.op]} {self.operand} = {self.after}."


def _apply(op: str, value: int, operand: int) -> int:
    return value + operand if op == "add" else value - operand if op == "sub" else value * operand


@dataclass(frozen=True)
class Problem:
    """A word problem: ``question`` (the prompt), its exact ``answer`` (an integer) and the
    ``steps`` of its correct solution (:meth:`solution`)."""

    question: str
    start: int
    steps: tuple[Step, ...]
    who: str = field(default="", compare=False)
    items: str = field(default="", compare=False)

    @property
    def answer(self) -> int:
        return self.steps[-1].after

    def skeleton(self) -> str:
        """The problem without its words: ``"7|add 5|sub 3"``. Two problems are the same
        problem when their skeletons are equal, whatever names or phrasings tell them."""
        return "|".join([str(self.start)] + [f"{s.op} {s.operand}" for s in self.steps])

    def solution(self) -> str:
        """The correct worked solution, one equation per step, then ``#### answer``."""
        return " ".join(s.equation for s in self.steps) + f" {ANSWER_MARKER} {self.answer}"

    def row(self) -> dict[str, str]:
        """A GSM8K-style data row: ``question`` (the prompt) and ``answer`` (the worked
        solution ending in ``#### N``)."""
        return {"question": self.question, "answer": self.solution()}


def problem_split(problem: Problem) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) of a problem.

    u = (first 8 bytes of SHA-256 of :meth:`Problem.skeleton`) / 2^64 ∈ [0, 1); the split is the
    one of :data:`SPLITS` whose interval holds u. A function of the numbers and operations
    alone: a reworded problem stays in its split, on every machine and for every seed.
    """
    digest = hashlib.sha256(problem.skeleton().encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    for name, (lo, hi) in SPLITS.items():
        if lo <= u < hi:
            return name
    raise AssertionError(u)  # pragma: no cover (the intervals cover [0, 1))


class ReasoningWorld:
    """Arithmetic word problems of one :class:`Difficulty`, solutions with :class:`SlipModel`
    slips, and the exact verifier.

    ``p_unmarked``: the share of SFT solutions that end with ``"so the answer is N."`` instead
    of GSM8K's ``#### N`` (the verifier still reads their last number; a format-only reward
    tells the two apart).
    """

    def __init__(self, difficulty: Difficulty | None = None, slips: SlipModel | None = None,
                 p_unmarked: float = 0.1) -> None:
        self.difficulty = difficulty or Difficulty()
        self.slips = slips or SlipModel()
        if not 0.0 <= p_unmarked <= 1.0:
            raise ValueError(f"p_unmarked must be in [0, 1], got {p_unmarked}")
        self.p_unmarked = p_unmarked
        #: The largest number a solution may write (slips can overshoot ``max_value``).
        self.max_number = self.difficulty.max_value + 20

    # ---- problems ------------------------------------------------------------------------

    def problem(self, seed: SeedLike = None) -> Problem:
        """One random problem (any split)."""
        rng = _rng(seed)
        d = self.difficulty
        n_steps = int(rng.integers(d.min_steps, d.max_steps + 1))
        value = int(rng.integers(2, d.max_start + 1))
        start = value
        steps = []
        for _ in range(n_steps):
            op, operand = self._operation(rng, value)
            after = _apply(op, value, operand)
            steps.append(Step(op, operand, value, after))
            value = after
        who = NAMES[int(rng.integers(len(NAMES)))]
        items = ITEMS[int(rng.integers(len(ITEMS)))]
        sentences = [f"{who} has {start} {items}."]
        for s in steps:
            phrases = PHRASES[s.op]
            sentences.append(phrases[int(rng.integers(len(phrases)))].format(
                who=who, n=s.operand, items=items))
        sentences.append(QUESTION.format(items=items, who=who))
        return Problem(" ".join(sentences), start, tuple(steps), who, items)

    def _operation(self, rng: np.random.Generator, value: int) -> tuple[str, int]:
        d = self.difficulty
        while True:
            u = rng.random()
            if u < d.p_mul:
                op, operand = "mul", int(rng.integers(2, 4))
            else:
                op = "add" if rng.random() < 0.5 else "sub"
                operand = int(rng.integers(1, d.max_operand + 1))
            if 0 <= _apply(op, value, operand) <= d.max_value:
                return op, operand

    def iter_problems(self, split: str, seed: SeedLike = 0) -> Iterator[Problem]:
        """An endless, seeded stream of distinct problems of one split (distinct skeletons:
        no problem twice, reworded or not). The same seed gives the same stream."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        rng = _rng(seed)
        seen: set[str] = set()
        misses = 0
        while True:
            p = self.problem(rng)
            key = p.skeleton()
            if key in seen or problem_split(p) != split:
                misses += 1
                if misses > MAX_MISSES:  # a small difficulty has few problems: say so
                    raise ValueError(f"no new {split} problem in {MAX_MISSES} draws after "
                                     f"{len(seen)}: {self.difficulty} has too few problems")
                continue
            misses = 0
            seen.add(key)
            yield p

    def problems(self, split: str, n: int, seed: SeedLike = 0) -> list[Problem]:
        """The first ``n`` problems of :meth:`iter_problems`."""
        stream = self.iter_problems(split, seed)
        return [next(stream) for _ in range(n)]

    # ---- solutions -------------------------------------------------------------------------

    def worked_solution(self, problem: Problem, seed: SeedLike = None,
                        slips: bool = True) -> tuple[str, bool]:
        """A worked solution as a (careless) person writes it: ``(text, correct)``.

        Each step slips with :meth:`SlipModel.probability` (when ``slips``); later steps start
        from the written number (a solution whose numbers leave ``0..max_number`` is redrawn).
        With probability ``p_unmarked`` the solution ends with ``"so the answer is N."`` instead
        of ``#### N``. ``correct``: the final answer is right.
        """
        rng = _rng(seed)
        while True:  # a slip can push a later number below 0 or out of the vocabulary: redraw
            value = problem.start
            parts = []
            for s in problem.steps:
                true_after = _apply(s.op, value, s.operand)
                after = true_after
                if slips and rng.random() < self.slips.probability(s.op, value, true_after):
                    delta = (1, 2)[int(rng.integers(2))]
                    # once wrong, a slip goes the same way: errors compound, never cancel
                    error = true_after - s.after
                    sign = (-1 if rng.random() < 0.5 else 1) if error == 0 else \
                        (1 if error > 0 else -1)
                    after = true_after + sign * delta
                if not 0 <= after <= self.max_number:
                    break
                parts.append(f"{value} {SYMBOLS[s.op]} {s.operand} = {after}.")
                value = after
            else:
                break
        if rng.random() < self.p_unmarked:
            parts.append(UNMARKED_ENDING.format(n=value))
        else:
            parts.append(f"{ANSWER_MARKER} {value}")
        return " ".join(parts), value == problem.answer

    def clean_rate(self, problem: Problem) -> float:
        """The chance that :meth:`worked_solution` gets ``problem`` right: that no step slips,
        the product over steps of ``1 - slip probability`` (slips never cancel)."""
        rate = 1.0
        for s in problem.steps:
            rate *= 1.0 - self.slips.probability(s.op, s.before, s.after)
        return rate

    def sft_rows(self, n: int, split: str = "train", seed: SeedLike = 0,
                 slips: bool = True) -> list[dict[str, str]]:
        """``n`` SFT rows ``{"prompt", "completion", "answer"}`` from distinct problems of
        ``split``: the completion is a :meth:`worked_solution` (with slips), ``answer`` the
        correct number as text (the column the verifier reads)."""
        rng = _rng(seed)
        rows = []
        for p in self.problems(split, n, rng):
            text, _ = self.worked_solution(p, rng, slips)
            rows.append({"prompt": p.question, "completion": text, "answer": str(p.answer)})
        return rows

    # ---- verifier and vocabulary -------------------------------------------------------------

    def reward(self, prompts: Sequence[str], completions: Sequence[str],
               answer: Sequence[str | int], **columns: object) -> list[float]:
        """The exact verifier: :func:`rlcourse.verifiers.gsm8k_exact_match`."""
        return gsm8k_exact_match(prompts, completions, answer, **columns)

    @staticmethod
    def final_answer(completion: str) -> str | None:
        """The answer a completion gives (:func:`rlcourse.verifiers.extract_answer`)."""
        return extract_answer(completion)

    def vocabulary(self) -> list[str]:
        """Every word a question or a solution can use (numbers 0..``max_number`` included),
        for :func:`rlcourse.models.build_tokenizer`; ``####`` is added to the tokenizer as one
        token by :func:`reasoning_tokenizer`."""
        words = [str(i) for i in range(self.max_number + 1)]
        words += list(NAMES) + list(ITEMS) + list(SYMBOLS.values()) + ["=", "."]
        for phrases in PHRASES.values():
            for ph in phrases:
                words += ph.replace("{who}", "").replace("{n}", "").replace("{items}", "").split()
        words += QUESTION.replace("{items}", "").replace("{who}", "").split()
        words += UNMARKED_ENDING.replace("{n}", "").split()
        words += ["has"]
        return sorted(set(words))


def reasoning_tokenizer(world: ReasoningWorld | None = None):
    """The word-level tokenizer of :func:`rlcourse.models.build_tokenizer` over the world's
    vocabulary, with ``####`` added as one token (so that solutions decode as GSM8K writes
    them: ``"... = 9. #### 9"``)."""
    from rlcourse.models import build_tokenizer

    tokenizer = build_tokenizer((world or DEFAULT_REASONING_WORLD).vocabulary())
    tokenizer.add_tokens([ANSWER_MARKER])
    return tokenizer


#: The world the shipped reasoning model and the chapter use.
DEFAULT_REASONING_WORLD = ReasoningWorld()


# --------------------------------------------------------------------------------------------
# Sampling and checking a model's answers; rewards that keep the true score in view
# --------------------------------------------------------------------------------------------


@dataclass
class Verified:
    """``n`` sampled answers to each of ``P`` problems, checked by the verifier.

    ``correct`` (P, n) bool; ``lengths`` (P, n) answer tokens (EOS included); ``logprob``
    (P, n) :math:`\\log\\pi(y|x)` summed over the answer's tokens (raw model, temperature 1);
    ``texts`` the P*n answers, problem-major.
    """

    correct: np.ndarray
    lengths: np.ndarray
    logprob: np.ndarray
    texts: list[str]

    @property
    def pass_at_1(self) -> float:
        return float(self.correct.mean())

    @property
    def entropy_per_token(self) -> float:
        r"""Monte Carlo estimate of the policy's entropy per answer token,
        :math:`-\sum_i \log\pi(y_i|x_i) / \sum_i |y_i|` (an answer's surprise is an unbiased
        estimate of the entropy of the answer distribution)."""
        return float(-self.logprob.sum() / max(self.lengths.sum(), 1))


def sample_and_verify(model, tokenizer, questions: Sequence[str], answers: Sequence[str | int],
                      n: int, seed: int, max_new_tokens: int = 48, temperature: float = 1.0,
                      batch_size: int = 512) -> Verified:
    """Sample ``n`` answers per question (:func:`rlcourse.models.generate`, seeded) and check
    each with :func:`rlcourse.verifiers.gsm8k_exact_match` against ``answers``."""
    from rlcourse.models import generate

    many = [q for q in questions for _ in range(n)]
    refs = [str(a) for a in answers for _ in range(n)]
    gen = generate(model, tokenizer, many, max_new_tokens=max_new_tokens,
                   temperature=temperature, seed=seed, batch_size=batch_size)
    shape = (len(questions), n)
    correct = np.array(gsm8k_exact_match(many, gen.texts, refs), dtype=bool).reshape(shape)
    return Verified(correct=correct,
                    lengths=gen.completion_mask.sum(-1).numpy().reshape(shape),
                    logprob=gen.logprobs.sum(-1).double().numpy().reshape(shape),
                    texts=list(gen.texts))


#: The rewards of the chapter's runs: the verifier and its two controls.
REWARD_KINDS = ("correct", "format", "random")


class TrackedReward:
    """A reward function for :func:`rlcourse.grpo.train_group_lm` that pays ``kind``
    (``"correct"``: the verifier; ``"format"``: GSM8K's answer line present,
    :func:`rlcourse.verifiers.format_reward`; ``"random"``: a fair coin,
    :func:`rlcourse.verifiers.random_reward_fn`) and, whatever it pays, records the truth of
    every batch in :attr:`rows`: the share right, the mean answer length (in words and symbols,
    the tokens of the word-level tokenizer, EOS not counted) of right and of wrong answers."""

    def __init__(self, kind: str = "correct", seed: int = 0) -> None:
        from rlcourse.verifiers import format_reward, random_reward_fn

        if kind not in REWARD_KINDS:
            raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
        self.kind = kind
        self.rows: list[dict[str, float]] = []
        self._pay = {"format": format_reward, "random": random_reward_fn(seed)}.get(kind)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 answer: Sequence[str], **columns: object) -> list[float]:
        right = np.array(gsm8k_exact_match(prompts, completions, answer), dtype=bool)
        words = np.array([len(_words(t)) for t in completions], dtype=float)
        self.rows.append({
            "accuracy": float(right.mean()),
            "length_right": float(words[right].mean()) if right.any() else float("nan"),
            "length_wrong": float(words[~right].mean()) if (~right).any() else float("nan"),
        })
        if self._pay is None:
            return right.astype(float).tolist()
        return list(self._pay(prompts, completions, answer=answer))


def _words(text: str) -> list[str]:
    """The word-level tokenizer's pieces of ``text``: words, numbers and each punctuation
    character (``####`` as one)."""
    return re.findall(r"####|\w+|[^\w\s]", text)
