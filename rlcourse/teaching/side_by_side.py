"""Helpers of chapter 13, "The methods side by side": tables from the objectives registry and
from the committed results files (layer 5, teaching aids; no training happens here).

Only formatting and bookkeeping live here; every number comes from
:data:`rlcourse.losses.OBJECTIVES`, :mod:`rlcourse.memory` or a ``benchmarks/results/*.json``
file written by a benchmark script.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlcourse.losses import OBJECTIVES
from rlcourse.memory import method_memory_gib, model_roles

__all__ = [
    "ORDER",
    "ResultRow",
    "gradient_weight",
    "markdown_table",
    "mean_spread",
    "objectives_rows",
    "result_rows",
    "table_latex",
]

#: Display order of the side-by-side configurations (keys of ``side_by_side.json``'s methods).
ORDER = ("dpo", "ipo", "ipo_summed", "ipo_tau1", "rdpo", "kto", "orpo", "orpo_from_sft", "simpo")


def gradient_weight(loss_of_margin: Callable[[torch.Tensor], torch.Tensor],
                    margins: torch.Tensor) -> torch.Tensor:
    r"""How hard a loss pushes each example's margin up: :math:`w(h) = -\partial L/\partial h`,
    by autograd through the library's own loss (``loss_of_margin`` maps margins ``[n]`` to
    per-example losses ``[n]``). The parameter gradient of a pair is
    :math:`\nabla_\theta L = -w(h)\,\nabla_\theta h`: ``w`` is the weight the pair gets."""
    h = margins.detach().clone().to(torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of_margin(h).sum(), h)
    return -grad.detach()


def table_latex(latex: str) -> str:
    r"""LaTeX that survives inside a Markdown table cell: ``|`` would end the cell, so
    ``\|`` becomes ``\Vert`` and ``|`` becomes ``\vert`` (they render the same)."""
    return latex.replace(r"\|", r"\Vert ").replace("|", r"\vert ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub/MyST Markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def objectives_rows(methods: Sequence[str], n_params: int) -> list[dict[str, Any]]:
    """One dict per method of :data:`~rlcourse.losses.OBJECTIVES`: its name, LaTeX, loss
    function, reference?, data format, log-prob reduction, defaults, and the models it holds
    (with the reference resident, and with reference log-probs precomputed) with their memory
    for ``n_params`` parameters each (:func:`rlcourse.memory.method_memory_gib`)."""
    out = []
    for m in methods:
        o = OBJECTIVES[m]
        roles = model_roles(m, n_params)
        roles_pre = model_roles(m, n_params, precompute_reference=True)
        out.append({
            "key": m, "name": o.name, "latex": o.latex, "function": o.loss.__name__,
            "needs_reference": o.needs_reference, "data_format": o.data_format,
            "reduction": o.reduction, "hyperparameters": dict(o.hyperparameters),
            "models": len(roles), "models_precomputed": len(roles_pre),
            "gib": method_memory_gib(m, n_params),
            "gib_precomputed": method_memory_gib(m, n_params, precompute_reference=True),
            "notes": o.notes,
        })
    return out


@dataclass(frozen=True)
class ResultRow:
    """One configuration of ``side_by_side.json``: its key, label, training start point,
    hyperparameters, the summary over seeds and the per-seed runs."""

    key: str
    label: str
    start: str
    settings: dict[str, Any]
    summary: dict[str, Any]
    runs: list[dict[str, Any]] = field(repr=False)

    @property
    def n_seeds(self) -> int:
        return int(self.summary.get("n_seeds", len(self.runs)))

    def values(self, metric: str) -> list[float]:
        """The metric of every seed that recorded it."""
        return [float(r[metric]) for r in self.runs if metric in r]


def result_rows(results: Mapping[str, Any] | str | Path,
                order: Sequence[str] = ORDER) -> list[ResultRow]:
    """The configurations of a ``side_by_side.json`` (a path or the loaded dict) in ``order``;
    keys not in ``order`` follow in file order, keys missing from the file are skipped."""
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    methods = results.get("methods", {})
    settings = results.get("settings", {}).get("runs", {})
    keys = [k for k in order if k in methods] + [k for k in methods if k not in order]
    return [ResultRow(key=k, label=methods[k].get("label", k),
                      start=settings.get(k, {}).get("start", "?"),
                      settings=dict(settings.get(k, {})), summary=methods[k]["summary"],
                      runs=methods[k]["runs"]) for k in keys]


def mean_spread(summary: Mapping[str, Any], metric: str, digits: int = 3) -> str:
    """``mean [min–max]`` over seeds from a summary (just the mean for a single seed);
    ``"n/a"`` when the metric was not recorded."""
    if metric not in summary:
        return "n/a"
    text = f"{summary[metric]:.{digits}f}"
    if f"{metric}_min" in summary:
        text += f" [{summary[f'{metric}_min']:.{digits}f}–{summary[f'{metric}_max']:.{digits}f}]"
    return text
