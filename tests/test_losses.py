"""Preference losses against the published formulas, written out plainly in float64 Python.

Each oracle below uses ``math.log``/``math.exp`` on Python floats, one example at a time, in the
most literal form of the paper's formula (with a stable branch only where the literal form
overflows in float64 itself). The library's vectorised, stable versions must agree with them.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcourse import losses
from rlcourse.losses import (
    OBJECTIVES,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    log1mexp,
    orpo_log_odds,
    orpo_loss,
    preference_metrics,
    prospect_value,
    prospect_weight,
    rdpo_loss,
    simpo_loss,
)

# ---------------------------------------------------------------------------------------------
# Plain float64 oracles
# ---------------------------------------------------------------------------------------------


def log_sigmoid(x: float) -> float:
    # log σ(x) = -log(1 + e^{-x}); the two branches are the same formula rearranged so that
    # float64 itself does not overflow for |x| in the hundreds.
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def dpo_oracle(pc, pr, rc, rr, beta, eps=0.0):
    h = (pc - rc) - (pr - rr)
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


def ipo_oracle(pc, pr, rc, rr, tau, lc=None, lr=None):
    dw, dl = pc - rc, pr - rr
    if lc is not None:
        dw, dl = dw / lc, dl / lr
    return (dw - dl - 1 / (2 * tau)) ** 2


def rdpo_oracle(pc, pr, rc, rr, lc, lr, beta, alpha):
    # Bradley-Terry on r(y) = beta log(pi/pi_ref) + alpha |y| (+ beta log Z, which cancels).
    r_w = beta * (pc - rc) + alpha * lc
    r_l = beta * (pr - rr) + alpha * lr
    return -log_sigmoid(r_w - r_l)


def kto_oracle(p, r, desirable, z0, beta, lam_d, lam_u):
    reward = p - r
    if desirable:
        return lam_d - lam_d * sigmoid(beta * (reward - z0))
    return lam_u - lam_u * sigmoid(beta * (z0 - reward))


def orpo_oracle(pc, pr, lc, lr, lam):
    mean_w, mean_l = pc / lc, pr / lr
    p_w, p_l = math.exp(mean_w), math.exp(mean_l)
    log_odds_w = math.log(p_w / (1 - p_w))
    log_odds_l = math.log(p_l / (1 - p_l))
    return -mean_w - lam * log_sigmoid(log_odds_w - log_odds_l)


def simpo_oracle(pc, pr, lc, lr, beta, gamma, normalize=True):
    if normalize:
        return -log_sigmoid(beta / lc * pc - beta / lr * pr - gamma)
    return -log_sigmoid(beta * pc - beta * pr - gamma)


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    n = 64
    lc = rng.integers(1, 40, size=n).astype(float)
    lr = rng.integers(1, 40, size=n).astype(float)
    # Summed log-probs: per-token means between -6 and -0.01, times the length.
    pc = -rng.uniform(0.01, 6.0, size=n) * lc
    pr = -rng.uniform(0.01, 6.0, size=n) * lr
    rc = pc + rng.normal(0, 3, size=n)
    rr = pr + rng.normal(0, 3, size=n)
    return pc, pr, rc, rr, lc, lr


# ---------------------------------------------------------------------------------------------
# Agreement with the formulas, within 1e-5
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.1), (2.0, 0.3)])
def test_dpo_matches_formula(batch, beta, eps):
    pc, pr, rc, rr, _, _ = batch
    got = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, label_smoothing=eps)
    want = [dpo_oracle(*v, beta, eps) for v in zip(pc, pr, rc, rr, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-8)
    assert got.shape == (len(pc),)


def test_dpo_in_float32_matches_float64_formula(batch):
    pc, pr, rc, rr, _, _ = batch
    got = dpo_loss(*(t(x, torch.float32) for x in (pc, pr, rc, rr)), beta=0.1)
    want = [dpo_oracle(*v, 0.1) for v in zip(pc, pr, rc, rr, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_dpo_is_ln2_when_policy_equals_reference(batch):
    pc, pr, _, _, _, _ = batch
    for eps in (0.0, 0.2):
        got = dpo_loss(t(pc), t(pr), t(pc), t(pr), beta=0.1, label_smoothing=eps)
        np.testing.assert_array_equal(got.numpy(), np.full(len(pc), math.log(2.0)))


def test_dpo_rejects_label_smoothing_half():
    z = torch.zeros(2)
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, label_smoothing=0.5)


@pytest.mark.parametrize("use_lengths", [False, True])
def test_ipo_matches_formula(batch, use_lengths):
    pc, pr, rc, rr, lc, lr = batch
    if use_lengths:
        got = ipo_loss(t(pc), t(pr), t(rc), t(rr), tau=0.1, chosen_lengths=t(lc),
                       rejected_lengths=t(lr))
        want = [ipo_oracle(*v, 0.1, a, b) for *v, a, b in zip(pc, pr, rc, rr, lc, lr,
                                                               strict=True)]
    else:
        got = ipo_loss(t(pc), t(pr), t(rc), t(rr), tau=0.1)
        want = [ipo_oracle(*v, 0.1) for v in zip(pc, pr, rc, rr, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-8)


def test_ipo_is_minimal_at_the_target_margin():
    # h = 1/(2 tau) exactly: loss 0.
    tau = 0.25
    got = ipo_loss(t([2.0]), t([0.0]), t([0.0]), t([0.0]), tau=tau)
    assert got.item() == 0.0


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.01), (0.5, 0.05)])
def test_rdpo_matches_formula_and_sign(batch, beta, alpha):
    pc, pr, rc, rr, lc, lr = batch
    got = rdpo_loss(t(pc), t(pr), t(rc), t(rr), t(lc), t(lr), beta=beta, alpha=alpha)
    want = [rdpo_oracle(*v, beta, alpha) for v in zip(pc, pr, rc, rr, lc, lr, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-8)


def test_rdpo_sign_longer_chosen_needs_smaller_margin():
    # Same log-ratios; a longer chosen answer already "explains" the preference by length,
    # so the loss is smaller than DPO's, and the gradient on the policy is smaller too.
    z = torch.zeros(1, dtype=torch.float64)
    h_w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    longer = rdpo_loss(h_w, z, z, z, t([30.0]), t([10.0]), beta=0.1, alpha=0.05)
    longer.backward()
    grad_longer = h_w.grad.clone()
    h_w.grad = None
    dpo = dpo_loss(h_w, z, z, z, beta=0.1)
    dpo.backward()
    grad_dpo = h_w.grad.clone()
    assert longer.item() < dpo.item()
    assert abs(grad_longer.item()) < abs(grad_dpo.item())
    # alpha = 0 is DPO exactly.
    same = rdpo_loss(h_w, z, z, z, t([30.0]), t([10.0]), beta=0.1, alpha=0.0)
    assert same.item() == pytest.approx(dpo.item(), abs=1e-15)


@pytest.mark.parametrize("beta,lam_d,lam_u", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (1.0, 2.0, 0.5)])
def test_kto_matches_formula(batch, beta, lam_d, lam_u):
    pc, _, rc, _, _, _ = batch
    rng = np.random.default_rng(1)
    desirable = rng.random(len(pc)) < 0.5
    z0 = 0.7
    got = kto_loss(t(pc), t(rc), torch.tensor(desirable), z0, beta=beta,
                   desirable_weight=lam_d, undesirable_weight=lam_u)
    want = [kto_oracle(p, r, bool(d), z0, beta, lam_d, lam_u)
            for p, r, d in zip(pc, rc, desirable, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-8)


def test_kto_reference_point_is_clamped_mean_and_detached():
    p = torch.tensor([-3.0, -5.0, -1.0], dtype=torch.float64, requires_grad=True)
    r = t([-4.0, -5.5, -0.5])
    z0 = kto_reference_point(p, r)
    assert z0.item() == pytest.approx(((1.0) + (0.5) + (-0.5)) / 3)
    assert not z0.requires_grad
    # Negative mean log-ratio: a KL cannot be negative, so z0 = 0.
    assert kto_reference_point(t([-5.0, -5.0]), t([-4.0, -4.5])).item() == 0.0


def test_kto_gradient_does_not_flow_through_reference_point():
    p = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True)
    r = t([-3.5, -2.5])
    z0 = kto_reference_point(p.roll(1), r.roll(1))
    kto_loss(p, r, torch.tensor([True, False]), z0, beta=1.0).sum().backward()
    # d/dp of lam(1 - σ(β(p - r - z0))) with z0 held fixed
    s = [sigmoid(0.5 - z0.item()), sigmoid(z0.item() - 0.5)]
    want = [-s[0] * (1 - s[0]), s[1] * (1 - s[1])]
    np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-10)


def test_orpo_matches_formula(batch):
    pc, pr, _, _, lc, lr = batch
    for lam in (0.1, 1.0):
        got = orpo_loss(t(pc), t(pr), t(lc), t(lr), lam=lam)
        want = [orpo_oracle(*v, lam) for v in zip(pc, pr, lc, lr, strict=True)]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-8)


def test_orpo_float32_matches_float64_formula(batch):
    pc, pr, _, _, lc, lr = batch
    got = orpo_loss(*(t(x, torch.float32) for x in (pc, pr, lc, lr)), lam=0.1)
    want = [orpo_oracle(*v, 0.1) for v in zip(pc, pr, lc, lr, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_orpo_half_precision_input_is_computed_in_float32():
    x = torch.tensor([-1e-3, -2.0], dtype=torch.bfloat16)
    assert orpo_log_odds(x).dtype == torch.float32
    assert log1mexp(x).dtype == torch.float32


def test_log1mexp_matches_formula_on_both_branches():
    xs = [-1e-300, -1e-12, -1e-6, -0.3, -math.log(2), -0.7, -1.0, -5.0, -40.0, -800.0]
    got = log1mexp(t(xs)).numpy()
    # Literal log(1 - e^x) is inaccurate near 0, so the oracle uses the series there:
    # 1 - e^x = -x (1 + x/2 + x^2/6 + ...) for tiny |x|; and for very negative x,
    # log(1 - u) = -u - u^2/2 - ... with u = e^x.
    want = []
    for x in xs:
        if abs(x) < 1e-4:
            want.append(math.log(-x) + math.log1p(x / 2 + x * x / 6))
        elif x < -30:
            want.append(-math.exp(x) - math.exp(2 * x) / 2)
        else:
            want.append(math.log(1 - math.exp(x)))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.0), (10.0, 5.0)])
def test_simpo_matches_formula(batch, beta, gamma):
    pc, pr, _, _, lc, lr = batch
    for normalize in (True, False):
        got = simpo_loss(t(pc), t(pr), t(lc), t(lr), beta=beta, gamma=gamma,
                         length_normalize=normalize)
        want = [simpo_oracle(*v, beta, gamma, normalize)
                for v in zip(pc, pr, lc, lr, strict=True)]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-8)


def test_bradley_terry_matches_formula():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 5, 50), rng.normal(0, 5, 50)
    got = bradley_terry_loss(t(a), t(b))
    want = [-log_sigmoid(x - y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # Only differences matter.
    np.testing.assert_allclose(bradley_terry_loss(t(a) + 7, t(b) + 7).numpy(), want, rtol=1e-10)


def test_prospect_value_matches_tversky_kahneman():
    zs = [-100.0, -1.0, 0.0, 1.0, 60.0, 100.0]
    got = prospect_value(t(zs)).numpy()
    want = [z**0.88 if z >= 0 else -2.25 * (-z) ** 0.88 for z in zs]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # The slides' gamble: 80% of $100 vs a sure $60. Expected value prefers the gamble, and so
    # does the value function alone at alpha = 0.88 (0.8 * 100^0.88 > 60^0.88); the sure thing
    # wins once probabilities are weighted as people weight them (certainty effect).
    v100, v60 = 100.0**0.88, 60.0**0.88
    assert 0.8 * 100 > 60 and 0.8 * v100 > v60
    w = 0.8**0.61 / (0.8**0.61 + 0.2**0.61) ** (1 / 0.61)
    assert prospect_weight(0.8).item() == pytest.approx(w, rel=1e-12)
    assert w * v100 < v60


# ---------------------------------------------------------------------------------------------
# Finite values and gradients for every log-prob from -1e4 to 0
# ---------------------------------------------------------------------------------------------

EXTREMES = [-1e4, -1e3, -50.0, -1.0, -1e-3, -1e-8, -1e-12, 0.0]


def _all_losses(pc, pr, rc, rr, lc, lr):
    d = torch.tensor([True, False] * (len(pc) // 2))
    z0 = kto_reference_point(pc.roll(1), rc.roll(1))
    return {
        "dpo": dpo_loss(pc, pr, rc, rr, beta=0.1),
        "cdpo": dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1),
        "ipo": ipo_loss(pc, pr, rc, rr, tau=0.1),
        "ipo_mean": ipo_loss(pc, pr, rc, rr, 0.1, lc, lr),
        "rdpo": rdpo_loss(pc, pr, rc, rr, lc, lr),
        "kto": kto_loss(pc, rc, d, z0),
        "orpo": orpo_loss(pc, pr, lc, lr, lam=1.0),
        "simpo": simpo_loss(pc, pr, lc, lr),
        "simpo_noln": simpo_loss(pc, pr, lc, lr, length_normalize=False),
        "bt": bradley_terry_loss(pc, pr),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_loss_finite_with_finite_gradients_at_extremes(dtype):
    grid = [(a, b) for a in EXTREMES for b in EXTREMES]
    pc = torch.tensor([a for a, _ in grid], dtype=dtype, requires_grad=True)
    pr = torch.tensor([b for _, b in grid], dtype=dtype, requires_grad=True)
    rc = torch.tensor([b for _, b in grid], dtype=dtype, requires_grad=True)
    rr = torch.tensor([a for a, _ in grid], dtype=dtype, requires_grad=True)
    # Length 1, so that the mean log-prob reaches -1e-12 and 0 exactly (ORPO's hard case).
    ones = torch.ones(len(grid), dtype=dtype)
    for name, loss in _all_losses(pc, pr, rc, rr, ones, ones).items():
        assert torch.isfinite(loss).all(), name
        for x in (pc, pr, rc, rr):
            x.grad = None
        loss.sum().backward()
        assert pc.grad is not None, name
        for x in (pc, pr, rc, rr):
            assert x.grad is None or torch.isfinite(x.grad).all(), name


def test_orpo_is_finite_when_the_model_is_certain():
    # p(y_w) = p(y_l) = 1 (mean log-prob 0 exactly), and the near-certain cases.
    for w, l in [(0.0, 0.0), (0.0, -1.0), (-1.0, 0.0), (-1e-12, -1e-8), (-1e-8, 0.0)]:
        pc = torch.tensor([w], requires_grad=True)
        pr = torch.tensor([l], requires_grad=True)
        loss = orpo_loss(pc, pr, torch.ones(1), torch.ones(1), lam=0.1)
        loss.backward()
        assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all()
        assert torch.isfinite(pr.grad).all()
        # Pushing the rejected answer down always lowers the loss: the gradient sign survives.
        assert pr.grad.item() > 0


def test_orpo_log_odds_matches_formula_near_zero():
    xs = [-1e-8, -1e-5, -0.01, -1.0, -10.0]
    got = orpo_log_odds(t(xs)).numpy()
    want = [x - (math.log(-x) + math.log1p(x / 2 + x * x / 6)) if abs(x) < 1e-4
            else math.log(math.exp(x) / (1 - math.exp(x))) for x in xs]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_lengths_must_be_positive():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="positive"):
        simpo_loss(z, z, torch.tensor([1, 0]), torch.ones(2))
    with pytest.raises(ValueError, match="chosen_lengths"):
        orpo_loss(z, z, None, torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

logp = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=st.floats(0.01, 10.0))
def test_dpo_swap_symmetry_and_bounds(pc, pr, rc, rr, beta):
    # L(h) + ... : swapping chosen and rejected turns -log σ(βh) into -log σ(-βh), and
    # σ(βh) + σ(-βh) = 1.
    a = dpo_loss(t([pc]), t([pr]), t([rc]), t([rr]), beta=beta).item()
    b = dpo_loss(t([pr]), t([pc]), t([rr]), t([rc]), beta=beta).item()
    assert a >= 0 and b >= 0 and math.isfinite(a) and math.isfinite(b)
    assert math.exp(-a) + math.exp(-b) == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(pc=logp, pr=logp, lc=st.integers(1, 500), lr=st.integers(1, 500))
def test_orpo_finite_and_not_below_nll(pc, pr, lc, lr):
    loss = orpo_loss(t([pc]), t([pr]), t([lc]), t([lr]), lam=0.5).item()
    assert math.isfinite(loss)
    assert loss >= -pc / lc - 1e-12  # the odds-ratio term is non-negative


@settings(max_examples=200, deadline=None)
@given(p=logp, r=logp, z0=st.floats(0.0, 100.0), beta=st.floats(0.01, 5.0),
       desirable=st.booleans())
def test_kto_bounded_by_weights(p, r, z0, beta, desirable):
    loss = kto_loss(t([p]), t([r]), torch.tensor([desirable]), z0, beta=beta,
                    desirable_weight=1.5, undesirable_weight=0.5).item()
    assert 0.0 <= loss <= (1.5 if desirable else 0.5)


@settings(max_examples=100, deadline=None)
@given(pc=logp, pr=logp, shift=st.floats(-100.0, 100.0))
def test_simpo_without_ln_sees_only_differences(pc, pr, shift):
    a = simpo_loss(t([pc]), t([pr]), t([1.0]), t([1.0]), length_normalize=False).item()
    b = simpo_loss(t([pc + shift]), t([pr + shift]), t([3.0]), t([9.0]),
                   length_normalize=False).item()
    assert a == pytest.approx(b, rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Metrics and the registry
# ---------------------------------------------------------------------------------------------


def test_preference_metrics_by_hand():
    m = preference_metrics(t([-10.0, -20.0]), t([-12.0, -18.0]), t([-11.0, -20.0]),
                           t([-11.0, -19.0]), scale=0.5)
    # chosen rewards 0.5*(1, 0) = (0.5, 0); rejected 0.5*(-1, 1) = (-0.5, 0.5)
    assert m["rewards/chosen"] == pytest.approx(0.25)
    assert m["rewards/rejected"] == pytest.approx(0.0)
    assert m["rewards/margins"] == pytest.approx(0.25)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-15.0)
    assert m["logps/rejected"] == pytest.approx(-15.0)
    # Reference-free (SimPO): rewards are beta times the mean log-prob.
    m = preference_metrics(t([-10.0]), t([-12.0]), scale=2.0, chosen_lengths=t([5.0]),
                           rejected_lengths=t([3.0]))
    assert m["rewards/chosen"] == pytest.approx(-4.0)
    assert m["rewards/rejected"] == pytest.approx(-8.0)
    assert m["rewards/accuracies"] == 1.0
    assert m["logps/rejected"] == pytest.approx(-4.0)


def test_registry_is_the_objectives_table():
    assert {"dpo", "ipo", "rdpo", "kto", "orpo", "simpo", "bt"} <= set(OBJECTIVES)
    assert [k for k, o in OBJECTIVES.items() if not o.needs_reference] == ["orpo", "simpo", "bt"]
    assert OBJECTIVES["kto"].data_format == "unpaired"
    assert OBJECTIVES["simpo"].reduction == "mean" and OBJECTIVES["dpo"].reduction == "sum"
    for key, obj in OBJECTIVES.items():
        assert obj.loss.__module__ == losses.__name__, key
        assert obj.latex and obj.paper, key
        assert obj.hyperparameters is losses.DEFAULTS[key], key  # one source


def _keyword_defaults(fn, skip=()):
    """A function's keyword defaults that are hyperparameters (numbers or flags, not None)."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if k not in skip and p.default is not inspect.Parameter.empty
            and p.default is not None}


def test_every_loss_functions_defaults_are_the_objectives_table():
    from rlcourse.preference import LOSS_FNS, make_loss_fn
    from rlcourse.recipes import loss_signature
    from rlcourse.recipes import method as recipe_method

    assert set(LOSS_FNS) | {"bt"} == set(losses.DEFAULTS) == set(OBJECTIVES)
    for method, trainer_fn in LOSS_FNS.items():
        table = OBJECTIVES[method].hyperparameters
        # The trainer's loss function takes exactly the table's hyperparameters, same defaults,
        # same names (IPO's tau and ORPO's lam are not called beta on the way).
        assert _keyword_defaults(trainer_fn, ("model", "batch")) == table, method
        # The pure loss takes a subset (IPO's length_normalize is the trainer's: it passes
        # lengths or None), with the same defaults.
        pure = _keyword_defaults(OBJECTIVES[method].loss)
        assert pure and pure.items() <= table.items(), method
        # A recipe's loss section defaults come from the same signature.
        recipe = {k: p.default for k, p in loss_signature(recipe_method(method)).items()}
        assert recipe == table, method
        assert make_loss_fn(method).keywords == {}  # nothing bound: the defaults apply
    for fn in (losses.implicit_rewards, losses.preference_metrics):
        assert set(_keyword_defaults(fn).values()) == {losses.DEFAULTS["dpo"]["beta"]}, fn


def test_no_hyperparameter_default_is_written_twice():
    """No loss function (losses.py's, the trainers' in preference.py, the metrics) spells a
    hyperparameter's default as a literal: each reads DEFAULTS, so a default is one edit."""
    import ast

    from rlcourse import preference

    names = {k for hp in losses.DEFAULTS.values() for k in hp} | {"scale"}
    functions = ({o.loss.__name__ for o in OBJECTIVES.values()}
                 | {f.__name__ for f in preference.LOSS_FNS.values()}
                 | {"implicit_rewards", "preference_metrics"})
    for module in (losses, preference):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name not in functions:
                continue
            args = node.args.args + node.args.kwonlyargs
            defaults = [*([None] * (len(node.args.args) - len(node.args.defaults))),
                        *node.args.defaults, *node.args.kw_defaults]
            for arg, default in zip(args, defaults, strict=True):
                if arg.arg in names and isinstance(default, ast.Constant):
                    raise AssertionError(f"{module.__name__}.{node.name}: {arg.arg} = "
                                         f"{default.value!r} is a literal; read DEFAULTS")


def test_ipo_and_orpo_log_rewards_scaled_by_their_own_hyperparameter():
    """rewards/* of IPO are tau times the (per-token) log-ratio and ORPO's lam times the mean
    log-prob (as TRL logs them), so doubling tau or lam doubles them."""
    from rlcourse.data import pad_collate
    from rlcourse.models import build_model, build_tokenizer
    from rlcourse.preference import ipo_loss_fn, orpo_loss_fn, policy_logps, tokenize_pairs

    pairs = [{"prompt": "rain is", "chosen": "wet .", "rejected": "dry and hot ."}]
    tok = build_tokenizer(["rain is wet dry and hot ."])
    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    batch = pad_collate(tokenize_pairs(tok, pairs))
    with torch.no_grad():
        pc, pr, lc, lr = policy_logps(model, batch)
        for lam in (0.1, 0.2):
            _, m = orpo_loss_fn(model, batch, lam=lam)
            assert m["rewards/chosen"] == pytest.approx(lam * (pc / lc).item(), rel=1e-5)
            assert m["rewards/rejected"] == pytest.approx(lam * (pr / lr).item(), rel=1e-5)
        batch["reference_chosen_logps"] = pc - 1.0
        batch["reference_rejected_logps"] = pr + 2.0
        for tau in (0.1, 0.2):
            _, m = ipo_loss_fn(model, batch, tau=tau)
            assert m["rewards/chosen"] == pytest.approx(tau * 1.0 / lc.item(), rel=1e-4)
            assert m["rewards/rejected"] == pytest.approx(tau * -2.0 / lr.item(), rel=1e-4)


def test_kl_regularized_optimum_is_the_closed_form_and_beats_other_policies():
    from rlcourse.losses import kl_regularized_objective, kl_regularized_optimum

    rng = np.random.default_rng(4)
    ref = rng.dirichlet(np.ones(6))
    r = rng.normal(0, 1, 6)
    beta = 0.7
    want = ref * np.exp(r / beta)
    want /= want.sum()
    got = kl_regularized_optimum(t(np.log(ref)), t(r), beta).exp().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # J(pi*) = beta log Z, and every other policy scores lower.
    best = kl_regularized_objective(t(np.log(got)), t(np.log(ref)), t(r), beta).item()
    assert best == pytest.approx(beta * math.log(float((ref * np.exp(r / beta)).sum())))
    for _ in range(50):
        other = rng.dirichlet(np.ones(6))
        j = sum(o * ri - beta * o * math.log(o / q) for o, ri, q in zip(other, r, ref,
                                                                       strict=True))
        assert kl_regularized_objective(t(np.log(other)), t(np.log(ref)), t(r), beta).item() \
            == pytest.approx(j)
        assert j < best
