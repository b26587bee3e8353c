"""A linear head on a causal LM: the value head (PPO) and the reward model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlcourse.config import resolve_device
from rlcourse.models.construction import build_model
from rlcourse.models.io import load_causal_lm, save_model
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

    def _write(self, path: Path) -> None:
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

        path = Path(path)
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _, h = self._hidden(input_ids, attention_mask, logits=False)
        idx = last_token_index(attention_mask)
        h_last = h[torch.arange(h.shape[0], device=h.device), idx]
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1)
