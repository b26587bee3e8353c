"""rlcourse.bandit (the one-prompt categorical policy of chapter 1) against hand-derived
gradients, torch autograd and finite differences."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcourse.bandit import (
    expected_reward,
    expected_reward_grad,
    log_prob_grad,
    log_softmax,
    mle_grad,
    mle_loss,
    preference_grad,
    preference_loss,
    reinforce_grad,
    softmax,
    theta_grad,
    train,
)

torch.set_num_threads(1)


def autograd(fn, z):
    """d fn(z) / dz by torch autograd in float64 (an independent oracle)."""
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    fn(t).backward()
    return t.grad.numpy()


logit_vectors = st.integers(2, 7).flatmap(
    lambda n: st.lists(st.floats(-20, 20), min_size=n, max_size=n).map(np.array)
)


def test_softmax_hand_values_and_no_overflow():
    np.testing.assert_allclose(softmax(np.zeros(4)), np.full(4, 0.25))
    e = math.e
    np.testing.assert_allclose(softmax(np.array([1000.0, 1001.0])), [1 / (1 + e), e / (1 + e)])
    np.testing.assert_allclose(log_softmax(np.array([1000.0, 1001.0])),
                               [-math.log(1 + e), 1 - math.log(1 + e)])
    assert np.all(np.isfinite(log_softmax(np.array([-1e4, 0.0, 1e4]))))


def test_log_prob_grad_hand_example():
    # z = (0, 0): p = (1/2, 1/2); d log p_0 / dz = (1 - 1/2, -1/2)
    np.testing.assert_allclose(log_prob_grad(np.zeros(2), 0), [0.5, -0.5])
    # z = (log 1, log 2, log 1): p = (1/4, 1/2, 1/4); onehot(2) - p
    z = np.log([1.0, 2.0, 1.0])
    np.testing.assert_allclose(log_prob_grad(z, 2), [-0.25, -0.5, 0.75])


@settings(max_examples=40, deadline=None)
@given(z=logit_vectors, data=st.data())
def test_log_prob_grad_is_onehot_minus_p(z, data):
    y = data.draw(st.integers(0, len(z) - 1))
    onehot = np.eye(len(z))[y]
    expected = onehot - np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(log_prob_grad(z, y), expected, atol=1e-12)
    np.testing.assert_allclose(log_prob_grad(z, y),
                               autograd(lambda t: torch.log_softmax(t, 0)[y], z), atol=1e-10)


def test_log_prob_grad_matches_finite_differences():
    z = np.array([0.3, -1.2, 2.0, 0.0])
    eps = 1e-6
    fd = [(log_softmax(z + eps * e)[1] - log_softmax(z - eps * e)[1]) / (2 * eps)
          for e in np.eye(4)]
    np.testing.assert_allclose(log_prob_grad(z, 1), fd, atol=1e-8)


def test_mle_loss_and_grad_against_autograd():
    z = np.array([0.5, -0.3, 1.0, 2.0, -1.0])
    targets = np.array([0, 0, 2, 4])
    nll = lambda t: -torch.log_softmax(t, 0)[torch.tensor(targets)].mean()  # noqa: E731
    assert mle_loss(z, targets) == pytest.approx(float(nll(torch.tensor(z))))
    np.testing.assert_allclose(mle_grad(z, targets), autograd(nll, z), atol=1e-12)


def test_mle_pushes_non_targets_down_in_proportion_to_their_probability_only():
    # Answers 3 and 4 start equally likely; 4 is "bad", 3 is merely unlabelled. Likelihood of
    # the good answers cannot tell them apart: identical gradients, identical trajectories.
    z = np.array([1.0, 0.2, -0.5, 0.7, 0.7])
    g = mle_grad(z, np.array([0, 1]))
    p = softmax(z)
    np.testing.assert_allclose(g[2:], p[2:])  # d(-log-lik)/dz_j = +p_j for j not in the data
    assert g[3] == g[4]
    probs = train(z, np.eye(5), lambda v: mle_grad(v, np.array([0, 1])), lr=0.5, steps=50)
    np.testing.assert_allclose(probs[:, 3], probs[:, 4])


def test_preference_loss_and_grad_hand_example():
    # z = 0, pair (w=0, l=1), beta = 1: h = 0, loss = log 2, grad = -sigma(0) (e_0 - e_1)
    z = np.zeros(3)
    assert preference_loss(z, [0], [1]) == pytest.approx(math.log(2))
    np.testing.assert_allclose(preference_grad(z, [0], [1]), [-0.5, 0.5, 0.0])
    # at pi = pi_ref the DPO loss is log 2 whatever the logits
    z = np.array([2.0, -1.0, 0.5])
    assert preference_loss(z, [0, 2], [1, 0], beta=0.1, ref_logits=z) == pytest.approx(
        math.log(2))


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_preference_grad_against_autograd(beta):
    z = np.array([0.5, -0.3, 1.0, 2.0, -1.0])
    ref = np.array([0.0, 0.2, -0.1, 0.3, 0.0])
    good, bad = np.array([0, 2, 0]), np.array([3, 4, 4])

    def loss(t):
        logp = torch.log_softmax(t, 0)
        ref_logp = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), 0)
        h = (logp[good] - ref_logp[good]) - (logp[bad] - ref_logp[bad])
        return -torch.nn.functional.logsigmoid(beta * h).mean()

    assert preference_loss(z, good, bad, beta, ref) == pytest.approx(
        float(loss(torch.tensor(z, dtype=torch.float64))))
    np.testing.assert_allclose(preference_grad(z, good, bad, beta, ref), autograd(loss, z),
                               atol=1e-12)
    # answers outside every pair do not move
    assert preference_grad(z, good, bad, beta, ref)[1] == 0.0


def test_preference_is_stable_for_huge_margins():
    z = np.array([800.0, -800.0])
    assert preference_loss(z, [0], [1]) == 0.0
    assert preference_loss(z, [1], [0]) == pytest.approx(1600.0)
    assert np.all(np.isfinite(preference_grad(z, [1], [0])))
    np.testing.assert_allclose(preference_grad(z, [1], [0]), [1.0, -1.0])


def test_expected_reward_and_its_exact_gradient():
    z = np.array([0.1, 0.4, -0.2])
    r = np.array([1.0, -1.0, 0.5])
    p = np.exp(z) / np.exp(z).sum()
    assert expected_reward(z, r) == pytest.approx(float(p @ r))
    expected = autograd(lambda t: torch.softmax(t, 0) @ torch.tensor(r), z)
    np.testing.assert_allclose(expected_reward_grad(z, r), expected, atol=1e-12)


def test_reinforce_is_unbiased_for_any_baseline():
    z = np.array([0.1, 0.4, -0.2])
    r = np.array([1.0, -1.0, 0.5])
    p = softmax(z)
    exact = expected_reward_grad(z, r)
    for b in (0.0, 0.3, -2.0):
        # E_y[(r_y - b)(e_y - p)] written out over the three answers
        enumerated = sum(p[y] * reinforce_grad(z, np.array([y]), r, baseline=b) for y in range(3))
        np.testing.assert_allclose(enumerated, exact, atol=1e-12)
    samples = np.random.default_rng(0).choice(3, size=40_000, p=p)
    np.testing.assert_allclose(reinforce_grad(z, samples, r), exact, atol=0.01)


def test_theta_grad_is_the_chain_rule():
    F = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [0.0, -1.0, 1.0], [1.0, 1.0, 1.0]])
    theta = np.array([0.2, -0.1, 0.3])
    targets = np.array([0, 3])
    F_t = torch.tensor(F)
    loss = lambda th: -torch.log_softmax(F_t @ th, 0)[torch.tensor(targets)].mean()  # noqa
    np.testing.assert_allclose(theta_grad(F, mle_grad(F @ theta, targets)),
                               autograd(loss, theta), atol=1e-12)


def test_train_descends_and_records_every_step():
    z0 = np.zeros(4)
    probs = train(z0, np.eye(4), lambda z: mle_grad(z, np.array([1])), lr=1.0, steps=30)
    assert probs.shape == (31, 4)
    np.testing.assert_allclose(probs[0], 0.25)
    assert np.all(np.diff(probs[:, 1]) > 0)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    up = train(z0, np.eye(4), lambda z: -expected_reward_grad(z, np.array([0, 0, 1.0, -1])),
               lr=1.0, steps=30)
    assert up[-1, 2] > 0.5 and up[-1, 3] < up[0, 3]
