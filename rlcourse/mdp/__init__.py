"""Layer 1, pure math: Markov chains, reward processes, decision processes, Bellman equations,
dynamic programming and Monte Carlo evaluation on small finite worlds (NumPy only).

The pieces live in submodules and are all re-exported here::

    from rlcourse.mdp import gridworld_3_5, uniform_policy, solve_values
    mdp = gridworld_3_5()
    V = solve_values(mdp, uniform_policy(mdp.n_states, mdp.n_actions))

* :mod:`rlcourse.mdp.processes`: :class:`MarkovChain`, :class:`MRP`, :class:`MDP` (built from
  ``p(s', r|s, a)`` or from arrays), policies;
* :mod:`rlcourse.mdp.returns`: sampling episodes, discounted returns ``G_t``;
* :mod:`rlcourse.mdp.bellman`: ``V`` and ``q``, Bellman operators, policy evaluation, exact
  solves, value and policy iteration;
* :mod:`rlcourse.mdp.montecarlo`: first- and every-visit Monte Carlo evaluation;
* :mod:`rlcourse.mdp.examples`: Sutton and Barto's gridworlds, the conversation MDP.
"""

from rlcourse.mdp.bellman import (
    ControlResult,
    EvaluationResult,
    bellman_expectation,
    bellman_expectation_q,
    bellman_optimality,
    bellman_optimality_q,
    greedy_policy,
    mrp_values,
    policy_evaluation,
    policy_evaluation_sweep,
    policy_iteration,
    q_from_v,
    solve_q,
    solve_values,
    v_from_q,
    value_iteration,
)
from rlcourse.mdp.examples import (
    GRID_ACTIONS,
    GRID_MOVES,
    conversation_chain,
    conversation_mdp,
    gridworld,
    gridworld_3_5,
    gridworld_4_1,
)
from rlcourse.mdp.montecarlo import MonteCarloResult, mc_policy_evaluation
from rlcourse.mdp.processes import (
    MDP,
    MRP,
    MarkovChain,
    deterministic_policy,
    distribution_after,
    mrp_from_mdp,
    policy_reward,
    policy_transition,
    random_mdp,
    sample_chain,
    stationary_distribution,
    uniform_policy,
    validate_policy,
    validate_stochastic_matrix,
)
from rlcourse.mdp.returns import (
    Episode,
    discounted_return,
    discounted_returns,
    discounted_returns_matrix,
    sample_episode,
    sample_mrp_episode,
)

__all__ = [
    "GRID_ACTIONS",
    "GRID_MOVES",
    "MDP",
    "MRP",
    "ControlResult",
    "Episode",
    "EvaluationResult",
    "MarkovChain",
    "MonteCarloResult",
    "bellman_expectation",
    "bellman_expectation_q",
    "bellman_optimality",
    "bellman_optimality_q",
    "conversation_chain",
    "conversation_mdp",
    "deterministic_policy",
    "discounted_return",
    "discounted_returns",
    "discounted_returns_matrix",
    "distribution_after",
    "greedy_policy",
    "gridworld",
    "gridworld_3_5",
    "gridworld_4_1",
    "mc_policy_evaluation",
    "mrp_from_mdp",
    "mrp_values",
    "policy_evaluation",
    "policy_evaluation_sweep",
    "policy_iteration",
    "policy_reward",
    "policy_transition",
    "q_from_v",
    "random_mdp",
    "sample_chain",
    "sample_episode",
    "sample_mrp_episode",
    "solve_q",
    "solve_values",
    "stationary_distribution",
    "uniform_policy",
    "v_from_q",
    "validate_policy",
    "validate_stochastic_matrix",
    "value_iteration",
]
