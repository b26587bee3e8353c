"""Preference trainers: batch -> loss functions, reference precomputation, the recipe.

Tiny models built here (2 layers, hidden 32). Oracles: log-probs recomputed one unpadded
example at a time with an explicit log-softmax, ``ln 2`` for DPO at the first step, and the
gradients of separate runs for accumulation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlcourse.data import pad_collate
from rlcourse.models import build_model, build_tokenizer, format_prompt
from rlcourse.preference import (
    LOSS_FNS,
    make_loss_fn,
    mismatched_partners,
    n_tokens,
    pairs_to_unpaired,
    policy_logps,
    precompute_reference_logps,
    tokenize_kto,
    tokenize_pairs,
)

torch.set_num_threads(1)

PAIRS = [
    {"prompt": "what is rain ?", "chosen": "rain is wet .",
     "rejected": "rain is dry . rain is dry ."},
    {"prompt": "what is snow ?", "chosen": "snow is cold .", "reject": "snow is hot ."},
    {"prompt": "tell me about dogs", "chosen": "a dog can bark . dogs are loyal .",
     "rejected": "that is a stupid question ."},
    {"prompt": "what is the sun ?", "chosen": "the sun is a star .",
     "rejected": "the sun is cold ."},
    {"prompt": "what is fire ?", "chosen": "fire is hot .", "rejected": "let me explain ."},
    {"prompt": "tell me about cats", "chosen": "a cat can purr .", "rejected": "a dog can bark ."},
    {"prompt": "what is ice ?", "chosen": "ice is cold .", "rejected": "ice is hot . ice is hot ."},
    {"prompt": "what is the moon ?", "chosen": "the moon is a rock .",
     "rejected": "the moon is cheese ."},
]


def _text(p):
    return " ".join([p["prompt"], p["chosen"], p.get("rejected", p.get("reject", ""))])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([_text(p) for p in PAIRS])


def tiny(tok, seed=0):
    return build_model(tok, n_layers=2, hidden_size=32, n_heads=2, seed=seed)


def oracle_logp(model, tok, prompt, completion):
    """Sum of log p(token) over completion + EOS, one unpadded sequence, explicit log-softmax."""
    p_ids = tok(format_prompt(prompt, tok), add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for pos in range(len(p_ids), len(p_ids) + len(c_ids)):
        row = logits[pos - 1]
        total += float(row[ids[0, pos]] - torch.logsumexp(row, 0))
    return total, len(c_ids)


def test_reject_alias_and_token_counts(tok):
    items = tokenize_pairs(tok, PAIRS, max_length=64)
    assert len(items) == len(PAIRS)
    snow = items[1]
    n_completion = len(tok("snow is hot .", add_special_tokens=False)["input_ids"]) + 1
    assert int(snow["rejected_completion_mask"].sum()) == n_completion
    assert n_tokens(items) == sum(
        int(it["chosen_attention_mask"].sum() + it["rejected_attention_mask"].sum())
        for it in items
    )


def test_one_stacked_forward_matches_each_sequence_alone(tok):
    model = tiny(tok)
    items = tokenize_pairs(tok, PAIRS, max_length=64)
    batch = pad_collate(items, pad_id=tok.pad_token_id)
    with torch.no_grad():
        pc, pr, lc, lr = policy_logps(model, batch)
    for i, p in enumerate(PAIRS):
        want_c, n_c = oracle_logp(model, tok, p["prompt"], p["chosen"])
        want_r, n_r = oracle_logp(model, tok, p["prompt"], p.get("rejected", p.get("reject")))
        assert pc[i].item() == pytest.approx(want_c, abs=1e-4)
        assert pr[i].item() == pytest.approx(want_r, abs=1e-4)
        assert (lc[i].item(), lr[i].item()) == (n_c, n_r)


def test_precomputed_reference_logps_match_oracle(tok):
    model = tiny(tok, seed=3)
    items = precompute_reference_logps(model, tokenize_pairs(tok, PAIRS, 64), batch_size=3)
    for it, p in zip(items, PAIRS, strict=True):
        want, _ = oracle_logp(model, tok, p["prompt"], p["chosen"])
        assert it["reference_chosen_logps"].item() == pytest.approx(want, abs=1e-4)
        assert it["reference_chosen_logps"].dim() == 0


def test_dpo_first_step_is_ln2_when_policy_is_reference(tok):
    model = tiny(tok)
    items = precompute_reference_logps(model, tokenize_pairs(tok, PAIRS, 64))
    batch = pad_collate(items, pad_id=tok.pad_token_id)
    for beta in (0.1, 0.5):
        loss, metrics = make_loss_fn("dpo", beta=beta)(model, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_every_loss_fn_runs_and_backpropagates(tok):
    model = tiny(tok)
    paired = pad_collate(precompute_reference_logps(model, tokenize_pairs(tok, PAIRS, 64)))
    unpaired = pad_collate(
        precompute_reference_logps(model, tokenize_kto(tok, pairs_to_unpaired(PAIRS), 64))
    )
    for name in LOSS_FNS:
        model.zero_grad()
        loss, metrics = make_loss_fn(name)(model, unpaired if name == "kto" else paired)
        assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_make_loss_fn_rejects_typos():
    with pytest.raises(TypeError, match="betta"):
        make_loss_fn("dpo", betta=0.5)
    with pytest.raises(ValueError, match="unknown method"):
        make_loss_fn("ppo")


def test_kto_mismatched_pairs_have_another_prompt(tok):
    rows = pairs_to_unpaired(PAIRS)
    partners = mismatched_partners([r["prompt"] for r in rows], seed=0)
    for i, j in enumerate(partners):
        assert rows[j]["prompt"] != rows[i]["prompt"]
    items = tokenize_kto(tok, rows, 64)
    for it, r, j in zip(items, rows, partners, strict=True):
        kl_completion = it["kl_input_ids"][it["kl_completion_mask"].bool()]
        want = tok(rows[j]["completion"], add_special_tokens=False)["input_ids"]
        assert kl_completion.tolist() == want + [tok.eos_token_id]
        assert bool(it["label"]) == r["label"]


def test_kto_reference_point_uses_mismatched_pairs_without_gradient(tok):
    model = tiny(tok)
    items = precompute_reference_logps(model, tokenize_kto(tok, pairs_to_unpaired(PAIRS), 64))
    batch = pad_collate(items)
    # Policy = reference: every log-ratio is 0, so z0 = 0 and each loss is lambda * sigma(0).
    loss, metrics = make_loss_fn("kto", beta=0.1)(model, batch)
    assert metrics["kl"] == 0.0 and loss.item() == pytest.approx(0.5, abs=1e-6)
    # A different policy: z0 is the clamped mean log-ratio over the mismatched pairs.
    policy = tiny(tok, seed=7)
    _, metrics = make_loss_fn("kto", beta=0.1)(policy, batch)
    with torch.no_grad():
        ratios = []
        for it in items:
            ids = it["kl_input_ids"][None]
            logits = policy(input_ids=ids).logits[0, :-1].double()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            ratios.append(float((lp * it["kl_completion_mask"][1:]).sum())
                          - float(it["reference_kl_logps"]))
    assert metrics["kl"] == pytest.approx(max(0.0, sum(ratios) / len(ratios)), abs=1e-4)


def test_reference_precompute_leaves_model_untouched(tok):
    model = tiny(tok)
    before = copy.deepcopy(model.state_dict())
    model.train()
    precompute_reference_logps(model, tokenize_pairs(tok, PAIRS, 64))
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------------------------------------
# On the shared training loop
# ---------------------------------------------------------------------------------------------


def _config(**kw):
    from rlcourse.engine import TrainConfig

    base = dict(lr=1e-2, max_steps=3, batch_size=4, log_every=1, device="cpu", progress=False,
                warmup_steps=0, schedule="constant", seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", sorted(LOSS_FNS))
def test_every_trainable_parameter_changes_at_large_lr(tok, method):
    from rlcourse.preference import train_preference

    model = tiny(tok)
    before = {k: v.clone() for k, v in model.named_parameters()}
    run = train_preference(method, model, PAIRS, _config(), tokenizer=tok, max_length=64)
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, f"{method}: parameters that did not move: {unchanged}"
    assert run.tokens_per_second > 0 and run.peak_memory_bytes > 0
    assert math.isfinite(run.history.last("loss"))


def test_dpo_first_logged_loss_is_ln2_and_reference_never_changes(tok):
    from rlcourse.preference import train_preference

    model = tiny(tok)
    reference = copy.deepcopy(model)
    ref_state = copy.deepcopy(reference.state_dict())
    items = precompute_reference_logps(reference, tokenize_pairs(tok, PAIRS, 64))
    frozen = [(it["reference_chosen_logps"].clone(), it["reference_rejected_logps"].clone())
              for it in items]
    run = train_preference("dpo", model, items, _config(max_steps=4), tokenizer=tok, beta=0.5)
    steps, losses = run.history.series("loss")
    assert steps[0] == 1 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < math.log(2)  # it learned something
    for it, (c, r) in zip(run.items, frozen, strict=True):
        assert torch.equal(it["reference_chosen_logps"], c)
        assert torch.equal(it["reference_rejected_logps"], r)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_state[k])


def test_reference_model_is_released_before_training(tok):
    import gc

    from rlcourse.preference import train_preference

    model = tiny(tok)
    cls = type(model)
    counts = []

    def alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is cls)

    def count_models(step, history, m):
        counts.append(alive())

    # Models of this class that other tests in the same worker still hold count too, so the
    # count is relative to the one taken with the policy alone before training.
    before = alive()
    train_preference("dpo", model, PAIRS, _config(max_steps=2), tokenizer=tok,
                     engine_kwargs={"callbacks": [count_models]})
    assert counts == [before, before], (before, counts)  # the reference copy is gone


@pytest.mark.parametrize("method", ["dpo", "simpo", "kto"])
def test_gradient_accumulation_1x8_matches_8x1(tok, method):
    from rlcourse.preference import train_preference

    pairs = PAIRS if method != "kto" else PAIRS[:4]  # 8 unpaired examples
    results = []
    for batch_size, accum in ((8, 1), (1, 8)):
        model = tiny(tok)
        cfg = _config(lr=1e-3, max_steps=2, batch_size=batch_size, grad_accum_steps=accum,
                      max_grad_norm=None)
        run = train_preference(method, model, pairs, cfg, tokenizer=tok, max_length=64)
        results.append(({k: v.detach().clone() for k, v in model.named_parameters()},
                        run.history.series("loss")[1]))
    (big, loss_big), (small, loss_small) = results
    if method != "kto":
        # KTO's z0 is a batch mean: over 8 examples at once, over 1 in each micro-batch. The
        # per-example losses differ, so only DPO and SimPO must agree exactly.
        assert loss_big == pytest.approx(loss_small, rel=1e-5)
        for k in big:
            torch.testing.assert_close(big[k], small[k], rtol=1e-4, atol=1e-6)
    else:
        assert loss_big[0] == pytest.approx(loss_small[0], rel=1e-5)  # z0 = 0 at step 1


def test_score_pairs_matches_oracle(tok):
    from rlcourse.preference import score_pairs

    model = tiny(tok, seed=5)
    items = precompute_reference_logps(model, tokenize_pairs(tok, PAIRS, 64))
    scores = score_pairs(model, items, batch_size=3)
    for i, p in enumerate(PAIRS):
        want, n = oracle_logp(model, tok, p["prompt"], p["chosen"])
        assert scores["policy_chosen_logps"][i].item() == pytest.approx(want, abs=1e-4)
        assert scores["chosen_lengths"][i].item() == n
    torch.testing.assert_close(scores["reference_chosen_logps"], scores["policy_chosen_logps"])
