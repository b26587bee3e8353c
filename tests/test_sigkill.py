"""SIGKILL, then the same command again: every method ends with the weights of a run that was
never stopped (LoRA included).

A ``kill -9`` runs no cleanup: no ``finally``, no lock release by the program, possibly half a
checkpoint on disk. The recipe runs in a child process; the test waits until the first
checkpoint is complete, then kills the child at once (mid-step, or mid-way through writing the
next checkpoint: wherever it happens to be), reruns the same command in this process and
compares the saved weights with an uninterrupted run's. The kernel drops the ``flock`` of a dead
process, so the rerun takes the output folder; atomic writes leave either a whole checkpoint or
none; resume replays data order, sampling seeds and RNG states.

:func:`test_sigkill_at_random_moments` kills each case three times at moments drawn over the
whole run (not only after the first checkpoint), each kill hitting the rerun of the last.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlcourse import recipes
from rlcourse.config import REPO_ROOT
from rlcourse.models import load_model

torch.set_num_threads(1)
WORDS = ["what is rain ? rain is wet dry .", "what is snow ? snow is cold hot .",
         "tell me about dogs a dog can bark .", "yes no yes no"]
PROMPTS = ["what is rain ?", "what is snow ?", "tell me about dogs", "what is a dog ?"]
PAIRS = [{"prompt": "what is rain ?", "chosen": "rain is wet .", "rejected": "rain is dry ."},
         {"prompt": "what is snow ?", "chosen": "snow is cold .", "rejected": "snow is hot ."},
         {"prompt": "tell me about dogs", "chosen": "a dog can bark .", "rejected": "yes no ."},
         {"prompt": "what is a dog ?", "chosen": "a dog can bark .", "rejected": "no ."}]
VERIFIER = '''
import os, time


def count_yes(prompts, completions):
    time.sleep(float(os.environ.get("RLC_SLOW", "0")))  # the child is slowed down to be killed
    return [float(c.split().count("yes")) for c in completions]
'''
STEPS = ["train.max_steps=6", "train.checkpoint_every=1", "train.batch_size=2",
         "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=1", "train.progress=false",
         "train.device=cpu", "max_length=32"]
ROLLOUT = ["rollout.steps=5", "rollout.checkpoint_every=1", "rollout.max_new_tokens=4",
           "rollout.lr=1e-2", "rollout.device=cpu"]
CASES = {
    "sft": ("sft", "data", "sft.jsonl", STEPS),
    "dpo+lora": ("dpo", "data", "pairs.jsonl", [*STEPS, "lora.r=4", "lora.alpha=8"]),
    "kto": ("kto", "data", "pairs.jsonl", STEPS),
    "ppo": ("ppo", "prompts", "prompts.jsonl", [*ROLLOUT, "rollout.batch_size=4",
                                                "ppo.minibatch_size=2", "ppo.ppo_epochs=1"]),
    "ppo+lora": ("ppo", "prompts", "prompts.jsonl", [*ROLLOUT, "rollout.batch_size=4",
                                                     "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                                                     "rollout.separate_critic=false",
                                                     "lora.r=4"]),
    "grpo": ("grpo", "prompts", "prompts.jsonl", [*ROLLOUT, "group.group_size=2",
                                                  "group.n_prompts=2", "reward_model=null",
                                                  "reward_fn=rlc_kill_verifier:count_yes"]),
    "online_dpo": ("online_dpo", "prompts", "prompts.jsonl",
                   ["online.rounds=4", "online.max_new_tokens=4", "online.max_length=32",
                    "online.batch_size=4", "online.device=cpu", "reward_model=null",
                    "reward_fn=rlc_kill_verifier:count_yes"]),
    "rsft": ("rsft", "prompts", "prompts.jsonl",
             ["rsft.rounds=4", "rsft.n=2", "rsft.max_new_tokens=4", "rsft.max_length=32",
              "rsft.batch_size=4", "rsft.device=cpu", "reward_model=null",
              "reward_fn=rlc_kill_verifier:count_yes"]),
    # Killed inside a round: each round trains its pairs (up to 4; tied answers give none)
    # x 10 epochs, one pair per step, checkpointing every step; the kill comes once the first
    # checkpoint inside a round exists.
    "online_dpo mid-round": ("online_dpo", "prompts", "prompts.jsonl",
                             ["online.rounds=4", "online.max_new_tokens=4", "online.max_length=32",
                              "online.batch_size=1", "online.epochs=10", "online.device=cpu",
                              "online.checkpoint_every=1", "reward_model=null",
                              "reward_fn=rlc_kill_verifier:count_yes"]),
    "rsft mid-round": ("rsft", "prompts", "prompts.jsonl",
                       ["rsft.rounds=2", "rsft.n=2", "rsft.max_new_tokens=4",
                        "rsft.max_length=32", "rsft.batch_size=1", "rsft.epochs=10",
                        "rsft.device=cpu", "rsft.checkpoint_every=1", "reward_model=null",
                        "reward_fn=rlc_kill_verifier:count_yes"]),
}
#: What must exist before the kill: a finished checkpoint (default), or one inside a round.
WAIT_FOR = {"online_dpo mid-round": "checkpoints/round-*/step-*",
            "rsft mid-round": "checkpoints/round-*/step-*"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, run_folder):
    return run_folder(tmp_path_factory.mktemp("sigkill"), WORDS, PAIRS, PROMPTS,
                      reward_model=True, files={"rlc_kill_verifier.py": VERIFIER})


def _args(workdir: Path, case: str, out: Path) -> list[str]:
    method, data_key, data, extra = CASES[case]
    args = [str(REPO_ROOT / "recipes" / f"{method}.yaml"), "--model", str(workdir / "model"),
            f"--{data_key}", str(workdir / data), "--output", str(out), *extra]
    if method in ("ppo", "online_dpo", "rsft") and "reward_model=null" not in extra:
        args += ["--reward-model", str(workdir / "rm")]
    return args


def _weights(out: Path) -> dict[str, torch.Tensor]:
    adapter = out / "model" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else out / "model" / "model.safetensors"))


def _child(workdir: Path, case: str, out: Path) -> subprocess.Popen:
    """The recipe CLI in a child process, its reward function slowed down to be killable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLC_SLOW": "0.3",
           "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "rlcourse.recipes",
                             *_args(workdir, case, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _first_checkpoint_written(out: Path, pattern: str) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in out.glob(pattern))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_and_rerun_equals_the_uninterrupted_run(workdir, tmp_path, monkeypatch, capfd,
                                                        case):
    monkeypatch.syspath_prepend(str(workdir))
    assert recipes.main(_args(workdir, case, tmp_path / "whole")) == 0

    out = tmp_path / "killed"
    child = _child(workdir, case, out)
    deadline = time.monotonic() + 120
    pattern = WAIT_FOR.get(case, "checkpoints/step-*")
    while not _first_checkpoint_written(out, pattern) and child.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within two minutes"
        time.sleep(0.01)
    finished_first = child.poll() is not None
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not finished_first, "the run finished before it could be killed"
    assert not (out / "model").exists()
    if case in WAIT_FOR:  # killed inside a round: its checkpoints are there (removed at its end)
        assert list(out.glob(WAIT_FOR[case])), "the round had finished"
    state = json.loads((out / "run.json").read_text())
    assert state["status"] == "running"

    capfd.readouterr()
    assert recipes.main(_args(workdir, case, out)) == 0  # the same command again
    if case in WAIT_FOR:  # the work done inside the round was kept, not redone
        resumed_from = [line for line in capfd.readouterr().out.splitlines()
                        if line.startswith("resuming from") and "round-" in line]
        assert resumed_from, "the rerun did not resume inside the round"
    whole, resumed = _weights(tmp_path / "whole"), _weights(out)
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6, msg=k)
    if (tmp_path / "whole" / "model" / "config.json").is_file():
        load_model(out / "model", device="cpu")  # a loadable model, not only tensors


#: Kills per case in :func:`test_sigkill_at_random_moments`; each rerun resumes the last one.
RANDOM_KILLS = 3


def _timed_run(workdir: Path, case: str, out: Path) -> tuple[float, float]:
    """Run a case to the end in a child; return (seconds until its ``run.json`` appeared, i.e.
    the model and data were loaded, seconds until it exited)."""
    start, ready = time.monotonic(), None
    child = _child(workdir, case, out)
    while child.poll() is None:
        if ready is None and (out / "run.json").is_file():
            ready = time.monotonic() - start
        time.sleep(0.005)
    assert child.returncode == 0, child.stderr.read().decode()[-2000:]
    total = time.monotonic() - start
    return (ready if ready is not None else 0.0), total


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_at_random_moments(workdir, tmp_path, monkeypatch, case):
    """Killed at ``RANDOM_KILLS`` moments drawn uniformly over an uninterrupted run's training
    time (after the model is loaded, before the process exits: mid-step, mid-sampling,
    mid-checkpoint, mid-save, between the saved model and the final ``run.json``: wherever it
    falls), each time rerun from what the last one left; the end must be the uninterrupted
    run's weights. The moments are drawn afresh each time the test runs (the failure message
    names them), so repeated CI runs cover more of the run than fixed moments would."""
    monkeypatch.syspath_prepend(str(workdir))
    ready, total = _timed_run(workdir, case, tmp_path / "whole")
    rng = random.Random()
    out, moments, interrupted = tmp_path / "killed", [], 0
    for attempt in range(RANDOM_KILLS):
        # the first kill lands inside the fresh run's training; later ones anywhere after
        # loading, so some may come after a resumed run has already finished (a no-op)
        delay = rng.uniform(ready, ready + (0.8 if attempt == 0 else 1.0) * (total - ready))
        child = _child(workdir, case, out)
        start = time.monotonic()
        while child.poll() is None and time.monotonic() - start < delay:
            time.sleep(0.002)
        running = child.poll() is None
        if running:  # (a finished child was reaped by poll: its pid may belong to another)
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        moments.append(f"{delay:.2f} s{'' if running else ' (after it had finished)'}")
        interrupted += running
    where = f"killed at {', '.join(moments)} after start (loading took {ready:.2f} s, " \
            f"the whole run {total:.2f} s)"
    assert interrupted, f"no kill interrupted the run: {where}"
    assert recipes.main(_args(workdir, case, out)) == 0, where  # the same command, to the end
    whole, resumed = _weights(tmp_path / "whole"), _weights(out)
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}\n{where}")
