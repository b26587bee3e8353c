"""Layer 2: fitting a real model in memory: LoRA adapters (through ``peft``) and gradient
checkpointing.

**LoRA** (Hu et al., 2021) freezes every weight ``W0`` of the model and learns a low-rank
update of chosen linear layers::

    h = W0 x + (alpha / r) * B A x,      A: r x d_in,  B: d_out x r,  B = 0 at the start

so the adapted model *is* the base model before the first step, and only ``r (d_in + d_out)``
numbers per adapted layer are trained (their gradients and AdamW states are the only ones in
memory). Switching the adapters off gives the base model back exactly, which is why a
preference method needs no second copy of the model for its reference:
``log pi_ref(y|x)`` is the policy's log-prob with the adapters disabled
(:func:`adapters_disabled`).

**Gradient checkpointing** keeps only the input of every decoder layer in the forward pass and
recomputes the layer's activations during backward: activation memory drops from
``L * (per-layer activations)`` to ``L * (layer input) + one layer``, at the price of a second
forward pass (about +33 % compute). Gradients are identical.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from rlcourse.models import load_model, load_tokenizer

__all__ = [
    "LoraSettings",
    "adapters_disabled",
    "apply_lora",
    "enable_gradient_checkpointing",
    "is_lora",
    "linear_layer_names",
    "load_lora",
    "lora_parameter_count",
    "merge_lora",
    "trainable_parameter_count",
]


@dataclass
class LoraSettings:
    """The ``lora:`` section of a recipe (``peft.LoraConfig`` underneath).

    ``r`` rank, ``alpha`` scale (the update is ``alpha / r * B A``), ``dropout`` on the adapter's
    input, ``target_modules``: ``"all-linear"`` (every linear layer but the output layer, as in
    QLoRA) or a list of module names such as ``["q_proj", "v_proj"]``. ``merge``: besides the
    adapter, also save the merged full model (``OUTPUT/merged``), loadable by
    ``AutoModelForCausalLM.from_pretrained`` without ``peft``.
    """

    r: int = 16
    """Rank of the adapter matrices ``B`` (d x r) and ``A`` (r x k)."""
    alpha: float = 32.0
    """Scale: the update is ``alpha / r * B A``."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""
    target_modules: Any = "all-linear"
    """``"all-linear"`` (every linear layer but the output layer) or a list of module names such as
    ``["q_proj", "v_proj"]``."""
    merge: bool = False
    """Also save the merged full model to ``OUTPUT/merged`` (loadable without peft)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further ``peft.LoraConfig`` arguments (not a recipe key)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) \
                or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.merge, bool):
            raise ValueError(f"merge must be true or false, got {self.merge!r}")
        tm = self.target_modules
        ok = isinstance(tm, str) and tm.strip() or (
            isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm))
        if not ok:
            raise ValueError("target_modules must be 'all-linear' or a non-empty list of module "
                             f"names, got {tm!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


def is_lora(model: Any) -> bool:
    """True for a ``peft`` model (adapters injected)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def linear_layer_names(model: Any) -> set[str]:
    """The last name part of every linear layer LoRA can adapt (``q_proj``, ``down_proj``; for
    GPT-2's ``Conv1D``, ``c_attn``, ``c_fc``, ...), the output layer excluded: what
    ``lora.target_modules`` may list."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if (isinstance(module, torch.nn.Linear) or kind == "Conv1D") and module is not output:
            names.add(name.rsplit(".", 1)[-1])
    return names


def apply_lora(model: Any, settings: LoraSettings | Mapping[str, Any] | None = None,
               seed: int = 0) -> Any:
    """Wrap a causal LM with LoRA adapters: every base weight frozen, only ``A`` and ``B`` train.

    ``A`` is initialised at random (``seed`` fixes it without touching the global RNG), ``B`` at
    zero, so the wrapped model computes exactly what ``model`` computed. Returns the
    ``peft.PeftModel``; the base model is modified in place (its linear layers gain adapters).
    """
    from peft import LoraConfig, get_peft_model

    if settings is None:
        settings = LoraSettings()
    elif isinstance(settings, Mapping):
        settings = LoraSettings(**settings)
    tm = settings.target_modules
    if not isinstance(tm, str):
        names = linear_layer_names(model)
        missing = [t for t in tm if t not in names]
        if missing:  # peft's own message names neither the model's layers nor the key
            raise ValueError(f"lora.target_modules: {', '.join(map(repr, missing))} match no "
                             f"linear layer of {type(model).__name__}; its linear layers are "
                             f"{', '.join(sorted(names)) or 'none'} (or use 'all-linear')")
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=float(settings.dropout),
        target_modules=tm if isinstance(tm, str) else list(tm), bias="none",
        task_type="CAUSAL_LM", **settings.extra,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft asks the model `is_gradient_checkpointing`, which transformers 5 deprecates.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:  # e.g. a target module name that the model does not have
            raise ValueError(f"LoRA: {err}") from None
    return peft_model


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[Any]:
    """``with adapters_disabled(model) as base:`` the model computes as the base model.

    For a LoRA model this is ``model.disable_adapter()`` (the reference model of DPO, IPO,
    R-DPO and KTO under LoRA: no second copy of the weights); any other model is returned as is.
    """
    if is_lora(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def load_lora(path: Any, base: Any = None, device: str = "auto", dtype: Any = None
              ) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from an adapter directory (a LoRA recipe's ``OUTPUT/model``).

    ``base``: the base model's directory; by default the one ``adapter_config.json`` names
    (``base_model_name_or_path``, the recipe's ``model``). The base is read with
    :func:`rlcourse.models.load_model`, the adapters put on top (``peft``); the tokenizer is the
    one saved with the adapter.
    """
    import json
    from pathlib import Path

    from peft import PeftModel

    path = Path(path)
    config = path / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing (not a LoRA adapter directory)")
    if base is None:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{config}: names no base model; pass base=")
    model, _ = load_model(base, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        model = PeftModel.from_pretrained(model, path)
    model.eval()
    return model, load_tokenizer(path)


def merge_lora(model: Any) -> Any:
    """Fold the adapters into the base weights, ``W = W0 + alpha/r * B A``, and return the plain
    ``transformers`` model (``peft``'s ``merge_and_unload``; in place: the adapters are gone)."""
    if not is_lora(model):
        raise ValueError("merge_lora: the model has no LoRA adapters")
    return model.merge_and_unload()


def lora_parameter_count(model: Any) -> int:
    """Numbers in the adapters: ``sum over adapted layers of r (d_in + d_out)``."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def trainable_parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _checkpointable(model: Any) -> Any:
    """The ``transformers`` model inside ``model`` that knows how to checkpoint its layers
    (the model itself, a ``peft`` wrapper's base, or the backbone of a reward/value head)."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "gradient_checkpointing_enable"):
            return candidate
    raise ValueError(f"{type(model).__name__} does not support gradient checkpointing "
                     "(it is not a transformers model)")


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations.

    Non-reentrant ``torch.utils.checkpoint`` (``use_reentrant=False``): exact gradients, and
    correct even when the layer's inputs do not require grad. Under LoRA the embeddings are
    frozen, so the input of the first layer carries no gradient; ``enable_input_require_grads``
    makes it require one, which the reentrant variant needs and which does no harm here.
    Checkpointing is active only in training mode (``model.train()``), as in ``transformers``.
    """
    target = _checkpointable(model)
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if is_lora(model) or is_lora(target):
        target.enable_input_require_grads()
    config = getattr(target, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache is useless in training and clashes with recompute
