"""Tests for rlcourse.data: validation messages, aliases, atomic writes, tokenisation, padding."""

from __future__ import annotations

import json

import pytest
import torch

from rlcourse.data import (
    Record,
    load_preferences,
    load_sft,
    load_unpaired,
    pad_collate,
    read_jsonl,
    tokenize_preferences,
    tokenize_sft,
    tokenize_unpaired,
    write_jsonl,
)
from rlcourse.models import build_tokenizer, format_prompt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["what is a river ?", "the river is long .", "a river is wet .", "hi"])


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_preferences_and_reject_alias(tmp_path):
    p = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "what is a river?", "chosen": "a river is wet.",
                    "rejected": "hi"}),
        "",
        json.dumps({"prompt": "hi", "chosen": "hi", "reject": "the river"}),
    ])
    rows = load_preferences(p)
    assert [dict(r) for r in rows] == [
        {"prompt": "what is a river?", "chosen": "a river is wet.", "rejected": "hi"},
        {"prompt": "hi", "chosen": "hi", "rejected": "the river"},
    ]
    assert rows[1].line == 3 and rows[1].where == f"{p}:3"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "chosen": "a"', r"p.jsonl:2: malformed JSON"),
    ('["x"]', r"p.jsonl:2: expected a JSON object"),
    ('{"prompt": "x", "chosen": "a"}', r"p.jsonl:2: missing field 'rejected'"),
    ('{"prompt": "x", "chosen": 3, "rejected": "b"}', r"p.jsonl:2: field 'chosen' must be a str"),
    ('{"prompt": "x", "chosen": "a", "rejected": "  "}', r"p.jsonl:2: field 'rejected' is empty"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "reject": "c"}', r"p.jsonl:2: both"),
])
def test_preference_errors_name_file_line_field(tmp_path, line, message):
    good = json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"})
    p = _write(tmp_path / "p.jsonl", [good, line])
    with pytest.raises(ValueError, match=message):
        load_preferences(p)


def test_load_unpaired_label_must_be_bool(tmp_path):
    ok = _write(tmp_path / "u.jsonl", [
        json.dumps({"prompt": "x", "completion": "a", "label": True}),
        json.dumps({"prompt": "x", "completion": "b", "label": False}),
    ])
    assert [r["label"] for r in load_unpaired(ok)] == [True, False]
    bad = _write(tmp_path / "b.jsonl", [json.dumps({"prompt": "x", "completion": "a",
                                                    "label": 1})])
    with pytest.raises(ValueError, match=r"b.jsonl:1: field 'label' must be true or false"):
        load_unpaired(bad)
    empty = _write(tmp_path / "e.jsonl", [json.dumps({"prompt": "x", "completion": "",
                                                      "label": True})])
    with pytest.raises(ValueError, match=r"e.jsonl:1: field 'completion' is empty"):
        load_unpaired(empty)


def test_write_jsonl_roundtrip_atomic(tmp_path):
    rows = [{"prompt": "é ?", "completion": "a"}, {"prompt": "", "completion": "b"}]
    path = write_jsonl(tmp_path / "sub" / "s.jsonl", rows)
    assert [dict(r) for r in load_sft(path)] == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.jsonl"]  # no temp file left
    with pytest.raises(TypeError):
        write_jsonl(path, [{"prompt": object()}])
    assert [dict(r) for r in load_sft(path)] == rows  # the old file survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.jsonl"]


def test_read_jsonl_typed_required(tmp_path):
    p = _write(tmp_path / "t.jsonl", [json.dumps({"a": 1, "b": 2.5})])
    assert read_jsonl(p, {"a": int, "b": float}) == [{"a": 1, "b": 2.5}]
    with pytest.raises(ValueError, match="field 'b' must be an integer"):
        read_jsonl(p, {"b": int})


def test_tokenize_sft_matches_hand_ids(tok):
    rows = [Record(prompt="what is a river?", completion="a river is wet.", source="s.jsonl",
                   line=4)]
    (item,) = tokenize_sft(tok, rows, 32)
    p = tok(format_prompt("what is a river?"), add_special_tokens=False)["input_ids"]
    c = tok("a river is wet.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item["input_ids"].tolist() == p + c
    assert item["completion_mask"].tolist() == [0] * len(p) + [1] * len(c)
    assert item["attention_mask"].tolist() == [1] * (len(p) + len(c))


def test_too_long_names_file_and_line(tok):
    rows = [Record(prompt="hi", completion="hi", source="d.jsonl", line=1),
            Record(prompt="what is a river? " * 5, completion="a river is wet.", source="d.jsonl",
                   line=2)]
    with pytest.raises(ValueError, match=r"d.jsonl:2.*exceeds max_length=16"):
        tokenize_sft(tok, rows, 16)
    with pytest.warns(UserWarning, match=r"truncated 1 of 2 examples.*d.jsonl:2"):
        items = tokenize_sft(tok, rows, 16, truncation="left")
    assert len(items[1]["input_ids"]) == 16
    prefs = [Record(prompt="hi", chosen="hi", rejected="the river is long. " * 5,
                    source="p.jsonl", line=9)]
    with pytest.raises(ValueError, match=r"p.jsonl:9 \(rejected\)"):
        tokenize_preferences(tok, prefs, 16)
    # plain dicts: the source argument names the file, lines count from 1
    with pytest.raises(ValueError, match=r"x.jsonl:2"):
        tokenize_sft(tok, [dict(r) for r in rows], 16, source="x.jsonl")


def test_preference_batch_shares_width_and_masks(tok):
    rows = [{"prompt": "what is a river?", "chosen": "a river is wet.", "rejected": "hi"},
            {"prompt": "hi", "chosen": "hi", "rejected": "the river is long."}]
    items = tokenize_preferences(tok, rows, 32)
    batch = pad_collate(items, pad_id=tok.pad_token_id)
    W = batch["chosen_input_ids"].shape[1]
    assert batch["rejected_input_ids"].shape == (2, W)
    # independent count: completion tokens = words of the completion + EOS
    assert batch["chosen_completion_mask"].sum(1).tolist() == [6, 2]
    assert batch["rejected_completion_mask"].sum(1).tolist() == [2, 6]
    # padding is on the right and uses the pad id; masks are 0 there
    n = int(batch["rejected_attention_mask"][0].sum())
    assert (batch["rejected_input_ids"][0, n:] == tok.pad_token_id).all()
    assert (batch["rejected_completion_mask"][0, n:] == 0).all()
    left = pad_collate(items, pad_id=tok.pad_token_id, padding_side="left")
    assert left["chosen_attention_mask"][:, -1].tolist() == [1, 1]


def test_unpaired_collate_labels(tok):
    rows = [{"prompt": "hi", "completion": "hi", "label": True},
            {"prompt": "hi", "completion": "a river", "label": False}]
    batch = pad_collate(tokenize_unpaired(tok, rows, 32))
    assert batch["label"].tolist() == [True, False]
    assert batch["input_ids"].shape == (2, 4 + 3)


def test_identical_pairs_are_counted(tmp_path):
    p = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "x", "chosen": "a", "rejected": "a"}),
        json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}),
    ])
    with pytest.warns(UserWarning, match=r"1 of 2 pairs have chosen == rejected .*p.jsonl:1"):
        assert len(load_preferences(p)) == 2


# --------------------------------------------------------------------------------------------
# TRL's conversational format: lists of {role, content} messages, rendered by the chat template
# --------------------------------------------------------------------------------------------
def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


PLAIN_PAIRS = [{"prompt": "what is a river ?", "chosen": "a river is wet .", "rejected": "hi"},
               {"prompt": "hi", "chosen": "the river is long .", "rejected": "hi hi"}]
CONV_PAIRS = [{"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]),
               "rejected": _assistant(r["rejected"])} for r in PLAIN_PAIRS]


def test_empty_and_blank_files_are_errors(tmp_path):
    from rlcourse.data import DataError

    for content in ("", "\n  \n\n"):
        p = tmp_path / "e.jsonl"
        p.write_text(content)
        for load in (load_preferences, load_sft, load_unpaired):
            with pytest.raises(DataError, match=rf"{p}: no rows \(the file is empty"):
                load(p)


def test_conversational_rows_tokenise_as_their_plain_text(tok, tmp_path):
    """The project's tokenizer renders ``[user: p]`` + generation prompt as ``format_prompt(p)``
    and the assistant turn as ``" c <eos>"``: conversational and plain rows must give the same
    ids and masks, for pairs, SFT and (through tokenize_kto) unpaired rows with their KL pairs."""
    from rlcourse.preference import tokenize_kto

    p = tmp_path / "conv.jsonl"
    write_jsonl(p, CONV_PAIRS)
    rows = load_preferences(p)
    plain, conv = tokenize_preferences(tok, PLAIN_PAIRS, 32), tokenize_preferences(tok, rows, 32)
    for a, b in zip(plain, conv, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sft_plain = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PLAIN_PAIRS]
    sft_conv = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in CONV_PAIRS]
    for a, b in zip(tokenize_sft(tok, sft_plain, 32), tokenize_sft(tok, sft_conv, 32),
                    strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    kto_plain = [{**r, "label": i % 2 == 0} for i, r in enumerate(sft_plain * 2)]
    kto_conv = [{**r, "label": i % 2 == 0} for i, r in enumerate(sft_conv * 2)]
    for a, b in zip(tokenize_kto(tok, kto_plain, 32), tokenize_kto(tok, kto_conv, 32),
                    strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_render_conversation_with_a_chatml_template(tok):
    """A ChatML template (Qwen's form): the prompt ends with the generation prompt, the
    completion is the rest of the conversation, end-of-turn included, no EOS appended."""
    from transformers import PreTrainedTokenizerFast

    from rlcourse.data import render_conversation

    chatml = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    chatml.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    prompt = [{"role": "system", "content": "be brief"}, *_user("what is a river?")]
    got = render_conversation(chatml, prompt, _assistant("a river is wet."))
    assert got == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is a river?"
                   "<|im_end|>\n<|im_start|>assistant\n", "a river is wet.<|im_end|>\n")


@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user"}], "chosen": _assistant("a"), "rejected": _assistant("b")},
     "field 'prompt' message 1 must be an object with string 'role' and 'content'"),
    ({"prompt": [], "chosen": _assistant("a"), "rejected": _assistant("b")},
     "field 'prompt' is an empty list of messages"),
    ({"prompt": _user("q"), "chosen": "a", "rejected": _assistant("b")},
     "mix plain text and lists of messages"),
    ({"prompt": _user("q"), "chosen": _assistant("a"), "rejected": 3},
     "field 'rejected' must be a string or a list of {role, content} messages"),
])
def test_bad_conversations_name_file_line_and_field(tmp_path, row, message):
    from rlcourse.data import DataError

    p = tmp_path / "c.jsonl"
    write_jsonl(p, [CONV_PAIRS[0], row])
    with pytest.raises(DataError) as err:
        load_preferences(p)
    assert str(err.value).startswith(f"{p}:2: ") and message in str(err.value), str(err.value)


def test_conversations_need_a_chat_template_and_one_form_per_file(tmp_path):
    from rlcourse.data import DataError

    p = tmp_path / "c.jsonl"
    write_jsonl(p, CONV_PAIRS)
    no_template = build_tokenizer(["what is a river ?"], chat_template=False)
    with pytest.raises(DataError, match=rf"{p}:1: a conversational row .* has none"):
        tokenize_preferences(no_template, load_preferences(p), 32)
    write_jsonl(p, [CONV_PAIRS[0], PLAIN_PAIRS[1]])
    with pytest.raises(DataError, match=rf"{p}:2: plain text while {p}:1 is messages"):
        tokenize_preferences(build_tokenizer(["hi"]), load_preferences(p), 32)


def test_template_whose_prompt_is_not_a_prefix_is_refused(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from rlcourse.data import DataError, render_conversation

    odd = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    # The generation prompt says "<assistant>:" but a rendered assistant turn says "<assistant>".
    odd.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
                         "{% endfor %}{% if add_generation_prompt %}<assistant>:{% endif %}")
    with pytest.raises(DataError, match="row 7: the chat template renders the prompt"):
        render_conversation(odd, _user("hi"), _assistant("hi"), "row 7")
