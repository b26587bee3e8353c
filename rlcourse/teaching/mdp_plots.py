"""Plots and widgets for Part I: value heatmaps, policy arrows, transition graphs, the MDP's
graphical model and a slider that steps through the sweeps of an iterative algorithm.

Everything draws on a Matplotlib ``Axes`` (a new figure when none is given) and returns it, so
chapters can arrange several panels. The sliders are ``rlcourse.teaching.widgets.interact_or_call``
(imported here, where the chapters import it from), which fills its output from the kernel so
that plain ``jupyter nbconvert --execute`` finishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle, FancyArrowPatch

from rlcourse.mdp import GRID_MOVES, MDP, greedy_policy
from rlcourse.teaching.widgets import interact_or_call

__all__ = [
    "draw_chain",
    "draw_graphical_model",
    "interact_or_call",
    "plot_policy",
    "plot_snapshots",
    "plot_value_and_policy",
    "plot_values",
    "step_through",
]


def _axes(ax, size=(4, 4)):
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def plot_values(values: np.ndarray, shape: tuple[int, int], ax: plt.Axes | None = None,
                title: str = "", fmt: str = "{:.1f}", cmap: str = "RdYlGn",
                vmin: float | None = None, vmax: float | None = None,
                terminal: np.ndarray | None = None) -> plt.Axes:
    """A gridworld value table as a heatmap, each cell annotated with its value (row 0 on top).

    ``terminal`` cells are hatched grey.
    """
    ax = _axes(ax)
    grid = np.asarray(values, dtype=float).reshape(shape)
    ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax)
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for (r, c), val in np.ndenumerate(grid):
        if terminal is not None and np.asarray(terminal).reshape(shape)[r, c]:
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, color="0.85", hatch="//"))
        # dark text on light cells: the colour maps used here are light in the middle
        mid = abs(val - (lo + hi) / 2) < 0.3 * (hi - lo + 1e-12)
        ax.text(c, r, fmt.format(val), ha="center", va="center", fontsize=9,
                color="black" if mid else "white")
    _grid_lines(ax, shape)
    ax.set_title(title)
    return ax


def _grid_lines(ax, shape):
    n_rows, n_cols = shape
    # Major ticks on the cell centres: Matplotlib hides minor ticks that coincide with majors.
    ax.set_xticks(np.arange(n_cols))
    ax.set_yticks(np.arange(n_rows))
    ax.set_xticks(np.arange(-0.5, n_cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows, 1), minor=True)
    ax.grid(which="minor", color="0.3", linewidth=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)


def plot_policy(pi: np.ndarray, shape: tuple[int, int], ax: plt.Axes | None = None,
                moves: Sequence[tuple[int, int]] = GRID_MOVES, terminal: np.ndarray | None = None,
                color: str = "black", title: str = "") -> plt.Axes:
    """Arrows for a gridworld policy ``pi[s, a]``: one arrow per action with ``pi(a|s) > 0``,
    its length proportional to the probability (ties show as several arrows)."""
    ax = _axes(ax)
    n_rows, n_cols = shape
    pi = np.asarray(pi, dtype=float)
    if not ax.images:
        ax.set_xlim(-0.5, n_cols - 0.5)
        ax.set_ylim(n_rows - 0.5, -0.5)
        ax.set_aspect("equal")
        _grid_lines(ax, shape)
    term = np.zeros(len(pi), bool) if terminal is None else np.asarray(terminal)
    for s in range(len(pi)):
        if term[s]:
            continue
        r, c = divmod(s, n_cols)
        for a, (dr, dc) in enumerate(moves):
            if pi[s, a] > 1e-9:
                length = 0.38 * pi[s, a] / pi[s].max()
                ax.arrow(c, r, dc * length, dr * length, head_width=0.12, head_length=0.1,
                         length_includes_head=True, color=color, alpha=0.85)
    if title:
        ax.set_title(title)
    return ax


def plot_value_and_policy(v: np.ndarray, pi: np.ndarray, shape: tuple[int, int],
                          ax: plt.Axes | None = None, title: str = "",
                          terminal: np.ndarray | None = None, **kw: Any) -> plt.Axes:
    """Heatmap of ``v`` (values faint) with the arrows of ``pi`` on top."""
    ax = _axes(ax)
    grid = np.asarray(v, dtype=float).reshape(shape)
    ax.imshow(grid, cmap=kw.get("cmap", "RdYlGn"), alpha=0.6)
    for (r, c), val in np.ndenumerate(grid):
        ax.text(c + 0.45, r + 0.45, f"{val:.1f}", ha="right", va="bottom", fontsize=7,
                color="0.25")
    _grid_lines(ax, shape)
    plot_policy(pi, shape, ax, terminal=terminal)
    ax.set_title(title)
    return ax


def plot_snapshots(history: Sequence[np.ndarray], shape: tuple[int, int], ks: Sequence[int],
                   mdp: MDP | None = None, fmt: str = "{:.1f}", size: float = 2.6) -> plt.Figure:
    """Value tables after sweeps ``ks`` side by side (Sutton and Barto's Figure 4.1 layout).

    With ``mdp``, a second row shows the greedy policy with respect to each table.
    """
    rows = 2 if mdp is not None else 1
    fig, axes = plt.subplots(rows, len(ks), figsize=(size * len(ks), size * rows), squeeze=False)
    lo = min(np.min(history[k]) for k in ks)
    hi = max(np.max(history[k]) for k in ks)
    terminal = None if mdp is None else mdp.terminal
    for j, k in enumerate(ks):
        k = min(k, len(history) - 1)
        plot_values(history[k], shape, axes[0, j], f"k = {k}", fmt, vmin=lo, vmax=hi,
                    terminal=terminal)
        if mdp is not None:
            plot_policy(greedy_policy(mdp, history[k], ties="uniform"), shape, axes[1, j],
                        terminal=mdp.terminal)
    fig.tight_layout()
    return fig


def step_through(history: Sequence[np.ndarray], shape: tuple[int, int], mdp: MDP | None = None,
                 label: str = "sweep", start: int | None = None) -> Any:
    """A slider over the sweeps of an iterative algorithm: the value table after ``k`` sweeps
    and (with ``mdp``) the greedy policy it implies, next to each other."""
    from ipywidgets import IntSlider

    lo, hi = float(np.min(history)), float(np.max(history))

    def show(k: int) -> None:
        cols = 2 if mdp is not None else 1
        fig, axes = plt.subplots(1, cols, figsize=(3.4 * cols, 3.4), squeeze=False)
        plot_values(history[k], shape, axes[0, 0], f"V after {label} {k}",
                    vmin=lo, vmax=hi, terminal=None if mdp is None else mdp.terminal)
        if mdp is not None:
            plot_policy(greedy_policy(mdp, history[k], ties="uniform"), shape, axes[0, 1],
                        terminal=mdp.terminal, title="greedy policy")
        fig.tight_layout()
        plt.show()

    slider = IntSlider(value=len(history) - 1 if start is None else start, min=0,
                       max=len(history) - 1, step=1, description=f"{label} k")
    return interact_or_call(show, k=slider)


def draw_chain(P: np.ndarray, names: Sequence[str], ax: plt.Axes | None = None,
               positions: np.ndarray | None = None, min_prob: float = 1e-9,
               node_colors: Sequence | None = None, fmt: str = "{:.2f}", radius: float = 0.45,
               fontsize: int = 8, rad: float = 0.2) -> plt.Axes:
    """A Markov chain as a graph: one node per state, one labelled arrow per ``P[s, s'] > 0``
    (self-loops drawn as a label above the node)."""
    ax = _axes(ax, (5, 4))
    P = np.asarray(P, dtype=float)
    n = len(P)
    if positions is None:
        angle = np.pi / 2 - 2 * np.pi * np.arange(n) / n
        positions = np.stack([np.cos(angle), np.sin(angle)], axis=1) * 1.6
    for i in range(n):
        color = "#dbe9f6" if node_colors is None else node_colors[i]
        ax.add_patch(Circle(positions[i], radius, facecolor=color, edgecolor="black", zorder=3))
        ax.text(*positions[i], names[i], ha="center", va="center", fontsize=fontsize, zorder=4)
        if P[i, i] > min_prob:
            # self-loop label on the outer side of the node, away from the other arrows
            out = np.asarray(positions[i], float) - np.mean(positions, axis=0)
            out = out / np.linalg.norm(out) if np.linalg.norm(out) > 1e-9 else np.array([0, 1.0])
            ax.text(*(positions[i] + (radius + 0.28) * out), "↻ " + fmt.format(P[i, i]),
                    ha="center", va="center", fontsize=8, color="tab:blue")
    for i in range(n):
        for j in range(n):
            if i == j or P[i, j] <= min_prob:
                continue
            start, end = np.asarray(positions[i], float), np.asarray(positions[j], float)
            d = end - start
            dist = np.linalg.norm(d) + 1e-12
            # shorten both ends to the circles' rims (in data units, unlike shrinkA/B)
            a, b = start + radius * d / dist, end - radius * d / dist
            ax.add_patch(FancyArrowPatch(a, b, connectionstyle=f"arc3,rad={rad}",
                                         arrowstyle="-|>", mutation_scale=12, color="0.3",
                                         zorder=2))
            # arc3 bends towards (dy, -dx); the curve's midpoint is mid + rad/2 * (dy, -dx)
            normal = np.array([d[1], -d[0]]) / dist
            label = (a + b) / 2 + (0.5 * rad * np.linalg.norm(b - a) + 0.13) * normal
            ax.text(*label, fmt.format(P[i, j]), ha="center", va="center", fontsize=7,
                    color="tab:red")
    pad = radius + 0.9
    ax.set_xlim(positions[:, 0].min() - pad, positions[:, 0].max() + pad)
    ax.set_ylim(positions[:, 1].min() - pad, positions[:, 1].max() + pad)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax


def draw_graphical_model(ax: plt.Axes | None = None, steps: int = 3) -> plt.Axes:
    """The directed graphical model of an MDP trajectory.

    ``S_t -> A_t`` is the policy ``pi(a|s)``; ``(S_t, A_t) -> (S_{t+1}, R_{t+1})`` is the
    dynamics ``p(s', r|s, a)``. Policy edges are drawn in blue, dynamics edges in black.
    """
    ax = _axes(ax, (2.6 * steps + 1, 3))
    nodes = {}
    for t in range(steps + 1):
        nodes[f"S{t}"] = (np.array([3.0 * t, 1.0]), f"$S_{{{t}}}$", "#dbe9f6")
        if t < steps:
            nodes[f"A{t}"] = (np.array([3.0 * t + 1.5, 0.0]), f"$A_{{{t}}}$", "#fde0c5")
        if t > 0:
            nodes[f"R{t}"] = (np.array([3.0 * t, 2.2]), f"$R_{{{t}}}$", "#d9f2d0")
    for pos, label, color in nodes.values():
        ax.add_patch(Circle(pos, 0.42, facecolor=color, edgecolor="black", zorder=3))
        ax.text(*pos, label, ha="center", va="center", fontsize=11, zorder=4)

    def edge(a, b, color):
        ax.add_patch(FancyArrowPatch(nodes[a][0], nodes[b][0], arrowstyle="-|>",
                                     mutation_scale=12, shrinkA=17, shrinkB=17, color=color,
                                     zorder=2))

    for t in range(steps):
        edge(f"S{t}", f"A{t}", "tab:blue")
        for target in (f"S{t + 1}", f"R{t + 1}"):
            edge(f"S{t}", target, "black")
            edge(f"A{t}", target, "black")
    ax.text(0.1, -0.75, "blue: policy $\\pi(a|s)$    black: dynamics $p(s', r|s, a)$",
            fontsize=9)
    ax.set_xlim(-0.7, 3.0 * steps + 0.7)
    ax.set_ylim(-1.0, 2.9)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax
