"""Exercises of chapter 2, "Markov chains, reward processes and decision processes"."""

from __future__ import annotations

import numpy as np

from rlcourse import mdp
from rlcourse.exercises import Case, Exercise, register

CHAPTER = "02_markov_processes"


# ---- discounted returns ------------------------------------------------------------------------
def _return_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((np.array([1.0, 2.0, 3.0]), 0.5), label="hand example"),
        Case((rng.normal(size=8), 0.9), label="random rewards"),
        Case((np.array([0.0, 0.0, 0.0, 1.0]), 0.99), label="reward only at the end"),
        Case((rng.normal(size=5), 1.0), label="gamma = 1"),
        Case((np.array([2.0]), 0.3), label="one step"),
    ]


def _returns_no_discount(rewards, gamma):
    return np.cumsum(np.asarray(rewards, dtype=float)[::-1])[::-1]


def _returns_off_by_one(rewards, gamma):
    r = np.asarray(rewards, dtype=float)
    return np.array([sum(gamma ** (i + 1) * r[t + i] for i in range(len(r) - t))
                     for t in range(len(r))])


def _returns_forward(rewards, gamma):
    r = np.asarray(rewards, dtype=float)
    G, acc = np.zeros(len(r)), 0.0
    for t in range(len(r)):
        acc = r[t] + gamma * acc
        G[t] = acc
    return G


register(Exercise(
    name="discounted_returns",
    chapter=CHAPTER,
    reference=mdp.discounted_returns,
    cases=_return_cases,
    hint="rewards[t] holds R_{t+1}; G_t = R_{t+1} + gamma G_{t+1} with G_T = 0, so fill G "
         "from the last step backwards.",
    wrong_answers=[
        (_returns_no_discount, "forgot the discount: that is the plain sum of future rewards"),
        (_returns_off_by_one, "off by one in the exponent: the first reward R_{t+1} is not "
                              "discounted (gamma^0)"),
        (_returns_forward, "ran the recursion forwards: G_t depends on the future, not the past"),
    ],
))


# ---- stationary distribution -------------------------------------------------------------------
def _chain_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((np.array([[0.7, 0.3], [0.1, 0.9]]),), label="two states")]
    for n in (3, 5):
        cases.append(Case((rng.dirichlet(np.ones(n), size=n),), label=f"{n} states"))
    cases.append(Case((np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]),),
                      label="periodic chain"))
    return cases


register(Exercise(
    name="stationary_distribution",
    chapter=CHAPTER,
    reference=mdp.stationary_distribution,
    cases=_chain_cases,
    hint="mu is a row vector with mu P = mu and sum(mu) = 1: solve (P^T - I) mu = 0 together "
         "with the row of ones (np.linalg.lstsq), or take the eigenvector of P^T for eigenvalue 1.",
    wrong_answers=[
        (lambda P: np.full(len(P), 1.0 / len(P)),
         "solved P mu = mu (a right eigenvector: all ones), not mu P = mu"),
        (lambda P: np.asarray(P)[0], "the first row of P is where state 0 goes in one step"),
        (lambda P: np.asarray(P).sum(axis=0) / len(P),
         "averaged the columns: that is one step from the uniform distribution"),
    ],
))


# ---- values of a Markov reward process ---------------------------------------------------------
def _mrp_values(P, R, gamma):
    return mdp.mrp_values(mdp.MRP(P, R, gamma))


def _mrp_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((np.array([[0.0, 1.0], [0.0, 1.0]]), np.array([1.0, 2.0]), 0.5),
                  label="two states")]
    for n, gamma in ((3, 0.9), (5, 0.5), (4, 0.0)):
        cases.append(Case((rng.dirichlet(np.ones(n), size=n), rng.normal(size=n), gamma),
                          label=f"{n} states, gamma={gamma}"))
    return cases


register(Exercise(
    name="mrp_values",
    chapter=CHAPTER,
    reference=_mrp_values,
    cases=_mrp_cases,
    hint="V = R + gamma P V is linear in V: solve (I - gamma P) V = R with np.linalg.solve.",
    wrong_answers=[
        (lambda P, R, g: np.linalg.solve(np.eye(len(P)) - np.asarray(P), R),
         "forgot the discount gamma"),
        (lambda P, R, g: np.linalg.solve(np.eye(len(P)) - g * np.asarray(P).T, R),
         "transposed P: the next state's value is sum_s' P[s, s'] V(s')"),
        (lambda P, R, g: np.asarray(R) + g * np.asarray(P) @ np.asarray(R),
         "stopped after one step (R + gamma P R) instead of solving for the fixed point"),
    ],
))


# ---- the chain a policy induces ----------------------------------------------------------------
def _policy_transition(P, pi):
    S, A, _ = np.shape(P)
    return mdp.policy_transition(mdp.MDP.from_arrays(P, np.zeros((S, A)), 0.9), pi)


def _policy_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for S, A in ((2, 2), (4, 3), (5, 2)):
        P = rng.dirichlet(np.ones(S), size=(S, A))
        pi = rng.dirichlet(np.ones(A), size=S)
        cases.append(Case((P, pi), label=f"{S} states, {A} actions"))
    return cases


register(Exercise(
    name="policy_transition",
    chapter=CHAPTER,
    reference=_policy_transition,
    cases=_policy_cases,
    hint="P_pi[s, s'] = sum_a pi(a|s) P[s, a, s'], e.g. np.einsum('sa,san->sn', pi, P).",
    wrong_answers=[
        (lambda P, pi: np.asarray(P).mean(axis=1),
         "averaged over actions without weighting by pi(a|s)"),
        (lambda P, pi: np.asarray(P)[np.arange(len(pi)), np.argmax(pi, axis=1)],
         "took only the most likely action: a stochastic policy mixes all of them"),
    ],
))
