"""Data preparation and cost measurement of the preference trainers, each in its one home.

The ``"reject"`` alias, rows as mappings, the pair split and the unpadding of batches live in
:mod:`rlcourse.data`; token counting and peak memory in :mod:`rlcourse.engine`;
:mod:`rlcourse.preference` and :mod:`rlcourse.worlds.assistant` use them. Rows are tokenised
once, with the caller's ``truncation``, whether :func:`train_preference` is called directly or
through a recipe.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

from rlcourse import data, engine, preference, recipes
from rlcourse.config import REPO_ROOT
from rlcourse.data import (
    ALIASES,
    DataError,
    Record,
    as_rows,
    field_of,
    pairs_to_unpaired,
    split_padded,
    write_jsonl,
)
from rlcourse.engine import TrainConfig, count_tokens, peak_memory
from rlcourse.models import build_model, build_tokenizer, save_model
from rlcourse.worlds.assistant import unpaired_from_pairs

torch.set_num_threads(1)

PAIRS = [
    {"prompt": "what is rain ?", "chosen": "rain is wet .", "rejected": "rain is dry ."},
    {"prompt": "what is snow ?", "chosen": "snow is cold .", "reject": "snow is hot ."},
    {"prompt": "what is fire ?", "chosen": "fire is hot .", "rejected": "let me explain ."},
    {"prompt": "what is ice ?", "chosen": "ice is cold .", "rejected": "ice is hot ."},
]
#: A pair whose prompt alone is longer than MAX_LENGTH tokens.
LONG = {"prompt": "tell me about rain and snow and fire and ice " * 4, "chosen": "rain is wet .",
        "rejected": "ice is hot ."}
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(str(v) for v in p.values()) for p in [*PAIRS, LONG]]
    return build_tokenizer(texts)


def _config(**kw):
    base = dict(lr=1e-2, max_steps=2, batch_size=4, log_every=1, device="cpu", progress=False,
                warmup_steps=0, schedule="constant", seed=0)
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------
# One home for each piece
# --------------------------------------------------------------------------------------------
def test_one_alias_table_read_by_the_loader_and_the_row_helpers(tmp_path):
    assert ALIASES == {"reject": "rejected"}
    assert field_of({"reject": "no"}, "rejected") == "no"
    assert field_of({"rejected": "a", "reject": "b"}, "rejected") == "a"
    with pytest.raises(KeyError, match="pair 3: missing field 'chosen'"):
        field_of({"prompt": "x"}, "chosen", "pair 3")
    rows = as_rows(PAIRS, ("prompt", "chosen", "rejected"))
    assert rows[1] == {"prompt": "what is snow ?", "chosen": "snow is cold .",
                       "rejected": "snow is hot ."}
    assert rows[0] is PAIRS[0]  # canonical rows pass through untouched
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    loaded = data.load_preferences(path)
    assert [r["rejected"] for r in loaded] == [r["rejected"] for r in rows]
    assert isinstance(as_rows(loaded, ("prompt",))[0], Record)


def test_moved_names_keep_their_old_homes():
    assert preference.pairs_to_unpaired is data.pairs_to_unpaired
    for name in ("_field", "_as_rows", "_peak_memory"):
        assert not hasattr(preference, name)
    for name in ("_split", "_count_tokens", "_peak_mem_mb"):
        assert not hasattr(data, name) and not hasattr(engine, name)


def test_pairs_to_unpaired_interleaves_pairs_and_unpaired_from_pairs_builds_on_it():
    split = pairs_to_unpaired(PAIRS)
    assert [(r["completion"], r["label"]) for r in split[:4]] == [
        ("rain is wet .", True), ("rain is dry .", False),
        ("snow is cold .", True), ("snow is hot .", False)]
    # unpaired_from_pairs: the same examples, balanced (None: all of them) and shuffled.
    def key(r):
        return (r["prompt"], r["completion"], r["label"])

    assert Counter(map(key, unpaired_from_pairs(PAIRS, None, seed=0))) == Counter(map(key, split))
    assert unpaired_from_pairs(PAIRS, 0.5, seed=1) == unpaired_from_pairs(PAIRS, 0.5, seed=1)


def test_split_padded_unpads_and_prefixes():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "completion_mask": torch.tensor([[0, 1, 1], [0, 1, 0]])}
    a, b = split_padded(batch, "kl_")
    assert set(a) == {"kl_input_ids", "kl_attention_mask", "kl_completion_mask"}
    assert b["kl_input_ids"].tolist() == [8, 9] and b["kl_completion_mask"].tolist() == [0, 1]
    b["kl_input_ids"][0] = 1
    assert batch["input_ids"][1, 0] == 8  # copies, not views


def test_kto_mismatched_pairs_are_the_unpadded_rows_of_one_encoding(tok):
    rows = pairs_to_unpaired(PAIRS)
    items = preference.tokenize_kto(tok, rows, max_length=64, seed=0)
    partners = preference.mismatched_partners([r["prompt"] for r in rows], 0)
    alone = data.tokenize_sft(tok, [{"prompt": rows[i]["prompt"],
                                     "completion": rows[j]["completion"]}
                                    for i, j in enumerate(partners)], 64)
    for item, own in zip(items, alone, strict=True):
        for k in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(item[f"kl_{k}"], own[k])


def test_token_counts_and_peak_memory_come_from_the_engine(tok):
    pairs = preference.tokenize_pairs(tok, PAIRS, 64)
    kto = preference.tokenize_kto(tok, pairs_to_unpaired(PAIRS), 64)
    # n_tokens: the tokens forwarded with gradient (the KTO mismatched pairs are not).
    assert preference.n_tokens(pairs) == sum(count_tokens(it) for it in pairs)
    assert preference.n_tokens(pairs) == sum(  # by hand: every real token of both answers
        len(it["chosen_input_ids"]) + len(it["rejected_input_ids"]) for it in pairs)
    assert preference.n_tokens(kto) == sum(int(it["attention_mask"].sum()) for it in kto)
    assert sum(count_tokens(it) for it in kto) == preference.n_tokens(kto) + sum(
        int(it["kl_attention_mask"].sum()) for it in kto)
    assert count_tokens({"input_ids": torch.zeros(2, 3)}) == 6 and count_tokens([1]) == 0
    peak, kind = peak_memory(torch.device("cpu"))
    assert peak > 2**20 and kind == "process peak RSS (CPU)"


# --------------------------------------------------------------------------------------------
# Tokenised once, with the caller's truncation
# --------------------------------------------------------------------------------------------
def _counting(monkeypatch):
    """Count the calls of the one tokeniser of preference rows (rows per call)."""
    calls: list[int] = []
    original = preference.tokenize_preferences

    def counted(tokenizer, rows, *args, **kw):
        calls.append(len(rows))
        return original(tokenizer, rows, *args, **kw)

    monkeypatch.setattr(preference, "tokenize_preferences", counted)
    return calls


def test_train_preference_truncates_as_asked_and_tokenises_once(tok, monkeypatch):
    calls = _counting(monkeypatch)
    rows = [*PAIRS, LONG]
    with pytest.raises(DataError, match="exceeds max_length"):
        preference.train_preference("dpo", build_model(tok, n_layers=1, hidden_size=32,
                                                       n_heads=2, seed=0),
                                    rows, _config(), tokenizer=tok, max_length=MAX_LENGTH)
    calls.clear()
    model = build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = preference.train_preference("dpo", model, rows, _config(), tokenizer=tok,
                                          max_length=MAX_LENGTH, truncation="left",
                                          eval_data=rows)
    assert calls == [len(rows), len(rows)]  # the training rows once, the eval rows once
    assert len(run.history.series("loss")[0]) == 2
    full = preference.tokenize_pairs(tok, [LONG], max_length=512)[0]
    long = run.items[-1]
    for side in ("chosen", "rejected"):
        ids = long[f"{side}_input_ids"]
        assert len(ids) == MAX_LENGTH < len(full[f"{side}_input_ids"])
        assert torch.equal(ids, full[f"{side}_input_ids"][-MAX_LENGTH:])  # cut from the left


def test_a_recipe_tokenises_its_rows_once_with_its_truncation(tok, tmp_path, monkeypatch):
    save_model(build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0), tok,
               tmp_path / "model")
    write_jsonl(tmp_path / "pairs.jsonl", [*PAIRS, LONG])
    calls = _counting(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = recipes.main([
            str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(tmp_path / "model"),
            "--data", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "out"),
            "train.max_steps=2", "train.batch_size=4", "train.grad_accum_steps=1",
            "train.warmup_steps=0", "train.log_every=1", "train.progress=false",
            f"max_length={MAX_LENGTH}", "truncation=left",
            f"eval_data={tmp_path / 'pairs.jsonl'}"])
    assert code == 0
    assert calls == [len(PAIRS) + 1, len(PAIRS) + 1]  # training rows once, eval rows once
