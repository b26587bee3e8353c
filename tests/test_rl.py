"""rlcourse.rl against hand computations and float64 formulas written out in the tests."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcourse import rl

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ---------------------------------------------------------------- returns, TD, GAE
REWARDS = [[0.0, 0.0, 1.0]]
VALUES = [[0.5, 0.2, 0.8]]


def test_discounted_returns_hand():
    G = rl.discounted_returns(t(REWARDS), 0.9)
    assert torch.allclose(G, t([[0.81, 0.9, 1.0]]))


def test_td_errors_hand():
    # delta_0 = 0 + .9*.2 - .5, delta_1 = 0 + .9*.8 - .2, delta_2 = 1 + 0 - .8 (terminal after)
    d = rl.td_errors(t(REWARDS), t(VALUES), 0.9)
    assert torch.allclose(d, t([[-0.32, 0.52, 0.2]]))


def test_gae_lambda_zero_is_the_slides_one_step_advantage():
    adv, ret = rl.gae(t(REWARDS), t(VALUES), gamma=0.9, lam=0.0)
    slides = t([[0.0 + 0.9 * 0.2 - 0.5, 0.0 + 0.9 * 0.8 - 0.2, 1.0 - 0.8]])
    assert torch.allclose(adv, slides)
    assert torch.allclose(ret, t([[0.9 * 0.2, 0.9 * 0.8, 1.0]]))  # R_t + gamma V_{t+1}


def test_gae_lambda_one_zero_values_is_discounted_return():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 7))
    adv, ret = rl.gae(t(r), torch.zeros(3, 7, dtype=D), gamma=0.8, lam=1.0)
    expected = np.zeros_like(r)
    for b in range(3):
        for i in range(7):
            expected[b, i] = sum(0.8**k * r[b, i + k] for k in range(7 - i))
    assert np.allclose(adv.numpy(), expected) and np.allclose(ret.numpy(), expected)


def test_gae_matches_sum_of_discounted_td_errors_float64():
    rng = np.random.default_rng(1)
    r, v = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    gamma, lam = 0.95, 0.7
    v_next = np.concatenate([v[:, 1:], np.zeros((2, 1))], axis=1)
    delta = r + gamma * v_next - v
    expected = np.array([[sum((gamma * lam) ** k * delta[b, i + k] for k in range(6 - i))
                          for i in range(6)] for b in range(2)])
    adv, ret = rl.gae(t(r), t(v), gamma, lam)
    assert np.allclose(adv.numpy(), expected)
    assert np.allclose(ret.numpy(), expected + v)


def test_gae_masks_right_and_left_padding_equal_unpadded():
    r, v = [0.3, -1.0, 2.0], [0.1, 0.4, -0.2]
    ref_adv, ref_ret = rl.gae(t([r]), t([v]), 0.9, 0.8)
    padded_r = t([r + [5.0, 7.0], [9.0] + r + [1.0]])
    padded_v = t([v + [3.0, 3.0], [4.0] + v + [2.0]])
    mask = t([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    adv, ret = rl.gae(padded_r, padded_v, 0.9, 0.8, mask)
    assert torch.allclose(adv[0, :3], ref_adv[0]) and torch.allclose(adv[1, 1:4], ref_adv[0])
    assert torch.allclose(ret[0, :3], ref_ret[0]) and torch.allclose(ret[1, 1:4], ref_ret[0])
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


@st.composite
def _batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 9))
    floats = st.floats(-5, 5, allow_nan=False, width=64)
    r = draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B))
    v = draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B))
    mask = []
    for _ in range(B):
        start = draw(st.integers(0, T))
        end = draw(st.integers(start, T))
        mask.append([1.0 if start <= i < end else 0.0 for i in range(T)])
    gamma = draw(st.floats(0, 1))
    lam = draw(st.floats(0, 1))
    return t(r), t(v), t(mask), gamma, lam


@settings(max_examples=150, deadline=None)
@given(_batches())
def test_gae_loop_equals_vectorised(batch):
    r, v, mask, gamma, lam = batch
    a1, r1 = rl.gae_loop(r, v, gamma, lam, mask)
    a2, r2 = rl.gae(r, v, gamma, lam, mask)
    assert torch.allclose(a1, a2, atol=1e-9) and torch.allclose(r1, r2, atol=1e-9)


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_hand_values():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    # log r = log(0.25/0.5) = -log 2
    assert torch.allclose(rl.k1(logp, ref), t([math.log(2)]))
    assert torch.allclose(rl.k2(logp, ref), t([0.5 * math.log(2) ** 2]))
    assert torch.allclose(rl.k3(logp, ref), t([(0.5 - 1) + math.log(2)]))


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 30, allow_nan=False), st.floats(-30, 30, allow_nan=False))
def test_k3_nonnegative(a, b):
    assert float(rl.k3(torch.tensor([a]), torch.tensor([b]))) >= 0.0


def test_k3_accurate_for_tiny_log_ratios_in_float32():
    x64 = np.array([1e-7, -3e-6, 2e-4, -5e-3, 0.02, -0.3])
    expected = np.expm1(x64) - x64  # float64 oracle; x = log r = ref - logp
    got = rl.k3(torch.zeros(6, dtype=torch.float32), torch.tensor(x64, dtype=torch.float32))
    assert np.allclose(got.numpy(), expected, rtol=1e-3, atol=0)


def test_k1_and_k3_are_unbiased_for_kl():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=D)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=D)
    kl = float((p * (p / q).log()).sum())
    logp, logq = p.log(), q.log()
    assert math.isclose(float((p * rl.k1(logp, logq)).sum()), kl, rel_tol=1e-12)
    assert math.isclose(float((p * rl.k3(logp, logq)).sum()), kl, rel_tol=1e-12)


def test_k3_value_is_unbiased_but_its_gradient_is_that_of_the_other_kl():
    # Monte Carlo on a small categorical pi_theta = softmax(theta), samples a ~ pi_theta (the
    # sampling not differentiated, as in GRPO's loss), against exact float64 formulas.
    theta = torch.tensor([1.0, 0.5, -0.5, -1.0], dtype=D, requires_grad=True)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)  # pi_ref
    logp = torch.log_softmax(theta, 0)
    p = logp.detach().exp()
    n = 200_000
    a = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    k = rl.k3(logp[a], q.log()[a])

    # 1. the value: the mean of k3 is KL(pi || pi_ref) within a few standard errors
    f = p.log() - q.log()
    kl = float((p * f).sum())
    value_se = float(k.detach().std()) / math.sqrt(n)
    assert abs(float(k.detach().mean()) - kl) < 4 * value_se

    # 2. the gradient of mean k3 as a loss. Per sample it is (1 - r_a)(e_a - pi), r = q / p:
    # its mean estimates -E_q[grad log pi] = grad KL(pi_ref || pi_theta) = pi - q, NOT
    # grad KL(pi_theta || pi_ref) = pi_j (f_j - KL) (f = log pi - log q).
    (grad,) = torch.autograd.grad(k.mean(), theta)
    per_sample = (1 - (q / p)[a])[:, None] * (torch.eye(4, dtype=D)[a] - p)
    assert torch.allclose(grad, per_sample.mean(0), atol=1e-12)
    grad_se = per_sample.std(0) / math.sqrt(n)
    grad_kl_ref_pi = p - q
    grad_kl_pi_ref = p * (f - kl)
    assert bool(((grad - grad_kl_ref_pi).abs() < 4 * grad_se).all()), (grad, grad_kl_ref_pi)
    assert float(((grad - grad_kl_pi_ref).abs() / grad_se).max()) > 50, (grad, grad_kl_pi_ref)


# ---------------------------------------------------------------- KL-shaped reward
def test_kl_shaped_rewards_hand_example():
    logp = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = t([[-1.5, -2.0, -2.0], [-0.5, -1.0, 4.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    score = t([2.0, 10.0])
    r = rl.kl_shaped_rewards(logp, ref, score, mask, kl_coef=0.1, clip_score=5.0)
    # row 0: -0.1 * [0.5, 0, -1] + [0, 0, 2]; row 1: -0.1 * [-0.5, 0] + [0, clip(10) = 5], pad 0
    assert torch.allclose(r, t([[-0.05, 0.0, 2.1], [0.05, 5.0, 0.0]]))


def test_kl_shaped_rewards_left_padding_and_empty_rows():
    logp = torch.zeros(2, 4, dtype=D)
    mask = t([[0, 1, 1, 0], [0, 0, 0, 0]])
    r = rl.kl_shaped_rewards(logp, logp, t([3.0, 4.0]), mask, kl_coef=0.5)
    assert torch.allclose(r, t([[0, 0, 3.0, 0], [0, 0, 0, 0]]))


# ---------------------------------------------------------------- losses
def test_ppo_policy_loss_hand_example_both_clipping_sides():
    adv = t([1.0, -1.0, 1.0, -1.0])
    ratio = t([1.5, 0.5, 0.5, 1.5])
    old = torch.zeros(4, dtype=D)
    logp = ratio.log().clone().requires_grad_(True)
    loss, m = rl.ppo_policy_loss(logp, old, adv, clip_eps=0.2)
    # per token: max(-1.5, -1.2) = -1.2 (clipped above); max(0.5, 0.8) = 0.8 (clipped below);
    #            max(-0.5, -0.8) = -0.5;               max(1.5, 1.2) = 1.5
    assert math.isclose(loss.item(), (-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert math.isclose(float(m["clip_frac"]), 0.5)
    assert math.isclose(float(m["approx_kl"]), float((0.5 * ratio.log() ** 2).mean()))
    loss.backward()
    # clipped tokens give no gradient; the others d(-A rho)/dlogp = -A rho, divided by 4 tokens
    assert torch.allclose(logp.grad, t([0.0, 0.0, -0.5 / 4, 1.5 / 4]))


def test_ppo_value_loss_hand_example():
    v = t([2.0, -1.0, 0.5])
    old = t([1.0, 0.0, 0.5])
    ret = t([3.0, -1.0, 0.0])
    mask = t([1, 1, 0])
    loss, m = rl.ppo_value_loss(v, old, ret, mask, clip_eps_v=0.2)
    # (2-3)^2 = 1 vs (1.2-3)^2 = 3.24; (-1+1)^2 = 0 vs (-0.2+1)^2 = 0.64; third token masked
    assert math.isclose(loss.item(), 0.5 * (3.24 + 0.64) / 2)
    assert math.isclose(float(m["vf_clip_frac"]), 1.0)
    loss_nc, _ = rl.ppo_value_loss(v, old, ret, mask, clip_eps_v=None)
    assert math.isclose(loss_nc.item(), 0.5 * (1.0 + 0.0) / 2)


def test_lambda_zero_no_clipping_reproduces_the_slides_losses():
    rng = np.random.default_rng(3)
    B, T = 3, 5
    mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    logp0 = t(rng.normal(size=(B, T)) - 2)
    ref = t(rng.normal(size=(B, T)) - 2)
    values0 = t(rng.normal(size=(B, T)))
    rewards = rl.kl_shaped_rewards(logp0, ref, t(rng.normal(size=B)), mask, kl_coef=0.1)
    gamma = 0.9
    adv, ret = rl.gae(rewards, values0, gamma, lam=0.0, mask=mask)
    # the slides' advantage, written out: R_t + gamma V_{t+1} - V_t
    v_next = torch.cat([values0 * mask, torch.zeros(B, 1, dtype=D)], 1)[:, 1:]
    assert torch.allclose(adv, (rewards + gamma * v_next - values0) * mask)

    # actor: at the start of PPO's update (pi = pi_old) the gradients coincide
    lp1 = logp0.clone().requires_grad_(True)
    lp2 = logp0.clone().requires_grad_(True)
    ppo, _ = rl.ppo_policy_loss(lp1, logp0, adv, mask, clip_eps=None)
    slides = rl.slides_actor_loss(lp2, adv, mask)
    ppo.backward()
    slides.backward()
    assert torch.allclose(lp1.grad, lp2.grad)

    # critic: 2 x PPO's unclipped value loss is the slides' (R_t + gamma V_{t+1} - V_t)^2
    v1 = values0.clone().requires_grad_(True)
    v2 = values0.clone().requires_grad_(True)
    vl, _ = rl.ppo_value_loss(v1, values0, ret, mask, clip_eps_v=None)
    cl = rl.slides_critic_loss(v2, rewards, gamma, mask)
    assert torch.allclose(2 * vl, cl)
    (2 * vl).backward()
    cl.backward()
    assert torch.allclose(v1.grad, v2.grad)


def test_slides_critic_loss_hand():
    v = t([[0.5, 0.2, 0.8]]).requires_grad_(True)
    loss = rl.slides_critic_loss(v, t(REWARDS), 0.9)
    assert math.isclose(loss.item(), (0.32**2 + 0.52**2 + 0.2**2) / 3)
    loss.backward()  # target held fixed: d/dV_t = -2 delta_t / 3
    assert torch.allclose(v.grad, t([[0.64 / 3, -1.04 / 3, -0.4 / 3]]))


def test_slides_actor_loss_hand():
    logp = t([[-1.0, -2.0]]).requires_grad_(True)
    loss = rl.slides_actor_loss(logp, t([[0.5, -1.0]]))
    assert math.isclose(loss.item(), (0.5 - 2.0) / 2)
    loss.backward()
    assert torch.allclose(logp.grad, t([[-0.25, 0.5]]))


# ---------------------------------------------------------------- statistics
def test_masked_mean_whiten_and_var():
    x = t([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    assert math.isclose(float(rl.masked_mean(x, mask)), 2.5)
    assert math.isclose(float(rl.masked_var(x, mask)), np.var([1, 2, 3, 4], ddof=1))
    w = rl.masked_whiten(x, mask)
    assert (w[mask == 0] == 0).all()
    vals = w[mask == 1].numpy()
    assert abs(vals.mean()) < 1e-12 and math.isclose(vals.var(ddof=1), 1.0, rel_tol=1e-6)
    assert torch.allclose(rl.masked_mean(x, mask, dim=1), t([1.5, 3.5]))
    assert float(rl.masked_mean(x, torch.zeros_like(x))) == 0.0


def test_explained_variance_and_entropy():
    y = t([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(float(rl.explained_variance(y, y)), 1.0)
    assert math.isclose(float(rl.explained_variance(torch.full_like(y, 2.5), y)), 0.0,
                        abs_tol=1e-12)
    logits = t([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e9, -1e9]])
    h = rl.entropy_from_logits(logits)
    assert torch.allclose(h, t([math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))


# ---------------------------------------------------------------- controllers
def test_adaptive_kl_controller_formula():
    ctl = rl.AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # e = clip(0.5) = 0.2
    assert math.isclose(ctl.value, 0.2 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=100)  # e = -0.1
    assert math.isclose(ctl.value, before * (1 - 0.1 * 100 / 10000))
    ctl.update(current_kl=0.0, n_steps=10000)  # e clipped at -0.2
    assert math.isclose(ctl.value, before * (1 - 0.1 * 100 / 10000) * 0.8)


def test_fixed_kl_controller():
    ctl = rl.FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.value == 0.05


@pytest.mark.parametrize("fn", [rl.k1, rl.k2, rl.k3])
def test_kl_estimators_zero_when_equal(fn):
    x = torch.randn(5)
    assert torch.allclose(fn(x, x), torch.zeros(5))


def test_reinforce_loss_hand_and_baseline():
    logp = t([[-1.0, -2.0], [-0.5, -0.1]]).requires_grad_(True)
    G = t([[3.0, 1.0], [2.0, 2.0]])
    mask = t([[1, 1], [1, 0]])
    loss = rl.reinforce_loss(logp, G, mask)
    # -(1/2) [(3 * -1 + 1 * -2) + (2 * -0.5)] = 3.0
    assert math.isclose(loss.item(), 3.0)
    loss.backward()
    assert torch.allclose(logp.grad, t([[-1.5, -0.5], [-1.0, 0.0]]))
    with_b = rl.reinforce_loss(logp, G, mask, baseline=t([[1.0, 1.0], [1.0, 1.0]]))
    assert math.isclose(with_b.item(), -0.5 * ((2 * -1 + 0 * -2) + (1 * -0.5)))
