"""Value functions, Bellman equations and dynamic programming (NumPy, layer 1).

The slides' definitions and the two relations between them:

* ``V_pi(s) = E_pi[G_t | S_t = s]`` and ``q_pi(s, a) = E_pi[G_t | S_t = s, A_t = a]``;
* ``V_pi(s) = sum_a pi(a|s) q_pi(s, a)``                          (:func:`v_from_q`);
* ``q_pi(s, a) = sum_{s', r} p(s', r|s, a) [r + gamma V_pi(s')]``  (:func:`q_from_v`).

Substituting one into the other gives the Bellman equations, whose right-hand sides are the
Bellman operators (:func:`bellman_expectation`, :func:`bellman_optimality`). Both are
``gamma``-contractions in the max norm, which is why iterating them converges.

Every value array has one entry per state; terminal states are worth 0 and stay 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rlcourse.mdp.processes import (
    MDP,
    MRP,
    deterministic_policy,
    policy_reward,
    policy_transition,
    validate_policy,
)

__all__ = [
    "ControlResult",
    "EvaluationResult",
    "bellman_expectation",
    "bellman_expectation_q",
    "bellman_optimality",
    "bellman_optimality_q",
    "greedy_policy",
    "mrp_values",
    "policy_evaluation",
    "policy_evaluation_sweep",
    "policy_iteration",
    "solve_q",
    "solve_values",
    "q_from_v",
    "v_from_q",
    "value_iteration",
]


# --------------------------------------------------------------------------------------------
# the two relations
# --------------------------------------------------------------------------------------------
def v_from_q(q: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """``V(s) = sum_a pi(a|s) q(s, a)``: the state value is the policy-weighted action value.

    ``q``: ``[S, A]``; ``pi``: ``[S, A]``; returns ``[S]``.
    """
    q = np.asarray(q, dtype=np.float64)
    return np.einsum("sa,sa->s", np.asarray(pi, dtype=np.float64), q)


def q_from_v(mdp: MDP, v: np.ndarray) -> np.ndarray:
    """``q(s, a) = sum_{s', r} p(s', r|s, a) [r + gamma V(s')]``: one step of the dynamics,
    then the value of where it lands. ``v``: ``[S]``; returns ``[S, A]``.

    ``mdp.p[s, a, s', k]`` is ``p(s', r_k | s, a)``, so the sum over ``(s', r)`` is a sum over
    the last two axes. Terminal states keep ``q = 0``.
    """
    v = np.where(mdp.terminal, 0.0, np.asarray(v, dtype=np.float64))
    # target[s', k] = r_k + gamma V(s'): the value of landing in s' with reward r_k
    target = mdp.rewards[None, :] + mdp.gamma * v[:, None]
    q = np.einsum("sank,nk->sa", mdp.p, target)
    q[mdp.terminal] = 0.0
    return q


# --------------------------------------------------------------------------------------------
# Bellman operators
# --------------------------------------------------------------------------------------------
def bellman_expectation(mdp: MDP, pi: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The Bellman expectation operator ``(T_pi V)(s) = sum_a pi(a|s) sum_{s', r}
    p(s', r|s, a) [r + gamma V(s')]`` (``V_pi`` is its fixed point). ``[S] -> [S]``."""
    return v_from_q(q_from_v(mdp, v), pi)


def bellman_optimality(mdp: MDP, v: np.ndarray) -> np.ndarray:
    """The Bellman optimality operator ``(T_* V)(s) = max_a sum_{s', r} p(s', r|s, a)
    [r + gamma V(s')]`` (``V_*`` is its fixed point). ``[S] -> [S]``."""
    return q_from_v(mdp, v).max(axis=1)


def bellman_expectation_q(mdp: MDP, pi: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(T_pi q)(s, a) = sum_{s', r} p(s', r|s, a) [r + gamma sum_{a'} pi(a'|s') q(s', a')]``."""
    return q_from_v(mdp, v_from_q(q, pi))


def bellman_optimality_q(mdp: MDP, q: np.ndarray) -> np.ndarray:
    """``(T_* q)(s, a) = sum_{s', r} p(s', r|s, a) [r + gamma max_{a'} q(s', a')]``."""
    return q_from_v(mdp, np.asarray(q, dtype=np.float64).max(axis=1))


# --------------------------------------------------------------------------------------------
# exact solutions of the linear Bellman equations
# --------------------------------------------------------------------------------------------
def _solve_linear(P: np.ndarray, r: np.ndarray, gamma: float, terminal: np.ndarray) -> np.ndarray:
    live = ~terminal
    v = np.zeros(len(r))
    A = np.eye(int(live.sum())) - gamma * P[np.ix_(live, live)]
    try:
        v[live] = np.linalg.solve(A, r[live])
    except np.linalg.LinAlgError:
        raise ValueError(
            "I - gamma P_pi is singular: with gamma = 1 some state never reaches a terminal "
            "state under this policy, so its return is unbounded (use gamma < 1 or a policy "
            "that terminates)"
        ) from None
    if np.linalg.cond(A) > 1e12:
        raise ValueError("I - gamma P_pi is (nearly) singular: the policy (nearly) never "
                         "terminates and gamma is (close to) 1")
    return v


def solve_values(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``V_pi`` exactly, from the linear Bellman equations ``V = r_pi + gamma P_pi V``:
    ``(I - gamma P_pi) V = r_pi`` solved with ``np.linalg.solve`` (terminal states fixed at 0).

    ``P_pi[s, s'] = sum_a pi(a|s) p(s'|s, a)`` and ``r_pi(s) = sum_a pi(a|s) r(s, a)``.
    """
    return _solve_linear(policy_transition(mdp, pi), policy_reward(mdp, pi), mdp.gamma,
                         mdp.terminal)


def solve_q(mdp: MDP, pi: np.ndarray) -> np.ndarray:
    """``q_pi`` exactly: solve for ``V_pi``, then ``q_pi = q_from_v(V_pi)``. ``[S, A]``."""
    return q_from_v(mdp, solve_values(mdp, pi))


def mrp_values(mrp: MRP) -> np.ndarray:
    """Values of a Markov reward process: ``V = R + gamma P V``, i.e. ``(I - gamma P) V = R``."""
    return _solve_linear(mrp.P, mrp.R, mrp.gamma, mrp.terminal)


# --------------------------------------------------------------------------------------------
# iterative policy evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """``v``: the final estimate; ``history[k]``: the estimate after ``k`` sweeps (``history[0]``
    is the start); ``deltas[k]``: ``max_s |V_{k+1}(s) - V_k(s)|``; ``converged``: delta < theta."""

    v: np.ndarray
    history: list[np.ndarray] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def n_iter(self) -> int:
        return len(self.deltas)


def policy_evaluation_sweep(mdp: MDP, pi: np.ndarray, v: np.ndarray, in_place: bool = False
                            ) -> np.ndarray:
    """One sweep of iterative policy evaluation, ``V_{k+1} = T_pi V_k``.

    Synchronous (``in_place=False``): every state is updated from the old array, a plain
    application of :func:`bellman_expectation`. In place (Gauss-Seidel): states are updated in
    order ``s = 0, 1, ...`` and later states already see the new values of earlier ones;
    usually converges in fewer sweeps. Returns a new array either way.
    """
    pi = validate_policy(pi, mdp.n_states, mdp.n_actions)
    v = np.array(v, dtype=np.float64)
    if not in_place:
        return bellman_expectation(mdp, pi, v)
    for s in range(mdp.n_states):
        if mdp.terminal[s]:
            v[s] = 0.0
            continue
        # q(s, .) from the current (partly updated) v, then average over pi(.|s)
        target = mdp.rewards[None, :] + mdp.gamma * np.where(mdp.terminal, 0.0, v)[:, None]
        q_s = np.einsum("ank,nk->a", mdp.p[s], target)
        v[s] = pi[s] @ q_s
    return v


def policy_evaluation(mdp: MDP, pi: np.ndarray, theta: float = 1e-10, max_iter: int = 100_000,
                      in_place: bool = False, v0: np.ndarray | None = None,
                      record: bool = True) -> EvaluationResult:
    """Iterative policy evaluation: repeat ``V <- T_pi V`` until ``max_s |change| < theta``.

    Converges to ``V_pi`` because ``T_pi`` is a ``gamma``-contraction (for ``gamma = 1`` it
    needs a policy that reaches a terminal state). ``record=True`` keeps every sweep in
    ``history`` for plots and widgets.
    """
    v = np.zeros(mdp.n_states) if v0 is None else np.asarray(v0, dtype=np.float64).copy()
    v[mdp.terminal] = 0.0
    result = EvaluationResult(v, [v.copy()] if record else [])
    for _ in range(max_iter):
        new = policy_evaluation_sweep(mdp, pi, v, in_place=in_place)
        delta = float(np.max(np.abs(new - v)))
        v = new
        result.deltas.append(delta)
        if record:
            result.history.append(v.copy())
        if delta < theta:
            result.converged = True
            break
    result.v = v
    return result


# --------------------------------------------------------------------------------------------
# control: greedy policies, value iteration, policy iteration
# --------------------------------------------------------------------------------------------
def greedy_policy(mdp: MDP, v: np.ndarray, ties: str = "first", atol: float = 1e-9
                  ) -> np.ndarray:
    """The policy greedy with respect to ``V``: ``pi(s) = argmax_a sum_{s', r} p(s', r|s, a)
    [r + gamma V(s')]``, returned as ``[S, A]`` probabilities.

    ``ties="first"`` picks the first best action (a deterministic, one-hot policy);
    ``ties="uniform"`` spreads probability evenly over every action within ``atol`` of the best
    (what Sutton and Barto draw as several arrows in one cell).
    """
    q = q_from_v(mdp, v)
    if ties == "first":
        return deterministic_policy(np.argmax(q, axis=1), mdp.n_actions)
    if ties == "uniform":
        best = q >= q.max(axis=1, keepdims=True) - atol
        return best / best.sum(axis=1, keepdims=True)
    raise ValueError(f"ties must be 'first' or 'uniform', not {ties!r}")


@dataclass
class ControlResult:
    """Outcome of value or policy iteration: optimal values ``v``, a greedy optimal ``policy``
    (``[S, A]``), ``history`` of value arrays per iteration and, for policy iteration, the
    sequence of ``policies``."""

    v: np.ndarray
    policy: np.ndarray
    history: list[np.ndarray] = field(default_factory=list)
    policies: list[np.ndarray] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def n_iter(self) -> int:
        return max(len(self.history) - 1, 0)


def value_iteration(mdp: MDP, theta: float = 1e-10, max_iter: int = 100_000,
                    v0: np.ndarray | None = None) -> ControlResult:
    """Value iteration: ``V_{k+1} = T_* V_k``, i.e. ``V_{k+1}(s) = max_a sum_{s', r}
    p(s', r|s, a) [r + gamma V_k(s')]``, until ``max_s |change| < theta``; then act greedily.

    With ``theta`` small, ``V`` is within ``theta * gamma / (1 - gamma)`` of ``V_*``.
    """
    v = np.zeros(mdp.n_states) if v0 is None else np.asarray(v0, dtype=np.float64).copy()
    v[mdp.terminal] = 0.0
    history, deltas, converged = [v.copy()], [], False
    for _ in range(max_iter):
        new = bellman_optimality(mdp, v)
        delta = float(np.max(np.abs(new - v)))
        v = new
        history.append(v.copy())
        deltas.append(delta)
        if delta < theta:
            converged = True
            break
    return ControlResult(v, greedy_policy(mdp, v), history, deltas=deltas, converged=converged)


def policy_iteration(mdp: MDP, pi0: np.ndarray | None = None, max_iter: int = 1000,
                     atol: float = 1e-9) -> ControlResult:
    """Policy iteration: evaluate ``pi`` exactly (:func:`solve_values`), improve it greedily,
    repeat until the policy is stable.

    Stability test: stop when the current policy's actions are already greedy, i.e.
    ``q_pi(s, pi(s)) >= max_a q_pi(s, a) - atol`` in every state; this avoids cycling between
    tied actions. The default start is the uniform random policy (with ``gamma = 1`` the start
    must reach a terminal state, or the linear system has no solution).
    """
    pi = (np.full((mdp.n_states, mdp.n_actions), 1.0 / mdp.n_actions) if pi0 is None
          else validate_policy(pi0, mdp.n_states, mdp.n_actions))
    history, policies = [], [pi]
    for _ in range(max_iter):
        v = solve_values(mdp, pi)
        history.append(v)
        q = q_from_v(mdp, v)
        current = np.einsum("sa,sa->s", pi, q)  # = v (the first relation)
        if np.all(current >= q.max(axis=1) - atol):
            return ControlResult(v, pi, history, policies, converged=True)
        pi = greedy_policy(mdp, v)
        policies.append(pi)
    return ControlResult(history[-1], pi, history, policies, converged=False)
