"""Recipes with a ``lora`` section, ``train.gradient_checkpointing`` and ``reference_batch_size``:
validated with file and line, trained end to end on a tiny model, saved as an adapter (and a
merged model that ``from_pretrained`` loads), resumed after a crash exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlcourse import recipes
from rlcourse.config import REPO_ROOT

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
TINY = ["train.max_steps=2", "train.batch_size=3", "train.grad_accum_steps=1", "train.lr=1e-2",
        "train.warmup_steps=0", "train.log_every=1", "train.progress=false", "max_length=32",
        "train.device=cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, run_folder):
    return run_folder(tmp_path_factory.mktemp("lora"), [" ".join(p.values()) for p in PAIRS],
                      PAIRS)


def _run(workdir: Path, method: str, out: Path, *extra: str) -> int:
    data = "sft.jsonl" if method == "sft" else "pairs.jsonl"
    return recipes.main([str(REPO_ROOT / "recipes" / f"{method}.yaml"),
                         "--model", str(workdir / "model"), "--data", str(workdir / data),
                         "--output", str(out), *TINY, *extra])


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_lora_dpo_recipe_saves_adapter_and_merged_model(workdir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    assert _run(workdir, "dpo", out, "lora.r=4", "lora.alpha=8", "lora.merge=true",
                "train.gradient_checkpointing=true", "reference_batch_size=2") == 0
    history = json.loads((out / "history.json").read_text())
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    saved = sorted(p.name for p in (out / "model").iterdir())
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    assert "model.safetensors" not in saved and "tokenizer.json" in saved
    recorded = json.loads((out / "recipe.json").read_text())
    assert recorded["lora"]["r"] == 4 and recorded["train"]["gradient_checkpointing"] is True
    # The adapter on its base (the one adapter_config.json names), and the merged model alone,
    # compute the same logits.
    from rlcourse.adapters import load_lora

    adapted, tokenizer = load_lora(out / "model", device="cpu")
    assert tokenizer("what is rain ?")["input_ids"][0] != tokenizer.unk_token_id
    assert isinstance(adapted, PeftModel)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[2, 6, 7, 8, 9, 3]])
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), atol=1e-5, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(workdir / "model")
    assert not torch.allclose(_logits(merged, ids), _logits(plain, ids))  # it trained


@pytest.mark.parametrize("method", ["sft", "orpo", "kto", "reward_model"])
def test_lora_recipe_trains_other_methods(workdir, tmp_path, method):
    out = tmp_path / method
    assert _run(workdir, method, out, "lora.r=2", "lora.target_modules=[q_proj, v_proj]") == 0
    rows = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    if method == "reward_model":  # saved merged: the RewardModel loader reads a full backbone
        from rlcourse.models import RewardModel

        rm = RewardModel.from_pretrained(out / "model", device="cpu")
        assert not any("lora" in n for n, _ in rm.named_parameters())
    else:
        assert (out / "model" / "adapter_config.json").exists()


def test_lora_recipe_resumes_after_a_crash(workdir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = ("train.max_steps=4", "train.checkpoint_every=1", "train.batch_size=2", "lora.r=4")
    assert _run(workdir, "dpo", tmp_path / "whole", *extra) == 0
    import rlcourse.preference as preference

    real_train = preference.train

    def crash_after_two_steps(*args, **kwargs):
        def stop(step, history, model):
            if step == 2:
                raise KeyboardInterrupt("killed")
        return real_train(*args, **kwargs, callbacks=[stop])

    monkeypatch.setattr(preference, "train", crash_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        _run(workdir, "dpo", tmp_path / "crashed", *extra)
    monkeypatch.setattr(preference, "train", real_train)
    # Checkpoints under LoRA hold the adapters only, not the frozen base.
    step = sorted((tmp_path / "crashed" / "checkpoints").glob("step-*"))[-1]
    assert (step / "adapter.safetensors").exists() and not (step / "model.safetensors").exists()
    base_bytes = (workdir / "model" / "model.safetensors").stat().st_size
    assert (step / "adapter.safetensors").stat().st_size < base_bytes / 3
    assert _run(workdir, "dpo", tmp_path / "crashed", *extra) == 0
    ids = torch.tensor([[2, 6, 7, 8, 9, 3]])
    logits = [
        _logits(PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(workdir / "model"), tmp_path / d / "model"), ids)
        for d in ("whole", "crashed")]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=0)
    rows = json.loads((tmp_path / "crashed" / "history.json").read_text())
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("text, key, line", [
    ("lora:\n  rank: 4\n", "'rank'", 6),
    ("lora:\n  r: 0\n", "lora.r", 6),
    ("lora:\n  merge: 'yes'\n", "lora.merge", 6),
    ("lora:\n  target_modules: []\n", "lora.target_modules", 6),
    ("reference_batch_size: 0\n", "reference_batch_size", 5),
])
def test_bad_memory_keys_are_named_with_file_and_line(tmp_path, text, key, line):
    path = tmp_path / "r.yaml"
    path.write_text("method: dpo\nmodel: m\ndata: d\noutput: o\n" + text)
    with pytest.raises(recipes.RecipeError) as err:
        recipes.load_recipe(path)
    assert key in str(err.value) and f"{path}:{line}:" in str(err.value)


def test_ppo_and_simpo_sections():
    with pytest.raises(recipes.RecipeError, match="reference_batch_size"):  # no reference
        recipes.load_recipe(text="method: simpo\nmodel: m\ndata: d\noutput: o\n"
                                 "reference_batch_size: 8\n")
    ppo_text = "method: ppo\nmodel: m\nprompts: p\nreward_model: r\noutput: o\nlora: {r: 4}\n"
    with pytest.raises(recipes.RecipeError, match=r"rollout.separate_critic: with lora the "
                                                  "critic is a value head on the adapted policy"):
        recipes.load_recipe(text=ppo_text)
    assert recipes.load_recipe(text=ppo_text + "rollout: {separate_critic: false}\n").lora.r == 4
    r = recipes.load_recipe(text="method: dpo\nmodel: m\ndata: d\noutput: o\nlora: {}\n")
    assert r.lora is not None and r.lora.target_modules == "all-linear"


@pytest.mark.slow
def test_lora_two_processes_short_run_equal_one_process(workdir, tmp_path):
    """``torchrun --nproc_per_node 2`` on CPU (gloo), LoRA + checkpointing, one step that reads
    4 of the 6 pairs: the reference pass scores only those on each process (an unscored one
    would stop the run) and the adapters equal one process with the global batch."""
    import os
    import shutil
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    common = ["train.max_steps=1", "train.grad_accum_steps=1", "train.lr=1e-2",
              "train.warmup_steps=0", "train.progress=false", "train.device=cpu",
              "max_length=32", "lora.r=4", "train.gradient_checkpointing=true"]
    args = [str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(workdir / "model"),
            "--data", str(workdir / "pairs.jsonl")]
    assert recipes.main([*args, "--output", str(tmp_path / "one"), *common,
                         "train.batch_size=4"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "rlcourse.recipes", *args,
         "--output", str(tmp_path / "two"), *common, "train.batch_size=2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.tensor([[2, 6, 7, 8, 9, 3]])
    logits = [
        _logits(PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(workdir / "model"), tmp_path / d / "model"), ids)
        for d in ("one", "two")]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[0], _logits(
        AutoModelForCausalLM.from_pretrained(workdir / "model"), ids))
