"""LoRA in the RL loops: the reference is the policy with its adapters switched off (as for DPO
under LoRA), so a KL penalty needs no second copy of the weights; a KL penalty with neither a
reference model nor adapters is refused (before, the group methods silently dropped it)."""

from __future__ import annotations

import copy

import pytest
import torch

from rlcourse import grpo, ppo
from rlcourse.adapters import apply_lora
from rlcourse.models import build_model, build_tokenizer, generate

torch.set_num_threads(1)
PROMPTS = ["name a fruit", "say a fruit"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["name say a fruit apple pear fig ."])


def _batch(model, tok):
    gen = generate(model, tok, PROMPTS, max_new_tokens=4, seed=0)
    return gen.full_ids, gen.full_attention_mask


def test_reference_of_a_lora_policy_is_the_base_model(tok):
    base = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():  # trained adapters: the policy now differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, attn = _batch(frozen, tok)
    expected = ppo.reference_logprobs(frozen, ids, attn)
    got = ppo.reference_logprobs(None, ids, attn, policy=policy)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(ppo.reference_logprobs(policy, ids, attn), expected, atol=1e-3)


def test_a_kl_penalty_without_reference_or_adapters_is_refused(tok):
    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    cfg = grpo.GroupConfig(group_size=2, n_prompts=2, kl_coef=0.1)
    with pytest.raises(ValueError, match="a KL penalty needs a reference model"):
        grpo.train_group_lm(model, tok, PROMPTS, lambda p, t: [1.0 * len(x) for x in t], cfg,
                            n_steps=1, max_new_tokens=3, device="cpu", progress=False)


def test_grpo_with_lora_and_a_kl_penalty_trains_only_the_adapters(tok):
    base = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    policy = apply_lora(base, {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora" not in n}
    cfg = grpo.GroupConfig(group_size=2, n_prompts=2, kl_coef=0.1)
    history = grpo.train_group_lm(policy, tok, PROMPTS,
                                  lambda p, t: [float(x.count("apple")) for x in t], cfg,
                                  n_steps=2, lr=1e-2, max_new_tokens=3, device="cpu",
                                  progress=False)
    assert history[0]["kl_k3"] == 0.0  # B = 0 at the start: the policy is its reference
    assert history[1]["kl_k3"] > 0.0
    for n, p in policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("reference", ["sft", "previous"])
def test_online_dpo_under_lora_uses_the_reference_it_names(tok, monkeypatch, reference):
    """'sft': the adapters switched off (no copy); 'previous': the policy as the round starts,
    adapters included (switching them off would silently give the base model)."""
    from rlcourse import online

    base = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    policy = apply_lora(base, {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    seen = []
    real = online.train_preference

    def spy(method, model, *args, reference_model=None, **kw):
        seen.append(reference_model)
        return real(method, model, *args, reference_model=reference_model, **kw)

    monkeypatch.setattr(online, "train_preference", spy)
    cfg = online.OnlineDPOConfig(rounds=2, epochs=1, batch_size=4, max_new_tokens=4,
                                 reference=reference)
    def longer(prompts, a, b):
        return [len(x) > len(y) for x, y in zip(a, b, strict=True)]

    online.online_dpo(policy, tok, PROMPTS * 4, longer, cfg)
    assert len(seen) == 2
    if reference == "sft":
        assert seen == [None, None]  # train_preference switches the adapters off
    else:
        assert all(r is not None and r is not policy for r in seen)
