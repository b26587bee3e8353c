"""Trajectories and returns: sampling episodes from an MDP or MRP and ``G_t`` for every ``t``.

Index convention (Sutton and Barto, and the slides): a trajectory is
``S_0, A_0, R_1, S_1, A_1, R_2, ...``. In arrays, ``rewards[t]`` holds ``R_{t+1}``, the reward
that follows the action taken at time ``t``; so ``states``, ``actions`` and ``rewards`` line up
index by index, and ``states`` has one more entry (the state reached last).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlcourse.mdp.processes import MDP, MRP, validate_policy

__all__ = [
    "Episode",
    "discounted_return",
    "discounted_returns",
    "discounted_returns_matrix",
    "sample_episode",
    "sample_mrp_episode",
]


@dataclass
class Episode:
    """``states[0..T]``, ``actions[0..T-1]``, ``rewards[0..T-1]`` (``rewards[t] = R_{t+1}``).

    ``terminated`` is True when the episode reached a terminal state, False when it was cut off
    after ``max_steps`` (then the return of the last steps is truncated).
    """

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool

    def __len__(self) -> int:
        return len(self.rewards)


def discounted_return(rewards: np.ndarray, gamma: float) -> float:
    """``G_0 = R_1 + gamma R_2 + gamma^2 R_3 + ... = sum_{i>=0} gamma^i R_{i+1}``.

    ``rewards[i]`` holds ``R_{i+1}``, so the first reward is not discounted.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    return float(np.sum(gamma ** np.arange(len(rewards)) * rewards))


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Every ``G_t`` of a finite trajectory, by the backward recursion ``G_t = R_{t+1} + gamma
    G_{t+1}`` with ``G_T = 0``. ``rewards[t] = R_{t+1}``; returns an array of the same length.

    One pass from the end: O(T) work, the form every RL library uses.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    G = np.zeros(len(rewards) + 1)
    for t in range(len(rewards) - 1, -1, -1):
        G[t] = rewards[t] + gamma * G[t + 1]
    return G[:-1]


def discounted_returns_matrix(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Every ``G_t = sum_{i>=0} gamma^i R_{t+i+1}`` at once, as a matrix-vector product.

    ``G = D r`` with ``D[t, j] = gamma^(j - t)`` for ``j >= t`` and 0 below the diagonal
    (``r[j] = R_{j+1}``). O(T^2) work and memory: the definition written out, good for
    checking the recursion, not for long trajectories.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    T = len(rewards)
    t = np.arange(T)
    lag = t[None, :] - t[:, None]  # lag[t, j] = j - t
    D = np.where(lag >= 0, float(gamma) ** np.clip(lag, 0, None), 0.0)
    return D @ rewards


def sample_episode(mdp: MDP, pi: np.ndarray, start: int, rng: np.random.Generator,
                   max_steps: int = 1000) -> Episode:
    """Sample ``S_0 = start, A_0 ~ pi(.|S_0), (S_1, R_1) ~ p(., .|S_0, A_0), ...``.

    Stops at a terminal state or after ``max_steps`` actions. Every random choice comes from
    ``rng``, so a seeded generator gives the same episode every time.
    """
    pi = validate_policy(pi, mdp.n_states, mdp.n_actions)
    S, A, _, K = mdp.p.shape
    pi_cdf = np.cumsum(pi, axis=1)
    # One categorical draw over the joint outcome (s', k) per step: flatten the last two axes.
    out_cdf = np.cumsum(mdp.p.reshape(S, A, S * K), axis=2)
    states, actions, rewards = [int(start)], [], []
    s = int(start)
    terminated = bool(mdp.terminal[s])
    for _ in range(max_steps):
        if terminated:
            break
        a = min(int(np.searchsorted(pi_cdf[s], rng.random(), side="right")), A - 1)
        j = min(int(np.searchsorted(out_cdf[s, a], rng.random(), side="right")), S * K - 1)
        s, k = divmod(j, K)
        actions.append(a)
        rewards.append(mdp.rewards[k])
        states.append(s)
        terminated = bool(mdp.terminal[s])
    return Episode(np.asarray(states, dtype=np.int64), np.asarray(actions, dtype=np.int64),
                   np.asarray(rewards, dtype=np.float64), terminated)


def sample_mrp_episode(mrp: MRP, start: int, rng: np.random.Generator, max_steps: int = 1000
                       ) -> Episode:
    """Sample ``S_0 = start, S_1, ...`` from an MRP with rewards ``R_{t+1} = R(S_t, S_{t+1})``
    (per-transition rewards when the MRP has them, else the expected ``R(S_t)``).

    ``actions`` is empty: an MRP has none.
    """
    cdf = np.cumsum(mrp.P, axis=1)
    n = mrp.n_states
    states, rewards = [int(start)], []
    s = int(start)
    for _ in range(max_steps):
        if mrp.terminal[s]:
            break
        s2 = min(int(np.searchsorted(cdf[s], rng.random(), side="right")), n - 1)
        r = mrp.R_transition[s, s2] if mrp.R_transition is not None else mrp.R[s]
        rewards.append(float(r))
        states.append(s2)
        s = s2
    return Episode(np.asarray(states, dtype=np.int64), np.zeros(0, dtype=np.int64),
                   np.asarray(rewards, dtype=np.float64), bool(mrp.terminal[s]))
