"""Every training loop refuses to be silently wrong (rlcourse.guards).

Per method, a run pushed into NaN (a learning rate of 1e30 with no gradient clipping turns the
weights to about 1e30 in one Adam step, and the next forward pass overflows) must stop with
:class:`NonFiniteError` naming the method and the step, and must not save or return a NaN model;
and a reward function that returns NaN, ``None``, strings or the wrong number of values must be
refused with a :class:`RewardError` naming the function. Each test fails without its guard:
before, PPO and GRPO/RLOO finished "successfully" with NaN weights, online DPO trained on pairs
won by a NaN answer, and rejection sampling kept whichever sample came first.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlcourse import grpo, online, ppo
from rlcourse.engine import list_checkpoints
from rlcourse.guards import (
    NonFiniteError,
    RewardError,
    checked_labels,
    checked_rewards,
    nonfinite_parameters,
)
from rlcourse.models import build_model, build_tokenizer
from rlcourse.worlds.token_mdp import PrefixPolicy, TokenMDP

torch.set_num_threads(1)

WORDS = ["apple", "pear", "plum", "fig", "is", "good", "."]
PROMPTS = ["name a fruit", "say a fruit", "tell a fruit", "give a fruit"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS + " ".join(PROMPTS).split())


def tiny(tok, seed=0):
    return build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=seed)


def count_apples(prompts, completions):
    return [float(c.split().count("apple")) for c in completions]


def nan_reward(prompts, completions):
    return [math.nan if i == 1 else 1.0 for i, _ in enumerate(completions)]


def none_reward(prompts, completions):
    return None


def string_reward(prompts, completions):
    return ["0.9" if i % 2 else "10" for i, _ in enumerate(completions)]


def short_reward(prompts, completions):
    return [1.0] * (len(completions) - 1)


# --------------------------------------------------------------------------------------------
# The checks themselves
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], (1, 2, 3), np.array([1.0, 2.0, 3.0]),
                                    torch.tensor([1.0, 2.0, 3.0]), [True, False, True],
                                    [np.float32(1.5), np.int64(2), torch.tensor(3.0)]])
def test_one_real_number_per_completion_is_accepted(values):
    out = checked_rewards(values, 3, count_apples)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == [float(v) for v in (values.tolist() if hasattr(values, "tolist")
                                               else values)]


@pytest.mark.parametrize("values, says", [
    (None, "returned None"),
    ("0.9", "returned a string"),
    (["0.9", "10", "1"], "returned str '0.9' for completion 0"),
    ([1.0, math.nan, 2.0], "returned nan for completion 1"),
    ([1.0, 2.0, math.inf], "returned inf for completion 2"),
    ([1.0, None, 2.0], "returned NoneType None for completion 1"),
    ([1.0, 2.0], "returned 2 values for 3 completions"),
    (np.array([1.0, 2.0, 3.0, 4.0]), "returned 4 values for 3 completions"),
    (7.0, "returned float"),
])
def test_bad_rewards_are_refused_naming_the_function(values, says):
    with pytest.raises(RewardError, match="reward function") as error:
        checked_rewards(values, 3, count_apples, ["a", "b", "c"])
    assert says in str(error.value)
    assert "test_guards.count_apples" in str(error.value)  # the function, with its file:line
    assert "test_guards.py:" in str(error.value)


@pytest.mark.parametrize("labels, says", [
    (["yes", True], "returned str 'yes' for pair 0"),
    ([0.7, True], "returned float 0.7 for pair 0"),
    ([True], "returned 1 verdicts for 2 pairs"),
    (None, "returned None"),
])
def test_bad_verdicts_are_refused(labels, says):
    with pytest.raises(RewardError, match=says):
        checked_labels(labels, 2, count_apples)
    assert checked_labels([True, None], 2, count_apples) == [True, None]
    assert checked_labels([np.bool_(False), True], 2, count_apples) == [False, True]


# --------------------------------------------------------------------------------------------
# PPO: a NaN run stops, names the step, and leaves only finite checkpoints
# --------------------------------------------------------------------------------------------
def _ppo_setup():
    mdp = TokenMDP(n_tokens=3, horizon=4, reward="instructed", n_prompts=2)
    torch.manual_seed(0)
    policy = PrefixPolicy(mdp, "mlp", hidden=16)
    return mdp, policy, ppo.freeze(policy)


def _finite_checkpoints(ckpt_dir):
    from safetensors.torch import load_file

    for path in list_checkpoints(ckpt_dir):
        weights = load_file(str(path / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), path


def test_ppo_stops_on_a_nan_loss_and_saves_no_nan_model(tmp_path):
    mdp, policy, ref = _ppo_setup()
    cfg = ppo.PPOConfig(minibatch_size=16, ppo_epochs=2, max_grad_norm=None)
    with pytest.raises(NonFiniteError, match=r"PPO step \d+ \(lr=1e\+30\)"):
        ppo.train_ppo(policy, ref, mdp.score, mdp.sample_fn(32), cfg, n_steps=4, lr=1e30,
                      progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    _finite_checkpoints(tmp_path)


def test_ppo_refuses_to_resume_a_checkpoint_of_other_settings(tmp_path):
    mdp, policy, ref = _ppo_setup()
    cfg = ppo.PPOConfig(minibatch_size=8)
    ppo.train_ppo(policy, ref, mdp.score, mdp.sample_fn(8), cfg, n_steps=1, lr=1e-3,
                  progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    for changed, key in (({"lr": 2e-3}, "lr"), ({"lr_decay": "linear"}, "lr_decay"),
                         ({"config": ppo.PPOConfig(minibatch_size=4)}, "minibatch_size")):
        kwargs = {"lr": 1e-3, "config": cfg, **changed}
        with pytest.raises(ValueError, match=rf"other settings \(.*{key}.*\)"):
            ppo.train_ppo(policy, ref, mdp.score, mdp.sample_fn(8), n_steps=2, progress=False,
                          checkpoint_dir=tmp_path, checkpoint_every=1, **kwargs)
    # the same settings resume (and more steps at a constant rate extend the run)
    history = ppo.train_ppo(policy, ref, mdp.score, mdp.sample_fn(8), cfg, n_steps=2, lr=1e-3,
                            progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert [r["step"] for r in history] == [0, 1]


def test_ppo_refuses_a_nan_score():
    mdp, policy, ref = _ppo_setup()

    def nan_score(ids, attn, mask):
        return torch.full((ids.shape[0],), math.nan)

    with pytest.raises(RewardError, match="nan_score.* returned nan for completion 0"):
        ppo.train_ppo(policy, ref, nan_score, mdp.sample_fn(8), ppo.PPOConfig(minibatch_size=8),
                      n_steps=1, progress=False)


@pytest.mark.parametrize("changes, says", [
    ({"clip_score": -1}, "clip_score: must be null or a finite number > 0"),
    ({"gamma": -1}, "gamma: must be a number in [0, 1]"),
    ({"lam": 5}, "lam: must be a number in [0, 1]"),
    ({"clip_eps": -0.2}, "clip_eps: must be null or a number in (0, 1]"),
    ({"ent_coef": math.inf}, "ent_coef: must be a finite number >= 0"),
    ({"vf_coef": math.nan}, "vf_coef: must be a finite number >= 0"),
    ({"adaptive_kl": True, "kl_target": 0}, "kl_target: must be a finite number > 0"),
    ({"temperature": 1e-40}, "temperature: must be a finite number >= 0.001"),
])
def test_ppo_keys_out_of_range_are_refused(changes, says):
    with pytest.raises(ValueError) as error:
        ppo.PPOConfig(**changes)
    assert says in str(error.value)


# --------------------------------------------------------------------------------------------
# GRPO and RLOO: the in-memory loop and the language-model loop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_loop_on_a_language_model_stops_on_nan(tok, tmp_path, advantage):
    cfg = grpo.GroupConfig(advantage=advantage, group_size=4, n_prompts=4, max_grad_norm=None)
    model = tiny(tok)
    with pytest.raises(NonFiniteError, match=rf"{advantage.upper()} step \d+ \(lr=1e\+30\)"):
        grpo.train_group_lm(model, tok, PROMPTS, count_apples, cfg, n_steps=4, lr=1e30,
                            max_new_tokens=4, device="cpu", progress=False,
                            checkpoint_dir=tmp_path, checkpoint_every=1)
    _finite_checkpoints(tmp_path)


@pytest.mark.parametrize("reward, says", [(nan_reward, "returned nan for completion 1"),
                                          (none_reward, "returned None"),
                                          (string_reward, "returned str"),
                                          (short_reward, "returned 15 values for 16")])
def test_group_loop_refuses_bad_rewards(tok, reward, says):
    cfg = grpo.GroupConfig(group_size=4, n_prompts=4)
    with pytest.raises(RewardError, match=says):
        grpo.train_group_lm(tiny(tok), tok, PROMPTS, reward, cfg, n_steps=1, lr=1e-3,
                            max_new_tokens=4, device="cpu", progress=False)


def test_in_memory_group_loop_returns_no_nan_model():
    mdp, policy, ref = _ppo_setup()
    cfg = grpo.GroupConfig(group_size=4, n_prompts=8, max_grad_norm=None)

    def sample(policy, generator):
        return mdp.sample_fn(32)(policy, generator)

    # lr = inf (train_group takes lr as an argument, unchecked): the weights become inf/NaN
    with pytest.raises(NonFiniteError, match="GRPO step"):
        grpo.train_group(policy, None, mdp.score, sample, cfg, n_steps=3, lr=math.inf,
                         progress=False)
    assert nonfinite_parameters(policy)  # what the guard kept from being returned silently


# --------------------------------------------------------------------------------------------
# The rounds: online DPO and rejection sampling take only finite rewards
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reward, says", [(nan_reward, "returned nan"),
                                          (none_reward, "returned None"),
                                          (string_reward, "returned str")])
def test_online_dpo_refuses_bad_rewards(tok, reward, says):
    cfg = online.OnlineDPOConfig(rounds=1, epochs=1, batch_size=4, max_new_tokens=4)
    with pytest.raises(RewardError, match=says):
        online.online_dpo(tiny(tok), tok, PROMPTS, online.reward_labeller(reward), cfg)


def test_online_dpo_refuses_verdicts_that_are_not_booleans(tok):
    def yes_labeller(prompts, a, b):
        return ["yes"] * len(prompts)

    cfg = online.OnlineDPOConfig(rounds=1, epochs=1, batch_size=4, max_new_tokens=4)
    with pytest.raises(RewardError, match="labeller .*yes_labeller.* returned str 'yes'"):
        online.online_dpo(tiny(tok), tok, PROMPTS, yes_labeller, cfg)


@pytest.mark.parametrize("reward, says", [(nan_reward, "returned nan for completion 1"),
                                          (none_reward, "returned None"),
                                          (string_reward, "returned str")])
def test_rejection_sampling_refuses_bad_rewards(tok, reward, says):
    cfg = online.RSFTConfig(rounds=1, n=4, epochs=1, batch_size=4, max_new_tokens=4)
    with pytest.raises(RewardError, match=says):
        online.rejection_sampling_ft(tiny(tok), tok, PROMPTS, reward, cfg)
