"""rlcourse.mdp against published tables, hand computations and independent linear solves.

Oracles used here: Sutton and Barto (2018) Figures 3.2, 3.5 and 4.1 typed in by hand; closed
forms worked out on paper (two-state chains, short reward sequences); and a plain
``np.linalg.solve`` built in this file from the ``p(s', r|s, a)`` table with Python loops.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcourse.mdp import (
    MDP,
    MRP,
    MarkovChain,
    bellman_expectation,
    bellman_expectation_q,
    bellman_optimality,
    bellman_optimality_q,
    conversation_chain,
    conversation_mdp,
    deterministic_policy,
    discounted_return,
    discounted_returns,
    discounted_returns_matrix,
    distribution_after,
    greedy_policy,
    gridworld_3_5,
    gridworld_4_1,
    mc_policy_evaluation,
    mrp_from_mdp,
    mrp_values,
    policy_evaluation,
    policy_evaluation_sweep,
    policy_iteration,
    q_from_v,
    random_mdp,
    sample_chain,
    sample_episode,
    sample_mrp_episode,
    solve_q,
    solve_values,
    stationary_distribution,
    uniform_policy,
    v_from_q,
    validate_policy,
    value_iteration,
)

# ---------------------------------------------------------------------------------------------
# Published tables (Sutton and Barto, Reinforcement Learning: An Introduction, 2nd ed., 2018)
# ---------------------------------------------------------------------------------------------
FIG_3_2_V_RANDOM = np.array([
    [3.3, 8.8, 4.4, 5.3, 1.5],
    [1.5, 3.0, 2.3, 1.9, 0.5],
    [0.1, 0.7, 0.7, 0.4, -0.4],
    [-1.0, -0.4, -0.4, -0.6, -1.2],
    [-1.9, -1.3, -1.2, -1.4, -2.0],
])
FIG_3_5_V_STAR = np.array([
    [22.0, 24.4, 22.0, 19.4, 17.5],
    [19.8, 22.0, 19.8, 17.8, 16.0],
    [17.8, 19.8, 17.8, 16.0, 14.4],
    [16.0, 17.8, 16.0, 14.4, 13.0],
    [14.4, 16.0, 14.4, 13.0, 11.7],
])
FIG_4_1_V_RANDOM = np.array([
    [0, -14, -20, -22],
    [-14, -18, -20, -20],
    [-20, -20, -18, -14],
    [-22, -20, -14, 0],
], dtype=float)
# Figure 4.1, left column: synchronous iterative policy evaluation after k sweeps.
# (The book prints -1.7 for the exact -1.75 at k = 2, hence the tolerance 0.05 below.)
FIG_4_1_SWEEPS = {
    1: [[0, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, 0]],
    2: [[0, -1.7, -2.0, -2.0], [-1.7, -2.0, -2.0, -2.0], [-2.0, -2.0, -2.0, -1.7],
        [-2.0, -2.0, -1.7, 0]],
    3: [[0, -2.4, -2.9, -3.0], [-2.4, -2.9, -3.0, -2.9], [-2.9, -3.0, -2.9, -2.4],
        [-3.0, -2.9, -2.4, 0]],
    10: [[0, -6.1, -8.4, -9.0], [-6.1, -7.7, -8.4, -8.4], [-8.4, -8.4, -7.7, -6.1],
         [-9.0, -8.4, -6.1, 0]],
}
ONE_DECIMAL = 0.05 + 1e-9


def oracle_values(mdp, pi):
    """V_pi from the linear system built with plain loops over the p(s', r|s, a) table."""
    S = mdp.n_states
    P_pi, r_pi = np.zeros((S, S)), np.zeros(S)
    for (s, a), outcomes in mdp.to_dynamics().items():
        for prob, s2, r in outcomes:
            P_pi[s, s2] += pi[s, a] * prob
            r_pi[s] += pi[s, a] * prob * r
    live = [s for s in range(S) if not mdp.terminal[s]]
    A = np.eye(len(live)) - mdp.gamma * P_pi[np.ix_(live, live)]
    v = np.zeros(S)
    v[live] = np.linalg.solve(A, r_pi[live])
    return v


def oracle_q(mdp, v):
    """q(s, a) = sum_{s', r} p(s', r|s, a) [r + gamma V(s')], by loops over the table."""
    q = np.zeros((mdp.n_states, mdp.n_actions))
    for (s, a), outcomes in mdp.to_dynamics().items():
        q[s, a] = sum(prob * (r + mdp.gamma * v[s2]) for prob, s2, r in outcomes)
    return q


# ---------------------------------------------------------------------------------------------
# published tables
# ---------------------------------------------------------------------------------------------
def test_example_3_5_random_policy_values_match_figure_3_2():
    mdp = gridworld_3_5()
    v = solve_values(mdp, uniform_policy(25, 4)).reshape(5, 5)
    np.testing.assert_allclose(v, FIG_3_2_V_RANDOM, atol=ONE_DECIMAL)


def test_example_3_5_optimal_values_match_figure_3_5():
    mdp = gridworld_3_5()
    np.testing.assert_allclose(value_iteration(mdp).v.reshape(5, 5), FIG_3_5_V_STAR,
                               atol=ONE_DECIMAL)
    np.testing.assert_allclose(policy_iteration(mdp).v.reshape(5, 5), FIG_3_5_V_STAR,
                               atol=ONE_DECIMAL)


def test_example_3_5_optimal_policy_matches_figure_3_5_arrows():
    mdp = gridworld_3_5()
    pi = greedy_policy(mdp, value_iteration(mdp).v, ties="uniform").reshape(5, 5, 4)
    up, right, down, left = np.eye(4)
    np.testing.assert_allclose(pi[0, 0], right)          # walk to A
    np.testing.assert_allclose(pi[0, 1], np.full(4, 0.25))  # at A every action jumps
    np.testing.assert_allclose(pi[0, 2], left)           # back to A, not on to B
    np.testing.assert_allclose(pi[4, 1], up)             # from A' straight back up
    np.testing.assert_allclose(pi[4, 4], [0.5, 0, 0, 0.5])  # up or left, both optimal


def test_example_4_1_random_policy_values_match_figure_4_1():
    mdp = gridworld_4_1()
    pi = uniform_policy(16, 4)
    np.testing.assert_allclose(solve_values(mdp, pi).reshape(4, 4), FIG_4_1_V_RANDOM,
                               atol=ONE_DECIMAL)
    result = policy_evaluation(mdp, pi, theta=1e-9)
    assert result.converged
    np.testing.assert_allclose(result.v.reshape(4, 4), FIG_4_1_V_RANDOM, atol=ONE_DECIMAL)
    for k, table in FIG_4_1_SWEEPS.items():
        np.testing.assert_allclose(result.history[k].reshape(4, 4), table, atol=ONE_DECIMAL)


def test_example_4_1_optimal_values_are_minus_steps_to_nearest_corner():
    mdp = gridworld_4_1()
    steps = np.array([[min(r + c, 6 - r - c) for c in range(4)] for r in range(4)], float)
    np.testing.assert_allclose(value_iteration(mdp).v.reshape(4, 4), -steps, atol=1e-9)
    np.testing.assert_allclose(policy_iteration(mdp).v.reshape(4, 4), -steps, atol=1e-9)


def test_in_place_sweep_matches_hand_computation():
    # First in-place sweep from V = 0 on Example 4.1, states in order 0, 1, 2, ...:
    # V(1) = -1 + (0 + 0 + 0 + 0)/4 = -1;  V(2) = -1 + (V(1) + 0 + 0 + 0)/4 = -1.25;
    # V(3) = -1 + (V(2) + V(3)=0 (bump right) + 0 + 0)/4 = -1.3125.
    v = policy_evaluation_sweep(gridworld_4_1(), uniform_policy(16, 4), np.zeros(16),
                                in_place=True)
    np.testing.assert_allclose(v[:4], [0.0, -1.0, -1.25, -1.3125])


# ---------------------------------------------------------------------------------------------
# iterative, exact and Monte Carlo evaluation agree
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [gridworld_3_5, gridworld_4_1, conversation_mdp])
@pytest.mark.parametrize("in_place", [False, True])
def test_iterative_policy_evaluation_equals_linear_solve(make, in_place):
    mdp = make()
    pi = uniform_policy(mdp.n_states, mdp.n_actions)
    exact = oracle_values(mdp, pi)
    np.testing.assert_allclose(solve_values(mdp, pi), exact, atol=1e-10)
    result = policy_evaluation(mdp, pi, theta=1e-11, in_place=in_place)
    np.testing.assert_allclose(result.v, exact, atol=1e-6)
    assert result.history[0].tolist() == [0.0] * mdp.n_states


def test_in_place_evaluation_needs_fewer_sweeps_on_example_4_1():
    mdp, pi = gridworld_4_1(), uniform_policy(16, 4)
    sync = policy_evaluation(mdp, pi, theta=1e-6, record=False)
    gauss_seidel = policy_evaluation(mdp, pi, theta=1e-6, in_place=True, record=False)
    assert gauss_seidel.n_iter < sync.n_iter


def test_first_visit_monte_carlo_within_four_standard_errors():
    mdp, pi = gridworld_4_1(), uniform_policy(16, 4)
    exact = oracle_values(mdp, pi)
    mc = mc_policy_evaluation(mdp, pi, n_episodes=3000, rng=np.random.default_rng(0))
    live = ~mdp.terminal
    assert np.all(mc.counts[live] > 100)
    assert np.all(np.abs(mc.v - exact)[live] <= 4 * mc.stderr[live])
    assert np.all(mc.v[mdp.terminal] == 0)


def test_every_visit_monte_carlo_within_fixed_tolerance():
    mdp, pi = gridworld_4_1(), uniform_policy(16, 4)
    mc = mc_policy_evaluation(mdp, pi, n_episodes=3000, rng=np.random.default_rng(1),
                              first_visit=False, checkpoints=(100, 3000))
    np.testing.assert_allclose(mc.v, oracle_values(mdp, pi), atol=1.5)
    assert [n for n, _ in mc.history] == [100, 3000]
    # every-visit averages at least as many returns as first-visit would
    assert mc.counts.sum() > 3000


def test_monte_carlo_on_a_continuing_task_with_truncation():
    # Example 3.5 has no terminal state: cut episodes at 120 steps and drop the last 80
    # (0.9^80 * 10 / 0.1 < 0.03 of truncation bias).
    mdp, pi = gridworld_3_5(), uniform_policy(25, 4)
    mc = mc_policy_evaluation(mdp, pi, n_episodes=600, rng=np.random.default_rng(2),
                              max_steps=120, discard_tail=80)
    assert np.all(np.abs(mc.v - oracle_values(mdp, pi)) <= 4 * mc.stderr + 0.03)


def test_monte_carlo_is_reproducible_with_a_seed():
    mdp, pi = gridworld_4_1(), uniform_policy(16, 4)
    a = mc_policy_evaluation(mdp, pi, 50, np.random.default_rng(7)).v
    b = mc_policy_evaluation(mdp, pi, 50, np.random.default_rng(7)).v
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# the two relations, Bellman operators, control
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_the_two_relations_hold_for_v_pi_and_q_pi(seed):
    rng = np.random.default_rng(seed)
    mdp = random_mdp(6, 3, 3, gamma=0.8, rng=rng, sparsity=0.4)
    pi = rng.dirichlet(np.ones(3), size=6)
    v, q = solve_values(mdp, pi), solve_q(mdp, pi)
    np.testing.assert_allclose(v, oracle_values(mdp, pi), atol=1e-10)
    # V(s) = sum_a pi(a|s) q(s, a), written out
    np.testing.assert_allclose(v, [sum(pi[s, a] * q[s, a] for a in range(3)) for s in range(6)],
                               atol=1e-10)
    np.testing.assert_allclose(v_from_q(q, pi), v, atol=1e-10)
    # q(s, a) = sum_{s', r} p(s', r|s, a) [r + gamma V(s')]
    np.testing.assert_allclose(q, oracle_q(mdp, v), atol=1e-10)
    np.testing.assert_allclose(q_from_v(mdp, v), oracle_q(mdp, v), atol=1e-12)
    # and V_pi is the fixed point of T_pi, q_pi that of the q-form
    np.testing.assert_allclose(bellman_expectation(mdp, pi, v), v, atol=1e-10)
    np.testing.assert_allclose(bellman_expectation_q(mdp, pi, q), q, atol=1e-10)


def test_v_from_q_for_a_hand_example():
    q = np.array([[1.0, 3.0], [-2.0, 4.0]])
    pi = np.array([[0.25, 0.75], [1.0, 0.0]])
    np.testing.assert_allclose(v_from_q(q, pi), [0.25 + 2.25, -2.0])


@pytest.mark.parametrize("seed", range(4))
def test_value_iteration_equals_policy_iteration(seed):
    rng = np.random.default_rng(100 + seed)
    mdp = random_mdp(7, 3, 4, gamma=0.9, rng=rng)
    vi, pi_ = value_iteration(mdp, theta=1e-12), policy_iteration(mdp)
    assert vi.converged and pi_.converged
    np.testing.assert_allclose(vi.v, pi_.v, atol=1e-8)
    np.testing.assert_allclose(bellman_optimality(mdp, vi.v), vi.v, atol=1e-9)
    np.testing.assert_allclose(bellman_optimality_q(mdp, q_from_v(mdp, vi.v)),
                               q_from_v(mdp, vi.v), atol=1e-9)
    # the greedy policy achieves V*, and V* dominates random policies
    np.testing.assert_allclose(oracle_values(mdp, vi.policy), vi.v, atol=1e-8)
    for _ in range(5):
        assert np.all(oracle_values(mdp, rng.dirichlet(np.ones(3), size=7)) <= vi.v + 1e-9)


def test_policy_iteration_improves_monotonically():
    mdp = gridworld_3_5()
    history = policy_iteration(mdp).history
    for before, after in zip(history, history[1:], strict=False):
        assert np.all(after >= before - 1e-9)


def test_greedy_policy_ties():
    mdp = gridworld_4_1()
    v = solve_values(mdp, uniform_policy(16, 4))
    first = greedy_policy(mdp, v)
    assert set(np.unique(first)) == {0.0, 1.0} and np.all(first.sum(1) == 1)
    uniform = greedy_policy(mdp, v, ties="uniform")
    # cell (1, 1): up and left both lead to a -14 cell
    np.testing.assert_allclose(uniform[5], [0.5, 0, 0, 0.5])
    with pytest.raises(ValueError, match="ties"):
        greedy_policy(mdp, v, ties="random")


mdp_params = st.tuples(
    st.integers(1, 6), st.integers(1, 3), st.integers(1, 3),
    st.floats(0.0, 0.99), st.integers(0, 2**31 - 1),
)


@settings(max_examples=60, deadline=None)
@given(params=mdp_params, data=st.data())
def test_bellman_operators_are_gamma_contractions(params, data):
    S, A, K, gamma, seed = params
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, K, gamma, rng, sparsity=0.3)
    pi = rng.dirichlet(np.ones(A), size=S)
    vec = st.lists(st.floats(-1e3, 1e3), min_size=S, max_size=S).map(np.array)
    v, w = data.draw(vec), data.draw(vec)
    dist = np.max(np.abs(v - w))
    slack = 1e-9 * (1 + dist)
    assert np.max(np.abs(bellman_expectation(mdp, pi, v) - bellman_expectation(mdp, pi, w))) \
        <= gamma * dist + slack
    assert np.max(np.abs(bellman_optimality(mdp, v) - bellman_optimality(mdp, w))) \
        <= gamma * dist + slack
    qv, qw = rng.normal(size=(S, A)) * 10, rng.normal(size=(S, A)) * 10
    qdist = np.max(np.abs(qv - qw))
    assert np.max(np.abs(bellman_optimality_q(mdp, qv) - bellman_optimality_q(mdp, qw))) \
        <= gamma * qdist + 1e-9 * (1 + qdist)


# ---------------------------------------------------------------------------------------------
# returns
# ---------------------------------------------------------------------------------------------
def test_discounted_returns_hand_example():
    # R_1, R_2, R_3 = 1, 2, 3 and gamma = 0.5:
    # G_2 = 3;  G_1 = 2 + 0.5 * 3 = 3.5;  G_0 = 1 + 0.5 * 2 + 0.25 * 3 = 2.75
    rewards = [1.0, 2.0, 3.0]
    np.testing.assert_allclose(discounted_returns(rewards, 0.5), [2.75, 3.5, 3.0])
    np.testing.assert_allclose(discounted_returns_matrix(rewards, 0.5), [2.75, 3.5, 3.0])
    assert discounted_return(rewards, 0.5) == pytest.approx(2.75)
    np.testing.assert_allclose(discounted_returns(rewards, 0.0), rewards)
    np.testing.assert_allclose(discounted_returns(rewards, 1.0), [6.0, 5.0, 3.0])
    assert discounted_returns([], 0.9).shape == (0,)
    assert discounted_returns_matrix([], 0.9).shape == (0,)


@settings(max_examples=50, deadline=None)
@given(rewards=st.lists(st.floats(-100, 100), max_size=30), gamma=st.floats(0.0, 1.0))
def test_recursive_and_vectorised_returns_agree_with_the_definition(rewards, gamma):
    T = len(rewards)
    definition = [sum(gamma ** i * rewards[t + i] for i in range(T - t)) for t in range(T)]
    np.testing.assert_allclose(discounted_returns(rewards, gamma), definition, atol=1e-8)
    np.testing.assert_allclose(discounted_returns_matrix(rewards, gamma), definition, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# chains, MRPs, sampling
# ---------------------------------------------------------------------------------------------
def test_two_state_chain_stationary_distribution_closed_form():
    a, b = 0.3, 0.1
    P = np.array([[1 - a, a], [b, 1 - b]])
    np.testing.assert_allclose(stationary_distribution(P), [b / (a + b), a / (a + b)])
    mu = distribution_after(P, np.array([1.0, 0.0]), 200)
    assert mu.shape == (201, 2)
    np.testing.assert_allclose(mu[1], [1 - a, a])
    np.testing.assert_allclose(mu[-1], [b / (a + b), a / (a + b)], atol=1e-9)


def test_chain_with_two_closed_classes_has_no_unique_stationary_distribution():
    with pytest.raises(ValueError, match="more than one stationary"):
        stationary_distribution(np.eye(2))


def test_sample_chain_frequencies_match_transition_matrix():
    P = np.array([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8], [0.0, 1.0, 0.0]])
    states = sample_chain(P, 0, 20_000, np.random.default_rng(0))
    assert len(states) == 20_001 and states[0] == 0
    counts = np.zeros((3, 3))
    np.add.at(counts, (states[:-1], states[1:]), 1)
    freq = counts / counts.sum(1, keepdims=True)
    np.testing.assert_allclose(freq, P, atol=0.02)
    assert counts[0, 2] == 0 and counts[2, 0] == 0 and counts[2, 2] == 0
    absorbed = sample_chain(np.array([[0.5, 0.5], [0, 1.0]]), 0, 100, np.random.default_rng(1),
                            absorbing=[1])
    assert absorbed[-1] == 1 and np.all(absorbed[:-1] == 0)


def test_conversation_chain_is_the_continue_action():
    chain = conversation_chain()
    assert chain.state_names == ("start", "on_topic", "rambling", "repeating")
    np.testing.assert_allclose(chain.P[1], [0, 0.6, 0.25, 0.15])
    mu = stationary_distribution(chain.P)
    np.testing.assert_allclose(mu @ chain.P, mu, atol=1e-12)
    assert mu[0] == pytest.approx(0.0, abs=1e-12)  # start is never revisited


def test_mrp_values_two_state_closed_form():
    # V = R + gamma P V with P = [[0, 1], [0, 1]], R = [1, 2]: V1 = 2 / (1 - g), V0 = 1 + g V1.
    g = 0.5
    v = mrp_values(MRP(np.array([[0.0, 1.0], [0.0, 1.0]]), np.array([1.0, 2.0]), g))
    np.testing.assert_allclose(v, [1 + g * 2 / (1 - g), 2 / (1 - g)])


def test_mrp_with_per_transition_rewards_and_terminal_state():
    P = np.array([[0.5, 0.5], [0.0, 1.0]])
    R = np.array([[2.0, 4.0], [0.0, 0.0]])
    mrp = MRP(P, R, 1.0, terminal=[1])
    np.testing.assert_allclose(mrp.R, [3.0, 0.0])
    # V0 = 3 + 0.5 V0  =>  V0 = 6
    np.testing.assert_allclose(mrp_values(mrp), [6.0, 0.0])
    ep = sample_mrp_episode(mrp, 0, np.random.default_rng(0))
    assert ep.terminated and ep.states[-1] == 1
    assert set(ep.rewards[:-1]) <= {2.0} and ep.rewards[-1] == 4.0


def test_mdp_with_policy_is_an_mrp():
    mdp = conversation_mdp()
    pi = np.tile([0.7, 0.3], (5, 1))
    mrp = mrp_from_mdp(mdp, pi)
    np.testing.assert_allclose(mrp_values(mrp), oracle_values(mdp, pi), atol=1e-10)


def test_sample_episode_follows_the_dynamics():
    mdp = conversation_mdp()
    pi = deterministic_policy([0, 0, 0, 1, 0], 2)  # continue until repeating, then stop
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(200):
        ep = sample_episode(mdp, pi, 0, rng)
        assert ep.terminated and ep.states[-1] == 4
        assert len(ep.states) == len(ep.actions) + 1 == len(ep.rewards) + 1
        assert ep.actions[-1] == 1 and ep.states[-2] == 3 and ep.rewards[-1] == 0.0
        # a reward of -2 only ever comes with a move to on_topic
        assert np.all(ep.states[1:][ep.rewards == -2.0] == 1)
        lengths.append(len(ep))
    a = sample_episode(mdp, pi, 0, np.random.default_rng(5))
    b = sample_episode(mdp, pi, 0, np.random.default_rng(5))
    assert a.states.tolist() == b.states.tolist() and a.rewards.tolist() == b.rewards.tolist()
    cut = sample_episode(gridworld_3_5(), uniform_policy(25, 4), 0, rng, max_steps=7)
    assert not cut.terminated and len(cut) == 7


def test_sampled_returns_average_to_v():
    mdp = conversation_mdp()
    pi = np.tile([0.8, 0.2], (5, 1))
    rng = np.random.default_rng(3)
    G0 = [discounted_return(sample_episode(mdp, pi, 0, rng).rewards, mdp.gamma)
          for _ in range(4000)]
    v0 = oracle_values(mdp, pi)[0]
    assert abs(np.mean(G0) - v0) < 4 * np.std(G0) / np.sqrt(len(G0))


# ---------------------------------------------------------------------------------------------
# building MDPs: the two representations and validation
# ---------------------------------------------------------------------------------------------
def test_from_dynamics_hand_example():
    mdp = MDP.from_dynamics(
        {("s", "x"): [(0.5, "s", 1.0), (0.25, "t", 1.0), (0.25, "t", -1.0)],
         ("s", "y"): [(1.0, "t", 0.0)]},
        gamma=0.5, terminal=["t"],
    )
    assert mdp.state_names == ("s", "t") and mdp.action_names == ("x", "y")
    assert mdp.rewards.tolist() == [-1.0, 0.0, 1.0]
    np.testing.assert_allclose(mdp.P[0], [[0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(mdp.r_sa[0], [0.5 + 0.25 - 0.25, 0.0])
    np.testing.assert_allclose(mdp.r_sas[0, 0], [1.0, 0.0])  # (0.25 - 0.25) / 0.5
    # V(s) under "always x": V = 0.5 + 0.5 * 0.5 V  =>  V = 2/3
    np.testing.assert_allclose(solve_values(mdp, deterministic_policy([0, 0], 2)), [2 / 3, 0])
    assert mdp.terminal.tolist() == [False, True]


def test_from_arrays_both_layouts_and_reward_shapes():
    P = np.array([[[0.9, 0.1], [0.0, 1.0]], [[1.0, 0.0], [0.5, 0.5]]])  # [s, a, s']
    R_sa = np.array([[1.0, -1.0], [0.0, 2.0]])
    a = MDP.from_arrays(P, R_sa, 0.9)
    b = MDP.from_arrays(P.transpose(1, 0, 2), np.broadcast_to(R_sa[..., None], P.shape), 0.9,
                        layout="ass")
    np.testing.assert_allclose(a.p, b.p)
    np.testing.assert_allclose(a.r_sa, R_sa)
    np.testing.assert_allclose(a.P, P)


def test_conversions_round_trip():
    mdp = conversation_mdp()
    again = MDP.from_dynamics(mdp.to_dynamics(names=True), mdp.gamma, states=mdp.state_names,
                              actions=mdp.action_names, terminal=["end"])
    np.testing.assert_allclose(again.p, mdp.p)
    P, R = mdp.to_arrays()
    from_arrays = MDP.from_arrays(P, R, mdp.gamma, terminal=[4])
    # stochastic rewards are averaged in (P, R): the values survive, the distribution does not
    pi = uniform_policy(5, 2)
    np.testing.assert_allclose(solve_values(from_arrays, pi), solve_values(mdp, pi))
    np.testing.assert_allclose(from_arrays.r_sa, mdp.r_sa)
    # on-topic, continue: 0.5 * 1 + 0.1 * (-2) + 0.25 * (-0.5) + 0.15 * (-1) = 0.025
    assert mdp.r_sa[1, 0] == pytest.approx(0.025)
    table = mdp.to_dynamics()
    assert (4, 0) not in table and sorted(table[(0, 0)]) == sorted(
        [(0.6, 1, 1.0), (0.1, 1, -2.0), (0.3, 2, -0.5)])


def test_deterministic_policy_is_one_hot():
    np.testing.assert_array_equal(deterministic_policy([2, 0], 3), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        deterministic_policy([3], 3)


@pytest.mark.parametrize(
    "dynamics, terminal, message",
    [
        ({("s", "a"): [(0.5, "s", 0.0), (0.4, "t", 1.0)]}, ["t"],
         r"p\(\., \. \| s='s', a='a'\) sums to 0\.9, not 1"),
        ({("s", "a"): [(1.2, "s", 0.0), (-0.2, "t", 1.0)]}, ["t"],
         r"p\(s'='t', r=1 \| s='s', a='a'\) = -0\.2 is negative"),
        ({("s", "a"): [(1.0, "u", 0.0)]}, [], "unknown next state 'u'"),
        ({("s", "a"): [(1.0, "s")]}, [], r"is not \(prob, next_state, reward\)"),
        ({("s", "a"): [(1.0, "t", 0.0)], ("t", "b"): [(1.0, "t", 0.0)]}, [],
         "no entry for state 's', action 'b'"),
        ({("s", "a"): [(1.0, "t", 0.0)], ("t", "a"): [(1.0, "t", 0.0)]}, ["t"],
         "terminal state 't' must not have dynamics entries"),
    ],
)
def test_invalid_dynamics_raise_clear_errors(dynamics, terminal, message):
    states = ["s", "t"] if "'u'" in message else None
    with pytest.raises(ValueError, match=message):
        MDP.from_dynamics(dynamics, gamma=0.9, states=states, terminal=terminal)


def test_invalid_arrays_and_parameters_raise_clear_errors():
    P = np.array([[[0.5, 0.4]], [[0.0, 1.0]]])
    with pytest.raises(ValueError, match=r"P\['s0'\]\[0\] \('a0'\) sums to 0\.9"):
        MDP.from_arrays(P, np.zeros((2, 1)), 0.9)
    good = np.array([[[0.5, 0.5]], [[0.0, 1.0]]])
    with pytest.raises(ValueError, match="R must have shape"):
        MDP.from_arrays(good, np.zeros(3), 0.9)
    with pytest.raises(ValueError, match="layout"):
        MDP.from_arrays(good, np.zeros((2, 1)), 0.9, layout="xyz")
    with pytest.raises(ValueError, match="outside"):
        MDP.from_arrays(good, np.zeros((2, 1)), 1.5)
    with pytest.raises(ValueError, match="terminal state 's0' must be absorbing"):
        MDP.from_arrays(good, np.zeros((2, 1)), 0.9, terminal=[0])
    with pytest.raises(ValueError, match=r"P\[1\] \('b'\) sums to 1\.1"):
        MarkovChain(np.array([[1.0, 0.0], [0.5, 0.6]]), ("a", "b"))
    with pytest.raises(ValueError, match="square"):
        MarkovChain(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="policy has shape"):
        validate_policy(np.ones((3, 2)) / 2, 2, 2)
    with pytest.raises(ValueError, match=r"pi\[1\] sums to 0\.5"):
        validate_policy(np.array([[1.0, 0.0], [0.25, 0.25]]), 2, 2)


def test_improper_policy_with_gamma_one_is_reported():
    mdp = gridworld_4_1()
    always_up = deterministic_policy(np.zeros(16, dtype=int), 4)  # bumps into the top row
    with pytest.raises(ValueError, match="singular"):
        solve_values(mdp, always_up)
