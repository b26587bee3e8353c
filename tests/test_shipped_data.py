"""The data the book ships (``data/``, rebuilt by ``python data/build.py --seed 0``): every file
matches the manifest's size and sha256, loads in its format, the checkpoints load, the
held-out prompts are unseen in training, and the measured numbers are recorded."""

import hashlib
import json
from pathlib import Path

import pytest

from rlcourse.config import REPO_ROOT
from rlcourse.data import load_preferences, load_sft, load_unpaired, read_jsonl
from rlcourse.worlds.assistant import DEFAULT_WORLD, split_sentences

DATA = REPO_ROOT / "data"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text(encoding="utf-8"))
FILES = sorted(MANIFEST["files"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", FILES)
def test_file_matches_manifest(name):
    path = DATA / name
    assert path.is_file(), f"data/{name} is listed in MANIFEST.json but missing"
    entry = MANIFEST["files"][name]
    assert path.stat().st_size == entry["bytes"], f"data/{name}: size differs from the manifest"
    assert _sha256(path) == entry["sha256"], f"data/{name}: sha256 differs from the manifest"


def test_manifest_lists_everything_and_stays_small():
    expected = {
        "pretrain.jsonl", "sft.jsonl", "preferences.jsonl", "unpaired.jsonl",
        "train_prompts.jsonl", "eval_prompts.jsonl", "results.json",
        "history/pretrain.json", "history/sft.json",
        "checkpoints/base/model.safetensors", "checkpoints/sft/model.safetensors",
        "checkpoints/base/tokenizer.json", "checkpoints/sft/config.json",
    }
    assert expected <= set(FILES)
    total = sum(e["bytes"] for e in MANIFEST["files"].values())
    assert total == MANIFEST["total_bytes"] <= 20 * 10**6
    generated = {
        p.relative_to(DATA).as_posix() for p in DATA.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    } - {"build.py", "README.md", "MANIFEST.json"}
    assert generated == set(FILES), "files in data/ that the manifest does not list"


def test_formats_load_and_use_the_world():
    world = DEFAULT_WORLD
    train = [r["prompt"] for r in read_jsonl(DATA / "train_prompts.jsonl", ("prompt",))]
    held_out = [r["prompt"] for r in read_jsonl(DATA / "eval_prompts.jsonl", ("prompt",))]
    pairs = load_preferences(DATA / "preferences.jsonl")
    unpaired = load_unpaired(DATA / "unpaired.jsonl")
    sft = load_sft(DATA / "sft.jsonl")
    texts = [r["text"] for r in read_jsonl(DATA / "pretrain.jsonl", ("text",))]
    assert len(held_out) == 200 and len(set(held_out)) == 200
    assert 2000 <= len(pairs) <= 3500
    assert len(unpaired) == 2 * len(pairs) and sum(r["label"] for r in unpaired) == len(pairs)
    assert len(sft) >= 1000 and len(texts) >= 1000
    for prompt in train + held_out:
        world.topic_of(prompt)  # raises for a prompt outside the world
    grammar = set(world.sentences())
    for row in sft[:500]:
        assert all(t and s in grammar for s, t in split_sentences(row["completion"]))
    for pair in pairs[:500]:
        assert pair["chosen"] != pair["rejected"]


def test_held_out_prompts_are_unseen_in_training():
    train = {r["prompt"] for r in read_jsonl(DATA / "train_prompts.jsonl")}
    held_out = {r["prompt"] for r in read_jsonl(DATA / "eval_prompts.jsonl")}
    assert not train & held_out
    assert set(DEFAULT_WORLD.prompts()) == train | held_out
    for name in ("sft.jsonl", "preferences.jsonl", "unpaired.jsonl"):
        used = {r["prompt"] for r in read_jsonl(DATA / name)}
        assert used <= train, f"{name} uses held-out prompts"
    for row in read_jsonl(DATA / "pretrain.jsonl"):
        assert not any(row["text"].startswith(p + " ") for p in held_out)


def test_checkpoints_load_and_generate():
    torch = pytest.importorskip("torch")
    from rlcourse.models import generate, load_model

    torch.set_num_threads(1)
    for name in ("base", "sft"):
        model, tok = load_model(DATA / "checkpoints" / name, device="cpu")
        assert set(DEFAULT_WORLD.vocabulary()) <= set(tok.get_vocab())
        n = sum(p.numel() for p in model.parameters())
        assert 0.4e6 <= n <= 1.0e6
        out = generate(model, tok, ["tell me about rain"], max_new_tokens=8, seed=0)
        assert len(out.texts) == 1


def test_results_record_the_acceptance_numbers():
    results = json.loads((DATA / "results.json").read_text(encoding="utf-8"))
    vs = results["sft_vs_base"]
    assert vs["win_rate"] >= 0.70 and 0 < vs["win_rate_stderr"] < 0.05
    assert vs["model_mean_score"] < results["best_score"] - 0.3
    for flaw in ("false", "rude", "repetition"):
        assert vs[f"model_share_{flaw}"] >= 0.03, f"SFT samples should still show {flaw}"
    prefs = results["preferences"]
    assert 0.75 <= prefs["label_agreement"] <= 0.95
    assert 0.42 <= prefs["better_longer"] <= 0.58
    assert set(results["timings_s"]) >= {"pretrain", "sft", "pretrain_plus_sft"}


def test_build_script_runs_end_to_end_in_miniature(tmp_path):
    """data/build.py with a tiny model and a few steps: every file appears, the manifest is
    right, and the results have their fields (the numbers mean nothing at this size)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("data_build_test", DATA / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build
    spec.loader.exec_module(build)
    cfg = build.BuildConfig(
        n_layers=1, hidden_size=32, n_heads=2, n_eval_per_topic=2, n_pretrain_docs=40,
        pretrain_steps=2, n_sft=40, sft_steps=2, warmup_steps=1, n_pair_prompts=40,
        eval_samples_per_prompt=1, max_new_tokens=12,
    )
    results = build.build(tmp_path, cfg, log=lambda *a: None)
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert set(manifest["files"]) >= {"preferences.jsonl", "checkpoints/sft/model.safetensors",
                                      "results.json", "history/sft.json"}
    for name, entry in manifest["files"].items():
        assert _sha256(tmp_path / name) == entry["sha256"]
    assert len(read_jsonl(tmp_path / "eval_prompts.jsonl")) == 16
    assert 0.0 <= results["sft_vs_base"]["win_rate"] <= 1.0
    assert results["model"]["n_layers"] == 1
