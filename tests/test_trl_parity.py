"""rlcourse gives Hugging Face TRL's numbers, method by method (``benchmarks/trl_parity.py``).

Each parity test runs one real step of a TRL trainer and the matching rlcourse loss on the same
tiny Llama and the same rows, with plain SGD at learning rate 1 (the updated parameters are then
``θ - ∇L``, so they agree only if the gradients do), and asserts that the first loss and every
updated parameter agree to 1e-5. Where the two differ by design, a test pins the convention:
it shows the setting that makes them equal and that the difference is exactly the named one.
``benchmarks/results/trl_parity.json`` (the table of chapter 14 and the README) must hold a row
for every comparison here.

TRL is in the ``dev`` extra (pinned to 1.16, whose conventions these are) and in ``bench``;
without it, or with an older TRL, the module is skipped with that message.
"""

import copy
import dataclasses
import importlib.util
import json

import pytest
import torch

trl = pytest.importorskip(
    "trl", minversion="1.16",
    reason="TRL is not installed: pip install -e '.[dev]' (the parity suite runs TRL's trainers)")
pytest.importorskip("datasets", reason="TRL's trainers need the datasets package")

from rlcourse.config import REPO_ROOT  # noqa: E402
from rlcourse.critic_free import rloo_advantages  # noqa: E402
from rlcourse.losses import DEFAULTS  # noqa: E402
from rlcourse.preference import mismatched_partners  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "trl_parity", REPO_ROOT / "benchmarks" / "trl_parity.py")
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)

TOL = tp.TOLERANCE


def _default(config_class, name):
    """A TRL config field's default, read from the dataclass (no config is built)."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Parity: the first loss and the updated parameters agree to 1e-5
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(tp.PARITY))
def test_first_step_matches_trl(name):
    row = tp.PARITY[name]()
    assert row.get("same_token_ids", True), f"{name}: TRL tokenised the rows differently"
    assert row["param_diff"] <= TOL, (
        f"{row['method']}: parameters after one step differ by {row['param_diff']:.2e} from "
        f"TRL's {row['trl']}")
    if row.get("loss_compared", True):
        scale = max(1.0, abs(row["loss_trl"]))
        assert row["loss_diff"] <= TOL * scale, (
            f"{row['method']}: loss {row['loss_rlcourse']:.8f} vs TRL {row['loss_trl']:.8f}")
    assert tp.agrees(row)


def test_agreement_can_fail():
    """The checks above are not vacuous: a parameter off by 2e-5, or a loss, fails them."""
    good = {"loss_rlcourse": 0.5, "loss_trl": 0.5, "loss_diff": 0.0, "param_diff": 1e-7}
    assert tp.agrees(good)
    assert not tp.agrees({**good, "param_diff": 2e-5})
    assert not tp.agrees({**good, "loss_trl": 0.50002, "loss_diff": 2e-5})
    # a loss near 25 (IPO) is allowed float32's relative error, not more
    assert tp.agrees({**good, "loss_rlcourse": 25.0, "loss_trl": 25.000006, "loss_diff": 6e-6})
    assert not tp.agrees({**good, "loss_rlcourse": 25.0, "loss_trl": 25.001, "loss_diff": 1e-3})


# --------------------------------------------------------------------------------------------
# Conventions: each difference is exactly the one named
# --------------------------------------------------------------------------------------------


def test_sft_sequence_reduction_differs_by_weighting_only():
    """TRL averages over every completion token of the batch (rlcourse's default
    ``reduction="token"``, compared above); ``"sequence"`` averages each sequence first: it
    differs on completions of different lengths and agrees when they are all the same length."""
    unequal = tp.compare_sft("sequence")
    assert unequal["loss_diff"] > 1e-3 and unequal["param_diff"] > 1e-4
    equal = tp.compare_sft("sequence", rows=tp.SFT_ROWS_EQUAL_LENGTHS)
    assert equal["same_token_ids"]
    assert tp.agrees(equal), equal


def test_robust_dpo_default_flip_rate_differs():
    """rlcourse's robust DPO assumes label_smoothing 0.1 by default, TRL's 0.0 (where its
    robust loss is plain DPO); with the same value they agree (the parity row)."""
    from trl import DPOConfig

    assert DEFAULTS["robust"]["label_smoothing"] == 0.1
    assert _default(DPOConfig, "label_smoothing") == 0.0
    defaults = tp.compare_dpo("robust")  # each library's default
    assert defaults["loss_diff"] > 1e-4 and defaults["param_diff"] > 1e-4
    plain = tp.compare_dpo("dpo")
    assert abs(defaults["loss_trl"] - plain["loss_trl"]) <= 1e-6  # TRL's default: plain DPO


def test_trl_sigmoid_ignores_label_smoothing_cdpo_is_rlcourse_only():
    """TRL 1.16's DPO loss ("sigmoid") no longer reads label_smoothing (conservative DPO is
    gone): TRL with 0.1 equals rlcourse's plain DPO, and rlcourse's cDPO differs."""
    trl_smoothed = tp.compare_dpo("dpo", label_smoothing=0.0, trl_label_smoothing=0.1)
    assert tp.agrees(trl_smoothed), trl_smoothed
    cdpo = tp.compare_dpo("dpo", label_smoothing=0.1)
    assert cdpo["loss_diff"] > 1e-4 and cdpo["param_diff"] > 1e-4


def test_orpo_differs_only_in_the_nll_term():
    """TRL's (experimental) ORPO takes the chosen answer's NLL over prompt and completion,
    averaged over every token of the batch; rlcourse's over the completion only, per sequence.
    With the NLL taken TRL's way (and rlcourse's odds-ratio term) the two agree."""
    trl_way = tp.compare_orpo(trl_form=True)
    assert trl_way["same_token_ids"] and tp.agrees(trl_way), trl_way
    ours = tp.compare_orpo()
    assert ours["loss_diff"] > 1e-3 and ours["param_diff"] > 1e-3


def test_kto_mismatched_pairs_differ_from_trls_rotation():
    """TRL rotates the completions by one within the batch, so pairs split in two (chosen, then
    rejected, same prompt) give half the examples the other answer to their OWN prompt;
    rlcourse's ``mismatched_partners`` always picks another prompt. The parity row gives
    rlcourse TRL's pairing; with its own, the reference point z0 differs."""
    prompts = [r["prompt"] for r in tp.UNPAIRED]
    rotation = tp.trl_kto_partners(len(prompts))
    same_prompt = sum(prompts[i] == prompts[j] for i, j in enumerate(rotation))
    assert same_prompt == len(prompts) // 2
    ours = mismatched_partners(prompts, seed=0)
    assert all(prompts[i] != prompts[j] for i, j in enumerate(ours))

    from rlcourse.data import pad_collate
    from rlcourse.preference import make_loss_fn, precompute_reference_logps

    tok = tp.tokenizer()
    policy = tp.policy_model(tok)
    reference = tp.nearby(policy)
    z0 = {}
    for name, partners in (("trl", rotation), ("rlcourse", ours)):
        items = precompute_reference_logps(reference, tp.kto_items(tok, partners))
        with torch.no_grad():
            _, metrics = make_loss_fn("kto")(policy, pad_collate(items, pad_id=0))
        z0[name] = metrics["kl"]
    row = tp.compare_kto()
    assert abs(z0["trl"] - row["z0_trl"]) <= 1e-5  # the pairing the parity row used
    assert z0["trl"] > 0.1  # the clamp at 0 is not what makes them agree
    assert abs(z0["rlcourse"] - z0["trl"]) > 1e-3


def test_reward_model_bias_gets_no_gradient():
    """rlcourse's reward head ``w^T h + b`` has a bias, TRL's score layer none: Bradley–Terry
    reads ``r_w - r_l``, where ``b`` cancels, so its true gradient is zero; rlcourse freezes it
    at 0 (Adam would turn its round-off into a random walk), and the two models train alike."""
    from rlcourse.models import RewardModel

    assert not RewardModel(tp.policy_model(tp.tokenizer()), seed=0).head.bias.requires_grad
    row = tp.compare_reward_model()
    assert row["bias_gradient"] == 0.0
    assert tp.agrees(row)


def test_grpo_kl_trl_default_adds_the_ratio_gradient():
    """TRL 1.16 multiplies GRPO's k3 term by the importance ratio by default
    (``use_bias_correction_kl=True``): the value is the same, the gradient gains
    ``β Σ w_it k3_it ∇log π_it``. rlcourse's update minus exactly that term is TRL's default
    update; with the option off the two agree (the parity rows)."""
    from trl import GRPOConfig

    from rlcourse import rl
    from rlcourse.grpo import group_loss_weights, token_logprobs
    from rlcourse.models import shifted_mask

    assert _default(GRPOConfig, "use_bias_correction_kl") is True
    beta = 0.04
    row = tp.compare_grpo("dapo", beta, bias_correction_kl=True, return_models=True)
    policy, ours, theirs, reference = row["models"]
    assert row["loss_diff"] <= TOL  # the value is unchanged
    assert row["param_diff"] > 1e-4  # the gradient is not

    tok = tp.tokenizer()
    batch = tp.group_batch(*tp.group_data(tok)[:2], tok.pad_token_id)
    mask = shifted_mask(batch["completion_mask"])
    model = copy.deepcopy(policy)
    logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = token_logprobs(reference, batch["input_ids"], batch["attention_mask"])
    w = group_loss_weights(mask, "dapo")
    extra = beta * (w * rl.k3(logp, ref).detach() * logp).sum()  # gradient: β Σ w k3 ∇log π
    extra.backward()
    worst = 0.0
    for (name, p), q in zip(ours.named_parameters(), model.parameters(), strict=True):
        expected = p.detach() - q.grad
        difference = expected - dict(theirs.named_parameters())[name].detach()
        worst = max(worst, float(difference.abs().max()))
    assert worst <= TOL


def test_rloo_loss_values_follow_each_formulation():
    """At the first step (ratios 1) TRL's sequence-level RLOO loss is ``-(1/B) Σ_i A_i``, zero
    since leave-one-out advantages sum to zero in every group; rlcourse's ``dr_grpo`` loss is
    ``-(1/(B L)) Σ_i A_i |y_i|``. Both computed here from the rewards and lengths alone."""
    row = tp.compare_rloo()
    assert tp.agrees(row)  # the update (times L)
    _, completion_ids, rewards = tp.group_data(tp.tokenizer())
    adv = rloo_advantages(torch.tensor(rewards).view(-1, tp.GROUP_SIZE)).flatten()
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float32)
    b, L = len(rewards), tp.MAX_COMPLETION_LENGTH
    assert abs(row["loss_trl"] - float(-adv.sum() / b)) <= 1e-6
    assert abs(row["loss_trl"]) <= 1e-6
    assert abs(row["loss_rlcourse"] - float(-(adv * lengths).sum() / (b * L))) <= 1e-6


def test_rloo_kl_in_the_loss_is_another_update():
    """TRL's RLOO puts β·(log π − log π_ref), summed over the answer, into the reward (compared
    in the parity row through shaped rewards); rlcourse's ``kl_coef`` adds β k3 to the loss."""
    row = tp.compare_rloo(beta=0.05, kl_in_loss=True)
    assert row["param_diff"] > 1e-4


# --------------------------------------------------------------------------------------------
# The committed table
# --------------------------------------------------------------------------------------------


def test_committed_table_covers_every_comparison():
    """``results/trl_parity.json`` has one row per comparison, the parity rows agree, each
    convention row names its convention, and the TRL version is the one the tests read."""
    result = json.loads(tp.RESULTS.read_text())
    rows = {r["id"]: r for r in result["rows"]}
    assert list(rows) == list(tp.PARITY) + list(tp.CONVENTIONS)
    for name in tp.PARITY:
        assert rows[name]["kind"] == "parity" and rows[name]["agrees"], rows[name]
    for name, (_, method, note, text) in tp.CONVENTIONS.items():
        assert rows[name]["kind"] == "convention" and not rows[name]["agrees"]
        assert (rows[name]["method"], rows[name]["note"], rows[name]["convention"]) == (
            method, note, text)
    measured, installed = result["versions"]["trl"], trl.__version__
    assert measured.split(".")[:2] == installed.split(".")[:2], (
        f"trl_parity.json was measured with TRL {measured}, TRL {installed} is installed: rerun "
        "benchmarks/trl_parity.py and check the conventions")
    methods = " ".join(r["method"] for r in result["rows"])
    for method in ("SFT", "DPO", "IPO", "hinge", "robust", "SimPO", "ORPO", "KTO",
                   "reward model", "GRPO", "RLOO"):
        assert method in methods
    for loss_type in ("'grpo'", "'dr_grpo'", "'dapo'"):
        assert sum(loss_type in r["trl"] for r in result["rows"]) >= 2  # with and without KL
