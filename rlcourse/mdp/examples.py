"""The small worlds of Part I: Sutton and Barto's gridworlds and a toy "conversation" MDP.

Gridworld states are numbered row by row, ``s = row * n_cols + col`` with row 0 at the top,
as in the book's figures. Actions are ``up, right, down, left`` (:data:`GRID_ACTIONS`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rlcourse.mdp.processes import MDP, MarkovChain

__all__ = [
    "GRID_ACTIONS",
    "GRID_MOVES",
    "conversation_chain",
    "conversation_mdp",
    "gridworld",
    "gridworld_3_5",
    "gridworld_4_1",
]

#: Action names of every gridworld, in index order.
GRID_ACTIONS = ("up", "right", "down", "left")
#: ``(d_row, d_col)`` of each action (row 0 is the top row).
GRID_MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))


def gridworld(
    shape: tuple[int, int],
    gamma: float,
    terminal: tuple[tuple[int, int], ...] = (),
    jumps: Mapping[tuple[int, int], tuple[tuple[int, int], float]] | None = None,
    step_reward: float = 0.0,
    off_grid_reward: float = -1.0,
) -> MDP:
    """A deterministic gridworld as an MDP.

    From a cell listed in ``jumps`` every action moves to the jump target with the jump's
    reward; an action that would leave the grid keeps the agent in place with
    ``off_grid_reward``; any other action moves one cell with ``step_reward``. ``terminal``
    cells are absorbing with reward 0.
    """
    n_rows, n_cols = shape
    S, A = n_rows * n_cols, len(GRID_MOVES)
    jumps = dict(jumps or {})
    P = np.zeros((S, A, S))
    R = np.zeros((S, A, S))
    terminal_idx = [r * n_cols + c for r, c in terminal]
    for row in range(n_rows):
        for col in range(n_cols):
            s = row * n_cols + col
            for a, (dr, dc) in enumerate(GRID_MOVES):
                if s in terminal_idx:
                    P[s, a, s] = 1.0  # absorbing, reward 0
                    continue
                if (row, col) in jumps:
                    (tr, tc), reward = jumps[(row, col)]
                    target = tr * n_cols + tc
                elif 0 <= row + dr < n_rows and 0 <= col + dc < n_cols:
                    target, reward = (row + dr) * n_cols + col + dc, step_reward
                else:
                    target, reward = s, off_grid_reward
                P[s, a, target] = 1.0
                R[s, a, target] = reward
    names = [f"({r},{c})" for r in range(n_rows) for c in range(n_cols)]
    return MDP.from_arrays(P, R, gamma, terminal=terminal_idx, state_names=names,
                           action_names=GRID_ACTIONS, grid_shape=shape)


def gridworld_3_5(gamma: float = 0.9) -> MDP:
    """Sutton and Barto (2018), Example 3.5: a 5x5 grid, no terminal state.

    From A = (0, 1) every action jumps to A' = (4, 1) with reward +10; from B = (0, 3) to
    B' = (2, 3) with +5; bumping into the edge costs -1 and leaves the agent in place; every
    other move earns 0. Discount ``gamma = 0.9``.
    """
    return gridworld((5, 5), gamma, jumps={(0, 1): ((4, 1), 10.0), (0, 3): ((2, 3), 5.0)},
                     step_reward=0.0, off_grid_reward=-1.0)


def gridworld_4_1(gamma: float = 1.0) -> MDP:
    """Sutton and Barto (2018), Example 4.1: a 4x4 grid whose top-left and bottom-right corners
    are terminal; every move earns -1 (including bumping into the edge, which leaves the agent
    in place). Undiscounted, ``gamma = 1``: ``-V(s)`` is the expected number of steps to finish.
    """
    return gridworld((4, 4), gamma, terminal=((0, 0), (3, 3)), step_reward=-1.0,
                     off_grid_reward=-1.0)


# --------------------------------------------------------------------------------------------
# the conversation MDP of chapter 2
# --------------------------------------------------------------------------------------------
CONVERSATION_STATES = ("start", "on_topic", "rambling", "repeating", "end")
CONVERSATION_ACTIONS = ("continue", "stop")
#: Rewards of a sentence: a correct on-topic sentence +1, a hallucinated one -2, a rambling one
#: -0.5, a repeated one -1. Note the same next state with two rewards: the joint p(s', r|s, a).
_CONTINUE = {
    "start": [(0.60, "on_topic", 1.0), (0.10, "on_topic", -2.0), (0.30, "rambling", -0.5)],
    "on_topic": [(0.50, "on_topic", 1.0), (0.10, "on_topic", -2.0), (0.25, "rambling", -0.5),
                 (0.15, "repeating", -1.0)],
    "rambling": [(0.30, "on_topic", 1.0), (0.05, "on_topic", -2.0), (0.40, "rambling", -0.5),
                 (0.25, "repeating", -1.0)],
    "repeating": [(0.10, "on_topic", 1.0), (0.10, "rambling", -0.5), (0.80, "repeating", -1.0)],
}


def conversation_mdp(gamma: float = 0.9) -> MDP:
    """A toy model of a language model writing a reply, one sentence per step.

    States: ``start``, ``on_topic``, ``rambling``, ``repeating`` and the terminal ``end``.
    Actions: ``continue`` (write another sentence; what it is about is random, see
    ``_CONTINUE``) or ``stop`` (end the reply; reward 0, or -1 for an empty reply at
    ``start``). The reward of a sentence depends on more than the next state: an on-topic
    sentence is correct (+1) or hallucinated (-2), so ``p(s', r|s, a)`` is a genuinely joint
    distribution.
    """
    dynamics = {(s, "continue"): outs for s, outs in _CONTINUE.items()}
    for s in _CONTINUE:
        dynamics[(s, "stop")] = [(1.0, "end", -1.0 if s == "start" else 0.0)]
    return MDP.from_dynamics(dynamics, gamma, states=CONVERSATION_STATES,
                             actions=CONVERSATION_ACTIONS, terminal=("end",))


def conversation_chain() -> MarkovChain:
    """The Markov chain of a writer that never stops: ``P[s, s'] = p(s'|s, continue)`` over the
    four non-terminal states of :func:`conversation_mdp`."""
    mdp = conversation_mdp()
    return MarkovChain(mdp.P[:4, 0, :4], CONVERSATION_STATES[:4])
