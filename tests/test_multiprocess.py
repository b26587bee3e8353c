"""Several processes give what one process gives: 2 CPU processes on gloo (``torchrun``, what
``accelerate launch`` runs) against one process holding the whole global batch.

Oracles: the weights and the logged loss of the one-process run with batch 4 (the two-process
runs use batch 1 x grad_accum 2 or batch 2 per process). Tiny models (1 layer, hidden 32).
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
from rlcourse.models import RewardModel, save_model

torch.set_num_threads(1)
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
needs_torchrun = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")

PAIRS = [  # completions of different lengths: token means of halves differ from the whole's
    {"prompt": "what is rain ?", "chosen": "rain is wet .", "rejected": "rain is dry ."},
    {"prompt": "what is snow ?", "chosen": "snow is cold and white and soft .",
     "rejected": "snow is hot ."},
    {"prompt": "tell me about dogs", "chosen": "a dog can bark .", "rejected": "you are dumb ."},
    {"prompt": "what is the sun ?", "chosen": "the sun is a star .",
     "rejected": "the sun is cold . cold cold ."},
    {"prompt": "what is fire ?", "chosen": "fire .", "rejected": "fire is cold ."},
    {"prompt": "tell me about cats", "chosen": "a cat can purr and a cat can sleep .",
     "rejected": "a dog can bark ."},
    {"prompt": "what is ice ?", "chosen": "ice is cold .", "rejected": "ice is hot . ice is hot ."},
    {"prompt": "what is the moon ?", "chosen": "the moon is a rock .",
     "rejected": "the moon is cheese ."},
]
COMMON = ["train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=1",
          "train.progress=false", "train.device=cpu", "max_length=32"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, run_folder):
    """A tiny model with its output layer untied from the input embeddings (as in Llama 3 8B,
    Mistral, Qwen2.5-7B), and the JSONL files."""
    root = run_folder(tmp_path_factory.mktemp("multiproc"),
                      [" ".join(p.values()) for p in PAIRS], PAIRS, tie_word_embeddings=False)
    from rlcourse.models import load_model

    model, _ = load_model(root / "model", device="cpu")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    return root


def _args(workdir: Path, method: str, out: Path) -> list[str]:
    data = "sft.jsonl" if method == "sft" else "pairs.jsonl"
    return [str(REPO_ROOT / "recipes" / f"{method}.yaml"), "--model", str(workdir / "model"),
            "--data", str(workdir / data), "--output", str(out), *COMMON]


def _two_processes(args: list[str], *launcher: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*(launcher or (TORCHRUN, "--nproc_per_node", "2")), "-m", "rlcourse.recipes", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _state(path: Path, reward: bool = False) -> dict[str, torch.Tensor]:
    if reward:
        return dict(RewardModel.from_pretrained(path, device="cpu").state_dict())
    from rlcourse.models import load_model

    return dict(load_model(path, device="cpu")[0].state_dict())


def _history(out: Path) -> list[dict]:
    return [r for r in json.loads((out / "history.json").read_text()) if "loss" in r]


def _assert_same_run(one: Path, two: Path, reward: bool = False, atol: float = 1e-5,
                     skip: tuple[str, ...] = ()) -> None:
    summary = json.loads((two / "recipe.json").read_text())["summary"]
    assert summary["num_processes"] == 2
    a, b = _state(one / "model", reward), _state(two / "model", reward)
    assert a.keys() == b.keys()
    for k in set(a) - set(skip):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)
    h1, h2 = _history(one), _history(two)
    assert [r["step"] for r in h2] == [r["step"] for r in h1] == [1, 2]
    for r1, r2 in zip(h1, h2, strict=True):  # rows reduced over processes, not rank 0's
        for key in r1:
            if key in ("loss", "accuracy", "margin", "nll_per_token", "rewards/margins",
                       "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
                assert r2[key] == pytest.approx(r1[key], abs=1e-5), key


@pytest.mark.slow
@needs_torchrun
def test_sft_token_mean_two_processes_with_accumulation_equal_one(workdir, tmp_path):
    """Default SFT (``reduction: token``): 2 processes x batch 1 x grad_accum 2 must give the
    model and the logged loss of 1 process x batch 4: the denominator is the global batch's
    target tokens, summed over micro-batches and processes."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert recipes.main([*_args(workdir, "sft", one), "train.batch_size=4",
                         "train.grad_accum_steps=1"]) == 0
    _two_processes([*_args(workdir, "sft", two), "train.batch_size=1",
                    "train.grad_accum_steps=2"])
    _assert_same_run(one, two)


@pytest.mark.slow
@needs_torchrun
def test_kto_two_processes_equal_one(workdir, tmp_path):
    """KTO: 2 processes x batch 4 must give the model and logged loss of 1 process x batch 8.
    The logged metrics differ in their keys between processes (``rewards/chosen`` only for a
    batch holding a desirable example), which hung the metric reduction, and are means over a
    batch's examples of one label, pooled by count (a mean of per-process means gave
    rewards/chosen -0.596 against one process's -0.460); z0 is gathered from every process's
    mismatched pairs."""
    data = tmp_path / "unpaired.jsonl"
    write_jsonl(data, [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                       for p in PAIRS for k in ("chosen", "rejected")])

    def args(out):
        return [str(REPO_ROOT / "recipes" / "kto.yaml"), "--model", str(workdir / "model"),
                "--data", str(data), "--output", str(out), *COMMON, "train.grad_accum_steps=1"]

    one, two = tmp_path / "one", tmp_path / "two"
    assert recipes.main([*args(one), "train.batch_size=8"]) == 0
    _two_processes([*args(two), "train.batch_size=4"])
    # Weights to 5e-5: Adam at lr 1e-2 amplifies float noise, measured 2.8e-6 on AVX-512
    # kernels and 1.5e-5 with ATEN_CPU_CAPABILITY=default (a reader's CPU); a wrong reduction
    # moves them by the learning rate's order. The logged loss and metrics stay at 1e-5.
    _assert_same_run(one, two, atol=5e-5)


@pytest.mark.slow
@needs_torchrun
def test_reward_model_with_untied_output_layer_two_processes_equal_one(workdir, tmp_path):
    """The LM head takes no part in a reward; untied, DDP used to stop with "Expected to have
    finished reduction in the prior iteration"."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert recipes.main([*_args(workdir, "reward_model", one), "train.batch_size=4",
                         "train.grad_accum_steps=1"]) == 0
    _two_processes([*_args(workdir, "reward_model", two), "train.batch_size=2",
                    "train.grad_accum_steps=1"])
    # The head's bias cancels in r_w - r_l: its gradient is float noise (~1e-9), which Adam
    # turns into steps of size lr in either direction, so it is not compared. Other elements
    # with tiny gradients get the same amplification: hence 5e-5 (lr 1e-2).
    _assert_same_run(one, two, reward=True, atol=5e-5, skip=("head.bias",))


@pytest.mark.slow
@needs_torchrun
def test_ppo_two_processes_equal_one(workdir, tmp_path):
    """PPO (separate critic on the untied model, whose LM head the critic never uses): 2
    processes answering 2 prompts each per step must give the samples, scores, losses and
    model of 1 process answering 4, with two global minibatches of 2 rows per epoch (each
    process takes one row of each; before minibatch sizes were global, each process cut its own
    2 rows into minibatches of 2 and the runs differed by 0.015); advantages whitened and token
    means taken over both processes."""
    from rlcourse.models import load_model

    model, tok = load_model(workdir / "model", device="cpu")
    save_model(RewardModel(model, seed=1), tok, tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])

    def args(out: str) -> list[str]:
        return [str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model", str(workdir / "model"),
                "--reward-model", str(tmp_path / "rm"), "--data", str(tmp_path / "prompts.jsonl"),
                "--output", str(tmp_path / out), "rollout.steps=2", "rollout.batch_size=4",
                "rollout.max_new_tokens=4", "rollout.lr=1e-2", "rollout.device=cpu",
                "ppo.minibatch_size=2", "ppo.ppo_epochs=2", "ppo.adaptive_kl=true",
                "ppo.kl_target=0.01"]

    assert recipes.main(args("one")) == 0
    _two_processes(args("two"))
    h1, h2 = (json.loads((tmp_path / p / "history.json").read_text()) for p in ("one", "two"))
    assert [r["step"] for r in h2] == [0, 1]
    for r1, r2 in zip(h1, h2, strict=True):
        for key in ("score", "kl", "kl_coef", "response_length", "policy_loss", "value_loss",
                    "entropy"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-5), key
    one, two = _state(tmp_path / "one" / "model"), _state(tmp_path / "two" / "model")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)  # measured 4.8e-7


ROUND_VERIFIER = '''
def weighted_chars(prompts, completions):  # distinct answers get distinct rewards: no ties
    return [float(sum((i + 1) * ord(c) for i, c in enumerate(t))) for t in completions]
'''
ROUNDS = {
    "online_dpo": ["online.rounds=2", "online.max_new_tokens=4", "online.max_length=32",
                   "online.batch_size=4", "online.epochs=2", "online.lr=1e-3",
                   "online.device=cpu"],
    "rsft": ["rsft.rounds=2", "rsft.n=2", "rsft.max_new_tokens=4", "rsft.max_length=32",
             "rsft.batch_size=4", "rsft.epochs=2", "rsft.lr=1e-3", "rsft.device=cpu"],
}


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("method", list(ROUNDS))
def test_rounds_two_processes_equal_one(workdir, tmp_path, method):
    """Online DPO and RSFT on 2 processes: each samples and scores half of a round's answers
    (the rows one process would draw), both get all of them, and the round trains with the
    global batch of 4 split 2 + 2: the rows and the model of 1 process. The 8 prompts keep all
    their pairs / winners (asserted), so every round's data fills whole global batches."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    (tmp_path / "rlc_mp_verifier.py").write_text(ROUND_VERIFIER)

    def args(out: str) -> list[str]:
        return [str(REPO_ROOT / "recipes" / f"{method}.yaml"), "--model", str(workdir / "model"),
                "--data", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / out),
                "reward_model=null", "reward_fn=rlc_mp_verifier:weighted_chars", *ROUNDS[method]]

    env_path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    for out, launcher in (("one", (sys.executable,)),
                          ("two", (TORCHRUN, "--nproc_per_node", "2"))):
        proc = subprocess.run([*launcher, "-m", "rlcourse.recipes", *args(out)],
                              env={**os.environ, "OMP_NUM_THREADS": "1",
                                   "PYTHONPATH": env_path},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    h1, h2 = (json.loads((tmp_path / p / "history.json").read_text()) for p in ("one", "two"))
    size = "n_pairs" if method == "online_dpo" else "n_targets"
    assert [r[size] for r in h1] == [8, 8]  # whole global batches in every round
    assert len(h1) == len(h2) == 2
    for r1, r2 in zip(h1, h2, strict=True):
        for key, value in r1.items():
            if key != "train_seconds":
                assert r2[key] == pytest.approx(value, abs=1e-5), key
    one, two = _state(tmp_path / "one" / "model"), _state(tmp_path / "two" / "model")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_asked_for_by_an_accelerate_config_is_refused_not_ignored(workdir, tmp_path,
                                                                           monkeypatch, var):
    """``accelerate launch --config_file`` with ``distributed_type: FSDP`` sets
    ``ACCELERATE_USE_FSDP=true``; on CPU accelerate 1.16 then runs plain DDP (measured: the
    prepared model is a DistributedDataParallel), so the recipe stops and says why."""
    monkeypatch.setenv(var, "true")
    with pytest.raises(recipes.RecipeError, match="do not support"):
        recipes.run_recipe(recipes.load_recipe(_args(workdir, "dpo", tmp_path)[0], {
            "model": str(workdir / "model"), "data": str(workdir / "pairs.jsonl"),
            "output": str(tmp_path / "o")}))
    assert not (tmp_path / "o").exists()
