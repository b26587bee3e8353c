"""Log-probabilities of tokens and sequences under a causal LM (with the shift)."""

from __future__ import annotations

from typing import Any

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


def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    )
    if isinstance(out, tuple):  # e.g. ValueHeadModel returns (logits, values)
        return out[0]
    return out.logits


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    reduce: str = "sum",
) -> torch.Tensor:
    """Log-probability of the completion tokens given everything before them.

    ``lp[b, t] = log pi(ids[b, t+1] | ids[b, :t+1]) * completion_mask[b, t+1]`` for
    ``t = 0..T-2`` (logits[:, :-1] predict ids[:, 1:]); prompt and padding positions are exactly 0.

    - ``reduce="none"``: ``lp`` [B, T-1]; column ``t`` belongs to token ``t+1``.
    - ``reduce="sum"``: ``log pi(y|x) = sum_t lp[b, t]`` [B] (DPO, KTO, R-DPO, RLOO).
    - ``reduce="mean"``: ``sum_t lp[b, t] / |y|`` [B], the log of the geometric mean per-token
      probability (SimPO, ORPO); 0 for an empty completion rather than NaN.

    Position ids are counted from the attention mask, so left, right (or both-sided) padding
    gives the same values as each sequence run alone.
    """
    logits = _logits(model, input_ids, attention_mask)
    lp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    mask = completion_mask[:, 1:].to(lp.dtype)
    lp = lp * mask
    if reduce == "none":
        return lp
    if reduce == "sum":
        return lp.sum(-1)
    if reduce == "mean":
        return lp.sum(-1) / mask.sum(-1).clamp(min=1.0)
    raise ValueError(f"reduce must be 'sum', 'mean' or 'none', got {reduce!r}")
