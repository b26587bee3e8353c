import pytest
import torch

from rlcourse.memory import GIB, method_memory_gib, model_roles


def test_ppo_holds_four_models_two_trained():
    roles = model_roles("ppo", 10)
    assert len(roles) == 4
    assert sum(r.trainable for r in roles) == 2


def test_seven_billion_parameters_by_hand():
    n = 7_000_000_000
    # PPO: 2 x 16 bytes (actor, critic) + 2 x 2 bytes (reward, reference) = 36 bytes per parameter.
    assert method_memory_gib("ppo", n) == pytest.approx(36 * n / 2**30)
    # DPO: policy 16 + reference 2 = 18 bytes; with precomputed reference log-probs 16 bytes.
    assert method_memory_gib("dpo", n) == pytest.approx(18 * n / GIB)
    assert method_memory_gib("dpo", n, precompute_reference=True) == pytest.approx(16 * n / GIB)
    # ORPO / SimPO: the policy alone: 112 GB (decimal) = 104.3 GiB.
    assert method_memory_gib("simpo", n) == pytest.approx(104.308, abs=1e-3)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="grpo"):
        model_roles("grpo", 1)


# --------------------------------------------------------------------------------------------
# One training step of a decoder: parameters, adapters, activations, the peak
# --------------------------------------------------------------------------------------------
def _qwen(layers=1, **kw):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=50, hidden_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                      tie_word_embeddings=True, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg), cfg


def test_qwen25_sizes_by_hand():
    from rlcourse.memory import QWEN25_05B, QWEN25_7B, lora_parameters

    # 0.5B: V H = 136,134,656; per layer q 802,816 + k, v 2 x 114,688 + o 802,816 + MLP
    # 3 x 4,358,144 + norms 1,792 + biases 1,152 = 14,912,384; x 24 + final norm 896.
    assert QWEN25_05B.n_params == 136_134_656 + 24 * 14_912_384 + 896 == 494_032_768
    assert QWEN25_7B.n_params == 7_615_616_512  # Qwen2.5-7B's published 7.61B
    # LoRA r=16 on all seven linears: 16 (2*1792 + 2*1024 + 3*5760) = 366,592 per layer.
    assert lora_parameters(QWEN25_05B, 16) == 24 * 366_592 == 8_798_208


def test_parameter_and_adapter_counts_equal_the_real_models():
    from rlcourse.adapters import LoraSettings, apply_lora, lora_parameter_count
    from rlcourse.memory import TransformerShape, lora_parameters

    for tied in (True, False):
        from transformers import AutoModelForCausalLM

        _, cfg = _qwen(layers=2)
        cfg.tie_word_embeddings = tied
        model = AutoModelForCausalLM.from_config(cfg)
        shape = TransformerShape.from_config(cfg)
        assert shape.n_params == sum(p.numel() for p in model.parameters())
    for targets in ("all-linear", ["q_proj", "v_proj"], ["down_proj"]):
        model, cfg = _qwen(layers=2)
        peft_model = apply_lora(model, LoraSettings(r=4, target_modules=targets))
        assert lora_parameter_count(peft_model) == lora_parameters(
            TransformerShape.from_config(cfg), 4, targets)


def _saved_values_per_layer_token(lora=None, seqs=2, length=16):
    """Values autograd keeps for backward per decoder layer and token, counted with
    saved_tensors_hooks (unique storages, parameters excluded): (3 layers - 1 layer) / 2."""
    from rlcourse.adapters import LoraSettings, apply_lora

    totals = []
    for layers in (1, 3):
        model, _ = _qwen(layers=layers)
        if lora:
            model = apply_lora(model, LoraSettings(r=4, target_modules=lora))
        model.train()
        seen = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 50, (seqs, length))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        totals.append(sum(v for k, v in seen.items() if k not in params))
    return (totals[1] - totals[0]) / 2 / 4 / (seqs * length)


@pytest.mark.parametrize("lora", [None, "all-linear", ["q_proj", "v_proj"]])
def test_activation_count_equals_what_autograd_saves(lora):
    from rlcourse.memory import TransformerShape, activation_values_per_token

    _, cfg = _qwen()
    shape = TransformerShape.from_config(cfg)
    predicted = activation_values_per_token(shape, 4 if lora else None, lora or "all-linear")
    # By hand for H=64, H_kv=32, I=96, 4 heads: full 8*64 + 2*32 + 4*96 + 2 + 4 = 966.
    assert activation_values_per_token(shape) == 966
    assert _saved_values_per_layer_token(lora) == predicted


def test_training_step_memory_by_hand():
    from rlcourse.memory import TransformerShape, training_step_memory

    s = TransformerShape(vocab=100, hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16,
                         tied=True, qkv_bias=False)
    # N = 800 + 2 * (64 + 32 + 32 + 64 + 3 * 128 + 16) + 8 = 1,992 (head dim 4, H_kv = 4).
    assert s.n_params == 1992
    m = training_step_memory(s, n_sequences=2, seq_len=5, logits="full")
    # fp32: W = G = 4N, AdamW 8N; the update's temporaries: two tensors of the size of the
    # largest trained one, the 100 x 8 embedding (2 x 3,200 bytes).
    assert (m.weights, m.gradients, m.optimizer) == (7968, 7968, 15936)
    # Activations: 4 bytes * 10 tokens * 2 layers * (64 + 8 + 64 + 2 + 2) = 11,200;
    # logits 3 * 4 * 10 * 100 = 12,000; output-layer gradient 3,200.
    assert (m.activations, m.logits) == (11200, 12000)
    assert m.peak == max(7968 + 11200 + 12000 + 3200, 7968 * 2 + 15936 + 6400) == 38272
    assert m.phase == "optimizer step"
    # foreach AdamW (GPUs): a square root of every second moment at once, 4N bytes.
    assert training_step_memory(s, 2, 5, foreach=True, logits="full").peak == 7968 * 3 + 15936
    g = training_step_memory(s, 2, 5, lora_r=2, checkpointing=True, weight_bytes=2)
    # LoRA r=2: 2 layers * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) = 512 adapter numbers.
    assert g.trainable == 512
    assert g.weights == 2 * (1992 - 512) + 4 * 512
    # Checkpointing: every layer's input (2 x 8) plus one layer recomputed, per token.
    per_layer = 6 * 8 + 2 * 4 + 4 * 16 + 2 + 2 + 2 * 7
    assert g.activations == 4 * 10 * (2 * 8 + per_layer)
    assert g.phase == "backward"


def test_chunked_logits_by_hand(monkeypatch):
    """Chunked log-probs hold two float32 buffers of one chunk of c tokens: 2 * 4 c V bytes,
    c = min(S T, LOGIT_CHUNK_BYTES // (4 V)); the same chunk the scoring code uses."""
    import rlcourse.memory as memory
    from rlcourse.memory import TransformerShape, training_step_memory
    from rlcourse.models.logprobs import CHUNK_BYTES, chunk_tokens

    assert CHUNK_BYTES == memory.LOGIT_CHUNK_BYTES == 2**28
    assert chunk_tokens(151936) == 2**28 // (4 * 151936) == 441
    s = TransformerShape(vocab=100, hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16,
                         tied=True, qkv_bias=False)
    # every one of the 10 tokens fits a chunk of 2**28 / 400 tokens: 2 * 4 * 10 * 100
    assert training_step_memory(s, 2, 5).logits == 8000
    monkeypatch.setattr(memory, "LOGIT_CHUNK_BYTES", 4 * 100 * 3)  # chunks of 3 tokens
    m = training_step_memory(s, 2, 5, lora_r=2, reference_sequences=1)
    assert m.logits == 2 * 4 * 3 * 100
    assert m.reference_pass == m.weights + 2 * 4 * 3 * 100
    full = training_step_memory(s, 2, 5, lora_r=2, reference_sequences=1, logits="full")
    assert full.logits == 12 * 10 * 100 and full.reference_pass == full.weights + 12 * 5 * 100
    with pytest.raises(ValueError, match="chunked"):
        training_step_memory(s, 2, 5, logits="some")


def test_seven_billion_on_80_gb():
    from rlcourse.memory import QWEN25_7B, training_step_memory

    full = training_step_memory(QWEN25_7B, 8, 1024, activation_bytes=2)
    lora = training_step_memory(QWEN25_7B, 8, 1024, lora_r=16, weight_bytes=2,
                                activation_bytes=2)
    gc = training_step_memory(QWEN25_7B, 8, 1024, lora_r=16, weight_bytes=2,
                              activation_bytes=2, checkpointing=True)
    assert full.weights + full.gradients + full.optimizer == 16 * QWEN25_7B.n_params
    assert full.peak / GIB > 80 and gc.peak / GIB < 80 and gc.peak < lora.peak < full.peak


def test_model_roles_follow_the_objectives_table():
    """Every preference loss in OBJECTIVES has roles, read from its row (before, a list kept
    beside it: hinge and robust DPO raised 'unknown method')."""
    from rlcourse.losses import OBJECTIVES
    from rlcourse.memory import model_roles

    # written out for the rows added with the registry (hinge and robust DPO keep a reference)
    assert [r.name for r in model_roles("hinge", 10)] == ["policy", "reference"]
    assert [r.name for r in model_roles("robust", 10)] == ["policy", "reference"]
    assert [r.name for r in model_roles("simpo", 10)] == ["policy"]
    for name, objective in OBJECTIVES.items():
        if name == "bt":
            continue
        roles = [r.name for r in model_roles(name, 10)]
        assert roles == (["policy", "reference"] if objective.needs_reference else ["policy"])
        assert [r.name for r in model_roles(name, 10, precompute_reference=True)] == ["policy"]
