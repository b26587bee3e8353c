"""Layer 3: the one training loop, shared by SFT, reward models and offline preference losses.

A method is a function ``loss_fn(model, batch) -> (loss, metrics)``; :func:`train` does the rest:
device and mixed precision (``accelerate``), seeded shuffling, gradient accumulation, clipping,
AdamW with warm-up and decay, logging, evaluation, checkpoints and automatic resume.

Gradient accumulation and several processes: ``accelerate`` divides each micro-batch loss by
``grad_accum_steps`` and sums the gradients, and DDP averages them over processes, so the
update equals one big batch exactly when ``loss_fn`` returns a MEAN OVER EXAMPLES of
per-example losses (and micro-batches have equal size). A mean over tokens needs the token
count of the whole global batch: a ``loss_fn`` with a keyword ``num_tokens`` (as
:func:`sft_loss_fn`) receives it, summed over the step's micro-batches and all processes
(:func:`target_tokens`) and divided by ``grad_accum_steps * num_processes``.

Logged metrics are means over the micro-batches of every process (reduced across processes),
so a row does not depend on how the global batch is split.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from rlcourse.adapters import enable_gradient_checkpointing, is_lora
from rlcourse.config import (
    COUNT,
    DEVICE,
    NON_NEGATIVE,
    OPTIONAL_COUNT,
    OPTIONAL_POSITIVE,
    POSITIVE,
    REPORT_TO,
    at_least,
    check_ranges,
    one_of,
    positive,
    within,
)
from rlcourse.data import pad_collate
from rlcourse.files import atomic_directory_write, atomic_write_text
from rlcourse.guards import NonFiniteError, check_finite_loss, check_finite_weights
from rlcourse.models import sequence_logprobs
from rlcourse.precision import warn_lost_updates

__all__ = [
    "EpochSampler",
    "History",
    "NonFiniteError",
    "Pooled",
    "RunLog",
    "TrainConfig",
    "check_report_to",
    "count_tokens",
    "dropout_disabled",
    "list_checkpoints",
    "load_checkpoint",
    "loss_eval_fn",
    "make_accelerator",
    "mean_over_processes",
    "peak_memory",
    "planned_indices",
    "reset_peak_memory",
    "RL_LR_DECAYS",
    "check_resumed_settings",
    "lr_param_groups",
    "rl_lr_schedule",
    "save_checkpoint",
    "sft_loss_fn",
    "stop_nonfinite",
    "target_tokens",
    "train",
]

LossFn = Callable[[Any, dict], tuple[torch.Tensor, Mapping[str, Any]]]


@dataclass
class TrainConfig:
    """Everything :func:`train` needs besides the model, the loss and the data.

    ``max_steps`` counts optimizer steps (each ``grad_accum_steps`` micro-batches of
    ``batch_size``); when it is ``None`` training runs ``epochs`` passes over the data.
    ``schedule``: ``"cosine"``, ``"linear"`` or ``"constant"`` after ``warmup_steps`` of linear
    warm-up. ``mixed_precision``: ``"no"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 on a GPU
    that supports it, else no). ``checkpoint_every=0`` disables checkpoints; ``eval_every=0``
    evaluates only at the end. ``gradient_checkpointing``: keep only each decoder layer's input
    and recompute the rest in the backward pass (identical gradients, about a third more compute).
    ``logging_dir``: where the run is watched from: ``history.jsonl`` (one row per log step,
    appended and flushed as training goes; rewritten from the checkpoint on resume, so no row
    appears twice) and, with ``report_to="tensorboard"``, TensorBoard event files under
    ``logging_dir/tensorboard`` (:class:`RunLog`).
    """

    lr: float = 1e-3
    """Peak learning rate of AdamW (reached after ``warmup_steps``, then shaped by ``schedule``)."""
    max_steps: int | None = None
    """Optimizer steps to run; ``None``: run ``epochs`` passes over the data instead."""
    epochs: float = 1.0
    """Passes over the training data when ``max_steps`` is ``None`` (may be fractional)."""
    batch_size: int = 32
    """Examples per micro-batch on each process."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated into one optimizer step; a step sees
    ``batch_size * grad_accum_steps * processes`` examples."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient L2 norm to this before each step; ``None``: no clipping."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    schedule: str = "cosine"
    """Learning rate after warm-up: ``"cosine"`` (to 0 at the last step), ``"linear"`` (to 0) or
    ``"constant"``."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay (per step, multiplied by the learning rate)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's ``(beta1, beta2)``: decay rates of the first and second moment estimates."""
    seed: int = 0
    """Seed of the data order (a permutation per epoch) and of torch/numpy/random before training
    (whatever the loss draws)."""
    mixed_precision: str = "no"
    """``"no"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 on a GPU that supports it, else no)."""
    log_every: int = 10
    """Optimizer steps between history rows (each row the mean since the previous one)."""
    eval_every: int = 0
    """Optimizer steps between evaluations; 0: evaluate only at the end."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints (model, optimizer, scheduler, RNG states); 0: no
    checkpoints."""
    checkpoint_dir: str | None = None
    """Directory of the checkpoints; a run finding one there resumes from the newest."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept; older ones are deleted."""
    device: str = "auto"
    """``"auto"`` (accelerate's choice: a GPU per process if there is one), ``"cpu"``, or
    ``"cuda"``/``"mps"`` (a warning if unavailable)."""
    drop_last: bool = False
    """Drop the last incomplete micro-batch of each epoch."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of storing its activations
    (:func:`rlcourse.adapters.enable_gradient_checkpointing`): identical gradients, less memory,
    about a third more compute."""
    logging_dir: str | None = None
    """Where the run is watched from: ``history.jsonl`` (one row per log step, appended as training
    goes) and, with ``report_to="tensorboard"``, event files under ``logging_dir/tensorboard``;
    ``None``: nothing written."""
    report_to: str = "none"
    """``"none"`` or ``"tensorboard"`` (needs ``logging_dir``)."""

    #: Each field's range, checked when the config is built (a recipe names file and line).
    RANGES: ClassVar[dict[str, tuple[Any, str]]] = {
        "lr": POSITIVE,
        "max_steps": OPTIONAL_COUNT,
        "epochs": POSITIVE,
        "batch_size": COUNT,
        "grad_accum_steps": COUNT,
        "max_grad_norm": OPTIONAL_POSITIVE,
        "warmup_steps": (at_least(0), "an integer >= 0"),
        "schedule": (one_of("cosine", "linear", "constant"), "one of cosine, linear, constant"),
        "weight_decay": NON_NEGATIVE,
        "betas": (lambda v: len(v) == 2 and all(within(0.0, 0.999999)(b) for b in v),
                  "two numbers in [0, 1)"),
        "mixed_precision": (one_of("no", "bf16", "fp16", "auto"), "one of no, bf16, fp16, auto"),
        "log_every": COUNT,
        "eval_every": (at_least(0), "an integer >= 0"),
        "checkpoint_every": (at_least(0), "an integer >= 0"),
        "keep_checkpoints": COUNT,
        "device": DEVICE,
        "report_to": REPORT_TO,
    }

    def __post_init__(self) -> None:
        # A YAML string "false" is truthy: a boolean must be a boolean (recipes check every
        # type with file and line; this catches TrainConfig.from_yaml and direct use).
        for f in fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"TrainConfig.{f.name} must be true or false, got "
                                f"{getattr(self, f.name)!r}")
        check_ranges(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML mapping of the fields above (e.g. ``lr: 5.0e-4``)."""
        import yaml

        with open(path, encoding="utf-8") as fh:
            d = yaml.safe_load(fh) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a YAML mapping of TrainConfig fields")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """Metrics by optimizer step: a list of rows ``{"step": k, "loss": ..., ...}``.

    Training rows carry the mean of each metric over the steps since the previous row, plus
    ``lr``, ``grad_norm``, ``epoch``, ``tokens_per_s`` (non-padding tokens of all processes
    since the previous row / wall time of those training steps, evaluation and checkpoints
    excluded) and ``peak_mem_mb`` (CUDA: max allocated; CPU: the process's max resident set).
    Evaluation metrics join the row of their step.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    #: This call's totals: ``tokens`` (non-padding, all processes) and ``step_seconds`` (wall
    #: time of the training steps only, without evaluation, checkpoints and logging).
    totals: dict[str, float] = field(default_factory=dict)

    def log(self, step: int, **metrics: Any) -> None:
        """Add metrics to the row of ``step`` (creating it if it is not the last row)."""
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(metrics)
        else:
            self.rows.append({"step": step, **metrics})

    def to_rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of the rows that have ``key``."""
        pairs = [(r["step"], r[key]) for r in self.rows if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def last(self, key: str | None = None) -> Any:
        """The last row (a dict), or the last value of ``key`` (``None`` if never logged)."""
        if key is None:
            return dict(self.rows[-1]) if self.rows else {}
        values = self.series(key)[1]
        return values[-1] if values else None

    def plot(self, keys: Sequence[str] | str = ("loss",), ax: Any = None) -> Any:
        """Plot each key against the step with matplotlib; returns the axes."""
        import matplotlib.pyplot as plt

        keys = [keys] if isinstance(keys, str) else list(keys)
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            steps, vals = self.series(k)
            ax.plot(steps, vals, marker="." if len(steps) < 30 else None, label=k)
        ax.set_xlabel("optimizer step")
        ax.legend()
        return ax

    def __len__(self) -> int:
        return len(self.rows)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles ``range(n)`` with a permutation that depends only on ``(seed, epoch)``.

    A run is repeatable, and a resumed run sees exactly the order the uninterrupted run saw.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def planned_indices(n: int, config: TrainConfig, num_processes: int = 1) -> list[int]:
    """The examples (indices into ``range(n)``) that :func:`train` will read, sorted.

    :func:`train` walks epoch after epoch through the permutation of :class:`EpochSampler`; each
    process reads ``ceil(B_e / P)`` micro-batches per epoch (``B_e = ceil(n / batch_size)``, or
    ``floor`` with ``drop_last``; ``P`` processes, ``accelerate`` fills the last round from the
    start of the epoch), and an optimizer step takes ``grad_accum_steps`` of them (the last of an
    epoch may take fewer). Training stops after ``max_steps`` steps (or ``epochs`` epochs), so a
    short run reads only the first ``(steps of the epoch) * grad_accum_steps * P * batch_size``
    entries of the last epoch's permutation. Used to compute reference log-probs only for what
    training reads (:func:`rlcourse.preference.train_preference`).
    """
    bs, accum = config.batch_size, config.grad_accum_steps
    global_batches = n // bs if config.drop_last else math.ceil(n / bs)
    per_process = math.ceil(global_batches / num_processes)
    if per_process == 0:
        return []
    steps_per_epoch = max(1, math.ceil(per_process / accum))
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    sampler, used, step, epoch = EpochSampler(n, config.seed), set(), 0, 0
    while step < total and len(used) < n:
        sampler.set_epoch(epoch)
        steps = min(steps_per_epoch, total - step)
        batches = min(per_process, steps * accum) * num_processes
        used.update(list(sampler)[: min(n, batches * bs)])
        step, epoch = step + steps, epoch + 1
    return sorted(used)


def lr_param_groups(model: torch.nn.Module, lr: float,
                    lr_multipliers: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer parameter groups: parameter ``p``
    named ``name`` learns at ``lr * lr_multipliers[pattern]`` for the first ``pattern`` (a
    glob, :func:`fnmatch.fnmatchcase`, over :meth:`~torch.nn.Module.named_parameters`'
    names) that matches ``name``, and at ``lr`` when none does. The group at ``lr`` comes
    first (a history's ``lr`` reads group 0), and every group keeps the order of
    ``named_parameters``, so the optimizer's state lines up across runs and resumes.

    Why: some parameters have a scale of their own that one learning rate moves too slowly.
    The final norm's gain ``g`` of a pre-norm transformer with a bias-free head is an inverse
    temperature, ``logits = W (g * h / rms(h))``, so ``g -> g / T``
    samples at temperature ``T``; Adam moves each weight by about ``lr`` per step, so at the
    rate that is safe for the rest of the network (``2e-4``) a sharpening of ``g`` by half
    takes thousands of steps (chapter 17). LoRA+ (Hayou et al., 2024) is the same idea for
    adapters, a larger rate for ``B`` than for ``A``.

    A pattern that matches no trainable parameter is an error naming it (a typo would
    otherwise train at one rate, silently); so is a multiplier that is not a positive finite
    number.
    """
    from fnmatch import fnmatchcase

    multipliers = dict(lr_multipliers or {})
    for pattern, factor in multipliers.items():
        if not positive(factor):
            raise ValueError(f"lr_multipliers[{pattern!r}] must be a positive number, got "
                             f"{factor!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_factor: dict[float, list[torch.nn.Parameter]] = {1.0: []}
    used: set[str] = set()
    for name, param in named:
        pattern = next((q for q in multipliers if fnmatchcase(name, q)), None)
        factor = 1.0 if pattern is None else float(multipliers[pattern])
        if pattern is not None:
            used.add(pattern)
        by_factor.setdefault(factor, []).append(param)
    unused = [q for q in multipliers if q not in used]
    if unused:
        names = ", ".join(n for n, _ in named[:6])
        raise ValueError(f"lr_multipliers: pattern {unused[0]!r} matches no trainable "
                         f"parameter (names look like: {names}, ...)")
    return [{"params": params, "lr": lr * factor} for factor, params in by_factor.items()
            if params or factor == 1.0]


def check_resumed_settings(checkpoint: Path, saved: Mapping[str, Any] | None,
                           now: Mapping[str, Any], added: Mapping[str, Any] | None = None,
                           decay: str = "constant") -> None:
    """Refuse to resume ``checkpoint`` when a run setting differs from the one it was written
    with: the RL loops (PPO, GRPO, RLOO) call it on the ``config`` their checkpoints hold.
    ``added``: settings introduced after some checkpoints were written, with the value those
    had. ``n_steps`` may grow (a run extended), unless the rate decays (``decay``) towards the last
    step (:func:`rl_lr_schedule`), which the step count shapes. ``saved=None``: a checkpoint
    written before its loop recorded settings, not compared."""
    if saved is None:
        return
    now = json.loads(json.dumps(now))  # as state.json holds it: tuples are lists
    added = added or {}
    differ = sorted(k for k in now if (k != "n_steps" or decay != "constant")
                    and saved.get(k, added.get(k)) != now[k])
    if differ:
        raise ValueError(f"{checkpoint} was written with other settings ({', '.join(differ)}): "
                         "use another checkpoint_dir")


#: The RL loops' learning-rate shapes after the warm-up (:func:`rl_lr_schedule`).
RL_LR_DECAYS = ("constant", "linear")


def rl_lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int = 0,
                       n_steps: int = 0, decay: str = "constant"
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of the RL loops (PPO, GRPO, RLOO), stepped once per step:
    step ``k`` (1-based) of ``n_steps`` uses ``lr * min(1, k / warmup_steps)`` (0: ``lr`` from
    the first step), then with ``decay="constant"`` holds ``lr``, and with ``decay="linear"``
    uses ``lr * (n_steps - k + 1) / (n_steps - warmup_steps)``: ``lr`` at the first step after
    the warm-up, ``lr / (n_steps - warmup_steps)`` at the last (the shape of TRL's default,
    transformers' ``linear`` schedule, which ends at 0 after the last step).

    It differs from the transformers schedule :func:`train` uses, whose first step runs at
    ``lr * 0``: an RL step costs a round of sampling, so none is spent on an update of size 0.
    Saved and restored with the engine's checkpoints, so a resumed run goes on along the ramp.
    Every parameter group keeps its own rate times the same factor.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay not in RL_LR_DECAYS:
        raise ValueError(f"decay must be one of {', '.join(RL_LR_DECAYS)}, got {decay!r}")
    if decay == "linear" and n_steps <= warmup_steps:
        raise ValueError(f"a linear decay needs n_steps ({n_steps}) > warmup_steps "
                         f"({warmup_steps})")

    def factor(done: int) -> float:
        k = done + 1  # the step about to run
        if warmup_steps and k <= warmup_steps:
            return k / warmup_steps
        if decay == "linear":
            return max(n_steps - k + 1, 0) / (n_steps - warmup_steps)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Checkpoints: model + optimizer + scheduler + RNG states + counters + history, written atomically
# --------------------------------------------------------------------------------------------
def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return meta, tensors


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = meta["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


#: Under LoRA a checkpoint holds only the trained adapters (MiB instead of the model's GiB).
ADAPTER_CHECKPOINT = "adapter.safetensors"


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], model, optimizer, scheduler,
                    keep: int) -> Path:
    """Write ``ckpt_dir/step-XXXXXXXX`` atomically (a folder gets its name only once complete):
    the weights (under LoRA only the trained adapters), optimizer, scheduler and RNG states, and
    ``state`` (step, history, run config) as ``state.json``; then delete all but the newest
    ``keep`` checkpoints. The engine, PPO and the group methods all checkpoint through it."""
    from safetensors.torch import save_model

    def write(tmp: Path) -> None:
        if is_lora(model):  # the frozen base is what the run loads again: keep the adapters
            from safetensors.torch import save_file

            save_file({n: p.detach().contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}, str(tmp / ADAPTER_CHECKPOINT))
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        meta, tensors = _rng_state()
        torch.save(tensors, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "rng": meta}))

    path = atomic_directory_write(ckpt_dir / f"step-{state['step']:08d}", write)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory only gets its name once complete)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists())


def load_checkpoint(path: Path, model, optimizer, scheduler, device) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer`` and
    ``scheduler`` (and the RNG states); returns ``state``. Adapters that do not match the
    model's trainable parameters are refused, naming the checkpoint."""
    from safetensors.torch import load_model

    if (path / ADAPTER_CHECKPOINT).exists():
        from safetensors.torch import load_file

        saved = load_file(str(path / ADAPTER_CHECKPOINT), device=str(device))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(saved) != trainable:
            raise ValueError(f"{path}: its adapters do not match this model's trainable "
                             f"parameters ({len(saved)} saved, {len(trainable)} here): use "
                             "another checkpoint_dir")
        model.load_state_dict(saved, strict=False)
    else:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True,
                                         map_location=device))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    _set_rng_state(state.pop("rng"), torch.load(path / "rng.pt", weights_only=True))
    return state


@contextlib.contextmanager
def dropout_disabled(model: torch.nn.Module, disable: bool = True) -> Iterator[int]:
    """Within the block every dropout of ``model`` is off (restored afterwards); yields how many
    dropout sites were switched off.

    Preference losses compare the policy's log-probs with the reference's, which are computed
    in eval mode (no dropout): with dropout on in training, ``pi_theta != pi_ref`` at step 0
    although the weights are equal (GPT-2's first DPO loss is about 0.70 instead of
    ``ln 2``). TRL's ``disable_dropout=True`` does the same. Covers ``nn.Dropout`` modules and
    the ``attention_dropout`` probability that Llama-style attention keeps as a float (and, as
    in TRL, the dropout of LoRA adapters).
    """
    changed: list[tuple[Any, str, float]] = []
    if disable:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and module.p > 0:
                changed.append((module, "p", module.p))
            value = getattr(module, "attention_dropout", None)
            if isinstance(value, float) and value > 0:
                changed.append((module, "attention_dropout", value))
        for module, attr, _ in changed:
            setattr(module, attr, 0.0)
    try:
        yield len(changed)
    finally:
        for module, attr, value in changed:
            setattr(module, attr, value)


# --------------------------------------------------------------------------------------------
# Guards: a non-finite loss or weight stops the run before anything is written
# --------------------------------------------------------------------------------------------
def _checkpoint(run: Any, config: TrainConfig, ckpt_dir: Path, history: History, step: int,
                epoch: int, batches_in_epoch: int) -> None:
    """The full state after ``step``, saved atomically by the main process; never a NaN model
    (the last good checkpoint stays the newest)."""
    with stop_nonfinite("optimizer", step, ckpt_dir, config.lr):
        check_finite_weights(run.model, run.accelerator)
    state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
             "history": history.rows, "config": config.to_dict()}
    if run.accelerator.is_main_process:
        save_checkpoint(ckpt_dir, state, run.accelerator.unwrap_model(run.model), run.optimizer,
                        run.scheduler, config.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def _nonfinite_message(what: str, where: str, ckpt_dir: Path | None, lr: float | None) -> str:
    found = list_checkpoints(ckpt_dir) if ckpt_dir else []
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
    rate = f" (lr={lr:g})" if lr is not None else ""
    return (f"{what} at {where}{rate}: training stopped and nothing from this point was saved; "
            f"{kept}. Lower the lr, look for empty completions or rewards that explode, or use "
            "bf16 instead of fp16")


@contextlib.contextmanager
def stop_nonfinite(method: str, step: int, ckpt_dir: Path | None, lr: float | None = None
                   ) -> Iterator[None]:
    """Turn a :class:`~rlcourse.guards.NonFiniteError` raised inside (a NaN loss, gradient norm
    or weight, found by :mod:`rlcourse.guards`) into one message naming the method, the step,
    the learning rate and the last good checkpoint: what every RL loop reports."""
    try:
        yield
    except NonFiniteError as error:
        raise NonFiniteError(_nonfinite_message(str(error), f"{method} step {step}", ckpt_dir,
                                                lr)) from None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def count_tokens(batch: Any, keys: Sequence[str] | None = None) -> int:
    """Real (non-padding) tokens of a batch or of one item: the sum of its attention masks.

    ``keys``: the masks to count (those absent are skipped); by default every key ending in
    ``attention_mask``, and without any such mask the size of ``input_ids``. This is the
    engine's throughput count (``History.totals["tokens"]``).
    """
    if not isinstance(batch, Mapping):
        return 0
    if keys is not None:
        return int(sum(batch[k].sum().item() for k in keys if k in batch))
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
    if masks:
        return int(sum(m.sum().item() for m in masks))
    ids = batch.get("input_ids")
    return int(ids.numel()) if torch.is_tensor(ids) else 0


def reset_peak_memory(device: torch.device) -> None:
    """Start :func:`peak_memory` afresh (CUDA only: a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: allocated accelerator memory at its peak on CUDA
    (``torch.cuda.max_memory_allocated``), else the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS (CPU)"


def _windows(loader: Any, size: int, skip: int) -> Iterator[tuple[int, list[Any]]]:
    """The micro-batches of each optimizer step: ``(batches used so far in the epoch, window)``.

    Windows hold ``size`` micro-batches (the last one of an epoch may hold fewer); the first
    ``skip`` batches (already used before a resume) are passed over.
    """
    window: list[Any] = []
    i = -1
    for i, batch in enumerate(loader):
        if i < skip:
            continue
        window.append(batch)
        if len(window) == size:
            yield i + 1, window
            window = []
    if window:
        yield i + 1, window


def mean_over_processes(accelerator: Any, metrics: Mapping[str, float]) -> dict[str, float]:
    """Each metric's mean over processes when every process reports every metric once (the
    PPO and group loops: each process holds as many rows): ``sum over processes / W``. One
    process: the metrics as they are. Computed by :func:`_reduce_metrics`, each process's value
    a micro-batch of its own."""
    if accelerator is None or accelerator.num_processes == 1:
        return dict(metrics)
    sums = {k: [torch.tensor(float(v), dtype=torch.float64)] for k, v in metrics.items()}
    means, _ = _reduce_metrics(accelerator, sums, 0)
    return means


@dataclass(frozen=True)
class Pooled:
    """A metric that is a mean over ``count`` examples of a micro-batch (KTO's
    ``rewards/chosen``: the mean over the batch's desirable examples). The logged value is the
    pooled mean over every micro-batch and process, ``sum(mean * count) / sum(count)``, as one
    process holding the whole batch would compute it; a plain number counts as one."""

    mean: float
    count: int


def _split_pooled(value: Any) -> tuple[Any, float]:
    """``(value, weight)`` of a metric: a :class:`Pooled` weighs its count, anything else 1."""
    if isinstance(value, Pooled):
        return value.mean, float(value.count)
    return value, 1.0


def _reduce_metrics(accelerator: Any, sums: Mapping[str, list[torch.Tensor]], tokens: int,
                    weights: Mapping[str, list[float]] | None = None
                    ) -> tuple[dict[str, float], int]:
    """Each metric's mean over the micro-batches since the last row, over ALL processes, and
    the tokens of all processes.

    ``mean_k = sum over processes of sum_k / sum over processes of count_k``: every micro-batch
    that reported metric ``k`` weighs the same (or, with ``weights``, its weight: ``sums`` then
    holds ``value * weight``; :class:`Pooled` metrics), as one process holding them all would.
    The key sets are united across processes first: a metric some micro-batches do not report
    (KTO logs ``rewards/chosen`` only for a batch holding a desirable example) would otherwise
    shift the vectors being summed, mixing one metric into another or hanging the collective.
    """
    keys = sorted(sums)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        every: list[Any] = [None] * accelerator.num_processes
        dist.all_gather_object(every, keys)
        keys = sorted(set().union(*every))
    totals = [float(torch.stack(sums[k]).double().sum()) if k in sums else 0.0 for k in keys]
    counts = [float(sum(weights[k]) if weights is not None and k in weights
                    else len(sums.get(k, []))) for k in keys]
    dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64  # no fp64 on MPS
    local = torch.tensor([*totals, *counts, float(tokens)], dtype=dtype, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, "sum")
    values = local.tolist()
    n = len(keys)
    means = {k: values[i] / values[n + i] for i, k in enumerate(keys) if values[n + i] > 0}
    return means, int(values[-1])


class RunLog:
    """Where a run is watched from while it trains (main process only): ``history.jsonl`` in
    ``logging_dir`` (a row per logged step, appended and fsynced as training goes) and, with
    ``report_to="tensorboard"``, TensorBoard event files in ``logging_dir/tensorboard`` (each
    numeric metric a scalar at the row's step). Every loop writes one: the engine's, PPO's, the
    group methods' and the rounds of online DPO and RSFT."""

    def __init__(self, accelerator: Any, config: Any, rows: list[dict[str, Any]]) -> None:
        """``config``: anything with ``logging_dir`` and ``report_to`` (a :class:`TrainConfig`);
        ``rows``: the history so far (a resumed run starts from the checkpoint's rows)."""
        self.accelerator, self.path, self.written, self.writer = accelerator, None, 0, None
        logging_dir = getattr(config, "logging_dir", None)
        if not accelerator.is_main_process or not logging_dir:
            return
        if getattr(config, "report_to", "none") == "tensorboard":
            check_report_to(config)
            self.writer = _summary_writer(Path(logging_dir) / "tensorboard")
            if hasattr(config, "to_dict"):
                self.writer.add_text("config", json.dumps(config.to_dict(), default=str))
        self.path = Path(logging_dir) / "history.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rewrite(rows)  # a resumed run starts from the checkpoint's rows: none twice

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        if self.path is None:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.written = len(rows)

    @classmethod
    def to_folder(cls, logging_dir: str | os.PathLike | None, rows: list[dict[str, Any]],
                  accelerator: Any = None, report_to: str = "none") -> RunLog:
        """A run log for a loop without a :class:`TrainConfig`: ``logging_dir/history.jsonl``
        (nothing when ``None``) and, with ``report_to="tensorboard"``, event files; without an
        ``accelerator`` the process is the main one."""
        from types import SimpleNamespace

        main = accelerator or SimpleNamespace(is_main_process=True)
        return cls(main, SimpleNamespace(logging_dir=logging_dir, report_to=report_to), rows)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any."""
        if self.writer is not None:
            self.writer.close()

    def flush(self, history: History | list[dict[str, Any]]) -> None:
        """Append the rows not yet written (each complete: training and evaluation metrics)."""
        rows = history.rows if isinstance(history, History) else history
        if not self.accelerator.is_main_process:
            return
        new = rows[self.written:]
        if self.path is not None and new:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in new))
                fh.flush()
                os.fsync(fh.fileno())  # survives a crash of the machine, not only the process
        self.written = len(rows)
        if self.writer is not None and new:
            for row in new:
                step = row.get("step", row.get("round", 0))
                for key, value in row.items():
                    if key not in ("step", "round") and isinstance(value, (int, float)) \
                            and not isinstance(value, bool):
                        self.writer.add_scalar(key, value, step)
            self.writer.flush()


def _summary_writer(log_dir: Path) -> Any:
    """TensorBoard's writer: PyTorch's (needs the ``tensorboard`` package), else tensorboardX."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))


def check_report_to(config: Any, key: str = "report_to") -> None:
    """A ``ValueError`` unless ``config.report_to`` can be honoured: ``"none"``, or
    ``"tensorboard"`` with a ``logging_dir`` and the ``tensorboard`` (or ``tensorboardX``)
    package installed. Checked when a recipe is read, before any model loads."""
    if config.report_to in ("none", None):
        return
    if config.report_to != "tensorboard":
        raise ValueError(f"report_to must be 'tensorboard' or 'none', got {config.report_to!r}")
    if not config.logging_dir:
        raise ValueError("report_to='tensorboard' needs a logging_dir for the event files")
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and \
            importlib.util.find_spec("tensorboardX") is None:
        raise ValueError("report_to='tensorboard' but neither tensorboard nor tensorboardX is "
                         "installed: pip install tensorboard, or set report_to: none")


def _takes_num_tokens(loss_fn: Any) -> bool:
    try:
        return "num_tokens" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def check_device_available(device: str, key: str = "train.device") -> None:
    """A ``ValueError`` naming ``key`` when ``device`` asks for an accelerator this machine does
    not have (before, ``cuda`` without a GPU failed with a traceback after the model loaded)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but no CUDA GPU is visible (torch.cuda.is_available() is "
                         f"False; torch {torch.__version__}): use auto or cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                and torch.backends.mps.is_available()):
        raise ValueError(f"{key}=mps but this machine has no MPS device: use auto or cpu")


def make_accelerator(config: TrainConfig):
    """The ``accelerate.Accelerator`` for ``config`` (precision, accumulation, CPU),
    with accelerate's process-wide state cleared so that each run gets what it asks for."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Each train() call may ask for another precision or accumulation; accelerate keeps these in
    # process-wide singletons, so clear them (the distributed process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    check_device_available(config.device)
    check_report_to(config)
    mp = config.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(
        mixed_precision=mp,
        gradient_accumulation_steps=config.grad_accum_steps,
        cpu=config.device == "cpu",
    )


@dataclass
class _Run:
    """What :func:`train` builds before its first step (:func:`_prepare`)."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    sampler: EpochSampler
    total: int
    steps_per_epoch: int


def _prepare(model: torch.nn.Module, train_data: Sequence[Any], config: TrainConfig,
             collate_fn: Callable[[list[Any]], Any] | None) -> _Run:
    """The accelerator, seeded data loader, AdamW (no decay on 1-d parameters), the learning-rate
    schedule and the number of optimizer steps."""
    from transformers import get_scheduler

    accelerator = make_accelerator(config)
    if config.device not in ("auto", "cpu") and accelerator.device.type != config.device:
        warnings.warn(f"device={config.device!r} asked for, training on {accelerator.device}",
                      stacklevel=3)
    torch.manual_seed(config.seed)  # fixes anything loss_fn draws at random
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    sampler = EpochSampler(len(train_data), config.seed)
    loader = torch.utils.data.DataLoader(
        train_data, batch_size=config.batch_size, sampler=sampler,
        collate_fn=collate_fn or pad_collate, drop_last=config.drop_last,
        # Its own generator: otherwise each new epoch's iterator draws from the global RNG,
        # and a run resumed mid-epoch would see different random numbers in loss_fn.
        generator=torch.Generator().manual_seed(config.seed),
    )
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    warn_lost_updates(model, config.lr)  # bf16 weights that lr cannot move (float32: silent)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # weight decay on matrices only, not on biases and norm gains
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if len(loader) == 0:
        raise ValueError(f"no batches: {len(train_data)} examples, batch_size "
                         f"{config.batch_size}, drop_last={config.drop_last}")
    steps_per_epoch = max(1, math.ceil(len(loader) / config.grad_accum_steps))
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    # Not prepared on purpose: accelerate would step it once per process.
    # transformers' "constant" ignores warm-up; "constant_with_warmup" is what we mean.
    name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    scheduler = get_scheduler(name, optimizer, config.warmup_steps, total)
    return _Run(accelerator, model, optimizer, scheduler, loader, sampler, total,
                steps_per_epoch)


def _resume(run: _Run, config: TrainConfig, ckpt_dir: Path | None
            ) -> tuple[History, int, int, int]:
    """``(history, step, epoch, batches used in the epoch)`` from the newest checkpoint in
    ``ckpt_dir`` (weights, optimizer, schedule and RNG states restored), or a fresh start."""
    found = list_checkpoints(ckpt_dir) if ckpt_dir else []
    if not found:
        return History(), 0, 0, 0
    state = load_checkpoint(found[-1], run.accelerator.unwrap_model(run.model), run.optimizer,
                            run.scheduler, run.accelerator.device)
    for key in ("batch_size", "grad_accum_steps", "seed"):
        if state["config"][key] != getattr(config, key):
            raise ValueError(f"{found[-1]} was written with {key}={state['config'][key]}, "
                             f"this run has {getattr(config, key)}: use another checkpoint_dir")
    run.accelerator.print(f"resuming from {found[-1]} (step {state['step']})")
    return (History(state["history"]), state["step"], state["epoch"],
            state["batches_in_epoch"])


class _Meter:
    """The metrics, tokens and busy time of the steps since the last logged row."""

    def __init__(self) -> None:
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.weights: dict[str, list[float]] = {}  # per metric and micro-batch (Pooled: count)
        self.tokens, self.busy, self.tokens_total, self.busy_total = 0, 0.0, 0, 0.0
        self.mark = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: Mapping[str, Any], batch: Any) -> None:
        for k, v in {"loss": loss, **metrics}.items():
            value, weight = _split_pooled(v)
            self.sums.setdefault(k, []).append(torch.as_tensor(value).detach().float() * weight)
            self.weights.setdefault(k, []).append(weight)
        self.tokens += count_tokens(batch)

    def pause(self) -> None:
        """Throughput counts training steps only (evaluation, checkpoints, logging excluded)."""
        self.busy += time.perf_counter() - self.mark

    def row(self, accelerator: Any) -> dict[str, float]:
        """The pooled metrics over every process and the tokens per second since the last row."""
        row, tokens = _reduce_metrics(accelerator, self.sums, self.tokens, self.weights)
        row["tokens_per_s"] = tokens / max(self.busy, 1e-9)
        self.busy_total, self.tokens_total = self.busy_total + self.busy, \
            self.tokens_total + tokens
        self.sums, self.weights, self.tokens, self.busy = {}, {}, 0, 0.0
        return row


def _accumulate(run: _Run, loss_fn: LossFn, window: list[Any], meter: _Meter,
                takes_num_tokens: bool, grad_accum_steps: int) -> None:
    """Forward and backward of one step's micro-batches; a NaN/inf loss on any process stops
    every process together, before the update and before anything is written."""
    accelerator, model = run.accelerator, run.model
    extra = {}
    if takes_num_tokens:  # the step's target tokens, over micro-batches and processes
        count = torch.tensor(float(sum(target_tokens(b) for b in window)),
                             device=accelerator.device)
        extra["num_tokens"] = accelerator.reduce(count, "sum") / (
            grad_accum_steps * accelerator.num_processes)
    for j, batch in enumerate(window):
        # Gradients are averaged over processes only at the last micro-batch.
        last = j == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss, metrics = loss_fn(model, batch, **extra)
            accelerator.backward(loss)  # divides by grad_accum_steps
        meter.add(loss, metrics, batch)
    check_finite_loss(torch.stack(meter.sums["loss"][-len(window):]), "the loss", accelerator)


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train_data: Sequence[Any],
    config: TrainConfig,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    callbacks: Sequence[Callable[[int, History, torch.nn.Module], Any]] | None = None,
) -> History:
    """Minimise ``loss_fn(model, batch)`` over ``train_data`` with AdamW; returns the History.

    Per optimizer step ``k`` (after ``grad_accum_steps`` micro-batches)::

        g_k = sum_j grad L(batch_j) / grad_accum_steps      (accelerator.backward; processes:
                                                             mean over processes, once per step)
        g_k <- g_k * min(1, max_grad_norm / ||g_k||)        (clip_grad_norm_)
        theta <- AdamW(theta, g_k, lr_k, weight_decay)      (no decay on 1-d params)
        lr_k = lr * k / warmup            for k < warmup_steps, then cosine/linear/constant

    ``train_data`` is a list (or map-style dataset) of examples, batched by ``collate_fn``
    (default :func:`rlcourse.data.pad_collate`). Every ``checkpoint_every`` steps and at the end
    the full state goes to ``checkpoint_dir/step-XXXXXXXX``; a later call with the same
    ``checkpoint_dir`` resumes from the newest one and ends exactly where an uninterrupted run
    would.
    ``eval_fn(model) -> metrics`` runs every ``eval_every`` steps and at the end (under
    ``torch.no_grad``, in eval mode). ``callbacks(step, history, model)`` run after each step;
    one that returns ``True`` stops training. ``config.device``: ``"auto"`` (accelerate's choice:
    the GPU if there is one), ``"cpu"``, or ``"cuda"``/``"mps"`` (an error if unavailable).
    A NaN/inf loss or weight stops the run (:class:`rlcourse.guards.NonFiniteError`) before
    anything from that step is written.
    """
    from tqdm.auto import tqdm

    run = _prepare(model, train_data, config, collate_fn)
    accelerator, model, optimizer, scheduler = run.accelerator, run.model, run.optimizer, \
        run.scheduler
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    history, step, epoch, skip = _resume(run, config, ckpt_dir)
    takes_num_tokens = _takes_num_tokens(loss_fn)
    runlog = RunLog(accelerator, config, history.rows)
    evaluated_at = None

    def evaluate() -> None:
        nonlocal evaluated_at
        model.eval()
        with torch.no_grad():
            history.log(step, **{k: float(v) for k, v in eval_fn(model).items()})
        model.train()
        evaluated_at = step

    bar = tqdm(total=run.total, initial=step, desc="train",
               disable=not (config.progress and accelerator.is_local_main_process))
    meter, stop = _Meter(), step >= run.total
    model.train()
    try:
        while not stop:
            run.sampler.set_epoch(epoch)
            if hasattr(run.loader, "set_epoch"):
                run.loader.set_epoch(epoch)
            for end, window in _windows(run.loader, config.grad_accum_steps, skip):
                with stop_nonfinite("optimizer", step + 1, ckpt_dir, config.lr):
                    _accumulate(run, loss_fn, window, meter, takes_num_tokens,
                                config.grad_accum_steps)
                grad_norm = accelerator.clip_grad_norm_(
                    model.parameters(), config.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad()
                if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: no step
                    scheduler.step()
                step += 1
                bar.update(1)
                if step % config.log_every == 0 or step == run.total:
                    if accelerator.device.type == "cuda":
                        torch.cuda.synchronize(accelerator.device)  # the step's kernels count
                    meter.pause()
                    row = meter.row(accelerator)
                    with stop_nonfinite("optimizer", step, ckpt_dir, config.lr):
                        check_finite_weights(model, accelerator)
                    history.log(step, **row, lr=scheduler.get_last_lr()[0],
                                grad_norm=float(grad_norm), epoch=step / run.steps_per_epoch,
                                peak_mem_mb=peak_memory(accelerator.device)[0] / 2**20)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                else:
                    meter.pause()
                if eval_fn is not None and (
                        (config.eval_every and step % config.eval_every == 0)
                        or step >= run.total):
                    evaluate()
                runlog.flush(history)  # the step's row is complete: training + evaluation
                if ckpt_dir and (step == run.total or (config.checkpoint_every
                                                       and step % config.checkpoint_every == 0)):
                    _checkpoint(run, config, ckpt_dir, history, step, epoch, end)
                replies = [cb(step, history, model) for cb in callbacks or ()]
                if any(r is True for r in replies) or step >= run.total:
                    stop = True
                    break
                meter.mark = time.perf_counter()
            else:  # the epoch ran to its end
                epoch, skip = epoch + 1, 0
        with stop_nonfinite("optimizer", step, ckpt_dir, config.lr):
            check_finite_weights(model, accelerator)  # the caller saves the model next
        if eval_fn is not None and evaluated_at != step:
            evaluate()
            runlog.rewrite(history.rows)  # the last row gained its evaluation
        history.totals = {"tokens": meter.tokens_total, "step_seconds": meter.busy_total}
    finally:
        bar.close()
        runlog.close()
        # Remove accelerate's autocast wrapper from the caller's model.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return history


def target_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """The tokens :func:`sft_loss_fn` predicts in a batch: ``sum_{b,t>=1} m_bt`` with ``m`` the
    ``completion_mask`` (or, without one, the ``attention_mask``); the first token of a row is
    never a target."""
    mask = batch.get("completion_mask", batch["attention_mask"])
    return int(mask[:, 1:].sum().item())


def loss_eval_fn(loss_fn: LossFn, data: Sequence[Any], batch_size: int,
                 collate_fn: Callable[[list[Any]], Any] | None = None, prefix: str = "eval_"
                 ) -> Callable[[torch.nn.Module], dict[str, float]]:
    """``eval_fn(model)`` for :func:`train`: ``loss_fn`` and its metrics on held-out ``data``.

    ``eval_<name> = sum_b n_b * metric_b / sum_b n_b`` over batches ``b`` of ``n_b`` examples
    (in order, no shuffling): for a loss that is a mean over examples (DPO, IPO, KTO, ...,
    ``sft_loss_fn(reduction="sequence")``) the exact mean over the whole set. Every process
    evaluates the whole set, so the numbers do not depend on the number of processes.
    """
    if not len(data):
        raise ValueError("no evaluation examples")
    collate = collate_fn or pad_collate

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # a metric may be absent from a batch (KTO: one label only)
        for s in range(0, len(data), batch_size):
            chunk = [data[i] for i in range(s, min(s + batch_size, len(data)))]
            loss, metrics = loss_fn(model, collate(chunk))
            for k, v in {"loss": loss, **metrics}.items():
                # a Pooled metric weighs its own count; a batch mean, the batch's size
                value, weight = (v.mean, v.count) if isinstance(v, Pooled) else (v, len(chunk))
                sums[k] = sums.get(k, 0.0) + weight * float(torch.as_tensor(value).float())
                counts[k] = counts.get(k, 0) + weight
        return {f"{prefix}{k}": v / counts[k] for k, v in sums.items()}

    return evaluate


def sft_loss_fn(model: Any, batch: Mapping[str, torch.Tensor], reduction: str = "token",
                num_tokens: torch.Tensor | float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning loss: negative log-likelihood of the completion tokens.

    ``reduction="token"``: ``L = -sum_{b,t} m_bt log pi(y_bt | ...) / N`` (every completion
    token weighs the same, the usual choice), where ``N = sum_{b,t} m_bt`` is this batch's
    target tokens, or ``num_tokens`` when given;
    ``reduction="sequence"``: ``L = mean_b [ -sum_t m_bt log pi / sum_t m_bt ]`` (a mean over
    examples, which makes gradient accumulation exactly equal to one large batch).
    Without a ``completion_mask`` every real token is a target (plain language modelling).

    :func:`train` passes ``num_tokens = (target tokens of the optimizer step, summed over its
    micro-batches and processes) / (grad_accum_steps * num_processes)``: after accelerate's
    division by ``grad_accum_steps`` and DDP's mean over processes, the gradient is that of
    ``-sum(token log-probs of the global batch) / (its target tokens)``, what one process
    with the whole batch computes. ``nll_per_token`` uses the same denominator, so its mean
    over micro-batches and processes is the global batch's per-token NLL; ``ppl`` is the
    perplexity of this micro-batch alone.
    """
    mask = batch.get("completion_mask", batch["attention_mask"])
    lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], mask,
                           reduce="none")
    m = mask[:, 1:].to(lp.dtype)
    denom = m.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    if reduction == "token":
        loss = -lp.sum() / denom
    elif reduction == "sequence":
        loss = (-lp.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    else:
        raise ValueError(f"reduction must be 'token' or 'sequence', got {reduction!r}")
    own = (-lp.sum() / m.sum().clamp(min=1.0)).detach()  # this micro-batch's per-token NLL
    return loss, {"nll_per_token": (-lp.sum() / denom).detach(), "ppl": torch.exp(own)}
