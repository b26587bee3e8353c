"""The token MDP: exact values by hand, against brute-force enumeration and against Monte Carlo."""

import itertools
import math

import numpy as np
import pytest
import torch

from rlcourse.worlds.token_mdp import (
    PrefixPolicy,
    TokenMDP,
    count_no_repeat_reward,
    make_reward,
    match_reward,
    no_repeat_reward,
)


def _tabular(mdp, seed=0, scale=1.0):
    pol = PrefixPolicy(mdp, "tabular")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pol.logits_table.copy_(scale * torch.randn(pol.logits_table.shape, generator=g))
    return pol


def _set_prob_of_token0(pol, state, p):
    with torch.no_grad():
        pol.logits_table[state] = torch.tensor([math.log(p), math.log(1 - p)])


def test_two_tokens_horizon_two_by_hand():
    # R = number of token-0s. States: root (0), "a" (1), "b" (2).
    mdp = TokenMDP(n_tokens=2, horizon=2, reward="count", target=0, gamma=0.9)
    pol = PrefixPolicy(mdp, "tabular")
    p, q0, q1 = 0.3, 0.6, 0.2
    _set_prob_of_token0(pol, 0, p)
    _set_prob_of_token0(pol, 1, q0)
    _set_prob_of_token0(pol, 2, q1)
    ex = mdp.evaluate(pol)
    v_a = q0 * 2 + (1 - q0) * 1  # texts aa -> 2, ab -> 1
    v_b = q1 * 1 + (1 - q1) * 0  # texts ba -> 1, bb -> 0
    assert np.allclose(ex.v[1].numpy(), [v_a, v_b])
    assert np.allclose(ex.q[1].numpy(), [[2, 1], [1, 0]])
    assert np.allclose(ex.q[0].numpy(), [[0.9 * v_a, 0.9 * v_b]])
    assert math.isclose(ex.root, 0.9 * (p * v_a + (1 - p) * v_b), rel_tol=1e-6)  # fp32 logits
    opt = mdp.optimal()
    assert math.isclose(opt.root, 0.9 * 2) and np.allclose(opt.v[1].numpy(), [2, 1])
    assert mdp.greedy_texts() == ["a a"]


@pytest.mark.parametrize("kind,kw", [("count", {"target": 1}), ("no_repeat", {}),
                                     ("count_no_repeat", {"target": 0}),
                                     ("match", {"target": [2, 0, 1, 1]})])
def test_exact_value_equals_enumeration_of_all_texts(kind, kw):
    mdp = TokenMDP(n_tokens=3, horizon=4, reward=kind, gamma=0.8, **kw)
    pol = _tabular(mdp, seed=1)
    probs = mdp.policy_probs(pol)
    V = mdp.n_tokens
    # oracle: sum over every text of P(text) * gamma^(H-1) * R(text), probabilities multiplied
    total, best = 0.0, -math.inf
    for text in itertools.product(range(V), repeat=4):
        p, code = 1.0, 0
        for k, a in enumerate(text):
            p *= float(probs[k][code, a])
            code = code * V + a
        r = float(mdp.reward(torch.tensor([text]))[0])
        total += p * 0.8**3 * r
        best = max(best, 0.8**3 * r)
    assert math.isclose(mdp.evaluate(probs).root, total, rel_tol=1e-9)
    assert math.isclose(mdp.optimal_return(), best, rel_tol=1e-12)


def test_optimal_dominates_every_policy_everywhere_and_v_is_pi_weighted_q():
    mdp = TokenMDP(n_tokens=3, horizon=5)
    opt = mdp.optimal()
    for seed in range(5):
        pol = _tabular(mdp, seed=seed, scale=2.0)
        probs = mdp.policy_probs(pol)
        ex = mdp.evaluate(probs)
        for k in range(mdp.horizon):
            assert (opt.v[k] >= ex.v[k] - 1e-9).all()
            assert torch.allclose(ex.v[k], (probs[k] * ex.q[k]).sum(-1))
            assert torch.allclose(opt.v[k], opt.q[k].max(-1).values)


def test_monte_carlo_agrees_with_exact_value():
    mdp = TokenMDP(n_tokens=3, horizon=5, gamma=0.95)
    pol = _tabular(mdp, seed=3)
    exact = mdp.evaluate(pol).root
    mean, stderr = mdp.monte_carlo_value(pol, 20000, torch.Generator().manual_seed(0))
    assert abs(mean - exact) < 4 * stderr


def test_state_ids_match_policy_prefix_ids_and_exact_values_index():
    mdp = TokenMDP(n_tokens=3, horizon=4)
    texts = mdp.all_texts()
    ids = mdp.state_ids(texts)
    pol = PrefixPolicy(mdp)
    full = torch.cat([torch.full((len(texts), 1), mdp.bos), texts], 1)
    assert torch.equal(pol.prefix_ids(full)[:, :-1], ids)
    # each non-terminal prefix appears, and the ids are a bijection onto 0 .. n_states-1
    assert set(ids.flatten().tolist()) == set(range(mdp.n_states))
    # text "c a b c": prefixes (), (c), (c a), (c a b) -> 0, 1 + 2, 4 + (2*3 + 0), 13 + (6*3+1)*...
    row = ids[int(2 * 27 + 0 * 9 + 1 * 3 + 2)]
    assert row.tolist() == [0, 1 + 2, 4 + 2 * 3 + 0, 13 + (2 * 9 + 0 * 3 + 1)]
    ex = mdp.evaluate(pol)
    assert ex.flat.shape == (mdp.n_states,)


def test_reward_functions_by_hand():
    x = torch.tensor([[0, 0, 1, 2], [2, 1, 2, 1]])
    assert make_reward("count", target=0)(x).tolist() == [2.0, 0.0]
    assert no_repeat_reward(x).tolist() == [2.0, 3.0]
    assert count_no_repeat_reward(x, target=2, penalty=0.5).tolist() == [1 - 0.5, 2.0]
    assert match_reward(x, [2, 1, 2, 2]).tolist() == [1.0, 3.0]
    assert match_reward(x, [2, 1, 2, 1], exact=True).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        make_reward("nope")


def test_default_world_optimum_alternates():
    mdp = TokenMDP(n_tokens=3, horizon=5)  # count of 'a' minus repeats
    assert mdp.optimal_return() == 3.0
    assert "a b a b a" in mdp.greedy_texts() and "a a a a a" not in mdp.greedy_texts()


def test_mlp_policy_shapes_and_uniform_start():
    mdp = TokenMDP(n_tokens=4, horizon=3)
    pol = PrefixPolicy(mdp, "mlp", hidden=16)
    ids = torch.tensor([[mdp.bos, 0, 3, 1], [mdp.bos, 2, 2, 2]])
    logits, values = pol(ids)
    assert logits.shape == (2, 4, 4) and values.shape == (2, 4)
    uniform = mdp.evaluate(pol).root
    assert math.isclose(uniform, float(mdp.reward(mdp.all_texts()).double().mean()), rel_tol=1e-6)
