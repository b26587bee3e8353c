"""Sampling completions with their log-probabilities (KV cache, top-k/top-p)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rlcourse.models.logprobs import position_ids_from_mask
from rlcourse.models.tokenizer import _pad_id, encode_prompts


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """Sampled completions and the log-probabilities of the sampled tokens.

    Shapes: prompts padded on the LEFT to ``P``; completions padded on the RIGHT to ``T``.

    - ``prompt_ids``, ``prompt_attention_mask`` [B, P]
    - ``completion_ids`` [B, T] (pad after EOS), ``completion_mask`` [B, T] (1 up to and
      including EOS)
    - ``logprobs`` [B, T]: ``log pi(a_t|s_t)`` under the raw model (temperature 1, no top-k/p),
      what PPO's ratio and KL need; 0 where the mask is 0
    - ``sampling_logprobs`` [B, T]: log-prob under the distribution actually sampled from (after
      temperature, top-k, top-p; 0 for greedy decoding)
    - ``full_ids``, ``full_attention_mask``, ``full_completion_mask`` [B, P+T]: prompt and
      completion side by side, ready for :func:`sequence_logprobs`
    - ``texts``: decoded completions without special tokens; ``prompts``: the input strings
    """

    prompts: list[str]
    prompt_ids: torch.Tensor
    prompt_attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    sampling_logprobs: torch.Tensor
    texts: list[str] = field(default_factory=list)

    @property
    def full_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def full_attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_attention_mask, self.completion_mask], dim=1)

    @property
    def full_completion_mask(self) -> torch.Tensor:
        return torch.cat([torch.zeros_like(self.prompt_attention_mask), self.completion_mask], 1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        """Number of completion tokens per sample, EOS included."""
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return len(self.prompts)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass ``top_p``.

    Nucleus: sort probabilities descending and keep token ``i`` while the mass *before* it is
    below ``top_p`` (the most likely token is always kept).
    """
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _inverse_cdf_sample(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from ``exp(logp)`` by inverting the CDF at ``u`` in [0, 1).

    One uniform number per (prompt, step), drawn up front, makes each row's sample depend only on
    the seed and the row's index: the same samples whatever the batch size.
    """
    probs = logp.double().exp()
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    # Guard against rounding at the top end: never go past the last token with p > 0.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(-1)
    return torch.minimum(idx, last)


def _pad_to(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = t.new_full((t.shape[0], extra), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def max_positions(model: Any) -> int | None:
    """The longest sequence a model's position embeddings cover, from its config
    (``max_position_embeddings``, GPT-2's ``n_positions``, ...); ``None`` when it names none."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@torch.no_grad()
def _generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor,
    do_sample: bool,
    chat: bool = True,
) -> tuple[torch.Tensor, ...]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    enc = encode_prompts(tokenizer, prompts) if chat else [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
    if min(len(e) for e in enc) == 0:
        raise ValueError("a prompt encodes to zero tokens; with chat=False start it with <bos>")
    P = max(len(e) for e in enc)
    limit = max_positions(model)
    if limit is not None and P + max_new_tokens > limit:
        # else a RoPE model runs silently past the positions it was trained on and a learned
        # position table (GPT-2) fails with an IndexError deep inside the model
        longest = prompts[max(range(len(enc)), key=lambda i: len(enc[i]))]
        raise ValueError(f"a prompt of {P} tokens plus max_new_tokens={max_new_tokens} is longer "
                         f"than the model's {limit} positions (its config's "
                         f"max_position_embeddings): {longest[:60]!r}...; shorten the prompts "
                         "or max_new_tokens")
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token: an answer could not end before "
                         "max_new_tokens; set tokenizer.eos_token (and save the tokenizer)")
    prompt_ids = torch.full((len(enc), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(enc), P), dtype=torch.long)
    for i, e in enumerate(enc):
        prompt_ids[i, P - len(e) :] = torch.tensor(e, dtype=torch.long)
        prompt_mask[i, P - len(e) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    B = prompt_ids.shape[0]
    cache = DynamicCache()
    # transformers >= 5.2x names the KV-cache argument ``cache``; older versions
    # ``past_key_values``. The DynamicCache object is updated in place either way.
    # (a PEFT model's forward takes **kwargs and passes them on: ask the model underneath)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    attn = prompt_mask
    pos = position_ids_from_mask(attn)
    step_ids, step_pos = prompt_ids, pos
    next_pos = pos[:, -1:] + 1
    alive = torch.ones(B, dtype=torch.bool, device=device)
    toks, lps, slps, masks = [], [], [], []
    for step in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attn,
            position_ids=step_pos,
            use_cache=True,
            **{cache_kw: cache},
            **extra,
        )
        logits = out.logits[:, -1].float()
        raw_logp = F.log_softmax(logits, dim=-1)
        if do_sample and temperature > 0:
            filtered = _filter_logits(logits / temperature, top_k, top_p)
            samp_logp = F.log_softmax(filtered, dim=-1)
            nxt = _inverse_cdf_sample(samp_logp, uniforms[:, step].to(device))
            s_lp = samp_logp.gather(-1, nxt[:, None]).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
            s_lp = torch.zeros(B, device=device)  # a point mass: log 1 = 0
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        m = alive.long()
        toks.append(nxt)
        masks.append(m)
        lps.append(raw_logp.gather(-1, nxt[:, None]).squeeze(-1) * m)
        slps.append(s_lp * m)
        if eos_id is not None:
            alive = alive & (nxt != eos_id)
        if not alive.any():
            break
        # Finished rows keep feeding pad tokens with mask 0 so the batch stays rectangular.
        attn = torch.cat([attn, m[:, None]], dim=1)
        step_ids, step_pos = nxt[:, None], next_pos
        next_pos = next_pos + 1
    return (
        prompt_ids.cpu(),
        prompt_mask.cpu(),
        torch.stack(toks, 1).cpu(),
        torch.stack(masks, 1).cpu(),
        torch.stack(lps, 1).cpu(),
        torch.stack(slps, 1).cpu(),
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    do_sample: bool = True,
    batch_size: int = 512,
    progress: bool = False,
    chat: bool = True,
    first_row: int = 0,
) -> Generation:
    """Sample a completion for every prompt (in the tokenizer's format: :func:`encode_prompts`).

    Token by token with a KV cache: ``a_t ~ softmax(filter(z_t / temperature))`` where ``filter``
    keeps the ``top_k`` largest logits and the smallest set of tokens with mass >= ``top_p``;
    ``do_sample=False`` (or ``temperature=0``) takes the argmax. A row stops after EOS.
    Records ``log pi(a_t|s_t) = log_softmax(z_t)[a_t]`` (raw model) and the log-prob under the
    sampling distribution (see :class:`Generation`). ``seed`` makes the samples repeatable
    without touching the global random state; sample ``i`` depends only on the seed and ``i``
    (not on ``batch_size``). Prompts are processed ``batch_size`` at a time. ``chat=False``
    continues the prompt text as given (no chat format; include ``<bos>`` yourself), for
    sampling from a pretrained base model. ``first_row``: these prompts are rows ``first_row,
    first_row + 1, ...`` of a larger batch drawn with the same seed (each process of a
    multi-process run draws its share of one global batch, with the samples one process would
    draw).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    # u[i, t] decides prompt i's token t (see _inverse_cdf_sample).
    uniforms = torch.rand((first_row + len(prompts), max_new_tokens), generator=generator,
                          dtype=torch.float64)[first_row:]
    was_training = model.training
    model.eval()
    parts = []
    try:
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="generate", leave=False)
        for s in starts:
            parts.append(
                _generate_batch(
                    model, tokenizer, prompts[s : s + batch_size], max_new_tokens, temperature,
                    top_k, top_p, uniforms[s : s + batch_size], do_sample, chat,
                )
            )
    finally:
        model.train(was_training)
    pad_id = _pad_id(tokenizer)
    P = max(p[0].shape[1] for p in parts)
    T = max(p[2].shape[1] for p in parts)
    cat = lambda i, w, v, left: torch.cat([_pad_to(p[i], w, v, left) for p in parts])  # noqa: E731
    completion_ids = cat(2, T, pad_id, False)
    completion_mask = cat(3, T, 0, False)
    texts = [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids, completion_mask, strict=True)
    ]
    return Generation(
        prompts=prompts,
        prompt_ids=cat(0, P, pad_id, True),
        prompt_attention_mask=cat(1, P, 0, True),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=cat(4, T, 0, False).float(),
        sampling_logprobs=cat(5, T, 0, False).float(),
        texts=texts,
    )
