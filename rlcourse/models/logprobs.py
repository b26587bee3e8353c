"""Log-probabilities of tokens from logits, and position ids from an attention mask.

Scoring whole sequences under a model (the call, the shift, the sums) is
:mod:`rlcourse.models.scoring`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability of ``labels`` under ``logits``:
    ``log p(y) = log_softmax(z)[y] = z_y - logsumexp(z)``.

    Computed as ``log_softmax`` then ``gather``, in float32 (stable in bf16/fp16 too).
    ``logits`` [..., V], ``labels`` [...] (int) -> [...] float32.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``0, 1, 2, ...`` counted over real tokens only: ``cumsum(mask) - 1``, 0 on
    padding. With left padding the first real token gets position 0, as it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
