"""Guards every training loop runs, so that no method is silently wrong.

A loop that cannot do what was asked stops with one clear message and keeps what it had: the
last good checkpoint stays the newest, and no model is written after a NaN. The guards live here,
below every loop, so that the engine (SFT, reward model, offline preference losses), PPO, the
group methods (GRPO, RLOO, Dr. GRPO) and the rounds (online DPO, rejection sampling) all get the
same ones:

- :func:`check_finite_loss`: a NaN or infinite loss on any process stops every process before
  the optimizer step (one small all-reduce when there are several processes);
- :func:`nonfinite_parameters` / :func:`check_finite_weights`: before anything is saved;
- :func:`checked_rewards`: a reward function's output is one real, finite number per completion
  (not ``None``, not a string, not NaN, not the wrong length), or a :class:`RewardError` naming
  the function, the completion and the value;
- :func:`checked_labels`: a labeller's verdicts are ``True``, ``False`` or ``None``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "NonFiniteError",
    "RewardError",
    "check_finite_loss",
    "check_finite_weights",
    "checked_labels",
    "checked_rewards",
    "describe_function",
    "nonfinite_parameters",
]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss or weight; nothing from that point on was saved."""


class RewardError(ValueError):
    """A reward function or labeller returned something that is not one real, finite number (or
    one verdict) per completion."""


def describe_function(fn: Any) -> str:
    """``module.qualname (file:line)`` of a function, for messages that must name it."""
    target = getattr(fn, "func", fn)  # functools.partial
    name = getattr(target, "__qualname__", None) or type(target).__name__
    module = getattr(target, "__module__", None)
    where = ""
    try:
        where = f" ({inspect.getsourcefile(target)}:{inspect.getsourcelines(target)[1]})"
    except (TypeError, OSError):
        pass
    return f"{module + '.' if module else ''}{name}{where}"


def _sync_flag(bad: bool, accelerator: Any) -> bool:
    """Whether ``bad`` holds on any process (collective, so every process stops together)."""
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
        return bad
    flag = torch.tensor(float(bad), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def check_finite_loss(loss: torch.Tensor, what: str = "the loss", accelerator: Any = None
                      ) -> None:
    """Raise :class:`NonFiniteError` when ``loss`` holds a NaN or an infinity on this process or
    (with an ``accelerator`` of several processes) on any other; call it before ``backward``."""
    value = loss.detach()
    bad = not bool(torch.isfinite(value).all())
    if _sync_flag(bad, accelerator):
        shown = float(value.flatten()[~torch.isfinite(value.flatten())][0]) if bad else None
        raise NonFiniteError(f"{what} is {shown}" if bad else
                             f"{what} is not finite on another process")


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (one device sync in all)."""
    named = list(model.named_parameters())
    if not named:
        return []
    ok = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
    return [n for (n, _), good in zip(named, ok.tolist(), strict=True) if not good]


def check_finite_weights(model: torch.nn.Module, accelerator: Any = None) -> None:
    """Raise :class:`NonFiniteError` naming the first parameters that hold a NaN or an infinity
    (on any process); call it before saving a checkpoint or a model."""
    bad = nonfinite_parameters(model)
    if _sync_flag(bool(bad), accelerator):
        names = f" ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
        raise NonFiniteError(f"non-finite weights{names}")


def _as_number(value: Any) -> float | None:
    """``value`` as a float when it is one real number (bool counts: a verifier's pass/fail);
    ``None`` for anything else (a string, None, a list, a complex number)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        return float(value.detach().cpu().reshape(()))
    if isinstance(value, np.ndarray):
        if value.size != 1 or not np.issubdtype(value.dtype, np.number) \
                or np.iscomplexobj(value):
            return value.item() if value.dtype == np.bool_ and value.size == 1 else None
        return float(value.reshape(()))
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def checked_rewards(values: Any, n: int, reward_fn: Any, texts: Sequence[str] | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` (what ``reward_fn`` returned for ``n`` completions) as a tensor of shape
    ``(n,)`` and ``dtype``, or a :class:`RewardError` naming the function and what is wrong.

    Accepted: a list, tuple, NumPy array or tensor of ``n`` real numbers (``True``/``False``
    count as 1/0, a verifier's verdict). Refused: ``None``, strings (``"0.9" > "10"`` as text),
    NaN and infinities (an answer scored NaN would win or lose every comparison arbitrarily),
    and any other length.
    """
    who = f"reward function {describe_function(reward_fn)}"
    if values is None:
        raise RewardError(f"{who} returned None; it must return {n} numbers, one per completion")
    if isinstance(values, (str, bytes)):
        raise RewardError(f"{who} returned a string ({values[:40]!r}); it must return {n} "
                          "numbers, one per completion")
    if isinstance(values, torch.Tensor) and not values.is_complex() \
            and values.numel() == n and bool(torch.isfinite(values).all()):
        # the common case (a reward model's scores): one vectorised check, no Python loop
        return values.detach().reshape(-1).to(dtype)
    if isinstance(values, torch.Tensor):
        flat = values.detach().cpu().reshape(-1)
        items: list[Any] = list(flat) if flat.numel() != 0 else []
    elif isinstance(values, np.ndarray):
        items = list(values.reshape(-1))
    else:
        try:
            items = list(values)
        except TypeError:
            raise RewardError(f"{who} returned {type(values).__name__} {values!r:.60}; it must "
                              f"return {n} numbers, one per completion") from None
    if len(items) != n:
        raise RewardError(f"{who} returned {len(items)} values for {n} completions")
    out = []
    for i, item in enumerate(items):
        number = _as_number(item)
        if number is None or not math.isfinite(number):
            shown = texts[i][:60] if texts is not None and i < len(texts) else None
            what = (f"{type(item).__name__} {item!r:.40}" if number is None
                    else f"{number}")
            raise RewardError(f"{who} returned {what} for completion {i}"
                              f"{f' ({shown!r})' if shown is not None else ''}; every reward "
                              "must be a finite number")
        out.append(number)
    return torch.tensor(out, dtype=dtype)


def checked_labels(labels: Any, n: int, label_fn: Callable[..., Any]) -> list[bool | None]:
    """A labeller's ``n`` verdicts, each ``True`` (the first answer is better), ``False`` or
    ``None`` (a tie, skipped); anything else is a :class:`RewardError` naming ``label_fn``."""
    who = f"labeller {describe_function(label_fn)}"
    if labels is None or isinstance(labels, (str, bytes)):
        raise RewardError(f"{who} returned {labels!r:.40}; it must return {n} verdicts "
                          "(True, False or None), one per pair")
    items = list(labels)
    if len(items) != n:
        raise RewardError(f"{who} returned {len(items)} verdicts for {n} pairs")
    out: list[bool | None] = []
    for i, item in enumerate(items):
        if item is None or isinstance(item, (bool, np.bool_)):
            out.append(None if item is None else bool(item))
        else:
            raise RewardError(f"{who} returned {type(item).__name__} {item!r:.40} for pair {i}; "
                              "a verdict is True, False or None")
    return out
