"""The PPO engine: it learns, it leaves the reference alone, it repeats, and with lambda = 0 and
no clipping its update is the slides' actor and critic losses written out by hand."""

import copy

import torch

from rlcourse import ppo, rl
from rlcourse.worlds.token_mdp import PrefixPolicy, TokenMDP


def _setup(kind="tabular", seed=0):
    mdp = TokenMDP(n_tokens=3, horizon=4, reward="instructed", n_prompts=2)
    torch.manual_seed(seed)
    policy = PrefixPolicy(mdp, kind, hidden=16)
    if kind == "tabular":  # a non-uniform start, so every table entry matters
        with torch.no_grad():
            policy.logits_table.normal_(0, 0.5)
            policy.value_table.normal_(0, 0.5)
    return mdp, policy, ppo.freeze(policy)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_parameters_change_reference_does_not():
    for kind in ("tabular", "mlp"):
        mdp, policy, ref = _setup(kind)
        before, ref_before = _params(policy), _params(ref)
        cfg = ppo.PPOConfig(minibatch_size=16, ppo_epochs=2)
        ppo.train_ppo(policy, ref, mdp.score, mdp.sample_fn(32), cfg, n_steps=2, lr=0.05,
                      progress=False)
        assert all(not torch.equal(a, b) for a, b in zip(before, _params(policy), strict=True))
        assert all(torch.equal(a, b) for a, b in zip(ref_before, _params(ref), strict=True))
        assert all(not p.requires_grad for p in ref.parameters())


def test_ppo_improves_the_exact_return():
    mdp, policy, ref = _setup("tabular")
    start = mdp.evaluate(policy).root
    cfg = ppo.PPOConfig(kl_coef=0.01, minibatch_size=64, vf_coef=1.0)
    hist = ppo.train_ppo(policy, ref, mdp.score, mdp.sample_fn(128), cfg, n_steps=15, lr=0.1,
                         progress=False)
    assert mdp.evaluate(policy).root > start + 0.5 * (mdp.optimal_return() - start)
    assert {"score", "kl", "clip_frac", "approx_kl", "explained_variance", "entropy",
            "value_loss", "policy_loss", "kl_coef"} <= set(hist[-1])


def test_fixed_seed_is_repeatable_bitwise():
    finals = []
    for _ in range(2):
        mdp, policy, ref = _setup("mlp", seed=3)
        cfg = ppo.PPOConfig(minibatch_size=16)
        hist = ppo.train_ppo(policy, ref, mdp.score, mdp.sample_fn(32), cfg, n_steps=3,
                             lr=1e-2, seed=7, progress=False)
        finals.append((_params(policy), [h["score"] for h in hist]))
    assert finals[0][1] == finals[1][1]
    assert all(torch.equal(a, b) for a, b in zip(finals[0][0], finals[1][0], strict=True))


def test_lambda_zero_no_clipping_update_is_the_slides_losses():
    mdp, policy, ref = _setup("tabular", seed=1)
    cfg = ppo.PPOConfig(kl_coef=0.1, clip_score=None, clip_eps=None, clip_eps_v=None, lam=0.0,
                        gamma=0.9, ppo_epochs=1, minibatch_size=64, whiten_advantages=False,
                        max_grad_norm=None, vf_coef=0.5)
    gen = torch.Generator().manual_seed(0)
    batch = mdp.sample_fn(64)(policy, gen)
    rollout = ppo.make_experience(policy, ref, mdp.score, batch, cfg, cfg.kl_coef)

    # the slides, by hand: R_t = -kl_ctl log(P/P_ref) (+ score at t = T); Adv_t = R_t + g V_{t+1}
    # - V_t; actor loss -Adv_t log P(A_t|S_t); critic loss (R_t + g V_{t+1} - V_t)^2
    ids = batch["input_ids"]
    logits, values = policy(ids)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_logp = torch.log_softmax(ref(ids)[0][:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    v = values[:, :-1]
    R = -0.1 * (logp - ref_logp).detach()
    R[:, -1] += mdp.score(ids)
    v_next = torch.cat([v[:, 1:], torch.zeros(64, 1)], 1).detach()
    adv = (R + 0.9 * v_next - v).detach()
    assert torch.allclose(rollout.advantages, adv, atol=1e-6)
    actor = (-adv * logp).mean()
    critic = ((R + 0.9 * v_next - v) ** 2).mean()
    policy.zero_grad()
    (actor + 0.5 * 0.5 * critic).backward()  # vf_coef * (PPO's 0.5 * squared error)
    expected = [p.detach() - 1.0 * p.grad for p in policy.parameters()]

    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    ppo.ppo_update(policy, opt, rollout, cfg, torch.Generator().manual_seed(0))
    for got, exp in zip(policy.parameters(), expected, strict=True):
        assert torch.allclose(got, exp, atol=1e-6)


def test_kl_shaped_rollout_rewards_and_alignment():
    mdp, policy, ref = _setup("tabular", seed=2)
    cfg = ppo.PPOConfig(kl_coef=0.2, clip_score=1.0)
    batch = mdp.sample_fn(8)(policy, torch.Generator().manual_seed(1))
    r = ppo.make_experience(policy, ref, mdp.score, batch, cfg, cfg.kl_coef)
    assert r.rewards.shape == (8, mdp.horizon) and bool((r.action_mask == 1).all())
    # policy == reference: the KL part is 0, the clipped score sits at the last token
    assert torch.allclose(r.rewards[:, :-1], torch.zeros(8, mdp.horizon - 1))
    assert torch.allclose(r.rewards[:, -1], mdp.score(batch["input_ids"]).clamp(-1, 1))
    # GAE with the default lambda, from the stored values
    adv, ret = rl.gae(r.rewards, r.values, cfg.gamma, cfg.lam, r.action_mask)
    assert torch.allclose(r.advantages, adv) and torch.allclose(r.returns, ret)


def test_lm_with_value_head_reward_model_and_reference():
    from rlcourse.models import RewardModel, ValueHeadModel, build_tokenizer

    tok = build_tokenizer(["the cat sat on a mat", "a dog ran"])
    kw = dict(n_layers=1, hidden_size=16, n_heads=2, max_position_embeddings=32)
    policy = ValueHeadModel.build(tok, seed=0, **kw)
    ref = ppo.freeze(policy.model)
    rm = RewardModel.build(tok, seed=5, **kw)
    before, ref_before, rm_before = _params(policy), _params(ref), _params(rm)
    sample = ppo.lm_sampler(tok, ["the cat", "a dog"], batch_size=4, max_new_tokens=5)
    cfg = ppo.PPOConfig(minibatch_size=2, ppo_epochs=1)
    hist = ppo.train_ppo(policy, ref, ppo.reward_model_fn(rm), sample, cfg, n_steps=2, lr=1e-2,
                         progress=False)
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["policy_loss"])) for h in hist)
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(policy), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ref_before, _params(ref), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(rm_before, _params(rm), strict=True))
    # the first step starts at pi = pi_ref: the sampled log-probs agree, so the KL is 0
    assert abs(hist[0]["kl"]) < 1e-5


def test_actor_critic_pair_runs_and_trains_both():
    from rlcourse.models import ValueHeadModel, build_model, build_tokenizer

    tok = build_tokenizer(["the cat sat on a mat"])
    kw = dict(n_layers=1, hidden_size=16, n_heads=2, max_position_embeddings=32)
    actor, critic = build_model(tok, seed=0, **kw), ValueHeadModel.build(tok, seed=1, **kw)
    pair = ppo.ActorCritic(actor, critic)
    ref = ppo.freeze(actor)
    a0, c0 = copy.deepcopy(actor.state_dict()), copy.deepcopy(critic.head.state_dict())
    sample = ppo.lm_sampler(tok, ["the cat"], batch_size=4, max_new_tokens=4)
    ppo.train_ppo(pair, ref, lambda ids, attn, m: (ids == 7).float().sum(-1), sample,
                  ppo.PPOConfig(minibatch_size=4), n_steps=1, lr=1e-2, progress=False)
    assert any(not torch.equal(v, actor.state_dict()[k]) for k, v in a0.items())
    assert any(not torch.equal(v, critic.head.state_dict()[k]) for k, v in c0.items())
