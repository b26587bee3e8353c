"""Padding-free packing (rlcourse.models.packing, scoring.packed_logprobs): the layout written
out by hand, and the log-probabilities and gradients against the padded batch and against each
sequence scored alone (no padding at all)."""

from __future__ import annotations

import pytest
import torch
from test_chunked_logprobs import lora_lm, param_grads, tiny_lm

from rlcourse.models import next_token_logprobs, sequence_logprobs
from rlcourse.models.packing import pack_rows, pack_sequences
from rlcourse.models.scoring import packed_logprobs, packing_width

torch.set_num_threads(1)


def test_first_fit_decreasing_by_hand():
    # longest first: 5 -> row 0 (room 1), 4 -> row 1 (room 2), 3 -> row 2 (room 3),
    # 2 -> row 1 (room 0), 1 -> row 0 (room 0)
    assert pack_rows([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]
    assert pack_rows([2, 2, 2], 6) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="7 tokens does not fit a row of 6"):
        pack_rows([7, 1], 6)


def test_layout_by_hand_left_and_right_padding():
    ids = torch.tensor([[5, 6, 7, 0],     # right-padded, 3 tokens
                        [0, 0, 8, 9],     # left-padded, 2 tokens
                        [1, 2, 3, 4]])    # 4 tokens
    att = (torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]]))
    packed = pack_sequences(ids, att, width=5, pad_id=0)
    # 4 -> row 0 (room 1); 3 -> row 1 (room 2); 2 -> row 1 (room 0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed.slot.tolist() == [[5, 6, 7, -1], [-1, -1, 8, 9], [0, 1, 2, 3]]
    flat = packed.input_ids.reshape(-1)
    assert torch.equal(flat[packed.slot[att.bool()]], ids[att.bool()])


def test_a_mask_with_a_hole_is_refused():
    with pytest.raises(ValueError, match="holes"):
        pack_sequences(torch.ones(1, 4).long(), torch.tensor([[1, 0, 1, 1]]))


# --------------------------------------------------------------------------------------------
# Scoring packed against padded and against each sequence alone
# --------------------------------------------------------------------------------------------
LENGTHS, COMPLETIONS = [11, 4, 7, 3, 9, 5], [5, 2, 3, 1, 4, 3]


def padded_batch(left=False, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (n, c) in enumerate(zip(LENGTHS, COMPLETIONS, strict=True)):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[b, cols] = torch.randint(4, vocab, (n,), generator=g)
        att[b, cols] = 1
        comp[b, cols.stop - c:cols.stop] = 1
    return ids, att, comp


def alone(model, ids, att, comp):
    """Each sequence scored by itself (a batch of one, no padding): summed completion
    log-probs, the oracle."""
    out = []
    for b in range(ids.shape[0]):
        real = att[b].bool()
        one = ids[b, real][None]
        out.append(sequence_logprobs(model, one, torch.ones_like(one), comp[b, real][None])[0])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("width", [11, 16, 22, 39])   # 39: every token in one row
def test_packed_equals_padded_and_alone(arch, left, width):
    model = tiny_lm(arch, vocab=97)
    ids, att, comp = padded_batch(left)
    padded = next_token_logprobs(model, ids, att, scored=comp)
    packed = packed_logprobs(model, ids, att, comp, width=width)
    torch.testing.assert_close(packed, padded, atol=3e-6, rtol=1e-6)
    assert (packed[comp[:, 1:] == 0] == 0).all()
    torch.testing.assert_close(packed.sum(-1), alone(model, ids, att, comp), atol=1e-5,
                               rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.6])
def test_packed_at_a_temperature(temperature):
    model = tiny_lm(vocab=97)
    ids, att, comp = padded_batch()
    torch.testing.assert_close(
        packed_logprobs(model, ids, att, comp, temperature, width=22),
        next_token_logprobs(model, ids, att, temperature, scored=comp), atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_packed_gradients_equal_padded(lora):
    model = lora_lm(vocab=97, seed=2) if lora else tiny_lm(vocab=97).train()
    ids, att, comp = padded_batch()
    w = torch.linspace(0.5, 1.5, ids.shape[0])
    want = param_grads(model, lambda: (next_token_logprobs(model, ids, att, scored=comp).sum(-1)
                                  * w).sum())
    got = param_grads(model, lambda: (packed_logprobs(model, ids, att, comp, width=22).sum(-1)
                                 * w).sum())
    assert want and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_width_choice():
    model = tiny_lm(vocab=97)
    ids, att, comp = padded_batch()
    # SDPA: rows of twice the padded width; 39 tokens in one row of 22 + one of 17 -> 44 slots
    # against 6 * 11 = 66
    assert packing_width(model, att) == 22
    # equal lengths: nothing to gain
    assert packing_width(model, torch.ones(4, 10, dtype=torch.long)) is None
    model.config._attn_implementation = "flash_attention_2"   # read only, not run
    assert packing_width(model, att) == sum(LENGTHS)
    model.config._attn_implementation = "flex_attention"
    assert packing_width(model, att) is None


def test_sequence_logprobs_packs_and_equals_each_sequence_alone(monkeypatch):
    import rlcourse.models.scoring as scoring

    model = tiny_lm(vocab=97)
    ids, att, comp = padded_batch()
    calls = []
    real = scoring.pack_sequences
    monkeypatch.setattr(scoring, "pack_sequences", lambda *a, **k: calls.append(1) or real(*a,
                                                                                          **k))
    got = sequence_logprobs(model, ids, att, comp)
    assert calls, "sequence_logprobs did not pack a padded batch"
    torch.testing.assert_close(got, alone(model, ids, att, comp), atol=1e-5, rtol=1e-6)


def test_a_model_that_cannot_pack_is_scored_padded():
    """A toy policy (no transformers output layer) goes through its logits, as before."""
    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, 5)

    ids = torch.tensor([[1, 2, 3], [4, 1, 0]])
    att = torch.tensor([[1, 1, 1], [1, 1, 0]])
    comp = torch.tensor([[0, 1, 1], [0, 1, 0]])
    lp = packed_logprobs(Uniform(), ids, att, comp)
    expected = torch.log(torch.tensor(0.2)) * torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(lp, expected)
