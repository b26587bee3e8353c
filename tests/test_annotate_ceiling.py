"""benchmarks/annotate_ceiling.py: the ceiling fields added to results files written before
Evaluation.summary recorded them, on hand-made entries."""

import importlib.util

import pytest

from rlcourse.config import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "annotate_ceiling", REPO_ROOT / "benchmarks" / "annotate_ceiling.py")
annotate_ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(annotate_ceiling)

REFERENCE = {"ceiling": 0.75,
             "baseline": {"baseline_mean_score": 0.4, "baseline_mean_length": 19.0}}


def test_entries_get_ceiling_share_and_propagated_error():
    own = {"win_rate": 0.6, "win_rate_stderr": 0.01, "baseline_share_best": 0.4}  # ceiling 0.8
    same = {"win_rate": 0.625, "win_rate_stderr": 0.02, "baseline_mean_score": 0.4,
            "baseline_mean_length": 19.0}  # the reference's baseline: ceiling 0.75
    other = {"win_rate": 0.6, "win_rate_stderr": 0.01, "baseline_mean_score": 0.41,
             "baseline_mean_length": 19.0}  # another baseline, share_best unknown: untouched
    method = {"runs": [dict(same), dict(same)],
              "summary": {"win_rate": 0.625, "win_rate_stderr": 0.02, "win_rate_min": 0.6,
                          "win_rate_max": 0.65, "win_rate_seed_std": 0.025}}
    fresh = {"win_rate": 0.7, "win_rate_stderr": 0.01, "baseline_share_best": 0.4,
             "ceiling": 0.8, "share_of_gain": 0.66, "share_of_gain_stderr": 0.03}
    # a method written by Evaluation.summary (its runs lack the baseline's length): untouched
    fresh_method = {"runs": [{"win_rate": 0.7, "win_rate_stderr": 0.01, "ceiling": 0.75,
                              "share_of_gain": 0.8, "baseline_mean_score": 0.4}],
                    "summary": {"win_rate": 0.7, "win_rate_stderr": 0.01, "ceiling": 0.75,
                                "share_of_gain": 0.8}}
    data = {"a": own, "b": [same], "c": other, "m": method, "f": fresh, "fm": fresh_method}
    done = annotate_ceiling.annotate(data, REFERENCE)
    assert sorted(done) == ["/a", "/b[0]", "/m/runs[0]", "/m/runs[1]", "/m/summary"]
    assert own["ceiling"] == pytest.approx(0.8)
    assert own["share_of_gain"] == pytest.approx(0.1 / 0.3)
    assert own["share_of_gain_stderr"] == pytest.approx(0.01 / 0.3)
    assert "propagated" in own["share_of_gain_se_method"]
    assert same["ceiling"] == 0.75 and same["share_of_gain"] == pytest.approx(0.5)
    assert "ceiling" not in other
    s = method["summary"]
    assert (s["share_of_gain"], s["share_of_gain_min"], s["share_of_gain_max"]) == pytest.approx(
        (0.5, 0.4, 0.6))
    assert s["share_of_gain_seed_std"] == pytest.approx(0.1)
    # an entry written by Evaluation.summary keeps its paired-bootstrap numbers
    assert fresh["share_of_gain"] == 0.66 and "share_of_gain_se_method" not in fresh
    assert "share_of_gain_se_method" not in fresh_method["summary"]
    # idempotent: annotating again changes nothing
    before = repr(data)
    annotate_ceiling.annotate(data, REFERENCE)
    assert repr(data) == before


def test_a_statistic_is_added_only_when_the_samples_drawn_again_match():
    row = {"win_rate": 0.478, "wins": 336, "ties": 284, "model_mean_score": 0.372}
    same = {"win_rate": 0.478, "wins": 336, "ties": 284, "model_mean_score": 0.372,
            "lc_win_rate": 0.4, "model_share_garbled": 0.045}
    assert annotate_ceiling.mismatches(row, same) == []
    other = {**same, "ties": 283, "model_mean_score": 0.371}  # another set of samples
    assert annotate_ceiling.mismatches(row, other) == ["model_mean_score", "ties"]
