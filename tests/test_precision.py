"""Mixed precision (rlcourse.precision, a recipe's dtype): float32 master weights under bf16
autocast by default, pure bf16 weights only when asked, and a warning when the learning rate is
below what a bf16 weight can take.

Oracles: bf16 arithmetic itself (``(w + lr)`` rounded to bf16 equals ``w`` exactly when the
update is lost), spacings written out by hand, and weights compared before and after training.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rlcourse import recipes
from rlcourse.config import REPO_ROOT
from rlcourse.engine import TrainConfig
from rlcourse.models import build_model, build_tokenizer, save_model, saved_dtype
from rlcourse.precision import (
    Precision,
    half_ulp,
    lost_update_fraction,
    resolve_precision,
    warn_lost_updates,
)
from rlcourse.preference import train_preference
from rlcourse.recipes.run import training_precision

torch.set_num_threads(1)

DPO_LR = 5e-7  # recipes/dpo.yaml's train.lr


def test_dpo_recipe_lr_is_the_one_tested():
    assert recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml").train.lr == DPO_LR


# --------------------------------------------------------------------------------------------
# The spacing of bf16 and lost updates
# --------------------------------------------------------------------------------------------
def test_half_ulp_by_hand():
    w = torch.tensor([1.5, 1.25, -3.0, 0.75, 1.0, 0.5, 2.0**-10, 0.0])
    # bf16 keeps 8 significant bits: ulp on [2^(e-1), 2^e) is 2^(e-8), half of it 2^(e-9);
    # at a power of two the gap below is half as wide (1 - 2^-8 is the next number down)
    expected = [2.0**-8, 2.0**-8, 2.0**-7, 2.0**-9, 2.0**-9, 2.0**-10, 2.0**-19, 0.0]
    assert half_ulp(w.bfloat16()).tolist() == expected
    # float32: 24 bits
    assert half_ulp(torch.tensor([1.5]))[0] == 2.0**-24


def test_lost_update_fraction_against_bf16_arithmetic():
    """An update is lost, whatever its sign, exactly when bf16(w + lr) == w == bf16(w - lr)
    (round to nearest); checked on weights spread over many binades (powers of two included),
    at learning rates from 1e-7 to 1e-2 (ties, lr == ulp/2, left out: they round to even)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(20_000, generator=g) * torch.exp2(torch.randint(-14, 2, (20_000,),
                                                                      generator=g))).bfloat16()
    w = torch.cat([w, torch.exp2(torch.arange(-14.0, 2.0)).bfloat16()])
    for lr in [1e-7, 5e-7, 3e-5, 1e-3, 3e-3, 1e-2, 2.0**-9 * 0.999]:
        untied = w[half_ulp(w) != lr]
        unchanged = ((untied.float() + lr).bfloat16() == untied) & (
            (untied.float() - lr).bfloat16() == untied)
        assert lost_update_fraction([untied], lr) == unchanged.sum().item() / untied.numel()
    # by hand: lr = 3e-3 lies between 2^-9 and 2^-8, so a weight of 1.5 (half-ulp 2^-8) loses
    # it, a weight of 0.75 (half-ulp 2^-9) and one of 2^-10 take it; zero takes it
    hand = torch.tensor([1.5, 0.75, 2.0**-10, 0.0]).bfloat16()
    assert lost_update_fraction([hand], 3e-3) == 0.25
    # the same weights in float32 take any such update
    assert lost_update_fraction([hand.float()], 3e-3) == 0.0
    # asked as bf16 while stored in float32
    assert lost_update_fraction([hand.float()], 3e-3, dtype=torch.bfloat16) == 0.25


def test_relative_update_threshold_is_2_to_the_minus_8_to_9():
    """lr / |w| below 2^-9 is always lost, above 2^-8 never, for every mantissa."""
    w = torch.linspace(1.0, 1.99, 200).bfloat16().unique()
    assert lost_update_fraction([w], 2.0**-9 * 0.99) == 1.0
    assert lost_update_fraction([w], 2.0**-8 * 1.01) == 0.0


# --------------------------------------------------------------------------------------------
# The finding: at DPO's learning rate, pure-bf16 weights never change
# --------------------------------------------------------------------------------------------
PAIRS = [{"prompt": f"question {i}", "chosen": f"good answer {i} yes",
          "rejected": f"bad answer {i} no no"} for i in range(8)]


def _tokenizer():
    return build_tokenizer([" ".join(p.values()) for p in PAIRS])


def _train_dpo(model, tok, mixed_precision):
    config = TrainConfig(lr=DPO_LR, max_steps=5, batch_size=8, warmup_steps=0,
                         schedule="constant", mixed_precision=mixed_precision, device="cpu",
                         progress=False, log_every=1)
    train_preference("dpo", model, PAIRS, config, tokenizer=tok, max_length=32)


def _layer_weights(model):
    """Every decoder layer's parameters (all of them get a gradient; unlike the rows of the
    embedding of words absent from the data)."""
    return {n: p.detach().float().clone() for n, p in model.model.layers.named_parameters()}


def _unchanged_share(before, after):
    same = sum(int((before[n] == after[n]).sum()) for n in before)
    return same / sum(t.numel() for t in before.values())


def test_pure_bf16_weights_do_not_move_at_the_dpo_learning_rate_and_say_so():
    tok = _tokenizer()
    model = build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0).bfloat16()
    before = _layer_weights(model)
    predicted = lost_update_fraction(model.model.layers.parameters(), DPO_LR)
    with pytest.warns(UserWarning, match=r"AdamW cannot change them"):
        _train_dpo(model, tok, "no")
    unchanged = _unchanged_share(before, _layer_weights(model))
    assert unchanged > 0.95 and predicted > 0.95
    # the prediction (an update of size lr) is what happened, to within AdamW's |m|/sqrt(v)
    assert abs(unchanged - predicted) < 0.02


def test_default_float32_master_weights_move_under_bf16_autocast():
    tok = _tokenizer()
    model = build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0)
    before = _layer_weights(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*AdamW cannot change them")
        _train_dpo(model, tok, "bf16")   # autocast on the CPU, float32 master weights
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _unchanged_share(before, _layer_weights(model)) < 0.01


def test_warning_only_for_low_precision_weights():
    model = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(model.weight, 0.02)
    torch.nn.init.zeros_(model.bias)   # zero takes any update
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_lost_updates(model, DPO_LR) == 0.0
    model.bfloat16()
    with pytest.warns(UserWarning, match=r"80\.0% of the trained weights are bfloat16"):
        assert warn_lost_updates(model, DPO_LR) == pytest.approx(16 / 20)
    model.bias.requires_grad_(False)   # frozen weights are not counted
    with pytest.warns(UserWarning):
        assert warn_lost_updates(model, DPO_LR) == 1.0


# --------------------------------------------------------------------------------------------
# A recipe's dtype
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, saved, expected", [
    (None, torch.bfloat16, Precision(torch.float32, None)),
    ("fp32", None, Precision(torch.float32, None)),
    ("bf16", None, Precision(torch.float32, "bf16")),
    ("bfloat16", torch.float32, Precision(torch.float32, "bf16")),
    ("fp16", None, Precision(torch.float32, "fp16")),
    ("auto", torch.bfloat16, Precision(torch.float32, "bf16")),
    ("auto", torch.float16, Precision(torch.float32, "fp16")),
    ("auto", torch.float32, Precision(torch.float32, None)),
    ("auto", None, Precision(torch.float32, None)),
    ("bf16-pure", None, Precision(torch.bfloat16, None, pure=True)),
])
def test_resolve_precision(dtype, saved, expected):
    assert resolve_precision(dtype, saved) == expected


def test_fp16_pure_is_refused():
    with pytest.raises(ValueError, match="bf16-pure"):
        resolve_precision("fp16-pure")
    path = REPO_ROOT / "recipes" / "dpo.yaml"
    with pytest.raises(recipes.RecipeError, match="dtype: must be null or one of"):
        recipes.load_recipe(path, {"dtype": "fp16-pure"})


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny model saved in bf16, as Qwen and Llama ship."""
    root = tmp_path_factory.mktemp("bf16")
    tok = _tokenizer()
    save_model(build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=0).bfloat16(), tok,
               root / "model")
    with open(root / "pairs.jsonl", "w") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in PAIRS)
    return root


def test_saved_dtype_is_read_from_config(bf16_checkpoint, tmp_path):
    assert saved_dtype(bf16_checkpoint / "model") == torch.bfloat16
    assert saved_dtype(tmp_path) is None


@pytest.mark.parametrize("dtype, mixed, weights, compute", [
    ("auto", "auto", torch.float32, "bf16"),      # a bf16 checkpoint: master weights + autocast
    ("bf16", "no", torch.float32, "bf16"),
    (None, "auto", torch.float32, "auto"),        # the default: as the train section says
    ("bf16-pure", "no", torch.bfloat16, "no"),
])
def test_recipe_dtype_sets_weights_and_compute(bf16_checkpoint, dtype, mixed, weights, compute):
    recipe = recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml", {
        "model": str(bf16_checkpoint / "model"), "dtype": dtype,
        "train.mixed_precision": mixed})
    precision = training_precision(recipe)
    assert precision.weights == weights and recipe.train.mixed_precision == compute


def test_recipe_dtype_contradicting_mixed_precision_is_an_error(bf16_checkpoint):
    recipe = recipes.load_recipe(REPO_ROOT / "recipes" / "dpo.yaml", {
        "model": str(bf16_checkpoint / "model"), "dtype": "bf16",
        "train.mixed_precision": "fp16"})
    with pytest.raises(recipes.RecipeError, match=r"dtype: dtype: bf16 trains float32 weights "
                                                  r"under bf16 autocast, but "
                                                  r"train.mixed_precision is fp16"):
        training_precision(recipe)


def _recipe_run(root, out, dtype):
    return recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model",
                         str(root / "model"), "--data", str(root / "pairs.jsonl"), "--output",
                         str(out), "train.max_steps=5", "train.batch_size=8",
                         "train.grad_accum_steps=1", "train.warmup_steps=0",
                         "train.progress=false", "train.log_every=1", "train.device=cpu",
                         "max_length=32", f"dtype={dtype}"])


def test_recipe_on_a_bf16_checkpoint_trains_master_weights(bf16_checkpoint, tmp_path):
    """The issue's finding end to end: ``dtype: auto`` on a bf16 checkpoint at the DPO recipe's
    lr used to train pure bf16 weights, which did not move; now float32 master weights do."""
    from rlcourse.models import load_model

    start, _ = load_model(bf16_checkpoint / "model", device="cpu")
    before = _layer_weights(start)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*AdamW cannot change them")
        assert _recipe_run(bf16_checkpoint, tmp_path / "auto", "auto") == 0
    after, _ = load_model(tmp_path / "auto" / "model", device="cpu")
    assert _unchanged_share(before, _layer_weights(after)) < 0.01
    with pytest.warns(UserWarning, match="AdamW cannot change them"):
        assert _recipe_run(bf16_checkpoint, tmp_path / "pure", "bf16-pure") == 0
    pure, _ = load_model(tmp_path / "pure" / "model", device="cpu")
    assert _unchanged_share(before, _layer_weights(pure)) > 0.95
