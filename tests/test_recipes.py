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
from rlcourse.models import build_tokenizer, load_model, save_model
from rlcourse.ppo import PPOConfig
from rlcourse.preference import LOSS_FNS
from rlcourse.recipes.checks import launch_device

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
    # one recipe per method, named after it; a variant is named method_variant (grpo_gsm8k)
    assert recipe.method == path.stem or path.stem.startswith(recipe.method + "_")
    if recipe.method == "ppo":
        assert isinstance(recipe.ppo, PPOConfig)
        assert isinstance(recipe.rollout, recipes.PPORollout)
        return
    family = recipes.method(recipe.method).family
    if family == "rounds":
        from rlcourse.online import OnlineDPOConfig, RSFTConfig

        cls, name = ((OnlineDPOConfig, "online") if recipe.method == "online_dpo" else
                     (RSFTConfig, "rsft"))
        assert isinstance(getattr(recipe, name), cls) and recipe.train is None
        assert isinstance(getattr(recipe, name).lr, float)
        text = path.read_text()  # every field named: nothing hides behind a default
        assert all(f"  {f.name}:" in text for f in fields(cls)), name
        return
    if recipe.method in ("grpo", "rloo"):
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
                                   "train.max_grad_norm=null", "reference_model=./some/dir"])
    assert got == {"train.lr": 1e-4, "loss.beta": 0.5, "train.betas": [0.9, 0.95],
                   "train.max_grad_norm": None, "reference_model": "./some/dir"}
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
def workdir(tmp_path_factory, run_folder):
    """A tiny model saved like a downloaded checkpoint, and tiny JSONL files."""
    return run_folder(tmp_path_factory.mktemp("recipes"), [" ".join(p.values()) for p in PAIRS],
                      PAIRS, unpaired=True)


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
        # saved as transformers' sequence classifier (tests/test_ecosystem.py checks its scores)
        config = json.loads((out / "model" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        backbone = {f"model.{k}": v for k, v in rm.model.state_dict().items()}
    else:
        backbone = _weights(out / "model")
    before = _weights(workdir / "model")
    changed = [k for k in before if k in backbone and not torch.equal(before[k], backbone[k])]
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
@pytest.mark.parametrize("device", ["train.device=cpu", "train.device=auto"])
def test_two_processes_equal_one_process_with_the_global_batch(workdir, tmp_path, device):
    """``torchrun --nproc_per_node 2`` (what ``accelerate launch`` runs on GPUs), on CPU with
    gloo: batch 2 per process x 2 processes must give the model of batch 4 in one process.
    With ``train.device=auto`` on a machine without GPUs each process used to train alone
    (and ``model/`` lost its weights); now the processes train together on the CPU."""
    if device.endswith("auto") and torch.cuda.is_available():
        pytest.skip("checks the machine without GPUs")
    common = ["train.max_steps=2", "train.grad_accum_steps=1", "train.lr=1e-2",
              "train.warmup_steps=0", "train.progress=false", device, "max_length=32",
              f"eval_data={workdir / 'pairs.jsonl'}", "train.eval_every=1"]
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
    # Evaluation and the history file as well: each process evaluates the whole eval set.
    rows = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two")]
    assert [r["eval_loss"] for r in rows[1]] == pytest.approx([r["eval_loss"] for r in rows[0]],
                                                              abs=1e-6)
    lines = (tmp_path / "two" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


@pytest.mark.slow
def test_accelerate_cpu_launch_of_two_processes_is_refused(workdir, tmp_path):
    """``accelerate launch --cpu --num_processes 2`` starts one process (accelerate's simple
    launcher): it used to train alone as if two had been asked for; now it stops, saying so."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlcourse.recipes",
         str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(workdir / "model"),
         "--data", str(workdir / "pairs.jsonl"), "--output", str(tmp_path / "o"), *TINY],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "started one process" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists()


def test_recipe_fields_cover_the_documented_keys():
    # The keys a recipe accepts are the Recipe's fields (plus the sections), so the module
    # docstring's list and the validator cannot drift apart silently.
    # The sections are the registry rows' own; every other key is a Recipe field.
    from rlcourse.recipes.registry import section_names

    accepted = set().union(*(row.top_keys() for row in recipes.methods().values()))
    assert accepted - section_names() <= {f.name for f in fields(recipes.Recipe)}


def test_only_methods_with_a_reference_accept_a_reference_model():
    from rlcourse.losses import OBJECTIVES

    preference = [m for m in OBJECTIVES if m in LOSS_FNS]
    assert {"dpo", "ipo", "rdpo", "kto", "orpo", "simpo"} <= set(preference)
    for method in preference:
        accepts = "reference_model" in recipes.method(method).top_keys()
        assert accepts == OBJECTIVES[method].needs_reference, method


def test_ppo_recipe_runs_with_a_warmup(workdir, tmp_path):
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    code = recipes.main([str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model", str(workdir / "model"),
                         "--reward-model", str(tmp_path / "rm"),
                         "--data", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "o"),
                         "rollout.steps=3", "rollout.batch_size=4", "rollout.max_new_tokens=4",
                         "rollout.lr=1e-2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                         "rollout.warmup_steps=2"])
    assert code == 0
    history = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [r["step"] for r in history] == [0, 1, 2]
    # iteration k uses lr * min(1, k / warmup_steps)
    assert [r["lr"] for r in history] == pytest.approx([5e-3, 1e-2, 1e-2])
    code = recipes.main([str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model", str(workdir / "model"),
                         "--reward-model", str(tmp_path / "rm"),
                         "--data", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "d"),
                         "rollout.steps=4", "rollout.batch_size=4", "rollout.max_new_tokens=4",
                         "rollout.lr=1e-2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                         "rollout.warmup_steps=1", "rollout.lr_decay=linear"])
    assert code == 0
    history = json.loads((tmp_path / "d" / "history.json").read_text())
    # then linearly down: iteration k > 1 uses lr * (4 - k + 1) / (4 - 1)
    assert [r["lr"] for r in history] == pytest.approx([1e-2, 1e-2, 2e-2 / 3, 1e-2 / 3])
    before, after = _weights(workdir / "model"), _weights(tmp_path / "o" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ppo_recipe_evaluates_its_eval_data(workdir, tmp_path, monkeypatch):
    """eval_data for PPO, as for GRPO: every rollout.eval_every steps and after the last, one
    answer per held-out prompt is scored by the run's reward model. Its text scorer is replaced
    by the prompt's length in words, so eval/reward must be the mean over the EVAL prompts (4
    and 8 words: 6.0) whatever the answers, while training scores the training prompts (4 or 5
    words each)."""
    from rlcourse import online
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "what is rain ?"},
                                          {"prompt": "tell me about the sun and the moon"}])
    words = lambda prompts, completions: [float(len(p.split())) for p in prompts]  # noqa: E731
    monkeypatch.setattr(online, "reward_model_scorer", lambda rm, tokenizer: words)
    code = recipes.main([str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model", str(workdir / "model"),
                         "--reward-model", str(tmp_path / "rm"),
                         "--data", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "o"),
                         f"eval_data={tmp_path / 'eval.jsonl'}", "rollout.eval_every=2",
                         "rollout.steps=3", "rollout.batch_size=4", "rollout.max_new_tokens=4",
                         "rollout.lr=1e-2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1"])
    assert code == 0
    history = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [r["step"] for r in history if "eval/reward" in r] == [1, 2]  # steps 2 and 3 of 3
    assert all(r["eval/reward"] == 6.0 for r in history if "eval/reward" in r)
    assert all(4.0 <= r["score"] <= 5.0 for r in history)  # the training prompts' lengths


def test_ppo_eval_every_without_eval_data_is_refused():
    with pytest.raises(recipes.RecipeError, match="rollout.eval_every: evaluates the eval_data"):
        recipes.load_recipe(text="method: ppo\nmodel: m\nprompts: p\noutput: o\n"
                                 "reward_model: r\nrollout:\n  eval_every: 5\n")


def test_ppo_recipe_with_lora_trains_adapters_against_the_adapters_off_reference(workdir,
                                                                                  tmp_path):
    """PPO under LoRA (before: refused): the critic is a value head on the adapted policy, the
    reference is the policy with its adapters off (so the first step's KL is exactly 0: B = 0),
    only adapters and the value head train, OUTPUT/model is the adapter."""
    from rlcourse.adapters import load_lora
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    out = tmp_path / "o"
    code = recipes.main([str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model", str(workdir / "model"),
                         "--reward-model", str(tmp_path / "rm"),
                         "--data", str(tmp_path / "prompts.jsonl"), "--output", str(out),
                         "rollout.steps=2", "rollout.batch_size=4", "rollout.max_new_tokens=4",
                         "rollout.lr=1e-2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                         "rollout.separate_critic=false", "lora.r=4",
                         "lora.target_modules=[q_proj, v_proj]"])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    assert history[0]["kl"] == 0.0 and history[1]["kl"] != 0.0
    assert (out / "model" / "adapter_config.json").is_file()
    adapted, _ = load_lora(out / "model", device="cpu")
    base, _ = load_model(workdir / "model", device="cpu")
    merged = adapted.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items()
               if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_ppo_recipe_killed_and_rerun_equals_uninterrupted(workdir, tmp_path, monkeypatch):
    """PPO on the engine's checkpoints: killed during step 3 of 4 and rerun, it must end with
    the actor and history of the run that was never stopped (adaptive KL, so the coefficient
    is state too)."""
    from rlcourse import ppo
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])

    def run(out: str) -> int:
        return recipes.main([
            str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model", str(workdir / "model"),
            "--reward-model", str(tmp_path / "rm"), "--data", str(tmp_path / "prompts.jsonl"),
            "--output", str(tmp_path / out), "rollout.steps=4", "rollout.batch_size=4",
            "rollout.max_new_tokens=4", "rollout.lr=1e-2", "ppo.minibatch_size=2",
            "ppo.ppo_epochs=2", "ppo.adaptive_kl=true", "ppo.kl_target=0.01",
            "rollout.checkpoint_every=1", "rollout.warmup_steps=3"])  # killed inside the warm-up

    assert run("whole") == 0
    real_step, calls = ppo.ppo_step, []

    def killed_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_step", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run("crashed")
    assert not (tmp_path / "crashed" / "model").exists()
    # the checkpoint records the run's settings, which a resume is checked against
    saved = json.loads((tmp_path / "crashed" / "checkpoints" / "step-00000002" /
                        "state.json").read_text())["config"]
    assert (saved["warmup_steps"], saved["lr"], saved["n_steps"], saved["lr_decay"]) == (
        3, 1e-2, 4, "constant")
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        ppo.check_resumed_settings(Path("ckpt"), saved, {**saved, "lr": 2e-2})
    calls.clear()
    monkeypatch.setattr(ppo, "ppo_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    assert run("crashed") == 0  # the same command again
    assert len(calls) == 2  # it resumed after step 2, it did not start again
    whole, resumed = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "crashed" /
                                                                       "model")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6, msg=k)
    rows = {p: json.loads((tmp_path / p / "history.json").read_text())
            for p in ("whole", "crashed")}
    assert [r["step"] for r in rows["crashed"]] == [0, 1, 2, 3]
    assert [r["kl_coef"] for r in rows["crashed"]] == [r["kl_coef"] for r in rows["whole"]]
    assert len({r["kl_coef"] for r in rows["whole"]}) > 1  # the controller did move


# --------------------------------------------------------------------------------------------
# Guards against silently wrong results (each test fails without its guard)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, line, what", [
    # A quoted "false" is a non-empty string: bool("false") is True, custom code would run.
    ('trust_remote_code: "false"\n', "trust_remote_code", 5, "expected true or false"),
    ("disable_dropout: 0\n", "disable_dropout", 5, "expected true or false"),
    ("train:\n  drop_last: 'no'\n", "train.drop_last", 6, "expected true or false"),
    ("loss:\n  label_smoothing: yes\n", "loss.label_smoothing", 6, "expected a number"),
    ("train:\n  batch_size: 2.5\n", "train.batch_size", 6, "expected an integer"),
    ("train:\n  betas: 0.9\n", "train.betas", 6, "expected a list of 2"),
    ("dtype: fp8\n", "dtype", 5, "must be null or one of"),
    ("max_length: 1\n", "max_length", 5, "must be an integer >= 2"),
    ("train:\n  schedule: cosin\n", "train.schedule", 6, "must be one of cosine"),
    ("train:\n  mixed_precision: fp8\n", "train.mixed_precision", 6, "must be one of no"),
    ("train:\n  lr: .inf\n", "train.lr", 6, "must be a finite number > 0"),
    ("train:\n  lr: -1.0e-3\n", "train.lr", 6, "must be a finite number > 0"),
    ("loss:\n  beta: 0\n", "loss.beta", 6, "must be a finite number > 0"),
    ("loss:\n  beta: -0.1\n", "loss.beta", 6, "must be a finite number > 0"),
    ("loss:\n  label_smoothing: 0.7\n", "loss.label_smoothing", 6, "must be a number in [0, 0.5)"),
    ("train:\n  grad_accum_steps: 0\n", "train.grad_accum_steps", 6, "must be an integer >= 1"),
])
def test_values_of_the_wrong_type_or_range_name_file_line_and_key(tmp_path, text, key, line,
                                                                   what):
    path = tmp_path / "r.yaml"
    path.write_text("method: dpo\nmodel: m\ndata: d\noutput: o\n" + text)
    with pytest.raises(recipes.RecipeError) as err:
        recipes.load_recipe(path)
    assert str(err.value).startswith(f"{path}:{line}: {key}: {what}"), str(err.value)


def test_yaml_yes_no_on_the_command_line_stay_strings():
    # YAML 1.1 reads no/yes/on/off as booleans: train.mixed_precision=no would be False.
    got = recipes.parse_overrides(["train.mixed_precision=no", "train.drop_last=true",
                                   "disable_dropout=off"])
    assert got == {"train.mixed_precision": "no", "train.drop_last": True,
                   "disable_dropout": "off"}
    recipe = recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml",
                                 {"train.mixed_precision": "no"})
    assert recipe.train.mixed_precision == "no"
    with pytest.raises(recipes.RecipeError, match="disable_dropout: expected true or false"):
        recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml", {"disable_dropout": "off"})
    with pytest.raises(recipes.RecipeError, match="quote it"):
        recipes.load_recipe(text="method: sft\nmodel: m\ndata: d\noutput: o\ntrain:\n"
                                 "  mixed_precision: no\n")


def test_real_booleans_and_numbers_pass_and_keep_their_type(tmp_path):
    text = ("method: dpo\nmodel: m\ndata: d\noutput: o\ntrust_remote_code: false\n"
            "disable_dropout: false\nmax_length: 1e3\ntrain:\n  lr: 5e-7\n  drop_last: true\n"
            "  betas: [0.9, 0.95]\n")
    recipe = recipes.load_recipe(text=text)
    assert recipe.trust_remote_code is False and recipe.disable_dropout is False
    assert recipe.max_length == 1000 and recipe.train.drop_last is True
    assert recipe.train.betas == (0.9, 0.95)


def test_kto_with_one_example_per_batch_is_refused(tmp_path):
    path = tmp_path / "kto.yaml"
    path.write_text("method: kto\nmodel: m\ndata: d\noutput: o\ntrain:\n  batch_size: 1\n")
    with pytest.raises(recipes.RecipeError, match=rf"{path}:6: train.batch_size: KTO needs"):
        recipes.load_recipe(path)


@pytest.mark.parametrize("content, message", [
    ("", "no rows (the file is empty"),
    ("\n   \n\n", "no rows (the file is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n',
     ":2: field 'chosen' must be a string"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n', ":2: malformed JSON"),
])
def test_data_errors_reach_the_command_line_as_one_line_and_exit_2(workdir, tmp_path, capsys,
                                                                    content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    code = recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model",
                         str(workdir / "model"), "--data", str(data), "--output",
                         str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: {data}") and message in err and "\n" not in err, err
    assert not (tmp_path / "o" / "model").exists()


def test_overlong_row_and_max_length_beyond_positions_are_named(workdir, tmp_path, capsys):
    args = [str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(workdir / "model"),
            "--data", str(workdir / "pairs.jsonl"), "--output", str(tmp_path / "o"), *TINY]
    assert recipes.main([*args, "max_length=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{workdir / 'pairs.jsonl'}:1 (chosen): prompt" in err and "\n" not in err, err
    # The tiny model has 128 positions: 1000 used to be an IndexError inside the model.
    assert recipes.main([*args, "max_length=1000"]) == 2
    err = capsys.readouterr().err
    assert "max_length: 1000 is longer than the model's 128 positions" in err


def test_divergence_exits_nonzero_and_saves_no_model(workdir, tmp_path, capsys):
    out = tmp_path / "o"
    code = _run(workdir, "sft", out, "train.lr=1e30", "train.max_steps=3",
                "train.checkpoint_every=1", "train.max_grad_norm=null")
    err = capsys.readouterr().err
    assert code == 1 and "training stopped" in err, err
    assert not (out / "model").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):  # whatever was kept is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def test_rerun_with_another_recipe_names_the_keys_that_differ(workdir, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(workdir, "dpo", out) == 0
    first = _weights(out / "model")
    capsys.readouterr()
    # The same command again: the finished run is reported and not trained again.
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert _run(workdir, "dpo", out) == 0
    assert "already holds the finished run" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    # Another hyperparameter, another method, other data: refused, the keys named.
    assert _run(workdir, "dpo", out, "loss.beta=0.5", "train.lr=2e-2") == 2
    err = capsys.readouterr().err
    assert "loss.beta: 0.1 -> 0.5" in err and "train.lr: 0.01 -> 0.02" in err, err
    assert _run(workdir, "simpo", out) == 2
    assert "method: 'dpo' -> 'simpo'" in capsys.readouterr().err
    changed = tmp_path / "pairs.jsonl"
    write_jsonl(changed, PAIRS[::-1])
    assert recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model",
                         str(workdir / "model"), "--data", str(changed), "--output", str(out),
                         *TINY]) == 2
    err = capsys.readouterr().err
    assert "data:" in err and "data (content sha256)" in err
    for k, v in first.items():  # nothing was overwritten
        assert torch.equal(_weights(out / "model")[k], v)
    # --overwrite starts afresh with the new recipe, removing only what a run writes.
    (out / "notes.txt").write_text("mine")
    assert _run(workdir, "dpo", out, "loss.beta=0.5", "--overwrite") == 0
    assert json.loads((out / "recipe.json").read_text())["loss"]["beta"] == 0.5
    assert (out / "notes.txt").read_text() == "mine"


def test_another_checkpoint_saved_into_the_model_folder_is_not_the_same_run(workdir, tmp_path,
                                                                             capsys):
    """A path names a folder: a model retrained into it must not pass for the first one (a
    resume would mix two base models); a run.json from before fingerprints still resumes."""
    model_dir = tmp_path / "model"
    shutil.copytree(workdir / "model", model_dir)
    out = tmp_path / "o"

    def run(*extra: str) -> int:
        return recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(model_dir),
                             "--data", str(workdir / "pairs.jsonl"), "--output", str(out),
                             *TINY, *extra])

    assert run() == 0
    capsys.readouterr()
    # A run.json written before fingerprints existed is compared on the keys it has; one
    # written when the fingerprint hashed every file in the folder ("model (fingerprint)") is
    # not compared on that retired key.
    recorded = (out / "run.json").read_text()
    info = json.loads(recorded)
    del info["identity"]["model (files)"]
    (out / "run.json").write_text(json.dumps(info))
    assert run() == 0
    assert "already holds the finished run" in capsys.readouterr().err
    info["identity"]["model (fingerprint)"] = "an all-files digest of an older version"
    (out / "run.json").write_text(json.dumps(info))
    assert run() == 0
    assert "already holds the finished run" in capsys.readouterr().err
    (out / "run.json").write_text(recorded)
    # The same architecture and tokenizer, other weights, the same path: refused, key named.
    model, tok = load_model(model_dir, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_model(model, tok, model_dir)
    assert run() == 2
    err = capsys.readouterr().err
    assert "model (files)" in err and "a finished run of a different recipe" in err, err


def test_partial_run_resumes_only_with_the_same_recipe(workdir, tmp_path, monkeypatch, capsys):
    import rlcourse.preference as preference

    real_train = preference.train

    def crash_after_one_step(*args, **kwargs):
        def stop(step, history, model):
            if step == 1:
                raise KeyboardInterrupt("killed")
        return real_train(*args, **kwargs, callbacks=[stop])

    monkeypatch.setattr(preference, "train", crash_after_one_step)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        _run(workdir, "dpo", out, "train.checkpoint_every=1")
    monkeypatch.setattr(preference, "train", real_train)
    assert _run(workdir, "dpo", out, "train.checkpoint_every=1", "train.lr=5e-2") == 2
    assert "an unfinished run of a different recipe" in capsys.readouterr().err
    assert _run(workdir, "dpo", out, "train.checkpoint_every=1") == 0
    assert "resuming from" in capsys.readouterr().out


def test_output_with_run_files_but_no_run_record_is_refused(workdir, tmp_path, capsys):
    out = tmp_path / "o"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    assert _run(workdir, "dpo", out) == 2
    assert "no run.json" in capsys.readouterr().err


def test_dropout_is_off_in_preference_training_so_the_first_dpo_loss_is_ln2(tmp_path):
    """GPT-2 with dropout 0.1 everywhere: policy == reference at the first step, so the DPO
    loss is ln 2 exactly when dropout is off (the reference is scored in eval mode); with
    ``disable_dropout: false`` the dropout noise moves it away from ln 2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer([" ".join(p.values()) for p in PAIRS])
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(config), tok, tmp_path / "gpt2")
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    losses = {}
    for keep in (False, True):
        out = tmp_path / f"keep{keep}"
        assert recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model",
                             str(tmp_path / "gpt2"), "--data", str(tmp_path / "pairs.jsonl"),
                             "--output", str(out), *TINY, "train.batch_size=8",
                             f"disable_dropout={str(keep).lower()}"]) == 0
        losses[keep] = json.loads((out / "history.json").read_text())[0]["loss"]
    assert losses[True] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses[False] - math.log(2)) > 1e-3


def test_launch_without_gpus_trains_on_cpu_and_a_lost_cpu_launch_is_refused(monkeypatch):
    recipe = recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_device(recipe) == "cpu" and recipe.train.device == "cpu"
    # accelerate launch --cpu --num_processes 2 runs ONE process and leaves MASTER_PORT behind.
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(recipes.RecipeError, match="started one process"):
        launch_device(recipe)


def _conversational(row: dict) -> dict:
    """TRL's conversational form of a plain row: the prompt a user turn, each text an
    assistant turn."""
    out = {"prompt": [{"role": "user", "content": row["prompt"]}]}
    for key in ("chosen", "rejected", "completion"):
        if key in row:
            out[key] = [{"role": "assistant", "content": row[key]}]
    return {**out, **({"label": row["label"]} if "label" in row else {})}


@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "rdpo", "kto", "orpo", "simpo",
                                    "reward_model"])
def test_conversational_data_trains_as_its_plain_text(workdir, tmp_path, method):
    """The same rows as lists of messages (rendered by the tokenizer's chat template) give the
    same losses, step by step, as the plain-text rows."""
    from rlcourse.data import read_jsonl

    plain = workdir / DATA.get(method, "pairs.jsonl")
    conv = tmp_path / "conv.jsonl"
    write_jsonl(conv, [_conversational(dict(r)) for r in read_jsonl(plain)])
    losses = []
    for data in (plain, conv):
        out = tmp_path / data.stem
        assert recipes.main([str(REPO_ROOT / "recipes" / f"{method}.yaml"), "--model",
                             str(workdir / "model"), "--data", str(data), "--output", str(out),
                             *TINY]) == 0
        losses.append([r["loss"] for r in json.loads((out / "history.json").read_text())
                       if "loss" in r])
    assert len(losses[0]) == 2 and losses[1] == losses[0]


# --------------------------------------------------------------------------------------------
# Watching a run
# --------------------------------------------------------------------------------------------
def test_eval_data_is_evaluated_and_history_jsonl_written(workdir, tmp_path):
    """``eval_data`` + ``train.eval_every``: the DPO loss on held-out pairs joins each row. Oracle
    at the last step: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over the
    pairs, with the saved model as pi and the starting model as reference."""
    from rlcourse.models import encode_prompt_completion, sequence_logprobs

    held_out = tmp_path / "eval.jsonl"
    write_jsonl(held_out, PAIRS[:3])
    out = tmp_path / "o"
    assert _run(workdir, "dpo", out, f"eval_data={held_out}", "train.eval_every=1") == 0
    history = json.loads((out / "history.json").read_text())
    assert [("eval_loss" in r and "eval_rewards/accuracies" in r) for r in history] == [True,
                                                                                       True]
    assert [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()] \
        == history

    def logps(model, tok, key):
        enc = encode_prompt_completion(tok, [p["prompt"] for p in PAIRS[:3]],
                                       [p[key] for p in PAIRS[:3]], 32)
        with torch.no_grad():
            return sequence_logprobs(model, enc["input_ids"], enc["attention_mask"],
                                     enc["completion_mask"], reduce="sum").double()

    policy, tok = load_model(out / "model", device="cpu")
    reference, _ = load_model(workdir / "model", device="cpu")
    beta = recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml").loss["beta"]
    h = (logps(policy, tok, "chosen") - logps(reference, tok, "chosen")) - (
        logps(policy, tok, "rejected") - logps(reference, tok, "rejected"))
    expected = float(torch.mean(-torch.log(torch.sigmoid(beta * h))))
    assert history[-1]["eval_loss"] == pytest.approx(expected, abs=1e-5)
    summary = json.loads((out / "recipe.json").read_text())["summary"]
    assert summary["tokens_per_second"] > 0


@pytest.mark.parametrize("method", ["sft", "reward_model", "kto"])
def test_eval_data_for_other_methods(workdir, tmp_path, method):
    out = tmp_path / "o"
    data = workdir / DATA.get(method, "pairs.jsonl")
    assert _run(workdir, method, out, f"eval_data={data}", "train.eval_every=2") == 0
    history = json.loads((out / "history.json").read_text())
    assert ["eval_loss" in r for r in history] == [False, True]


def test_eval_every_without_eval_data_is_refused():
    with pytest.raises(recipes.RecipeError, match="train.eval_every: evaluates the eval_data"):
        recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml", {"train.eval_every": 10})


def test_ppo_prompts_as_messages_train_as_plain_prompts(workdir, tmp_path):
    """PPO's prompts in TRL's conversational form (a user message each) are rendered by the chat
    template, which for the project's tokenizer is the plain prompt's format: same history."""
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "plain.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    write_jsonl(tmp_path / "conv.jsonl",
                [{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in PAIRS])
    histories = []
    for name in ("plain", "conv"):
        assert recipes.main([str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model",
                             str(workdir / "model"), "--reward-model", str(tmp_path / "rm"),
                             "--data", str(tmp_path / f"{name}.jsonl"), "--output",
                             str(tmp_path / name), "rollout.steps=2", "rollout.batch_size=4",
                             "rollout.max_new_tokens=4", "rollout.lr=1e-2",
                             "ppo.minibatch_size=2", "ppo.ppo_epochs=1"]) == 0
        histories.append(json.loads((tmp_path / name / "history.json").read_text()))
    assert len(histories[0]) == 2 and histories[1] == histories[0]


def test_kto_with_one_example_is_a_one_line_data_error(workdir, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    write_jsonl(data, [{"prompt": "hi", "completion": "rain is wet .", "label": True}])
    assert recipes.main([str(REPO_ROOT / "recipes" / "kto.yaml"), "--model",
                         str(workdir / "model"), "--data", str(data), "--output",
                         str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}: KTO's reference point") and "\n" not in err


def test_report_to_tensorboard_writes_event_files_into_the_output(workdir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    assert _run(workdir, "sft", out, "train.report_to=tensorboard") == 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


RL_TENSORBOARD = {
    "ppo": ["rollout.steps=2", "rollout.batch_size=4", "rollout.max_new_tokens=4",
            "rollout.lr=1e-2", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
            "rollout.report_to=tensorboard"],
    "grpo": ["rollout.steps=2", "rollout.max_new_tokens=4", "group.group_size=2",
             "group.n_prompts=2", "rollout.device=cpu", "rollout.report_to=tensorboard"],
    "online_dpo": ["online.rounds=2", "online.max_new_tokens=4", "online.max_length=32",
                   "online.batch_size=4", "online.device=cpu", "online.report_to=tensorboard"],
    "rsft": ["rsft.rounds=2", "rsft.n=2", "rsft.max_new_tokens=4", "rsft.max_length=32",
             "rsft.batch_size=4", "rsft.device=cpu", "rsft.report_to=tensorboard"],
}


@pytest.mark.parametrize("method", list(RL_TENSORBOARD))
def test_rl_and_round_methods_write_their_rows_to_tensorboard(workdir, tmp_path, method):
    """Every loop's rows reach TensorBoard, not only the engine's: each numeric metric of
    history.json is a scalar at the row's step (or round) in OUTPUT/tensorboard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    out = tmp_path / "o"
    assert recipes.main([str(REPO_ROOT / "recipes" / f"{method}.yaml"), "--model",
                         str(workdir / "model"), "--reward-model", str(tmp_path / "rm"),
                         "--data", str(tmp_path / "prompts.jsonl"), "--output", str(out),
                         *RL_TENSORBOARD[method]]) == 0
    history = json.loads((out / "history.json").read_text())
    files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    key = next(k for k in ("score", "loss", "mean_reward", "n_pairs") if k in history[-1])
    at = "round" if "round" in history[-1] else "step"
    assert [(e.step, e.value) for e in events.Scalars(key)] == \
        [(r[at], pytest.approx(r[key], rel=1e-6)) for r in history if key in r]


# ---- the output folder: one run at a time, and a model fingerprint of the model's own files ----
def test_a_second_run_into_a_locked_output_stops_at_once(workdir, tmp_path, capsys):
    """A run holds ``OUTPUT/.lock`` (flock) from start to end; another run into the same folder
    stops with one line naming the folder and the holder's pid, and writes nothing there."""
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run, as far as the recipe sees
        os.write(fd, b"4242\n")
        assert _run(workdir, "dpo", out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(out) in err and "pid 4242" in err, err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        os.close(fd)  # the other run ends: the folder is free
    assert _run(workdir, "dpo", out) == 0
    assert (out / "model" / "model.safetensors").is_file()


def test_two_processes_into_one_output_folder(workdir, tmp_path, capsys):
    """A real second process: while the first trains (its history.jsonl growing), the second is
    refused with the first's pid; once the first is killed, the OS has released its lock and a
    rerun proceeds (resuming or, here, starting afresh)."""
    import time

    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "rlcourse.recipes", str(REPO_ROOT / "recipes" / "dpo.yaml"),
         "--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
         "--output", str(out), *TINY, "train.max_steps=100000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "history.jsonl").is_file():  # it holds the lock and trains
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.2)
        assert (out / ".lock").read_text().strip() == str(first.pid)
        assert _run(workdir, "dpo", out) == 2
        err = capsys.readouterr().err
        assert f"pid {first.pid}" in err and str(out) in err, err
    finally:
        first.kill()
        first.wait()
    assert _run(workdir, "dpo", out, "--overwrite") == 0


def _copy_model(workdir: Path, to: Path) -> Path:
    shutil.copytree(workdir / "model", to)
    return to


def test_an_output_folder_inside_the_model_folder_resumes(workdir, tmp_path, capsys):
    model_dir = _copy_model(workdir, tmp_path / "model")
    out = model_dir / "runs" / "dpo"  # the run writes into the model's own folder
    args = [str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(model_dir),
            "--data", str(workdir / "pairs.jsonl"), "--output", str(out), *TINY]
    assert recipes.main(args) == 0
    capsys.readouterr()
    assert recipes.main(args) == 0
    assert "already holds the finished run" in capsys.readouterr().err


def test_a_model_folder_that_is_a_git_clone_resumes(workdir, tmp_path, capsys):
    model_dir = _copy_model(workdir, tmp_path / "model")
    (model_dir / ".git" / "objects").mkdir(parents=True)
    (model_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    out = tmp_path / "o"
    args = [str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(model_dir),
            "--data", str(workdir / "pairs.jsonl"), "--output", str(out), *TINY]
    assert recipes.main(args) == 0
    capsys.readouterr()
    # git fetch, a README edited on the hub: nothing that defines the model
    (model_dir / ".git" / "FETCH_HEAD").write_text("0123abcd\n")
    (model_dir / ".git" / "objects" / "pack").write_bytes(b"\0" * 100)
    (model_dir / "README.md").write_text("# a model card\n")
    assert recipes.main(args) == 0
    assert "already holds the finished run" in capsys.readouterr().err
    # the tokenizer does define it
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": 7}))
    assert recipes.main(args) == 2
    assert "model (files)" in capsys.readouterr().err


def test_ranges_are_declared_once():
    """The recipe layer keeps ranges only for keys no section dataclass owns (each dataclass
    declares its own in RANGES, checked in __post_init__)."""
    from rlcourse.recipes.registry import methods
    from rlcourse.recipes.typed import RANGES

    owned = {f"{s.name}.{k}" for row in methods().values() for s in row.sections
             for k in getattr(s.cls, "RANGES", {})}
    assert owned & set(RANGES) == set()
    for section in ("train", "ppo", "rollout", "group", "online", "rsft"):
        assert not any(k.startswith(f"{section}.") for k in set(RANGES) - {"online.loss"})


@pytest.mark.parametrize("method, key, value, must", [
    ("ppo", "rollout.steps", 0, "an integer >= 1"),
    ("ppo", "rollout.lr", -1.0, "a finite number > 0"),
    ("grpo", "rollout.keep_checkpoints", 0, "an integer >= 1"),
    ("grpo", "rollout.mixed_precision", "fp8", "one of no, bf16, fp16, auto"),
    ("rloo", "rollout.checkpoint_every", -1, "an integer >= 0"),
])
def test_rollout_ranges_are_named_with_the_key(method, key, value, must):
    path = REPO_ROOT / "recipes" / f"{method}.yaml"
    with pytest.raises(recipes.RecipeError) as err:
        recipes.load_recipe(path, {key: value})
    assert str(err.value) == f"{path} (command line): {key}: must be {must}, got {value!r}"


def test_an_output_path_that_is_a_file_is_named(workdir, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        assert _run(workdir, "dpo", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith(f"output: {tmp_path / 'taken'} is a file, not a folder: choose "
                                "another output"), err


def test_a_tokenizer_without_eos_is_named_before_training(workdir, tmp_path, capsys):
    import shutil

    from rlcourse.models import load_tokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(workdir / "model", model_dir)
    tok = load_tokenizer(model_dir)
    tok.eos_token = None
    tok.save_pretrained(model_dir)
    code = recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(model_dir),
                         "--data", str(workdir / "pairs.jsonl"), "--output",
                         str(tmp_path / "o"), *TINY])
    assert code == 2
    assert "has no EOS token" in capsys.readouterr().err


@pytest.mark.parametrize("recipe_file, data_key, section", [
    ("dpo.yaml", "data", "train"), ("grpo.yaml", "prompts", "rollout")])
def test_tensorboard_without_its_package_is_refused_before_the_model_loads(
        tmp_path, monkeypatch, recipe_file, data_key, section):
    """The engine's methods (train.report_to) and the RL loops (rollout.report_to) alike."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "tensorboard", "tensorboardX") else real(name, *a))
    recipe = recipes.load_recipe(REPO_ROOT / "recipes" / recipe_file, {
        "model": str(tmp_path / "never-read"), data_key: str(tmp_path / "d.jsonl"),
        "output": str(tmp_path / "o"), f"{section}.report_to": "tensorboard",
        f"{section}.device": "cpu"})
    with pytest.raises(recipes.RecipeError, match=rf"{section}.report_to: report_to='tensorboard' "
                                                  "but neither tensorboard nor tensorboardX"):
        recipes.run_recipe(recipe)
