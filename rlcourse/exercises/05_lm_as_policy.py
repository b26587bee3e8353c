"""Exercises of chapter 5, "The language model as a policy".

Log-probabilities follow the shift convention of :mod:`rlcourse.models`: ``logits[:, t]`` is the
distribution of the next token ``input_ids[:, t+1]``.
"""

from __future__ import annotations

import numpy as np
import torch

from rlcourse.exercises import Case, Exercise, register

CHAPTER = "05_lm_as_policy"


def _t(x, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# ---- per-token log-probabilities ----------------------------------------------------------------
def _token_logprobs(logits, input_ids):
    logp = torch.log_softmax(logits[:, :-1], -1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _tlp_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((_t([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]]), torch.tensor([[1, 0, 0]])),
                  label="hand example: [log .5, log(e^2 / (e^2 + 1))]")]
    for B, L, V in ((2, 4, 5), (3, 6, 7)):
        cases.append(Case((_t(rng.normal(size=(B, L, V)) * 2),
                           torch.as_tensor(rng.integers(0, V, size=(B, L)))),
                          label=f"{B} sequences of {L} tokens, vocabulary {V}"))
    return cases


def _tlp_no_shift(logits, input_ids):
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, input_ids[:, :, None]).squeeze(-1)[:, 1:]


def _tlp_wrong_shift(logits, input_ids):
    logp = torch.log_softmax(logits[:, 1:], -1)
    return logp.gather(-1, input_ids[:, :-1, None]).squeeze(-1)


def _tlp_probs(logits, input_ids):
    p = torch.softmax(logits[:, :-1], -1)
    return p.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


register(Exercise(
    name="token_logprobs",
    chapter=CHAPTER,
    reference=_token_logprobs,
    cases=_tlp_cases,
    hint="log_softmax(logits[:, :-1]) gathered at input_ids[:, 1:]: position t predicts t+1.",
    wrong_answers=[
        (_tlp_no_shift, "no shift: logits[:, t] scores the NEXT token, not token t"),
        (_tlp_wrong_shift, "shifted the wrong way"),
        (_tlp_probs, "probabilities instead of log-probabilities"),
    ],
))


# ---- log pi(y | x) of a response ----------------------------------------------------------------
def _response_logprob(logits, input_ids, completion_mask):
    lp = _token_logprobs(logits, input_ids)
    return (lp * completion_mask[:, 1:]).sum(-1)


def _rlp_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for B, L, V in ((2, 5, 4), (3, 7, 6)):
        mask = np.zeros((B, L), dtype=np.int64)
        for b in range(B):
            start = int(rng.integers(1, L - 1))
            end = int(rng.integers(start + 1, L + 1))
            mask[b, start:end] = 1  # the prompt before, padding after
        cases.append(Case((_t(rng.normal(size=(B, L, V))),
                           torch.as_tensor(rng.integers(0, V, size=(B, L))),
                           torch.as_tensor(mask)), label=f"{B} prompt+response sequences"))
    return cases


def _rlp_all(logits, input_ids, completion_mask):
    return _token_logprobs(logits, input_ids).sum(-1)


def _rlp_unshifted_mask(logits, input_ids, completion_mask):
    return (_token_logprobs(logits, input_ids) * completion_mask[:, :-1]).sum(-1)


def _rlp_mean(logits, input_ids, completion_mask):
    m = completion_mask[:, 1:]
    return (_token_logprobs(logits, input_ids) * m).sum(-1) / m.sum(-1)


register(Exercise(
    name="response_logprob",
    chapter=CHAPTER,
    reference=_response_logprob,
    cases=_rlp_cases,
    hint="log pi(y|x) = sum over response tokens of log pi(a_t|s_t): the token log-probs times "
         "completion_mask[:, 1:] (the mask of the predicted tokens), summed per sequence.",
    wrong_answers=[
        (_rlp_all, "summed over the prompt and padding too"),
        (_rlp_unshifted_mask, "mask not shifted: use completion_mask[:, 1:]"),
        (_rlp_mean, "mean instead of sum (that is SimPO's length-normalised score)"),
    ],
))


# ---- exact value of the root by a backward sweep ------------------------------------------------
def _root_value(leaf_rewards, probs, gamma):
    V = probs[0].shape[-1]
    q = leaf_rewards.reshape(-1, V)
    for k in range(len(probs) - 1, -1, -1):
        v = (probs[k] * q).sum(-1)
        if k > 0:
            q = gamma * v.reshape(-1, V)
    return float(v[0])


def _root_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for V, H, gamma in ((2, 2, 1.0), (3, 3, 0.9), (2, 4, 0.5)):
        probs = [_t(rng.dirichlet(np.ones(V), size=V**k)) for k in range(H)]
        cases.append(Case((_t(rng.normal(size=V**H)), probs, gamma),
                          label=f"{V} tokens, horizon {H}, gamma {gamma}"))
    return cases


def _root_max(leaf_rewards, probs, gamma):
    V = probs[0].shape[-1]
    q = leaf_rewards.reshape(-1, V)
    for k in range(len(probs) - 1, -1, -1):
        v = q.max(-1).values
        if k > 0:
            q = gamma * v.reshape(-1, V)
    return float(v[0])


def _root_no_gamma(leaf_rewards, probs, gamma):
    return _root_value(leaf_rewards, probs, 1.0)


def _root_uniform(leaf_rewards, probs, gamma):
    H = len(probs)
    return float(leaf_rewards.mean()) * gamma ** (H - 1)


register(Exercise(
    name="exact_root_value",
    chapter=CHAPTER,
    reference=_root_value,
    cases=_root_cases,
    hint="Start with q = leaf_rewards.reshape(-1, V) (level H-1); then repeatedly "
         "V_k = (probs[k] * q).sum(-1) and q = gamma * V_k.reshape(-1, V), down to level 0.",
    wrong_answers=[
        (_root_max, "max over tokens gives V*, not V_pi"),
        (_root_no_gamma, "forgot to discount between levels"),
        (_root_uniform, "averaged the leaves uniformly: weight each text by its probability"),
    ],
))
