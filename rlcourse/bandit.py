"""A one-prompt "language model": a categorical policy over a handful of whole answers (NumPy).

Chapter 1 uses it to show what supervised fine-tuning can and cannot say. The policy is
``pi_theta(y) = softmax(z)_y`` with logits ``z = Phi theta``: ``Phi[y]`` is a feature vector of
answer ``y`` (``Phi = I`` gives one free logit per answer). Three training signals:

* **maximum likelihood** on good answers (what SFT does): minimise ``-mean_i log pi(y_i)``;
* a **preference** objective on pairs (good ``w`` beats bad ``l``), Bradley-Terry / DPO style:
  minimise ``-mean log sigma(beta [(log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))])``;
* a **reward** (a judge scores every answer): maximise ``E_{y ~ pi}[r(y)]``.

Every function returns a gradient with respect to the logits; :func:`theta_grad` turns it into
one with respect to ``theta`` by the chain rule, ``dL/dtheta = Phi^T dL/dz``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "expected_reward",
    "expected_reward_grad",
    "log_prob_grad",
    "log_softmax",
    "mle_grad",
    "mle_loss",
    "preference_grad",
    "preference_loss",
    "reinforce_grad",
    "softmax",
    "theta_grad",
    "train",
]


def softmax(logits: np.ndarray) -> np.ndarray:
    """``softmax(z)_y = exp(z_y - m) / sum_j exp(z_j - m)`` with ``m = max_j z_j``.

    Subtracting the maximum changes nothing mathematically and keeps ``exp`` from overflowing
    for large logits. Works on the last axis.
    """
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log softmax(z)_y = z_y - logsumexp(z)``, computed stably (last axis)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def log_prob_grad(logits: np.ndarray, y: int) -> np.ndarray:
    """``d log pi(y) / d z = onehot(y) - softmax(z)``.

    Raising ``log pi(y)`` raises ``z_y`` by ``1 - pi(y)`` and lowers *every* other logit
    ``z_j`` by ``pi(j)``: how much an answer is pushed down depends only on how likely it is,
    never on whether it is good or bad.
    """
    p = softmax(logits)
    onehot = np.zeros_like(p)
    onehot[y] = 1.0
    return onehot - p


def mle_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    """Negative log-likelihood of the answers in the data: ``-(1/n) sum_i log pi(y_i)``."""
    return float(-np.mean(log_softmax(logits)[np.asarray(targets)]))


def mle_grad(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Gradient of :func:`mle_loss` with respect to the logits: ``softmax(z) - c``, where
    ``c_y`` is the fraction of the data equal to ``y``. (The mean of ``-(onehot(y_i) - p)``.)"""
    targets = np.asarray(targets)
    z = np.asarray(logits, dtype=np.float64)
    counts = np.bincount(targets, minlength=len(z)) / len(targets)
    return softmax(z) - counts


def _margins(logits, good, bad, beta, ref_logits):
    logp = log_softmax(logits)
    ref = np.zeros_like(logp) if ref_logits is None else log_softmax(ref_logits)
    good, bad = np.asarray(good), np.asarray(bad)
    # h = (log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l)); softmax normalisers cancel
    return beta * ((logp[good] - ref[good]) - (logp[bad] - ref[bad])), good, bad


def preference_loss(logits: np.ndarray, good: np.ndarray, bad: np.ndarray, beta: float = 1.0,
                    ref_logits: np.ndarray | None = None) -> float:
    """Bradley-Terry / DPO loss on pairs: ``-(1/n) sum_i log sigma(beta h_i)`` with
    ``h_i = [log pi(w_i) - log pi_ref(w_i)] - [log pi(l_i) - log pi_ref(l_i)]``.

    ``-log sigma(x) = log(1 + exp(-x))`` is computed as ``logaddexp(0, -x)`` (no overflow).
    Without a reference (``ref_logits=None``) ``log pi_ref`` is taken as 0.
    """
    m, _, _ = _margins(logits, good, bad, beta, ref_logits)
    return float(np.mean(np.logaddexp(0.0, -m)))


def preference_grad(logits: np.ndarray, good: np.ndarray, bad: np.ndarray, beta: float = 1.0,
                    ref_logits: np.ndarray | None = None) -> np.ndarray:
    """Gradient of :func:`preference_loss` with respect to the logits:
    ``-(beta/n) sum_i sigma(-beta h_i) (onehot(w_i) - onehot(l_i))``.

    In a softmax ``log pi(w) - log pi(l) = z_w - z_l``, so only the two answers of a pair move:
    the winner up, the loser down, by the same amount ``beta sigma(-beta h)``, which fades as
    the pair becomes well separated.
    """
    m, good, bad = _margins(logits, good, bad, beta, ref_logits)
    weight = beta / (1.0 + np.exp(np.clip(m, -500, 500)))  # beta * sigma(-m)
    grad = np.zeros(len(np.asarray(logits)))
    np.add.at(grad, good, -weight)
    np.add.at(grad, bad, weight)
    return grad / len(good)


def expected_reward(logits: np.ndarray, rewards: np.ndarray) -> float:
    """``J = E_{y ~ pi}[r(y)] = sum_y pi(y) r(y)``."""
    return float(softmax(logits) @ np.asarray(rewards, dtype=np.float64))


def expected_reward_grad(logits: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Exact policy gradient ``dJ/dz = sum_y pi(y) r(y) (onehot(y) - pi) = pi * (r - J)``.

    An answer is pushed up if its reward beats the average ``J`` and down if it falls short:
    unlike likelihood, a reward *can* single out a bad answer.
    """
    p = softmax(logits)
    r = np.asarray(rewards, dtype=np.float64)
    return p * (r - p @ r)


def reinforce_grad(logits: np.ndarray, samples: np.ndarray, rewards: np.ndarray,
                   baseline: float = 0.0) -> np.ndarray:
    """Sampled (REINFORCE) estimate of :func:`expected_reward_grad`:
    ``(1/n) sum_i (r(y_i) - b) (onehot(y_i) - pi)`` for ``y_i ~ pi``; unbiased for any constant
    baseline ``b``."""
    p = softmax(logits)
    samples = np.asarray(samples)
    adv = np.asarray(rewards, dtype=np.float64)[samples] - baseline
    onehots = np.eye(len(p))[samples]
    return np.mean(adv[:, None] * (onehots - p[None, :]), axis=0)


def theta_grad(features: np.ndarray, logit_grad: np.ndarray) -> np.ndarray:
    """Chain rule through ``z = Phi theta``: ``dL/dtheta = Phi^T dL/dz``."""
    return np.asarray(features, dtype=np.float64).T @ logit_grad


def train(theta: np.ndarray, features: np.ndarray,
          descent_direction: Callable[[np.ndarray], np.ndarray], lr: float, steps: int
          ) -> np.ndarray:
    """Gradient descent ``theta <- theta - lr Phi^T g(z)``, where ``g(z)`` is the gradient of a
    loss with respect to the logits (pass ``lambda z: -expected_reward_grad(z, r)`` to ascend a
    reward). Returns the probabilities ``softmax(Phi theta)`` after every step, ``[steps + 1, N]``.
    """
    theta = np.array(theta, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    probs = [softmax(features @ theta)]
    for _ in range(steps):
        theta -= lr * theta_grad(features, descent_direction(features @ theta))
        probs.append(softmax(features @ theta))
    return np.stack(probs)
