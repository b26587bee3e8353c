"""Exercises of chapter 3, "Value functions and Bellman equations".

MDPs are passed as arrays: ``p[s, a, s', k] = p(s', r_k | s, a)`` and ``rewards[k] = r_k``.
"""

from __future__ import annotations

import numpy as np

from rlcourse import mdp
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "03_value_functions"


def _random_world(rng: np.random.Generator, S: int, A: int, K: int):
    world = mdp.random_mdp(S, A, K, 0.9, rng, sparsity=0.3)
    return world.p, world.rewards


def _world(p, rewards, gamma):
    return mdp.MDP(p, rewards, gamma)


# ---- V from q ---------------------------------------------------------------------------------
def _vq_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((np.array([[1.0, 3.0], [-2.0, 4.0]]), np.array([[0.25, 0.75], [1.0, 0.0]])),
                  label="hand example")]
    for S, A in ((3, 2), (5, 4)):
        cases.append(Case((rng.normal(size=(S, A)), rng.dirichlet(np.ones(A), size=S)),
                          label=f"{S} states, {A} actions"))
    return cases


register(Exercise(
    name="v_from_q",
    chapter=CHAPTER,
    reference=mdp.v_from_q,
    cases=_vq_cases,
    hint="V(s) = sum_a pi(a|s) q(s, a): a weighted average over actions, row by row.",
    wrong_answers=[
        (lambda q, pi: np.asarray(q).mean(axis=1),
         "plain mean over actions: weight each action by pi(a|s)"),
        (lambda q, pi: np.asarray(q).max(axis=1),
         "max over actions is V_* for a greedy policy, not V_pi"),
        (lambda q, pi: (np.asarray(pi) * np.asarray(q)).sum(axis=0),
         "summed over states instead of actions"),
    ],
))


# ---- q from V ---------------------------------------------------------------------------------
def _q_from_v(p, rewards, v, gamma):
    return mdp.q_from_v(_world(p, rewards, gamma), v)


def _qv_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for S, A, K, gamma in ((2, 2, 2, 0.5), (4, 3, 3, 0.9), (5, 2, 1, 0.99)):
        p, rewards = _random_world(rng, S, A, K)
        cases.append(Case((p, rewards, rng.normal(size=S) * 3, gamma),
                          label=f"{S} states, {A} actions, {K} rewards"))
    return cases


def _q_no_gamma(p, rewards, v, gamma):
    return np.einsum("sank,nk->sa", p, np.asarray(rewards)[None, :] + np.asarray(v)[:, None])


def _q_no_reward(p, rewards, v, gamma):
    return np.einsum("sank,n->sa", p, gamma * np.asarray(v))


def _q_mean_reward(p, rewards, v, gamma):
    P = np.asarray(p).sum(axis=3)
    return np.mean(rewards) + gamma * P @ np.asarray(v)


register(Exercise(
    name="q_from_v",
    chapter=CHAPTER,
    reference=_q_from_v,
    cases=_qv_cases,
    hint="q(s, a) = sum_{s', k} p[s, a, s', k] (rewards[k] + gamma V(s')); "
         "np.einsum('sank,nk->sa', p, rewards[None, :] + gamma * v[:, None]).",
    wrong_answers=[
        (_q_no_gamma, "forgot to discount V(s') by gamma"),
        (_q_no_reward, "forgot the immediate reward r"),
        (_q_mean_reward, "used the average of the reward values instead of their probabilities "
                         "p(s', r|s, a)"),
    ],
))


# ---- one sweep of policy evaluation ------------------------------------------------------------
def _sweep(p, rewards, pi, v, gamma):
    return mdp.bellman_expectation(_world(p, rewards, gamma), pi, v)


def _sweep_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for S, A, K, gamma in ((3, 2, 2, 0.9), (5, 3, 2, 0.5), (4, 4, 3, 1.0)):
        p, rewards = _random_world(rng, S, A, K)
        cases.append(Case((p, rewards, rng.dirichlet(np.ones(A), size=S), rng.normal(size=S),
                           gamma), label=f"{S} states, gamma={gamma}"))
    return cases


def _sweep_max(p, rewards, pi, v, gamma):
    return _q_from_v(p, rewards, v, gamma).max(axis=1)


def _sweep_in_place(p, rewards, pi, v, gamma):
    world = _world(p, rewards, gamma)
    return mdp.policy_evaluation_sweep(world, pi, v, in_place=True)


def _sweep_no_gamma(p, rewards, pi, v, gamma):
    return mdp.v_from_q(_q_no_gamma(p, rewards, v, gamma), pi)


register(Exercise(
    name="bellman_expectation_backup",
    chapter=CHAPTER,
    reference=_sweep,
    cases=_sweep_cases,
    hint="One synchronous sweep: V_new(s) = sum_a pi(a|s) sum_{s', r} p(s', r|s, a) "
         "[r + gamma V_old(s')]; every state reads the old V.",
    wrong_answers=[
        (_sweep_max, "max over actions is the optimality backup (value iteration), not "
                     "evaluation of pi"),
        (_sweep_in_place, "updated V in place: this exercise asks for a synchronous sweep "
                          "that reads only the old V"),
        (_sweep_no_gamma, "forgot the discount gamma"),
    ],
))


# ---- one step of value iteration --------------------------------------------------------------
def _vi_step(p, rewards, v, gamma):
    return mdp.bellman_optimality(_world(p, rewards, gamma), v)


def _vi_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for S, A, K, gamma in ((3, 2, 2, 0.9), (6, 3, 2, 0.8), (2, 4, 3, 0.0)):
        p, rewards = _random_world(rng, S, A, K)
        cases.append(Case((p, rewards, rng.normal(size=S) * 2, gamma),
                          label=f"{S} states, gamma={gamma}"))
    return cases


def _vi_mean(p, rewards, v, gamma):
    return _q_from_v(p, rewards, v, gamma).mean(axis=1)


def _vi_max_next(p, rewards, v, gamma):
    P = np.asarray(p).sum(axis=3)
    r_sa = np.einsum("sank,k->sa", p, rewards)
    reachable = P.sum(axis=1) > 0
    best_next = np.where(reachable, np.asarray(v)[None, :], -np.inf).max(axis=1)
    return r_sa.max(axis=1) + gamma * best_next


register(Exercise(
    name="value_iteration_step",
    chapter=CHAPTER,
    reference=_vi_step,
    cases=_vi_cases,
    hint="V_new(s) = max_a sum_{s', r} p(s', r|s, a) [r + gamma V(s')]: the max is over "
         "actions, taken after the expectation over what the environment does.",
    wrong_answers=[
        (_vi_mean, "took the expectation over actions (a uniform policy) instead of the max"),
        (_vi_max_next, "maximised over next states: the agent picks actions, the environment "
                       "picks s'"),
        (lambda p, rewards, v, gamma: _q_from_v(p, rewards, v, 1.0).max(axis=1),
         "forgot the discount gamma"),
    ],
))


# ---- greedy policy ----------------------------------------------------------------------------
def _greedy(p, rewards, v, gamma):
    return mdp.greedy_policy(_world(p, rewards, gamma), v)


def _greedy_myopic(p, rewards, v, gamma):
    r_sa = np.einsum("sank,k->sa", p, rewards)
    return np.eye(r_sa.shape[1])[np.argmax(r_sa, axis=1)]


def _greedy_argmin(p, rewards, v, gamma):
    q = _q_from_v(p, rewards, v, gamma)
    return np.eye(q.shape[1])[np.argmin(q, axis=1)]


def _greedy_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for S, A, K, gamma in ((4, 3, 2, 0.9), (6, 2, 3, 0.95), (5, 4, 2, 0.99)):
        p, rewards = _random_world(rng, S, A, K)
        cases.append(Case((p, rewards, rng.normal(size=S) * 10, gamma),
                          label=f"{S} states, {A} actions"))
    return cases


register(Exercise(
    name="greedy_policy",
    chapter=CHAPTER,
    reference=_greedy,
    cases=_greedy_cases,
    hint="Compute q(s, a) from V (previous exercise), take argmax over a in each state and "
         "return it one-hot: an [S, A] array of 0s and 1s.",
    wrong_answers=[
        (_greedy_myopic, "maximised the immediate reward only: the value V(s') of where the "
                         "action leads is part of q"),
        (_greedy_argmin, "argmin: that is the worst action"),
    ],
))
