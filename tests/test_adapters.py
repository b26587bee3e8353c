"""Memory savers: gradient checkpointing (same loss and gradients, layers really recomputed),
LoRA through peft (policy = base at init, adapters-off = base exactly, merge = adapted, only
adapters train), the reference pass of a short run (only the examples training reads are
scored, same result), all on tiny models in seconds.

Oracles: the model without checkpointing; the base model before wrapping; ``ln 2`` for DPO's
first loss; the indices a real ``train`` call reads (recorded by its loss function).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlcourse.adapters import (
    LoraSettings,
    adapters_disabled,
    apply_lora,
    enable_gradient_checkpointing,
    merge_lora,
)
from rlcourse.data import pad_collate, tokenize_sft
from rlcourse.engine import TrainConfig, planned_indices, sft_loss_fn, train
from rlcourse.models import build_model, build_tokenizer, sequence_logprobs
from rlcourse.preference import precompute_reference_logps, tokenize_pairs, train_preference

torch.set_num_threads(1)

PAIRS = [
    {"prompt": "what is rain ?", "chosen": "rain is wet .", "rejected": "rain is dry ."},
    {"prompt": "what is snow ?", "chosen": "snow is cold .", "rejected": "snow is hot ."},
    {"prompt": "tell me about dogs", "chosen": "a dog can bark .", "rejected": "you are dumb ."},
    {"prompt": "what is fire ?", "chosen": "fire is hot .", "rejected": "fire is cold ."},
    {"prompt": "what is ice ?", "chosen": "ice is cold .", "rejected": "ice is hot . ice is hot ."},
    {"prompt": "what is the moon ?", "chosen": "the moon is a rock .",
     "rejected": "the moon is cheese ."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([" ".join(p.values()) for p in PAIRS])


@pytest.fixture(scope="module")
def pairs(tok):
    return tokenize_pairs(tok, PAIRS * 3, max_length=32)


def _model(tok, seed=0, **kw):
    return build_model(tok, n_layers=2, hidden_size=32, n_heads=4, seed=seed, **kw)


def _cfg(**kw):
    base = dict(lr=1e-2, batch_size=4, max_steps=2, log_every=1, progress=False,
                warmup_steps=0, schedule="constant", seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------
def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    loss, _ = sft_loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_loss_and_grads_and_layers_recomputed(tok):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
    batch = pad_collate(tokenize_sft(tok, rows, 32))
    plain, ckpt = _model(tok), _model(tok)
    enable_gradient_checkpointing(ckpt)
    calls = []
    ckpt.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(ckpt, batch)
    # Recomputed in backward: the layer ran twice for one forward + backward.
    assert len(calls) == 2
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    for n, g in grads_a.items():
        torch.testing.assert_close(grads_b[n], g, atol=1e-6, rtol=0, msg=n)


def test_train_config_gradient_checkpointing_trains_the_same_model(tok):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS * 2]
    items = tokenize_sft(tok, rows, 32)
    a, b = _model(tok), _model(tok)
    train(a, sft_loss_fn, items, _cfg())
    train(b, sft_loss_fn, items, _cfg(gradient_checkpointing=True))
    on = [getattr(m, "is_activation_checkpointing", None) for m in (a, b)]
    assert on == [False, True]
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)
    assert TrainConfig.from_dict({"gradient_checkpointing": True}).gradient_checkpointing


# --------------------------------------------------------------------------------------------
# The reference pass of a short run
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(batch_size=4, max_steps=2),
    dict(batch_size=4, max_steps=7),                       # into the second epoch
    dict(batch_size=3, max_steps=2, grad_accum_steps=2),
    dict(batch_size=5, max_steps=None, epochs=0.5),
    dict(batch_size=5, max_steps=None, epochs=1.5, drop_last=True),
    dict(batch_size=4, max_steps=2, seed=3),
])
def test_planned_indices_are_what_train_reads(tok, kw):
    n = 18
    items = [{"input_ids": torch.tensor([2, 5 + i % 3, 3]), "attention_mask": torch.ones(3),
              "completion_mask": torch.tensor([0, 1, 1]), "index": torch.tensor(i)}
             for i in range(n)]
    seen: set[int] = set()
    model = _model(tok)

    def record(model, batch):
        seen.update(batch["index"].tolist())
        return sft_loss_fn(model, batch)

    config = _cfg(lr=1e-4, **kw)
    train(model, record, items, config)
    assert planned_indices(n, config) == sorted(seen)
    if kw.get("max_steps") == 2 or kw.get("epochs") == 0.5:
        assert len(seen) < n  # a fraction of the data


def test_planned_indices_by_hand():
    # 10 examples, batch 2 on 2 processes: 5 global batches -> 3 per process; 1 step of 1
    # micro-batch reads 1 batch per process = 4 examples.
    cfg = TrainConfig(batch_size=2, max_steps=1, seed=0)
    assert len(planned_indices(10, cfg, num_processes=2)) == 4
    assert len(planned_indices(10, cfg, num_processes=1)) == 2
    assert planned_indices(10, TrainConfig(batch_size=2, epochs=1.0)) == list(range(10))


class CountingModel(torch.nn.Module):
    """Counts the sequences it scores (a wrapper around a causal LM)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.rows = model, 0

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.rows += input_ids.shape[0]
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids)


def test_short_run_scores_only_what_it_reads_and_trains_the_same(tok, pairs, monkeypatch):
    import rlcourse.preference as preference

    config = _cfg(batch_size=2, max_steps=2)
    used = planned_indices(len(pairs), config)
    assert len(used) == 4 < len(pairs)
    counting = CountingModel(_model(tok))
    items = precompute_reference_logps(counting, pairs, batch_size=3, indices=used)
    assert counting.rows == 2 * len(used)  # chosen + rejected of the used pairs only
    full = precompute_reference_logps(_model(tok), pairs, batch_size=7)
    for i, (a, b) in enumerate(zip(items, full, strict=True)):
        if i in used:
            assert torch.equal(a["reference_chosen_logps"], b["reference_chosen_logps"])
        else:
            assert torch.isnan(a["reference_chosen_logps"])
    # train_preference scores only those and ends with the model of a fully scored run.
    calls = []
    real = preference.precompute_reference_logps
    monkeypatch.setattr(preference, "precompute_reference_logps",
                        lambda *a, **k: calls.append(k.get("indices")) or real(*a, **k))
    short, whole = _model(tok), _model(tok)
    run = train_preference("dpo", short, pairs, config, beta=0.5, reference_batch_size=5)
    monkeypatch.undo()
    train_preference("dpo", whole, full, config, beta=0.5)
    assert calls[0] == used  # (then the inner call on those items)
    assert run.history.rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for (n, p), q in zip(whole.named_parameters(), short.parameters(), strict=True):
        assert torch.equal(q, p), n


def test_an_unscored_example_stops_training(tok, pairs):
    items = precompute_reference_logps(_model(tok), pairs, indices=[0, 1])
    with pytest.raises(RuntimeError, match="not computed"):
        train(_model(tok), lambda m, b: __import__("rlcourse.preference").preference
              .dpo_loss_fn(m, b), items, _cfg(batch_size=len(items), max_steps=1))


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
def _logps(model, batch):
    from rlcourse.preference import stack_pairs

    ids, att, comp = stack_pairs(batch)
    with torch.no_grad():
        return sequence_logprobs(model, ids, att, comp)


def test_lora_trains_only_adapters_and_disabled_is_the_base_exactly(tok, pairs):
    base = _model(tok)
    before = copy.deepcopy(base)
    model = apply_lora(base, LoraSettings(r=4, alpha=8), seed=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # all-linear: q, k, v, o, gate, up, down in both layers; the tied output layer is not.
    assert len(trainable) == 2 * 7 * 2
    batch = pad_collate(pairs[:6])
    ref = _logps(before, batch)
    assert torch.equal(_logps(model, batch), ref)  # B = 0: the adapted model is the base
    train(model, lambda m, b: __import__("rlcourse.preference").preference.simpo_loss_fn(m, b),
          pairs, _cfg(max_steps=3))
    moved = _logps(model, batch)
    assert not torch.allclose(moved, ref)
    with adapters_disabled(model):
        assert torch.equal(_logps(model, batch), ref)  # the reference, bit for bit
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in before.named_parameters():
        assert torch.equal(frozen[n], p), n


def test_lora_dpo_first_loss_is_ln2_without_a_second_copy(tok, pairs, monkeypatch):
    import rlcourse.preference as preference

    model = apply_lora(_model(tok), LoraSettings(r=4), seed=0)
    real = copy.deepcopy

    def no_model_copies(x, *a):
        if isinstance(x, torch.nn.Module):
            pytest.fail("LoRA DPO copied the model for its reference")
        return real(x, *a)

    monkeypatch.setattr(preference.copy, "deepcopy", no_model_copies)
    run = train_preference("dpo", model, pairs, _cfg(), beta=0.5)
    assert run.history.rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert run.history.rows[1]["loss"] < math.log(2)


def test_merged_model_reloads_and_computes_what_the_adapted_one_does(tok, pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_lora(_model(tok), LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    train(model, lambda m, b: __import__("rlcourse.preference").preference.simpo_loss_fn(m, b),
          pairs, _cfg(max_steps=3))
    batch = pad_collate(pairs[:6])
    adapted = _logps(model, batch)
    model.eval()
    with torch.no_grad():
        logits_adapted = model(input_ids=batch["chosen_input_ids"]).logits
    merged = merge_lora(model)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        logits = reloaded(input_ids=batch["chosen_input_ids"]).logits
    torch.testing.assert_close(logits, logits_adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logps(reloaded, batch), adapted, atol=1e-4, rtol=0)


def test_lora_settings_are_validated():
    for bad in (dict(r=0), dict(r=2.5), dict(alpha=-1), dict(dropout=1.0), dict(merge="yes"),
                dict(target_modules=[]), dict(target_modules=3)):
        with pytest.raises(ValueError):
            LoraSettings(**bad)
    with pytest.raises(ValueError, match="lora.target_modules: .no_such_layer. match no linear"):
        apply_lora(build_model(build_tokenizer(["a b"]), n_layers=1, hidden_size=16, n_heads=2),
                   LoraSettings(target_modules=["no_such_layer"]))


def test_lora_with_gradient_checkpointing_same_gradients(tok, pairs):
    from rlcourse.preference import simpo_loss_fn

    batch = pad_collate(pairs[:4])
    grads = []
    for ckpt in (False, True):
        model = apply_lora(_model(tok), LoraSettings(r=4), seed=0)
        model.train()
        if ckpt:
            enable_gradient_checkpointing(model)
        loss, _ = simpo_loss_fn(model, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_saved_word_tokenizer_encodes_the_same_next_to_any_model(tok, tmp_path, arch):
    # transformers 5 builds a Qwen2Tokenizer next to a Qwen2 model, which encoded every word of
    # the book's word-level tokenizer to nothing: training then saw empty texts, silently.
    from rlcourse.models import load_model, save_model

    model = build_model(tok, arch=arch, n_layers=1, hidden_size=16, n_heads=2)
    save_model(model, tok, tmp_path / arch)
    _, loaded = load_model(tmp_path / arch, device="cpu")
    text = "what is rain ? rain is wet ."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert len(tok(text)["input_ids"]) == 8
    assert loaded.chat_template == tok.chat_template and loaded.pad_token_id == 0
