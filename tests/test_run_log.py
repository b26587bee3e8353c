"""Every loop can be watched while it trains: PPO and the group methods append each step's row
to ``history.jsonl`` as they go (the engine's RunLog), not only at the end."""

from __future__ import annotations

import json

import torch

from rlcourse import grpo, ppo
from rlcourse.models import build_model, build_tokenizer
from rlcourse.worlds.token_mdp import PrefixPolicy, TokenMDP

torch.set_num_threads(1)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ppo_appends_history_jsonl_as_it_trains(tmp_path):
    mdp = TokenMDP(n_tokens=3, horizon=4, reward="instructed", n_prompts=2)
    torch.manual_seed(0)
    policy = PrefixPolicy(mdp, "tabular")
    seen = []
    history = ppo.train_ppo(policy, ppo.freeze(policy), mdp.score, mdp.sample_fn(16),
                            ppo.PPOConfig(minibatch_size=16, ppo_epochs=1), n_steps=3, lr=1e-2,
                            progress=False, logging_dir=tmp_path,
                            callback=lambda step, m, r: seen.append(
                                [row["step"] for row in _rows(tmp_path / "history.jsonl")]))
    assert seen == [[0], [0, 1], [0, 1, 2]]  # what a reader of the file saw during training
    assert _rows(tmp_path / "history.jsonl") == json.loads(json.dumps(history))


def test_group_methods_append_history_jsonl_as_they_train(tmp_path):
    tok = build_tokenizer(["name a fruit apple pear ."])
    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    seen = []
    grpo.train_group_lm(model, tok, ["name a fruit"], lambda p, t: [float(len(x)) for x in t],
                        grpo.GroupConfig(group_size=2, n_prompts=1), n_steps=2, lr=1e-3,
                        max_new_tokens=3, device="cpu", progress=False, logging_dir=tmp_path,
                        callback=lambda step, m: seen.append(
                            [row["step"] for row in _rows(tmp_path / "history.jsonl")]))
    assert seen == [[1], [1, 2]]
