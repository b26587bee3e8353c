"""Run-wide settings: quick mode, seeding, devices and the location of shipped data."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where the shipped datasets and tiny checkpoints live (override with ``RLCOURSE_DATA``).
DATA_DIR = Path(os.environ.get("RLCOURSE_DATA", REPO_ROOT / "data"))


def is_quick() -> bool:
    """True when ``RLCOURSE_QUICK`` is set to a true value (``1``, ``true``, ``yes``).

    Quick mode shrinks every experiment so the whole book executes in minutes; the tests set it.
    """
    return os.environ.get("RLCOURSE_QUICK", "0").strip().lower() in {"1", "true", "yes", "on"}


def pick(full: T, quick: T) -> T:
    """Return ``quick`` in quick mode and ``full`` otherwise, e.g. ``steps = pick(2000, 50)``."""
    return quick if is_quick() else full


def seed_everything(seed: int) -> None:
    """Fix every random choice: Python's ``random``, NumPy's global state and torch (if loaded)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but Part I does not need it
        return
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> str:
    """Map ``"auto"`` to ``"cuda"``, ``"mps"`` or ``"cpu"`` (in that order); pass others through."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Ranges of config fields: declared beside the fields (a ``RANGES`` class attribute), checked in
# ``__post_init__``. A recipe turns a FieldRangeError into ``file:line: section.key: ...``.
# ---------------------------------------------------------------------------------------------
class FieldRangeError(ValueError):
    """A config field holds a value outside its range: ``key`` (the field), ``value`` and
    ``must`` (what the value must be, in words)."""

    def __init__(self, key: str, value: object, must: str) -> None:
        self.key, self.value, self.must = key, value, must
        super().__init__(f"{key}: must be {must}, got {value!r}")


def _finite(v: object) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive(v: object) -> bool:
    """A finite number > 0."""
    return _finite(v) and v > 0


def non_negative(v: object) -> bool:
    """A finite number >= 0."""
    return _finite(v) and v >= 0


def at_least(lower: float):
    """A test: a finite number >= ``lower``."""
    return lambda v: _finite(v) and v >= lower


def within(lower: float, upper: float):
    """A test: a finite number in ``[lower, upper]``."""
    return lambda v: _finite(v) and lower <= v <= upper


def one_of(*choices: object):
    """A test: one of ``choices``."""
    return lambda v: v in choices


def optional(test):
    """A test that also accepts ``None``."""
    return lambda v: v is None or test(v)


#: Sampling temperatures below this divide float32 logits into overflow (``T = 1e-40`` gave a
#: NaN model); greedy decoding is its own switch, not ``T -> 0``.
MIN_TEMPERATURE = 1e-3

#: Common rules, ``(test, what the value must be)``.
FINITE = (_finite, "a finite number")
POSITIVE = (positive, "a finite number > 0")
NON_NEGATIVE = (non_negative, "a finite number >= 0")
COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
COUNT_OR_ZERO = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 "an integer >= 0")
OPTIONAL_POSITIVE = (optional(positive), "null or a finite number > 0")
OPTIONAL_COUNT = (optional(COUNT[0]), "null or an integer >= 1")
PROBABILITY = (within(0.0, 1.0), "a number in [0, 1]")
TEMPERATURE = (at_least(MIN_TEMPERATURE), f"a finite number >= {MIN_TEMPERATURE:g}")
DEVICE = (one_of("auto", "cpu", "cuda", "mps"), "one of auto, cpu, cuda, mps")
REPORT_TO = (one_of("none", "tensorboard"), "one of none, tensorboard")


def check_ranges(config: object) -> None:
    """Check every field named in ``type(config).RANGES`` (``{field: (test, must)}``) and raise
    :class:`FieldRangeError` for the first value outside its range."""
    for key, (test, must) in getattr(type(config), "RANGES", {}).items():
        value = getattr(config, key)
        try:
            ok = bool(test(value))
        except TypeError:  # a value of the wrong type (a recipe checks types first)
            ok = False
        if not ok:
            raise FieldRangeError(key, value, must)
