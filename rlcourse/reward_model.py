"""Reward models (layer 3): Bradley–Terry training on preference pairs, and how good they are.

A reward model maps a prompt and a response to one number, ``r(x, y)``, read at the last real
token of the sequence (:class:`rlcourse.models.RewardModel`). It is trained on pairs
``(x, y_w, y_l)`` in which people preferred ``y_w``, with the Bradley–Terry likelihood

    P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)),   L = -log sigma(r_w - r_l)

(:func:`rlcourse.losses.bradley_terry_loss`). Training runs on the shared engine
(:func:`rlcourse.engine.train`) with :func:`reward_loss_fn`; evaluation compares the model's
ordering with the labels and with the hidden *true* ordering of the assistant world, and its
scores with the true scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlcourse.data import tokenize_preferences
from rlcourse.engine import dropout_disabled, train
from rlcourse.losses import bradley_terry_loss
from rlcourse.models import RewardModel, encode_prompt_completion, max_positions

__all__ = [
    "RewardEvaluation",
    "pair_accuracy",
    "pearson",
    "reward_loss_fn",
    "score_texts",
    "spearman",
    "split_pairs_by_prompt",
    "train_reward_model",
]


def reward_loss_fn(model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The engine's loss for a reward model: mean Bradley–Terry loss over the pairs of a batch.

    ``L = mean_i -log sigma(r(x_i, y_w,i) - r(x_i, y_l,i))``. Chosen and rejected sequences go
    through the model in ONE forward pass (stacked along the batch; ``pad_collate`` pads both to
    the same width), and each reward is read at the last real token. Metrics: ``accuracy``
    (share of pairs with ``r_w > r_l``), ``margin`` (mean ``r_w - r_l``), mean rewards.
    """
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    rewards = model(ids, mask).float()
    n = batch["chosen_input_ids"].shape[0]
    r_w, r_l = rewards[:n], rewards[n:]
    loss = bradley_terry_loss(r_w, r_l).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (r_w > r_l).float().mean(),
            "margin": (r_w - r_l).mean(),
            "reward_chosen": r_w.mean(),
            "reward_rejected": r_l.mean(),
        }
    return loss, metrics


@torch.no_grad()
def score_texts(reward_model: Any, tokenizer: Any, prompts: Sequence[str],
                responses: Sequence[str], batch_size: int = 256, max_length: int | None = None
                ) -> Tensor:
    """``r(x, y)`` for every (prompt, response): formatted and tokenised exactly as in training
    (:func:`rlcourse.models.encode_prompt_completion`, response + EOS), in batches. (N,) float.
    ``tokenizer`` is the reward model's own. Texts longer than ``max_length`` tokens (default:
    the reward model's positions, ``max_position_embeddings``; 1024 if it names none) are cut
    at the end, with a counted warning."""
    if max_length is None:
        max_length = max_positions(getattr(reward_model, "model", reward_model)) or 1024
    was = reward_model.training
    reward_model.eval()
    device = next(reward_model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = encode_prompt_completion(tokenizer, list(prompts[s:s + batch_size]),
                                       list(responses[s:s + batch_size]), max_length,
                                       truncation="right")
        out.append(reward_model(enc["input_ids"].to(device),
                                enc["attention_mask"].to(device)).float().cpu())
    reward_model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def pair_accuracy(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray,
                  true_first: Sequence[float] | np.ndarray | None = None,
                  true_second: Sequence[float] | np.ndarray | None = None) -> float:
    """How often a model orders pairs like the reference does.

    Without true scores: the share of pairs with ``first > second`` (first = chosen, so this is
    the accuracy against the labels). With true scores: among pairs whose true scores differ,
    the share the model orders the same way as the truth, ``mean[sign(r_1 - r_2) =
    sign(s_1 - s_2)]`` (a model tie counts half).
    """
    d = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    if true_first is None or true_second is None:
        return float(np.mean((d > 0) + 0.5 * (d == 0))) if len(d) else float("nan")
    t = np.asarray(true_first, dtype=float) - np.asarray(true_second, dtype=float)
    keep = np.abs(t) > 1e-9
    if not keep.any():
        return float("nan")
    d, t = d[keep], t[keep]
    return float(np.mean((np.sign(d) == np.sign(t)) + 0.5 * (d == 0)))


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation ``cov(x, y) / (sd(x) sd(y))`` (NaN if either is constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (ties averaged)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return pearson(_ranks(x), _ranks(y))


def split_pairs_by_prompt(pairs: Sequence[Mapping[str, Any]], held_out: float = 0.1,
                          seed: int = 0) -> tuple[list, list]:
    """Split preference pairs into training and held-out sets with disjoint prompts."""
    prompts = sorted({p["prompt"] for p in pairs})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(prompts), size=max(1, int(round(held_out * len(prompts)))),
                            replace=False).tolist())
    test_prompts = {prompts[i] for i in chosen}
    train = [p for p in pairs if p["prompt"] not in test_prompts]
    test = [p for p in pairs if p["prompt"] in test_prompts]
    return train, test


@dataclass
class RewardEvaluation:
    """A reward model on held-out pairs, against the labels and against the true score."""

    accuracy_vs_labels: float
    accuracy_vs_truth: float
    label_accuracy_vs_truth: float
    pearson_vs_truth: float
    spearman_vs_truth: float
    n_pairs: int
    rm_chosen: np.ndarray
    rm_rejected: np.ndarray
    true_chosen: np.ndarray
    true_rejected: np.ndarray

    def summary(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, np.ndarray)}

    @classmethod
    def of(cls, reward_model: Any, tokenizer: Any, pairs: Sequence[Mapping[str, Any]],
           true_score: Callable[[str, str], float], max_length: int = 128
           ) -> RewardEvaluation:
        """Score both sides of every pair with the model and with ``true_score(prompt, text)``.

        ``label_accuracy_vs_truth`` is how often the labels themselves agree with the truth:
        the ceiling a reward model that imitates the annotator would reach.
        """
        prompts = [p["prompt"] for p in pairs]
        rc = score_texts(reward_model, tokenizer, prompts, [p["chosen"] for p in pairs],
                         max_length=max_length).numpy()
        rr = score_texts(reward_model, tokenizer, prompts, [p["rejected"] for p in pairs],
                         max_length=max_length).numpy()
        tc = np.array([true_score(p["prompt"], p["chosen"]) for p in pairs])
        tr = np.array([true_score(p["prompt"], p["rejected"]) for p in pairs])
        both_rm, both_true = np.concatenate([rc, rr]), np.concatenate([tc, tr])
        return cls(
            accuracy_vs_labels=pair_accuracy(rc, rr),
            accuracy_vs_truth=pair_accuracy(rc, rr, tc, tr),
            label_accuracy_vs_truth=pair_accuracy(np.ones(len(tc)), np.zeros(len(tc)), tc, tr),
            pearson_vs_truth=pearson(both_rm, both_true),
            spearman_vs_truth=spearman(both_rm, both_true),
            n_pairs=len(pairs),
            rm_chosen=rc, rm_rejected=rr, true_chosen=tc, true_rejected=tr,
        )


def train_reward_model(backbone: Any, tokenizer: Any, pairs: Sequence[Mapping[str, Any]],
                       config: Any, max_length: int = 128, seed: int = 0,
                       eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
                       disable_dropout: bool = True, truncation: str = "right"
                       ) -> tuple[Any, Any]:
    """Bradley–Terry reward model on preference ``pairs`` with the shared engine.

    ``backbone``: a causal LM to start from (usually a copy of the SFT model: it already reads
    the language; InstructGPT starts its reward model from the SFT model too); a fresh scalar
    head is put on top (:class:`rlcourse.models.RewardModel`). ``config``: an
    :class:`rlcourse.engine.TrainConfig`. Returns ``(reward_model, history)``. Dropout is off
    while training unless ``disable_dropout=False`` (as TRL's ``RewardConfig``). Pairs longer
    than ``max_length`` are cut as ``truncation`` says (``"right"``: the answers' ends;
    ``"left"``; ``"error"`` refuses them); pairs the cut makes identical are dropped
    (:func:`rlcourse.data.tokenize_preferences`).
    """
    rm = RewardModel(backbone, seed=seed)
    data = tokenize_preferences(tokenizer, pairs, max_length, truncation=truncation)
    with dropout_disabled(rm, disable_dropout):
        history = train(rm, reward_loss_fn, data, config, eval_fn=eval_fn)
    rm.eval()
    return rm, history
