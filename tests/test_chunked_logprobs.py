"""Log-probabilities from hidden states in chunks (rlcourse.models.logprobs.chunked_logprobs,
rlcourse.models.scoring.next_token_logprobs): the same values and gradients as scoring through
the full logits, without a tensor of the full logits' size.

Oracles: a float64 ``log_softmax`` of the full logits written out here, and the full-logits path
(``score_sequences``), which every engine used before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rlcourse.adapters import (
    LoraSettings,
    adapters_disabled,
    apply_lora,
    enable_gradient_checkpointing,
)
from rlcourse.models import (
    next_token_logprobs,
    output_layer,
    score_sequences,
    sequence_logprobs,
    tiny_config,
)
from rlcourse.models.logprobs import CHUNK_BYTES, chunk_tokens, chunked_logprobs

torch.set_num_threads(1)


def oracle(hidden, weight, bias, labels, temperature=1.0):
    """float64 ``log softmax((h W^T + b) / T)[y]`` from the full logits."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    return (z - torch.logsumexp(z, -1, keepdim=True)).gather(-1, labels[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_the_full_logits(chunk, temperature, with_bias):
    g = torch.Generator().manual_seed(0)
    n, h, v = 13, 8, 50
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)

    lp = chunked_logprobs(hidden, weight, bias, labels, temperature, chunk=chunk)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    grads = torch.autograd.grad((lp * upstream).sum(), [hidden, weight] + ([bias] if with_bias
                                                                           else []))
    inputs = [x.detach().double().requires_grad_() for x in [hidden, weight]
              + ([bias] if with_bias else [])]
    expected = oracle(inputs[0], inputs[1], inputs[2] if with_bias else None, labels,
                      temperature)
    torch.testing.assert_close(lp.double(), expected.detach(), atol=1e-5, rtol=0)
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), inputs)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_chunk_size_from_the_byte_budget():
    assert chunk_tokens(151936) == CHUNK_BYTES // (4 * 151936) == 441
    assert chunk_tokens(257) == CHUNK_BYTES // (4 * 257)
    assert chunk_tokens(10**12) == 1


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        chunked_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 4), None, torch.zeros(2, 3).long())


# --------------------------------------------------------------------------------------------
# Whole models: next_token_logprobs against score_sequences (the full logits)
# --------------------------------------------------------------------------------------------
def tiny_lm(arch="llama", vocab=211, seed=0, **kw):
    from transformers import AutoModelForCausalLM

    config = tiny_config(vocab, n_layers=2, hidden_size=32, n_heads=4, arch=arch, **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def batch(vocab=211, seed=1, left=False):
    """Three sequences of lengths 9, 6 and 4, padded (right, or left) to 9; completions are the
    last 4, 3 and 2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths, completions = [9, 6, 4], [4, 3, 2]
    ids = torch.zeros(3, 9, dtype=torch.long)
    att = torch.zeros(3, 9, dtype=torch.long)
    comp = torch.zeros(3, 9, dtype=torch.long)
    for b, (n, c) in enumerate(zip(lengths, completions, strict=True)):
        cols = slice(9 - n, 9) if left else slice(0, n)
        ids[b, cols] = torch.randint(4, vocab, (n,), generator=g)
        att[b, cols] = 1
        comp[b, cols.stop - c:cols.stop] = 1
    return ids, att, comp


def full_logprobs(model, ids, att, temperature=1.0):
    return score_sequences(model, ids, att, temperature).logprobs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_model_logprobs_equal_the_full_logits(arch, left, temperature):
    model = tiny_lm(arch)
    assert output_layer(model) is not None
    ids, att, comp = batch(left=left)
    expected = full_logprobs(model, ids, att, temperature)
    got = next_token_logprobs(model, ids, att, temperature)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-6)
    masked = next_token_logprobs(model, ids, att, temperature, scored=comp)
    torch.testing.assert_close(masked, expected * comp[:, 1:], atol=2e-6, rtol=1e-6)
    assert (masked[comp[:, 1:] == 0] == 0).all()


def param_grads(model, loss_fn):
    """Every parameter's gradient of ``loss_fn()`` (also used by tests/test_packing.py)."""
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def lora_lm(vocab=211, seed=3):
    """A tiny LM with LoRA r=4 whose ``B`` is moved off 0 (so that the adapters change the
    outputs) and gradient checkpointing on, in training mode."""
    model = apply_lora(tiny_lm(vocab=vocab), LoraSettings(r=4), seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    enable_gradient_checkpointing(model)
    model.train()
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_equal_the_full_logits(tied):
    model = tiny_lm(tie_word_embeddings=tied)
    ids, att, comp = batch()
    weights = torch.linspace(-1, 1, ids.shape[1] - 1)

    def full():
        return (full_logprobs(model, ids, att) * comp[:, 1:] * weights).sum()

    def chunked():
        return (sequence_logprobs(model, ids, att, comp, reduce="none") * weights).sum()

    want, got = param_grads(model, full), param_grads(model, chunked)
    assert set(want) == set(got)
    assert ("lm_head.weight" in got) == (not tied)  # tied: one parameter, embed_tokens.weight
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_and_gradient_checkpointing_equal_the_full_logits():
    model = lora_lm()
    assert output_layer(model) is not None
    ids, att, comp = batch()
    want = param_grads(model, lambda: (full_logprobs(model, ids, att) * comp[:, 1:]).sum())
    got = param_grads(model, lambda: sequence_logprobs(model, ids, att, comp).sum())
    assert want and set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad(), adapters_disabled(model):  # the reference under LoRA
        torch.testing.assert_close(next_token_logprobs(model, ids, att),
                                   full_logprobs(model, ids, att), atol=2e-6, rtol=1e-6)


def test_bf16_autocast_matches_the_full_logits_under_autocast():
    model = tiny_lm()
    ids, att, comp = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = full_logprobs(model, ids, att) * comp[:, 1:]
        got = next_token_logprobs(model, ids, att, scored=comp)
    assert got.dtype == torch.float32
    # both take h W^T in bf16 (7 significant bits) and the log-softmax in float32
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_the_full_logits_size_is_built(monkeypatch):
    """Forward and backward of a summed log-prob with chunks of 4 tokens: no operator returns
    a tensor a quarter as large as the [B, L-1, V] logits (256 tokens, vocabulary 4001, hidden
    32: the logits are 8 times the embedding matrix); the full-logits path does build one."""
    vocab = 4001
    model = tiny_lm(vocab=vocab)
    ids = torch.randint(4, vocab, (4, 65), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, 17:] = 1
    logits_numel = ids.shape[0] * (ids.shape[1] - 1) * vocab
    monkeypatch.setattr("rlcourse.models.logprobs.CHUNK_BYTES", 4 * 4 * vocab)  # 4 tokens
    with LargestTensor() as chunked:
        sequence_logprobs(model, ids, att, comp).sum().backward()
    with LargestTensor() as full:
        (full_logprobs(model, ids, att) * comp[:, 1:]).sum().backward()
    assert full.largest >= logits_numel
    assert chunked.largest < logits_numel / 4
    assert chunked.largest >= 4 * vocab  # a chunk's logits


def test_models_with_transformed_logits_are_scored_through_them():
    """A soft-capped (Gemma-style) or scaled output is not ``h W^T``: read from the model."""
    model = tiny_lm()
    model.config.final_logit_softcapping = 30.0
    assert output_layer(model) is None
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 0.5
    assert output_layer(model) is None


def test_full_logits_oracle_is_independent():
    """The oracle above is a float64 log-softmax, not the function under test."""
    h, w = torch.randn(2, 3), torch.randn(5, 3)
    y = torch.tensor([1, 4])
    ref = F.log_softmax((h @ w.T).double(), -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(oracle(h, w, None, y), ref)
