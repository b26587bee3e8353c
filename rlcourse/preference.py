"""Preference optimisation without RL, on the shared training loop (layer 3).

One small function per method turns a batch into ``(loss, metrics)``; the shared loop in
:mod:`rlcourse.engine` does the rest (optimiser, accumulation, devices, checkpoints). The
recipe, :func:`train_preference`, reads top to bottom:

1. tokenise the data once (:func:`tokenize_pairs` or :func:`tokenize_unpaired`);
2. if the method needs a reference model (DPO, IPO, R-DPO, KTO, the hinge, robust DPO), compute
   the reference log-probs of every completion **once** (:func:`precompute_reference_logps`) and
   release the reference model, so that training holds one model, not two;
3. train with the method's ``loss_fn(model, batch)``: one forward over chosen and rejected
   stacked in the batch dimension, then a loss from :mod:`rlcourse.losses`;
4. report peak memory and tokens per second.

Data are lists of per-example dicts of tensors (as :mod:`rlcourse.data` tokenises them);
batches are what :func:`rlcourse.data.pad_collate` stacks (one common width, right padding).
The loss functions trim the padding common to a batch themselves.
"""

from __future__ import annotations

import copy
import gc
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlcourse.adapters import adapters_disabled, is_lora
from rlcourse.data import (
    DataError,
    Record,
    as_rows,
    pad_collate,
    pairs_to_unpaired,  # re-exported: its old home
    render_rows,
    split_padded,
    tokenize_preferences,
    tokenize_unpaired,
)
from rlcourse.engine import (
    Pooled,
    TrainConfig,
    count_tokens,
    dropout_disabled,
    loss_eval_fn,
    peak_memory,
    planned_indices,
    reset_peak_memory,
    train,
)
from rlcourse.losses import (
    DEFAULTS,
    OBJECTIVES,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    orpo_log_odds,
    orpo_loss,
    preference_metrics,
    rdpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from rlcourse.models import encode_prompt_completion, sequence_logprobs, shifted_mask

__all__ = [
    "LOSS_FNS",
    "PreferenceRun",
    "dpo_loss_fn",
    "ipo_loss_fn",
    "kto_loss_fn",
    "make_loss_fn",
    "orpo_loss_fn",
    "pairs_to_unpaired",
    "policy_logps",
    "precompute_reference_logps",
    "rdpo_loss_fn",
    "score_pairs",
    "simpo_loss_fn",
    "stack_pairs",
    "tokenize_pairs",
    "tokenize_kto",
    "has_reference",
    "kto_balanced_weight",
    "mismatched_partners",
    "n_tokens",
    "prepare_items",
    "train_preference",
]

LossFn = Callable[[Any, Mapping[str, Tensor]], tuple[Tensor, dict[str, float]]]


# --------------------------------------------------------------------------------------------
# Data: tokenised once, reference log-probs attached once
# --------------------------------------------------------------------------------------------


def tokenize_pairs(
    tokenizer: Any, records: Iterable[Any], max_length: int = 128, truncation: str = "error"
) -> list[dict[str, Tensor]]:
    """Tokenise ``{"prompt", "chosen", "rejected"}`` rows (``"reject"`` accepted too), once.

    Each completion becomes ``format_prompt(prompt) + completion + <eos>``
    (:func:`rlcourse.data.tokenize_preferences`; the prompt is masked out of the loss). Returns
    one dict per pair: ``chosen_input_ids``, ``chosen_attention_mask``,
    ``chosen_completion_mask`` and the same for ``rejected_`` (1-D, unpadded). Too-long rows
    raise with their ``file:line`` unless ``truncation`` is ``"left"`` or ``"right"``.
    """
    rows = as_rows(records, ("prompt", "chosen", "rejected"))
    if not rows:
        raise ValueError("no preference pairs given")
    return tokenize_preferences(tokenizer, rows, max_length, truncation=truncation)


def mismatched_partners(prompts: Sequence[str], seed: int = 0) -> list[int]:
    """For each example ``i`` the index ``j`` of another example whose prompt differs.

    Shuffle the examples once (seeded), then give each the completion of its predecessor in
    that order ("shift the completions by one"); if the predecessor shares the prompt (pairs
    split by :func:`pairs_to_unpaired` come in twos), look further back.
    """
    n = len(prompts)
    if n < 2:
        raise ValueError("KTO's reference point needs at least 2 examples")
    order = np.random.default_rng(seed).permutation(n)
    partners = [0] * n
    for k in range(n):
        i = int(order[k])
        for back in range(1, n):
            j = int(order[(k - back) % n])
            if prompts[j] != prompts[i]:
                break
        else:  # every example has the same prompt: mismatch the completion only
            j = int(order[(k - 1) % n])
        partners[i] = j
    return partners


def tokenize_kto(
    tokenizer: Any,
    records: Iterable[Any],
    max_length: int = 128,
    truncation: str = "error",
    seed: int = 0,
) -> list[dict[str, Tensor]]:
    """Tokenise ``{"prompt", "completion", "label"}`` rows for KTO (label: desirable or not).

    Besides ``input_ids``, ``attention_mask``, ``completion_mask`` and ``label``
    (:func:`rlcourse.data.tokenize_unpaired`), each example carries a *mismatched* pair,
    ``kl_input_ids``, ``kl_attention_mask``, ``kl_completion_mask``: its prompt with another
    example's completion (:func:`mismatched_partners`). Averaged over a batch, their log-ratio
    estimates KTO's reference point :math:`z_0 \\approx KL(\\pi_\\theta\\|\\pi_{ref})`. The
    partner is fixed here, so its reference log-prob is precomputed once with everything else;
    the average is taken over each training batch, as in TRL.
    """
    rows = as_rows(records, ("prompt", "completion", "label"))
    if not rows:
        raise ValueError("no examples given")
    for i, r in enumerate(rows):
        if not isinstance(r["label"], (bool, np.bool_)):
            where = r.where if isinstance(r, Record) else f"row {i}"
            raise DataError(f"{where}: field 'label' must be true or false, got {r['label']!r}")
    if len(rows) < 2:
        source = rows[0].source if isinstance(rows[0], Record) and rows[0].source else "data"
        raise DataError(f"{source}: KTO's reference point pairs each example with another "
                        "one's completion, so it needs at least 2 examples; got 1")
    items = tokenize_unpaired(tokenizer, rows, max_length, truncation=truncation)
    partners = mismatched_partners([r["prompt"] for r in rows], seed)
    prompts, completions, formatted = render_rows(tokenizer, rows, "completion")
    # A mismatched pair can be longer than either example; it only feeds an average, so it is
    # cut at the end rather than refused.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kl = encode_prompt_completion(
            tokenizer, prompts, [completions[j] for j in partners], max_length,
            truncation="right" if truncation == "error" else truncation, formatted=formatted,
        )
    for item, mismatched in zip(items, split_padded(kl, "kl_"), strict=True):
        item.update(mismatched)
    return items


def n_tokens(items: Sequence[Mapping[str, Tensor]]) -> int:
    """Real tokens the loss functions forward with gradient (chosen + rejected, or the KTO
    examples), summed over ``items``."""
    keys = ("chosen_attention_mask", "rejected_attention_mask", "attention_mask")
    return sum(count_tokens(it, keys) for it in items)


def has_reference(items: Sequence[Mapping[str, Tensor]]) -> bool:
    """True when the reference log-probs are attached to the items."""
    return bool(items) and ("reference_chosen_logps" in items[0] or "reference_logps" in items[0])


def _trim(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Drop the columns that are padding in every row (right padding): ``[B, L] -> [B, L']``."""
    attention = tensors[1]
    width = int(attention.sum(0).nonzero().max()) + 1 if attention.any() else 1
    return tuple(t[:, :width] for t in tensors)


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def stack_pairs(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``[chosen; rejected]`` stacked in the batch dimension: ``input_ids``, ``attention_mask``,
    ``completion_mask``, each ``[2B, L']`` (common padding trimmed). Rows ``:B`` are chosen."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]], dim=0)
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], dim=0)
    comp = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]], dim=0)
    return _trim(ids, att, comp)


def _lengths(completion_mask: Tensor) -> Tensor:
    """Completion tokens that are scored (``sequence_logprobs`` reads ``mask[:, 1:]``)."""
    return shifted_mask(completion_mask).sum(-1)


def policy_logps(model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Summed completion log-probs of chosen and rejected, from **one** forward pass.

    Returns ``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)``, each ``[B]``:
    :math:`\\log\\pi(y|x) = \\sum_t \\log\\pi(y_t|x, y_{<t})` over completion tokens, and
    :math:`|y|`. Methods that need the per-token mean divide by the length themselves.
    """
    device = _device_of(model)
    ids, att, comp = (t.to(device) for t in stack_pairs(batch))
    logps = sequence_logprobs(model, ids, att, comp, reduce="sum")  # [2B]
    lengths = _lengths(comp)
    b = ids.shape[0] // 2
    return logps[:b], logps[b:], lengths[:b], lengths[b:]


@torch.no_grad()
def precompute_reference_logps(
    reference_model: Any,
    items: Sequence[Mapping[str, Tensor]],
    batch_size: int = 64,
    pad_id: int = 0,
    progress: bool = False,
    indices: Sequence[int] | None = None,
) -> list[dict[str, Tensor]]:
    """Score every completion of ``items`` with the frozen reference model, once.

    Returns new items with ``reference_chosen_logps``/``reference_rejected_logps`` (pairs) or
    ``reference_logps``/``reference_kl_logps`` (KTO), 0-d float32 tensors: summed log-probs
    over completion tokens. After this the reference model can be deleted: training then holds
    a single model (DPO's memory is the policy alone, not policy plus reference). ``pad_id`` is
    only what padding positions hold; they are masked out. ``indices``: score only these items
    (those a short run will read, :func:`rlcourse.engine.planned_indices`); the others get NaN,
    so that using one by mistake stops training instead of training on a wrong reference.
    """
    items = list(items)
    if not items:
        return []
    if indices is not None:
        chosen = sorted(set(int(i) for i in indices))
        scored = precompute_reference_logps(reference_model, [items[i] for i in chosen],
                                            batch_size, pad_id, progress)
        out = [dict(it) for it in items]
        if scored:
            keys = [k for k in scored[0] if k.startswith("reference_")]
            nan = torch.tensor(float("nan"))
            for it in out:
                it.update({k: nan for k in keys})
            for i, it in zip(chosen, scored, strict=True):
                out[i] = it
        return out
    paired = "chosen_input_ids" in items[0]
    prefixes = ("chosen_", "rejected_") if paired else ("", "kl_")
    names = (
        ("reference_chosen_logps", "reference_rejected_logps")
        if paired
        else ("reference_logps", "reference_kl_logps")
    )
    was_training = reference_model.training
    reference_model.eval()
    device = _device_of(reference_model)
    scores: dict[str, list[Tensor]] = {p: [] for p in prefixes}
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", leave=False)
    try:
        for s in starts:
            chunk = items[s : s + batch_size]
            for p in prefixes:
                batch = pad_collate(
                    [{k: it[f"{p}{k}"] for k in _SEQ_KEYS} for it in chunk], pad_id=pad_id
                )
                lp = sequence_logprobs(
                    reference_model, *(batch[k].to(device) for k in _SEQ_KEYS), reduce="sum"
                )
                scores[p].append(lp.float().cpu())
    finally:
        reference_model.train(was_training)
    first, second = (torch.cat(scores[p]) for p in prefixes)
    return [
        {**it, names[0]: first[i], names[1]: second[i]} for i, it in enumerate(items)
    ]


_SEQ_KEYS = ("input_ids", "attention_mask", "completion_mask")


@torch.no_grad()
def score_pairs(
    model: Any, items: Sequence[Mapping[str, Tensor]], batch_size: int = 64, pad_id: int = 0
) -> dict[str, Tensor]:
    """Summed log-probs and lengths of every chosen and rejected completion under ``model``.

    Returns ``policy_chosen_logps``, ``policy_rejected_logps``, ``chosen_lengths``,
    ``rejected_lengths`` (``[N]``, CPU, float32), plus the reference log-probs when the items
    carry them. For analysis: implicit rewards, likelihood orderings, margins.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    try:
        for s in range(0, len(items), batch_size):
            batch = pad_collate(list(items[s : s + batch_size]), pad_id=pad_id)
            pc, pr, lc, lr = policy_logps(model, batch)
            cols = {"policy_chosen_logps": pc, "policy_rejected_logps": pr,
                    "chosen_lengths": lc, "rejected_lengths": lr}
            for key in ("reference_chosen_logps", "reference_rejected_logps"):
                if key in batch:
                    cols[key] = batch[key]
            for key, value in cols.items():
                parts.setdefault(key, []).append(value.float().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def _reference(batch: Mapping[str, Tensor], key: str, device: torch.device) -> Tensor:
    if key not in batch:
        raise KeyError(
            f"batch has no {key!r}: run precompute_reference_logps(reference_model, dataset) "
            "before training a method that needs a reference model"
        )
    ref = batch[key].to(device=device, dtype=torch.float32)
    if torch.isnan(ref).any():
        raise RuntimeError(
            f"{key} is NaN for an example of this batch: its reference log-prob was not computed "
            "(precompute_reference_logps(..., indices=...) skipped it)")
    return ref


# --------------------------------------------------------------------------------------------
# One loss function per method: (model, batch) -> (loss, metrics)
# --------------------------------------------------------------------------------------------


def dpo_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    beta: float = DEFAULTS["dpo"]["beta"],
    label_smoothing: float = DEFAULTS["dpo"]["label_smoothing"],
) -> tuple[Tensor, dict[str, float]]:
    """DPO on a paired batch: summed log-probs, precomputed reference, :func:`dpo_loss`."""
    pc, pr, _, _ = policy_logps(model, batch)
    rc = _reference(batch, "reference_chosen_logps", pc.device)
    rr = _reference(batch, "reference_rejected_logps", pc.device)
    loss = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing).mean()
    return loss, {"loss": loss.item(), **preference_metrics(pc, pr, rc, rr, scale=beta)}


def ipo_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    tau: float = DEFAULTS["ipo"]["tau"],
    length_normalize: bool = DEFAULTS["ipo"]["length_normalize"],
) -> tuple[Tensor, dict[str, float]]:
    """IPO on a paired batch; per-token averaged log-ratios unless ``length_normalize=False``."""
    pc, pr, lc, lr = policy_logps(model, batch)
    rc = _reference(batch, "reference_chosen_logps", pc.device)
    rr = _reference(batch, "reference_rejected_logps", pc.device)
    lengths = (lc, lr) if length_normalize else (None, None)
    loss = ipo_loss(pc, pr, rc, rr, tau=tau, chosen_lengths=lengths[0],
                    rejected_lengths=lengths[1]).mean()
    metrics = preference_metrics(pc, pr, rc, rr, scale=tau, chosen_lengths=lengths[0],
                                 rejected_lengths=lengths[1])
    return loss, {"loss": loss.item(), **metrics}


def rdpo_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    beta: float = DEFAULTS["rdpo"]["beta"],
    alpha: float = DEFAULTS["rdpo"]["alpha"],
) -> tuple[Tensor, dict[str, float]]:
    """R-DPO on a paired batch: DPO plus ``α(|y_w| − |y_l|)`` inside the sigmoid."""
    pc, pr, lc, lr = policy_logps(model, batch)
    rc = _reference(batch, "reference_chosen_logps", pc.device)
    rr = _reference(batch, "reference_rejected_logps", pc.device)
    loss = rdpo_loss(pc, pr, rc, rr, lc, lr, beta=beta, alpha=alpha).mean()
    return loss, {"loss": loss.item(), **preference_metrics(pc, pr, rc, rr, scale=beta)}


def _reference_pair_loss(model: Any, batch: Mapping[str, Tensor], loss: Any, scale: float,
                         **hyperparameters: Any) -> tuple[Tensor, dict[str, float]]:
    """A loss of the DPO family on a paired batch: the policy's summed log-probs, the
    precomputed reference's, ``loss(pc, pr, rc, rr, **hyperparameters).mean()`` and the DPO
    metrics with implicit rewards scaled by ``scale`` (what :func:`dpo_loss_fn` writes out, as
    chapter 9 shows it; a loss added to the table needs only this line)."""
    pc, pr, _, _ = policy_logps(model, batch)
    rc = _reference(batch, "reference_chosen_logps", pc.device)
    rr = _reference(batch, "reference_rejected_logps", pc.device)
    value = loss(pc, pr, rc, rr, **hyperparameters).mean()
    return value, {"loss": value.item(), **preference_metrics(pc, pr, rc, rr, scale=scale)}


def hinge_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    beta: float = DEFAULTS["hinge"]["beta"],
) -> tuple[Tensor, dict[str, float]]:
    """SLiC-HF's hinge on a paired batch (TRL's ``loss_type="hinge"``): :func:`hinge_loss`."""
    return _reference_pair_loss(model, batch, hinge_loss, beta, beta=beta)


def robust_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    beta: float = DEFAULTS["robust"]["beta"],
    label_smoothing: float = DEFAULTS["robust"]["label_smoothing"],
) -> tuple[Tensor, dict[str, float]]:
    """Robust DPO on a paired batch (TRL's ``loss_type="robust"``): :func:`robust_dpo_loss`."""
    return _reference_pair_loss(model, batch, robust_dpo_loss, beta, beta=beta,
                                label_smoothing=label_smoothing)


def _gathered(t: Tensor) -> Tensor:
    """``t`` of every process, concatenated (no gradient); ``t`` itself in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(int(x) for x in sizes))
    padded = torch.zeros(width, dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes, strict=True)])


def kto_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    beta: float = DEFAULTS["kto"]["beta"],
    desirable_weight: float = DEFAULTS["kto"]["desirable_weight"],
    undesirable_weight: float = DEFAULTS["kto"]["undesirable_weight"],
) -> tuple[Tensor, dict[str, float]]:
    """KTO on an unpaired batch.

    One forward (with gradient) over the batch's own completions; one forward without gradient
    over the mismatched pairs, whose mean log-ratio (clamped at 0) is the reference point
    :math:`z_0` (:func:`kto_reference_point`). Needs no pairs and no balance of labels.
    """
    device = _device_of(model)
    ids, att, comp = (t.to(device) for t in _trim(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"]))
    logps = sequence_logprobs(model, ids, att, comp, reduce="sum")
    with torch.no_grad():
        kl_ids, kl_att, kl_comp = (t.to(device) for t in _trim(
            batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"]))
        kl_logps = sequence_logprobs(model, kl_ids, kl_att, kl_comp, reduce="sum")
    ref = _reference(batch, "reference_logps", device)
    ref_kl = _reference(batch, "reference_kl_logps", device)
    z0 = kto_reference_point(_gathered(kl_logps), _gathered(ref_kl))
    desirable = batch["label"].to(device).bool()
    loss = kto_loss(logps, ref, desirable, z0, beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight).mean()
    rewards = beta * (logps.detach() - ref)
    metrics = {"loss": loss.item(), "kl": z0.item(),
               "desirable_fraction": desirable.float().mean().item()}
    # Only the labels present in this batch are logged (a batch may hold one kind only), as
    # means over the examples of that label, pooled over micro-batches and processes by count.
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        n = int(rows.sum())
        if n:
            metrics[f"rewards/{name}"] = Pooled(rewards[rows].mean().item(), n)
            metrics[f"logps/{name}"] = Pooled(logps.detach()[rows].mean().item(), n)
    return loss, metrics


def orpo_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    lam: float = DEFAULTS["orpo"]["lam"],
) -> tuple[Tensor, dict[str, float]]:
    """ORPO on a paired batch: per-token NLL of the chosen answer plus ``λ`` times the
    odds-ratio term; no reference model."""
    pc, pr, lc, lr = policy_logps(model, batch)
    loss = orpo_loss(pc, pr, lc, lr, lam=lam).mean()
    mean_c, mean_r = (pc / lc).detach(), (pr / lr).detach()
    log_odds_ratio = orpo_log_odds(mean_c) - orpo_log_odds(mean_r)
    metrics = preference_metrics(pc, pr, scale=lam, chosen_lengths=lc, rejected_lengths=lr)
    return loss, {
        "loss": loss.item(),
        "nll_loss": (-mean_c).mean().item(),
        "log_odds_ratio": log_odds_ratio.mean().item(),
        **metrics,
    }


def simpo_loss_fn(
    model: Any,
    batch: Mapping[str, Tensor],
    beta: float = DEFAULTS["simpo"]["beta"],
    gamma: float = DEFAULTS["simpo"]["gamma"],
    length_normalize: bool = DEFAULTS["simpo"]["length_normalize"],
) -> tuple[Tensor, dict[str, float]]:
    """SimPO on a paired batch: length-normalised log-probs, target margin ``γ``, no
    reference model (``length_normalize=False`` is the "w/o LN" ablation)."""
    pc, pr, lc, lr = policy_logps(model, batch)
    loss = simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma,
                      length_normalize=length_normalize).mean()
    lengths = (lc, lr) if length_normalize else (None, None)
    metrics = preference_metrics(pc, pr, scale=beta, chosen_lengths=lengths[0],
                                 rejected_lengths=lengths[1])
    return loss, {"loss": loss.item(), **metrics}


#: Method name -> its ``loss_fn(model, batch, **hyperparameters)``.
LOSS_FNS: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    "dpo": dpo_loss_fn,
    "ipo": ipo_loss_fn,
    "rdpo": rdpo_loss_fn,
    "kto": kto_loss_fn,
    "orpo": orpo_loss_fn,
    "simpo": simpo_loss_fn,
    "hinge": hinge_loss_fn,
    "robust": robust_loss_fn,
}


def make_loss_fn(method: str, **hyperparameters: Any) -> LossFn:
    """``loss_fn(model, batch)`` for ``method`` with its hyperparameters bound.

    Unknown hyperparameter names raise (a typo such as ``betta=0.5`` would otherwise be
    silently ignored and the default used).
    """
    method = method.lower()
    if method not in LOSS_FNS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(LOSS_FNS)}")
    fn = LOSS_FNS[method]
    allowed = set(inspect.signature(fn).parameters) - {"model", "batch"}
    unknown = set(hyperparameters) - allowed
    if unknown:
        raise TypeError(f"{method}: unknown hyperparameters {sorted(unknown)}; "
                        f"allowed: {sorted(allowed)}")
    return partial(fn, **hyperparameters)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


@dataclass
class PreferenceRun:
    """What :func:`train_preference` returns: the engine's history and the run's costs."""

    method: str
    hyperparameters: dict[str, Any]
    history: Any
    items: list[dict[str, Tensor]]
    reference_seconds: float = 0.0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary of the run's costs."""
        return {
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "reference_seconds": round(self.reference_seconds, 3),
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "peak_memory_mib": round(self.peak_memory_bytes / 2**20, 1),
            "memory_kind": self.memory_kind,
        }


def prepare_items(
    method: str, data: Any, tokenizer: Any, max_length: int = 128, seed: int = 0,
    truncation: str = "error",
) -> list[dict[str, Tensor]]:
    """Tokenise ``data`` in the format ``method`` reads; pairs are split in two for KTO.
    Already tokenised items (dicts holding ``input_ids``) pass through."""
    rows = list(data)
    if not rows:
        raise ValueError("no training data")
    first = rows[0]
    if isinstance(first, Mapping) and any(torch.is_tensor(v) for v in first.values()):
        return rows
    if OBJECTIVES[method].data_format == "unpaired":
        is_pair = isinstance(first, Mapping) and ("chosen" in first)
        if is_pair:
            rows = pairs_to_unpaired(rows)
        return tokenize_kto(tokenizer, rows, max_length, truncation=truncation, seed=seed)
    return tokenize_pairs(tokenizer, rows, max_length, truncation=truncation)


def train_preference(
    method: str,
    model: Any,
    data: Any,
    config: Any,
    *,
    tokenizer: Any = None,
    reference_model: Any = None,
    max_length: int = 128,
    truncation: str = "error",
    seed: int = 0,
    reference_batch_size: int = 64,
    engine_kwargs: dict[str, Any] | None = None,
    disable_dropout: bool = True,
    eval_data: Any = None,
    **hyperparameters: Any,
) -> PreferenceRun:
    """Train ``model`` in place with preference method ``method`` on ``data``.

    ``data``: rows ``{"prompt", "chosen", "rejected"}`` (for KTO also
    ``{"prompt", "completion", "label"}``; pairs are split) with ``tokenizer``, or items already
    tokenised (:func:`prepare_items`, which passes them through: rows are tokenised once, here
    or by the caller). ``max_length``/``truncation``: how rows are tokenised; an over-long row
    raises unless ``truncation`` is ``"left"`` or ``"right"``. ``config``: an
    :class:`rlcourse.engine.TrainConfig`. ``hyperparameters``: the loss function's
    (``beta=0.5``, ``lam=0.1``, ...).

    Methods with a reference model use ``reference_model`` or, by default, a frozen copy of
    ``model`` as it is now (the SFT model); its log-probs are computed once and the copy is
    released before the first step.

    ``disable_dropout`` (default, as TRL): the policy trains with its dropout off
    (:func:`rlcourse.engine.dropout_disabled`), so that it is scored the way the reference was
    (in eval mode) and the first DPO loss is exactly ``ln 2``; ``False`` keeps the dropout.

    ``eval_data`` (rows or items, like ``data``): every ``config.eval_every`` steps and at the
    end, the method's loss and metrics on it join the history as ``eval_loss``,
    ``eval_rewards/accuracies``, ... (:func:`rlcourse.engine.loss_eval_fn`; its reference
    log-probs come from the same reference, computed once with the training data's).
    """
    method = method.lower()
    objective = OBJECTIVES[method]
    loss_fn = make_loss_fn(method, **hyperparameters)
    pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id

    # 1. Tokenise once.
    items = prepare_items(method, data, tokenizer, max_length=max_length, seed=seed,
                          truncation=truncation)
    eval_items = None if eval_data is None else prepare_items(
        method, eval_data, tokenizer, max_length=max_length, seed=seed, truncation=truncation)

    # 2. Reference log-probs once, of the examples training will read, then release the
    #    reference model. Under LoRA the reference is the policy with its adapters switched off.
    reference_seconds = 0.0
    if objective.needs_reference and not has_reference(items):
        start = time.perf_counter()
        indices = _planned(len(items), config)
        if reference_model is None and is_lora(model):
            with adapters_disabled(model):
                items = precompute_reference_logps(model, items, reference_batch_size, pad_id,
                                                   indices=indices)
                if eval_items is not None and not has_reference(eval_items):
                    eval_items = precompute_reference_logps(model, eval_items,
                                                            reference_batch_size, pad_id)
        else:
            reference = reference_model if reference_model is not None else copy.deepcopy(model)
            items = precompute_reference_logps(reference, items, reference_batch_size, pad_id,
                                               indices=indices)
            if eval_items is not None and not has_reference(eval_items):
                eval_items = precompute_reference_logps(reference, eval_items,
                                                        reference_batch_size, pad_id)
            del reference
        reference_model = None
        gc.collect()
        reference_seconds = time.perf_counter() - start
    if objective.data_format == "unpaired" and "desirable_weight" in objective.hyperparameters:
        weights = {**objective.hyperparameters, **hyperparameters}  # KTO's class weights
        _warn_kto_balance(items, weights["desirable_weight"], weights["undesirable_weight"])

    # 3. Train on the shared loop.
    reset_peak_memory(_device_of(model))
    start = time.perf_counter()
    engine_kwargs = dict(engine_kwargs or {})
    if eval_items is not None:
        engine_kwargs["eval_fn"] = loss_eval_fn(loss_fn, eval_items,
                                                getattr(config, "batch_size", 8))
    with dropout_disabled(model, disable_dropout):
        history = train(model, loss_fn, items, config, **engine_kwargs)
    train_seconds = time.perf_counter() - start

    # 4. Costs: the engine's throughput (non-padding tokens of the batches it trained on, all
    #    processes, over the wall time of the training steps alone), peak memory.
    totals = history.totals
    tokens_per_second = (totals["tokens"] / totals["step_seconds"]
                         if totals.get("step_seconds") else math.nan)
    peak, kind = peak_memory(_device_of(model))
    defaults = {k: p.default for k, p in inspect.signature(LOSS_FNS[method]).parameters.items()
                if k not in ("model", "batch")}
    return PreferenceRun(
        method=method,
        hyperparameters={**defaults, **hyperparameters},
        history=history,
        items=items,
        reference_seconds=reference_seconds,
        train_seconds=train_seconds,
        tokens_per_second=tokens_per_second,
        peak_memory_bytes=peak,
        memory_kind=kind,
    )


def _planned(n: int, config: Any) -> list[int] | None:
    """The indices training will read (all of them when that cannot be known)."""
    if not isinstance(config, TrainConfig):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        processes = torch.distributed.get_world_size()
    else:  # torchrun and accelerate launch set it before the process group exists
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    return planned_indices(n, config, processes)


def kto_balanced_weight(n_desirable: int, n_undesirable: int, target: float = 1.0) -> float:
    """The ``desirable_weight`` (with ``undesirable_weight = 1``) that makes
    ``λ_D n_D / (λ_U n_U) = target``; the KTO paper advises a ratio in ``[1, 4/3]``."""
    return target * n_undesirable / n_desirable


def _warn_kto_balance(items: Sequence[Mapping[str, Tensor]], desirable_weight: float,
                      undesirable_weight: float) -> None:
    """Warn when ``λ_D n_D / (λ_U n_U)`` is outside ``[1, 4/3]`` (the KTO paper's advice)."""
    n_d = sum(int(it["label"]) for it in items)
    n_u = len(items) - n_d
    if n_u == 0 or n_d == 0:
        return
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if not 1.0 - 1e-9 <= ratio <= 4.0 / 3.0 + 1e-9:
        warnings.warn(
            f"KTO: λ_D·n_D / (λ_U·n_U) = {ratio:.2f} is outside [1, 4/3] "
            f"({n_d} desirable, {n_u} undesirable examples); consider desirable_weight="
            f"{kto_balanced_weight(n_d, n_u) * undesirable_weight:.2f}",
            stacklevel=3,
        )
