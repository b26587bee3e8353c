"""Solutions of the build-it-yourself exercises (chapters 7, 8 and 9).

Kept out of the chapters' stub cells: ``check(name, fn, show_solution=True)`` prints one, and
the HTML book shows it collapsed behind a toggle. Each is a plain, complete implementation
from the pieces the chapter built; the checks in ``rlcourse.exercises.<chapter>`` grade it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlcourse import rl
from rlcourse.preference import policy_logps
from rlcourse.worlds.assistant import DEFAULT_WORLD, tokens


# ---- chapter 7: a reward model from scratch ----------------------------------------------------
def build_reward_model(pairs: Sequence[Mapping[str, str]], steps: int = 300, lr: float = 0.05
                       ) -> Callable[[str, str], float]:
    """A Bradley–Terry reward model on word counts: ``r(x, y) = w . counts(y)``.

    Fits ``w`` by minimising ``-mean log sigma(r(x, y_w) - r(x, y_l))`` over ``pairs`` (full
    batch, Adam). Returns ``score(prompt, response) -> float``.
    """
    vocab = {word: i for i, word in enumerate(DEFAULT_WORLD.vocabulary())}

    def counts(texts: Sequence[str]) -> torch.Tensor:
        x = np.zeros((len(texts), len(vocab)), dtype=np.float32)
        for row, text in enumerate(texts):
            ids = [vocab[w] for w in tokens(text) if w in vocab]
            x[row] = np.bincount(ids, minlength=len(vocab))
        return torch.from_numpy(x)

    diff = counts([p["chosen"] for p in pairs]) - counts([p["rejected"] for p in pairs])
    w = torch.zeros(len(vocab), requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        loss = -F.logsigmoid(diff @ w).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = w.detach()

    def score(prompt: str, response: str) -> float:
        return float(counts([response])[0] @ weights)

    return score


# ---- chapter 8: one PPO iteration on the token MDP ---------------------------------------------
def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log pi(ids[:, t+1] | ids[:, :t+1])`` from logits (B, L, V): (B, L-1)."""
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def ppo_iteration(policy: Any, reference: Any, optimizer: torch.optim.Optimizer, world: Any,
                  generator: torch.Generator, batch_size: int = 64, kl_coef: float = 0.02,
                  clip_eps: float = 0.2, lam: float = 0.95, epochs: int = 4,
                  vf_coef: float = 0.5) -> float:
    """Rollout -> KL-shaped reward -> GAE -> clipped losses -> optimizer steps. Returns the
    batch's mean judge score."""
    # 1. rollout: prompts and sampled texts; the mask covers the response tokens
    batch = world.rollout(policy, batch_size, generator)
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].float()
    with torch.no_grad():
        # 2. what the sampling policy and the reference thought of each token, and V_old
        logits, values = policy(ids)
        old_logprobs = _token_logprobs(logits, ids)
        ref_logprobs = _token_logprobs(reference(ids)[0], ids)
        old_values = values[:, :-1]
        # 3. the slides' reward: -beta log(pi/pi_ref) per token, the score at the last token
        rewards = rl.kl_shaped_rewards(old_logprobs, ref_logprobs, batch["rewards"], mask,
                                       kl_coef)
        # 4. GAE, then whitened advantages
        advantages, returns = rl.gae(rewards, old_values, 1.0, lam, mask)
        advantages = rl.masked_whiten(advantages, mask)
    # 5. a few epochs of the clipped policy loss and the clipped value loss
    for _ in range(epochs):
        logits, values = policy(ids)
        policy_loss, _ = rl.ppo_policy_loss(_token_logprobs(logits, ids), old_logprobs,
                                            advantages, mask, clip_eps)
        value_loss, _ = rl.ppo_value_loss(values[:, :-1], old_values, returns, mask, 0.2)
        loss = policy_loss + vf_coef * value_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(batch["rewards"].float().mean())


# ---- chapter 9: a DPO training loop on the small GPT -------------------------------------------
def dpo_train(policy: Any, reference: Any, batches: Sequence[Mapping[str, torch.Tensor]],
              beta: float = 0.5, lr: float = 5e-4) -> None:
    """One pass of DPO over ``batches`` (padded pair batches) with AdamW at ``lr``.

    ``loss = -mean log sigma(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])``
    with summed completion log-probs; the reference gets no gradient.
    """
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    policy.train()
    for batch in batches:
        chosen, rejected, _, _ = policy_logps(policy, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected, _, _ = policy_logps(reference, batch)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -F.logsigmoid(beta * margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
