"""The toy token MDP (layer 4): a language model's decision problem, small enough to solve exactly.

State ``S_t`` = the text so far (a prefix of at most ``H`` tokens, after a start token ``BOS``);
action ``A_t`` = the next token, one of ``V`` tokens; the episode ends after ``H`` tokens and a
judge pays a reward for the whole text at the end (zero reward before). This is the slides'
"state = text, action = token, reward = judgement", with a vocabulary of a few tokens.

Because the states form a prefix tree with ``1 + V + V^2 + ... + V^H`` nodes, the Bellman
equations are solved exactly by one backward sweep from the leaves (no iteration, no sampling):

    q_pi(s, a) = R(s a)                     if |s a| = H   (the leaf's reward)
    q_pi(s, a) = gamma * V_pi(s a)          otherwise      (nothing is paid before the end)
    V_pi(s)    = sum_a pi(a|s) q_pi(s, a),      V*(s) = max_a q*(s, a)

States are numbered level by level: the prefix ``(a_1, ..., a_k)`` has the global index
``offset_k + code`` with ``offset_k = 1 + V + ... + V^(k-1)`` and ``code`` the base-``V`` number
``a_1 a_2 ... a_k`` (first token most significant), so the children of prefix ``code`` are
``code * V + a``.

Policies are tiny causal "language models" over these prefixes: called on ``input_ids`` of shape
(B, L) that start with ``BOS``, they return ``(logits (B, L, V), values (B, L))``, where
position ``t`` holds the policy and the value of the prefix ``input_ids[:, :t+1]``. The same PPO
code then trains them and a transformers language model with a value head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ExactValues",
    "PrefixPolicy",
    "TokenMDP",
    "count_no_repeat_reward",
    "count_reward",
    "make_reward",
    "match_reward",
    "no_repeat_reward",
]

RewardFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# reward functions: tokens (B, H) -> rewards (B,)
# --------------------------------------------------------------------------------------------
def count_reward(tokens: Tensor, target: int = 0) -> Tensor:
    """``R = #{t : a_t = target}``: how often the target token occurs."""
    return (tokens == target).sum(-1).to(torch.float32)


def match_reward(tokens: Tensor, target: Sequence[int], exact: bool = False) -> Tensor:
    """``R = #{t : a_t = target_t}`` (partial credit), or ``1[a = target]`` when ``exact``.

    The exact form is a needle in a haystack: one rewarded text out of ``V^H``.
    """
    target_t = torch.as_tensor(list(target), device=tokens.device)
    if target_t.numel() != tokens.shape[-1]:
        raise ValueError(f"target has {target_t.numel()} tokens, texts have {tokens.shape[-1]}")
    hits = (tokens == target_t).sum(-1)
    if exact:
        return (hits == tokens.shape[-1]).to(torch.float32)
    return hits.to(torch.float32)


def no_repeat_reward(tokens: Tensor) -> Tensor:
    """``R = #{t >= 1 : a_t != a_{t-1}}``: one point per token that differs from the previous."""
    return (tokens[:, 1:] != tokens[:, :-1]).sum(-1).to(torch.float32)


def count_no_repeat_reward(tokens: Tensor, target: int = 0, penalty: float = 1.0) -> Tensor:
    """``R = #{t : a_t = target} - penalty * #{t >= 1 : a_t = a_{t-1}}``.

    Saying the target word pays, saying any word twice in a row costs: "always the target" is
    not optimal, the best texts alternate the target with other tokens (the policy must look at
    the previous token, a state-dependent optimum).
    """
    repeats = (tokens[:, 1:] == tokens[:, :-1]).sum(-1).to(torch.float32)
    return count_reward(tokens, target) - penalty * repeats


def make_reward(kind: str, **kwargs) -> RewardFn:
    """A reward function by name: ``count``, ``match``, ``no_repeat`` or ``count_no_repeat``.

    Keyword arguments go to the function (``target=``, ``exact=``, ``penalty=``).
    """
    table: dict[str, Callable[..., Tensor]] = {
        "count": count_reward,
        "match": match_reward,
        "no_repeat": no_repeat_reward,
        "count_no_repeat": count_no_repeat_reward,
    }
    if kind not in table:
        raise ValueError(f"unknown reward {kind!r}; expected one of {', '.join(table)}")
    fn = table[kind]

    def reward(tokens: Tensor) -> Tensor:
        return fn(tokens, **kwargs)

    reward.__name__ = kind
    reward.__doc__ = fn.__doc__
    return reward


# --------------------------------------------------------------------------------------------
# exact values
# --------------------------------------------------------------------------------------------
@dataclass
class ExactValues:
    """Exact values over the prefix tree, level by level (``k`` = number of tokens so far).

    ``v[k]``: (V^k,) state values of the prefixes of length ``k`` (``k = 0 .. H-1``);
    ``q[k]``: (V^k, V) action values; ``flat``: all ``v`` concatenated in global state order
    (index with :meth:`TokenMDP.state_ids`).
    """

    v: list[Tensor]
    q: list[Tensor]

    @property
    def flat(self) -> Tensor:
        return torch.cat(self.v)

    @property
    def root(self) -> float:
        """``V(empty prefix)``: the expected return of the whole episode."""
        return float(self.v[0][0])


class TokenMDP:
    """A batched token MDP: ``n_tokens`` actions, horizon ``horizon``, reward at the end.

    ``reward`` is a name for :func:`make_reward` (with ``reward_kwargs``) or any function from
    texts (B, H) to rewards (B,). ``gamma`` discounts; with a reward only at the end the return
    from the start is ``gamma^(H-1) R``. Token ``n_tokens`` is the start token ``BOS``.
    """

    def __init__(self, n_tokens: int = 3, horizon: int = 5, reward: str | RewardFn =
                 "count_no_repeat", gamma: float = 1.0, token_names: Sequence[str] | None = None,
                 **reward_kwargs):
        if n_tokens < 2 or horizon < 1:
            raise ValueError("need at least 2 tokens and a horizon of at least 1")
        self.n_tokens, self.horizon, self.gamma = int(n_tokens), int(horizon), float(gamma)
        self.reward_fn: RewardFn = make_reward(reward, **reward_kwargs) if isinstance(
            reward, str) else reward
        self.token_names = list(token_names or "abcdefghijklmnopqrstuvwxyz"[:n_tokens])
        self.bos = self.n_tokens
        V = self.n_tokens
        self.level_sizes = [V**k for k in range(horizon + 1)]
        self.offsets = [sum(self.level_sizes[:k]) for k in range(horizon + 1)]
        self.n_states = self.offsets[horizon]  # non-terminal prefixes, lengths 0 .. H-1

    # ---------------------------------------------------------------- texts and states
    def all_texts(self) -> Tensor:
        """Every text of ``H`` tokens in lexicographic order: (V^H, H)."""
        V, H = self.n_tokens, self.horizon
        codes = torch.arange(V**H)
        powers = V ** torch.arange(H - 1, -1, -1)
        return (codes[:, None] // powers) % V

    def decode(self, tokens: Sequence[int] | Tensor) -> str:
        """The text as a string of token names, e.g. ``"abab"``."""
        return " ".join(self.token_names[int(a)] for a in tokens)

    def reward(self, tokens: Tensor) -> Tensor:
        """The judge's reward ``R(a_1 ... a_H)`` for every text in the batch: (B, H) -> (B,)."""
        return self.reward_fn(tokens).to(torch.float32)

    def state_ids(self, tokens: Tensor) -> Tensor:
        """Global index of every prefix a trajectory visits: (B, H) texts -> (B, H) states.

        Column ``k`` is the prefix of the first ``k`` tokens (column 0 the empty prefix).
        """
        B, H = tokens.shape
        V = self.n_tokens
        codes = torch.zeros(B, H, dtype=torch.long)
        for k in range(1, H):
            codes[:, k] = codes[:, k - 1] * V + tokens[:, k - 1]
        return codes + torch.tensor(self.offsets[:H])

    def prompt(self, batch_size: int) -> dict[str, Tensor]:
        """The starting state for ``batch_size`` episodes: ``BOS`` alone, as a batch of prompts."""
        ids = torch.full((batch_size, 1), self.bos, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def score(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              action_mask: Tensor | None = None) -> Tensor:
        """Reward of full sequences ``[BOS, a_1 .. a_H]`` (the PPO engine's ``reward_fn``)."""
        return self.reward(input_ids[:, 1:])

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, policy: nn.Module | Callable, batch_size: int,
               generator: torch.Generator | None = None, temperature: float = 1.0
               ) -> tuple[Tensor, Tensor]:
        """Roll out ``batch_size`` episodes: returns texts (B, H) and their rewards (B,)."""
        ids = self.prompt(batch_size)["input_ids"]
        for _ in range(self.horizon):
            logits = _logits(policy(ids))[:, -1] / temperature
            probs = torch.softmax(logits.float(), -1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, nxt], 1)
        texts = ids[:, 1:]
        return texts, self.reward(texts)

    def monte_carlo_value(self, policy: nn.Module | Callable, n: int,
                          generator: torch.Generator | None = None) -> tuple[float, float]:
        """Sample mean of the discounted return from the start and its standard error."""
        _, r = self.sample(policy, n, generator)
        g = (self.gamma ** (self.horizon - 1)) * r.double()
        return float(g.mean()), float(g.std() / n**0.5)

    # ---------------------------------------------------------------- exact values
    @torch.no_grad()
    def policy_probs(self, policy: nn.Module | Callable, temperature: float = 1.0
                     ) -> list[Tensor]:
        """``pi(.|s)`` for every prefix, level by level: a list of (V^k, V) tensors.

        Feeds every full text through the policy once; the prefix ``code`` of length ``k`` is
        the first ``k`` tokens of text number ``code * V^(H-k)``.
        """
        texts = self.all_texts()
        ids = torch.cat([torch.full((len(texts), 1), self.bos), texts], 1)
        logits = _logits(policy(ids)).double() / temperature  # (V^H, H+1, V)
        probs = torch.softmax(logits, -1)  # float64, so that exact values are exact
        H, V = self.horizon, self.n_tokens
        return [probs[:: V ** (H - k), k] for k in range(H)]

    def evaluate(self, probs: Sequence[Tensor] | nn.Module | Callable) -> ExactValues:
        """Exact ``V_pi`` and ``q_pi`` by one backward sweep over the prefix tree.

        ``probs`` is a policy (anything :meth:`policy_probs` accepts) or its per-level tables.
        """
        if not isinstance(probs, (list, tuple)):
            probs = self.policy_probs(probs)
        return self._backward(lambda k, q: (probs[k] * q).sum(-1))

    def optimal(self) -> ExactValues:
        """Exact ``V*`` and ``q*``: the same sweep with ``max_a`` in place of the policy average."""
        return self._backward(lambda k, q: q.max(-1).values)

    def optimal_return(self) -> float:
        """``V*(empty prefix)``: the best expected return any policy can reach."""
        return self.optimal().root

    def greedy_texts(self, values: ExactValues | None = None) -> list[str]:
        """The texts an optimal policy can produce (all argmax paths), decoded."""
        values = values or self.optimal()
        best = [(0, ())]
        for k in range(self.horizon):
            nxt = []
            for code, prefix in best:
                q = values.q[k][code]
                for a in torch.nonzero(torch.isclose(q, q.max())).flatten().tolist():
                    nxt.append((code * self.n_tokens + a, prefix + (a,)))
            best = nxt
        return [self.decode(p) for _, p in best]

    def _backward(self, backup: Callable[[int, Tensor], Tensor]) -> ExactValues:
        V, H = self.n_tokens, self.horizon
        leaf_reward = self.reward(self.all_texts()).double()  # (V^H,)
        vs: list[Tensor] = [torch.zeros(0)] * H
        qs: list[Tensor] = [torch.zeros(0)] * H
        # level H-1: the last token is chosen and the judge pays R for the finished text
        q = leaf_reward.reshape(V ** (H - 1), V)
        for k in range(H - 1, -1, -1):
            qs[k] = q
            vs[k] = backup(k, q)
            if k > 0:
                q = self.gamma * vs[k].reshape(V ** (k - 1), V)
        return ExactValues(v=vs, q=qs)


def _logits(output) -> Tensor:
    """Logits from a model output: a tensor, a ``(logits, values)`` tuple or an object."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


# --------------------------------------------------------------------------------------------
# policies over prefixes
# --------------------------------------------------------------------------------------------
class PrefixPolicy(nn.Module):
    """Actor and critic over the prefixes of a :class:`TokenMDP`, shaped like a causal LM.

    ``kind="tabular"``: one row of logits and one value per prefix (the exact setting, every
    prefix its own parameters; starts uniform with zero values). ``kind="mlp"``: two small MLPs
    (actor, critic) on a one-hot encoding of the prefix (its tokens and its length), which
    generalise across prefixes like a real network.

    ``forward(input_ids (B, L), attention_mask=None) -> (logits (B, L, V), values (B, L))``;
    ``input_ids`` start with ``BOS``; position ``t`` describes the prefix ``input_ids[:, 1:t+1]``.
    """

    def __init__(self, mdp: TokenMDP, kind: str = "tabular", hidden: int = 64):
        super().__init__()
        self.n_tokens, self.horizon, self.kind = mdp.n_tokens, mdp.horizon, kind
        # offsets[k] for prefix lengths k = 0 .. H (length H: the finished text, never acted in)
        self.register_buffer("offsets", torch.tensor(mdp.offsets), persistent=False)
        n_states = mdp.offsets[mdp.horizon] + mdp.level_sizes[mdp.horizon]
        if kind == "tabular":
            self.logits_table = nn.Parameter(torch.zeros(n_states, self.n_tokens))
            self.value_table = nn.Parameter(torch.zeros(n_states))
        elif kind == "mlp":
            d_in = self.horizon * self.n_tokens + self.horizon + 1
            self.actor = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(),
                                       nn.Linear(hidden, self.n_tokens))
            self.critic = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.actor[-1].weight)
            nn.init.zeros_(self.actor[-1].bias)
        else:
            raise ValueError(f"kind must be 'tabular' or 'mlp', got {kind!r}")

    def prefix_ids(self, input_ids: Tensor) -> Tensor:
        """Global state index of the prefix at every position: (B, L) -> (B, L)."""
        tokens = input_ids[:, 1:]
        B, L = input_ids.shape
        codes = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)
        for k in range(1, L):
            codes[:, k] = codes[:, k - 1] * self.n_tokens + tokens[:, k - 1]
        return codes + self.offsets[:L]

    def features(self, input_ids: Tensor) -> Tensor:
        """One-hot prefix encoding for the MLP: (B, L) -> (B, L, H V + H + 1)."""
        tokens = input_ids[:, 1:]
        B, L = input_ids.shape
        H, V = self.horizon, self.n_tokens
        onehot = nn.functional.one_hot(tokens, V).float()  # (B, L-1, V)
        feats = torch.zeros(B, L, H * V + H + 1, device=input_ids.device)
        for t in range(L):
            if t > 0:
                feats[:, t, : t * V] = onehot[:, :t].reshape(B, t * V)
            feats[:, t, H * V + t] = 1.0
        return feats

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        if self.kind == "tabular":
            idx = self.prefix_ids(input_ids)
            return self.logits_table[idx], self.value_table[idx]
        feats = self.features(input_ids)
        return self.actor(feats), self.critic(feats).squeeze(-1)
