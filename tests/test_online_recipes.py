"""Online DPO and RSFT recipes (``method: online_dpo`` / ``rsft``; rlcourse.online): a verifier
as the labeller raises what it rewards, RSFT's SFT targets are exactly the best-of-n samples, a
run killed between rounds resumes to the weights of an uninterrupted one, a changed
``online.rounds`` refuses to resume, a reward model directory labels and picks as its r(x, y)
says, several processes are refused, and bad keys are named by file, line and key.

Tiny model (1 layer, hidden 32, a 24-token vocabulary), 4 prompts. The toy verifier counts the
word "yes" in a completion (ceiling ``max_new_tokens`` = 6; the random model scores about 0.25).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlcourse import online, recipes
from rlcourse.config import REPO_ROOT
from rlcourse.models import generate, load_model, save_model

torch.set_num_threads(1)
WORDS = ["what is rain ? rain is wet .", "what is snow ? snow is cold .",
         "tell me about dogs a dog can bark .", "yes no yes no"]
PROMPTS = ["what is rain ?", "what is snow ?", "tell me about dogs", "what is a dog ?"]
VERIFIER = '''
CRASH_AT = None  # a test sets it: the call that raises, as a killed process would stop
calls = 0
log = []  # (completions, rewards) of every call


def count_yes(prompts, completions):
    global calls
    calls += 1
    if CRASH_AT is not None and calls >= CRASH_AT:
        raise KeyboardInterrupt("killed")
    rewards = [float(c.split().count("yes")) for c in completions]
    log.append((list(completions), rewards))
    return rewards
'''
ONLINE = ["online.pairs_per_prompt=8", "online.lr=3e-2", "online.beta=0.5",
          "online.max_new_tokens=6", "online.max_length=32", "online.batch_size=4",
          "online.epochs=4", "online.device=cpu"]
RSFT = ["rsft.n=4", "rsft.samples_per_prompt=2", "rsft.lr=3e-2", "rsft.max_new_tokens=6",
        "rsft.max_length=32", "rsft.batch_size=8", "rsft.device=cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, run_folder):
    return run_folder(tmp_path_factory.mktemp("rounds"), WORDS, prompts=PROMPTS,
                      files={"rlc_round_verifiers.py": VERIFIER})


@pytest.fixture
def verifier(workdir, monkeypatch):
    monkeypatch.syspath_prepend(str(workdir))
    import rlc_round_verifiers

    monkeypatch.setattr(rlc_round_verifiers, "CRASH_AT", None)
    monkeypatch.setattr(rlc_round_verifiers, "calls", 0)
    monkeypatch.setattr(rlc_round_verifiers, "log", [])
    return rlc_round_verifiers


def _run(workdir: Path, method: str, out: Path, *extra: str) -> int:
    tiny = ONLINE if method == "online_dpo" else RSFT
    return recipes.main([str(REPO_ROOT / "recipes" / f"{method}.yaml"),
                         "--model", str(workdir / "model"),
                         "--prompts", str(workdir / "prompts.jsonl"), "--output", str(out),
                         "reward_model=null", "reward_fn=rlc_round_verifiers:count_yes",
                         *tiny, *extra])


def _mean_yes(model_dir: Path) -> float:
    model, tok = load_model(model_dir, device="cpu")
    texts = generate(model, tok, PROMPTS * 16, max_new_tokens=6, seed=123).texts
    return sum(t.split().count("yes") for t in texts) / len(texts)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    adapter = path / "adapter_model.safetensors"  # a LoRA run saves its adapters
    if adapter.is_file():
        from safetensors.torch import load_file

        return load_file(str(adapter))
    return dict(load_model(path, device="cpu")[0].state_dict())


def test_both_methods_are_recipes():
    assert {"online_dpo", "rsft"} <= set(recipes.METHODS)
    for name in ("online_dpo", "rsft"):
        assert recipes.method(name).data_key == "prompts"


def test_online_dpo_recipe_with_a_verifier_raises_its_word(workdir, verifier, tmp_path):
    assert _run(workdir, "online_dpo", tmp_path / "o", "online.rounds=3") == 0
    before, after = _mean_yes(workdir / "model"), _mean_yes(tmp_path / "o" / "model")
    # measured (3 rounds, seed 0): 0.25 -> 6.0, the ceiling (64 samples at seed 123)
    assert before < 0.5 and after > before + 3.0, (before, after)
    rows = json.loads((tmp_path / "o" / "history.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["n_pairs"] > 0 for r in rows)
    # the labels came from the verifier: two calls (answers a, answers b) per round
    assert verifier.calls == 6
    saved = json.loads((tmp_path / "o" / "recipe.json").read_text())
    assert saved["online"]["rounds"] == 3 and saved["reward_fn"] == "rlc_round_verifiers:count_yes"


def test_rsft_targets_are_exactly_the_best_of_n_samples(workdir, verifier, tmp_path,
                                                         monkeypatch):
    targets = []
    real = online.tokenize_sft

    def spy(tokenizer, data, *args, **kwargs):
        targets.append([(d["prompt"], d["completion"]) for d in data])
        return real(tokenizer, data, *args, **kwargs)

    monkeypatch.setattr(online, "tokenize_sft", spy)
    assert _run(workdir, "rsft", tmp_path / "o", "rsft.rounds=2") == 0
    assert len(verifier.log) == len(targets) == 2
    n = 4
    many = [p for p in PROMPTS * 2 for _ in range(n)]  # samples_per_prompt 2: prompts twice
    for (texts, rewards), got in zip(verifier.log, targets, strict=True):
        want = []
        for j in range(len(PROMPTS) * 2):  # argmax by hand: highest reward, first on ties,
            idx = range(j * n, (j + 1) * n)  # an empty answer never wins
            ok = [i for i in idx if texts[i].strip()]
            if ok:
                best = max(ok, key=lambda i: (rewards[i], -i))
                want.append((many[best], texts[best]))
        assert got == want
    rows = json.loads((tmp_path / "o" / "history.json").read_text())
    for row, (texts, rewards) in zip(rows, verifier.log, strict=True):
        nonempty = [r for t, r in zip(texts, rewards, strict=True) if t.strip()]
        assert row["mean_reward"] == pytest.approx(np.mean(nonempty))  # empty: -inf, left out
        assert row["n_targets"] == len(targets[row["round"]])
    assert _mean_yes(tmp_path / "o" / "model") > _mean_yes(workdir / "model")


@pytest.mark.parametrize("method, crash_at, lora", [
    ("online_dpo", 3, False),  # round 2's labels (calls 3, 4: answers a and b) are killed
    ("rsft", 2, False),        # round 2's scoring is killed
    ("online_dpo", 3, True),   # with LoRA: the checkpoints hold adapters, the reference is
    ("rsft", 2, True),         # the model with its adapters off
])
def test_killed_run_resumes_to_the_uninterrupted_result(workdir, verifier, tmp_path,
                                                        monkeypatch, method, crash_at, lora):
    # prompts_per_round < 4 prompts: the resumed run must replay the skipped rounds' draws;
    # reference sft: it must use the starting model, not the checkpoint, as reference
    extra = (("online.rounds=3", "online.prompts_per_round=3", "online.reference=sft")
             if method == "online_dpo" else ("rsft.rounds=2",))
    if lora:
        extra = (*extra, "lora.r=4", "lora.target_modules=[q_proj, v_proj]")
    assert _run(workdir, method, tmp_path / "whole", *extra) == 0
    calls_whole = verifier.calls
    monkeypatch.setattr(verifier, "calls", 0)
    monkeypatch.setattr(verifier, "CRASH_AT", crash_at)
    with pytest.raises(KeyboardInterrupt):
        _run(workdir, method, tmp_path / "crashed", *extra)
    out = tmp_path / "crashed"
    assert not (out / "model").exists()
    done = (crash_at - 1) // (2 if method == "online_dpo" else 1)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{done:08d}"]
    monkeypatch.setattr(verifier, "CRASH_AT", None)
    monkeypatch.setattr(verifier, "calls", 0)
    assert _run(workdir, method, out, *extra) == 0  # the same command again
    per_round = 2 if method == "online_dpo" else 1
    assert verifier.calls == calls_whole - per_round * done  # round 1 was not redone
    for run in (tmp_path / "whole", out):  # LoRA: the adapters were trained and saved
        assert (run / "model" / "adapter_model.safetensors").is_file() == lora
    whole, resumed = _weights(tmp_path / "whole" / "model"), _weights(out / "model")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6, msg=k)
    rows = [json.loads((tmp_path / p / "history.json").read_text()) for p in ("whole", out)]
    drop = ("train_seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in rows[0]]
            == [{k: v for k, v in r.items() if k not in drop} for r in rows[1]])
    # history.jsonl grew a row per round and, after the resume, holds each round once
    live = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in live] == [r["round"] for r in rows[0]]


def test_other_rounds_refuse_to_resume(workdir, verifier, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    monkeypatch.setattr(verifier, "CRASH_AT", 3)  # killed in round 2, after round 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        _run(workdir, "online_dpo", out, "online.rounds=3")
    assert (out / "checkpoints" / "step-00000001").is_dir()
    monkeypatch.setattr(verifier, "CRASH_AT", None)
    assert _run(workdir, "online_dpo", out, "online.rounds=4") == 2
    err = capsys.readouterr().err
    assert "online.rounds: 3 -> 4" in err and "unfinished run of a different recipe" in err
    assert not (out / "model").exists()
    assert (out / "checkpoints" / "step-00000001").is_dir()  # nothing lost


@pytest.mark.parametrize("text, where, what", [
    ("method: online_dpo\nmodel: m\nprompts: p\noutput: o\nreward_model: r\nonline:\n"
     "  rounds: 2\n  betta: 0.1\n", "online.betta", "unknown key 'betta'"),
    ("method: rsft\nmodel: m\nprompts: p\noutput: o\nreward_model: r\nrsft:\n  n: 0\n",
     "rsft.n", "must be an integer >= 1"),
    ("method: online_dpo\nmodel: m\nprompts: p\noutput: o\nreward_model: r\nonline:\n"
     "  reference: start\n", "online.reference", "one of sft, previous"),
    ("method: online_dpo\nmodel: m\nprompts: p\noutput: o\nreward_model: r\nonline:\n"
     "  loss: kto\n", "online.loss", "must be a paired preference loss"),
    ("method: online_dpo\nmodel: m\nprompts: p\noutput: o\nreward_model: r\nonline:\n"
     "  loss: ipo\n  loss_kwargs: {lam: 1}\n", "online.loss_kwargs", "unknown: lam"),
    ("method: rsft\nmodel: m\nprompts: p\noutput: o\nreward_model: r\nmax_length: 64\n",
     "max_length", "rsft.max_length"),
    ("method: rsft\nmodel: m\nprompts: p\noutput: o\nreward_model: r\ntrain:\n  lr: 1\n",
     "train", "from the 'rsft' section"),
    ("method: online_dpo\nmodel: m\nprompts: p\noutput: o\nreward_model: r\n"
     "reference_model: r\n", "reference_model", "unknown key"),
    ("method: rsft\nmodel: m\nprompts: p\noutput: o\nreward_model: r\nreward_fn: a:b\n",
     "reward_fn", "exactly one of reward_model"),
])
def test_bad_key_names_the_file_the_line_and_the_key(tmp_path, text, where, what):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = next(i for i, s in enumerate(text.splitlines(), 1)
                if s.strip().startswith(where.split(".")[-1] + ":"))
    with pytest.raises(recipes.RecipeError) as err:
        recipes.load_recipe(path)
    assert str(err.value).startswith(f"{path}:{line}: {where}"), str(err.value)
    assert what in str(err.value)


@pytest.mark.parametrize("method", ["online_dpo", "rsft"])
def test_a_reward_model_directory_labels_and_picks(workdir, tmp_path, monkeypatch, method):
    """``reward_model: DIR``: the reward model's r(x, y) (rlcourse.online.reward_model_scorer)
    labels the pairs (the higher one is chosen) and picks RSFT's winners."""
    from rlcourse.models import RewardModel

    model, tok = load_model(workdir / "model", device="cpu")
    rm = RewardModel(model, seed=1)
    save_model(rm, tok, tmp_path / "rm")
    score = online.reward_model_scorer(rm.eval(), tok)
    seen = []
    real_pairs, real_sft = online.train_preference, online.tokenize_sft

    def spy_pairs(loss, policy, pairs, *args, **kwargs):
        seen.append(pairs)
        return real_pairs(loss, policy, pairs, *args, **kwargs)

    def spy_sft(tokenizer, data, *args, **kwargs):
        seen.append(data)
        return real_sft(tokenizer, data, *args, **kwargs)

    scored = []
    real_scorer = online.reward_model_scorer

    def spy_scorer(*args, **kwargs):
        fn = real_scorer(*args, **kwargs)

        def logged(prompts, texts):
            scored.append(list(texts))
            return fn(prompts, texts)

        return logged

    monkeypatch.setattr(online, "reward_model_scorer", spy_scorer)
    monkeypatch.setattr(online, "train_preference", spy_pairs)
    monkeypatch.setattr(online, "tokenize_sft", spy_sft)
    tiny = ONLINE if method == "online_dpo" else RSFT
    code = recipes.main([str(REPO_ROOT / "recipes" / f"{method}.yaml"),
                         "--model", str(workdir / "model"), "--reward-model", str(tmp_path / "rm"),
                         "--data", str(workdir / "prompts.jsonl"), "--output", str(tmp_path / "o"),
                         *tiny, f"{'online' if method == 'online_dpo' else 'rsft'}.rounds=1"])
    assert code == 0 and len(seen) == 1 and seen[0]
    assert len(scored) == (2 if method == "online_dpo" else 1)  # the reward model was asked
    if method == "online_dpo":
        ps = [r["prompt"] for r in seen[0]]
        chosen = score(ps, [r["chosen"] for r in seen[0]])
        rejected = score(ps, [r["rejected"] for r in seen[0]])
        assert (chosen > rejected).all()
    else:  # each winner is the argmax of r over its prompt's n answers (checked by hand)
        n, many = 4, [q for q in PROMPTS * 2 for _ in range(4)]
        texts = list(scored[0])
        r = score(many, texts)  # an independent scorer of the same saved reward model
        want = []
        for j in range(len(PROMPTS) * 2):
            ok = [i for i in range(j * n, (j + 1) * n) if texts[i].strip()]
            if ok:
                best = max(ok, key=lambda i: (r[i], -i))
                want.append({"prompt": many[best], "completion": texts[best]})
        assert seen[0] == want
    before, after = _weights(workdir / "model"), _weights(tmp_path / "o" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(workdir, tmp_path,
                                                                          monkeypatch):
    """Several processes are welcome (tests/test_multiprocess.py: 2 give what 1 gives); the
    round's global batch must split into equal shares, checked before anything is written."""
    import accelerate

    class TwoProcesses:  # what accelerate reports inside `torchrun --nproc_per_node 2`
        num_processes, distributed_type, device = 2, "MULTI_CPU", "cpu"

        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "PartialState", TwoProcesses)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "o"
    recipe = recipes.load_recipe(
        REPO_ROOT / "recipes" / "rsft.yaml",
        recipes.parse_overrides(RSFT + ["rsft.batch_size=3", f"model={workdir / 'model'}",
                                        "reward_model=r", f"prompts={workdir / 'prompts.jsonl'}",
                                        f"output={out}"]))
    with pytest.raises(recipes.RecipeError, match=r"rsft.yaml \(command line\): rsft.batch_size: "
                                                  r"3 per step "
                                                  "cannot be split over 2 processes"):
        recipes.run_recipe(recipe)
    assert not out.exists()


def test_a_finished_run_is_not_trained_again_and_other_rounds_refuse(workdir, verifier,
                                                                     tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "o"
    assert _run(workdir, "rsft", out, "rsft.rounds=1") == 0
    monkeypatch.setattr(verifier, "calls", 0)
    assert _run(workdir, "rsft", out, "rsft.rounds=1") == 0
    assert verifier.calls == 0 and "already holds the finished run" in capsys.readouterr().err
    assert _run(workdir, "rsft", out, "rsft.rounds=2") == 2
    err = capsys.readouterr().err
    assert "a finished run of a different recipe" in err and "rsft.rounds: 1 -> 2" in err
    assert verifier.calls == 0
