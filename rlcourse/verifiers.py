r"""Verifiers (layer 1): check a final answer by program, and estimate pass@k without bias.

RL from verifiable rewards (RLVR) replaces the reward model by a rule: the reward of an answer
is 1 when a program finds its final answer equal to the reference, else 0. GSM8K writes the
reference at the end of a worked solution after ``####`` (``"... = 72.\n#### 72"``); models
often write ``\boxed{72}`` (MATH style) or end with a sentence. This module turns any of those
into one canonical number and compares exactly:

- :func:`normalise_number`: ``"1,000"``, ``"$1000.00"``, ``"+1000"``, ``"1000."`` -> ``"1000"``;
  ``"-0"`` -> ``"0"``; ``"3.50"`` -> ``"3.5"``; ``"1/2"`` -> ``"0.5"`` (exact rationals);
- :func:`extract_answer`: the number after the last ``####``, else inside the last
  ``\boxed{...}``, else (optionally) the last number of the text;
- :func:`gsm8k_exact_match`: ``reward(prompts, completions, answer, **columns)``, TRL's calling
  convention (every other column of the data rows arrives as a keyword argument);
- :func:`format_reward` and :func:`random_reward_fn`: the controls every RLVR result needs
  beside it (a reward for the format alone; a coin flip that knows nothing);
- :func:`pass_at_k`: the unbiased estimator of Chen et al. (2021),
  :math:`1 - \binom{n-c}{k}/\binom{n}{k}`, computed as a product so that it never overflows.

Everything here is a pure function of strings and numbers (no model, no I/O).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = [
    "ANSWER_MARKER",
    "answers_match",
    "call_reward_fn",
    "extract_answer",
    "format_reward",
    "gsm8k_exact_match",
    "gsm8k_exact_match_with_reasoning",
    "has_reasoning",
    "normalise_number",
    "pass_at_k",
    "pass_at_k_curve",
    "random_reward_fn",
    "reference_answer",
    "reward_keywords",
]

#: GSM8K's final-answer marker: the reference answer is the number after it.
ANSWER_MARKER = "####"

# A number as people write it: optional sign (ASCII or Unicode minus), optional $, digits with
# optional thousands commas, optional decimals, or a fraction a/b. A comma is a thousands
# separator only when groups of exactly three digits follow it ("1,000" is one number,
# "1, 2" and "1,2345" are not one).
_NUMBER = re.compile(
    r"(?<![\w.])"                      # not glued to a word or a previous decimal point
    r"[-+\u2212]?\$?"                   # a sign only when attached: "8 - 2" is 8 and 2
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"(?:/\d+)?"                         # a fraction a/b, written without spaces
    r"|(?<![\w.])[-+\u2212]?\.\d+"
)
_BOXED = "\\boxed{"


def normalise_number(text: str) -> str | None:
    r"""The canonical form of one written number, or ``None`` if ``text`` is not one.

    Strips spaces, ``$``, ``%``, thousands commas, a trailing full stop and a leading ``+``;
    reads ``\u2212`` as minus; evaluates ``a/b`` exactly; then writes the exact rational value
    as an integer when it is one (``"3.0"`` -> ``"3"``, ``"-0"`` -> ``"0"``) and otherwise as
    the shortest exact decimal (``"3.50"`` -> ``"3.5"``) or, for a value with no finite
    decimal expansion, as ``"p/q"`` in lowest terms (``"2/6"`` -> ``"1/3"``).
    """
    s = text.strip().replace("\u2212", "-").replace("$", "").replace("%", "").replace(" ", "")
    s = s.rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if not s:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = Fraction(_plain(num)) / Fraction(_plain(den))
        else:
            value = Fraction(_plain(s))
    except (ValueError, ZeroDivisionError):
        return None
    return _canonical(value)


def _plain(s: str) -> str:
    """``"1,234.50"`` -> ``"1234.50"``; raises ``ValueError`` for anything else."""
    if not re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?", s) or s in ("", "-"):
        raise ValueError(s)
    return s.replace(",", "")


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # no finite decimal expansion: keep the fraction
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    sign = "-" if value < 0 else ""
    scaled = abs(value.numerator) * 10**digits // value.denominator
    whole, frac = divmod(scaled, 10**digits)
    return f"{sign}{whole}.{frac:0{digits}d}"


def _numbers(text: str) -> list[str]:
    """Every number in ``text``, normalised, in order of appearance."""
    found = []
    for match in _NUMBER.finditer(text):
        value = normalise_number(match.group(0))
        if value is not None:
            found.append(value)
    return found


def _last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (braces inside it balanced), or ``None``."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed


def extract_answer(text: str, read_last_number: bool = True) -> str | None:
    r"""The final answer of a solution, normalised (:func:`normalise_number`), or ``None``.

    In order: the first number after the **last** ``####`` (GSM8K's marker; a marker with no
    number after it is no answer, and nothing else is read); else the number in the **last**
    ``\boxed{...}`` (MATH style; ``\boxed{\$1{,}000}`` reads as 1000); else, when
    ``read_last_number``, the last number anywhere in the text (what lenient GSM8K
    evaluations do when a model forgets the marker).
    """
    if ANSWER_MARKER in text:
        after = text.rsplit(ANSWER_MARKER, 1)[1]
        numbers = _numbers(after)
        return numbers[0] if numbers else None
    boxed = _last_boxed(text)
    if boxed is not None:
        inner = boxed.replace("{,}", ",").replace("\\$", "$").replace("\\!", "")
        inner = re.sub(r"\\(?:text|mathrm)\{([^}]*)\}", r"\1", inner)
        frac = re.fullmatch(r"\s*(-?)\\d?frac\{([^}]*)\}\{([^}]*)\}\s*", inner)
        if frac:
            inner = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
        numbers = _numbers(inner)
        return numbers[-1] if numbers else None
    if read_last_number:
        numbers = _numbers(text)
        return numbers[-1] if numbers else None
    return None


def reference_answer(answer: str | float | int) -> str | None:
    """The reference of a data row: a GSM8K ``answer`` field (a worked solution ending in
    ``#### N``), a bare number as text, or a number. Normalised like a model's answer."""
    if isinstance(answer, bool):
        raise TypeError("a reference answer must be text or a number, not a bool")
    if isinstance(answer, (int, float)):
        if isinstance(answer, float) and not math.isfinite(answer):
            return None
        return _canonical(Fraction(answer) if isinstance(answer, int) else Fraction(str(answer)))
    return extract_answer(str(answer), read_last_number=True)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Exact equality of two normalised answers (``None`` never matches)."""
    if predicted is None or reference is None:
        return False
    return Fraction(predicted) == Fraction(reference)


def has_reasoning(text: str) -> bool:
    r"""Whether a completion says anything besides its final answer.

    Removes the ``#### N`` line, every ``\boxed{...}`` and the last number, then asks whether a
    letter or a digit is left: ``"#### 42"``, ``"42"`` and ``"\boxed{42}."`` have no reasoning;
    ``"6 * 7 = 42. #### 42"`` has.
    """
    rest = text.rsplit(ANSWER_MARKER, 1)[0] if ANSWER_MARKER in text else text
    while (box := rest.rfind(_BOXED)) >= 0:
        inner = _last_boxed(rest)
        end = box + len(_BOXED) + (len(inner) + 1 if inner is not None else 0)
        rest = rest[:box] + rest[end:]
    matches = list(_NUMBER.finditer(rest))
    if matches and ANSWER_MARKER not in text and _BOXED not in text:
        last = matches[-1]
        rest = rest[:last.start()] + rest[last.end():]
    return re.search(r"[A-Za-z0-9]", rest) is not None


def _references(answer: Sequence[Any] | Any, n: int) -> list[str | None]:
    if isinstance(answer, (str, int, float)) or answer is None:
        raise TypeError("answer must be a list with one reference per completion (the data "
                        f"rows' 'answer' column), got {type(answer).__name__}")
    answers = list(answer)
    if len(answers) != n:
        raise ValueError(f"{n} completions but {len(answers)} reference answers")
    return [None if a is None else reference_answer(a) for a in answers]


def gsm8k_exact_match(prompts: Sequence[Any], completions: Sequence[str],
                      answer: Sequence[Any], require_reasoning: bool = False,
                      read_last_number: bool = True, **columns: Any) -> list[float]:
    r"""Reward 1.0 when a completion's final answer equals the row's reference, else 0.0.

    :math:`r_i = \mathbb{1}[\mathrm{extract}(y_i) = \mathrm{ref}(a_i)]`, compared as exact
    rationals after :func:`normalise_number`. ``answer``: one reference per completion (GSM8K's
    ``answer`` field with its worked solution and ``#### N``, or the bare number); the data
    rows' other columns arrive in ``columns`` and are ignored (TRL's convention: a reward
    function is called with every column of the batch as a keyword argument).
    ``require_reasoning``: no credit for a completion that is only a number
    (:func:`has_reasoning`). ``read_last_number``: read the last number when a completion
    has neither ``####`` nor ``\boxed{}``.
    """
    refs = _references(answer, len(completions))
    out = []
    for text, ref in zip(completions, refs, strict=True):
        ok = answers_match(extract_answer(text, read_last_number), ref)
        if ok and require_reasoning and not has_reasoning(text):
            ok = False
        out.append(1.0 if ok else 0.0)
    return out


def gsm8k_exact_match_with_reasoning(prompts: Sequence[Any], completions: Sequence[str],
                                     answer: Sequence[Any], **columns: Any) -> list[float]:
    """:func:`gsm8k_exact_match` with ``require_reasoning=True``: a recipe names this one
    (``reward_fn: rlcourse.verifiers:gsm8k_exact_match_with_reasoning``) to give no credit to a
    completion that is only a number."""
    return gsm8k_exact_match(prompts, completions, answer, require_reasoning=True, **columns)


def format_reward(prompts: Sequence[Any], completions: Sequence[str], **columns: Any
                  ) -> list[float]:
    """Control: 1.0 when a completion ends with GSM8K's answer line (``####`` then a number),
    whatever the number; right or wrong answers are paid alike."""
    return [1.0 if ANSWER_MARKER in t and extract_answer(t, False) is not None else 0.0
            for t in completions]


def random_reward_fn(seed: int = 0, p: float = 0.5) -> Callable[..., list[float]]:
    """Control: a reward function paying 1.0 with probability ``p`` independently of the text
    (its own ``numpy`` generator seeded with ``seed``), as in the "spurious rewards" experiments:
    any gain it brings comes from the update itself, not from the reward."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    rng = np.random.default_rng(seed)

    def random_reward(prompts: Sequence[Any], completions: Sequence[str], **columns: Any
                      ) -> list[float]:
        return (rng.random(len(completions)) < p).astype(float).tolist()

    return random_reward


# --------------------------------------------------------------------------------------------
# How a reward function is called
# --------------------------------------------------------------------------------------------


def reward_keywords(fn: Callable[..., Any]) -> bool | frozenset[str]:
    """Which of the data rows' other columns ``fn(prompts, completions, ...)`` takes as keyword
    arguments: ``True`` for all of them (it has ``**kwargs``), else the names of its parameters
    after the first two (none for the two-argument functions written before columns were
    passed, which keep working unchanged). A callable whose signature cannot be read takes
    none."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    skip = {p.name for p in positional[:2]}
    return frozenset(p.name for p in params if p.name not in skip and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def call_reward_fn(fn: Callable[..., Any], prompts: Sequence[Any], completions: Sequence[str],
                   columns: Sequence[Mapping[str, Any]] | None = None) -> Any:
    """``fn(prompts, completions, **{column: [value per completion]})``, TRL's convention.

    ``columns``: one mapping per completion with its data row's other fields (GSM8K's
    ``answer``, an id, test cases); each column is passed as a list aligned with
    ``completions``, but only the columns ``fn`` accepts (:func:`reward_keywords`), so a
    two-argument ``fn(prompts, completions)`` is called exactly as before. A row without a
    column gives ``None`` there.
    """
    accepted = reward_keywords(fn)
    kwargs: dict[str, list[Any]] = {}
    if columns:
        if len(columns) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(columns)} rows of columns")
        names: list[str] = []
        for row in columns:
            names += [k for k in row if k not in names]
        for name in names:
            if accepted is True or name in accepted:
                kwargs[name] = [row.get(name) for row in columns]
    return fn(list(prompts), list(completions), **kwargs)


# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int | np.ndarray, k: int) -> float | np.ndarray:
    r"""Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    .. math:: \widehat{\text{pass@}k} = 1 - \binom{n-c}{k}\Big/\binom{n}{k}
              = 1 - \prod_{i=n-c+1}^{n}\Big(1 - \frac{k}{i}\Big)

    (Chen et al., 2021): the probability that a random ``k``-subset of the ``n`` samples holds
    at least one correct one, so its mean over problems is unbiased for
    :math:`E[1 - (1-p)^k]`. The product form never forms the huge binomials. ``n - c < k``
    gives 1 (every ``k``-subset holds a correct sample). ``c`` may be an array (one count per
    problem); the result then has its shape. Requires ``1 <= k <= n`` and ``0 <= c <= n``.
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    counts = np.asarray(c)
    if not np.issubdtype(counts.dtype, np.integer) or counts.min(initial=0) < 0 \
            or counts.max(initial=0) > n:
        raise ValueError(f"c must be integer counts in [0, n={n}], got {c!r}")
    flat = counts.reshape(-1)
    out = np.empty(flat.shape, dtype=np.float64)
    for j, cj in enumerate(flat.tolist()):
        if n - cj < k:
            out[j] = 1.0
        else:
            i = np.arange(n - cj + 1, n + 1, dtype=np.float64)
            out[j] = 1.0 - float(np.prod(1.0 - k / i))
    return float(out[0]) if counts.ndim == 0 else out.reshape(counts.shape)


def pass_at_k_curve(correct: np.ndarray | Sequence[Sequence[bool]],
                    ks: Sequence[int] | None = None) -> dict[int, tuple[float, float]]:
    """pass@k for each ``k``, averaged over problems: ``{k: (mean, standard error)}``.

    ``correct``: (n_problems, n) booleans, ``n`` samples per problem. ``ks`` defaults to the
    powers of two up to ``n``. The standard error is the spread over problems,
    ``std(ddof=1) / sqrt(n_problems)`` (what a fresh draw of problems would change; 0 for a
    single problem).
    """
    arr = np.asarray(correct, dtype=bool)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"correct must have shape (n_problems, n_samples), got {arr.shape}")
    n = arr.shape[1]
    ks = list(ks) if ks is not None else [2**j for j in range(int(math.log2(n)) + 1)]
    counts = arr.sum(axis=1)
    curve = {}
    for k in ks:
        per_problem = pass_at_k(n, counts, int(k))
        se = float(per_problem.std(ddof=1) / math.sqrt(len(per_problem))) \
            if len(per_problem) > 1 else 0.0
        curve[int(k)] = (float(per_problem.mean()), se)
    return curve
