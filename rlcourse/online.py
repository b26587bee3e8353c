r"""Learning from the policy's own samples (layer 3): online DPO, rejection sampling, GRPO/RLOO.

The offline methods of Part III learn from a fixed set of pairs sampled once from the SFT model.
As the policy moves, those pairs describe answers it no longer gives. The methods here sample
from the **current** policy, label or score what it says, and learn from that:

- **online (iterative) DPO**: rounds of (sample two answers per prompt from the current policy,
  have a labeller pick one, one DPO epoch on the new pairs); :func:`online_dpo`;
- **rejection-sampling fine-tuning** (best-of-n, then SFT on the winners; Llama 2's "rejection
  sampling", RAFT, ReST): :func:`best_of_n`, :func:`rejection_sampling_ft`;
- **GRPO and RLOO** on a language model with a reward model as reward: the one group loop,
  :func:`rlcourse.grpo.train_group_lm`, with :func:`reward_model_scorer` as its ``reward_fn``.

Every function learns only from what it is given: a ``label_fn(prompts, a, b)`` (a simulated
annotator, a reward model) or a ``reward_fn(prompts, texts)``. This module imports no world and
no judge; the true score of the assistant world is for evaluation only.

Over-optimisation in miniature (Gao, Schulman and Hilton, 2022): :func:`best_of_n_kl`,
:func:`best_of_n_expectation`, :func:`fit_bon`, :func:`fit_rl` give the KL of best-of-n, unbiased
best-of-n estimates from N >= n samples, and the paper's two functional forms.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rlcourse.adapters import is_lora
from rlcourse.config import (
    COUNT,
    COUNT_OR_ZERO,
    DEVICE,
    OPTIONAL_COUNT,
    POSITIVE,
    REPORT_TO,
    FieldRangeError,
    check_ranges,
)
from rlcourse.data import completion_for, pad_collate, prompt_text, tokenize_sft
from rlcourse.engine import TrainConfig, sft_loss_fn, train
from rlcourse.guards import checked_labels, checked_rewards
from rlcourse.losses import OBJECTIVES
from rlcourse.models import generate
from rlcourse.preference import train_preference
from rlcourse.reward_model import score_texts

__all__ = [
    "BestOfN",
    "OnlineDPOConfig",
    "RSFTConfig",
    "best_of_n",
    "best_of_n_expectation",
    "best_of_n_kl",
    "fit_bon",
    "fit_rl",
    "gathered",
    "label_pairs",
    "labeller",
    "online_dpo",
    "peak_bon",
    "peak_rl",
    "process_share",
    "rejection_sampling_ft",
    "reward_labeller",
    "reward_model_scorer",
    "sample_pairs",
]

#: ``label_fn(prompts, a, b) -> [True if a is preferred, False if b, None to skip]``
LabelFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list]
#: ``reward_fn(prompts, texts) -> scores`` (N,) float
TextRewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


# --------------------------------------------------------------------------------------------
# Labellers and scorers: what the methods may learn from
# --------------------------------------------------------------------------------------------


def labeller(annotator: Any, seed: int = 0) -> LabelFn:
    """A ``label_fn`` from anything with ``label(prompt, a, b, rng) -> bool | None`` (e.g. the
    assistant world's simulated :class:`~rlcourse.worlds.assistant.Annotator`), drawing its
    noise from one ``numpy`` generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)

    def label_fn(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list:
        return [annotator.label(p, x, y, rng) for p, x, y in zip(prompts, a, b, strict=True)]

    return label_fn


def reward_model_scorer(reward_model: nn.Module, tokenizer: Any, batch_size: int = 256
                        ) -> TextRewardFn:
    """``reward_fn(prompts, texts)``: a reward model's scalar r(x, y) for each text, tokenised
    as in its training (:func:`rlcourse.reward_model.score_texts`)."""
    def reward_fn(prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        return score_texts(reward_model, tokenizer, prompts, texts, batch_size).double().numpy()

    return reward_fn


def reward_labeller(reward_fn: TextRewardFn) -> LabelFn:
    """A ``label_fn`` that prefers the higher reward, r(x, a) > r(x, b); equal rewards -> None.
    (A reward model as annotator, as in RLAIF or online DPO with a reward model.)"""

    def label_fn(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list:
        # NaN, None or a string would win or lose every comparison arbitrarily: refused.
        texts = [prompt_text(p) for p in prompts]  # conversations as their messages' text
        ra = checked_rewards(reward_fn(texts, a), len(prompts), reward_fn, a, torch.float64)
        rb = checked_rewards(reward_fn(texts, b), len(prompts), reward_fn, b, torch.float64)
        return [None if x == y else bool(x > y)
                for x, y in zip(ra.tolist(), rb.tolist(), strict=True)]

    return label_fn


# --------------------------------------------------------------------------------------------
# Online DPO
# --------------------------------------------------------------------------------------------


def sample_pairs(model: nn.Module, tokenizer: Any, prompts: Sequence[str], seed: int,
                 max_new_tokens: int = 48, temperature: float = 1.0) -> tuple[list, list]:
    """Two independent answers per prompt from ``model``: ``(answers_a, answers_b)``.

    Under several processes each samples its share of the prompts (rows ``lo..hi`` drawn as
    one process would draw them: :func:`rlcourse.models.generate`'s ``first_row``) and every
    process gets all the answers back, in order: the same answers as one process."""
    prompts = list(prompts)
    lo, hi = process_share(len(prompts))
    a = generate(model, tokenizer, prompts[lo:hi], max_new_tokens=max_new_tokens,
                 temperature=temperature, seed=seed, first_row=lo).texts
    b = generate(model, tokenizer, prompts[lo:hi], max_new_tokens=max_new_tokens,
                 temperature=temperature, seed=seed + 1, first_row=lo).texts
    return gathered(list(a)), gathered(list(b))


def process_share(n: int) -> tuple[int, int]:
    """This process's rows ``[lo, hi)`` of ``n``: contiguous, in rank order, sizes differing by
    at most one (``(0, n)`` in a single process)."""
    from accelerate import PartialState

    state = PartialState()
    world, rank = state.num_processes, state.process_index
    return n * rank // world, n * (rank + 1) // world


def gathered(values: list) -> list:
    """Every process's ``values`` concatenated in rank order, on every process (the list itself
    in a single process)."""
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return values
    from accelerate.utils import gather_object

    return list(gather_object(values))


def label_pairs(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], label_fn: LabelFn
                ) -> list[dict]:
    """Records ``{"prompt", "chosen", "rejected"}`` from ``label_fn``'s verdicts.

    Pairs of identical answers carry no preference and are not shown to the labeller; pairs with
    an empty answer are dropped (the data format needs text); verdicts ``None`` (a skipped tie)
    are dropped."""
    keep = [i for i in range(len(prompts)) if a[i] != b[i] and a[i].strip() and b[i].strip()]
    if not keep:
        return []
    ps, xs, ys = ([s[i] for i in keep] for s in (prompts, a, b))
    verdicts = checked_labels(label_fn(ps, xs, ys), len(ps), label_fn)
    return [{"prompt": p, "chosen": completion_for(p, x if v else y),
             "rejected": completion_for(p, y if v else x)}
            for p, x, y, v in zip(ps, xs, ys, verdicts, strict=True) if v is not None]


@dataclass
class OnlineDPOConfig:
    """Hyperparameters of :func:`online_dpo`.

    ``rounds`` of: ``prompts_per_round`` prompts (all when ``None``), ``pairs_per_prompt``
    independent pairs of answers each from the current policy, labels, then ``epochs`` DPO
    epochs on the new pairs at ``lr`` (constant, batch ``batch_size``). ``reference``:
    ``"sft"`` (the starting model, fixed: every round optimises the same KL-regularised
    objective) or ``"previous"`` (the policy at the start of the round: each round is a step of
    bounded size from where the policy is, and the KL to the starting model can grow with the
    rounds).
    """

    rounds: int = 8
    """Rounds of sample, label, train."""
    prompts_per_round: int | None = None
    """Prompts drawn (without replacement) each round; ``None``: all of them."""
    pairs_per_prompt: int = 1
    """Independent answer pairs sampled for each prompt per round."""
    beta: float = 0.5
    """β of the DPO loss (strength of the implicit KL to the reference)."""
    lr: float = 5e-4
    """Learning rate (constant) of each round's training."""
    epochs: float = 1.0
    """Passes over each round's new pairs."""
    batch_size: int = 32
    """Pairs per optimizer step, over all processes (each takes an equal share)."""
    reference: str = "sft"
    """``"sft"`` (the starting model, fixed) or ``"previous"`` (the policy at the start of each
    round)."""
    max_new_tokens: int = 48
    """Longest answer sampled, in tokens."""
    max_length: int = 128
    """Longest prompt + answer in tokens for training."""
    loss: str = "dpo"
    """Paired preference loss trained each round: any paired row of
    :data:`rlcourse.losses.OBJECTIVES` (``"dpo"``, ``"ipo"``, ``"rdpo"``, ``"orpo"``,
    ``"simpo"``, ...); ``beta`` goes to the losses that take it."""
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    """The loss's other hyperparameters (IPO's ``tau``, ORPO's ``lam``, SimPO's ``gamma``, ...);
    missing ones take :data:`rlcourse.losses.DEFAULTS`."""
    device: str = "cpu"
    """Device of sampling and training (``"cpu"``, ``"cuda"``, ``"auto"``)."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints inside a round (under ``round_checkpoints``, see
    :func:`online_dpo`); 0: none inside a round (a recipe still saves one per finished round)."""
    report_to: str = "none"
    """``"none"`` or ``"tensorboard"``: in a recipe, each round's row also as TensorBoard
    scalars in ``OUTPUT/tensorboard``."""

    #: Each field's range, checked when the config is built (a recipe names file and line).
    RANGES: ClassVar[dict[str, tuple[Any, str]]] = {
        "rounds": COUNT,
        "checkpoint_every": COUNT_OR_ZERO,
        "report_to": REPORT_TO,
        "prompts_per_round": OPTIONAL_COUNT,
        "pairs_per_prompt": COUNT,
        "beta": POSITIVE,
        "lr": POSITIVE,
        "epochs": POSITIVE,
        "batch_size": COUNT,
        "reference": (lambda v: v in ("sft", "previous"), "one of sft, previous"),
        "max_new_tokens": COUNT,
        "max_length": (lambda v: COUNT[0](v) and v >= 2, "an integer >= 2"),
        "device": DEVICE,
        "loss": (lambda v: v in PAIRED_LOSSES,
                 "a paired preference loss of rlcourse.losses.OBJECTIVES"),
    }

    def __post_init__(self) -> None:
        check_ranges(self)
        known = set(OBJECTIVES[self.loss].hyperparameters) - {"beta"}
        unknown = sorted(set(self.loss_kwargs) - known)
        if unknown:
            raise FieldRangeError("loss_kwargs", self.loss_kwargs,
                                  f"keys of {self.loss}'s hyperparameters "
                                  f"({', '.join(sorted(known)) or 'none but beta'}); "
                                  f"unknown: {', '.join(unknown)}")

    def loss_hyperparameters(self) -> dict[str, Any]:
        """The keyword arguments of the round's loss: ``beta`` if the loss takes it, then
        ``loss_kwargs``."""
        takes_beta = "beta" in OBJECTIVES[self.loss].hyperparameters
        return {**({"beta": self.beta} if takes_beta else {}), **self.loss_kwargs}


def _paired_losses() -> tuple[str, ...]:
    """Policy losses on (prompt, chosen, rejected): the paired rows of OBJECTIVES, not the
    reward model's Bradley-Terry loss."""
    return tuple(name for name, o in OBJECTIVES.items()
                 if o.data_format == "paired" and name != "bt")


#: Losses :func:`online_dpo` can train each round (read when a config is checked, so a loss
#: registered in :data:`rlcourse.losses.OBJECTIVES` later is accepted too).
class _PairedLosses:
    def __contains__(self, name: object) -> bool:
        return name in _paired_losses()


PAIRED_LOSSES = _PairedLosses()


def online_dpo(model: nn.Module, tokenizer: Any, prompts: Sequence[str], label_fn: LabelFn,
               config: OnlineDPOConfig, seed: int = 0,
               callback: Callable[[int, dict[str, Any], nn.Module], Any] | None = None,
               start_round: int = 0, reference_model: nn.Module | None = None,
               round_checkpoints: str | Path | None = None) -> list[dict[str, Any]]:
    r"""Online (iterative) DPO: train ``model`` in place; returns one metrics row per round.

    Round k: :math:`y^a, y^b \sim \pi_{\theta_k}(\cdot|x)` for each prompt, a label from
    ``label_fn`` gives :math:`(y_w, y_l)`, then ``config.epochs`` of the DPO loss

    .. math:: -\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_\text{ref}(y_w|x)}
              - \beta\log\frac{\pi_\theta(y_l|x)}{\pi_\text{ref}(y_l|x)}\Big)

    with :math:`\pi_\text{ref}` the starting model (``reference="sft"``) or
    :math:`\pi_{\theta_k}` (``"previous"``). ``callback(round, row, model)`` after each round.

    Resuming after round ``start_round - 1`` (``model`` holding the weights saved then): rounds
    ``start_round ..`` run as they would have (each round's seeds depend on ``seed`` and its
    index alone; the prompt draws of the skipped rounds are replayed), with ``reference_model``
    the starting model for ``reference="sft"`` (default: a copy of ``model`` as given). Only
    the rows of the rounds run are returned.

    Inside a round: with ``round_checkpoints`` and ``config.checkpoint_every``, round k's
    training checkpoints every ``checkpoint_every`` steps into ``round_checkpoints/round-<k>``
    and a rerun of that round resumes there (its pairs are sampled again from the weights of
    the round's start with the round's seed: the same pairs); the folder is removed once the
    round and its ``callback`` are done.
    """
    if config.reference not in ("sft", "previous"):
        raise ValueError(f"reference must be 'sft' or 'previous', got {config.reference!r}")
    prompts = list(prompts)
    rng = np.random.default_rng(seed)
    start = None
    # Under LoRA the SFT reference is the policy with its adapters off (train_preference's
    # default), with no copy of the weights.
    if config.reference == "sft" and OBJECTIVES[config.loss].needs_reference \
            and not is_lora(model):
        start = reference_model.eval() if reference_model is not None else \
            copy.deepcopy(model).eval()
    rows = []
    for k in range(config.rounds):
        if config.prompts_per_round and config.prompts_per_round < len(prompts):
            idx = rng.choice(len(prompts), size=config.prompts_per_round, replace=False)
            batch = [prompts[i] for i in idx]
        else:
            batch = prompts
        if k < start_round:  # done before a resume: only its prompt draw is replayed
            continue
        batch = [p for p in batch for _ in range(config.pairs_per_prompt)]
        a, b = sample_pairs(model, tokenizer, batch, seed=seed * 100_003 + 2 * k,
                            max_new_tokens=config.max_new_tokens)
        pairs = label_pairs(batch, a, b, label_fn)
        row: dict[str, Any] = {"round": k, "n_prompts": len(batch), "n_pairs": len(pairs),
                               "share_identical": float(np.mean([x == y for x, y in
                                                                 zip(a, b, strict=True)]))}
        if pairs:
            cfg = _round_train_config(config, seed * 1000 + k, round_checkpoints, k)
            # reference="previous": train_preference copies the model as it is now (under
            # LoRA its default would be the adapters switched off: the base, so copy here).
            reference = start if start is not None or not is_lora(model) \
                or config.reference == "sft" else copy.deepcopy(model).eval()
            run = train_preference(config.loss, model, pairs, cfg, tokenizer=tokenizer,
                                   reference_model=reference, max_length=config.max_length,
                                   seed=seed, **config.loss_hyperparameters())
            last = run.history.last()
            row.update({key: last[key] for key in ("loss", "rewards/accuracies",
                                                   "rewards/margins") if key in last})
            row["train_seconds"] = run.train_seconds + run.reference_seconds
        model.eval()
        rows.append(row)
        if callback is not None:
            callback(k, row, model)
        _round_done(round_checkpoints, k)
    return rows


def _round_train_config(config: Any, seed: int, round_checkpoints: str | Path | None,
                        k: int) -> TrainConfig:
    """Round ``k``'s training: constant ``config.lr``, checkpoints inside the round when asked;
    ``config.batch_size`` is global: each of P processes takes ``batch_size / P`` of a step."""
    from accelerate import PartialState

    inside = round_checkpoints is not None and config.checkpoint_every > 0
    world = PartialState().num_processes
    if config.batch_size % world:
        raise FieldRangeError("batch_size", config.batch_size,
                              f"a multiple of the number of processes ({world})")
    return TrainConfig(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size // world,
                       schedule="constant", seed=seed, device=config.device, log_every=10**9,
                       progress=False, checkpoint_every=config.checkpoint_every if inside else 0,
                       checkpoint_dir=str(_round_folder(round_checkpoints, k)) if inside
                       else None)


def _round_folder(round_checkpoints: str | Path | None, k: int) -> Path | None:
    return None if round_checkpoints is None else Path(round_checkpoints) / f"round-{k:06d}"


def _round_done(round_checkpoints: str | Path | None, k: int) -> None:
    """Round ``k`` and its callback (which saves the round) are done: its checkpoints inside the
    round are no longer needed."""
    from accelerate import PartialState

    folder = _round_folder(round_checkpoints, k)
    state = PartialState()
    state.wait_for_everyone()  # every process is past the round before its checkpoints go
    if folder is not None and folder.exists() and state.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Best-of-n and rejection-sampling fine-tuning
# --------------------------------------------------------------------------------------------


@dataclass
class BestOfN:
    """What :func:`best_of_n` returns: for each prompt its n answers, their rewards, the winner."""

    prompts: list[str]
    texts: list[list[str]] = field(repr=False)
    rewards: np.ndarray = field(repr=False)  # (n_prompts, n)
    best: np.ndarray = field(repr=False)  # (n_prompts,) argmax of rewards per row

    @property
    def best_texts(self) -> list[str]:
        return [t[i] for t, i in zip(self.texts, self.best, strict=True)]

    @property
    def best_rewards(self) -> np.ndarray:
        return self.rewards[np.arange(len(self.best)), self.best]


def best_of_n(model: nn.Module, tokenizer: Any, prompts: Sequence[str], n: int,
              reward_fn: TextRewardFn, seed: int = 0, max_new_tokens: int = 48,
              allow_empty: bool = False) -> BestOfN:
    r"""Sample n answers per prompt, keep :math:`\arg\max_i r(x, y_i)` (first one on ties).

    Empty answers get reward :math:`-\infty` unless ``allow_empty`` (they cannot be SFT
    targets); a prompt whose answers are all empty keeps an empty winner. Under several
    processes each samples and scores its share (:func:`process_share`): the same answers and
    rewards as one process."""
    prompts = list(prompts)
    many = [p for p in prompts for _ in range(n)]
    lo, hi = process_share(len(many))  # several processes: each samples and scores its share
    mine = many[lo:hi]
    texts = list(generate(model, tokenizer, mine, max_new_tokens=max_new_tokens, seed=seed,
                          first_row=lo).texts)
    r = checked_rewards(reward_fn([prompt_text(p) for p in mine], texts), len(mine), reward_fn,
                        texts, torch.float64).numpy()
    texts, r = gathered(texts), np.asarray(gathered(r.tolist()), dtype=np.float64)
    if not allow_empty:
        r = np.where([bool(t.strip()) for t in texts], r, -np.inf)
    r = r.reshape(len(prompts), n)
    return BestOfN(prompts, [texts[i * n:(i + 1) * n] for i in range(len(prompts))], r,
                   r.argmax(axis=1))


@dataclass
class RSFTConfig:
    """Hyperparameters of :func:`rejection_sampling_ft`: ``rounds`` of best-of-``n`` on every
    prompt (``samples_per_prompt`` winners per prompt, from independent draws), then
    ``epochs`` of SFT on the winners at ``lr``."""

    rounds: int = 2
    """Rounds of best-of-n sampling then SFT on the winners."""
    n: int = 8
    """Answers sampled per prompt; the one with the highest reward is kept."""
    samples_per_prompt: int = 1
    """Winners per prompt per round, each from an independent best-of-n draw."""
    lr: float = 5e-4
    """Learning rate (constant) of each round's SFT."""
    epochs: float = 1.0
    """Passes over each round's winners."""
    batch_size: int = 32
    """Examples per optimizer step, over all processes (each takes an equal share)."""
    max_new_tokens: int = 48
    """Longest answer sampled, in tokens."""
    max_length: int = 128
    """Longest prompt + answer in tokens for training."""
    device: str = "cpu"
    """Device of sampling and training (``"cpu"``, ``"cuda"``, ``"auto"``)."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints inside a round (under ``round_checkpoints``, see
    :func:`rejection_sampling_ft`); 0: none inside a round (a recipe still saves one per
    finished round)."""
    report_to: str = "none"
    """``"none"`` or ``"tensorboard"``: in a recipe, each round's row also as TensorBoard
    scalars in ``OUTPUT/tensorboard``."""

    #: Each field's range, checked when the config is built (a recipe names file and line).
    RANGES: ClassVar[dict[str, tuple[Any, str]]] = {
        "rounds": COUNT,
        "checkpoint_every": COUNT_OR_ZERO,
        "report_to": REPORT_TO,
        "n": COUNT,
        "samples_per_prompt": COUNT,
        "lr": POSITIVE,
        "epochs": POSITIVE,
        "batch_size": COUNT,
        "max_new_tokens": COUNT,
        "max_length": (lambda v: COUNT[0](v) and v >= 2, "an integer >= 2"),
        "device": DEVICE,
    }

    def __post_init__(self) -> None:
        check_ranges(self)


def rejection_sampling_ft(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                          reward_fn: TextRewardFn, config: RSFTConfig, seed: int = 0,
                          callback: Callable[[int, dict[str, Any], nn.Module], Any] | None = None,
                          start_round: int = 0, round_checkpoints: str | Path | None = None
                          ) -> list[dict[str, Any]]:
    r"""Rejection-sampling fine-tuning: train ``model`` in place; one metrics row per round.

    Round k: for each prompt :math:`y^* = \arg\max_{i \le n} r(x, y_i)`,
    :math:`y_i \sim \pi_{\theta_k}`, then minimise the SFT loss
    :math:`-\frac{1}{\sum|y^*|}\sum \log \pi_\theta(y^*|x)` (:func:`rlcourse.engine.sft_loss_fn`).
    ``callback(round, row, model)`` after each round; ``start_round``: resume after round
    ``start_round - 1`` (``model`` holding the weights saved then; each round's seeds depend on
    ``seed`` and its index alone), returning the rows of the rounds run. ``round_checkpoints``
    and ``config.checkpoint_every``: checkpoints inside a round, as in :func:`online_dpo`.
    """
    prompts = list(prompts) * config.samples_per_prompt
    rows = []
    pad_id = tokenizer.pad_token_id or 0
    for k in range(start_round, config.rounds):
        bon = best_of_n(model, tokenizer, prompts, config.n, reward_fn,
                        seed=seed * 100_003 + k * 7919, max_new_tokens=config.max_new_tokens)
        keep = [i for i, t in enumerate(bon.best_texts) if t.strip()]
        data = [{"prompt": prompts[i], "completion": completion_for(prompts[i],
                                                                     bon.best_texts[i])}
                for i in keep]
        items = tokenize_sft(tokenizer, data, config.max_length, truncation="right")
        cfg = _round_train_config(config, seed * 1000 + k, round_checkpoints, k)
        history = train(model, sft_loss_fn, items, cfg,
                        collate_fn=partial(pad_collate, pad_id=pad_id))
        model.eval()
        finite = bon.rewards[np.isfinite(bon.rewards)]
        row = {"round": k, "n_targets": len(items),
               "mean_reward": float(finite.mean()) if finite.size else float("nan"),
               "mean_best_reward": float(bon.best_rewards[keep].mean()) if keep else float("nan"),
               "loss": history.last("loss")}
        rows.append(row)
        if callback is not None:
            callback(k, row, model)
        _round_done(round_checkpoints, k)
    return rows



# --------------------------------------------------------------------------------------------
# Over-optimisation in miniature (Gao, Schulman and Hilton, 2022)
# --------------------------------------------------------------------------------------------


def best_of_n_kl(n: int | np.ndarray) -> np.ndarray | float:
    r"""KL(best-of-n ‖ base) :math:`= \log n - (n-1)/n` (continuous rewards, no ties).

    The winner's rank quantile u has density :math:`n u^{n-1}` on [0, 1] against the base's
    uniform, so KL :math:`= \int_0^1 n u^{n-1}\log(n u^{n-1})\,du = \log n - (n-1)/n`.
    """
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 1):
        raise ValueError("n must be >= 1")
    out = np.log(n) - (n - 1) / n
    return float(out) if out.ndim == 0 else out


def best_of_n_expectation(proxy: np.ndarray, gold: np.ndarray, n: int) -> np.ndarray:
    r"""Unbiased estimate, per row, of E[gold of the best-of-n by proxy] from N >= n samples.

    ``proxy``, ``gold``: (rows, N). Sort each row by proxy ascending; the i-th smallest
    (1-based) is the maximum of a random n-subset with probability
    :math:`\binom{i-1}{n-1}/\binom{N}{n}`, so the estimate is
    :math:`\sum_i \binom{i-1}{n-1}\binom{N}{n}^{-1} g_{(i)}` (the average over all n-subsets).
    """
    proxy, gold = np.atleast_2d(proxy), np.atleast_2d(gold)
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy {proxy.shape} and gold {gold.shape} differ in shape")
    big_n = proxy.shape[1]
    if not 1 <= n <= big_n:
        raise ValueError(f"n must be in 1..{big_n}, got {n}")
    order = np.argsort(proxy, axis=1, kind="stable")
    g = np.take_along_axis(gold, order, axis=1)
    i = np.arange(1, big_n + 1)
    # log C(i-1, n-1) - log C(N, n), 0 weight where i - 1 < n - 1
    lg = math.lgamma
    w = np.array([math.exp(lg(k) - lg(n) - lg(k - n + 1) - (lg(big_n + 1) - lg(n + 1)
                                                            - lg(big_n - n + 1)))
                  if k >= n else 0.0 for k in i])
    return g @ w


def _lstsq(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    coef, *_ = np.linalg.lstsq(np.stack([x1, x2], axis=1), y, rcond=None)
    return float(coef[0]), float(coef[1])


def fit_bon(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    r"""Least squares of :math:`R_\text{bon}(d) = d(\alpha - \beta d)` (no intercept: R(0) = 0,
    R measured from the starting policy's score); returns (α, β)."""
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    a, b = _lstsq(d, d * d, r)
    return a, -b


def fit_rl(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    r"""Least squares of :math:`R_\text{RL}(d) = d(\alpha - \beta \log d)` (d > 0); returns
    (α, β)."""
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if np.any(d <= 0):
        raise ValueError("fit_rl needs d = sqrt(KL) > 0")
    a, b = _lstsq(d, d * np.log(d), r)
    return a, -b


def peak_bon(alpha: float, beta: float) -> float:
    r"""Where :math:`d(\alpha - \beta d)` peaks: :math:`d^* = \alpha / (2\beta)` (β > 0)."""
    return alpha / (2 * beta) if beta > 0 else math.inf


def peak_rl(alpha: float, beta: float) -> float:
    r"""Where :math:`d(\alpha - \beta\log d)` peaks: :math:`\alpha - \beta\log d - \beta = 0`,
    :math:`d^* = e^{\alpha/\beta - 1}` (β > 0)."""
    return math.exp(alpha / beta - 1) if beta > 0 else math.inf


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for results files)."""
    return asdict(config)
