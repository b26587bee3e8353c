"""The choose-on-validation, report-on-test protocol of ``benchmarks/run_online_methods.py``:
the summary selects on validation even when test would pick differently, counts only complete
seeds, and the committed results files say which split chose and which reported."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rlcourse.worlds.assistant import DEFAULT_WORLD

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _bench():
    path = ROOT / "benchmarks" / "run_online_methods.py"
    spec = importlib.util.spec_from_file_location("run_online_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _rows(n_prompts: int = 40):
    """Baselines (all flawed: score 0) on both splits; candidate A wins most validation prompts
    and few test prompts, B the reverse; seed 2 has A only (incomplete)."""
    rows = []
    for split, seed in (("validation", 1), ("test", 2)):
        prompts = DEFAULT_WORLD.fresh_prompts(split, n_prompts, seed=seed)
        for d in (0, 1):
            rows.append({"kind": "baseline", "split": split, "draw": d, "prompts": prompts,
                         "n_prompts": n_prompts, "n_samples": 1, "prompt_seed": seed,
                         "sample_seed": 100 * seed, "scores": [0.0] * n_prompts})
        rows.append({"kind": "sft", "split": split, "scores": [0.0] * n_prompts})
    share = {("online_dpo@4", "validation"): 0.8, ("online_dpo@4", "test"): 0.2,
             ("online_dpo_prev@8", "validation"): 0.5, ("online_dpo_prev@8", "test"): 0.9}
    for (key, split), p in share.items():
        for seed in ((0, 1, 2) if key == "online_dpo@4" else (0, 1)):
            wins = int(p * n_prompts)
            rows.append({
                "kind": "candidate", "candidate": key, "split": split, "seed": seed,
                "trajectory": key.split("@")[0], "rounds": int(key.split("@")[1]),
                "settings": {}, "n_labels": 100, "train_seconds": 1.0,
                "scores": [1.0] * wins + [0.0] * (n_prompts - wins), "kl": 1.0,
                **{k: 0.0 for k in ("model_mean_score", "model_mean_length", "model_share_flawed",
                                    "model_share_best", "model_share_repetition",
                                    "model_share_garbled")},
                "samples": [], "machine": {"threads": 1}})
    # the original evaluation prompts (chooses nothing), judged for seed 1 only
    prompts = DEFAULT_WORLD.prompts()[:n_prompts]
    rows.append({"kind": "baseline", "split": "original", "draw": 0, "prompts": prompts,
                 "n_prompts": n_prompts, "n_samples": 1, "prompt_seed": -1, "sample_seed": 1000,
                 "scores": [0.0] * n_prompts})
    template = next(r for r in rows if r["kind"] == "candidate")
    for key in ("online_dpo@4", "online_dpo_prev@8"):
        rows.append({**template, "split": "original", "seed": 1, "candidate": key,
                     "scores": [1.0] * n_prompts})
    return [{**r, "quick": False} for r in rows]


def test_protocol_selects_on_validation_and_reports_on_test(tmp_path):
    bench = _bench()
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    r = bench.summarise_protocol(runs, tmp_path / "p.json", n_bootstrap=200)
    assert (r["selected_on"], r["reported_on"]) == ("validation", "test")
    # test would have picked online_dpo_prev@8; validation picks online_dpo@4
    assert r["selected"] == "online_dpo@4"
    assert r["seeds"] == [0, 1] and r["seeds_started"] == [0, 1, 2]
    c = r["candidates"]["online_dpo@4"]
    # baseline all 0, perfect assistant scores 1: ceiling 1, share of gain = 2 WR - 1
    assert c["validation"]["share_of_gain"]["mean"] == pytest.approx(2 * (0.8 + 0.1) - 1)
    assert r["report"]["test"]["win_rate"]["mean"] == pytest.approx(0.2 + 0.4)
    assert r["report"]["test"]["ceiling"]["mean"] == 1.0
    assert r["splits"]["test"]["n_prompts"] == 40 and r["baseline_draws"] == 2
    assert json.loads((tmp_path / "p.json").read_text())["selected"] == "online_dpo@4"
    # a split outside the protocol is summarised over the seeds judged on it, chooses nothing
    assert r["splits"]["original"]["seeds"] == [1]
    assert c["original"]["share_of_gain"]["mean"] == 1.0


def test_committed_results_record_which_split_chose_and_which_reported():
    sbs = json.loads((RESULTS / "side_by_side.json").read_text())
    for block in (sbs["settings"], sbs["online_methods"]):
        assert block["selected_on"] == block["reported_on"] == "eval_prompts"
        assert "development" in block["split_note"]
    assert sbs["settings"]["seeds"] and sbs["settings"]["eval_prompts"] == 200
    protocol = json.loads((RESULTS / "online_protocol.json").read_text())
    assert (protocol["selected_on"], protocol["reported_on"]) == ("validation", "test")
    assert protocol["n_seeds"] == len(protocol["seeds"]) >= 3
    for split in ("validation", "test"):
        s = protocol["splits"][split]
        assert s["n_prompts"] > 0 and s["n_samples"] > 0
        assert s["n_comparisons"] == s["n_prompts"] * s["n_samples"]
    assert protocol["selected"] in protocol["candidates"]
    # the selected candidate is the best on validation, whatever test says
    c = protocol["candidates"]
    assert protocol["selected"] == max(c, key=lambda k: c[k]["validation"]["share_of_gain"][
        "mean"])
    test = protocol["report"]["test"]
    assert len(test["draws"]) == protocol["baseline_draws"] >= 3
    assert all(np.isfinite(d["share_of_gain_stderr"]) for d in test["draws"])
