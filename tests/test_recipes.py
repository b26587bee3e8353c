"""Recipes: every shipped YAML validates against the trainers, a recipe trains end to end from
the command line, resumes after a crash, runs under several processes, and bad keys are named.

Tiny models (1 layer, hidden 32) and tiny JSONL files written in ``tmp_path``. Oracles: the
TrainConfig/loss signatures (what the trainers accept), ``ln 2`` for DPO's first step, an
uninterrupted run for resume, one process with batch 4 for two processes with batch 2.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from rlcourse import recipes
from rlcourse.config import REPO_ROOT
from rlcourse.data import write_jsonl
from rlcourse.engine import TrainConfig
from rlcourse.models import build_model, build_tokenizer, load_model, save_model
from rlcourse.ppo import PPOConfig
from rlcourse.preference import LOSS_FNS

torch.set_num_threads(1)
RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))

PAIRS = [
    {"prompt": "what is rain ?", "chosen": "rain is wet .", "rejected": "rain is dry ."},
    {"prompt": "what is snow ?", "chosen": "snow is cold .", "rejected": "snow is hot ."},
    {"prompt": "tell me about dogs", "chosen": "a dog can bark .", "rejected": "you are dumb ."},
    {"prompt": "what is the sun ?", "chosen": "the sun is a star .",
     "rejected": "the sun is cold ."},
    {"prompt": "what is fire ?", "chosen": "fire is hot .", "rejected": "fire is cold ."},
    {"prompt": "tell me about cats", "chosen": "a cat can purr .", "rejected": "a dog can bark ."},
    {"prompt": "what is ice ?", "chosen": "ice is cold .", "rejected": "ice is hot . ice is hot ."},
    {"prompt": "what is the moon ?", "chosen": "the moon is a rock .",
     "rejected": "the moon is cheese ."},
]


def test_every_method_has_a_recipe():
    names = {p.stem for p in RECIPES}
    assert set(recipes.METHODS) <= names, set(recipes.METHODS) - names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_into_the_trainers_config(path):
    recipe = recipes.load_recipe(path)
    assert recipe.method == path.stem
    if recipe.method == "ppo":
        assert isinstance(recipe.ppo, PPOConfig)
        assert isinstance(recipe.rollout, recipes.PPORollout)
        return
    if recipe.method in recipes.GROUP_METHODS:
        from rlcourse.grpo import GroupConfig

        assert isinstance(recipe.group, GroupConfig) and recipe.train is None
        assert isinstance(recipe.rollout, recipes.GroupRollout)
        assert isinstance(recipe.rollout.lr, float) and recipe.rollout.mixed_precision == "no"
        # the YAML names every field of both sections, so nothing hides behind a default
        text = path.read_text()
        for cls, name in ((GroupConfig, "group"), (recipes.GroupRollout, "rollout")):
            assert all(f"  {f.name}:" in text for f in fields(cls)), name
        return
    assert isinstance(recipe.train, TrainConfig)
    # Every number the YAML gives is a number (YAML 1.1 reads "5e-7" as a string).
    assert isinstance(recipe.train.lr, float) and recipe.train.lr > 0
    assert recipe.train.checkpoint_dir == str(Path(recipe.output) / "checkpoints")
    if recipe.method in LOSS_FNS:
        allowed = set(inspect.signature(LOSS_FNS[recipe.method]).parameters) - {"model", "batch"}
        assert set(recipe.loss) <= allowed
        # the YAML names every hyperparameter of the loss, so nothing hides behind a default
        assert set(recipe.loss) == allowed


def test_yaml_numbers_without_a_dot_are_floats():
    text = "method: dpo\nmodel: m\ndata: d.jsonl\noutput: o\ntrain:\n  lr: 5e-7\nloss:\n  beta: 1\n"
    recipe = recipes.load_recipe(text=text)
    assert recipe.train.lr == 5e-7 and isinstance(recipe.loss["beta"], float)


def test_overrides_are_parsed_as_yaml():
    got = recipes.parse_overrides(["train.lr=1e-4", "loss.beta=0.5", "train.betas=[0.9, 0.95]",
                                   "train.max_grad_norm=null", "reference_model=some/dir"])
    assert got == {"train.lr": 1e-4, "loss.beta": 0.5, "train.betas": [0.9, 0.95],
                   "train.max_grad_norm": None, "reference_model": "some/dir"}
    recipe = recipes.load_recipe(RECIPES[0].parent / "dpo.yaml", got)
    assert recipe.train.lr == 1e-4 and recipe.loss["beta"] == 0.5
    assert recipe.train.betas == (0.9, 0.95) and recipe.train.max_grad_norm is None


@pytest.mark.parametrize("text, key, line", [
    ("method: dpo\nmodel: m\ndata: d\noutput: o\nbetaa: 0.1\n", "betaa", 5),
    ("method: dpo\nmodel: m\ndata: d\noutput: o\ntrain:\n  lr: 1.0e-3\n  learning_rate: 2\n",
     "learning_rate", 7),
    ("method: simpo\nmodel: m\ndata: d\noutput: o\nloss:\n  beta: 2\n  tau: 0.1\n", "tau", 7),
    ("method: ppo\nmodel: m\nprompts: p\nreward_model: r\noutput: o\nppo:\n  kl_ctl: 0.1\n",
     "kl_ctl", 7),
    ("method: orpo\nmodel: m\ndata: d\noutput: o\nreference_model: r\n", "reference_model", 5),
])
def test_bad_key_names_the_key_the_file_and_the_line(tmp_path, text, key, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(recipes.RecipeError) as err:
        recipes.load_recipe(path)
    message = str(err.value)
    assert repr(key) in message and f"{path}:{line}:" in message


def test_missing_and_malformed_values_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: dpo\nmodel: m\noutput: o\n")
    with pytest.raises(recipes.RecipeError, match="data: missing"):
        recipes.load_recipe(path)
    path.write_text("method: dpo\nmodel: m\ndata: d\noutput: o\ntrain:\n  lr: fast\n")
    with pytest.raises(recipes.RecipeError, match=rf"{path}:6: train.lr: expected a number"):
        recipes.load_recipe(path)
    path.write_text("method: dqn\nmodel: m\ndata: d\noutput: o\n")
    with pytest.raises(recipes.RecipeError, match="method must be one of"):
        recipes.load_recipe(path)


def test_command_line_reports_a_bad_key_and_exits_2(tmp_path, capsys):
    code = recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--dry-run", "loss.betta=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'betta'" in err and "dpo.yaml (command line): loss.betta" in err


# --------------------------------------------------------------------------------------------
# End to end on a tiny model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model saved like a downloaded checkpoint, and tiny JSONL files."""
    root = tmp_path_factory.mktemp("recipes")
    words = [" ".join(p.values()) for p in PAIRS]
    tok = build_tokenizer(words)
    model = build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0)
    save_model(model, tok, root / "model")
    write_jsonl(root / "pairs.jsonl", PAIRS)
    write_jsonl(root / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                     for p in PAIRS])
    write_jsonl(root / "unpaired.jsonl",
                [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                 for p in PAIRS for k in ("chosen", "rejected")])
    return root


DATA = {"sft": "sft.jsonl", "kto": "unpaired.jsonl"}
TINY = ["train.max_steps=2", "train.batch_size=4", "train.grad_accum_steps=1", "train.lr=1e-2",
        "train.warmup_steps=0", "train.log_every=1", "train.progress=false", "max_length=32"]


def _run(workdir: Path, method: str, out: Path, *extra: str) -> int:
    return recipes.main([str(REPO_ROOT / "recipes" / f"{method}.yaml"),
                         "--model", str(workdir / "model"),
                         "--data", str(workdir / DATA.get(method, "pairs.jsonl")),
                         "--output", str(out), *TINY, *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(path, device="cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["sft", "dpo", "simpo", "ipo", "rdpo", "kto", "orpo",
                                    "reward_model"])
def test_recipe_trains_two_steps_and_saves(workdir, tmp_path, method):
    out = tmp_path / method
    assert _run(workdir, method, out) == 0
    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in history if "loss" in r)
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["method"] == method and saved["train"]["max_steps"] == 2
    if method == "reward_model":
        from rlcourse.models import RewardModel

        rm = RewardModel.from_pretrained(out / "model", device="cpu")
        assert (out / "model" / RewardModel.HEAD_FILE).exists()
        backbone = {k: v for k, v in rm.model.state_dict().items()}
    else:
        backbone = _weights(out / "model")
    before = _weights(workdir / "model")
    changed = [k for k in before if not torch.equal(before[k], backbone[k])]
    assert changed, "no parameter moved"
    if method == "dpo":  # policy = reference at the first step: the loss is ln 2 exactly
        assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_recipe_resumes_after_a_crash(workdir, tmp_path, monkeypatch):
    extra = ("train.max_steps=4", "train.checkpoint_every=1", "train.batch_size=2")
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
    assert not (tmp_path / "crashed" / "model").exists()
    monkeypatch.setattr(preference, "train", real_train)
    assert _run(workdir, "dpo", tmp_path / "crashed", *extra) == 0  # the same command again

    whole = _weights(tmp_path / "whole" / "model")
    resumed = _weights(tmp_path / "crashed" / "model")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6)
    rows = json.loads((tmp_path / "crashed" / "history.json").read_text())
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (
    Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_two_processes_equal_one_process_with_the_global_batch(workdir, tmp_path):
    """``torchrun --nproc_per_node 2`` (what ``accelerate launch`` runs on GPUs), on CPU with
    gloo: batch 2 per process x 2 processes must give the model of batch 4 in one process."""
    common = ["train.max_steps=2", "train.grad_accum_steps=1", "train.lr=1e-2",
              "train.warmup_steps=0", "train.progress=false", "train.device=cpu", "max_length=32"]
    args = [str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(workdir / "model"),
            "--data", str(workdir / "pairs.jsonl")]
    assert recipes.main([*args, "--output", str(tmp_path / "one"), *common,
                         "train.batch_size=4"]) == 0
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "rlcourse.recipes", *args,
         "--output", str(tmp_path / "two"), *common, "train.batch_size=2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "recipe.json").read_text())["summary"]
    assert summary["num_processes"] == 2
    one, two = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_recipe_fields_cover_the_documented_keys():
    # The keys a recipe accepts are the Recipe's fields (plus the sections), so the module
    # docstring's list and the validator cannot drift apart silently.
    accepted = recipes._COMMON_KEYS.union(*recipes._METHOD_KEYS.values())
    assert accepted - {"train"} <= {f.name for f in fields(recipes.Recipe)}


def test_only_methods_with_a_reference_accept_a_reference_model():
    from rlcourse.losses import OBJECTIVES

    for method in recipes.PREFERENCE_METHODS:
        accepts = "reference_model" in recipes._METHOD_KEYS[method]
        assert accepts == OBJECTIVES[method].needs_reference, method


def test_ppo_recipe_runs_two_steps(workdir, tmp_path):
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    code = recipes.main([str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model", str(workdir / "model"),
                         "--reward-model", str(tmp_path / "rm"),
                         "--data", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "o"),
                         "rollout.steps=2", "rollout.batch_size=4", "rollout.max_new_tokens=4",
                         "rollout.lr=1e-2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1"])
    assert code == 0
    history = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [r["step"] for r in history] == [0, 1]
    before, after = _weights(workdir / "model"), _weights(tmp_path / "o" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
