"""Markov chains, Markov reward processes and Markov decision processes (NumPy, layer 1).

The slides build up three objects:

* a **Markov chain** has states ``S`` and a transition matrix ``P[s, s'] = Pr{S_{t+1}=s' | S_t=s}``;
* a **Markov reward process** (MRP) adds a reward: ``r(s) = E[R_{t+1} | S_t = s]`` and a
  discount ``gamma``;
* a **Markov decision process** (MDP) adds actions and the four-argument dynamics
  ``p(s', r | s, a) = Pr{S_{t+1}=s', R_{t+1}=r | S_t=s, A_t=a}``.

:class:`MDP` stores exactly that joint distribution, as an array ``p[s, a, s', k]`` over a
finite set of reward values ``rewards[k]``; everything else (``P(s'|s, a)``, ``r(s, a)``) is
derived from it. Terminal states are absorbing with zero reward and are flagged in
``terminal`` so that samplers stop there and solvers pin their value to 0.

Indices everywhere: states ``s = 0..S-1``, actions ``a = 0..A-1``. Names are only for display.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

__all__ = [
    "MDP",
    "MRP",
    "MarkovChain",
    "deterministic_policy",
    "distribution_after",
    "mrp_from_mdp",
    "policy_reward",
    "policy_transition",
    "random_mdp",
    "sample_chain",
    "stationary_distribution",
    "uniform_policy",
    "validate_policy",
    "validate_stochastic_matrix",
]

#: Tolerance for "probabilities sum to one".
PROB_ATOL = 1e-8


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def validate_stochastic_matrix(P: np.ndarray, what: str = "P", names: Sequence | None = None
                               ) -> np.ndarray:
    """Check that every row of ``P`` (last axis) is a probability distribution; return float64.

    Raises ``ValueError`` naming the first offending row and its sum, e.g.
    ``P[2] sums to 0.9, not 1``.
    """
    P = np.asarray(P, dtype=np.float64)
    if not np.all(np.isfinite(P)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(P))[0])
        raise ValueError(f"{what}{list(bad)} is not finite ({P[bad]})")
    if np.any(P < 0):
        bad = tuple(int(i) for i in np.argwhere(P < 0)[0])
        raise ValueError(f"{what}{list(bad)} = {P[bad]:.6g} is negative; probabilities are >= 0")
    sums = P.sum(axis=-1)
    off = np.abs(sums - 1.0) > PROB_ATOL
    if np.any(off):
        row = tuple(int(i) for i in np.argwhere(off)[0])
        label = f" ({names[row[0]]!r})" if names is not None and len(row) == 1 else ""
        raise ValueError(
            f"{what}{list(row)}{label} sums to {sums[row]:.10g}, not 1: each row must be a "
            "probability distribution over next states"
        )
    return P


def _names(names: Sequence | None, n: int, prefix: str) -> tuple:
    if names is None:
        return tuple(f"{prefix}{i}" for i in range(n))
    names = tuple(names)
    if len(names) != n:
        raise ValueError(f"got {len(names)} {prefix} names for {n} {prefix}s")
    return names


def _terminal_mask(terminal, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    if terminal is None:
        return mask
    terminal = np.asarray(terminal)
    if terminal.dtype == bool:
        if terminal.shape != (n,):
            raise ValueError(f"terminal mask has shape {terminal.shape}, expected ({n},)")
        return terminal.copy()
    mask[terminal.astype(int)] = True
    return mask


# --------------------------------------------------------------------------------------------
# Markov chain
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MarkovChain:
    """A finite Markov chain: ``P[s, s'] = Pr{S_{t+1} = s' | S_t = s}`` (rows sum to 1)."""

    P: np.ndarray
    state_names: tuple = ()

    def __post_init__(self) -> None:
        P = np.asarray(self.P, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] != P.shape[1]:
            raise ValueError(f"a transition matrix is square; got shape {P.shape}")
        object.__setattr__(self, "state_names", _names(self.state_names or None, len(P), "s"))
        object.__setattr__(self, "P", validate_stochastic_matrix(P, "P", self.state_names))

    @property
    def n_states(self) -> int:
        return self.P.shape[0]


def sample_chain(P: np.ndarray, start: int, n_steps: int, rng: np.random.Generator,
                 absorbing: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Sample ``S_0 = start, S_1, ..., S_n`` with ``S_{t+1} ~ P[S_t, :]``.

    Stops early (a shorter array) when the chain enters a state listed in ``absorbing``.
    Returns an int array of length ``<= n_steps + 1``.
    """
    P = validate_stochastic_matrix(P)
    stop = _terminal_mask(absorbing, len(P))
    cdf = np.cumsum(P, axis=1)
    states = [int(start)]
    for _ in range(n_steps):
        s = states[-1]
        if stop[s]:
            break
        # searchsorted on the row's CDF = one categorical draw; min() guards against 1 - eps.
        states.append(min(int(np.searchsorted(cdf[s], rng.random(), side="right")), len(P) - 1))
    return np.asarray(states, dtype=np.int64)


def distribution_after(P: np.ndarray, mu0: np.ndarray, n_steps: int) -> np.ndarray:
    """Distributions of ``S_0..S_n``: ``mu_{t+1} = mu_t P`` (row vector times matrix).

    Returns an array of shape ``[n_steps + 1, S]``; row ``t`` is ``Pr{S_t = .}``.
    """
    P = validate_stochastic_matrix(P)
    mu = np.asarray(mu0, dtype=np.float64)
    out = [mu]
    for _ in range(n_steps):
        mu = mu @ P
        out.append(mu)
    return np.stack(out)


def stationary_distribution(P: np.ndarray) -> np.ndarray:
    """The distribution ``mu`` with ``mu P = mu`` and ``sum(mu) = 1``.

    Solved as the linear system ``(P^T - I) mu = 0`` together with ``1^T mu = 1`` (least squares
    on the stacked system, exact when the solution is unique). A chain with several closed
    classes has many stationary distributions: then this raises ``ValueError``.
    """
    P = validate_stochastic_matrix(P)
    n = len(P)
    A = np.vstack([P.T - np.eye(n), np.ones((1, n))])
    b = np.zeros(n + 1)
    b[-1] = 1.0
    if np.linalg.matrix_rank(A) < n:
        raise ValueError("the chain has more than one stationary distribution (several closed "
                         "classes); pick a starting distribution and use distribution_after")
    mu, *_ = np.linalg.lstsq(A, b, rcond=None)
    mu = np.clip(mu, 0.0, None)  # remove -1e-17 round-off
    return mu / mu.sum()


# --------------------------------------------------------------------------------------------
# Markov reward process
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MRP:
    """A Markov reward process: a chain ``P[s, s']``, expected rewards ``R[s] = E[R_{t+1}|S_t=s]``
    and a discount ``gamma``. States in ``terminal`` are absorbing and worth 0.

    ``R`` may also be given per transition, ``R[s, s']``; it is then reduced to
    ``R[s] = sum_{s'} P[s, s'] R[s, s']`` (only the expectation enters the values), and the
    per-transition rewards are kept in ``R_transition`` for sampling.
    """

    P: np.ndarray
    R: np.ndarray
    gamma: float
    terminal: np.ndarray | None = None
    state_names: tuple = ()
    R_transition: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        chain = MarkovChain(self.P, self.state_names)
        n = chain.n_states
        R = np.asarray(self.R, dtype=np.float64)
        if R.shape == (n, n):
            object.__setattr__(self, "R_transition", R)
            R = (chain.P * R).sum(axis=1)
        elif R.shape != (n,):
            raise ValueError(f"R has shape {R.shape}; expected ({n},) or ({n}, {n})")
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise ValueError(f"gamma = {self.gamma} is outside [0, 1]")
        terminal = _terminal_mask(self.terminal, n)
        for s in np.flatnonzero(terminal):
            if chain.P[s, s] != 1.0 or R[s] != 0.0:
                raise ValueError(f"terminal state {chain.state_names[s]!r} must be absorbing "
                                 "(P[s, s] = 1) with zero reward")
        object.__setattr__(self, "P", chain.P)
        object.__setattr__(self, "R", R)
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "terminal", terminal)
        object.__setattr__(self, "state_names", chain.state_names)

    @property
    def n_states(self) -> int:
        return self.P.shape[0]


# --------------------------------------------------------------------------------------------
# Markov decision process
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MDP:
    """A finite MDP given by its four-argument dynamics.

    ``p[s, a, s', k] = p(s', r_k | s, a) = Pr{S_{t+1}=s', R_{t+1}=rewards[k] | S_t=s, A_t=a}``,
    shape ``[S, A, S, K]``; for every ``(s, a)`` the entries sum to 1 over ``(s', k)``.

    ``terminal`` marks absorbing states (every action loops back with reward 0); their value
    is 0 by definition. ``grid_shape`` is set by the gridworlds (state ``s`` sits at
    ``divmod(s, n_cols)``) and only matters for plots.

    Build one with :meth:`from_dynamics` (the slides' ``p(s', r | s, a)`` as a table) or
    :meth:`from_arrays` (``P(s'|s, a)`` and a reward array); convert back with
    :meth:`to_dynamics` and :meth:`to_arrays`.
    """

    p: np.ndarray
    rewards: np.ndarray
    gamma: float
    terminal: np.ndarray | None = None
    state_names: tuple = ()
    action_names: tuple = ()
    grid_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        p = np.asarray(self.p, dtype=np.float64)
        rewards = np.asarray(self.rewards, dtype=np.float64).reshape(-1)
        if p.ndim != 4 or p.shape[0] != p.shape[2] or p.shape[3] != len(rewards):
            raise ValueError(
                f"p must have shape [S, A, S, K] with K = len(rewards) = {len(rewards)}; "
                f"got {p.shape}"
            )
        S, A = p.shape[:2]
        states = _names(self.state_names or None, S, "s")
        actions = _names(self.action_names or None, A, "a")
        if not np.all(np.isfinite(rewards)):
            raise ValueError("rewards must be finite")
        if np.any(p < 0):
            s, a, s2, k = (int(i) for i in np.argwhere(p < 0)[0])
            raise ValueError(f"p(s'={states[s2]!r}, r={rewards[k]:g} | s={states[s]!r}, "
                             f"a={actions[a]!r}) = {p[s, a, s2, k]:.6g} is negative")
        sums = p.sum(axis=(2, 3))
        off = np.abs(sums - 1.0) > PROB_ATOL
        if np.any(off):
            s, a = (int(i) for i in np.argwhere(off)[0])
            raise ValueError(
                f"p(., . | s={states[s]!r}, a={actions[a]!r}) sums to {sums[s, a]:.10g}, not 1: "
                "for every state and action the probabilities over (s', r) must sum to 1"
            )
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise ValueError(f"gamma = {self.gamma} is outside [0, 1]")
        terminal = _terminal_mask(self.terminal, S)
        for s in np.flatnonzero(terminal):
            stay = p[s, :, s, :]
            if not np.allclose(stay.sum(axis=-1), 1.0) or np.any(
                (stay > 0) & (rewards[None, :] != 0)
            ):
                raise ValueError(f"terminal state {states[s]!r} must be absorbing with reward 0")
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "terminal", terminal)
        object.__setattr__(self, "state_names", states)
        object.__setattr__(self, "action_names", actions)

    # ---- sizes and derived arrays -----------------------------------------------------------
    @property
    def n_states(self) -> int:
        return self.p.shape[0]

    @property
    def n_actions(self) -> int:
        return self.p.shape[1]

    @cached_property
    def P(self) -> np.ndarray:
        """``P[s, a, s'] = p(s'|s, a) = sum_r p(s', r|s, a)``, shape ``[S, A, S]``."""
        return self.p.sum(axis=3)

    @cached_property
    def r_sa(self) -> np.ndarray:
        """``r(s, a) = E[R_{t+1}|S_t=s, A_t=a] = sum_{s', r} p(s', r|s, a) r``, shape ``[S, A]``."""
        return np.einsum("sank,k->sa", self.p, self.rewards)

    @cached_property
    def r_sas(self) -> np.ndarray:
        """``r(s, a, s') = E[R_{t+1}|s, a, s']`` (0 where ``p(s'|s, a) = 0``), ``[S, A, S]``."""
        num = np.einsum("sank,k->san", self.p, self.rewards)
        P = self.P
        return np.divide(num, P, out=np.zeros_like(num), where=P > 0)

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_dynamics(
        cls,
        dynamics: Mapping[tuple[Hashable, Hashable], Iterable[tuple[float, Hashable, float]]],
        gamma: float,
        states: Sequence[Hashable] | None = None,
        actions: Sequence[Hashable] | None = None,
        terminal: Iterable[Hashable] = (),
        grid_shape: tuple[int, int] | None = None,
    ) -> MDP:
        """Build an MDP from the table ``{(s, a): [(prob, s', r), ...]}`` of ``p(s', r | s, a)``.

        States and actions may be any hashable names; when ``states``/``actions`` are not given
        they are taken in order of first appearance. Terminal states need no entries (they
        become absorbing with reward 0); every other state needs an entry for every action.
        Repeated ``(s', r)`` outcomes are added up.
        """
        keys = list(dynamics)
        for (s, a), outcomes in dynamics.items():
            for entry in outcomes:
                if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                    raise ValueError(f"dynamics[({s!r}, {a!r})]: entry {entry!r} is not "
                                     "(prob, next_state, reward)")
        if states is None:
            seen: dict = {}
            for s, _ in keys:
                seen.setdefault(s, None)
            for outcomes in dynamics.values():
                for _, s2, _ in outcomes:
                    seen.setdefault(s2, None)
            for s in terminal:
                seen.setdefault(s, None)
            states = list(seen)
        if actions is None:
            seen = {}
            for _, a in keys:
                seen.setdefault(a, None)
            actions = list(seen)
        s_index = {s: i for i, s in enumerate(states)}
        a_index = {a: i for i, a in enumerate(actions)}
        terminal = list(terminal)
        for s in terminal:
            if s not in s_index:
                raise ValueError(f"terminal state {s!r} is not a state")
        reward_values = sorted({float(r) for outs in dynamics.values() for _, _, r in outs} | {0.0})
        k_index = {r: k for k, r in enumerate(reward_values)}
        S, A, K = len(states), len(actions), len(reward_values)
        p = np.zeros((S, A, S, K))
        for (s, a), outcomes in dynamics.items():
            if s not in s_index:
                raise ValueError(f"dynamics key ({s!r}, {a!r}): unknown state {s!r}")
            if a not in a_index:
                raise ValueError(f"dynamics key ({s!r}, {a!r}): unknown action {a!r}")
            for prob, s2, r in outcomes:
                if s2 not in s_index:
                    raise ValueError(f"dynamics[({s!r}, {a!r})]: unknown next state {s2!r}")
                p[s_index[s], a_index[a], s_index[s2], k_index[float(r)]] += float(prob)
        for s in terminal:
            i = s_index[s]
            if p[i].sum() > 0:
                raise ValueError(f"terminal state {s!r} must not have dynamics entries")
            p[i, :, i, k_index[0.0]] = 1.0
        for s in states:
            for a in actions:
                if s not in terminal and (s, a) not in dynamics:
                    raise ValueError(f"dynamics has no entry for state {s!r}, action {a!r}")
        return cls(p, np.asarray(reward_values), gamma, np.asarray([s_index[s] for s in terminal],
                   dtype=int), tuple(states), tuple(actions), grid_shape)

    @classmethod
    def from_arrays(
        cls,
        P: np.ndarray,
        R: np.ndarray,
        gamma: float,
        layout: str = "sas",
        terminal: Iterable[int] | np.ndarray | None = None,
        state_names: Sequence | None = None,
        action_names: Sequence | None = None,
        grid_shape: tuple[int, int] | None = None,
    ) -> MDP:
        """Build an MDP from transition probabilities and deterministic rewards.

        ``P`` has shape ``[S, A, S]`` with ``P[s, a, s'] = p(s'|s, a)`` (``layout="sas"``) or
        ``[A, S, S]`` with ``P[a, s, s']`` (``layout="ass"``, the convention of MDPToolbox).
        ``R`` is ``R[s, a]`` (the reward of taking ``a`` in ``s``, whatever comes next) or
        ``R[s, a, s']`` (the reward of the transition). Either way the reward is a function of
        the transition, so ``p(s', r|s, a) = P(s'|s, a) * [r = R(s, a, s')]``.
        """
        P = np.asarray(P, dtype=np.float64)
        if layout == "ass":
            P = P.transpose(1, 0, 2)
        elif layout != "sas":
            raise ValueError(f"layout must be 'sas' or 'ass', not {layout!r}")
        if P.ndim != 3 or P.shape[0] != P.shape[2]:
            raise ValueError(f"P must have shape [S, A, S] (layout {layout!r}); got {P.shape}")
        S, A, _ = P.shape
        R = np.asarray(R, dtype=np.float64)
        if R.shape == (S, A):
            R = np.broadcast_to(R[:, :, None], (S, A, S))
        elif R.shape != (S, A, S):
            raise ValueError(f"R must have shape ({S}, {A}) or ({S}, {A}, {S}); got {R.shape}")
        names = [f"s{i}" for i in range(S)] if state_names is None else list(state_names)
        anames = [f"a{i}" for i in range(A)] if action_names is None else list(action_names)
        for s in range(S):
            validate_stochastic_matrix(P[s], f"P[{names[s]!r}]", anames)
        # Only rewards of possible transitions enter the support.
        support = np.unique(np.concatenate([R[P > 0], [0.0]]))
        k = np.searchsorted(support, R)
        k = np.where(P > 0, k, 0)
        p = np.zeros((S, A, S, len(support)))
        np.put_along_axis(p, k[..., None], P[..., None], axis=3)
        return cls(p, support, gamma, terminal, tuple(names), tuple(anames), grid_shape)

    # ---- conversions ------------------------------------------------------------------------
    def to_dynamics(self, names: bool = False) -> dict[tuple, list[tuple[float, object, float]]]:
        """The table ``{(s, a): [(prob, s', r), ...]}`` of non-zero ``p(s', r | s, a)``.

        Keys and next states are indices, or names with ``names=True``. Terminal states are left
        out (as :meth:`from_dynamics` expects).
        """
        S_ = self.state_names if names else range(self.n_states)
        A_ = self.action_names if names else range(self.n_actions)
        table: dict[tuple, list[tuple[float, object, float]]] = {}
        for s in range(self.n_states):
            if self.terminal[s]:
                continue
            for a in range(self.n_actions):
                nz = np.argwhere(self.p[s, a] > 0)
                table[(S_[s], A_[a])] = [
                    (float(self.p[s, a, s2, k]), S_[s2], float(self.rewards[k])) for s2, k in nz
                ]
        return table

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(P[s, a, s'], R[s, a, s'])``: transition probabilities and expected rewards of each
        transition. Stochastic rewards are averaged here (the values only need the mean)."""
        return self.P.copy(), self.r_sas.copy()

    def with_gamma(self, gamma: float) -> MDP:
        """The same dynamics with another discount factor."""
        return MDP(self.p, self.rewards, gamma, self.terminal, self.state_names,
                   self.action_names, self.grid_shape)


def random_mdp(n_states: int, n_actions: int, n_rewards: int, gamma: float,
               rng: np.random.Generator, sparsity: float = 0.0) -> MDP:
    """A random MDP: ``p(., .|s, a)`` drawn from a Dirichlet over ``S*K`` outcomes, rewards
    drawn uniformly from [-1, 1]. ``sparsity`` zeroes that fraction of outcomes (at least one
    stays). Used by the property tests."""
    S, A, K = n_states, n_actions, n_rewards
    p = rng.dirichlet(np.ones(S * K), size=(S, A))
    if sparsity > 0:
        keep = rng.random(p.shape) >= sparsity
        keep[..., 0] |= ~keep.any(axis=-1)
        p = p * keep
        p /= p.sum(axis=-1, keepdims=True)
    rewards = np.sort(rng.uniform(-1, 1, size=K))
    return MDP(p.reshape(S, A, S, K), rewards, gamma)


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------
def validate_policy(pi: np.ndarray, n_states: int, n_actions: int) -> np.ndarray:
    """Check that ``pi[s, a] = pi(a|s)`` has shape ``[S, A]`` and rows summing to 1."""
    pi = np.asarray(pi, dtype=np.float64)
    if pi.shape != (n_states, n_actions):
        raise ValueError(f"policy has shape {pi.shape}, expected ({n_states}, {n_actions})")
    return validate_stochastic_matrix(pi, "pi")


def uniform_policy(n_states: int, n_actions: int) -> np.ndarray:
    """The equiprobable random policy ``pi(a|s) = 1/|A|``, shape ``[S, A]``."""
    return np.full((n_states, n_actions), 1.0 / n_actions)


def deterministic_policy(actions: Sequence[int] | np.ndarray, n_actions: int) -> np.ndarray:
    """A deterministic policy ``a = pi(s)`` as the one-hot stochastic policy
    ``pi(a|s) = 1 if a == actions[s] else 0``, shape ``[S, A]``."""
    actions = np.asarray(actions, dtype=np.int64)
    if actions.ndim != 1:
        raise ValueError(f"actions must be a 1-d array of action indices, got shape "
                         f"{actions.shape}")
    if np.any((actions < 0) | (actions >= n_actions)):
        raise ValueError(f"action indices must lie in [0, {n_actions}); got {actions}")
    return np.eye(n_actions)[actions]


def policy_transition(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``P_pi[s, s'] = sum_a pi(a|s) p(s'|s, a)``: the Markov chain a policy induces."""
    pi = validate_policy(pi, mdp.n_states, mdp.n_actions)
    return np.einsum("sa,san->sn", pi, mdp.P)


def policy_reward(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``r_pi(s) = sum_a pi(a|s) r(s, a) = sum_a pi(a|s) sum_{s', r} p(s', r|s, a) r``."""
    pi = validate_policy(pi, mdp.n_states, mdp.n_actions)
    return np.einsum("sa,sa->s", pi, mdp.r_sa)


def mrp_from_mdp(mdp: MDP, pi: np.ndarray) -> MRP:
    """Fixing a policy turns an MDP into an MRP: ``(P_pi, r_pi, gamma)``."""
    return MRP(policy_transition(mdp, pi), policy_reward(mdp, pi), mdp.gamma, mdp.terminal,
               mdp.state_names)
