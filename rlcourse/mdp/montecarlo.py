"""Monte Carlo policy evaluation: ``V_pi(s)`` as the average of sampled returns from ``s``.

``V_pi(s) = E_pi[G_t | S_t = s]``, so averaging the returns ``G_t`` observed after visits to
``s`` estimates it without knowing ``p(s', r|s, a)``. *First-visit* MC uses only the first
visit to ``s`` in each episode (independent samples, unbiased); *every-visit* MC uses all of
them (more samples, correlated within an episode, biased for finitely many episodes but
consistent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rlcourse.mdp.processes import MDP, validate_policy
from rlcourse.mdp.returns import discounted_returns, sample_episode

__all__ = ["MonteCarloResult", "mc_policy_evaluation"]


@dataclass
class MonteCarloResult:
    """Per-state estimates after all episodes.

    ``v[s]``: mean of the returns recorded for ``s`` (``nan`` where never visited);
    ``counts[s]``: how many returns were averaged; ``stderr[s]``: standard error of the mean,
    ``std / sqrt(count)`` (meaningful for first-visit MC, where the returns are independent);
    ``history``: ``(episodes so far, v copy)`` at the checkpoints requested.
    """

    v: np.ndarray
    counts: np.ndarray
    stderr: np.ndarray
    history: list[tuple[int, np.ndarray]] = field(default_factory=list)


def mc_policy_evaluation(
    mdp: MDP,
    pi: np.ndarray,
    n_episodes: int,
    rng: np.random.Generator,
    first_visit: bool = True,
    start_states: np.ndarray | None = None,
    max_steps: int = 1000,
    discard_tail: int = 0,
    checkpoints: tuple[int, ...] = (),
) -> MonteCarloResult:
    """Estimate ``V_pi`` by averaging sampled returns ``G_t`` after visits to each state.

    Each episode starts in a state drawn uniformly from ``start_states`` (default: every
    non-terminal state, "exploring starts", so every state gets visited). Returns come from
    :func:`discounted_returns` (``G_t = R_{t+1} + gamma G_{t+1}``).

    Continuing tasks (no terminal state) are cut off after ``max_steps``; a return that starts
    ``m`` steps before the cut misses at most ``gamma^m max|r| / (1 - gamma)``, so
    ``discard_tail`` drops visits in the last ``discard_tail`` steps of a cut-off episode.
    """
    pi = validate_policy(pi, mdp.n_states, mdp.n_actions)
    S = mdp.n_states
    if start_states is None:
        start_states = np.flatnonzero(~mdp.terminal)
    start_states = np.asarray(start_states, dtype=np.int64)
    total, total_sq, counts = np.zeros(S), np.zeros(S), np.zeros(S, dtype=np.int64)
    history = []
    marks = set(int(c) for c in checkpoints)
    for episode_index in range(1, n_episodes + 1):
        start = int(start_states[rng.integers(len(start_states))])
        ep = sample_episode(mdp, pi, start, rng, max_steps=max_steps)
        G = discounted_returns(ep.rewards, mdp.gamma)  # G[t] = return from time t
        usable = len(G) if ep.terminated else max(len(G) - discard_tail, 0)
        visited = ep.states[:usable]
        if first_visit:
            # np.unique returns the index of the first occurrence of each state
            _, first = np.unique(visited, return_index=True)
            times = first
        else:
            times = np.arange(usable)
        np.add.at(total, visited[times], G[times])
        np.add.at(total_sq, visited[times], G[times] ** 2)
        np.add.at(counts, visited[times], 1)
        if episode_index in marks:
            snapshot = _mean(total, counts)
            snapshot[mdp.terminal] = 0.0
            history.append((episode_index, snapshot))
    v = _mean(total, counts)
    var = np.where(counts > 1, (total_sq - counts * np.nan_to_num(v) ** 2)
                   / np.maximum(counts - 1, 1), np.nan)
    stderr = np.sqrt(np.clip(var, 0, None)) / np.sqrt(np.maximum(counts, 1))
    v[mdp.terminal] = 0.0
    stderr[mdp.terminal] = 0.0
    return MonteCarloResult(v, counts, stderr, history)


def _mean(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.divide(total, counts, out=np.full(len(total), np.nan), where=counts > 0)
