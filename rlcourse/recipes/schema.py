"""What a validated recipe is: :class:`Recipe` (the top-level keys, the ``loss`` and ``lora``
sections, and the method's own sections by name) and the ``rollout`` sections of the sampling
methods (:class:`PPORollout`, :class:`GroupRollout`), each field documented where it is declared
(``recipes/REFERENCE.md`` is generated from these docs) and range-checked in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from rlcourse.config import (
    COUNT,
    DEVICE,
    NON_NEGATIVE,
    POSITIVE,
    REPORT_TO,
    FieldRangeError,
    check_ranges,
    one_of,
)
from rlcourse.engine import RL_LR_DECAYS
from rlcourse.recipes.typed import where

__all__ = ["GroupRollout", "PPORollout", "Recipe"]

_CHECKPOINTS = (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
_DECAY = (one_of(*RL_LR_DECAYS), f"one of {', '.join(RL_LR_DECAYS)}")


def _decay_needs_steps(rollout: Any) -> None:
    """A linear decay runs from the end of the warm-up to the last step: it needs one."""
    if rollout.lr_decay == "linear" and rollout.steps <= rollout.warmup_steps:
        raise FieldRangeError("lr_decay", rollout.lr_decay,
                              f"constant when steps ({rollout.steps}) <= warmup_steps "
                              f"({rollout.warmup_steps})")


_MULTIPLIERS = (lambda v: all(isinstance(q, str) and POSITIVE[0](f) and not isinstance(f, bool)
                              for q, f in v.items()),
                "a mapping of parameter-name patterns to numbers > 0")


@dataclass
class PPORollout:
    """The ``rollout`` section of a PPO recipe: how many steps, how much is sampled per step.

    ``steps`` PPO iterations of ``batch_size`` prompts, each answered with at most
    ``max_new_tokens`` tokens; Adam at learning rate ``lr``. ``separate_critic``: actor and
    critic as two networks (DeepSpeed-Chat, the slides' four models) instead of one backbone
    with a value head. Every ``checkpoint_every`` steps (0: only at the end) actor, critic,
    Adam, RNG states, KL coefficient and step go to ``OUTPUT/checkpoints`` (the newest
    ``keep_checkpoints`` kept); rerunning the same command resumes. ``device``: ``auto`` or
    ``cpu`` (several processes over gloo); each of N processes answers ``batch_size / N``
    prompts of every step.
    """

    steps: int = 100
    """PPO iterations (sample a batch, score it, update)."""
    batch_size: int = 16
    """Prompts per iteration, over all processes (each of N answers ``batch_size / N``)."""
    max_new_tokens: int = 64
    """Longest answer sampled, in tokens."""
    lr: float = 1e-6
    """Adam learning rate of actor and critic, reached after ``warmup_steps``."""
    warmup_steps: int = 0
    """Iterations of linear warm-up: iteration ``k <= warmup_steps`` uses
    ``lr * k / warmup_steps``; 0: ``lr`` from the first."""
    lr_decay: str = "constant"
    """After the warm-up: ``"constant"`` holds ``lr``; ``"linear"`` falls to
    ``lr / (steps - warmup_steps)`` at the last iteration (the shape of TRL's default)."""
    separate_critic: bool = True
    """Actor and critic as two networks (DeepSpeed-Chat) instead of one backbone with a value
    head."""
    checkpoint_every: int = 10
    """Iterations between checkpoints in ``OUTPUT/checkpoints``; 0: only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    device: str = "auto"
    """``"auto"`` or ``"cpu"`` (several processes over gloo)."""
    eval_every: int = 0
    """Steps between evaluations on the recipe's ``eval_data`` prompts (one answer sampled per
    prompt with a fixed seed, scored by the reward model: ``eval/reward`` in the history); with
    ``eval_data``, also at the end. 0: only at the end."""
    report_to: str = "none"
    """``"none"`` or ``"tensorboard"``: each history row also as TensorBoard scalars in
    ``OUTPUT/tensorboard``."""

    RANGES: ClassVar[dict[str, tuple[Any, str]]] = {
        "steps": COUNT, "batch_size": COUNT, "max_new_tokens": COUNT, "lr": POSITIVE,
        "warmup_steps": _CHECKPOINTS, "lr_decay": _DECAY,
        "checkpoint_every": _CHECKPOINTS, "keep_checkpoints": COUNT, "device": DEVICE,
        "eval_every": _CHECKPOINTS, "report_to": REPORT_TO,
    }

    def __post_init__(self) -> None:
        check_ranges(self)
        _decay_needs_steps(self)


@dataclass
class GroupRollout:
    """The ``rollout`` section of a GRPO or RLOO recipe (:func:`rlcourse.grpo.train_group_lm`).

    ``steps`` updates, each on ``group.n_prompts`` prompts x ``group.group_size`` answers of at
    most ``max_new_tokens`` tokens; AdamW at ``lr`` with ``weight_decay``. ``device``:
    ``auto`` (a GPU per process if there is one) or ``cpu`` (several processes talk over gloo);
    ``mixed_precision``: ``no``, ``bf16``, ``fp16`` or ``auto``. Every ``checkpoint_every`` steps
    (0: only at the end) the policy, optimizer, RNG states and step go to
    ``OUTPUT/checkpoints`` (the newest ``keep_checkpoints`` kept); rerunning the same command
    resumes.
    """

    steps: int = 100
    """Updates, each on ``group.n_prompts * group.group_size`` answers."""
    max_new_tokens: int = 64
    """Longest answer sampled, in tokens."""
    lr: float = 1e-6
    """AdamW learning rate, reached after ``warmup_steps``."""
    warmup_steps: int = 0
    """Steps of linear warm-up: step ``k <= warmup_steps`` uses ``lr * k / warmup_steps``;
    0: ``lr`` from the first step."""
    lr_decay: str = "constant"
    """After the warm-up: ``"constant"`` holds ``lr``; ``"linear"`` falls to
    ``lr / (steps - warmup_steps)`` at the last step (the shape of TRL's default schedule)."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Parameter-name glob -> factor: the parameters it names learn at ``lr * factor``
    (:func:`rlcourse.engine.lr_param_groups`), e.g. ``{model.norm.weight: 50}`` for the final
    norm's gain, the model's inverse temperature (chapter 17). A pattern that names no
    trainable parameter is an error. Empty: one rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    device: str = "auto"
    """``"auto"`` (a GPU per process if there is one) or ``"cpu"`` (gloo)."""
    mixed_precision: str = "no"
    """``"no"``, ``"bf16"``, ``"fp16"`` or ``"auto"``."""
    checkpoint_every: int = 10
    """Steps between checkpoints in ``OUTPUT/checkpoints``; 0: only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    eval_every: int = 0
    """Steps between evaluations on the recipe's ``eval_data`` prompts (one answer sampled per
    prompt with a fixed seed, scored by the reward: ``eval/reward`` in the history); with
    ``eval_data``, also at the end. 0: only at the end."""
    report_to: str = "none"
    """``"none"`` or ``"tensorboard"``: each history row also as TensorBoard scalars in
    ``OUTPUT/tensorboard``."""

    RANGES: ClassVar[dict[str, tuple[Any, str]]] = {
        "steps": COUNT, "max_new_tokens": COUNT, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
        "warmup_steps": _CHECKPOINTS, "device": DEVICE,
        "lr_multipliers": _MULTIPLIERS, "lr_decay": _DECAY,
        "mixed_precision": (one_of("no", "bf16", "fp16", "auto"), "one of no, bf16, fp16, auto"),
        "checkpoint_every": _CHECKPOINTS, "keep_checkpoints": COUNT,
        "eval_every": _CHECKPOINTS, "report_to": REPORT_TO,
    }

    def __post_init__(self) -> None:
        check_ranges(self)
        _decay_needs_steps(self)


@dataclass
class Recipe:
    """A validated recipe: where things are, and the trainer's configuration.

    ``sections`` holds the method's own sections by name (``train``: an
    :class:`rlcourse.engine.TrainConfig`; PPO's ``ppo`` and ``rollout``; ...: the sections its
    registry row declares, :mod:`rlcourse.recipes.registry`), each also readable as an attribute
    (``recipe.train``; ``None`` for a section the method does not have). ``loss`` holds the loss
    function's keyword arguments, ``source`` the file.
    """

    method: str
    """The method: a row of the registry (``python -m rlcourse.recipes --help`` lists them):
    sft, reward_model, ppo, grpo, rloo, online_dpo, rsft, or a preference loss of
    ``rlcourse.losses.OBJECTIVES`` (dpo, ipo, rdpo, kto, orpo, simpo, hinge, robust)."""
    model: str
    """A local directory holding a causal LM and its tokenizer (the starting policy), or a LoRA
    adapter folder (a LoRA run's ``OUTPUT/model``), merged into its base first; a Hub id
    ``org/name`` is refused (download it first)."""
    output: str
    """Directory of the run: the trained model, checkpoints, history and ``recipe.json``."""
    data: str | None = None
    """JSONL training data, plain text or TRL's conversational form (:mod:`rlcourse.data`)."""
    eval_data: str | None = None
    """Held-out JSONL rows: loss and metrics every ``train.eval_every`` steps and at the end."""
    prompts: str | None = None
    """JSONL of ``{"prompt"}`` rows (PPO, GRPO, RLOO, online DPO, RSFT)."""
    reward_model: str | None = None
    """Directory of a trained reward model (PPO; GRPO, RLOO, online DPO, RSFT unless
    ``reward_fn``): a ``...ForSequenceClassification`` with ``num_labels=1`` (what the
    reward_model recipe saves; TRL's too) or the older causal LM + ``reward_head.safetensors``.
    It scores the prompt and answer TEXT, tokenised with its own tokenizer."""
    reference_model: str | None = None
    """A separate reference model directory; default: a frozen copy of ``model``."""
    max_length: int = 512
    """Longest prompt + completion, in tokens; must fit the model's position embeddings."""
    truncation: str = "error"
    """What an over-long example does: ``error``, ``left`` or ``right`` (the side cut); pairs the
    cut makes identical are dropped with a count (every method that reads rows, the reward
    model included)."""
    dtype: str | None = None
    """Precision of the trained model: ``null``/``fp32`` (float32; the section's
    ``mixed_precision`` decides the compute), ``bf16``/``fp16`` (float32 master weights, forward
    and backward under bf16/fp16 autocast: sets ``mixed_precision``), ``auto`` (as ``bf16`` or
    ``fp16`` when the checkpoint was saved so, else float32), ``bf16-pure`` (the weights, their
    gradients and AdamW state in bf16: half the memory, but an update smaller than half a
    weight's bf16 spacing, ``lr < ulp(w)/2``, i.e. ``lr/|w|`` below 2^-9..2^-8, is lost; a
    warning says what share of the weights the lr cannot move). Frozen models (reference,
    reward model) are loaded in the named dtype."""
    trust_remote_code: bool = False
    """Run the model directory's own Python code when loading (a YAML boolean)."""
    seed: int = 0
    """Seed of the run: ``train.seed`` defaults to it; it also seeds the sampling and the
    initialisation of LoRA adapters and value heads."""
    loss: dict[str, Any] = field(default_factory=dict)
    """The section of the loss function's keyword arguments (e.g. ``beta``); defaults in
    ``rlcourse.losses.DEFAULTS``."""
    reward_fn: str | None = None
    """``module:function`` called as ``fn(prompts, completions)`` -> one float per completion,
    instead of ``reward_model``."""
    disable_dropout: bool = True
    """Train with dropout off (preference methods and reward_model)."""
    lora: Any = None
    """The ``lora`` section (:class:`rlcourse.adapters.LoraSettings`); absent: full fine-tuning."""
    reference_batch_size: int = 64
    """Sequences per forward pass of the reference-log-prob pass (DPO, IPO, R-DPO, KTO, ...)."""
    source: str = "<recipe>"
    """The recipe file (set by :func:`load_recipe`; not a key)."""
    lines: dict[str, int] = field(default_factory=dict, repr=False)
    """Line of each key in the file, for error messages (not a key)."""
    sections: dict[str, Any] = field(default_factory=dict)
    """The method's sections by name, each a dataclass (not a key: each section is one)."""

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: a section of any registered method reads as its
        # dataclass, or None when this recipe's method has no such section.
        if not name.startswith("_"):
            from rlcourse.recipes.registry import section_names

            if name in section_names():
                return self.__dict__.get("sections", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``OUTPUT/recipe.json`` records): the top-level keys,
        then each of the method's sections as a mapping."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("lines", "sections")}
        if out["lora"] is not None:
            out["lora"] = out["lora"].to_dict()
        for name, value in self.sections.items():
            out[name] = asdict(value)
        return out

    def value(self, key: str) -> Any:
        """The value of dotted key ``key`` (``"train.lr"``, ``"max_length"``)."""
        head, _, rest = key.partition(".")
        obj = getattr(self, head)
        return getattr(obj, rest) if rest else obj

    def where(self, key: str) -> str:
        """``"file:line: key"`` for error messages about ``key`` (a dotted path)."""
        return where(self.source, self.lines, key)
