"""The tiny Llama-style model: its config and its construction from a tokenizer."""

from __future__ import annotations

from typing import Any

import torch


# --------------------------------------------------------------------------------------------
# The tiny model; loading and saving any causal LM
# --------------------------------------------------------------------------------------------
def tiny_config(
    vocab_size: int,
    n_layers: int = 2,
    hidden_size: int = 128,
    n_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    arch: str = "llama",
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    **extra: Any,
):
    """A ``transformers`` config for a tiny Llama-style (``arch="llama"``) or Qwen2-style
    (``arch="qwen2"``) decoder: RMSNorm, rotary positions, SwiGLU MLP, tied input/output
    embeddings, no dropout. ``intermediate_size`` defaults to ``3 * hidden_size``.

    Parameter count (tied embeddings, ``V`` vocab, ``H`` hidden, ``I`` intermediate, ``L``
    layers): ``V*H + L*(4*H*H + 3*H*I + 2*H) + H``; with ``V=157, H=128, L=2`` about 0.45M.
    """
    from transformers import LlamaConfig, Qwen2Config

    if hidden_size % n_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by n_heads={n_heads}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attention_dropout=0.0,
    )
    common.update(extra)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")


def build_model(tokenizer: Any, *, seed: int = 0, **config_kwargs: Any):
    """A freshly initialised tiny causal LM for ``tokenizer`` (see :func:`tiny_config`).

    The vocabulary size and the pad/bos/eos ids come from the tokenizer; ``seed`` fixes the
    initial weights without touching the global random state.
    """
    from transformers import AutoModelForCausalLM

    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for k, v in ids.items():
        if v is not None:
            config_kwargs.setdefault(k, v)
    config = tiny_config(len(tokenizer), **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model
