r"""Critic-free advantages (layer 1): GRPO and RLOO, beyond the slides.

PPO learns a critic :math:`V_\phi` to turn one sampled reward into an advantage. With a reward
only at the end of the response, a cheaper baseline is to sample a *group* of :math:`K` responses
to the same prompt and compare each with its siblings:

* **Leave-one-out** (Kool et al., 2019), the advantage of RLOO (Ahmadian et al., 2024):
  :math:`A_i = r_i - \frac{1}{K-1}\sum_{j\ne i} r_j`, an unbiased REINFORCE baseline because
  :math:`r_j` for :math:`j \ne i` does not depend on :math:`y_i`.
* **GRPO** (Shao et al., 2024): group-normalised reward,
  :math:`A_i = \frac{r_i - \mathrm{mean}(r_{1..K})}{\mathrm{std}(r_{1..K}) + \epsilon}`, used for
  every token of response :math:`i` inside PPO's clipped ratio, with an optional k3 KL penalty.

Both free the memory of the critic: of the slides' four models only actor, reward and reference
remain (and the reward can be a rule, e.g. a unit test or a verifier, instead of a model).

This module computes advantages only; what update they feed is :mod:`rlcourse.grpo`'s. There
``advantage="rloo"`` puts the leave-one-out advantage into GRPO's update (the clipped ratio,
``epochs`` passes, an optional :math:`\beta k_3` KL *in the loss*). Ahmadian et al.'s RLOO is
plain REINFORCE, one on-policy pass, with the KL *in the reward*:
:math:`r_i = r_\phi(x, y_i) - \beta \log\frac{\pi_\theta(y_i|x)}{\pi_{ref}(y_i|x)}` before the
leave-one-out baseline. The two coincide with one pass, one minibatch and :math:`\beta = 0`
(``recipes/rloo.yaml``'s defaults), up to the constant scale of the loss normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(rewards: Tensor) -> Tensor:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must have shape (n_prompts, K) with K >= 2 samples per prompt, "
            f"got {tuple(rewards.shape)}"
        )
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


def rloo_advantages(rewards: Tensor) -> Tensor:
    r"""Leave-one-out advantages :math:`A_i = r_i - \frac{1}{K-1}\sum_{j \ne i} r_j`.

    ``rewards``: (n_prompts, K), K samples per prompt -> advantages of the same shape.
    Equivalently :math:`A_i = \frac{K}{K-1}(r_i - \bar r)`. RLOO (Ahmadian et al., 2024) is
    REINFORCE with this advantage, computed from rewards that already include the KL penalty
    :math:`-\beta \log(\pi_\theta/\pi_{ref})`; ``GroupConfig(advantage="rloo")`` uses it in
    GRPO's update instead (see the module docstring).
    """
    r = _groups(rewards)
    k = r.shape[1]
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (k - 1)  # (n, K)
    return r - others_mean


def grpo_advantages(rewards: Tensor, eps: float = 1e-4, scale: bool = True) -> Tensor:
    r"""Group-relative advantages :math:`A_i = (r_i - \bar r) / (\mathrm{std}(r) + \epsilon)`.

    ``rewards``: (n_prompts, K) -> (n_prompts, K). ``std`` is the sample standard deviation
    (Bessel-corrected, as ``torch.std`` and TRL use). ``scale=False`` drops the division
    (Dr. GRPO, Liu et al., 2025, argue the division over-weights groups with tiny spread).
    A group whose K rewards are all equal gets advantage 0: it carries no learning signal.
    """
    r = _groups(rewards)
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (r.std(dim=1, keepdim=True) + eps)
