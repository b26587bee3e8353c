"""GRPO and RLOO recipes: a verifier function or a reward model as the reward, the reward goes
up, a killed run resumes to the weights of an uninterrupted one, several processes give what
one process gives, and a bad ``reward_fn`` is named by file, line and key.

Tiny model (1 layer, hidden 32, a 24-token vocabulary), 4 prompts. The toy verifier counts the
word "yes" in a completion: its ceiling is ``max_new_tokens`` (6), a random model scores about
0.25.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlcourse import recipes
from rlcourse.config import REPO_ROOT
from rlcourse.data import write_jsonl
from rlcourse.models import generate, load_model, save_model

torch.set_num_threads(1)
WORDS = ["what is rain ? rain is wet .", "what is snow ? snow is cold .",
         "tell me about dogs a dog can bark .", "yes no yes no"]
PROMPTS = ["what is rain ?", "what is snow ?", "tell me about dogs", "what is a dog ?"]
VERIFIER = '''
CRASH_AT = None  # a test sets it: the call that raises, as a killed process would stop
calls = 0


def count_yes(prompts, completions):
    global calls
    calls += 1
    if CRASH_AT is not None and calls >= CRASH_AT:
        raise KeyboardInterrupt("killed")
    return [float(c.split().count("yes")) for c in completions]
'''
TINY = ["group.group_size=4", "group.n_prompts=4", "group.kl_coef=0", "rollout.lr=3e-2",
        "rollout.max_new_tokens=6", "rollout.device=cpu", "rollout.checkpoint_every=0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, run_folder):
    return run_folder(tmp_path_factory.mktemp("group"), WORDS, prompts=PROMPTS,
                      files={"rlc_toy_verifiers.py": VERIFIER})


@pytest.fixture
def verifier(workdir, monkeypatch):
    monkeypatch.syspath_prepend(str(workdir))
    import rlc_toy_verifiers

    monkeypatch.setattr(rlc_toy_verifiers, "CRASH_AT", None)
    return rlc_toy_verifiers


def _run(workdir: Path, method: str, out: Path, *extra: str) -> int:
    return recipes.main([str(REPO_ROOT / "recipes" / f"{method}.yaml"),
                         "--model", str(workdir / "model"),
                         "--data", str(workdir / "prompts.jsonl"), "--output", str(out),
                         "reward_model=null", "reward_fn=rlc_toy_verifiers:count_yes",
                         *TINY, *extra])


def _mean_yes(model_dir: Path) -> float:
    model, tok = load_model(model_dir, device="cpu")
    texts = generate(model, tok, PROMPTS * 16, max_new_tokens=6, seed=123).texts
    return sum(t.split().count("yes") for t in texts) / len(texts)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_model(path, device="cpu")[0].state_dict())


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_recipe_with_a_verifier_raises_its_reward(workdir, verifier, tmp_path, method):
    assert _run(workdir, method, tmp_path / "o", "rollout.steps=6") == 0
    before, after = _mean_yes(workdir / "model"), _mean_yes(tmp_path / "o" / "model")
    # measured (6 steps, seed 0): grpo 0.25 -> 5.41, rloo 0.25 -> 5.50, of at most 6
    # (64 samples at seed 123)
    assert before < 0.5 and after > before + 2.0, (before, after)
    rows = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["score"] > rows[0]["score"]
    saved = json.loads((tmp_path / "o" / "recipe.json").read_text())
    assert saved["group"]["advantage"] == method
    assert saved["reward_fn"] == "rlc_toy_verifiers:count_yes"


def test_killed_run_resumes_to_the_uninterrupted_result(workdir, verifier, tmp_path,
                                                        monkeypatch):
    # the kill falls inside the warm-up: the resumed run must go on with step 3's rate, then
    # the linear decay (step 5 at lr / 2), and both parameter groups' Adam states (the final
    # norm's at 5 x lr)
    extra = ("rollout.steps=5", "rollout.checkpoint_every=1", "group.kl_coef=0.05",
             "group.epochs=2", "group.minibatch_size=8", "rollout.warmup_steps=3",
             "rollout.lr_decay=linear", "rollout.lr_multipliers={model.norm.weight: 5}")
    assert _run(workdir, "grpo", tmp_path / "whole", *extra) == 0
    monkeypatch.setattr(verifier, "calls", 0)
    monkeypatch.setattr(verifier, "CRASH_AT", 3)  # the third step's scoring is killed
    with pytest.raises(KeyboardInterrupt):
        _run(workdir, "grpo", tmp_path / "crashed", *extra)
    assert not (tmp_path / "crashed" / "model").exists()
    assert sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002"]
    monkeypatch.setattr(verifier, "CRASH_AT", None)
    monkeypatch.setattr(verifier, "calls", 0)
    assert _run(workdir, "grpo", tmp_path / "crashed", *extra) == 0  # the same command again
    assert verifier.calls == 3  # it resumed after step 2 (scored steps 3 to 5 only)
    whole, resumed = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "crashed" /
                                                                       "model")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6, msg=k)
    rows = {p: json.loads((tmp_path / p / "history.json").read_text())
            for p in ("whole", "crashed")}
    assert [r["step"] for r in rows["crashed"]] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in rows["crashed"]] == [r["score"] for r in rows["whole"]]
    assert [r["lr"] for r in rows["crashed"]] == pytest.approx([1e-2, 2e-2, 3e-2, 3e-2, 1.5e-2])
    assert all("kl_k3" in r for r in rows["whole"])


def test_resuming_with_other_lr_multipliers_is_refused(workdir, verifier, tmp_path, capsys):
    # the recipe: run.json names the key; the loop itself: its checkpoint's settings
    extra = ("rollout.steps=2", "rollout.checkpoint_every=1")
    verifier.CRASH_AT, verifier.calls = 2, 0  # killed in step 2, after step 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        _run(workdir, "grpo", tmp_path / "o", *extra,
             "rollout.lr_multipliers={model.norm.weight: 5}")
    verifier.CRASH_AT, verifier.calls = None, 0
    assert _run(workdir, "grpo", tmp_path / "o", *extra,
                "rollout.lr_multipliers={model.norm.weight: 50}") != 0
    err = capsys.readouterr().err
    assert "rollout.lr_multipliers: {'model.norm.weight': 5} -> {'model.norm.weight': 50}" in err
    from rlcourse.grpo import GroupConfig, train_group_lm

    model, tok = load_model(workdir / "model", device="cpu")
    with pytest.raises(ValueError, match=r"other settings \(lr_multipliers\)"):
        train_group_lm(model, tok, PROMPTS, verifier.count_yes,
                       GroupConfig(group_size=4, n_prompts=4, kl_coef=0.0, loss_type="grpo"), 2,
                       lr=3e-2,
                       max_new_tokens=6, checkpoint_dir=tmp_path / "o" / "checkpoints",
                       lr_multipliers={"model.norm.weight": 50}, device="cpu", progress=False)


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_default(workdir, verifier,
                                                                        tmp_path):
    extra = ("rollout.steps=2", "rollout.checkpoint_every=1")
    verifier.CRASH_AT, verifier.calls = 2, 0
    with pytest.raises(KeyboardInterrupt):
        _run(workdir, "grpo", tmp_path / "o", *extra)
    verifier.CRASH_AT, verifier.calls = None, 0
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    for key in ("rollout.warmup_steps", "rollout.lr_multipliers"):  # as an older run.json
        del info["identity"][key]
    (tmp_path / "o" / "run.json").write_text(json.dumps(info))
    assert _run(workdir, "grpo", tmp_path / "o", *extra) == 0
    assert verifier.calls == 1  # resumed: scored step 2 only
    verifier.calls = 0
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    del info["identity"]["rollout.warmup_steps"]
    info["status"] = "running"
    (tmp_path / "o" / "run.json").write_text(json.dumps(info))
    # asking for a warm-up the old run did not have is another run
    assert _run(workdir, "grpo", tmp_path / "o", *extra, "rollout.warmup_steps=2") != 0


def test_warmup_ramps_the_learning_rate_linearly_then_holds_it(workdir, verifier, tmp_path):
    assert _run(workdir, "grpo", tmp_path / "o", "rollout.steps=5",
                "rollout.warmup_steps=4") == 0
    rows = json.loads((tmp_path / "o" / "history.json").read_text())
    # step k uses lr * min(1, k / 4), lr = 3e-2 (TINY)
    assert [r["lr"] for r in rows] == pytest.approx([7.5e-3, 1.5e-2, 2.25e-2, 3e-2, 3e-2])
    assert _run(workdir, "grpo", tmp_path / "flat", "rollout.steps=2") == 0
    flat = json.loads((tmp_path / "flat" / "history.json").read_text())
    assert [r["lr"] for r in flat] == pytest.approx([3e-2, 3e-2])
    assert _run(workdir, "grpo", tmp_path / "down", "rollout.steps=6", "rollout.warmup_steps=2",
                "rollout.lr_decay=linear") == 0
    down = json.loads((tmp_path / "down" / "history.json").read_text())
    # the ramp, then step k > 2 uses lr * (6 - k + 1) / (6 - 2): 4/4, 3/4, 2/4, 1/4
    assert [r["lr"] for r in down] == pytest.approx([1.5e-2, 3e-2, 3e-2, 2.25e-2, 1.5e-2,
                                                     7.5e-3])


@pytest.mark.parametrize("extra, says", [
    (("rollout.lr_decay=cosine",), "rollout.lr_decay: must be one of constant, linear"),
    (("rollout.lr_decay=linear", "rollout.steps=3", "rollout.warmup_steps=3"),
     "rollout.lr_decay: must be constant when steps (3) <= warmup_steps (3)"),
])
def test_bad_lr_decay_names_the_key(workdir, verifier, tmp_path, extra, says, capsys):
    assert _run(workdir, "grpo", tmp_path / "o", *extra) != 0
    assert says in capsys.readouterr().err


def test_lr_multipliers_move_the_named_parameters_faster(workdir, verifier, tmp_path):
    # Adam's first step moves every weight by lr * g / (|g| + eps): by lr wherever the gradient
    # is not ~0. With the final norm's gain at 10 x lr it moves by 10 x lr, everything else by
    # at most lr; ignoring the multiplier leaves the gain at lr.
    lr = 1e-3
    assert _run(workdir, "grpo", tmp_path / "o", "rollout.steps=1", f"rollout.lr={lr}",
                "rollout.lr_multipliers={model.norm.weight: 10}") == 0
    before, after = _weights(workdir / "model"), _weights(tmp_path / "o" / "model")
    moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
    assert moved["model.norm.weight"] == pytest.approx(10 * lr, rel=1e-3)
    others = {k: m for k, m in moved.items() if k != "model.norm.weight"}
    assert max(others.values()) <= lr * (1 + 1e-3)
    assert max(others.values()) == pytest.approx(lr, rel=1e-3)  # the rest did learn, at lr
    saved = json.loads((tmp_path / "o" / "recipe.json").read_text())
    assert saved["rollout"]["lr_multipliers"] == {"model.norm.weight": 10}


@pytest.mark.parametrize("value, says", [
    ("{model.nrom.weight: 10}", "pattern 'model.nrom.weight' matches no trainable parameter"),
    ("{model.norm.weight: 0}", "must be a mapping of parameter-name patterns to numbers > 0"),
    ("{model.norm.weight: fast}", "must be a mapping of parameter-name patterns to numbers > 0"),
    ("[model.norm.weight]", "expected a mapping"),
])
def test_bad_lr_multipliers_name_the_key_before_any_step(workdir, verifier, tmp_path, value,
                                                         says, capsys):
    assert _run(workdir, "grpo", tmp_path / "o", "rollout.steps=1",
                f"rollout.lr_multipliers={value}") != 0
    err = capsys.readouterr().err
    assert "rollout.lr_multipliers" in err and says in err, err
    assert not (tmp_path / "o" / "checkpoints").exists()  # stopped before any step


def test_rloo_recipe_with_a_reward_model(workdir, tmp_path):
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    code = recipes.main([str(REPO_ROOT / "recipes" / "rloo.yaml"),
                         "--model", str(workdir / "model"), "--reward-model", str(tmp_path / "rm"),
                         "--data", str(workdir / "prompts.jsonl"), "--output", str(tmp_path / "o"),
                         *TINY, "rollout.steps=2"])
    assert code == 0
    rows = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [r["step"] for r in rows] == [1, 2]
    before, after = _weights(workdir / "model"), _weights(tmp_path / "o" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("value, says", [
    ("count_yes", "expected 'module:function'"),
    ("a:b:c", "expected 'module:function'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("rlc_toy_verifiers:nope", "module 'rlc_toy_verifiers' has no function 'nope'"),
    ("rlc_toy_verifiers:CRASH_AT", "is not callable"),
    ("missing/file.py:f", "missing/file.py: no such file"),
    ("rlc_broken_verifier:f", "importing 'rlc_broken_verifier' failed: ZeroDivisionError"),
])
def test_bad_reward_fn_names_file_line_and_key(workdir, verifier, tmp_path, value, says):
    (workdir / "rlc_broken_verifier.py").write_text("x = 1 / 0\n")
    path = tmp_path / "r.yaml"
    path.write_text("method: grpo\nmodel: m\nprompts: p.jsonl\noutput: o\n"
                    f"reward_fn: {value}\n")
    with pytest.raises(recipes.RecipeError) as err:
        recipes.load_recipe(path)
    assert str(err.value).startswith(f"{path}:5: reward_fn: ") and says in str(err.value)


def test_reward_sections_are_checked(tmp_path):
    path = tmp_path / "r.yaml"
    base = "method: rloo\nmodel: m\nprompts: p.jsonl\noutput: o\n"
    path.write_text(base)
    with pytest.raises(recipes.RecipeError, match="give exactly one of reward_model"):
        recipes.load_recipe(path)
    path.write_text(base + "reward_model: rm\ngroup:\n  advantage: grpo\n")
    with pytest.raises(recipes.RecipeError, match=rf"{path}:7: group.advantage: a rloo recipe"):
        recipes.load_recipe(path)
    path.write_text(base + "reward_model: rm\ngroup:\n  loss_type: token\n")
    with pytest.raises(recipes.RecipeError, match=rf"{path}:7: group.loss_type: must be one of"):
        recipes.load_recipe(path)
    path.write_text(base + "reward_model: rm\ntrain:\n  lr: 1.0\n")
    with pytest.raises(recipes.RecipeError, match=rf"{path}:6: train: a rloo recipe takes"):
        recipes.load_recipe(path)


TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_processes_sample_their_share_and_equal_one_process(workdir, verifier, tmp_path):
    """2 CPU processes on gloo, each answering 2 of the 4 prompts of a step: the same samples,
    scores and the same model as one process answering all 4, with two epochs of two global
    minibatches of 8 responses (each process takes 4 of each; ``dapo`` token counts summed over
    processes)."""
    extra = ("rollout.steps=3", "group.loss_type=dapo", "group.epochs=2", "rollout.lr=3e-3",
             "group.minibatch_size=8")
    assert _run(workdir, "grpo", tmp_path / "one", *extra) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])}
    args = [str(REPO_ROOT / "recipes" / "grpo.yaml"), "--model", str(workdir / "model"),
            "--data", str(workdir / "prompts.jsonl"), "--output", str(tmp_path / "two"),
            "reward_model=null", "reward_fn=rlc_toy_verifiers:count_yes", *TINY, *extra]
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "rlcourse.recipes", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "recipe.json").read_text())["summary"][
        "num_processes"] == 2
    h1, h2 = (json.loads((tmp_path / p / "history.json").read_text()) for p in ("one", "two"))
    for r1, r2 in zip(h1, h2, strict=True):
        for key in ("score", "policy_loss", "response_length"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-5), key
    one, two = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    for k in one:
        # measured 2.6e-6; with each process cutting its own minibatches (before they were
        # global) the first step's logged policy_loss already differs (-0.0659 vs -0.0604)
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-4, msg=k)


def test_reward_fn_from_a_file_path(workdir):
    fn = recipes.load_reward_fn(f"{workdir / 'rlc_toy_verifiers.py'}:count_yes")
    assert fn(["q", "q"], ["yes no yes", "no"]) == [2.0, 0.0]


def test_a_reward_function_edited_between_runs_is_not_the_same_run(workdir, tmp_path, capsys):
    """The recipe names the reward by ``file:function``; its code is part of the run: a rerun
    after the verifier was edited is refused, naming the key, and leaves the run as it was."""
    verifiers = tmp_path / "verifiers.py"
    verifiers.write_text(VERIFIER)
    out = tmp_path / "o"

    def run() -> int:
        return recipes.main([str(REPO_ROOT / "recipes" / "grpo.yaml"), "--model",
                             str(workdir / "model"), "--data", str(workdir / "prompts.jsonl"),
                             "--output", str(out), "reward_model=null",
                             f"reward_fn={verifiers}:count_yes", *TINY, "rollout.steps=1"])

    assert run() == 0
    capsys.readouterr()
    assert run() == 0  # unchanged: reported as finished
    assert "already holds the finished run" in capsys.readouterr().err
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    verifiers.write_text(VERIFIER.replace('count("yes")', 'count("no")'))
    assert run() == 2
    err = capsys.readouterr().err
    assert "reward_fn (source sha256)" in err, err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_grpo_recipe_with_lora_and_a_kl_penalty(workdir, verifier, tmp_path):
    """LoRA on a group method: only adapters train, the KL's reference is the policy with its
    adapters switched off (no copy), the adapter folder is saved, history.jsonl is written as
    the run goes; before, 'lora' was an unknown key for GRPO and RLOO."""
    from rlcourse.adapters import load_lora

    out = tmp_path / "o"
    assert _run(workdir, "grpo", out, "rollout.steps=2", "group.kl_coef=0.05", "lora.r=4",
                "lora.target_modules=[q_proj, v_proj]") == 0
    assert (out / "model" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl_k3"] == 0.0
    adapted, _ = load_lora(out / "model", device="cpu")
    assert any("lora" in n for n, _ in adapted.named_parameters())


def test_a_reward_function_returning_nan_stops_the_recipe_with_one_line(workdir, tmp_path,
                                                                         capsys, monkeypatch):
    (tmp_path / "rlc_bad_rewards.py").write_text(
        "def nan_for_some(prompts, completions):\n"
        "    return [float('nan') if i % 3 else 1.0 for i, _ in enumerate(completions)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = recipes.main([str(REPO_ROOT / "recipes" / "grpo.yaml"),
                         "--model", str(workdir / "model"),
                         "--data", str(workdir / "prompts.jsonl"),
                         "--output", str(tmp_path / "o"), "reward_model=null",
                         "reward_fn=rlc_bad_rewards:nan_for_some", *TINY, "rollout.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: reward function rlc_bad_rewards.nan_for_some (")
    assert "returned nan for completion 1" in err[-1]
    assert not (tmp_path / "o" / "model").exists()


def test_a_device_the_machine_lacks_is_refused_before_the_model_loads(workdir, tmp_path,
                                                                      monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.syspath_prepend(str(workdir))  # the reward_fn is imported when the recipe is read
    with pytest.raises(recipes.RecipeError, match=r"rollout.device: rollout.device=cuda but no "
                                                  "CUDA GPU is visible"):
        recipes.run_recipe(recipes.load_recipe(
            REPO_ROOT / "recipes" / "grpo.yaml",
            {"model": str(tmp_path / "not-read"), "prompts": str(workdir / "prompts.jsonl"),
             "output": str(tmp_path / "o"), "reward_model": None,
             "reward_fn": "rlc_toy_verifiers:count_yes", "rollout.device": "cuda"}))


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo"])
@pytest.mark.parametrize("key, value", [("max_length", "64"), ("truncation", "left")])
def test_rl_recipes_refuse_length_keys_they_would_ignore(method, key, value):
    with pytest.raises(recipes.RecipeError, match=rf"(?i)<recipe>:6: {key}: a {method} recipe "
                                                  "samples its answers"):
        recipes.load_recipe(text=f"method: {method}\nmodel: m\nprompts: p\noutput: o\n"
                                 f"reward_model: r\n{key}: {value}\n")


EVAL_PROMPTS = ["what is ice ?", "tell me about the sun and the moon"]


def test_group_recipe_evaluates_its_eval_data(workdir, tmp_path, monkeypatch):
    """eval_data for GRPO: every rollout.eval_every steps and at the end, one answer per
    held-out prompt is scored. The reward here is the prompt's length in words, so the logged
    eval/reward must be the mean over the EVAL prompts (4 and 8 words: 6.0), whatever the
    answers, while the training rows score the training prompts."""
    (tmp_path / "rlc_prompt_len.py").write_text(
        "def words(prompts, completions):\n"
        "    return [float(len(p.split())) for p in prompts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in EVAL_PROMPTS])
    out = tmp_path / "o"
    code = recipes.main([str(REPO_ROOT / "recipes" / "grpo.yaml"),
                         "--model", str(workdir / "model"),
                         "--data", str(workdir / "prompts.jsonl"), "--output", str(out),
                         "reward_model=null", "reward_fn=rlc_prompt_len:words",
                         f"eval_data={tmp_path / 'eval.jsonl'}", *TINY, "rollout.steps=3",
                         "rollout.eval_every=2"])
    assert code == 0
    rows = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in rows if "eval/reward" in r] == [2, 3]
    assert all(r["eval/reward"] == 6.0 for r in rows if "eval/reward" in r)
    assert all(r["score"] == 4.25 for r in rows)  # the 4 training prompts: 4, 4, 4, 5 words


def test_eval_every_without_eval_data_is_refused():
    with pytest.raises(recipes.RecipeError, match="rollout.eval_every: evaluates the eval_data"):
        recipes.load_recipe(text="method: grpo\nmodel: m\nprompts: p\noutput: o\n"
                                 "reward_model: r\nrollout:\n  eval_every: 5\n")
