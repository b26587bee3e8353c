"""Chapter 13's table helpers (rlcourse.teaching.side_by_side), against hand-written oracles."""

from __future__ import annotations

import math

import pytest
import torch

from rlcourse.losses import dpo_loss, ipo_loss
from rlcourse.teaching.side_by_side import (
    gradient_weight,
    markdown_table,
    mean_spread,
    objectives_rows,
    result_rows,
    table_latex,
)


def test_table_latex_has_no_pipes():
    out = table_latex(r"\log \pi(y|x) - \alpha |y_w| + \mathrm{KL}(p\|q)")
    assert "|" not in out
    assert out == r"\log \pi(y\vert x) - \alpha \vert y_w\vert  + \mathrm{KL}(p\Vert q)"


def test_markdown_table_shape_and_error():
    text = markdown_table(["a", "b"], [[1, 2], ["x", 3.5]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| x | 3.5 |"]
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b", "c"], [[1, 2]])


def test_objectives_rows_models_and_memory():
    rows = {r["key"]: r for r in objectives_rows(["dpo", "kto", "orpo", "simpo"], 10**9)}
    gib = 2**30
    # DPO: policy (16 B/param) + frozen reference (2 B/param); 1 model once precomputed.
    assert rows["dpo"]["models"] == 2 and rows["dpo"]["models_precomputed"] == 1
    assert rows["dpo"]["gib"] == pytest.approx(18e9 / gib)
    assert rows["dpo"]["gib_precomputed"] == pytest.approx(16e9 / gib)
    assert rows["kto"]["needs_reference"] and rows["kto"]["data_format"] == "unpaired"
    for m in ("orpo", "simpo"):
        assert rows[m]["models"] == rows[m]["models_precomputed"] == 1
        assert not rows[m]["needs_reference"]
    assert rows["simpo"]["function"] == "simpo_loss"


def _fake_results():
    run = {"win_rate": 0.6, "kl": 1.0}
    return {
        "settings": {"runs": {"dpo": {"start": "sft", "beta": 0.5},
                              "zzz": {"start": "base"}}},
        "methods": {
            "zzz": {"label": "Z", "summary": {"n_seeds": 1, "win_rate": 0.6}, "runs": [run]},
            "dpo": {"label": "DPO", "summary": {"n_seeds": 2, "win_rate": 0.55,
                                                "win_rate_min": 0.5, "win_rate_max": 0.6},
                    "runs": [{"win_rate": 0.5}, {"win_rate": 0.6, "extra": 1.0}]},
        },
    }


def test_result_rows_order_and_values():
    rows = result_rows(_fake_results(), order=("ipo", "dpo"))
    assert [r.key for r in rows] == ["dpo", "zzz"]  # missing "ipo" skipped, unknown "zzz" last
    assert rows[0].start == "sft" and rows[1].start == "base"
    assert rows[0].n_seeds == 2 and rows[0].values("win_rate") == [0.5, 0.6]
    assert rows[0].values("extra") == [1.0]


def test_mean_spread():
    s = _fake_results()["methods"]["dpo"]["summary"]
    assert mean_spread(s, "win_rate") == "0.550 [0.500–0.600]"
    assert mean_spread({"win_rate": 0.6}, "win_rate", 2) == "0.60"
    assert mean_spread(s, "kl") == "n/a"


def test_gradient_weight_matches_hand_derivatives():
    h = torch.tensor([-3.0, 0.0, 2.0, 40.0], dtype=torch.float64)
    z = torch.zeros_like(h)
    beta, tau = 0.5, 0.25
    w = gradient_weight(lambda m: dpo_loss(m, z, z, z, beta=beta), h)
    # -d/dh [-log sigma(beta h)] = beta sigma(-beta h), written out in float64
    expected = [beta / (1.0 + math.exp(beta * x)) for x in h.tolist()]
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float64))
    w = gradient_weight(lambda m: ipo_loss(m, z, z, z, tau=tau), h)
    assert torch.allclose(w, torch.tensor([-2.0 * (x - 2.0) for x in h.tolist()],
                                          dtype=torch.float64))
