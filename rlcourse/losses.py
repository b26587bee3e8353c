"""Preference losses without RL: DPO, cDPO, IPO, R-DPO, SLiC-HF's hinge, robust DPO, KTO, ORPO,
SimPO and Bradley–Terry.

Layer 1 (pure math). Every loss is a function of *per-sequence* log-probabilities, tensors of
shape ``[batch]``, and returns the *per-example* loss, shape ``[batch]``; the caller averages.
Nothing here runs a model: :mod:`rlcourse.preference` turns a batch of text into these inputs.

Notation (as in the book):

* ``log π(y|x)`` is the **sum** of the completion's token log-probs (prompt and padding masked);
  ``|y|`` is its number of tokens and ``ℓ̄(y) = log π(y|x) / |y|`` is the **mean** (the log of the
  geometric-mean token probability).
* ``Δ(y) = log πθ(y|x) − log πref(y|x)`` is the log-ratio; ``h = Δ(y_w) − Δ(y_l)``.
* Subscript ``w`` is the chosen (preferred, "winning") answer and ``l`` the rejected one.

All losses are written with ``logsigmoid``/``log1p``/``expm1`` so that no finite input yields a
NaN or an infinite gradient; ORPO's ``log(1 − p)`` goes through :func:`log1mexp` in at least
float32.

:data:`OBJECTIVES` is the slides' table of objectives as code: for each method the loss
function, whether it needs a reference model, the data format, the log-prob reduction, its
defaults and the LaTeX of its objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULTS",
    "OBJECTIVES",
    "Objective",
    "bradley_terry_loss",
    "dpo_loss",
    "hinge_loss",
    "implicit_rewards",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "kl_regularized_objective",
    "kl_regularized_optimum",
    "log1mexp",
    "orpo_log_odds",
    "orpo_loss",
    "preference_metrics",
    "prospect_value",
    "prospect_weight",
    "rdpo_loss",
    "robust_dpo_loss",
    "simpo_loss",
]


#: Every preference method's hyperparameter defaults, said once: the loss functions here, the
#: trainers' loss functions (:mod:`rlcourse.preference`), recipes and :data:`OBJECTIVES` read
#: them. Each hyperparameter keeps its own name (IPO's ``tau``, ORPO's ``lam``) everywhere.
DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    "ipo": {"tau": 0.1, "length_normalize": True},
    "rdpo": {"beta": 0.1, "alpha": 0.01},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "orpo": {"lam": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0, "length_normalize": True},
    "hinge": {"beta": 0.1},
    # Robust DPO's assumed flip rate: TRL's default label_smoothing is 0.0, where the loss is
    # plain DPO; 0.1 (one label in ten flipped) makes the method differ from DPO by default.
    "robust": {"beta": 0.1, "label_smoothing": 0.1},
    "bt": {},
}


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half precision to float32; keep float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _lengths(lengths: Tensor | None, like: Tensor, name: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"{name} is required (the number of completion tokens per example)")
    lengths = torch.as_tensor(lengths, device=like.device).to(like.dtype)
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} must be positive: an empty completion has no mean log-prob")
    return lengths


# --------------------------------------------------------------------------------------------
# The KL-regularised objective DPO starts from (categorical answers, one prompt)
# --------------------------------------------------------------------------------------------


def kl_regularized_objective(
    logprobs: Tensor, reference_logprobs: Tensor, rewards: Tensor, beta: float
) -> Tensor:
    r"""RLHF's objective for one prompt with a finite set of answers ``y`` (last axis).

    .. math:: J(\pi) = \sum_y \pi(y)\,r(y) - \beta \sum_y \pi(y)
                       \log\frac{\pi(y)}{\pi_{ref}(y)}

    ``logprobs`` and ``reference_logprobs`` are log-probabilities over the answers. Answers the
    policy never gives (``π(y) = 0``) contribute nothing.
    """
    p = logprobs.exp()
    kl_terms = torch.where(p > 0, p * (logprobs - reference_logprobs), torch.zeros_like(p))
    return (p * rewards).sum(-1) - beta * kl_terms.sum(-1)


def kl_regularized_optimum(reference_logprobs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    r"""Log-probabilities of the policy that maximises :func:`kl_regularized_objective`.

    .. math:: \pi^*(y) = \frac{1}{Z}\,\pi_{ref}(y)\,e^{r(y)/\beta}, \qquad
              Z = \sum_y \pi_{ref}(y)\,e^{r(y)/\beta}

    so :math:`r(y) = \beta\log\frac{\pi^*(y)}{\pi_{ref}(y)} + \beta\log Z`: the reward is
    the policy's log-ratio up to a constant that Bradley–Terry never sees (DPO's key step).
    Computed as ``log π_ref + r/β − logsumexp(log π_ref + r/β)``.
    """
    scores = reference_logprobs + rewards / beta
    return scores - torch.logsumexp(scores, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# DPO and its variants
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = DEFAULTS["dpo"]["beta"],
    label_smoothing: float = DEFAULTS["dpo"]["label_smoothing"],
) -> Tensor:
    r"""DPO loss per example (Rafailov et al., 2023), with cDPO label smoothing.

    .. math::
        h = \big(\log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)\big)
          - \big(\log\pi_\theta(y_l|x) - \log\pi_{ref}(y_l|x)\big)

        L = -(1-\varepsilon)\,\log\sigma(\beta h) - \varepsilon\,\log\sigma(-\beta h)

    ``ε = label_smoothing = 0`` is plain DPO, ``-log σ(βh)``. With ``ε > 0`` (conservative DPO)
    each label is assumed flipped with probability ε. At ``πθ = πref`` we have ``h = 0`` and the
    loss is ``ln 2`` whatever ε is. Inputs: summed log-probs, shape ``[batch]``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    logits = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits
    )


def _margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
            reference_chosen_logps: Tensor, reference_rejected_logps: Tensor) -> Tensor:
    """DPO's log-ratio margin ``h`` (:func:`dpo_loss` writes it out, as chapter 9 shows it);
    the losses of the DPO family added later read it from here."""
    return (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = DEFAULTS["hinge"]["beta"],
) -> Tensor:
    r"""SLiC-HF's hinge (calibration) loss per example (Zhao et al., 2023), in TRL's form
    (``loss_type="hinge"``).

    .. math::
        L = \max(0,\ 1 - \beta h) = \beta \max(0,\ \delta - h), \quad \delta = 1/\beta

    with ``h`` DPO's log-ratio margin (:func:`dpo_loss`). SLiC-HF writes
    ``max(0, δ - log πθ(y_w|x) + log πθ(y_l|x))``, a margin δ on the policy's own log-likelihood
    gap, plus a regulariser toward the SFT targets; TRL (and this function) take the gap relative
    to the reference, ``h``, and put ``β`` in front, so ``β`` is both the inverse margin
    (``δ = 1/β``) and a scale of the loss. With the reference log-probs set to 0 it is SLiC's
    calibration term, times β. Unlike DPO a pair whose margin reaches ``βh >= 1`` gives no
    gradient at all (DPO keeps pushing, with weight ``σ(-βh)``). At ``πθ = πref`` the loss is 1.
    Inputs: summed log-probs, shape ``[batch]``.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps)
    return torch.relu(1.0 - beta * h)


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = DEFAULTS["robust"]["beta"],
    label_smoothing: float = DEFAULTS["robust"]["label_smoothing"],
) -> Tensor:
    r"""Robust DPO (rDPO) loss per example (Chowdhury et al., 2024), TRL's ``loss_type="robust"``.

    .. math::
        L = \frac{(1-\varepsilon)\,(-\log\sigma(\beta h))
                  - \varepsilon\,(-\log\sigma(-\beta h))}{1 - 2\varepsilon}

    ``ε = label_smoothing`` in [0, 0.5) is the assumed rate at which preference labels are
    flipped (TRL reads the same ``label_smoothing``). The loss is an unbiased estimate of the
    clean-label DPO loss: averaged over a label flipped with probability ε, it equals
    ``-log σ(βh)`` of the true label. Conservative DPO (cDPO, Mitchell 2023; :func:`dpo_loss`
    with ``label_smoothing``) instead ADDS the flipped term, ``(1-ε)(-log σ(βh)) +
    ε(-log σ(-βh))``: a smoothed target whose minimum lies at a finite margin
    ``σ(βh) = 1 - ε``, where it stops pushing; rDPO's gradient in ``h`` is
    ``-β[(1-ε)σ(-βh) + εσ(βh)]/(1-2ε) < 0`` everywhere, so it keeps raising the margin, and the
    loss is not bounded below (it goes negative for large ``βh``). ``ε = 0`` is plain DPO; at
    ``πθ = πref`` the loss is ``ln 2`` whatever ε is. Inputs: summed log-probs, shape ``[batch]``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                            reference_rejected_logps)
    eps = label_smoothing
    return ((1.0 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    tau: float = DEFAULTS["ipo"]["tau"],
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    r"""IPO loss per example (Azar et al., 2023): a squared loss that targets a finite margin.

    .. math::  L = \Big(h - \frac{1}{2\tau}\Big)^2

    With ``chosen_lengths``/``rejected_lengths`` the two log-ratios are averaged per token first,
    ``h = Δ(y_w)/|y_w| − Δ(y_l)/|y_l|`` (what TRL does); without them they are sums (the
    original DPO repository). DPO's ``−log σ`` keeps pushing ``h`` to infinity on
    deterministic preferences; IPO's square stops at the target ``1/(2τ)``.
    """
    delta_w = policy_chosen_logps - reference_chosen_logps
    delta_l = policy_rejected_logps - reference_rejected_logps
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        delta_w = delta_w / _lengths(chosen_lengths, delta_w, "chosen_lengths")
        delta_l = delta_l / _lengths(rejected_lengths, delta_l, "rejected_lengths")
    return (delta_w - delta_l - 1.0 / (2.0 * tau)) ** 2


def rdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = DEFAULTS["rdpo"]["beta"],
    alpha: float = DEFAULTS["rdpo"]["alpha"],
) -> Tensor:
    r"""R-DPO loss per example (Park et al., 2024): DPO with a length penalty in the objective.

    From :math:`\max_\pi \mathbb{E}[r(x,y) - \alpha|y|] - \beta\,\mathrm{KL}(\pi\|\pi_{ref})`
    the optimal policy is :math:`\pi^* \propto \pi_{ref}\exp((r - \alpha|y|)/\beta)`, hence
    :math:`r = \beta\log\frac{\pi^*}{\pi_{ref}} + \alpha|y| + \beta\log Z`, and Bradley–Terry on
    :math:`r(y_w) - r(y_l)` gives

    .. math::  L = -\log\sigma\big(\beta h + \alpha(|y_w| - |y_l|)\big)

    The sign is **plus** (the SimPO paper's table prints a minus): when the chosen answer is the
    longer one, the length term already explains part of the preference, so the policy is
    pushed *less* towards it; when the chosen answer is shorter it is pushed more. ``α = 0``
    is DPO.
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    length_gap = _lengths(chosen_lengths, h, "chosen_lengths") - _lengths(
        rejected_lengths, h, "rejected_lengths"
    )
    return -F.logsigmoid(beta * h + alpha * length_gap)


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def prospect_value(
    z: Tensor | float, alpha: float = 0.88, lam: float = 2.25, z0: float = 0.0
) -> Tensor:
    r"""Kahneman–Tversky value function (Tversky and Kahneman, 1992).

    .. math::
        v(z) = \begin{cases} (z - z_0)^\alpha & z \ge z_0 \\
                             -\lambda (z_0 - z)^\alpha & z < z_0 \end{cases}

    ``α < 1``: diminishing sensitivity (concave for gains, convex for losses); ``λ > 1``: loss
    aversion (a loss hurts more than an equal gain pleases). Defaults α = 0.88, λ = 2.25.
    """
    z = torch.as_tensor(z, dtype=torch.float64) - z0
    gain = z.clamp(min=0.0) ** alpha
    loss = -lam * (-z).clamp(min=0.0) ** alpha
    return torch.where(z >= 0, gain, loss)


def prospect_weight(p: Tensor | float, gamma: float = 0.61) -> Tensor:
    r"""Probability weighting of cumulative prospect theory (Tversky and Kahneman, 1992).

    .. math:: w(p) = \frac{p^\gamma}{\big(p^\gamma + (1 - p)^\gamma\big)^{1/\gamma}}

    People overweight small probabilities and underweight large ones (γ = 0.61 for gains):
    a gamble's prospect value is :math:`\sum_i w(p_i)\,v(z_i)`. The *certainty effect* of the
    slides' gamble (a sure $60 over 80% of $100) needs this weighting: with α = 0.88 the value
    function alone still prefers the gamble.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    num = p**gamma
    return num / (num + (1.0 - p) ** gamma) ** (1.0 / gamma)


def kto_reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    r"""KTO's reference point :math:`z_0`, an estimate of :math:`KL(\pi_\theta\|\pi_{ref})`.

    .. math:: z_0 = \max\Big(0,\ \frac{1}{m}\sum_{j=1}^m
                \big[\log\pi_\theta(y'_j|x_j) - \log\pi_{ref}(y'_j|x_j)\big]\Big)

    computed on *mismatched* pairs (prompt ``x_j`` with the completion of another example,
    ``y'_j = y_{j-1}``), detached: no gradient flows through the reference point. The mean of
    the log-ratios can be negative on a finite sample although a KL cannot, hence the clamp.
    Returns a 0-d tensor.
    """
    return (policy_kl_logps - reference_kl_logps).detach().mean().clamp(min=0.0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float,
    beta: float = DEFAULTS["kto"]["beta"],
    desirable_weight: float = DEFAULTS["kto"]["desirable_weight"],
    undesirable_weight: float = DEFAULTS["kto"]["undesirable_weight"],
) -> Tensor:
    r"""KTO loss per example (Ethayarajh et al., 2024); needs no pairs.

    With :math:`r = \log\pi_\theta(y|x) - \log\pi_{ref}(y|x)` and the reference point :math:`z_0`
    (:func:`kto_reference_point`):

    .. math::
        v(x, y) = \begin{cases} \lambda_D\,\sigma(\beta(r - z_0)) & y\ \text{desirable} \\
                                 \lambda_U\,\sigma(\beta(z_0 - r)) & y\ \text{undesirable}
                  \end{cases}
        \qquad L = \lambda_y - v(x, y)

    that is :math:`\lambda_D(1 - \sigma(\beta(r - z_0)))` for a desirable answer and
    :math:`\lambda_U(1 - \sigma(\beta(z_0 - r)))` for an undesirable one. ``desirable`` is a
    boolean tensor ``[batch]``. Computed as ``λ·σ(−x)`` with ``x`` the argument above, which is
    the same number and never subtracts two values close to 1.
    """
    r = policy_logps - reference_logps
    desirable = torch.as_tensor(desirable, device=r.device).bool()
    z0 = torch.as_tensor(reference_point, dtype=r.dtype, device=r.device)
    # 1 - σ(x) = σ(-x): one sigmoid, no cancellation.
    desirable_loss = desirable_weight * torch.sigmoid(-beta * (r - z0))
    undesirable_loss = undesirable_weight * torch.sigmoid(-beta * (z0 - r))
    return torch.where(desirable, desirable_loss, undesirable_loss)


# --------------------------------------------------------------------------------------------
# ORPO
# --------------------------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    r"""``log(1 − exp(x))`` for ``x ≤ 0``, accurately (Mächler, 2012).

    .. math:: \mathrm{log1mexp}(x) = \begin{cases} \log(-\mathrm{expm1}(x)) & x > -\ln 2 \\
                                                \mathrm{log1p}(-\exp(x)) & x \le -\ln 2 \end{cases}

    Near 0, ``1 − exp(x)`` computed directly loses every digit (and ``log1p(−exp(x))`` gives
    NaN gradients as ``x → 0``); far from 0, ``expm1`` loses them instead. At ``x = 0`` the
    result is ``−inf``; callers that can reach 0 clamp first (see :func:`orpo_log_odds`).
    """
    x = _at_least_fp32(x)
    near_zero = x > -math.log(2.0)
    # Evaluate each branch only where it is accurate, and feed the other branch a harmless
    # value, so that torch.where never back-propagates a NaN from the branch it did not pick.
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def orpo_log_odds(mean_logps: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Log odds of a completion from its mean token log-prob :math:`\bar\ell` (ORPO).

    .. math:: p = e^{\bar\ell},\qquad
              \log\mathrm{odds}(y) = \log\frac{p}{1 - p} = \bar\ell - \log(1 - e^{\bar\ell})

    ``log(1 − p)`` goes through :func:`log1mexp` in at least float32. Only inside that term,
    :math:`\bar\ell` is capped at ``−eps``, so a completion the model is certain of
    (:math:`\bar\ell = 0` exactly) gets a large finite log odds (``−log eps ≈ 27.6``) and a
    finite gradient (at least 1, at most ``1/eps``) instead of ``+inf`` and NaN.
    """
    mean_logps = _at_least_fp32(mean_logps)
    return mean_logps - log1mexp(mean_logps.clamp(max=-eps))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    lam: float = DEFAULTS["orpo"]["lam"],
) -> Tensor:
    r"""ORPO loss per example (Hong et al., 2024): SFT and preference in one stage, no reference.

    With :math:`\bar\ell(y) = \log\pi_\theta(y|x)/|y|` (mean token log-prob of the completion)
    and :func:`orpo_log_odds`:

    .. math::
        L = \underbrace{-\bar\ell(y_w)}_{\mathcal{L}_{SFT}}
            - \lambda\,\log\sigma\big(\log\mathrm{odds}(y_w) - \log\mathrm{odds}(y_l)\big)

    Inputs are *summed* log-probs and completion lengths; the NLL term is the chosen answer's
    per-token negative log-likelihood over completion tokens only (TRL and the authors' script
    also count prompt tokens; here the prompt is not trained on, as in SFT on completions).
    """
    mean_w = _at_least_fp32(policy_chosen_logps) / _lengths(
        chosen_lengths, _at_least_fp32(policy_chosen_logps), "chosen_lengths"
    )
    mean_l = _at_least_fp32(policy_rejected_logps) / _lengths(
        rejected_lengths, _at_least_fp32(policy_rejected_logps), "rejected_lengths"
    )
    log_odds_ratio = orpo_log_odds(mean_w) - orpo_log_odds(mean_l)
    return -mean_w - lam * F.logsigmoid(log_odds_ratio)


# --------------------------------------------------------------------------------------------
# SimPO
# --------------------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = DEFAULTS["simpo"]["beta"],
    gamma: float = DEFAULTS["simpo"]["gamma"],
    length_normalize: bool = DEFAULTS["simpo"]["length_normalize"],
) -> Tensor:
    r"""SimPO loss per example (Meng et al., 2024): a reference-free, length-normalised reward.

    .. math::
        L = -\log\sigma\Big(\frac{\beta}{|y_w|}\log\pi_\theta(y_w|x)
                            - \frac{\beta}{|y_l|}\log\pi_\theta(y_l|x) - \gamma\Big)

    The implicit reward :math:`\frac{\beta}{|y|}\log\pi_\theta(y|x)` is the quantity generation
    ranks by (the mean token log-prob); γ is a target margin the chosen reward must exceed.
    ``length_normalize=False`` is the slides' "w/o LN" ablation: summed log-probs. ``γ`` here is
    absolute (as in TRL's ``simpo_gamma``); the authors' scripts pass ``γ/β`` instead.
    """
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if length_normalize:
        chosen = chosen / _lengths(chosen_lengths, chosen, "chosen_lengths")
        rejected = rejected / _lengths(rejected_lengths, rejected, "rejected_lengths")
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


# --------------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    r"""Bradley–Terry negative log-likelihood per pair, for training a reward model.

    .. math::  P(y_w \succ y_l) = \sigma(r_w - r_l), \qquad L = -\log\sigma(r_w - r_l)

    ``chosen_rewards`` and ``rejected_rewards`` are scalar rewards, shape ``[batch]``. The loss
    only sees the difference: adding a constant to every reward changes nothing.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


# --------------------------------------------------------------------------------------------
# Metrics, as TRL logs them
# --------------------------------------------------------------------------------------------


def implicit_rewards(
    policy_logps: Tensor,
    reference_logps: Tensor | None = None,
    beta: float = DEFAULTS["dpo"]["beta"],
    lengths: Tensor | None = None,
) -> Tensor:
    r"""The reward a preference method implicitly assigns to each completion, ``[batch]``.

    With a reference model (DPO, IPO, R-DPO, KTO):
    :math:`r = \beta(\log\pi_\theta - \log\pi_{ref})`.
    Without one (SimPO, ORPO): :math:`r = \beta\,\log\pi_\theta(y|x)/|y|` when ``lengths`` are
    given, else :math:`\beta\log\pi_\theta(y|x)`. Detached: this is for logging and analysis.
    """
    logps = policy_logps.detach()
    if reference_logps is not None:
        logps = logps - reference_logps.detach()
    if lengths is not None:
        logps = logps / _lengths(lengths, logps, "lengths")
    return beta * logps


def preference_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    scale: float = DEFAULTS["dpo"]["beta"],
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> dict[str, float]:
    """Batch means of what TRL's preference trainers log, as Python floats.

    * ``rewards/chosen``, ``rewards/rejected``: mean implicit reward (:func:`implicit_rewards`
      with ``scale`` as its ``beta``): the trainers pass their method's own hyperparameter, as
      TRL logs them: DPO's, R-DPO's and SimPO's ``beta``, IPO's ``tau``, ORPO's ``lam``;
    * ``rewards/margins``: mean of chosen minus rejected reward;
    * ``rewards/accuracies``: fraction of pairs whose chosen reward is strictly larger;
    * ``logps/chosen``, ``logps/rejected``: mean policy log-prob (summed, or per token when
      lengths are given, matching the reduction the loss used).

    A rising accuracy with a healthy-looking loss says nothing about the samples: the book's
    DPO chapter shows a run that collapsed into repetition while these looked fine.
    """
    chosen = implicit_rewards(
        policy_chosen_logps, reference_chosen_logps, scale, chosen_lengths
    )
    rejected = implicit_rewards(
        policy_rejected_logps, reference_rejected_logps, scale, rejected_lengths
    )
    logps_chosen = policy_chosen_logps.detach()
    logps_rejected = policy_rejected_logps.detach()
    if chosen_lengths is not None:
        logps_chosen = logps_chosen / _lengths(chosen_lengths, logps_chosen, "chosen_lengths")
    if rejected_lengths is not None:
        logps_rejected = logps_rejected / _lengths(
            rejected_lengths, logps_rejected, "rejected_lengths"
        )
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "logps/chosen": logps_chosen.mean().item(),
        "logps/rejected": logps_rejected.mean().item(),
    }


# --------------------------------------------------------------------------------------------
# The objectives table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """One row of the objectives table.

    ``data_format`` is ``"paired"`` (prompt, chosen, rejected) or ``"unpaired"`` (prompt,
    completion, label). ``reduction`` is how per-token log-probs become the per-sequence
    number the loss reads: ``"sum"`` or ``"mean"`` (every loss here takes sums plus lengths and
    divides itself, so ``"mean"`` says that it does). ``hyperparameters`` are the method's
    defaults (:data:`DEFAULTS`): the keyword arguments of its training loss function.
    """

    name: str
    loss: Callable[..., Tensor]
    needs_reference: bool
    data_format: str
    reduction: str
    hyperparameters: dict[str, Any]
    latex: str
    paper: str
    notes: str = ""
    extra_inputs: tuple[str, ...] = field(default_factory=tuple)


_H = (
    r"\beta \log \frac{\pi_{\theta}(y_w|x)}{\pi_{ref}(y_w|x)}"
    r" - \beta \log \frac{\pi_{\theta}(y_l|x)}{\pi_{ref}(y_l|x)}"
)

#: The slides' table of objectives, as code (plus Bradley–Terry and cDPO).
OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        name="DPO",
        loss=dpo_loss,
        needs_reference=True,
        data_format="paired",
        reduction="sum",
        hyperparameters=DEFAULTS["dpo"],
        latex=rf"-\log \sigma\left({_H}\right)",
        paper="Rafailov et al., 2023, Direct Preference Optimization",
        notes="label_smoothing > 0 is conservative DPO (cDPO).",
    ),
    "ipo": Objective(
        name="IPO",
        loss=ipo_loss,
        needs_reference=True,
        data_format="paired",
        reduction="mean",
        hyperparameters=DEFAULTS["ipo"],
        latex=(
            r"\left(\log \frac{\pi_{\theta}(y_w|x)}{\pi_{ref}(y_w|x)}"
            r" - \log \frac{\pi_{\theta}(y_l|x)}{\pi_{ref}(y_l|x)} - \frac{1}{2\tau}\right)^2"
        ),
        paper="Azar et al., 2023, A General Theoretical Paradigm to Understand Learning from "
        "Human Preferences",
        notes="TRL averages the log-ratios per token (pass lengths); the DPO code sums.",
        extra_inputs=("chosen_lengths", "rejected_lengths"),
    ),
    "rdpo": Objective(
        name="R-DPO",
        loss=rdpo_loss,
        needs_reference=True,
        data_format="paired",
        reduction="sum",
        hyperparameters=DEFAULTS["rdpo"],
        latex=rf"-\log \sigma\left({_H} + \alpha |y_w| - \alpha |y_l|\right)",
        paper="Park et al., 2024, Disentangling Length from Quality in Direct Preference "
        "Optimization",
        notes="Plus sign derived from max E[r - alpha |y|] - beta KL; the slides print a minus.",
        extra_inputs=("chosen_lengths", "rejected_lengths"),
    ),
    "kto": Objective(
        name="KTO",
        loss=kto_loss,
        needs_reference=True,
        data_format="unpaired",
        reduction="sum",
        hyperparameters=DEFAULTS["kto"],
        latex=(
            r"\lambda_y - v(x, y),\quad v = \begin{cases}\lambda_D\,\sigma(\beta(r_\theta - z_0))"
            r" & \text{desirable}\\ \lambda_U\,\sigma(\beta(z_0 - r_\theta)) & \text{undesirable}"
            r"\end{cases},\quad z_0 = \max(0, \widehat{\mathrm{KL}}(\pi_\theta\|\pi_{ref}))"
        ),
        paper="Ethayarajh et al., 2024, KTO: Model Alignment as Prospect Theoretic Optimization",
        notes="z0 from mismatched pairs within the batch (kto_reference_point), detached.",
        extra_inputs=("desirable", "reference_point"),
    ),
    "orpo": Objective(
        name="ORPO",
        loss=orpo_loss,
        needs_reference=False,
        data_format="paired",
        reduction="mean",
        hyperparameters=DEFAULTS["orpo"],
        latex=(
            r"-\log p_{\theta}(y_w|x) - \lambda \log \sigma\left(\log \frac{p_{\theta}(y_w|x)}"
            r"{1-p_{\theta}(y_w|x)} - \log \frac{p_{\theta}(y_l|x)}{1-p_{\theta}(y_l|x)}\right),"
            r"\quad p_{\theta}(y|x) = \exp\left(\frac{1}{|y|} \log \pi_{\theta}(y|x)\right)"
        ),
        paper="Hong et al., 2024, ORPO: Monolithic Preference Optimization without Reference "
        "Model",
        notes="Trains from the base model: SFT and preference in one stage.",
        extra_inputs=("chosen_lengths", "rejected_lengths"),
    ),
    "simpo": Objective(
        name="SimPO",
        loss=simpo_loss,
        needs_reference=False,
        data_format="paired",
        reduction="mean",
        hyperparameters=DEFAULTS["simpo"],
        latex=(
            r"-\log \sigma\left(\frac{\beta}{|y_w|} \log \pi_{\theta}(y_w|x)"
            r" - \frac{\beta}{|y_l|} \log \pi_{\theta}(y_l|x) - \gamma\right)"
        ),
        paper="Meng et al., 2024, SimPO: Simple Preference Optimization with a Reference-Free "
        "Reward",
        notes="gamma is absolute here (TRL's simpo_gamma); the authors pass gamma/beta.",
        extra_inputs=("chosen_lengths", "rejected_lengths"),
    ),
    "hinge": Objective(
        name="SLiC-HF (hinge)",
        loss=hinge_loss,
        needs_reference=True,
        data_format="paired",
        reduction="sum",
        hyperparameters=DEFAULTS["hinge"],
        latex=rf"\max\left(0,\ 1 - \left({_H}\right)\right)",
        paper="Zhao et al., 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
        notes="TRL's loss_type='hinge': the margin is the reference-relative h, delta = 1/beta; "
        "SLiC-HF's own hinge reads the policy's log-likelihood gap, with no reference.",
    ),
    "robust": Objective(
        name="Robust DPO",
        loss=robust_dpo_loss,
        needs_reference=True,
        data_format="paired",
        reduction="sum",
        hyperparameters=DEFAULTS["robust"],
        latex=(
            rf"\frac{{-(1-\varepsilon)\log \sigma\left({_H}\right)"
            rf" + \varepsilon \log \sigma\left(-\left({_H}\right)\right)}}{{1 - 2\varepsilon}}"
        ),
        paper="Chowdhury et al., 2024, Provably Robust DPO: Aligning Language Models with Noisy "
        "Feedback",
        notes="Unbiased under labels flipped with probability label_smoothing; cDPO (dpo's "
        "label_smoothing) adds the flipped term instead of subtracting it.",
    ),
    "bt": Objective(
        name="Bradley–Terry reward model",
        loss=bradley_terry_loss,
        needs_reference=False,
        data_format="paired",
        reduction="sum",
        hyperparameters=DEFAULTS["bt"],
        latex=r"-\log \sigma\left(r_\phi(x, y_w) - r_\phi(x, y_l)\right)",
        paper="Bradley and Terry, 1952; Ouyang et al., 2022",
        notes="Reads scalar rewards (the reward head at the last token), not log-probs.",
    ),
}
