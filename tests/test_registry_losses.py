"""Two losses of the DPO family added through the registry alone (``rlcourse/losses.py``,
``rlcourse/preference.py`` and one recipe each): SLiC-HF's hinge and robust DPO, against
float64 formulas written out here; and a loss registered at run time, in this test only, that
trains from the recipe command line with no edit in ``rlcourse/recipes/``.

Oracles: ``max(0, 1 - beta h)`` and ``((1-e)(-log s(beta h)) - e(-log s(-beta h))) / (1 - 2e)``
with ``h`` the DPO margin, in plain ``math``; the first logged loss of a run whose policy is its
reference (``h = 0``): 1 for the hinge, ``ln 2`` for robust DPO, ``log(1 + e^margin)`` for the
toy loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlcourse import losses, preference, recipes
from rlcourse.config import REPO_ROOT
from rlcourse.data import write_jsonl
from rlcourse.models import build_model, build_tokenizer, save_model

torch.set_num_threads(1)

PAIRS = [
    {"prompt": "what is rain ?", "chosen": "rain is wet .", "rejected": "rain is dry ."},
    {"prompt": "what is snow ?", "chosen": "snow is cold .", "rejected": "snow is hot ."},
    {"prompt": "what is fire ?", "chosen": "fire is hot .", "rejected": "fire is cold ."},
    {"prompt": "what is ice ?", "chosen": "ice is cold .", "rejected": "ice is hot . ice is hot ."},
]
TINY = ["train.max_steps=2", "train.batch_size=4", "train.grad_accum_steps=1", "train.lr=1e-2",
        "train.warmup_steps=0", "train.log_every=1", "train.progress=false", "max_length=32"]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _margin(pc: float, pr: float, rc: float, rr: float) -> float:
    return (pc - rc) - (pr - rr)


def _hinge(pc, pr, rc, rr, beta):
    return max(0.0, 1.0 - beta * _margin(pc, pr, rc, rr))


def _robust(pc, pr, rc, rr, beta, eps):
    z = beta * _margin(pc, pr, rc, rr)
    return ((1 - eps) * -_log_sigmoid(z) - eps * -_log_sigmoid(-z)) / (1 - 2 * eps)


CASES = [  # policy chosen, policy rejected, reference chosen, reference rejected (summed logps)
    (-10.0, -12.0, -11.0, -11.5), (-5.0, -4.0, -5.5, -6.0), (-30.0, -30.0, -30.0, -30.0),
    (-2.0, -40.0, -20.0, -3.0), (-40.0, -2.0, -3.0, -20.0), (-7.25, -7.5, -7.0, -8.0),
]


def _tensors(cases):
    return [torch.tensor(col, dtype=torch.float64) for col in zip(*cases, strict=True)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_hinge_loss_is_slic_hf_hinge_with_margin_one_over_beta(beta):
    got = losses.hinge_loss(*_tensors(CASES), beta=beta)
    want = [_hinge(*c, beta) for c in CASES]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # delta = 1/beta: beta * max(0, 1/beta - h), the hinge of SLiC-HF on the margin h
    torch.testing.assert_close(got, torch.tensor(
        [beta * max(0.0, 1 / beta - _margin(*c)) for c in CASES], dtype=torch.float64),
        rtol=1e-12, atol=1e-15)
    assert losses.hinge_loss(*_tensors([CASES[2]]), beta=beta).item() == 1.0  # pi = pi_ref


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.1, 0.1), (0.5, 0.25), (2.0, 0.4)])
def test_robust_dpo_loss_matches_the_formula(beta, eps):
    got = losses.robust_dpo_loss(*_tensors(CASES), beta=beta, label_smoothing=eps)
    want = [_robust(*c, beta, eps) for c in CASES]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12,
                               atol=1e-15)
    if eps == 0.0:  # no assumed noise: plain DPO
        torch.testing.assert_close(got, losses.dpo_loss(*_tensors(CASES), beta=beta))
    z = losses.robust_dpo_loss(*_tensors([CASES[2]]), beta=beta, label_smoothing=eps)
    assert z.item() == pytest.approx(math.log(2), abs=1e-15)


def test_robust_dpo_is_unbiased_under_flipped_labels_and_differs_from_cdpo():
    """Averaged over a label flipped with probability eps, robust DPO is the clean DPO loss;
    conservative DPO (dpo's label_smoothing) is not, and its optimum is a finite margin."""
    beta, eps = 0.5, 0.2
    pc, pr, rc, rr = _tensors(CASES)
    kept = losses.robust_dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    flipped = losses.robust_dpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)
    clean = [-_log_sigmoid(beta * _margin(*c)) for c in CASES]
    torch.testing.assert_close((1 - eps) * kept + eps * flipped,
                               torch.tensor(clean, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    h = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    zero = torch.zeros_like(h)
    cdpo = losses.dpo_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps)
    rdpo = losses.robust_dpo_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps)
    best = h[cdpo.argmin()].item()  # sigma(beta h) = 1 - eps
    assert best == pytest.approx(math.log((1 - eps) / eps) / beta, abs=0.01)
    assert bool((rdpo[1:] < rdpo[:-1]).all())  # always decreasing: it keeps pushing


def test_new_losses_are_finite_for_extreme_inputs():
    big = torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float32)
    zero = torch.zeros(3)
    assert torch.isfinite(losses.hinge_loss(big, zero, zero, zero, beta=1.0)).all()
    assert torch.isfinite(losses.robust_dpo_loss(big, zero, zero, zero, beta=1.0,
                                                 label_smoothing=0.3)).all()
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.robust_dpo_loss(big, zero, zero, zero, label_smoothing=0.5)


def test_the_new_losses_are_recipe_methods_from_the_objectives_table():
    for name in ("hinge", "robust"):
        row = recipes.method(name)
        assert row.reference and row.loss_fn is preference.LOSS_FNS[name]
        recipe = recipes.load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml")
        assert recipe.loss == losses.DEFAULTS[name]
    with pytest.raises(recipes.RecipeError, match=r"robust.yaml \(command line\): "
                                                  r"loss.label_smoothing: must be"):
        recipes.load_recipe(REPO_ROOT / "recipes" / "robust.yaml", {"loss.label_smoothing": 0.5})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    tok = build_tokenizer([" ".join(p.values()) for p in PAIRS])
    save_model(build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0), tok,
               root / "model")
    write_jsonl(root / "pairs.jsonl", PAIRS)
    return root


def _first_loss(out) -> float:
    rows = json.loads((out / "history.json").read_text())
    assert rows[0]["step"] == 1
    return rows[0]["loss"]


@pytest.mark.parametrize("name, first", [("hinge", 1.0), ("robust", math.log(2))])
def test_shipped_recipe_trains_and_its_first_loss_is_exact(workdir, tmp_path, name, first):
    out = tmp_path / "o"
    assert recipes.main([str(REPO_ROOT / "recipes" / f"{name}.yaml"), "--model",
                         str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"),
                         "--output", str(out), *TINY]) == 0
    assert _first_loss(out) == pytest.approx(first, abs=1e-6)  # policy = reference: h = 0
    assert (out / "model" / "model.safetensors").is_file()


# ---- a loss registered at run time ------------------------------------------------------------
def _toy_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
              reference_rejected_logps, beta: float = 0.5, margin: float = 0.5):
    """softplus(margin - beta h): a smooth hinge."""
    h = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps)
    return torch.nn.functional.softplus(margin - beta * h)


def _toy_loss_fn(model, batch, beta: float = 0.5, margin: float = 0.5):
    pc, pr, _, _ = preference.policy_logps(model, batch)
    rc = batch["reference_chosen_logps"].to(pc)
    rr = batch["reference_rejected_logps"].to(pc)
    loss = _toy_loss(pc, pr, rc, rr, beta=beta, margin=margin).mean()
    return loss, {"loss": loss.item()}


def test_a_loss_registered_at_run_time_trains_from_the_command_line(workdir, tmp_path,
                                                                    monkeypatch, capsys):
    defaults = {"beta": 0.5, "margin": 0.5}
    monkeypatch.setitem(losses.DEFAULTS, "toy", defaults)
    monkeypatch.setitem(losses.OBJECTIVES, "toy", losses.Objective(
        name="toy", loss=_toy_loss, needs_reference=True, data_format="paired",
        reduction="sum", hyperparameters=defaults, latex=r"\log(1 + e^{m - h})", paper="none"))
    monkeypatch.setitem(preference.LOSS_FNS, "toy", _toy_loss_fn)
    assert "toy" in recipes.METHODS and recipes.method("toy").reference
    yaml_path = tmp_path / "toy.yaml"
    yaml_path.write_text("method: toy\nmodel: m\ndata: d.jsonl\noutput: o\n"
                         "loss:\n  beta: 0.5\n  margin: 2.0\ntrain:\n  lr: 1.0e-2\n")
    base = [str(yaml_path), "--model", str(workdir / "model"),
            "--data", str(workdir / "pairs.jsonl")]
    # its loss section is its loss function's keyword arguments, checked like any other
    assert recipes.main([*base, "--output", str(tmp_path / "bad"), "loss.betta=1"]) == 2
    assert "known keys: beta, margin" in capsys.readouterr().err
    assert recipes.main([*base, "--output", str(tmp_path / "bad"), "loss.beta=-1"]) == 2
    assert "loss.beta: must be a finite number > 0" in capsys.readouterr().err
    out = tmp_path / "o"
    assert recipes.main([*base, "--output", str(out), *TINY]) == 0
    assert _first_loss(out) == pytest.approx(math.log1p(math.exp(2.0)), abs=1e-6)
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["method"] == "toy" and saved["loss"] == {"beta": 0.5, "margin": 2.0}
