"""rlcourse against Hugging Face TRL, method by method: the first step's loss and the updated
parameters on the same tiny model and the same batch.

For every method TRL also has (SFT; DPO and its losses IPO, hinge and robust; KTO; the
Bradley–Terry reward model; GRPO with each of its loss types ``grpo``, ``dr_grpo`` and ``dapo``,
without and with a KL term; RLOO), one comparison:

- **TRL**: its trainer (``SFTTrainer``, ``DPOTrainer``, ...) runs one real optimizer step,
  ``trainer.train()`` with ``max_steps=1``, from its own dataset pipeline (tokenising,
  collating, reference forward, advantages). Its loss is the one it logs for that step.
- **rlcourse**: the method's loss function (``sft_loss_fn``, ``make_loss_fn(...)``,
  ``reward_loss_fn``, ``group_update``) on rlcourse's own tokenisation of the same rows,
  backward, one step of the same optimizer.

The optimizer of both is plain SGD at learning rate 1 without gradient clipping, so that the
updated parameters are ``θ - ∇L``: they agree exactly when the gradients do. (AdamW's first step
is about ``lr · sign(∇L)`` for every parameter, which would hide a loss scaled by any constant.)
A comparison reports the two losses and the largest absolute difference over every parameter
after the step. Where the two libraries differ by design, the comparison is run on the setting
that makes them equal and the difference is named in ``convention``; ``tests/test_trl_parity.py``
pins each convention.

The model: a tiny Llama (``rlcourse.models.build_model``: 2 layers, hidden 32, tied embeddings)
over a word-level vocabulary of the rows below; the reference model (DPO, IPO, hinge, robust,
KTO, GRPO's KL term) is the policy with every weight moved by Gaussian noise of standard deviation
0.02, so that log-ratios are not zero. GRPO and RLOO sample by themselves in TRL: both are fed the
same fixed completions (TRL's ``_generate_single_turn`` replaced by a lookup of the prompt's
token ids) and the same rewards (a reward function that looks the completion up).

Usage (TRL is the ``bench`` extra, installed with ``dev``; one thread, about 20 s)::

    OMP_NUM_THREADS=1 python benchmarks/trl_parity.py      # writes results/trl_parity.json
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rlcourse.data import pad_collate, tokenize_preferences, tokenize_sft, tokenize_unpaired
from rlcourse.engine import sft_loss_fn
from rlcourse.files import atomic_write_text
from rlcourse.grpo import GroupConfig, group_update
from rlcourse.models import RewardModel, build_model, build_tokenizer, format_prompt
from rlcourse.preference import make_loss_fn, precompute_reference_logps, tokenize_pairs
from rlcourse.reward_model import reward_loss_fn

RESULTS = Path(__file__).resolve().parent / "results" / "trl_parity.json"

#: Largest absolute difference of a loss or of a parameter after the step that counts as equal.
TOLERANCE = 1e-5

#: Preference pairs of different lengths (the padding of chosen and rejected differs).
PAIRS = [
    {"prompt": "how are you today", "chosen": "fine , thanks for asking .",
     "rejected": "go away now please"},
    {"prompt": "name a colour", "chosen": "red", "rejected": "blue is a colour i think"},
    {"prompt": "say hi", "chosen": "hi there my friend", "rejected": "no"},
    {"prompt": "count to three", "chosen": "one two three", "rejected": "one two"},
    {"prompt": "what is two plus two", "chosen": "four", "rejected": "it is five i believe"},
    {"prompt": "tell me a colour", "chosen": "green , like grass .", "rejected": "a colour"},
]

#: KTO's unpaired rows: every pair split into a desirable and an undesirable example.
UNPAIRED = [row for p in PAIRS for row in (
    {"prompt": p["prompt"], "completion": p["chosen"], "label": True},
    {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]

#: SFT's prompt-completion rows: the chosen answers (completions of different lengths).
SFT_ROWS = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]

#: SFT rows whose completions all have the same number of tokens (3 words and the EOS).
SFT_ROWS_EQUAL_LENGTHS = [{"prompt": p["prompt"], "completion": c} for p, c in zip(
    PAIRS, ["fine , thanks", "red is nice", "hi there friend", "one two three", "it is four",
            "green like grass"], strict=True)]

#: GRPO and RLOO: for each prompt, GROUP_SIZE fixed completions and their rewards.
GROUP_SIZE = 4
GROUPS = [
    ("count to three", [("one two three", 1.0), ("one two", 0.5), ("three", 0.0),
                        ("one two three four", 0.25)]),
    ("say hi", [("hi", 1.0), ("hi there my friend", 0.0), ("no", -1.0), ("hi there", 0.5)]),
    ("name a colour", [("red", 1.0), ("blue", 1.0), ("a colour i think", -0.5),
                       ("green , like grass .", 0.75)]),
]
#: The longest completion the sampler may produce (Dr. GRPO's constant normaliser).
MAX_COMPLETION_LENGTH = 8


# --------------------------------------------------------------------------------------------
# The model, the reference and the batch, shared by every comparison
# --------------------------------------------------------------------------------------------


def tokenizer():
    words = [" ".join(str(v) for v in p.values()) for p in PAIRS]
    words += [c for _, group in GROUPS for c, _ in group]
    return build_tokenizer(words)


def policy_model(tok, seed: int = 0):
    """The tiny Llama both libraries train (2 layers, hidden 32, 2 heads, no dropout)."""
    return build_model(tok, seed=seed, hidden_size=32, n_heads=2)


def nearby(model, std: float = 0.02, seed: int = 3):
    """A copy of ``model`` with every weight moved by N(0, std²): a reference that differs.

    With seed 3 the mean log-ratio of KTO's mismatched pairs is positive (about 0.25), so KTO's
    reference point z0 is not just the clamp at 0 (seeds 1, 2 and 5 give a negative mean)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return other


def sgd_step(model, loss: torch.Tensor) -> None:
    """One step of plain SGD at learning rate 1 (TRL's ``optim="sgd"``): ``θ ← θ - ∇L``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def max_param_diff(a, b) -> float:
    """Largest |a - b| over every parameter of two models with the same parameter names."""
    theirs = dict(b.named_parameters())
    worst = 0.0
    for name, p in a.named_parameters():
        q = theirs[name]
        worst = max(worst, float((p.detach() - q.detach()).abs().max()))
    return worst


def row(method: str, trl: str, loss_rlcourse: float, loss_trl: float, param_diff: float,
        convention: str | None = None, note: str | None = None, **extra: Any) -> dict[str, Any]:
    """One line of the parity table: ``convention`` says how the two differ by design, ``note``
    in a few words for the table."""
    return {"method": method, "trl": trl, "loss_rlcourse": loss_rlcourse, "loss_trl": loss_trl,
            "loss_diff": abs(loss_rlcourse - loss_trl), "param_diff": param_diff,
            "convention": convention, "note": note, **extra}


# --------------------------------------------------------------------------------------------
# TRL: one real step of its trainer
# --------------------------------------------------------------------------------------------


def trl_args(config_cls, out: str, batch_size: int, **kwargs: Any):
    """A TRL config for one SGD step at learning rate 1 on one batch of ``batch_size``, fp32,
    on the CPU, no clipping, no logging to services, no checkpoint."""
    return config_cls(
        output_dir=out, per_device_train_batch_size=batch_size, max_steps=1, learning_rate=1.0,
        optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        weight_decay=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
        gradient_checkpointing=False, **kwargs)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """TRL's and datasets' progress bars, warnings, info logs and printed log lines off."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    levels = {name: logging.getLogger(name).level for name in ("transformers", "trl", "datasets")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            if bars:
                datasets.enable_progress_bars()


def trl_first_step(trainer) -> float:
    """Run ``trainer`` for its one step; return the loss it logged for that step."""
    trainer.train()
    return float(next(h["loss"] for h in trainer.state.log_history if "loss" in h))


def trl_rows_pairs(tok) -> list[dict[str, str]]:
    """TRL's rows for the pairs: the prompt as rlcourse formats it, completions after a space
    (TRL appends the EOS itself); the token ids are then exactly rlcourse's (checked)."""
    return [{"prompt": format_prompt(p["prompt"], tok), "chosen": " " + p["chosen"],
             "rejected": " " + p["rejected"]} for p in PAIRS]


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def compare_sft(reduction: str = "token", rows: list[dict] | None = None) -> dict[str, Any]:
    """SFT on prompt-completion rows: the loss on the completion tokens only.

    TRL's ``SFTTrainer`` averages the token losses over every completion token of the batch;
    rlcourse's ``sft_loss_fn(reduction="token")`` (the recipe's default) does the same, while
    ``reduction="sequence"`` averages each sequence first (a convention: equal to TRL's only when
    all completions have the same length).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = rows or SFT_ROWS
    tok = tokenizer()
    policy = policy_model(tok)
    ours = copy.deepcopy(policy)
    batch = pad_collate(tokenize_sft(tok, rows, 64), pad_id=tok.pad_token_id)
    loss, _ = sft_loss_fn(ours, batch, reduction=reduction)
    loss_ours = loss.item()
    sgd_step(ours, loss)

    data = [{"prompt": format_prompt(r["prompt"], tok), "completion": " " + r["completion"]}
            for r in rows]
    with quiet(), tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=copy.deepcopy(policy), processing_class=tok,
                             args=trl_args(SFTConfig, out, len(rows), max_length=64),
                             train_dataset=Dataset.from_list(data))
        same_ids = [list(x) for x in trainer.train_dataset["input_ids"]] == [
            it["input_ids"].tolist() for it in tokenize_sft(tok, rows, 64)]
        loss_trl = trl_first_step(trainer)
    return row("SFT" + ("" if reduction == "token" else " (reduction='sequence')"),
               "SFTTrainer", loss_ours, loss_trl,
               max_param_diff(ours, trainer.model), same_token_ids=same_ids,
               reduction=reduction)


# --------------------------------------------------------------------------------------------
# DPO and the losses of its family
# --------------------------------------------------------------------------------------------

#: rlcourse method -> (TRL's DPOConfig loss_type, the hyperparameter that plays TRL's beta)
DPO_FAMILY = {"dpo": ("sigmoid", "beta"), "ipo": ("ipo", "tau"), "hinge": ("hinge", "beta"),
              "robust": ("robust", "beta")}


def compare_dpo(method: str = "dpo", beta: float = 0.1, label_smoothing: float | None = None,
                trl_label_smoothing: float | None = None) -> dict[str, Any]:
    """A loss of the DPO family: rlcourse's ``make_loss_fn(method, ...)`` against ``DPOTrainer``
    with the matching ``loss_type``, the same reference model (computed every step by TRL,
    precomputed once by rlcourse: the same numbers). ``label_smoothing``: rlcourse's (``None``:
    its default); ``trl_label_smoothing``: TRL's (``None``: the same as rlcourse's if given,
    else TRL's default)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    loss_type, beta_name = DPO_FAMILY[method]
    tok = tokenizer()
    policy = policy_model(tok)
    reference = nearby(policy)
    hyper = {beta_name: beta}
    trl_extra: dict[str, Any] = {}
    if label_smoothing is not None:
        hyper["label_smoothing"] = label_smoothing
    if trl_label_smoothing is None:
        trl_label_smoothing = label_smoothing
    if trl_label_smoothing is not None:
        trl_extra["label_smoothing"] = trl_label_smoothing
    items = precompute_reference_logps(reference, tokenize_pairs(tok, PAIRS, 64))
    ours = copy.deepcopy(policy)
    loss, _ = make_loss_fn(method, **hyper)(ours, pad_collate(items, pad_id=tok.pad_token_id))
    loss_ours = loss.item()
    sgd_step(ours, loss)

    with quiet(), tempfile.TemporaryDirectory() as out:
        args = trl_args(DPOConfig, out, len(PAIRS), beta=beta, loss_type=loss_type,
                        max_length=64, **trl_extra)
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                             args=args, train_dataset=Dataset.from_list(trl_rows_pairs(tok)),
                             processing_class=tok)
        first = trainer.train_dataset[0]
        same_ids = (first["prompt_ids"] + first["chosen_ids"]
                    == items[0]["chosen_input_ids"].tolist())
        loss_trl = trl_first_step(trainer)
    names = {"dpo": "DPO", "ipo": "IPO", "hinge": "hinge (SLiC)", "robust": "robust DPO"}
    trl_name = f"DPOTrainer(loss_type={loss_type!r}" + "".join(
        f", {k}={v}" for k, v in {"beta": beta if beta_name != "beta" else None,
                                   "label_smoothing": trl_label_smoothing}.items()
        if v is not None) + ")"
    return row(names[method], trl_name, loss_ours, loss_trl, max_param_diff(ours, trainer.model),
               same_token_ids=same_ids, hyperparameters=hyper)


def experimental(module: str, *names: str) -> tuple[Any, ...]:
    """``names`` from ``trl.experimental.<module>``, without its import warning."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = importlib.import_module(f"trl.experimental.{module}")
    return tuple(getattr(found, n) for n in names)


def compare_simpo(beta: float = 2.0, gamma: float = 1.0) -> dict[str, Any]:
    """SimPO: rlcourse's ``simpo_loss_fn`` against TRL's experimental ``CPOTrainer`` with
    ``loss_type="simpo"`` and no behaviour-cloning term (``cpo_alpha=0``): both take the mean
    token log-probs of the completions and an absolute margin ``γ`` (TRL's ``simpo_gamma``)."""
    from datasets import Dataset

    config_cls, trainer_cls = experimental("cpo", "CPOConfig", "CPOTrainer")
    tok = tokenizer()
    policy = policy_model(tok)
    items = tokenize_pairs(tok, PAIRS, 64)
    ours = copy.deepcopy(policy)
    loss, _ = make_loss_fn("simpo", beta=beta, gamma=gamma)(
        ours, pad_collate(items, pad_id=tok.pad_token_id))
    loss_ours = loss.item()
    sgd_step(ours, loss)
    with quiet(), tempfile.TemporaryDirectory() as out:
        args = trl_args(config_cls, out, len(PAIRS), loss_type="simpo", cpo_alpha=0.0, beta=beta,
                        simpo_gamma=gamma, max_length=64)
        trainer = trainer_cls(model=copy.deepcopy(policy), args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(trl_rows_pairs(tok)))
        same_ids = trainer.train_dataset[0]["chosen_input_ids"] == items[0][
            "chosen_input_ids"].tolist()
        loss_trl = trl_first_step(trainer)
    return row("SimPO", "experimental.cpo.CPOTrainer(loss_type='simpo', cpo_alpha=0)", loss_ours,
               loss_trl, max_param_diff(ours, trainer.model), same_token_ids=same_ids,
               note="TRL's trainer is experimental")


def orpo_trl_form_loss(model, batch: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """ORPO as TRL computes it, from rlcourse's pieces: the odds-ratio term of
    :func:`rlcourse.losses.orpo_loss` (mean completion log-probs), but the NLL of the chosen
    answer over every token of prompt AND completion, averaged over all of the batch's tokens
    (rlcourse: over completion tokens only, each sequence's mean, then the mean)."""
    import torch.nn.functional as F

    from rlcourse.losses import orpo_log_odds
    from rlcourse.models import sequence_logprobs
    from rlcourse.preference import policy_logps

    pc, pr, lc, lr = policy_logps(model, batch)
    odds = -lam * F.logsigmoid(orpo_log_odds(pc / lc) - orpo_log_odds(pr / lr)).mean()
    ids, att = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    token_logps = sequence_logprobs(model, ids, att, att, reduce="none")
    return -token_logps.sum() / att[:, 1:].sum() + odds


def compare_orpo(lam: float = 0.1, trl_form: bool = False) -> dict[str, Any]:
    """ORPO: rlcourse's ``orpo_loss_fn`` (``trl_form=True``: :func:`orpo_trl_form_loss`)
    against TRL's experimental ``ORPOTrainer`` (``beta`` is ORPO's λ). The odds-ratio terms are
    the same; the NLL terms differ by design (see :func:`orpo_trl_form_loss`)."""
    from datasets import Dataset

    config_cls, trainer_cls = experimental("orpo", "ORPOConfig", "ORPOTrainer")
    tok = tokenizer()
    policy = policy_model(tok)
    items = tokenize_pairs(tok, PAIRS, 64)
    batch = pad_collate(items, pad_id=tok.pad_token_id)
    ours = copy.deepcopy(policy)
    loss = (orpo_trl_form_loss(ours, batch, lam) if trl_form
            else make_loss_fn("orpo", lam=lam)(ours, batch)[0])
    loss_ours = loss.item()
    sgd_step(ours, loss)
    with quiet(), tempfile.TemporaryDirectory() as out:
        args = trl_args(config_cls, out, len(PAIRS), beta=lam, max_length=64)
        trainer = trainer_cls(model=copy.deepcopy(policy), args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(trl_rows_pairs(tok)))
        same_ids = trainer.train_dataset[0]["chosen_input_ids"] == items[0][
            "chosen_input_ids"].tolist()
        loss_trl = trl_first_step(trainer)
    return row("ORPO" + (" (the NLL as TRL takes it)" if trl_form else ""),
               f"experimental.orpo.ORPOTrainer(beta={lam})", loss_ours, loss_trl,
               max_param_diff(ours, trainer.model), same_token_ids=same_ids, lam=lam)


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def trl_kto_partners(n: int) -> list[int]:
    """TRL's mismatched pairs: completions rotated by one within the batch, example ``i`` gets
    the completion of ``i - 1`` (and the first the last's), whatever the prompts."""
    return [(i - 1) % n for i in range(n)]


def kto_items(tok, partners: list[int]) -> list[dict[str, torch.Tensor]]:
    """rlcourse's KTO items with the mismatched completions of ``partners``."""
    items = tokenize_unpaired(tok, UNPAIRED, 64)
    mismatched = tokenize_sft(tok, [{"prompt": r["prompt"],
                                     "completion": UNPAIRED[j]["completion"]}
                                    for r, j in zip(UNPAIRED, partners, strict=True)], 64)
    for item, kl in zip(items, mismatched, strict=True):
        item.update({f"kl_{k}": v for k, v in kl.items()})
    return items


def compare_kto(beta: float = 0.1) -> dict[str, Any]:
    """KTO: rlcourse's ``kto_loss_fn`` against ``KTOTrainer``, with TRL's mismatched pairs (the
    rotation by one) given to rlcourse, so that both estimate the reference point z0 from the
    same pairs (rlcourse's own pairing, ``mismatched_partners``, is a convention)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    tok = tokenizer()
    policy = policy_model(tok)
    reference = nearby(policy)
    items = precompute_reference_logps(
        reference, kto_items(tok, trl_kto_partners(len(UNPAIRED))))
    ours = copy.deepcopy(policy)
    loss, metrics = make_loss_fn("kto", beta=beta)(ours, pad_collate(items,
                                                                       pad_id=tok.pad_token_id))
    loss_ours = loss.item()
    sgd_step(ours, loss)

    data = [{"prompt": format_prompt(r["prompt"], tok), "completion": " " + r["completion"],
             "label": r["label"]} for r in UNPAIRED]
    with quiet(), tempfile.TemporaryDirectory() as out:
        args = trl_args(KTOConfig, out, len(UNPAIRED), beta=beta, max_length=64)
        trainer = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                             args=args, train_dataset=Dataset.from_list(data),
                             processing_class=tok)
        loss_trl = trl_first_step(trainer)
        kl_trl = next(h["kl"] for h in trainer.state.log_history if "kl" in h)
    return row("KTO", "KTOTrainer(loss_type='kto')", loss_ours, loss_trl,
               max_param_diff(ours, trainer.model), z0_rlcourse=metrics["kl"], z0_trl=kl_trl,
               note="both estimate z0 from TRL's pairs (completions rotated by one)",
               convention="z0 from mismatched pairs: TRL rotates the completions by one within "
                          "the batch (compared here with that pairing); rlcourse pairs each "
                          "example with one of another prompt (mismatched_partners)")


# --------------------------------------------------------------------------------------------
# Reward model (Bradley–Terry)
# --------------------------------------------------------------------------------------------


def sequence_classifier(reward_model, tok):
    """``AutoModelForSequenceClassification`` (what TRL's ``RewardTrainer`` trains) holding the
    weights of rlcourse's :class:`~rlcourse.models.RewardModel`: the same decoder, and its head
    ``w`` as the score layer (TRL's score layer has no bias; rlcourse's bias cancels in
    Bradley–Terry)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(reward_model.model.config)
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    classifier = AutoModelForSequenceClassification.from_config(config)
    decoder = {k.removeprefix("model."): v for k, v in reward_model.model.state_dict().items()
               if k.startswith("model.")}
    classifier.model.load_state_dict(decoder)
    with torch.no_grad():
        classifier.score.weight.copy_(reward_model.head.weight)
    return classifier


def rm_name(name: str) -> str:
    """rlcourse's reward-model parameter name -> the sequence classifier's."""
    return "score.weight" if name == "head.weight" else name.removeprefix("model.")


def compare_reward_model() -> dict[str, Any]:
    """Bradley–Terry: rlcourse's ``reward_loss_fn`` on a :class:`RewardModel` against
    ``RewardTrainer`` on a sequence classifier with the same weights. Both read the reward at
    the last real token (TRL: the last token that is not padding)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tok = tokenizer()
    ours = RewardModel(policy_model(tok), seed=0)
    classifier = sequence_classifier(ours, tok)
    items = tokenize_preferences(tok, PAIRS, 64)
    loss, _ = reward_loss_fn(ours, pad_collate(items, pad_id=tok.pad_token_id))
    loss_ours = loss.item()
    sgd_step(ours, loss)
    # rlcourse freezes the bias at 0 (Bradley-Terry gives it no gradient; Adam would otherwise
    # turn its round-off into a random walk): no gradient at all then
    bias = ours.head.bias
    bias_grad = 0.0 if bias.grad is None else float(bias.grad.abs().max())

    with quiet(), tempfile.TemporaryDirectory() as out:
        trainer = RewardTrainer(model=classifier, processing_class=tok,
                                args=trl_args(RewardConfig, out, len(PAIRS), max_length=64),
                                train_dataset=Dataset.from_list(trl_rows_pairs(tok)))
        same_ids = (trainer.train_dataset[0]["chosen_ids"]
                    == items[0]["chosen_input_ids"].tolist())
        loss_trl = trl_first_step(trainer)
    return row("reward model (Bradley–Terry)", "RewardTrainer", loss_ours, loss_trl,
               _rm_param_diff(ours, trainer.model),
               same_token_ids=same_ids, bias_gradient=bias_grad,
               note="rlcourse's head bias is frozen at 0 (it cancels); TRL's has none",
               convention="rlcourse's reward head has a bias, frozen at 0, TRL's score layer "
                          "none: the Bradley–Terry loss reads r_w - r_l, so the bias gets no "
                          "gradient")


def _rm_param_diff(ours, classifier) -> float:
    theirs = dict(classifier.named_parameters())
    worst = 0.0
    for name, p in ours.named_parameters():
        if name == "head.bias" or name.endswith("lm_head.weight"):
            continue  # no counterpart (the bias cancels; the LM head is the tied embedding)
        worst = max(worst, float((p.detach() - theirs[rm_name(name)].detach()).abs().max()))
    return worst


# --------------------------------------------------------------------------------------------
# GRPO and RLOO: the same completions fed to both
# --------------------------------------------------------------------------------------------


def group_data(tok) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """Prompt ids, completion ids (with EOS) and rewards, row by row, groups consecutive."""
    prompt_ids, completion_ids, rewards = [], [], []
    for prompt, group in GROUPS:
        p = tok(format_prompt(prompt, tok), add_special_tokens=False)["input_ids"]
        for completion, reward in group:
            c = tok(" " + completion, add_special_tokens=False)["input_ids"]
            prompt_ids.append(list(p))
            completion_ids.append(list(c) + [tok.eos_token_id])
            rewards.append(reward)
    return prompt_ids, completion_ids, rewards


def group_batch(prompt_ids, completion_ids, pad_id: int) -> dict[str, torch.Tensor]:
    """The layout of a sampled batch: prompts padded on the left, completions on the right."""
    p_width = max(len(p) for p in prompt_ids)
    c_width = max(len(c) for c in completion_ids)
    ids, attention, completion = [], [], []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        left, right = p_width - len(p), c_width - len(c)
        ids.append([pad_id] * left + p + c + [pad_id] * right)
        attention.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        completion.append([0] * p_width + [1] * len(c) + [0] * right)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention),
            "completion_mask": torch.tensor(completion)}


def fixed_generation(trainer, prompt_ids, completion_ids, returns_logprobs: bool) -> None:
    """Make ``trainer`` answer each prompt with the fixed completions, in order: its
    ``_generate_single_turn`` becomes a lookup by the prompt's token ids."""
    answers: dict[tuple[int, ...], list[list[int]]] = {}
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        answers.setdefault(tuple(p), []).append(c)

    def generate(prompt_ids_batch, *args, **kwargs):
        served: dict[tuple[int, ...], int] = {}
        out = []
        for p in prompt_ids_batch:
            k = served.get(tuple(p), 0)
            served[tuple(p)] = k + 1
            out.append(list(answers[tuple(p)][k]))
        return (out, None) if returns_logprobs else out

    trainer._generate_single_turn = generate


def lookup_reward(prompt_ids, completion_ids, rewards):
    """A TRL reward function returning the fixed reward of each (completion ids)."""
    table = {tuple(c): r for c, r in zip(completion_ids, rewards, strict=True)}

    def reward(prompts, completions, completion_ids, **kwargs):
        return [table[tuple(c)] for c in completion_ids]

    return reward


def group_prompts_dataset(tok):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": format_prompt(p, tok)} for p, _ in GROUPS])


def compare_grpo(loss_type: str = "dapo", beta: float = 0.0, bias_correction_kl: bool = False,
                 return_models: bool = False) -> dict[str, Any]:
    """GRPO with TRL's ``loss_type`` (``grpo``, ``dr_grpo``, ``dapo``) and KL coefficient
    ``beta``: rlcourse's ``group_update`` (``advantage="grpo"``, or ``"dr_grpo"`` with TRL's
    ``scale_rewards="none"`` as Dr. GRPO prescribes; ``kl_coef=beta``) against ``GRPOTrainer``
    fed the same completions and rewards. One pass, one minibatch: the ratio is 1.

    Both add ``β k3`` per token, ``k3 = π_ref/π - log(π_ref/π) - 1``, to the token terms before
    averaging them. TRL 1.16 multiplies it by the importance ratio ``π/π_old`` by default
    (``use_bias_correction_kl=True``, DeepSeek-V3.2): a factor 1 in value whose gradient adds
    ``β k3 ∇log π`` per token, so the KL's gradient becomes that of KL(π‖π_ref); rlcourse (and
    DeepSeekMath's GRPO) differentiate ``k3`` alone, whose gradient is that of KL(π_ref‖π) (see
    :func:`rlcourse.rl.k3`). ``bias_correction_kl`` is passed to TRL; the parity rows set it
    off, the convention row leaves TRL's default. ``return_models``: the row also holds
    ``models``, ``(policy before the step, rlcourse's after, TRL's after, reference)``.
    """
    from trl import GRPOConfig, GRPOTrainer

    tok = tokenizer()
    policy = policy_model(tok)
    reference = nearby(policy) if beta else None
    prompt_ids, completion_ids, rewards = group_data(tok)
    batch = group_batch(prompt_ids, completion_ids, tok.pad_token_id)
    advantage = "dr_grpo" if loss_type == "dr_grpo" else "grpo"
    config = GroupConfig(advantage=advantage, loss_type=loss_type, group_size=GROUP_SIZE,
                         n_prompts=len(GROUPS), kl_coef=beta, clip_eps=0.2, epochs=1,
                         max_grad_norm=None)
    ours = copy.deepcopy(policy)
    optimizer = torch.optim.SGD(ours.parameters(), lr=1.0)
    metrics = group_update(ours, reference, batch, torch.tensor(rewards), optimizer, config,
                           max_tokens=MAX_COMPLETION_LENGTH)
    loss_ours = metrics["policy_loss"] + beta * metrics.get("kl_k3", 0.0)

    scale = "none" if loss_type == "dr_grpo" else "group"
    with quiet(), tempfile.TemporaryDirectory() as out:
        model = copy.deepcopy(policy)
        if beta:  # TRL loads its reference from the policy's name_or_path: point it at ours
            reference.save_pretrained(out + "/reference")
            model.config._name_or_path = out + "/reference"
        args = trl_args(GRPOConfig, out, len(prompt_ids), loss_type=loss_type, beta=beta,
                        num_generations=GROUP_SIZE, scale_rewards=scale, epsilon=0.2,
                        max_completion_length=MAX_COMPLETION_LENGTH, temperature=1.0,
                        use_bias_correction_kl=bias_correction_kl)
        trainer = GRPOTrainer(model=model, args=args, processing_class=tok,
                              reward_funcs=lookup_reward(prompt_ids, completion_ids, rewards),
                              train_dataset=group_prompts_dataset(tok))
        fixed_generation(trainer, prompt_ids, completion_ids, returns_logprobs=True)
        loss_trl = trl_first_step(trainer)
    kl = f", KL beta={beta}" if beta else ", no KL"
    corrected = ", use_bias_correction_kl=True (TRL's default)" if bias_correction_kl else ""
    result = row(f"GRPO loss_type={loss_type!r}{kl}{corrected}",
                 f"GRPOTrainer(loss_type={loss_type!r}, scale_rewards={scale!r}, beta={beta}"
                 f"{', use_bias_correction_kl=False' if beta and not bias_correction_kl else ''})",
                 loss_ours, loss_trl, max_param_diff(ours, trainer.model),
                 advantage=advantage, loss_type=loss_type, beta=beta,
                 convention=KL_CORRECTION if beta else None,
                 note="TRL's KL ratio correction off (its default is on)" if beta else None)
    if return_models:
        result["models"] = (policy, ours, trainer.model, reference)
    return result


#: The convention of every GRPO row with a KL term (see :func:`compare_grpo`).
KL_CORRECTION = ("TRL 1.16 multiplies the k3 term by the importance ratio by default "
                 "(use_bias_correction_kl=True: value unchanged, gradient + beta k3 grad log pi, "
                 "the gradient of KL(pi||pi_ref)); rlcourse differentiates k3 alone "
                 "(DeepSeekMath's GRPO): compared with use_bias_correction_kl=False")


def compare_rloo(beta: float = 0.0, kl_in_loss: bool = False) -> dict[str, Any]:
    """RLOO: rlcourse's ``group_update(advantage="rloo", loss_type="dr_grpo")`` with
    ``max_tokens = MAX_COMPLETION_LENGTH`` (what ``recipes/rloo.yaml`` runs) against
    ``RLOOTrainer`` fed the same completions.

    TRL's RLOO is sequence-level: the ratio is that of whole answers, ``exp(Σ_t log π -
    Σ_t log π_old)``, and the loss ``-(1/B) Σ_i A_i ratio_i``; rlcourse's ratios are per token
    and Dr. GRPO's weights ``1/(B L)`` (``L`` = ``max_tokens``). At the first step (ratios 1)
    the gradients are the same direction, rlcourse's ``1/L`` the size, so the comparison scales
    rlcourse's update by ``L`` (a constant that AdamW does not see). The loss *values* differ:
    TRL's is ``-(1/B) Σ_i A_i`` (0: leave-one-out advantages sum to 0 in every group),
    rlcourse's ``-(1/(B L)) Σ_i A_i |y_i|``.

    TRL's KL (``beta > 0``) is k1 in the reward, ``r_i - β Σ_t (log π - log π_ref)``, before the
    leave-one-out baseline: rlcourse is given the rewards shaped that way (and ``kl_coef=0``);
    ``kl_in_loss=True`` gives rlcourse the raw rewards and ``kl_coef=beta`` instead (its own KL:
    ``β k3`` in the loss, as for GRPO), a different update.
    """
    from trl import RLOOConfig, RLOOTrainer

    from rlcourse.grpo import token_logprobs
    from rlcourse.models import shifted_mask

    tok = tokenizer()
    policy = policy_model(tok)
    reference = nearby(policy) if beta else None
    prompt_ids, completion_ids, rewards = group_data(tok)
    batch = group_batch(prompt_ids, completion_ids, tok.pad_token_id)
    scores = torch.tensor(rewards)
    if beta and not kl_in_loss:  # TRL's KL in the reward: k1 summed over the completion
        mask = shifted_mask(batch["completion_mask"])
        with torch.no_grad():
            logp = token_logprobs(policy, batch["input_ids"], batch["attention_mask"])
            ref = token_logprobs(reference, batch["input_ids"], batch["attention_mask"])
        scores = scores - beta * ((logp - ref) * mask).sum(-1)
    config = GroupConfig(advantage="rloo", loss_type="dr_grpo", group_size=GROUP_SIZE,
                         n_prompts=len(GROUPS), kl_coef=beta if kl_in_loss else 0.0,
                         clip_eps=0.2, epochs=1, max_grad_norm=None)
    ours = copy.deepcopy(policy)
    optimizer = torch.optim.SGD(ours.parameters(), lr=1.0)
    metrics = group_update(ours, reference if kl_in_loss else None, batch, scores, optimizer,
                           config, max_tokens=MAX_COMPLETION_LENGTH)
    loss_ours = metrics["policy_loss"] + (beta * metrics["kl_k3"] if kl_in_loss else 0.0)
    # rlcourse's update times L: theta0 + L (theta - theta0)
    with torch.no_grad():
        for p, p0 in zip(ours.parameters(), policy.parameters(), strict=True):
            p.copy_(p0 + MAX_COMPLETION_LENGTH * (p - p0))

    with quiet(), tempfile.TemporaryDirectory() as out:
        model = copy.deepcopy(policy)
        if beta:
            reference.save_pretrained(out + "/reference")
            model.config._name_or_path = out + "/reference"
        args = trl_args(RLOOConfig, out, len(prompt_ids), beta=beta, num_generations=GROUP_SIZE,
                        epsilon=0.2, max_completion_length=MAX_COMPLETION_LENGTH,
                        temperature=1.0, normalize_advantages=False)
        trainer = RLOOTrainer(model=model, args=args, processing_class=tok,
                              reward_funcs=lookup_reward(prompt_ids, completion_ids, rewards),
                              train_dataset=group_prompts_dataset(tok))
        fixed_generation(trainer, prompt_ids, completion_ids, returns_logprobs=False)
        loss_trl = trl_first_step(trainer)
    note = f"rlcourse's update × {MAX_COMPLETION_LENGTH} (1/L); loss values differ"
    if not beta:
        name, kl_note = "RLOO, no KL", ""
    elif kl_in_loss:
        name = f"RLOO, rlcourse's KL (kl_coef={beta}: k3 in the loss)"
        kl_note = ("; TRL's KL is k1 in the reward, rlcourse's kl_coef puts k3 in the loss: a "
                   "different update")
    else:
        name = f"RLOO, KL beta={beta} in the reward"
        kl_note = "; TRL's KL (k1 in the reward) given to rlcourse as shaped rewards"
        note += "; TRL's KL given as shaped rewards"
    return row(name, f"RLOOTrainer(beta={beta})", loss_ours, loss_trl,
               max_param_diff(ours, trainer.model), beta=beta,
               update_scale=MAX_COMPLETION_LENGTH, kl_in_loss=kl_in_loss,
               loss_compared=False, note=note,
               convention=f"TRL's RLOO is sequence-level (ratio of whole answers, loss "
                          f"-mean_i A_i ratio_i, value 0 at the first step); rlcourse's "
                          f"loss_type='dr_grpo' sums token terms / (B L): the update is 1/L "
                          f"of TRL's (compared times L = {MAX_COMPLETION_LENGTH}) and the loss "
                          f"values differ" + kl_note)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

#: The comparisons that must agree (loss and parameters, or parameters where the row says
#: ``loss_compared=False``), in the table's order: name -> zero-argument function.
PARITY: dict[str, Callable[[], dict[str, Any]]] = {
    "sft": compare_sft,
    "dpo": lambda: compare_dpo("dpo"),
    "ipo": lambda: compare_dpo("ipo"),
    "hinge": lambda: compare_dpo("hinge"),
    "robust": lambda: compare_dpo("robust", label_smoothing=0.1),
    "simpo": compare_simpo,
    "kto": compare_kto,
    "reward_model": compare_reward_model,
    **{f"grpo_{lt}{'_kl' if b else ''}": (lambda lt=lt, b=b: compare_grpo(lt, b))
       for lt in ("grpo", "dr_grpo", "dapo") for b in (0.0, 0.04)},
    "rloo": compare_rloo,
    "rloo_kl": lambda: compare_rloo(beta=0.05),
}

#: The settings where the two differ by design, measured: name -> (function, the row's name in
#: the table, the convention in a few words, the convention).
CONVENTIONS: dict[str, tuple[Callable[[], dict[str, Any]], str, str, str]] = {
    "sft_sequence": (lambda: compare_sft("sequence"), "SFT, reduction='sequence'",
                     "per-sequence mean; TRL: per-token mean",
                     "rlcourse's reduction='sequence' averages each sequence's token losses "
                     "first; TRL averages over every token of the batch (rlcourse's default "
                     "'token'): equal when all completions have the same length"),
    "robust_defaults": (lambda: compare_dpo("robust"), "robust DPO, each library's default",
                        "default label_smoothing: rlcourse 0.1, TRL 0",
                        "default flip rate: rlcourse's robust DPO assumes label_smoothing=0.1, "
                        "TRL's default 0.0 makes its robust loss plain DPO"),
    "cdpo": (lambda: compare_dpo("dpo", label_smoothing=0.1), "cDPO, label_smoothing=0.1",
             "TRL's sigmoid loss ignores label_smoothing",
             "TRL 1.16's sigmoid (DPO) loss ignores label_smoothing: rlcourse's "
             "dpo(label_smoothing=0.1) is conservative DPO (cDPO), which TRL no longer has"),
    "orpo": (compare_orpo, "ORPO", "NLL over prompt + completion, token mean over the batch",
             "TRL's ORPO NLL covers the prompt and the completion of the chosen answer, averaged "
             "over all tokens of the batch; rlcourse's covers the completion only, averaged per "
             "sequence (the odds-ratio terms are the same: equal once the NLL is taken TRL's "
             "way)"),
    "grpo_dapo_kl_trl_default": (
        lambda: compare_grpo("dapo", 0.04, bias_correction_kl=True),
        "GRPO loss_type='dapo', KL beta=0.04, TRL's default", "TRL's KL ratio correction on",
        KL_CORRECTION.replace(": compared with", "; here TRL keeps its default, not")),
    "rloo_kl_in_loss": (lambda: compare_rloo(beta=0.05, kl_in_loss=True),
                        "RLOO, rlcourse's kl_coef=0.05", "β k3 in the loss; TRL: β k1 in the "
                        "reward",
                        "rlcourse's kl_coef puts beta k3 in the loss (as for GRPO); TRL's RLOO "
                        "subtracts beta k1 of the whole answer from its reward"),
}


def agrees(r: dict[str, Any], tolerance: float = TOLERANCE) -> bool:
    """Parameters within ``tolerance`` and, where compared, losses within ``tolerance`` times
    ``max(1, |loss|)`` (an IPO loss near 25 has float32 steps of 2e-6)."""
    scale = max(1.0, abs(r["loss_rlcourse"]), abs(r["loss_trl"]))
    loss_ok = not r.get("loss_compared", True) or r["loss_diff"] <= tolerance * scale
    return loss_ok and r["param_diff"] <= tolerance


def markdown_table(result: dict[str, Any]) -> str:
    """The parity table in Markdown: one line per comparison, measured differences, convention
    (what chapter 14 and the README show)."""
    lines = ["| rlcourse | TRL 1.16 | compared | max abs Δ loss | max abs Δ parameter | "
             "convention |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        compared = "loss, parameters" if r.get("loss_compared", True) else "parameters"
        if r.get("update_scale", 1) != 1:
            compared += f" (rlcourse's update × {r['update_scale']})"
        verdict = "agree" if r["agrees"] else "differ"
        lines.append(f"| {r['method']} | `{r['trl']}` | {compared}: {verdict} | "
                     f"{r['loss_diff']:.1e} | {r['param_diff']:.1e} | {r['note'] or '—'} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    jobs = [(name, fn, None) for name, fn in PARITY.items()]
    jobs += [(name, fn, rest) for name, (fn, *rest) in CONVENTIONS.items()]
    for name, fn, convention in jobs:
        r = fn()
        r["id"] = name
        r["kind"] = "parity" if convention is None else "convention"
        if convention is not None:
            r["method"], r["note"], r["convention"] = convention
        r["agrees"] = agrees(r)
        rows.append(r)
        print(f"{r['method']:45s} loss {r['loss_rlcourse']:+.6f} vs {r['loss_trl']:+.6f}  "
              f"|dloss| {r['loss_diff']:.1e}  max|dθ| {r['param_diff']:.1e}")
    import transformers
    import trl

    result = {
        "what": "first step of every method TRL has: rlcourse's loss function vs TRL's trainer, "
                "same tiny Llama, same batch, one SGD step at learning rate 1 (the updated "
                "parameters are θ - ∇L)",
        "tolerance": TOLERANCE,
        "rows": rows,
        "versions": {"torch": torch.__version__, "trl": trl.__version__,
                     "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))


if __name__ == "__main__":
    main()
