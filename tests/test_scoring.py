"""Tests for rlcourse.models.scoring, the one way every engine scores sequences under a model.

Oracles are computed here by hand (``math.log``/``math.exp`` on a fixed logits table) or are the
same sequence scored alone, without padding.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from rlcourse import grpo, ppo, rl
from rlcourse.models import (
    ScoredSequences,
    ValueHeadModel,
    call_model,
    last_token_index,
    output_logits,
    output_values,
    score_sequences,
    sequence_logprobs,
    shifted_logprobs,
    takes_position_ids,
    unwrap_model,
)

torch.set_num_threads(1)

# A fixed table: the logits after token v are TABLE[v] (a bigram model), so that every
# log-probability can be written down by hand.
TABLE = [
    [0.0, 1.0, 2.0, 0.5],
    [1.5, -1.0, 0.0, 0.0],
    [0.3, 0.3, 3.0, -2.0],
    [2.0, 0.0, -1.0, 1.0],
]


class Bigram(nn.Module):
    """``logits[:, t] = TABLE[ids[:, t]]``, plus ``values[:, t] = ids[:, t]`` if asked."""

    def __init__(self, values: bool = False):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(TABLE))
        self.values = values

    def forward(self, input_ids, attention_mask=None):
        logits = self.table[input_ids]
        if self.values:
            return logits, input_ids.float() * 10
        return logits


def hand_logprob(prev: int, nxt: int, temperature: float = 1.0) -> float:
    z = [x / temperature for x in TABLE[prev]]
    return z[nxt] - math.log(sum(math.exp(x) for x in z))


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_logprobs_of_a_fixed_table_by_hand(temperature):
    ids = torch.tensor([[0, 2, 2, 3], [3, 1, 0, 0]])
    scored = score_sequences(Bigram(), ids, torch.ones_like(ids), temperature)
    assert isinstance(scored, ScoredSequences) and scored.values is None
    assert scored.logprobs.dtype == torch.float32 and scored.logprobs.shape == (2, 3)
    expected = [[hand_logprob(int(ids[b, t]), int(ids[b, t + 1]), temperature)
                 for t in range(3)] for b in range(2)]
    torch.testing.assert_close(scored.logprobs, torch.tensor(expected), atol=1e-6, rtol=0)
    # the logits come back as the model returned them
    assert torch.equal(scored.logits, torch.tensor(TABLE)[ids])


def test_entropy_at_temperature_by_hand():
    ids = torch.tensor([[1, 2]])
    T = 0.7
    scored = score_sequences(Bigram(), ids, torch.ones_like(ids), T)
    p = [math.exp(x / T) for x in TABLE[1]]
    p = [x / sum(p) for x in p]
    assert scored.entropy().shape == (1, 1)
    assert scored.entropy().item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-6)


def test_temperature_divides_after_the_cast_to_float32():
    """bf16 logits: the division happens in float32 (log_softmax(z.float() / T)), not in bf16."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(2, 5, 11, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(11, (2, 5), generator=g)
    T = 0.7
    expected = torch.log_softmax(z[:, :-1].float() / T, -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.equal(shifted_logprobs(z, ids, T), expected)
    in_bf16 = torch.log_softmax((z[:, :-1] / T).float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert not torch.equal(in_bf16, expected)  # the order matters, so the check above can fail


def test_sequence_logprobs_sums_only_the_completion():
    ids = torch.tensor([[0, 2, 2, 3]])
    comp = torch.tensor([[0, 0, 1, 1]])
    got = sequence_logprobs(Bigram(), ids, torch.ones_like(ids), comp)
    assert got.item() == pytest.approx(hand_logprob(2, 2) + hand_logprob(2, 3), abs=1e-6)


# ----------------------------------------------------------------------------- outputs
def test_values_from_a_value_head_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    vhm = ValueHeadModel(LlamaForCausalLM(cfg)).eval()
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert not takes_position_ids(vhm)  # it counts positions itself
    with torch.no_grad():
        logits, values = vhm(ids, mask)
        scored = score_sequences(vhm, ids, mask)
    assert scored.values is not None and torch.equal(scored.values, values)
    assert torch.equal(scored.logits, logits)
    # the value of a state does not depend on the padding in front of it
    with torch.no_grad():
        alone = score_sequences(vhm, ids[:1, 2:], mask[:1, 2:])
    torch.testing.assert_close(scored.values[0, 2:], alone.values[0], atol=1e-5, rtol=0)


def test_output_readers():
    z = torch.zeros(1, 2, 3)
    v = torch.ones(1, 2)
    assert output_logits(z) is z and output_values(z) is None
    assert output_logits((z, v)) is z and output_values((z, v)) is v

    class HF:  # a transformers output has .logits, and a .values() METHOD (it is a dict)
        logits = z

        def values(self):
            return [z]

    assert output_logits(HF()) is z and output_values(HF()) is None


# ----------------------------------------------------------------------------- wrappers
class Wrapper(nn.Module):
    """Like DDP: ``forward(*inputs, **kwargs)`` passes everything to ``self.module``."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *inputs, **kwargs):
        self.calls += 1
        return self.module(*inputs, **kwargs)


class Compiled(nn.Module):
    """Like torch.compile's OptimizedModule: the model is ``_orig_mod``."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *inputs, **kwargs):
        return self._orig_mod(*inputs, **kwargs)


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.seen = position_ids
        return torch.zeros(*input_ids.shape, 3)


def test_unwrap_through_module_and_orig_mod_and_call_the_wrapper():
    inner = WithPositions()
    wrapped = Wrapper(Compiled(inner))
    assert unwrap_model(wrapped) is inner
    assert unwrap_model(inner) is inner
    assert takes_position_ids(wrapped)
    assert not takes_position_ids(Wrapper(Bigram()))  # Bigram takes no position ids
    mask = torch.tensor([[0, 1, 1]])
    call_model(wrapped, torch.zeros(1, 3, dtype=torch.long), mask)
    assert wrapped.calls == 1  # the wrapper itself was called (DDP's hooks run)
    assert inner.seen.tolist() == [[0, 0, 1]]


def test_takes_position_ids_reads_kwargs():
    def named(input_ids, attention_mask, position_ids=None): ...

    def kwargs(input_ids, attention_mask, **kw): ...

    def neither(input_ids, attention_mask=None): ...

    assert takes_position_ids(named) and takes_position_ids(kwargs)
    assert not takes_position_ids(neither)


# ----------------------------------------------------------------------------- padding
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=16, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


SEQ = torch.tensor([[3, 7, 1, 9, 4]])


def _padded(side: str, n: int = 2):
    pad = torch.zeros(1, n, dtype=torch.long)
    ones, zeros = torch.ones_like(SEQ), torch.zeros_like(pad)
    if side == "left":
        return torch.cat([pad, SEQ], 1), torch.cat([zeros, ones], 1), slice(n, None)
    return torch.cat([SEQ, pad], 1), torch.cat([ones, zeros], 1), slice(0, SEQ.shape[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_scores_of_the_sequence_alone(side):
    model = _tiny_gpt2()
    with torch.no_grad():
        alone = score_sequences(model, SEQ, torch.ones_like(SEQ)).logprobs[0]
        ids, mask, real = _padded(side)
        lp = score_sequences(model, ids, mask).logprobs[0]
    # column t belongs to token t+1: the real tokens after the first
    cols = slice(real.start, real.start + SEQ.shape[1] - 1)
    torch.testing.assert_close(lp[cols], alone, atol=1e-5, rtol=0)


def _lora_gpt2():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True))
    with torch.no_grad():  # a trained adapter: B != 0, so LoRA changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def test_peft_gpt2_gets_position_ids_under_left_padding():
    """The bug this module fixed: ppo/grpo asked ``forward``'s signature for ``position_ids``, a
    PEFT model's forward only has ``**kwargs``, so a LoRA-wrapped GPT-2 was scored with the
    positions of the padded row (0, 1, 2, ... from the first padding column)."""
    model = _lora_gpt2()
    ids, mask, _ = _padded("left", 3)
    with torch.no_grad():
        alone = score_sequences(model, SEQ, torch.ones_like(SEQ)).logprobs[0]
        new = score_sequences(model, ids, mask).logprobs[0, 3:]
        old_probe = "position_ids" in inspect.signature(model.forward).parameters
        old = shifted_logprobs(output_logits(model(input_ids=ids, attention_mask=mask)), ids)
    assert takes_position_ids(model) and not old_probe
    torch.testing.assert_close(new, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(old[0, 3:], alone, atol=1e-3)  # without them: wrong log-probs
    # the engines go through the same call
    with torch.no_grad():
        torch.testing.assert_close(grpo.token_logprobs(model, ids, mask)[0, 3:], alone,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ppo.reference_logprobs(model, ids, mask)[0, 3:], alone,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(
            grpo.token_logprobs(Wrapper(model), ids, mask)[0, 3:], alone, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- last token
def test_last_token_index_all_padding_row_is_zero():
    """One implementation (rl, re-exported by models); a row without real tokens gets 0, the
    first column, never T - 1 (a padding position at the end would be read as the last token)."""
    assert last_token_index is rl.last_token_index
    mask = torch.tensor([[0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]])
    assert last_token_index(mask).tolist() == [0, 1, 2, 2]
