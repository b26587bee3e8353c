"""Shared by every test file: quick mode, and the tiny run folder the recipe tests read."""

import os

import pytest

# Every test, and every notebook the tests execute, runs in quick mode.
os.environ.setdefault("RLCOURSE_QUICK", "1")


@pytest.fixture(scope="session")
def run_folder():
    """``make(root, words, pairs=None, prompts=None, **options) -> root``: what a recipe test
    reads, written the way a user's files would be.

    ``root/model``: a tiny Llama-style model (1 layer, hidden 32, 2 heads, seed 0) with a
    word-level tokenizer over ``words``, saved like a downloaded checkpoint (``model_name``
    renames the folder; ``tie_word_embeddings=False`` unties its output layer). With ``pairs``
    (``{"prompt", "chosen", "rejected"}`` rows): ``pairs.jsonl``, ``sft.jsonl`` (prompt and
    chosen) and, with ``unpaired=True``, ``unpaired.jsonl`` (each answer labelled). With
    ``prompts``: ``prompts.jsonl``. ``reward_model=True``: ``root/rm``, a reward model on the
    same backbone (head seed 1). ``files``: more files by name (a reward module, ...).
    """
    from rlcourse.data import write_jsonl
    from rlcourse.models import RewardModel, build_model, build_tokenizer, save_model

    def make(root, words, pairs=None, prompts=None, *, model_name="model",
             tie_word_embeddings=True, unpaired=False, reward_model=False, files=None):
        tok = build_tokenizer(words)
        extra = {} if tie_word_embeddings else {"tie_word_embeddings": False}
        model = build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0, **extra)
        save_model(model, tok, root / model_name)
        if reward_model:
            save_model(RewardModel(model, seed=1), tok, root / "rm")
        if pairs is not None:
            write_jsonl(root / "pairs.jsonl", pairs)
            write_jsonl(root / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                             for p in pairs])
            if unpaired:
                write_jsonl(root / "unpaired.jsonl",
                            [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                             for p in pairs for k in ("chosen", "rejected")])
        if prompts is not None:
            write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])
        for name, text in (files or {}).items():
            (root / name).write_text(text)
        return root

    return make
