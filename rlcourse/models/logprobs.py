"""Log-probabilities of tokens from logits, and position ids from an attention mask.

Scoring whole sequences under a model (the call, the shift, the sums) is
:mod:`rlcourse.models.scoring`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcourse.memory import LOGIT_CHUNK_BYTES


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


# --------------------------------------------------------------------------------------------
# Log-probabilities from hidden states, without the [tokens, vocabulary] logits
# --------------------------------------------------------------------------------------------
#: Bytes of float32 logits one chunk may hold (256 MiB): ``chunk = CHUNK_BYTES // (4 V)`` tokens,
#: 441 for Qwen2.5's 151,936 words, every token at once for the book's 257; the number
#: :func:`rlcourse.memory.training_step_memory` counts.
CHUNK_BYTES = LOGIT_CHUNK_BYTES


def chunk_tokens(vocab: int, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk: ``max(1, chunk_bytes // (4 vocab))``, ``chunk_bytes`` by default
    :data:`CHUNK_BYTES` (read at the call)."""
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here: autocast's when it is on (as
    the model's own output layer would under it), else the two tensors' common dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLogprobs(torch.autograd.Function):
    """``lp_i = z_{i, y_i} - logsumexp_j z_ij`` with ``z = (h W^T + b) / T``, one chunk of
    tokens at a time; backward recomputes each chunk's logits:
    ``dlp_i/dz_ij = 1[j = y_i] - softmax(z_i)_j``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk, dtype):
        w = weight.to(dtype)  # one cast for every chunk (a no-op in float32)
        b = None if bias is None else bias.to(dtype)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            rows = slice(s, s + chunk)
            z = F.linear(hidden[rows].to(dtype), w, b).float()
            if temperature != 1.0:
                z /= temperature
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(-1, labels[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        t, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # the weight's gradient is summed over chunks in float32, rounded once at the end
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(dtype)
            g = grad_out[s:s + chunk].float()
            z = F.linear(h, w, b).float()
            if t != 1.0:
                z /= t
            # dL/dz = g (onehot(y) - softmax(z)) / T, written into z's buffer
            gz = z.sub_(lse[s:s + chunk, None]).exp_().mul_(-g[:, None])
            gz.scatter_add_(-1, labels[s:s + chunk, None], g[:, None])
            if t != 1.0:
                gz /= t
            if need_h:
                grad_h[s:s + chunk] = (gz.to(dtype) @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(gz.to(dtype).T.float(), h.float())
            if need_b:
                grad_b += gz.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     labels: torch.Tensor, temperature: float = 1.0,
                     chunk: int | None = None) -> torch.Tensor:
    """``log softmax((h W^T + b) / T)[y]`` for every row of ``hidden`` [N, H] and its label
    ``y`` [N], without the [N, V] logits: ``chunk`` rows at a time (default
    :func:`chunk_tokens`), ``z_{i,y_i} - logsumexp_j z_ij``, in float32; the backward pass
    recomputes each chunk's logits instead of keeping them. Equal to
    ``logprobs_from_logits(F.linear(hidden, weight, bias) / T, labels)`` to float round-off,
    gradients included; under autocast the product is taken in autocast's dtype, as the
    model's output layer would. Returns [N] float32.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and labels [N]; got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    chunk = chunk or chunk_tokens(weight.shape[0])
    dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLogprobs.apply(hidden, weight, bias, labels, float(temperature), chunk,
                                      dtype)
