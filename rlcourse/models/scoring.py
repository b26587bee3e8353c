"""One way to score a sequence under a causal LM: call the model, read its output, take the
log-probability of every next token (with the shift).

Every engine calls a model on ``input_ids`` and ``attention_mask`` through :func:`call_model`,
reads what came back with :func:`output_logits` / :func:`output_values` and turns logits into
per-token log-probabilities with :func:`shifted_logprobs`; :func:`score_sequences` does the
three in one go, and :func:`sequence_logprobs` sums (or averages) them over a completion.

Position ids: a causal LM counts positions ``0, 1, 2, ...`` from the first column unless told
otherwise, so a left-padded row would start at position ``#pad`` and score differently from the
same sequence alone. :func:`call_model` passes ``position_ids = cumsum(mask) - 1`` whenever the
model accepts them: when the real model's ``forward`` (under any DDP/accelerate ``.module`` or
``torch.compile`` ``._orig_mod`` wrapper) names ``position_ids`` or takes ``**kwargs`` (a PEFT
model does, and passes them on to the model it adapts). Toy policies that take neither (e.g.
:class:`rlcourse.models.ValueHeadModel`, which counts positions itself) are called without.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlcourse.models.logprobs import (
    chunked_logprobs,
    logprobs_from_logits,
    position_ids_from_mask,
)
from rlcourse.models.packing import pack_rows, pack_sequences
from rlcourse.rl import entropy_from_logits

__all__ = [
    "ScoredSequences",
    "shifted_mask",
    "last_hidden_states",
    "next_token_logprobs",
    "output_layer",
    "packed_logprobs",
    "packing_width",
    "call_model",
    "output_logits",
    "output_values",
    "score_sequences",
    "sequence_logprobs",
    "shifted_logprobs",
    "takes_position_ids",
    "unwrap_model",
]


def shifted_mask(completion_mask: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """The mask of the scored tokens, aligned with shifted log-probs: ``completion_mask[:, 1:]``
    [B, T-1] (column ``t`` is token ``t+1``, predicted from position ``t``), as ``dtype``. The
    one place the shift is written: every loop's per-token mask comes from here."""
    return completion_mask[:, 1:].to(dtype)


# --------------------------------------------------------------------------------------------
# Calling a model
# --------------------------------------------------------------------------------------------
def unwrap_model(model: Any) -> Any:
    """The model under its wrappers: follows ``.module`` (DDP, DataParallel, accelerate) and
    ``._orig_mod`` (``torch.compile``) until neither is there. Anything else (a PEFT model, a
    plain function) is returned as it is."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        for name in ("_orig_mod", "module"):
            inner = getattr(model, name, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            return model
    return model


def takes_position_ids(model: Any) -> bool:
    """Whether ``model``'s real ``forward`` (see :func:`unwrap_model`) accepts ``position_ids``:
    it names the parameter, or it takes ``**kwargs`` (PEFT models pass them on)."""
    bare = unwrap_model(model)
    forward = getattr(bare, "forward", bare)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "position_ids" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_model(model: Any, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
    """One forward pass, ``model(input_ids=..., attention_mask=..., **kwargs)``, adding
    ``position_ids = cumsum(mask) - 1`` when the model accepts them (:func:`takes_position_ids`),
    so that left, right or no padding give the same result.

    The model is called as given (a DDP wrapper's hooks still run); only the signature is read
    from the model under the wrappers. Returns the model's output untouched.
    """
    if takes_position_ids(model):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def output_logits(output: Any) -> Tensor:
    """Logits from a model output: a tensor, a ``(logits, values)`` tuple (e.g.
    :class:`rlcourse.models.ValueHeadModel`) or an object with ``.logits`` (transformers)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


def output_values(output: Any) -> Tensor | None:
    """Values from a ``(logits, values)`` tuple; ``None`` for an output without them (a tensor of
    logits, a transformers output)."""
    if isinstance(output, (tuple, list)) and len(output) > 1:
        return output[1]
    return None


# --------------------------------------------------------------------------------------------
# Log-probabilities of the next tokens
# --------------------------------------------------------------------------------------------
def shifted_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``lp[:, t] = log softmax(z_t / temperature)[input_ids[:, t+1]]``: logits (B, L, V) and ids
    (B, L) -> (B, L-1), float32; column ``t`` belongs to token ``t+1``.

    The logits are cast to float32 before the division, so bf16/fp16 logits lose nothing to it.
    """
    z = logits[:, :-1].float()
    if temperature != 1.0:  # x / 1.0 == x exactly: skip the (B, L-1, V) copy
        z = z / temperature
    return logprobs_from_logits(z, input_ids[:, 1:])


@dataclass
class ScoredSequences:
    """A batch of sequences scored by one forward pass (:func:`score_sequences`).

    ``logits`` (B, L, V) as the model returned them; ``logprobs`` (B, L-1) float32, column ``t``
    the log-probability of token ``t+1`` at ``temperature``; ``values`` (B, L) from a model that
    returns ``(logits, values)``, else ``None``.
    """

    logits: Tensor
    logprobs: Tensor
    values: Tensor | None
    temperature: float = 1.0

    def entropy(self) -> Tensor:
        """``H(pi(.|s_t))`` of the next-token distribution at ``temperature``: (B, L-1), fp32."""
        return entropy_from_logits(self.logits[:, :-1].float() / self.temperature)


def score_sequences(model: Any, input_ids: Tensor, attention_mask: Tensor,
                    temperature: float = 1.0) -> ScoredSequences:
    """Call ``model`` once (:func:`call_model`) and read logits, per-token log-probabilities
    (:func:`shifted_logprobs`) and values (if the model returns them)."""
    out = call_model(model, input_ids, attention_mask)
    logits = output_logits(out)
    return ScoredSequences(logits=logits,
                           logprobs=shifted_logprobs(logits, input_ids, temperature),
                           values=output_values(out), temperature=temperature)


#: Config attributes of models whose logits are more than ``h W^T + b`` (Gemma's soft-capping,
#: Cohere's and Granite's scales): their logits are taken from the model's own output.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier", "lm_head_multiplier")


def output_layer(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """``(backbone, output layer)`` of a ``transformers`` causal LM whose logits are
    ``output_layer(backbone(...).last_hidden_state)`` and nothing more, under its DDP,
    ``torch.compile`` and PEFT wrappers; ``None`` for anything else (a toy policy, a value-head
    model, a model that scales or caps its logits, an output layer that is not a plain
    ``nn.Linear``, e.g. one a LoRA adapter wraps). Such a model can be scored from its hidden
    states in chunks (:func:`next_token_logprobs`)."""
    bare = unwrap_model(model)
    if callable(getattr(bare, "get_base_model", None)):  # PEFT: the model its adapters are in
        bare = bare.get_base_model()
    config = getattr(bare, "config", None)
    get_head = getattr(bare, "get_output_embeddings", None)
    backbone = getattr(bare, "base_model", None)
    if config is None or not callable(get_head) or not isinstance(backbone, torch.nn.Module) \
            or backbone is bare:
        return None
    head = get_head()
    if type(head) is not torch.nn.Linear:
        return None
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    try:
        params = inspect.signature(bare.forward).parameters
    except (TypeError, ValueError):
        return None
    return (backbone, head) if "logits_to_keep" in params else None


def last_hidden_states(model: Any, backbone: Any, **inputs: Any) -> Tensor:
    """``backbone``'s output (the last hidden states, after the final norm) when ``model`` is
    called on ``inputs`` through its wrappers (a DDP wrapper's hooks run), read by a forward
    hook; the model is asked for the last position's logits only (``logits_to_keep=1``) and
    keeps no KV cache (``use_cache=False``: a cache would also turn off transformers' packed
    sequence masks, :mod:`rlcourse.models.packing`)."""
    captured: list[Tensor] = []

    def keep(module: Any, args: Any, out: Any) -> None:
        captured.append(out if isinstance(out, Tensor) else out[0])

    handle = backbone.register_forward_hook(keep)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def next_token_logprobs(model: Any, input_ids: Tensor, attention_mask: Tensor,
                        temperature: float = 1.0, scored: Tensor | None = None) -> Tensor:
    """``lp[:, t] = log softmax(z_t / temperature)[input_ids[:, t+1]]``, (B, L) -> (B, L-1),
    float32, as ``score_sequences(...).logprobs``, without the (B, L, V) logits when the model
    allows (:func:`output_layer`): the backbone's last hidden states ``h`` are taken as the
    model computes them (a forward hook; the model asked for the last position's logits only,
    ``logits_to_keep=1``), and ``log softmax(h W^T + b)`` at the labels is computed a chunk of
    positions at a time (:func:`rlcourse.models.logprobs.chunked_logprobs`), which is where a
    large vocabulary's memory went: 4 B L V bytes of float32 logits, their log-softmax as much
    again, and as much for their gradient.

    ``scored`` (B, L), e.g. a completion mask: only tokens ``t+1`` with ``scored[:, t+1] = 1``
    are scored; the others are exactly 0. Other models are scored
    through their logits (:func:`score_sequences`), with the same result.
    """
    parts = output_layer(model)
    if parts is None or not takes_position_ids(model):
        lp = score_sequences(model, input_ids, attention_mask, temperature).logprobs
        return lp if scored is None else lp.masked_fill(scored[:, 1:] == 0, 0.0)
    backbone, head = parts
    kwargs = {"position_ids": position_ids_from_mask(attention_mask)}
    hidden = last_hidden_states(model, backbone, input_ids=input_ids,
                                attention_mask=attention_mask, **kwargs)[:, :-1]
    labels = input_ids[:, 1:]
    if scored is None:
        lp = chunked_logprobs(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                              labels.reshape(-1), temperature)
        return lp.view(labels.shape)
    keep = scored[:, 1:].bool()
    lp = chunked_logprobs(hidden[keep], head.weight, head.bias, labels[keep], temperature)
    # masked_scatter keeps an all-masked batch connected to the model (a zero gradient)
    return lp.new_zeros(keep.shape).masked_scatter(keep, lp)


#: Attention implementations whose masks follow restarting position ids (transformers'
#: ``masking_utils.find_packed_sequence_indices`` and flash-attention's varlen path).
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")

#: Packing is used when it removes at least this share of the padded batch's slots.
PACKING_MIN_SAVING = 0.1


def packing_width(model: Any, attention_mask: Tensor) -> int | None:
    """Row width for scoring ``model`` packed (:mod:`rlcourse.models.packing`), or ``None``
    to score the padded batch as it is.

    ``None`` unless the model is a ``transformers`` causal LM scored from its hidden states
    (:func:`output_layer`) with an attention that keeps packed sequences apart
    (:data:`PACKED_ATTENTION`). Flash-attention's cost is per sequence: every token in one
    row. SDPA and eager attention compute the whole ``W x W`` block of a row, masked or not:
    rows of twice the padded width ``L`` (measured fastest on the book's DPO batches,
    ``benchmarks/bench_trl_step.py``: 25-30 % less time than padded, where wider rows lose
    to attention's quadratic cost and narrower ones pack too little). ``None`` also when
    packing would remove less than :data:`PACKING_MIN_SAVING` of the ``B L`` slots (a batch
    of equal lengths).
    """
    parts = output_layer(model)
    config = getattr(parts[0], "config", None) if parts is not None else None
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKED_ATTENTION:
        return None
    b, length = attention_mask.shape
    lengths = [int(n) for n in attention_mask.sum(1)]
    if attention.startswith("flash_attention"):
        width = slots = max(sum(lengths), 1)
    else:
        width = 2 * length
        slots = len(pack_rows(lengths, width)) * width
    return width if slots <= (1 - PACKING_MIN_SAVING) * b * length else None


def packed_logprobs(model: Any, input_ids: Tensor, attention_mask: Tensor, scored: Tensor,
                    temperature: float = 1.0, width: int | None = None) -> Tensor:
    """:func:`next_token_logprobs` of a padded batch, computed packed: the real tokens in rows
    of ``width`` slots (:func:`rlcourse.models.packing.pack_sequences`; default
    :func:`packing_width`), the model called with restarting position ids and no attention
    mask, the log-probabilities of the ``scored`` tokens taken from the hidden states in
    chunks and put back in the padded layout: ``(B, L-1)`` float32, column ``t`` token
    ``t+1``, exactly 0 where not scored. Token ``t+1`` is scored when ``scored[:, t+1]`` is
    1 and tokens ``t`` and ``t+1`` are real. Where packing is not possible or saves too
    little (:func:`packing_width` is ``None``), the padded batch is scored."""
    keep = scored[:, 1:].bool() & attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    width = width or packing_width(model, attention_mask)
    if width is None:
        scored = torch.cat([keep.new_zeros(keep.shape[0], 1), keep], 1)
        return next_token_logprobs(model, input_ids, attention_mask, temperature, scored=scored)
    backbone, head = output_layer(model)
    pad_id = getattr(getattr(backbone, "config", None), "pad_token_id", None) or 0
    packed = pack_sequences(input_ids, attention_mask, width, pad_id=pad_id)
    hidden = last_hidden_states(model, backbone, input_ids=packed.input_ids,
                                position_ids=packed.position_ids)
    rows = hidden.reshape(-1, hidden.shape[-1])[packed.slot[:, :-1][keep]]
    lp = chunked_logprobs(rows, head.weight, head.bias, input_ids[:, 1:][keep], temperature)
    return lp.new_zeros(keep.shape).masked_scatter(keep, lp)


def sequence_logprobs(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    reduce: str = "sum",
) -> Tensor:
    """Log-probability of the completion tokens given everything before them.

    ``lp[b, t] = log pi(ids[b, t+1] | ids[b, :t+1]) * completion_mask[b, t+1]`` for
    ``t = 0..T-2`` (logits[:, :-1] predict ids[:, 1:]); prompt and padding positions are exactly 0.

    - ``reduce="none"``: ``lp`` [B, T-1]; column ``t`` belongs to token ``t+1``.
    - ``reduce="sum"``: ``log pi(y|x) = sum_t lp[b, t]`` [B] (DPO, KTO, R-DPO, RLOO).
    - ``reduce="mean"``: ``sum_t lp[b, t] / |y|`` [B], the log of the geometric mean per-token
      probability (SimPO, ORPO); 0 for an empty completion rather than NaN.

    Position ids are counted from the attention mask (:func:`call_model`), so left, right (or
    both-sided) padding gives the same values as each sequence run alone. Where the model
    allows, the sequences are packed without padding and only the completion tokens are
    scored, without the full logits (:func:`packed_logprobs`); the result is the same.
    """
    mask = shifted_mask(completion_mask)
    lp = packed_logprobs(model, input_ids, attention_mask, completion_mask) * mask
    if reduce == "none":
        return lp
    if reduce == "sum":
        return lp.sum(-1)
    if reduce == "mean":
        return lp.sum(-1) / mask.sum(-1).clamp(min=1.0)
    raise ValueError(f"reduce must be 'sum', 'mean' or 'none', got {reduce!r}")
