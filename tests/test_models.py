"""Tests for rlcourse.models against hand computations and unpadded single-sequence runs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from rlcourse.models import (
    Generation,
    RewardModel,
    ValueHeadModel,
    _filter_logits,
    build_model,
    build_tokenizer,
    encode_prompt_completion,
    format_completion,
    format_prompt,
    generate,
    last_token_index,
    load_model,
    logprobs_from_logits,
    position_ids_from_mask,
    save_model,
    sequence_logprobs,
    tiny_config,
)

torch.set_num_threads(1)

CORPUS = [
    "the river is long .",
    "what is a river ?",
    "hello, world!",
    "a cat is small and a dog is big .",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tok, hidden_size=32, n_layers=2, n_heads=4, seed=0).eval()


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_ids_and_punctuation(tok):
    assert [tok.convert_tokens_to_ids(t) for t in
            ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>"]] == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
    ids = tok("hello, world!", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["hello", ",", "world", "!"]
    # "Whale" is not in the corpus -> <unk>
    assert tok("Whale", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    # vocab = 6 specials + the distinct words of the corpus
    words = {"the", "river", "is", "long", ".", "what", "a", "?", "hello", ",", "world", "!",
             "cat", "small", "and", "dog", "big"}
    assert len(tok) == 6 + len(words)


def test_tokenizer_decode_is_clean(tok):
    ids = tok("<bos> <user> hello , world ! <assistant>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello, world!"
    ids = tok("the river is long.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the river is long."


def test_tokenizer_save_load_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "<bos> <user> what is a river? <assistant> the river is long. <eos>"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert (tok2.pad_token_id, tok2.bos_token_id, tok2.eos_token_id) == (0, 2, 3)
    assert format_prompt("hi", tok2) == "<bos> <user> hi <assistant>"


def test_chat_template_matches_format_prompt(tok):
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "what is a river?"}], tokenize=False,
        add_generation_prompt=True,
    )
    ids_a = tok(rendered, add_special_tokens=False)["input_ids"]
    ids_b = tok(format_prompt("what is a river?", tok), add_special_tokens=False)["input_ids"]
    assert ids_a == ids_b
    assert format_prompt("x") == "<bos> <user> x <assistant>"
    assert format_completion("the river.") == "the river. <eos>"


# ----------------------------------------------------------------------------- encoding
def test_encode_prompt_completion_right_and_left(tok):
    p_ids = [2, 4] + tok("what is a river?", add_special_tokens=False)["input_ids"] + [5]
    c_ids = tok("the river is long.", add_special_tokens=False)["input_ids"] + [3]
    p2 = [2, 4, tok.convert_tokens_to_ids("hello"), 5]
    c2 = [tok.convert_tokens_to_ids("world"), 3]
    for side in ("right", "left"):
        b = encode_prompt_completion(
            tok, ["what is a river?", "hello"], ["the river is long.", "world"], 64,
            padding_side=side,
        )
        L = len(p_ids) + len(c_ids)
        assert b["input_ids"].shape == (2, L)
        assert b["input_ids"][0].tolist() == p_ids + c_ids
        assert b["completion_mask"][0].tolist() == [0] * len(p_ids) + [1] * len(c_ids)
        n2 = len(p2) + len(c2)
        pad = [0] * (L - n2)
        if side == "right":
            assert b["input_ids"][1].tolist() == p2 + c2 + pad
            assert b["attention_mask"][1].tolist() == [1] * n2 + pad
            assert b["completion_mask"][1].tolist() == [0, 0, 0, 0, 1, 1] + pad
        else:
            assert b["input_ids"][1].tolist() == pad + p2 + c2
            assert b["attention_mask"][1].tolist() == pad + [1] * n2
            assert b["completion_mask"][1].tolist() == pad + [0, 0, 0, 0, 1, 1]
        assert b["prompt_lengths"].tolist() == [len(p_ids), 4]
        assert b["completion_lengths"].tolist() == [len(c_ids), 2]


def test_encode_too_long_error_and_truncation(tok):
    prompts, comps = ["what is a river ?", "hello"], ["the river is long .", "world"]
    with pytest.raises(ValueError, match=r"prefs.jsonl:7.*exceeds max_length=10"):
        encode_prompt_completion(tok, prompts, comps, 10, names=["prefs.jsonl:7", "x:2"])
    with pytest.warns(UserWarning, match=r"truncated 1 of 2 examples"):
        b = encode_prompt_completion(tok, prompts, comps, 10, truncation="left")
    assert b["truncated"].tolist() == [True, False]
    assert b["input_ids"].shape[1] == 10
    c_ids = tok("the river is long .", add_special_tokens=False)["input_ids"] + [3]
    assert b["input_ids"][0, -6:].tolist() == c_ids  # completion kept whole
    assert b["completion_lengths"].tolist() == [6, 2]
    with pytest.warns(UserWarning):
        b = encode_prompt_completion(tok, prompts, comps, 10, truncation="right")
    assert b["completion_lengths"][0].item() == 10 - 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompt_completion(tok, prompts, comps, 64, truncation="left")  # no warning


# ----------------------------------------------------------------------------- model
def test_tiny_config_param_count_and_tying(tok):
    V, H, L = len(tok), 32, 2
    m = build_model(tok, hidden_size=H, n_layers=L)
    n = sum(p.numel() for p in m.parameters())
    I_ = 3 * H
    assert n == V * H + L * (4 * H * H + 3 * H * I_ + 2 * H) + H
    assert m.get_input_embeddings().weight.data_ptr() == m.get_output_embeddings().weight.data_ptr()
    q = build_model(tok, hidden_size=H, n_layers=L, arch="qwen2")
    assert q.config.model_type == "qwen2"
    assert tiny_config(100).model_type == "llama"
    with pytest.raises(ValueError, match="arch"):
        tiny_config(100, arch="gpt9")


def test_build_model_seeded_and_leaves_global_rng(tok):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(tok, hidden_size=32, seed=1)
    after = torch.rand(3)
    assert torch.equal(before, after)  # global RNG untouched
    b = build_model(tok, hidden_size=32, seed=1)
    c = build_model(tok, hidden_size=32, seed=2)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_save_load_roundtrip(tok, model, tmp_path):
    path = tmp_path / "ckpt"
    save_model(model, tok, path)
    assert (path / "model.safetensors").exists()
    save_model(model, tok, path)  # overwriting an existing checkpoint works
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert leftovers == []
    m2, t2 = load_model(path, device="cpu")
    ids = torch.tensor([[2, 4, 7, 8, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(m2(ids).logits, model(ids).logits, atol=1e-6)
    assert t2("hello", add_special_tokens=False)["input_ids"] == tok(
        "hello", add_special_tokens=False)["input_ids"]
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")


# ----------------------------------------------------------------------------- log-probs
def test_logprobs_from_logits_hand_example():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]]])
    labels = torch.tensor([[2, 0]])
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    expected = torch.tensor([[3.0 - z, math.log(1 / 4)]])
    assert torch.allclose(logprobs_from_logits(logits, labels), expected, atol=1e-6)
    # Huge logits in half precision stay finite.
    big = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.bfloat16)
    out = logprobs_from_logits(big, torch.tensor([1]))
    assert torch.isfinite(out).all() and out.item() == pytest.approx(-2e4, rel=1e-2)


class FixedLogits(nn.Module):
    """A stub 'model' whose logits are given: ignores ids, returns the table."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, position_ids=None):
        class Out:
            pass

        o = Out()
        o.logits = self.logits
        return o


def test_sequence_logprobs_hand_built_logits():
    # One sequence of 4 tokens, vocab 3. Prompt = token 0, completion = tokens 1..3
    # (the last of which is padding).
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    ids = torch.tensor([[0, 2, 1, 0]])
    attn = torch.tensor([[1, 1, 1, 0]])
    comp = torch.tensor([[0, 1, 1, 0]])
    lse0 = math.log(1 + math.e + math.e**2)
    lp1 = 2.0 - lse0  # log p(ids[1]=2 | logits[0])
    lp2 = math.log(1 / 3)  # log p(ids[2]=1 | logits[1])
    m = FixedLogits(logits)
    none = sequence_logprobs(m, ids, attn, comp, reduce="none")
    assert none.shape == (1, 3)
    assert torch.allclose(none, torch.tensor([[lp1, lp2, 0.0]]), atol=1e-6)
    assert sequence_logprobs(m, ids, attn, comp).item() == pytest.approx(lp1 + lp2, abs=1e-6)
    assert sequence_logprobs(m, ids, attn, comp, reduce="mean").item() == pytest.approx(
        (lp1 + lp2) / 2, abs=1e-6)
    empty = torch.zeros_like(comp)
    assert sequence_logprobs(m, ids, attn, empty, reduce="mean").item() == 0.0
    # The same sequence LEFT padded: the logits table moves with the tokens.
    left = FixedLogits(torch.cat([torch.full((1, 1, 3), 7.0), logits[:, :3]], dim=1))
    ids_l, attn_l = torch.tensor([[0, 0, 2, 1]]), torch.tensor([[0, 1, 1, 1]])
    comp_l = torch.tensor([[0, 0, 1, 1]])
    got = sequence_logprobs(left, ids_l, attn_l, comp_l, reduce="none")
    assert torch.allclose(got, torch.tensor([[0.0, lp1, lp2]]), atol=1e-6)


def _alone_logprob_sum(model, prompt_ids, comp_ids):
    """Oracle: run ONE unpadded sequence and add up log p of each completion token in float64."""
    ids = torch.tensor([prompt_ids + comp_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    total = 0.0
    for j in range(len(comp_ids)):
        t = len(prompt_ids) + j  # position of the completion token
        row = logits[t - 1]
        total += (row[ids[0, t]] - torch.logsumexp(row, 0)).item()
    return total


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sequence_logprobs_matches_unpadded(tok, side, arch):
    model = build_model(tok, hidden_size=32, n_layers=2, arch=arch, seed=3).eval()
    prompts = ["what is a river?", "hello", "a cat is small and a dog is big."]
    comps = ["the river is long.", "world!", "a"]
    b = encode_prompt_completion(tok, prompts, comps, 64, padding_side=side)
    with torch.no_grad():
        got_sum = sequence_logprobs(model, b["input_ids"], b["attention_mask"],
                                    b["completion_mask"])
        got_mean = sequence_logprobs(model, b["input_ids"], b["attention_mask"],
                                     b["completion_mask"], reduce="mean")
        got_none = sequence_logprobs(model, b["input_ids"], b["attention_mask"],
                                     b["completion_mask"], reduce="none")
    for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
        p_ids = tok(format_prompt(p), add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        want = _alone_logprob_sum(model, p_ids, c_ids)
        assert got_sum[i].item() == pytest.approx(want, abs=1e-4)
        assert got_mean[i].item() == pytest.approx(want / len(c_ids), abs=1e-4)
    # prompt and padding positions are exactly zero
    assert (got_none[b["completion_mask"][:, 1:] == 0] == 0).all()


def test_position_ids_and_last_token_index():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [
        [0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 1, 1], [0, 1, 2, 3, 4]]
    assert last_token_index(mask).tolist() == [4, 2, 2, 4]


# ----------------------------------------------------------------------------- generation
def test_filter_logits_hand_example():
    z = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    ninf = float("-inf")
    k2 = _filter_logits(z, top_k=2, top_p=1.0)
    assert torch.isinf(k2[0, [1, 3]]).all() and torch.isfinite(k2[0, [0, 2]]).all()
    # nucleus 0.7: 0.5 (mass before 0) kept, 0.3 (before 0.5) kept, the 0.1s (before 0.8) dropped
    p7 = _filter_logits(z, top_k=0, top_p=0.7)
    assert torch.isfinite(p7[0, [0, 2]]).all() and (p7[0, [1, 3]] == ninf).all()
    p4 = _filter_logits(z, top_k=0, top_p=0.4)  # only the top token
    assert torch.isfinite(p4[0, 0]) and (p4[0, 1:] == ninf).all()


def test_generate_shapes_masks_and_logprobs(tok, model):
    prompts = ["what is a river?", "hello", "a cat is small"] * 4
    g = generate(model, tok, prompts, max_new_tokens=12, seed=0)
    assert isinstance(g, Generation) and len(g) == 12
    B, T = g.completion_ids.shape
    assert T <= 12 and g.logprobs.shape == (B, T) == g.sampling_logprobs.shape
    eos = tok.eos_token_id
    for i in range(B):
        m = g.completion_mask[i].tolist()
        n = sum(m)
        assert m == [1] * n + [0] * (T - n)  # contiguous from the start
        ids = g.completion_ids[i].tolist()
        assert eos not in ids[: n - 1]  # nothing after the first EOS
        assert n == T or ids[n - 1] == eos
        assert all(x == tok.pad_token_id for x in ids[n:])
        assert (g.logprobs[i, n:] == 0).all()
        assert g.texts[i] == tok.decode(ids[:n], skip_special_tokens=True)
    # prompts are left padded
    assert (g.prompt_attention_mask[:, -1] == 1).all()
    # temperature 1, no filtering: sampling distribution == raw model
    assert torch.allclose(g.logprobs, g.sampling_logprobs, atol=1e-5)
    # the KV-cache log-probs equal an independent full forward over the padded batch
    with torch.no_grad():
        full = sequence_logprobs(model, g.full_ids, g.full_attention_mask,
                                 g.full_completion_mask, reduce="none")
    P = g.prompt_ids.shape[1]
    assert torch.allclose(full[:, P - 1:], g.logprobs, atol=1e-5)


def test_generate_seeded_repeatable(tok, model):
    prompts = ["what is a river?", "hello"] * 5
    a = generate(model, tok, prompts, max_new_tokens=10, seed=7)
    b = generate(model, tok, prompts, max_new_tokens=10, seed=7, batch_size=3)
    c = generate(model, tok, prompts, max_new_tokens=10, seed=8)
    assert a.texts == b.texts  # sample i depends on the seed and i, not on the batching
    assert a.texts != c.texts
    a2 = generate(model, tok, prompts, max_new_tokens=10, seed=7)
    assert torch.equal(a.completion_ids, a2.completion_ids)
    assert torch.equal(a.logprobs, a2.logprobs)


def test_generate_temperature_and_greedy(tok, model):
    prompts = ["what is a river?", "hello"]
    g = generate(model, tok, prompts, max_new_tokens=6, temperature=0.5, seed=0)
    # oracle: log_softmax(z / 0.5) of a full unpadded forward, first token
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(format_prompt(p), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            z = model(ids).logits[0, -1].double()
        a0 = g.completion_ids[i, 0]
        assert g.sampling_logprobs[i, 0].item() == pytest.approx(
            (z[a0] / 0.5 - torch.logsumexp(z / 0.5, 0)).item(), abs=1e-4)
        assert g.logprobs[i, 0].item() == pytest.approx(
            (z[a0] - torch.logsumexp(z, 0)).item(), abs=1e-4)
    greedy = generate(model, tok, prompts, max_new_tokens=6, do_sample=False)
    top1 = generate(model, tok, prompts, max_new_tokens=6, top_k=1, seed=3)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    assert (greedy.sampling_logprobs == 0).all()
    # greedy continuation: each token is the argmax of an unpadded forward
    ids = tok(format_prompt(prompts[0]), add_special_tokens=False)["input_ids"]
    for t in range(int(greedy.completion_mask[0].sum())):
        with torch.no_grad():
            nxt = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        assert nxt == greedy.completion_ids[0, t].item()
        ids.append(nxt)


class Bigram(nn.Module):
    """A stub causal LM: logits of the next token depend on the current token only."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=None):
        class Out:
            pass

        o = Out()
        o.logits = self.table[input_ids]
        return o


def test_generate_stops_at_eos_and_samples_the_right_distribution(tok):
    V = len(tok)
    table = torch.full((V, V), -1e9)
    a, b = tok.convert_tokens_to_ids("river"), tok.convert_tokens_to_ids("cat")
    asst = tok.convert_tokens_to_ids("<assistant>")
    table[asst, a], table[asst, b] = math.log(0.8), math.log(0.2)
    table[a, tok.eos_token_id] = 0.0  # after "river": EOS
    table[b, a] = 0.0  # after "cat": "river" then EOS
    g = generate(Bigram(table), tok, ["hello"] * 2000, max_new_tokens=5, seed=0)
    first = g.completion_ids[:, 0]
    frac = (first == a).float().mean().item()
    assert abs(frac - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 2000)
    assert g.completion_ids.shape[1] == 3  # longest is "cat river <eos>"
    assert set(g.texts) == {"river", "cat river"}
    lens = g.completion_lengths
    assert ((lens == 2) == (first == a)).all() and ((lens == 3) == (first == b)).all()
    lp = g.logprobs.sum(-1)
    want = torch.where(first == a, torch.tensor(math.log(0.8)), torch.tensor(math.log(0.2)))
    assert torch.allclose(lp, want, atol=1e-5)


# ----------------------------------------------------------------------------- heads
def test_value_head_model(tok, model):
    vm = ValueHeadModel(model, seed=0)
    prompts, comps = ["what is a river?", "hello"], ["the river is long.", "world"]
    right = encode_prompt_completion(tok, prompts, comps, 64)
    left = encode_prompt_completion(tok, prompts, comps, 64, padding_side="left")
    with torch.no_grad():
        lr, vr = vm(right["input_ids"], right["attention_mask"])
        ll, vl = vm(left["input_ids"], left["attention_mask"])
        assert lr.shape[:2] == vr.shape == right["input_ids"].shape
        # oracle: head applied by hand to the hidden state of the sequence alone
        n = int(right["attention_mask"][1].sum())
        alone = right["input_ids"][1:2, :n]
        h = model(alone, output_hidden_states=True).hidden_states[-1][0].double()
        want = h @ vm.head.weight[0].double() + vm.head.bias.double()
    assert torch.allclose(vr[1, :n].double(), want, atol=1e-5)
    assert torch.allclose(vl[1, -n:].double(), want, atol=1e-5)


def test_reward_model_padding_invariant_and_save_load(tok, tmp_path):
    rm = RewardModel.build(tok, hidden_size=32, n_layers=2, seed=0).eval()
    prompts, comps = ["what is a river?", "hello"], ["the river is long.", "world"]
    right = encode_prompt_completion(tok, prompts, comps, 64)
    left = encode_prompt_completion(tok, prompts, comps, 64, padding_side="left")
    with torch.no_grad():
        r_right = rm(right["input_ids"], right["attention_mask"])
        r_left = rm(left["input_ids"], left["attention_mask"])
        n = int(right["attention_mask"][1].sum())
        alone = right["input_ids"][1:2, :n]
        h = rm.model(alone, output_hidden_states=True).hidden_states[-1][0, -1].double()
        want = (h @ rm.head.weight[0].double() + rm.head.bias.double()).item()
    assert r_right.shape == (2,)
    assert r_right[1].item() == pytest.approx(want, abs=1e-5)
    assert torch.allclose(r_left, r_right, atol=1e-5)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    rm2 = RewardModel.from_pretrained(tmp_path / "rm", device="cpu")
    with torch.no_grad():
        assert torch.allclose(rm2(right["input_ids"], right["attention_mask"]), r_right,
                              atol=1e-6)
    with pytest.raises(FileNotFoundError, match="reward_head"):
        RewardModel.from_pretrained(_plain_checkpoint(tok, tmp_path), device="cpu")


def _plain_checkpoint(tok, tmp_path):
    path = tmp_path / "plain"
    save_model(build_model(tok, hidden_size=32), tok, path)
    return path


def test_generate_without_chat_format_continues_raw_text(tok, model):
    g = generate(model, tok, ["<bos> the river"], max_new_tokens=4, do_sample=False, chat=False)
    ids = tok("<bos> the river", add_special_tokens=False)["input_ids"]
    assert g.prompt_ids[0].tolist() == ids
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].argmax().item()
    assert g.completion_ids[0, 0].item() == first
    with pytest.raises(ValueError, match="zero tokens"):
        generate(model, tok, [""], chat=False)


def test_last_token_index_is_one_function_and_all_padding_gives_zero():
    """``rlcourse.models`` and ``rlcourse.rl`` once had two versions that disagreed on a row
    without real tokens (``T - 1`` vs 0): the reward head read a padding position there."""
    from rlcourse import rl

    assert last_token_index is rl.last_token_index
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]])
    # hand-computed: no real token -> 0; otherwise the largest t with mask 1
    assert last_token_index(mask).tolist() == [0, 1, 2]


def test_kv_cache_sampler_draws_the_samples_of_a_cache_free_sampler(tok, model):
    """Group sampling with the KV cache (``generate``: left-padded batch, position ids counted
    over real tokens, one new token fed per step) against the simplest sampler there is: each
    prompt alone, no padding, no cache, the whole sequence run through the model at every step.
    Same seed, so the same uniform numbers decide each (row, step): the same tokens, with
    temperature and top-k/top-p filtering on."""
    from rlcourse.models.generation import _filter_logits, _inverse_cdf_sample
    from rlcourse.models.tokenizer import encode_prompts

    prompts = ["what is a river?", "hello", "a cat is small", "hello"] * 2
    steps, temperature, top_k, top_p, seed = 10, 0.8, 6, 0.95, 11
    g = generate(model, tok, prompts, max_new_tokens=steps, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=seed, batch_size=3)
    uniforms = torch.rand((len(prompts), steps), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed))
    model.eval()
    for i, ids in enumerate(encode_prompts(tok, prompts)):
        ids, drawn = list(ids), []
        with torch.no_grad():
            for t in range(steps):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[:, -1]
                logp = torch.log_softmax(_filter_logits(logits.float() / temperature, top_k,
                                                        top_p), dim=-1)
                token = int(_inverse_cdf_sample(logp, uniforms[i, t:t + 1]))
                drawn.append(token)
                ids.append(token)
                if token == tok.eos_token_id:
                    break
        n = int(g.completion_mask[i].sum())
        assert g.completion_ids[i, :n].tolist() == drawn, prompts[i]
