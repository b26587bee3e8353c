"""A linear head on a causal LM: the value head (PPO) and the reward model."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlcourse.config import resolve_device
from rlcourse.models.construction import build_model
from rlcourse.models.io import (
    _architectures,
    _as_dtype,
    _quiet_transformers,
    load_causal_lm,
    local_model_dir,
    save_model,
)
from rlcourse.models.scoring import call_model
from rlcourse.rl import last_token_index


# --------------------------------------------------------------------------------------------
# Value head and reward model
# --------------------------------------------------------------------------------------------
def _hidden_size(model: Any) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size


def _init_head(head: nn.Linear, std: float, seed: int | None) -> None:
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)


def freeze_untied_lm_head(model: Any) -> bool:
    """Stop training the output layer of a causal LM whose output is not used (a reward model,
    PPO's separate critic), unless it is tied to the input embeddings (then it is used).

    Returns whether it froze it. A trainable parameter without a gradient stalls DDP ("Expected
    to have finished reduction in the prior iteration") and is skipped by Adam anyway.
    """
    out = getattr(model, "get_output_embeddings", lambda: None)()
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    if out is None or (emb is not None and out.weight is emb.weight):
        return False
    out.requires_grad_(False)
    return True


class _HeadModel(nn.Module):
    """Shared save/load for a causal LM with a linear head on its last hidden state."""

    HEAD_FILE = "head.safetensors"
    KIND = "head"

    def __init__(self, model: Any, seed: int | None = 0) -> None:
        super().__init__()
        self.model = model
        h = _hidden_size(model)
        self.head = nn.Linear(h, 1)
        _init_head(self.head, 1.0 / math.sqrt(h + 1), seed)
        p = next(model.parameters())
        self.head.to(device=p.device)

    @property
    def config(self) -> Any:
        return self.model.config

    def _write(self, path: Path, tokenizer: Any = None) -> None:
        from safetensors.torch import save_file

        self.model.save_pretrained(path, safe_serialization=True)
        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in self.head.state_dict().items()}
        save_file(state, str(path / self.HEAD_FILE))
        (path / "rlcourse_head.json").write_text(json.dumps({"kind": self.KIND}))

    def save_pretrained(self, path: str | os.PathLike, tokenizer: Any = None) -> Path:
        """Atomically save the backbone (``save_pretrained``), the head (safetensors) and,
        if given, the tokenizer."""
        return save_model(self, tokenizer, path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str = "auto", dtype: Any = None,
        trust_remote_code: bool = False,
    ):
        """Load a model saved by :meth:`save_pretrained` (backbone + head)."""
        from safetensors.torch import load_file

        path = local_model_dir(path, cls.KIND + " model")
        backbone = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
        obj = cls(backbone, seed=None)
        head_file = path / cls.HEAD_FILE
        if not head_file.exists():
            raise FileNotFoundError(f"{head_file}: missing ({cls.__name__} head weights)")
        obj.head.load_state_dict(load_file(str(head_file)))
        obj.to(resolve_device(device))
        obj.eval()
        return obj

    @classmethod
    def build(cls, tokenizer: Any, *, seed: int = 0, **config_kwargs: Any):
        """A fresh tiny backbone (see :func:`build_model`) with a head."""
        return cls(build_model(tokenizer, seed=seed, **config_kwargs), seed=seed + 1)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: bool):
        if logits:
            out = call_model(self.model, input_ids, attention_mask, output_hidden_states=True)
            return out.logits, out.hidden_states[-1]
        # Without logits: run only the decoder (no [B, T, V] tensor).
        h = call_model(self.model.base_model, input_ids, attention_mask).last_hidden_state
        return None, h


class ValueHeadModel(_HeadModel):
    """A causal LM with a value head: ``V(s_t) = w^T h_t + b`` on the last hidden state.

    ``forward(input_ids, attention_mask) -> (logits [B, T, V], values [B, T])``; ``values[:, t]``
    is the value of the state that ends with token ``t``. Share the backbone for an actor-critic
    or wrap a separate copy for a separate critic.
    """

    HEAD_FILE = "value_head.safetensors"
    KIND = "value"

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, h = self._hidden(input_ids, attention_mask, logits=True)
        values = self.head(h.to(self.head.weight.dtype)).squeeze(-1)
        return logits, values


class RewardModel(_HeadModel):
    """A scalar reward per sequence: ``r(x, y) = w^T h_last + b``, where ``h_last`` is the last
    hidden state at the LAST real token (found from the attention mask, so left and right
    padding give the same reward).

    Wraps any causal LM backbone (only its decoder runs; the LM head is unused).
    ``forward(input_ids, attention_mask) -> rewards [B]``.

    Saved (:meth:`save_pretrained`, :func:`rlcourse.models.save_model`) as the
    ``transformers`` sequence classifier of the backbone's architecture
    (``LlamaForSequenceClassification``, ...: the decoder's weights, ``score.weight = w``,
    ``num_labels=1``, ``pad_token_id`` set), which
    ``AutoModelForSequenceClassification.from_pretrained`` loads with its trained head, as TRL
    and other tools do. Its ``score`` has no bias: ``b`` is frozen at 0 (the Bradley–Terry loss
    reads ``r_w - r_l``, so ``b`` has no gradient, only round-off that Adam would turn into a
    random walk of about ``lr`` per step). That classifier reads the reward at the rightmost
    token that is not the pad token, the same token as here when the pad token differs from EOS
    (a tokenizer whose pad token IS its EOS makes it read one token earlier, before the final
    EOS: a warning says so).
    :meth:`from_pretrained` reads that format and the older one (the causal LM plus
    ``reward_head.safetensors``, with its bias).
    """

    HEAD_FILE = "reward_head.safetensors"
    KIND = "reward"

    def __init__(self, model: Any, seed: int | None = 0) -> None:
        super().__init__(model, seed)
        # The LM head never takes part in a reward. Untied from the input embeddings, it would
        # be a trainable parameter without a gradient: DDP then waits for its gradient forever
        # ("Expected to have finished reduction...") and AdamW skips it anyway. Freezing it
        # changes nothing in one process and lets several processes train without
        # find_unused_parameters (an extra graph traversal every step).
        freeze_untied_lm_head(model)
        # The bias b is not trained: every loss of a reward model reads differences r_w - r_l,
        # so its true gradient is 0, and what autograd returns is the round-off of summing
        # +g and -g over the batch (~1e-9), which Adam divides by its own square root into
        # steps of size lr: b would random-walk by about lr per step, shifting every reward.
        # Frozen, b stays 0 and the saved ...ForSequenceClassification (no bias) is exact.
        self.head.bias.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _, h = self._hidden(input_ids, attention_mask, logits=False)
        idx = last_token_index(attention_mask)
        h_last = h[torch.arange(h.shape[0], device=h.device), idx]
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1)

    def sequence_classifier(self, tokenizer: Any = None) -> Any:
        """The ``transformers`` ``...ForSequenceClassification`` of the backbone's architecture
        computing the same rewards: it shares this model's decoder (no copy) and holds
        ``score.weight = w``; ``num_labels=1``; ``pad_token_id`` from ``tokenizer`` (else the
        backbone's config). A non-zero bias ``b`` cannot be carried (``score`` has none): a
        ``ValueError``."""
        from transformers import AutoModelForSequenceClassification

        bias = self.head.bias.detach()
        if float(bias.abs().max()) != 0.0:
            raise ValueError(
                f"the reward head's bias is {float(bias[0]):.6g}, which a "
                "...ForSequenceClassification score layer cannot hold (it has no bias); "
                "RewardModel keeps it frozen at 0, so this head was set by hand or loaded from "
                "the older format: set it to 0 (every reward shifts by that constant, which no "
                "pairwise loss sees) before saving")
        config = copy.deepcopy(self.model.config)
        config.num_labels = 1
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is not None:
            config.pad_token_id = pad
        eos = getattr(tokenizer, "eos_token_id", None)
        if config.pad_token_id is None or config.pad_token_id == eos:
            warnings.warn("the reward model is saved with pad_token_id "
                          f"{config.pad_token_id} (its EOS or none): AutoModelForSequence"
                          "Classification reads the reward at the last token that is not the "
                          "pad token, before a final EOS, where RewardModel reads it at the EOS; "
                          "give the tokenizer a pad token distinct from EOS", stacklevel=3)
        with torch.device("meta"):  # a shell: its decoder is replaced by this model's below
            classifier = AutoModelForSequenceClassification.from_config(config)
        if not isinstance(getattr(classifier, "score", None), nn.Linear):
            raise ValueError(f"{type(classifier).__name__} has no 'score' layer to hold the "
                             "reward head; save it with RewardModel's older format instead")
        setattr(classifier, classifier.base_model_prefix, self.model.base_model)
        classifier.score = nn.Linear(self.head.in_features, 1, bias=False)
        classifier.score.weight = nn.Parameter(self.head.weight.detach().clone())
        return classifier

    def _write(self, path: Path, tokenizer: Any = None) -> None:
        self.sequence_classifier(tokenizer).save_pretrained(path, safe_serialization=True)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str = "auto", dtype: Any = None,
        trust_remote_code: bool = False,
    ):
        """Load a reward model: a ``...ForSequenceClassification`` folder with ``num_labels=1``
        (what :meth:`save_pretrained` writes, and what TRL's ``RewardTrainer`` saves), or the
        older format, a causal LM plus ``reward_head.safetensors``."""
        path = local_model_dir(path, "reward model")  # before importing transformers (seconds)
        if (path / cls.HEAD_FILE).is_file():
            return super().from_pretrained(path, device=device, dtype=dtype,
                                           trust_remote_code=trust_remote_code)
        kinds = _architectures(path)
        if not any(a.endswith("ForSequenceClassification") for a in kinds):
            raise FileNotFoundError(
                f"{path}: not a reward model: neither a ...ForSequenceClassification "
                f"(config.json names {', '.join(kinds) or 'no architecture'}) nor the older "
                f"format with {cls.HEAD_FILE}")
        from transformers import AutoModelForSequenceClassification

        with _quiet_transformers():
            classifier = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=_as_dtype(dtype) if dtype is not None else torch.float32,
                trust_remote_code=trust_remote_code, use_safetensors=True,
                local_files_only=True)
        score = getattr(classifier, "score", None)
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError(f"{path}: a reward model has one output (num_labels=1); this "
                             f"classifier has {classifier.config.num_labels}")
        obj = cls(getattr(classifier, classifier.base_model_prefix), seed=None)
        with torch.no_grad():
            obj.head.weight.copy_(score.weight.float())
            obj.head.bias.zero_()
        obj.to(resolve_device(device))
        obj.eval()
        return obj
