"""Group methods (GRPO, RLOO, Dr. GRPO) on the token MDP.

Oracles: hand-computed advantages, log-probs read straight from a tabular policy's table, the
REINFORCE-with-baseline gradient written out with autograd, and the exact optimum of the token
MDP (a backward sweep over the prefix tree).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlcourse import grpo
from rlcourse.memory import method_memory_gib
from rlcourse.worlds.token_mdp import PrefixPolicy, TokenMDP

torch.set_num_threads(1)


def small_world() -> TokenMDP:
    return TokenMDP(n_tokens=3, horizon=3, reward="count_no_repeat", n_prompts=2)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 3.0]])
    # RLOO: r_i minus the mean of the other three
    assert torch.allclose(grpo.group_advantages(r, "rloo"),
                          torch.tensor([[0.0, -4 / 3, -4 / 3, 8 / 3]]))
    # Dr. GRPO: r_i minus the group mean 1
    assert torch.allclose(grpo.group_advantages(r, "dr_grpo"), torch.tensor([[0.0, -1, -1, 2]]))
    # GRPO: divided by the sample standard deviation sqrt(6/3) = sqrt(2) (+ eps 1e-4)
    expected = torch.tensor([[0.0, -1, -1, 2]]) / (2**0.5 + 1e-4)
    assert torch.allclose(grpo.group_advantages(r, "grpo"), expected)
    with pytest.raises(ValueError, match="unknown advantage"):
        grpo.group_advantages(r, "ppo")


def test_token_logprobs_read_the_table():
    mdp = small_world()
    policy = PrefixPolicy(mdp, "tabular")
    with torch.no_grad():
        policy.logits_table.normal_(generator=torch.Generator().manual_seed(0))
    texts = torch.tensor([[0, 2, 1], [1, 1, 0]])
    ids = mdp.input_ids(texts, torch.tensor([0, 1]))
    got = grpo.token_logprobs(policy, ids, torch.ones_like(ids))
    states = mdp.state_ids(texts, torch.tensor([0, 1]))
    table = torch.log_softmax(policy.logits_table.detach().double(), -1)
    expected = table[states, texts].float()
    assert torch.allclose(got, expected, atol=1e-6)


def test_sampler_puts_each_group_on_one_prompt():
    mdp = TokenMDP(n_tokens=3, horizon=3, n_prompts=4)
    config = grpo.GroupConfig(group_size=5, n_prompts=6)
    batch = grpo.group_sampler(mdp.prompt, config, mdp.horizon)(
        PrefixPolicy(mdp, "tabular"), torch.Generator().manual_seed(0))
    prompts = batch["input_ids"][:, 0].view(6, 5)
    assert batch["input_ids"].shape == (30, 4)
    assert (prompts == prompts[:, :1]).all()
    assert batch["completion_mask"][:, 1:].all() and not batch["completion_mask"][:, 0].any()


@pytest.mark.parametrize("kind", ["grpo", "rloo", "dr_grpo"])
def test_one_pass_is_reinforce_with_the_group_baseline(kind):
    """epochs=1, one minibatch: ratio = 1, so the step is SGD on -mean_t A_i log pi(a_t|s_t)."""
    mdp = small_world()
    torch.manual_seed(0)
    policy = PrefixPolicy(mdp, "tabular")
    with torch.no_grad():
        policy.logits_table.normal_(generator=torch.Generator().manual_seed(1))
    config = grpo.GroupConfig(advantage=kind, group_size=4, n_prompts=8, epochs=1,
                              max_grad_norm=None)
    sampler = grpo.group_sampler(mdp.prompt, config, mdp.horizon)
    batch = sampler(policy, torch.Generator().manual_seed(3))

    # The oracle: written out by hand from the same batch.
    oracle = copy.deepcopy(policy)
    rewards = mdp.score(batch["input_ids"]).view(8, 4)
    if kind == "rloo":
        adv = rewards - (rewards.sum(1, keepdim=True) - rewards) / 3
    elif kind == "dr_grpo":
        adv = rewards - rewards.mean(1, keepdim=True)
    else:
        adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    logits = oracle.logits_table[oracle.state_ids(batch["input_ids"])][:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    loss = -(adv.reshape(-1, 1) * logp).mean()  # every row has H tokens: mean = masked mean
    loss.backward()
    expected = oracle.logits_table.detach() - 0.5 * oracle.logits_table.grad

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    grpo.group_step(policy, None, mdp.score, lambda p, g: batch, optimizer, config)
    assert torch.allclose(policy.logits_table.detach(), expected, atol=1e-6)
    # no critic: the value table gets no gradient and stays where it was
    assert torch.equal(policy.value_table.detach(), oracle.value_table.detach())


def test_parameters_move_and_runs_repeat_with_a_seed():
    mdp = small_world()

    def run(seed):
        torch.manual_seed(0)
        policy = PrefixPolicy(mdp, "mlp", hidden=16)
        config = grpo.GroupConfig(group_size=4, n_prompts=8, epochs=2, minibatch_size=16)
        grpo.train_group(policy, None, mdp.score, grpo.group_sampler(mdp.prompt, config, 3),
                         config, n_steps=3, lr=1e-2, seed=seed, progress=False)
        return {k: v.detach().clone() for k, v in policy.actor.state_dict().items()}

    torch.manual_seed(0)
    start = {k: v.detach().clone() for k, v in PrefixPolicy(mdp, "mlp", hidden=16)
             .actor.state_dict().items()}
    a, b, c = run(7), run(7), run(8)
    assert all(not torch.equal(a[k], start[k]) for k in start), "some actor parameter is stuck"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_reaches_the_exact_optimum_of_a_tiny_mdp(kind):
    mdp = small_world()
    optimum = mdp.optimal_return()
    torch.manual_seed(0)
    policy = PrefixPolicy(mdp, "tabular")
    start = mdp.evaluate(policy).root
    config = grpo.GroupConfig(advantage=kind, group_size=8, n_prompts=16, epochs=2,
                              minibatch_size=64)
    grpo.train_group(policy, None, mdp.score, grpo.group_sampler(mdp.prompt, config, 3), config,
                     n_steps=25, lr=0.1, seed=0, progress=False)
    final = mdp.evaluate(policy).root
    assert start < 0.6 * optimum
    assert final >= 0.95 * optimum, (start, final, optimum)


def test_kl_penalty_is_zero_at_the_reference_and_grows():
    mdp = small_world()
    torch.manual_seed(0)
    policy = PrefixPolicy(mdp, "tabular")
    ref = copy.deepcopy(policy)
    config = grpo.GroupConfig(group_size=4, n_prompts=8, kl_coef=0.1, epochs=1)
    history = grpo.train_group(policy, ref, mdp.score, grpo.group_sampler(mdp.prompt, config, 3),
                               config, n_steps=5, lr=0.2, seed=0, progress=False)
    assert history[0]["kl_k3"] == pytest.approx(0.0, abs=1e-7)
    assert history[-1]["kl_k3"] > 1e-3


def test_no_critic_in_memory():
    n = 7 * 10**9
    roles = grpo.group_model_roles(n)
    assert [r.name for r in roles] == ["policy", "reference", "reward model"]
    # 16 bytes per trained parameter, 2 per frozen one: 16 + 2 + 2 = 20 N vs PPO's 36 N
    assert sum(r.bytes for r in roles) == 20 * n
    assert method_memory_gib("ppo", n) * 2**30 == 36 * n
    assert sum(r.bytes for r in grpo.group_model_roles(n, kl_penalty=False,
                                                        reward_model=False)) == 16 * n


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_normalisations_follow_their_formulas(loss_type):
    """Responses of unequal length (masks cut short, as after EOS): one SGD step must equal the
    gradient of the loss written out by hand for each normalisation, at ratio 1:
    grpo ``-(1/G) sum_i (1/|y_i|) sum_t A_i log pi``; dapo ``-sum_{i,t} A_i log pi / sum|y_i|``;
    dr_grpo ``-sum_{i,t} A_i log pi / (G * T)``."""
    mdp = small_world()
    policy = PrefixPolicy(mdp, "tabular")
    with torch.no_grad():
        policy.logits_table.normal_(generator=torch.Generator().manual_seed(1))
    config = grpo.GroupConfig(advantage="rloo", group_size=4, n_prompts=4, epochs=1,
                              max_grad_norm=None, loss_type=loss_type)
    batch = grpo.group_sampler(mdp.prompt, config, mdp.horizon)(
        policy, torch.Generator().manual_seed(3))
    lengths = torch.tensor([1, 2, 3] * 5 + [2])[:16]
    comp = batch["completion_mask"].clone()
    for i, n in enumerate(lengths.tolist()):  # keep the first n response tokens of row i
        on = comp[i].nonzero().flatten()
        comp[i, on[n:]] = 0
    batch = {**batch, "completion_mask": comp}
    mask = comp[:, 1:].float()

    oracle = copy.deepcopy(policy)
    rewards = mdp.score(batch["input_ids"]).view(4, 4)
    adv = (rewards - (rewards.sum(1, keepdim=True) - rewards) / 3).reshape(-1, 1)
    logits = oracle.logits_table[oracle.state_ids(batch["input_ids"])][:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    per_row = (adv * logp * mask).sum(-1)  # sum_t A_i log pi over row i's real tokens
    if loss_type == "grpo":
        loss = -(per_row / mask.sum(-1)).mean()
    elif loss_type == "dapo":
        loss = -per_row.sum() / mask.sum()
    else:
        loss = -per_row.sum() / (16 * mask.shape[1])
    loss.backward()
    expected = oracle.logits_table.detach() - 0.5 * oracle.logits_table.grad

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    grpo.group_update(policy, None, batch, mdp.score(batch["input_ids"]), optimizer, config)
    torch.testing.assert_close(policy.logits_table.detach(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(oracle.logits_table.grad, torch.zeros(()))


def test_bad_loss_type_and_group_size_are_named():
    with pytest.raises(ValueError, match="loss_type: must be one of grpo, dapo, dr_grpo"):
        grpo.GroupConfig(loss_type="token")
    with pytest.raises(ValueError, match="group_size: must be an integer >= 2"):
        grpo.GroupConfig(group_size=1)
