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
