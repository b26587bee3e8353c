"""``benchmarks/run_rlvr.py`` end to end on the shipped reasoning model, a few steps and a few
problems: the runs file, the summary's keys (those issue 20 names for ``rlvr.json``), the goal's
verdict, and the validation sweep's rows, all written under a temporary folder."""

from __future__ import annotations

import importlib.util
import json

import pytest

from rlcourse.config import REPO_ROOT


@pytest.fixture(scope="module")
def run_rlvr():
    spec = importlib.util.spec_from_file_location(
        "run_rlvr_under_test", REPO_ROOT / "benchmarks" / "run_rlvr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--steps", "2", "--test-problems", "3", "--samples", "2", "--curve-problems", "2",
         "--curve-samples", "1", "--curve-every", "1", "--full-curve", ""]


def test_runs_and_summary_hold_what_the_chapter_reads(run_rlvr, tmp_path):
    assert run_rlvr.main(["--out-dir", str(tmp_path), "--methods", "grpo,random_reward",
                          "--seeds", "0,1", *SMALL]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rlvr_runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r.get("seed")) for r in rows] == [
        ("sft", None), ("sft_temperature", None), ("grpo", 0), ("grpo", 1),
        ("random_reward", 0), ("random_reward", 1)]
    # a second call skips every run already in the file
    assert run_rlvr.main(["--out-dir", str(tmp_path), "--methods", "grpo", "--seeds", "0",
                          *SMALL]) == 0
    assert len((tmp_path / "rlvr_runs.jsonl").read_text().splitlines()) == len(rows)
    assert run_rlvr.main(["--out-dir", str(tmp_path), "--summarise"]) == 0
    out = json.loads((tmp_path / "rlvr.json").read_text())
    assert sorted(out["sft"]["pass_at_k"], key=int)[:4] == ["1", "2", "4", "8"]
    grpo, control = out["methods"]["grpo"], out["methods"]["random_reward"]
    for m in (grpo, control):
        assert {"pass_at_1_mean", "pass_at_1_stderr", "seeds", "train_seconds"} <= set(m)
        assert m["seeds"] == [0, 1]
    p = grpo["pass_at_1_per_seed"]
    assert grpo["pass_at_1_mean"] == pytest.approx(sum(p) / 2)
    assert grpo["pass_at_1_stderr"] == pytest.approx(abs(p[0] - p[1]) / 2)  # std/sqrt(2)
    assert control["control"] and not grpo["control"]
    goal = out["goal"]
    # two steps cannot reach the SFT model's pass@8; controls never count
    assert goal["sft_pass_at_8"] == out["sft"]["pass_at_k"]["8"]
    assert goal["met"] is False and goal["met_by"] == []
    assert set(goal["per_method"]) == {"grpo"}


def test_sweep_candidates_write_their_settings(run_rlvr, tmp_path):
    shape = next(i for i, c in enumerate(run_rlvr.SWEEP) if c.get("group_size") == 16)
    warm = next(i for i, c in enumerate(run_rlvr.SWEEP) if c.get("warmup_steps"))
    assert run_rlvr.main(["--out-dir", str(tmp_path), "--sweep", "--sweep-only",
                          f"{shape},{warm}", "--sweep-steps", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rlvr_sweep.jsonl").read_text().splitlines()]
    # run in the order of SWEEP, each row with the shape and warm-up it trained with
    by_index = dict(zip(sorted((shape, warm)), rows, strict=True))
    assert (by_index[shape]["n_prompts"], by_index[shape]["group_size"]) == (8, 16)
    assert by_index[shape]["warmup_steps"] == 0
    assert (by_index[warm]["n_prompts"], by_index[warm]["group_size"]) == (16, 8)
    assert by_index[warm]["warmup_steps"] == 100
    assert by_index[warm]["lr"] == run_rlvr.SWEEP[warm]["lr"]


def test_sweep_row_records_its_lr_multipliers(run_rlvr, tmp_path):
    fast = next(i for i, c in enumerate(run_rlvr.SWEEP) if c.get("lr_multipliers"))
    assert run_rlvr.main(["--out-dir", str(tmp_path), "--sweep", "--sweep-only", str(fast),
                          "--sweep-steps", "1"]) == 0
    row = json.loads((tmp_path / "rlvr_sweep.jsonl").read_text())
    assert row["lr_multipliers"] == {"model.norm.weight": run_rlvr.SWEEP[fast]
                                     ["lr_multipliers"]["model.norm.weight"]}


def test_temperature_split_reads_the_gain_as_a_temperature(run_rlvr):
    # Oracle: with a tied, bias-free head, the final norm's gain times c is sampling at
    # temperature 1/c, sample for sample under the same seed.
    import torch

    from rlcourse.models import load_model
    from rlcourse.worlds.reasoning import sample_and_verify

    model, tok = load_model(run_rlvr.REASONING / "checkpoints" / "sft", device="cpu")
    questions, answers = run_rlvr.problems("validation", 6)
    gain = dict(model.named_parameters())[run_rlvr.FINAL_NORM]
    with torch.no_grad():
        gain.mul_(2.0)  # the "trained" model: the SFT model at temperature 1/2
    split = run_rlvr.temperature_split(model, tok, questions, answers, 4, seed=5)
    at_half = sample_and_verify(model, tok, questions, answers, 4, seed=5).pass_at_1
    with torch.no_grad():
        gain.div_(2.0)
    at_one = sample_and_verify(model, tok, questions, answers, 4, seed=5).pass_at_1
    assert at_half != at_one  # the two halves are told apart on these problems
    assert split["sft_with_trained_gain"] == at_half
    assert split["trained_with_sft_gain"] == at_one
    assert split["gain_ratio"]["mean"] == pytest.approx(2.0)
    assert split["gain_ratio"]["std"] == pytest.approx(0.0, abs=1e-6)
