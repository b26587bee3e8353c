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
    # oracle: sum over every text of P(text) * gamma^(H-1) * R(text); P from the policy's own
    # softmax on each prefix, multiplied along the text
    total, best = 0.0, -math.inf
    for text in itertools.product(range(3), repeat=4):
        ids = mdp.input_ids(torch.tensor([text]))
        logits = pol(ids)[0].detach()
        p = torch.softmax(logits[0, :-1].double(), -1)[torch.arange(4), torch.tensor(text)].prod()
        r = float(mdp.reward(torch.tensor([text]))[0])
        total += float(p) * 0.8**3 * r
        best = max(best, 0.8**3 * r)
    assert math.isclose(mdp.evaluate(probs).root, total, rel_tol=1e-9)
    assert math.isclose(mdp.optimal_return(), best, rel_tol=1e-12)


def test_prompts_kl_shaped_value_equals_enumeration():
    # two prompts with mu = (0.25, 0.75); every token also pays -beta log(pi / pi_ref)
    mdp = TokenMDP(n_tokens=2, horizon=3, reward="instructed", n_prompts=2,
                   prompt_probs=[1, 3], weights=[1.0, 3.0])
    pol, ref = _tabular(mdp, seed=4), _tabular(mdp, seed=5)
    beta = 0.3
    total, best = 0.0, [-math.inf, -math.inf]
    for prompt in range(2):
        for text in itertools.product(range(2), repeat=3):
            ids = mdp.input_ids(torch.tensor([text]), torch.tensor([prompt]))
            lp = torch.log_softmax(pol(ids)[0][0, :-1].detach().double(), -1)[torch.arange(3), text]
            lr = torch.log_softmax(ref(ids)[0][0, :-1].detach().double(), -1)[torch.arange(3), text]
            hits = sum(a == prompt for a in text)
            reps = sum(text[i] == text[i - 1] for i in range(1, 3))
            r = [1.0, 3.0][prompt] * hits - reps
            mu = [0.25, 0.75][prompt]
            total += mu * float(lp.sum().exp()) * (r - beta * float((lp - lr).sum()))
            best[prompt] = max(best[prompt], r)
    assert math.isclose(mdp.evaluate(pol, ref, kl_coef=beta).root, total, rel_tol=1e-9)
    assert math.isclose(mdp.optimal_return(), 0.25 * best[0] + 0.75 * best[1])
    assert mdp.greedy_texts(prompt=1) == ["b b b"]  # 3 * 3 - 2 repeats beats 3 * 2


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
    # with three prompts of unequal probability as well
    mdp = TokenMDP(n_tokens=3, horizon=4, reward="instructed", n_prompts=3, prompt_probs=[1, 2, 5])
    pol = _tabular(mdp, seed=6)
    exact = mdp.evaluate(pol).root
    mean, stderr = mdp.monte_carlo_value(pol, 20000, torch.Generator().manual_seed(1))
    assert abs(mean - exact) < 4 * stderr


def test_state_ids_match_policy_prefix_ids_and_exact_values_index():
    mdp = TokenMDP(n_tokens=3, horizon=4)
    texts, prompts = mdp.all_texts()
    ids = mdp.state_ids(texts, prompts)
    pol = PrefixPolicy(mdp)
    assert torch.equal(pol.state_ids(mdp.input_ids(texts, prompts))[:, :-1], ids)
    # each decision state appears, and the ids are a bijection onto 0 .. n_states-1
    assert set(ids.flatten().tolist()) == set(range(mdp.n_states))
    # text "c a b c": states (), (c), (c a), (c a b) -> 0, 1 + 2, 4 + (2*3 + 0), 13 + (2*9+0+1)
    row = ids[int(2 * 27 + 0 * 9 + 1 * 3 + 2)]
    assert row.tolist() == [0, 1 + 2, 4 + 2 * 3 + 0, 13 + (2 * 9 + 0 * 3 + 1)]
    assert mdp.evaluate(pol).flat.shape == (mdp.n_states,)
    # two prompts: level k holds 2 * 3^k states, prompt-major
    mdp2 = TokenMDP(n_tokens=3, horizon=3, n_prompts=2)
    got = mdp2.state_ids(torch.tensor([[2, 1, 0]]), torch.tensor([1]))
    assert got.tolist() == [[1, 2 + (1 * 3 + 2), 2 + 6 + ((1 * 3 + 2) * 3 + 1)]]
    assert mdp2.n_states == 2 + 6 + 18


def test_reward_functions_by_hand():
    x = torch.tensor([[0, 0, 1, 2], [2, 1, 2, 1]])
    assert make_reward("count", target=0)(x, None).tolist() == [2.0, 0.0]
    assert no_repeat_reward(x).tolist() == [2.0, 3.0]
    assert count_no_repeat_reward(x, None, target=2, penalty=0.5).tolist() == [1 - 0.5, 2.0]
    assert match_reward(x, None, [2, 1, 2, 2]).tolist() == [1.0, 3.0]
    assert match_reward(x, None, [2, 1, 2, 1], exact=True).tolist() == [0.0, 1.0]
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
    mean_reward = float(mdp.reward(*mdp.all_texts()).double().mean())
    assert math.isclose(uniform, mean_reward, rel_tol=1e-6)


def test_rollout_format_and_instructed_reward():
    mdp = TokenMDP(n_tokens=3, horizon=4, reward="instructed", n_prompts=3)
    out = mdp.rollout(PrefixPolicy(mdp), 16, torch.Generator().manual_seed(0))
    assert out["input_ids"].shape == (16, 5) and out["completion_mask"][:, 0].sum() == 0
    assert torch.equal(mdp.score(out["input_ids"]), out["rewards"])
    x = torch.tensor([[1, 1, 0, 1], [2, 0, 2, 2]])
    # prompt 1 (w = 1.5): three 1s, one repeat; prompt 2 (w = 2): three 2s, one repeat
    assert mdp.reward(x, torch.tensor([1, 2])).tolist() == [1.5 * 3 - 1, 2.0 * 3 - 1]


def test_expected_return_is_exact_value_and_its_gradient_is_the_policy_gradient():
    mdp = TokenMDP(n_tokens=2, horizon=2, reward="count", target=0, gamma=0.9)
    pol = PrefixPolicy(mdp, "tabular")
    J = mdp.expected_return(pol)
    assert math.isclose(J.item(), mdp.evaluate(pol).root, rel_tol=1e-9)
    J.backward()
    # uniform start: texts aa, ab, ba, bb each 1/4, rewards 2, 1, 1, 0. d J / d z_root[a] =
    # 0.9 * pi(a) (V(a) - V(root)) = 0.9 * 0.5 * (1.5 - 1.0); for z_root[b]: the negative
    assert torch.allclose(pol.logits_table.grad[0].double(),
                          torch.tensor([0.225, -0.225], dtype=torch.float64))
    # state "a": d/dz[a] = 0.9 * P(reach a) pi(a|a) (q(a,a) - V(a)) = 0.9 * .5 * .5 * (2 - 1.5)
    assert math.isclose(float(pol.logits_table.grad[1, 0]), 0.9 * 0.25 * 0.5, rel_tol=1e-6)


def test_critic_vs_exact_scores_a_critic_against_the_bellman_values():
    mdp = TokenMDP(n_tokens=3, horizon=4, n_prompts=2)
    pol = _tabular(mdp, seed=3)
    ref = _tabular(mdp, seed=4)
    beta = 0.1
    exact = mdp.evaluate(pol, ref, beta).flat                       # oracle: the backward sweep
    n_decision = exact.numel()
    # a critic that holds the exact KL-shaped values is perfect
    with torch.no_grad():
        pol.value_table[:n_decision] = exact.float()
    got = mdp.critic_vs_exact(pol, ref, beta, n=512, seed=0)
    assert got["corr_distinct"] == pytest.approx(1.0, abs=1e-6)
    assert got["corr_weighted"] == pytest.approx(1.0, abs=1e-6)
    assert got["mean_abs_error"] < 1e-6
    assert torch.allclose(got["critic"], got["exact"], atol=1e-6)
    # an affine copy still correlates perfectly, but is off by |(2V + 1) - V| on average
    with torch.no_grad():
        pol.value_table[:n_decision] = (2 * exact + 1).float()
    got = mdp.critic_vs_exact(pol, ref, beta, n=512, seed=0)
    assert got["corr_distinct"] == pytest.approx(1.0, abs=1e-6)
    states = mdp.state_ids(*(lambda o: (o["texts"], o["prompts"]))(
        mdp.rollout(pol, 512, torch.Generator().manual_seed(0)))).flatten()
    assert got["mean_abs_error"] == pytest.approx(float((exact[states] + 1).abs().mean()), 1e-5)
    # the untrained critic (all zeros) is constant: no correlation is defined
    with torch.no_grad():
        pol.value_table.zero_()
    got = mdp.critic_vs_exact(pol, ref, beta, n=512, seed=0)
    assert math.isnan(got["corr_distinct"]) and math.isnan(got["corr_weighted"])
    assert 0 < got["n_visited_states"] <= n_decision
