"""The toy token MDP (layer 4): a language model's decision problem, small enough to solve exactly.

The slides' reading of text generation as an MDP: the initial state is the **prompt**; state
``S_t`` = the prompt and the tokens so far; action ``A_t`` = the next token, one of ``V`` tokens;
after ``H`` tokens a judge pays a reward ``R(prompt, text)`` for the whole text (nothing is paid
before). Prompts are drawn from a distribution ``mu`` (one prompt by default).

The states form a prefix tree below each prompt, ``P (1 + V + ... + V^(H-1))`` decision states
in all, so the Bellman equations are solved exactly by one backward sweep from the leaves:

    q_pi(s, a) = R(s a)                     if s a is a finished text (H tokens)
    q_pi(s, a) = gamma * V_pi(s a)          otherwise (nothing is paid before the end)
    V_pi(s)    = sum_a pi(a|s) q_pi(s, a),      V*(s) = max_a q*(s, a)

and the expected return of the whole episode is ``sum_p mu(p) V(p)``.

Numbering: the states with ``k`` tokens ("level k") are numbered ``i = p V^k + code``, where
``code`` is the base-``V`` number ``a_1 ... a_k`` (first token most significant); the children of
state ``i`` are ``i V + a``, and the global index is ``offset_k + i``.

Token ids: actions ``0 .. V-1``; prompt ``p`` is the token ``V + p`` (with one prompt it plays the
role of ``BOS``). Policies are tiny causal "language models" over these prefixes: called on
``input_ids`` (B, L) that start with the prompt token they return ``(logits (B, L, V), values
(B, L))``, where position ``t`` holds the policy and the value of the state
``input_ids[:, :t+1]``. The same PPO code trains them and a transformers LM with a value head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rlcourse.models import output_logits

__all__ = [
    "ExactValues",
    "PrefixPolicy",
    "TokenMDP",
    "count_no_repeat_reward",
    "count_reward",
    "instructed_reward",
    "make_reward",
    "match_reward",
    "no_repeat_reward",
]

#: A judge: ``reward_fn(texts (B, H), prompts (B,)) -> rewards (B,)``.
RewardFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# reward functions: texts (B, H), prompts (B,) -> rewards (B,)
# --------------------------------------------------------------------------------------------
def count_reward(tokens: Tensor, prompts: Tensor | None = None, target: int = 0) -> Tensor:
    """``R = #{t : a_t = target}``: how often the target token occurs."""
    return (tokens == target).sum(-1).to(torch.float32)


def match_reward(tokens: Tensor, prompts: Tensor | None = None,
                 target: Sequence[int] = (0,), exact: bool = False) -> Tensor:
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


def no_repeat_reward(tokens: Tensor, prompts: Tensor | None = None) -> Tensor:
    """``R = #{t >= 2 : a_t != a_{t-1}}``: one point per token that differs from the previous."""
    return (tokens[:, 1:] != tokens[:, :-1]).sum(-1).to(torch.float32)


def _repeats(tokens: Tensor) -> Tensor:
    return (tokens[:, 1:] == tokens[:, :-1]).sum(-1).to(torch.float32)


def count_no_repeat_reward(tokens: Tensor, prompts: Tensor | None = None, target: int = 0,
                           penalty: float = 1.0) -> Tensor:
    """``R = #{t : a_t = target} - penalty * #{t >= 2 : a_t = a_{t-1}}``.

    Saying the target word pays, saying any word twice in a row costs: "always the target" is
    not optimal, the best texts alternate the target with other tokens (the policy must look at
    the previous token, a state-dependent optimum).
    """
    return count_reward(tokens, target=target) - penalty * _repeats(tokens)


def instructed_reward(tokens: Tensor, prompts: Tensor, weights: Sequence[float] | None = None,
                      penalty: float = 1.0) -> Tensor:
    """Prompt ``p`` asks for token ``p``: ``R = w_p #{t : a_t = p} - penalty * #repeats``.

    The weights ``w_p`` (default ``1, 1.5, 2, ...``) make some requests worth more than others, so
    states under different prompts have different values, as texts under different prompts do.
    """
    prompts = prompts.to(tokens.device)
    if weights is None:
        w = 1.0 + 0.5 * prompts.to(torch.float32)
    else:
        w = torch.as_tensor(list(weights), dtype=torch.float32, device=tokens.device)[prompts]
    hits = (tokens == prompts[:, None]).sum(-1).to(torch.float32)
    return w * hits - penalty * _repeats(tokens)


def make_reward(kind: str, **kwargs) -> RewardFn:
    """A judge by name: ``count``, ``match``, ``no_repeat``, ``count_no_repeat``, ``instructed``.

    Keyword arguments go to the function (``target=``, ``exact=``, ``penalty=``, ``weights=``).
    """
    table: dict[str, Callable[..., Tensor]] = {
        "count": count_reward,
        "match": match_reward,
        "no_repeat": no_repeat_reward,
        "count_no_repeat": count_no_repeat_reward,
        "instructed": instructed_reward,
    }
    if kind not in table:
        raise ValueError(f"unknown reward {kind!r}; expected one of {', '.join(table)}")
    fn = table[kind]

    def reward(tokens: Tensor, prompts: Tensor) -> Tensor:
        return fn(tokens, prompts, **kwargs)

    reward.__name__ = kind
    reward.__doc__ = fn.__doc__
    return reward


# --------------------------------------------------------------------------------------------
# exact values
# --------------------------------------------------------------------------------------------
@dataclass
class ExactValues:
    """Exact values over the prefix trees, level by level (``k`` = number of tokens so far).

    ``v[k]``: (P V^k,) values of the states with ``k`` tokens (``k = 0 .. H-1``; ``v[0][p]`` is
    the value of prompt ``p``); ``q[k]``: (P V^k, V) action values; ``prompt_probs``: ``mu``.
    ``flat``: all ``v`` concatenated in global state order (index with
    :meth:`TokenMDP.state_ids`).
    """

    v: list[Tensor]
    q: list[Tensor]
    prompt_probs: Tensor

    @property
    def flat(self) -> Tensor:
        return torch.cat(self.v)

    @property
    def root(self) -> float:
        """``sum_p mu(p) V(p)``: the expected return of a whole episode."""
        return float((self.prompt_probs * self.v[0]).sum())


class TokenMDP:
    """A batched token MDP: ``n_tokens`` actions, horizon ``horizon``, a judge at the end.

    ``reward`` is a name for :func:`make_reward` (with ``reward_kwargs``) or any function
    ``(texts (B, H), prompts (B,)) -> rewards (B,)``. ``n_prompts`` prompts are drawn from
    ``prompt_probs`` (uniform by default). ``gamma`` discounts; with a reward only at the end the
    return from the start is ``gamma^(H-1) R``.
    """

    def __init__(self, n_tokens: int = 3, horizon: int = 5,
                 reward: str | RewardFn = "count_no_repeat", gamma: float = 1.0,
                 n_prompts: int = 1, prompt_probs: Sequence[float] | None = None,
                 token_names: Sequence[str] | None = None, **reward_kwargs):
        if n_tokens < 2 or horizon < 1 or n_prompts < 1:
            raise ValueError("need at least 2 tokens, a horizon of at least 1 and one prompt")
        self.n_tokens, self.horizon, self.gamma = int(n_tokens), int(horizon), float(gamma)
        self.n_prompts = int(n_prompts)
        self.reward_fn: RewardFn = make_reward(reward, **reward_kwargs) if isinstance(
            reward, str) else reward
        probs = torch.ones(n_prompts) if prompt_probs is None else torch.as_tensor(prompt_probs)
        self.prompt_probs = (probs / probs.sum()).double()
        self.token_names = list(token_names or "abcdefghijklmnopqrstuvwxyz"[:n_tokens])
        self.bos = self.n_tokens  # the token of prompt 0
        V, P = self.n_tokens, self.n_prompts
        self.level_sizes = [P * V**k for k in range(horizon + 1)]
        self.offsets = [sum(self.level_sizes[:k]) for k in range(horizon + 1)]
        self.n_states = self.offsets[horizon]  # decision states, k = 0 .. H-1 tokens

    # ---------------------------------------------------------------- texts and states
    def all_texts(self) -> tuple[Tensor, Tensor]:
        """Every (prompt, text) pair: texts (P V^H, H) and prompts (P V^H,), in state order."""
        V, H, P = self.n_tokens, self.horizon, self.n_prompts
        codes = torch.arange(V**H)
        powers = V ** torch.arange(H - 1, -1, -1)
        texts = ((codes[:, None] // powers) % V).repeat(P, 1)
        prompts = torch.arange(P).repeat_interleave(V**H)
        return texts, prompts

    def input_ids(self, texts: Tensor, prompts: Tensor | None = None) -> Tensor:
        """The sequences ``[prompt token, a_1, ..., a_k]`` a policy reads: (B, k) -> (B, k+1)."""
        if prompts is None:
            prompts = torch.zeros(texts.shape[0], dtype=torch.long)
        return torch.cat([(prompts + self.n_tokens)[:, None], texts], 1)

    def decode(self, tokens: Sequence[int] | Tensor, prompt: int | None = None) -> str:
        """The text as token names, e.g. ``"a b a b"`` (``"<p1> a b a b"`` with a prompt)."""
        words = [self.token_names[int(a)] for a in tokens]
        return " ".join(([f"<p{int(prompt)}>"] if prompt is not None else []) + words)

    def reward(self, tokens: Tensor, prompts: Tensor | None = None) -> Tensor:
        """The judge's reward for every finished text: (B, H), (B,) -> (B,)."""
        if prompts is None:
            prompts = torch.zeros(tokens.shape[0], dtype=torch.long)
        return self.reward_fn(tokens, prompts).to(torch.float32)

    def state_ids(self, texts: Tensor, prompts: Tensor | None = None) -> Tensor:
        """Global index of every decision state an episode visits: (B, H) -> (B, H).

        Column ``k`` is the state with the first ``k`` tokens (column 0 is the prompt alone).
        """
        B, H = texts.shape
        if prompts is None:
            prompts = torch.zeros(B, dtype=torch.long)
        V = self.n_tokens
        codes = torch.zeros(B, H, dtype=torch.long)
        codes[:, 0] = prompts
        for k in range(1, H):
            codes[:, k] = codes[:, k - 1] * V + texts[:, k - 1]
        return codes + torch.tensor(self.offsets[:H])

    def prompt(self, batch_size: int, generator: torch.Generator | None = None
               ) -> dict[str, Tensor]:
        """``batch_size`` initial states: prompts drawn from ``mu``, as a batch of prompt ids."""
        if self.n_prompts == 1:
            prompts = torch.zeros(batch_size, dtype=torch.long)
        else:
            prompts = torch.multinomial(self.prompt_probs.float(), batch_size, replacement=True,
                                        generator=generator)
        ids = (prompts + self.n_tokens)[:, None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def score(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              action_mask: Tensor | None = None) -> Tensor:
        """The judge on full sequences ``[prompt, a_1 .. a_H]`` (the PPO engine's ``reward_fn``)."""
        return self.reward(input_ids[:, 1:], input_ids[:, 0] - self.n_tokens)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def rollout(self, policy: nn.Module | Callable, batch_size: int,
                generator: torch.Generator | None = None, temperature: float = 1.0
                ) -> dict[str, Tensor]:
        """Play ``batch_size`` episodes: prompts from ``mu``, then ``H`` sampled tokens.

        Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (B, H+1) — the format of
        the PPO engine's ``sample_fn`` — and ``texts`` (B, H), ``prompts`` (B,), ``rewards``.
        """
        ids = self.prompt(batch_size, generator)["input_ids"]
        for _ in range(self.horizon):
            logits = output_logits(policy(ids))[:, -1].float() / temperature
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], 1)
        completion = torch.ones_like(ids)
        completion[:, 0] = 0
        texts, prompts = ids[:, 1:], ids[:, 0] - self.n_tokens
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "completion_mask": completion, "texts": texts, "prompts": prompts,
                "rewards": self.reward(texts, prompts)}

    def sample_fn(self, batch_size: int) -> Callable[[nn.Module, torch.Generator | None],
                                                     dict[str, Tensor]]:
        """``sample_fn(policy, generator)`` for :func:`rlcourse.ppo.ppo_step`."""

        def sample(policy: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
            out = self.rollout(policy, batch_size, generator)
            return {k: out[k] for k in ("input_ids", "attention_mask", "completion_mask")}

        return sample

    def monte_carlo_value(self, policy: nn.Module | Callable, n: int,
                          generator: torch.Generator | None = None) -> tuple[float, float]:
        """Sample mean of the discounted return of ``n`` episodes and its standard error."""
        r = self.rollout(policy, n, generator)["rewards"]
        g = (self.gamma ** (self.horizon - 1)) * r.double()
        return float(g.mean()), float(g.std() / n**0.5)

    # ---------------------------------------------------------------- exact values
    def expected_return(self, policy: nn.Module | Callable) -> Tensor:
        """``J(theta) = sum_p mu(p) sum_y P_theta(y|p) gamma^(H-1) R(p, y)``, differentiable.

        Sums over every (prompt, text): ``P_theta(y|p) = prod_t pi(a_t|s_t)``. Autograd through
        it gives the exact policy gradient that REINFORCE estimates from samples.
        """
        texts, prompts = self.all_texts()
        ids = self.input_ids(texts, prompts)
        logp = torch.log_softmax(output_logits(policy(ids))[:, :-1].double(), -1)
        log_p_text = logp.gather(-1, texts[:, :, None]).squeeze(-1).sum(-1)
        weight = self.prompt_probs[prompts] * self.gamma ** (self.horizon - 1)
        return (weight * log_p_text.exp() * self.reward(texts, prompts).double()).sum()

    @torch.no_grad()
    def policy_probs(self, policy: nn.Module | Callable, temperature: float = 1.0
                     ) -> list[Tensor]:
        """``pi(.|s)`` for every decision state, level by level: a list of (P V^k, V) tensors.

        Feeds every (prompt, text) through the policy once; the state ``i = p V^k + code`` is
        the first ``k`` tokens of sequence number ``i V^(H-k)``.
        """
        texts, prompts = self.all_texts()
        logits = output_logits(policy(self.input_ids(texts, prompts))).double() / temperature
        probs = torch.softmax(logits, -1)  # float64, so that exact values are exact
        H, V = self.horizon, self.n_tokens
        return [probs[:: V ** (H - k), k] for k in range(H)]

    def evaluate(self, probs: Sequence[Tensor] | nn.Module | Callable,
                 ref_probs: Sequence[Tensor] | nn.Module | Callable | None = None,
                 kl_coef: float = 0.0) -> ExactValues:
        """Exact ``V_pi`` and ``q_pi`` by one backward sweep over the prefix trees.

        ``probs`` is a policy (anything :meth:`policy_probs` accepts) or its per-level tables.
        With a reference policy and ``kl_coef = beta > 0``, every token also pays the slides'
        KL-shaped reward ``-beta (log pi(a|s) - log pi_ref(a|s))``, so

            q(s, a) = -beta log(pi(a|s) / pi_ref(a|s)) + [R(s a) or gamma V(s a)]

        and ``V_pi`` is the exact expected KL-shaped return: what PPO's critic learns.
        """
        if not isinstance(probs, (list, tuple)):
            probs = self.policy_probs(probs)
        if ref_probs is None or kl_coef == 0.0:
            return self._backward(lambda k, q: (probs[k] * q).sum(-1))
        if not isinstance(ref_probs, (list, tuple)):
            ref_probs = self.policy_probs(ref_probs)
        penalty = [-kl_coef * (p.clamp_min(1e-300).log() - r.clamp_min(1e-300).log())
                   for p, r in zip(probs, ref_probs, strict=True)]
        return self._backward(lambda k, q: (probs[k] * q).sum(-1), penalty)

    def critic_vs_exact(self, policy: nn.Module, reference: nn.Module | None = None,
                        kl_coef: float = 0.0, n: int = 2048, seed: int = 12345
                        ) -> dict[str, Tensor | float | int]:
        """How well a learned critic matches the exact ``V_pi`` on the prefixes ``pi`` visits.

        Samples ``n`` texts from ``policy``, reads its critic ``V_phi(s_t)`` at every decision
        state ``s_t`` (``t = 0 .. H-1``) and compares it with the exact KL-shaped value of
        :meth:`evaluate` (``policy``, ``reference``, ``kl_coef``): the quantity PPO's critic is
        trained to predict. Pearson correlations:

        - ``corr_distinct``: over the distinct visited prefixes (each counted once; rarely
          visited prefixes, where the critic has seen little data, weigh as much as the root);
        - ``corr_weighted``: over all visits (what the policy-gradient actually uses);
        - ``corr_reward_only_distinct``: against the exact value of the judge's reward alone.

        Also returns ``mean_abs_error`` (over visits), ``n_visited_states``, and the tensors
        ``critic``, ``exact`` (one entry per distinct prefix, for plots). A correlation is NaN
        when either side is constant.
        """
        generator = torch.Generator().manual_seed(seed)
        out = self.rollout(policy, n, generator)
        states = self.state_ids(out["texts"], out["prompts"]).flatten()      # (n H,)
        with torch.no_grad():
            _, values = policy(out["input_ids"])                              # (n, H + 1)
        critic = values[:, : self.horizon].flatten().double()                # V_phi(s_t)
        shaped = self.evaluate(policy, reference, kl_coef).flat[states]
        plain = self.evaluate(policy).flat[states]
        _, first = np.unique(states.numpy(), return_index=True)
        first = torch.as_tensor(first)

        def corr(a: Tensor, b: Tensor) -> float:
            if a.numel() < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
                return float("nan")
            return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

        return {
            "n_visited_states": int(first.numel()),
            "corr_distinct": corr(critic[first], shaped[first]),
            "corr_weighted": corr(critic, shaped),
            "corr_reward_only_distinct": corr(critic[first], plain[first]),
            "mean_abs_error": float((critic - shaped).abs().mean()),
            "critic": critic[first],
            "exact": shaped[first],
        }

    def optimal(self) -> ExactValues:
        """Exact ``V*`` and ``q*``: the same sweep with ``max_a`` in place of the policy average."""
        return self._backward(lambda k, q: q.max(-1).values)

    def optimal_return(self) -> float:
        """``sum_p mu(p) V*(p)``: the best expected return any policy can reach."""
        return self.optimal().root

    def greedy_texts(self, prompt: int = 0, values: ExactValues | None = None) -> list[str]:
        """Every text an optimal policy can write after ``prompt`` (all argmax paths)."""
        values = values or self.optimal()
        best: list[tuple[int, tuple[int, ...]]] = [(prompt, ())]
        for k in range(self.horizon):
            nxt = []
            for i, prefix in best:
                q = values.q[k][i]
                for a in torch.nonzero(torch.isclose(q, q.max())).flatten().tolist():
                    nxt.append((i * self.n_tokens + a, prefix + (a,)))
            best = nxt
        return [self.decode(p) for _, p in best]

    def _backward(self, backup: Callable[[int, Tensor], Tensor],
                  step_rewards: Sequence[Tensor] | None = None) -> ExactValues:
        V, H = self.n_tokens, self.horizon
        leaf_reward = self.reward(*self.all_texts()).double()  # (P V^H,)
        vs: list[Tensor] = [torch.zeros(0)] * H
        qs: list[Tensor] = [torch.zeros(0)] * H
        # level H-1: the last token is chosen and the judge pays R for the finished text
        q = leaf_reward.reshape(-1, V)
        for k in range(H - 1, -1, -1):
            if step_rewards is not None:
                q = q + step_rewards[k]
            qs[k] = q
            vs[k] = backup(k, q)
            if k > 0:
                q = self.gamma * vs[k].reshape(-1, V)
        return ExactValues(v=vs, q=qs, prompt_probs=self.prompt_probs)


# --------------------------------------------------------------------------------------------
# policies over prefixes
# --------------------------------------------------------------------------------------------
class PrefixPolicy(nn.Module):
    """Actor and critic over the states of a :class:`TokenMDP`, shaped like a causal LM.

    ``kind="tabular"``: one row of logits and one value per state (the exact setting: every
    prefix has its own parameters; starts uniform with zero values). ``kind="mlp"``: two small
    MLPs (actor, critic) on a one-hot encoding of the state (prompt, tokens, length), which
    generalise across prefixes like a real network.

    ``forward(input_ids (B, L), attention_mask=None) -> (logits (B, L, V), values (B, L))``;
    ``input_ids`` start with the prompt token; position ``t`` describes ``input_ids[:, :t+1]``.
    """

    def __init__(self, mdp: TokenMDP, kind: str = "tabular", hidden: int = 64):
        super().__init__()
        self.n_tokens, self.horizon, self.kind = mdp.n_tokens, mdp.horizon, kind
        self.n_prompts = mdp.n_prompts
        # offsets[k] for k = 0 .. H tokens (k = H: the finished text, never acted in)
        self.register_buffer("offsets", torch.tensor(mdp.offsets), persistent=False)
        n_states = mdp.offsets[mdp.horizon] + mdp.level_sizes[mdp.horizon]
        if kind == "tabular":
            self.logits_table = nn.Parameter(torch.zeros(n_states, self.n_tokens))
            self.value_table = nn.Parameter(torch.zeros(n_states))
        elif kind == "mlp":
            d_in = self.n_prompts + self.horizon * self.n_tokens + self.horizon + 1
            self.actor = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(),
                                       nn.Linear(hidden, self.n_tokens))
            self.critic = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.actor[-1].weight)
            nn.init.zeros_(self.actor[-1].bias)
        else:
            raise ValueError(f"kind must be 'tabular' or 'mlp', got {kind!r}")

    def state_ids(self, input_ids: Tensor) -> Tensor:
        """Global state index at every position: (B, L) -> (B, L)."""
        B, L = input_ids.shape
        codes = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)
        codes[:, 0] = input_ids[:, 0] - self.n_tokens
        for k in range(1, L):
            codes[:, k] = codes[:, k - 1] * self.n_tokens + input_ids[:, k]
        return codes + self.offsets[:L]

    def features(self, input_ids: Tensor) -> Tensor:
        """One-hot state encoding for the MLP: (B, L) -> (B, L, P + H V + H + 1)."""
        B, L = input_ids.shape
        P, H, V = self.n_prompts, self.horizon, self.n_tokens
        feats = torch.zeros(B, L, P + H * V + H + 1, device=input_ids.device)
        feats[:, :, :P] = nn.functional.one_hot(input_ids[:, 0] - V, P).float()[:, None]
        onehot = nn.functional.one_hot(input_ids[:, 1:], V).float()  # (B, L-1, V)
        for t in range(L):
            if t > 0:
                feats[:, t, P : P + t * V] = onehot[:, :t].reshape(B, t * V)
            feats[:, t, P + H * V + t] = 1.0
        return feats

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        if self.kind == "tabular":
            idx = self.state_ids(input_ids)
            return self.logits_table[idx], self.value_table[idx]
        feats = self.features(input_ids)
        return self.actor(feats), self.critic(feats).squeeze(-1)
