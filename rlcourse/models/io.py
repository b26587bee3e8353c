"""Loading and saving any causal LM and its tokenizer (a local directory)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from rlcourse.config import resolve_device
from rlcourse.files import atomic_directory_write

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bf16-pure": torch.bfloat16,  # a recipe's pure-bf16 training (rlcourse.precision)
}


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-file progress bars (noise in a notebook for a 2 MB model)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _as_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str) and dtype != "auto":
        return _DTYPES[dtype]
    return dtype


def saved_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype a checkpoint was saved in, from its ``config.json`` (``dtype``, or
    ``torch_dtype`` before transformers 5); ``None`` if it says nothing or is not there."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(name) if isinstance(name, str) else None


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved in ``path``: ``AutoTokenizer``, except for a word-level tokenizer
    (:func:`build_tokenizer`), which is read as the generic fast tokenizer it was saved as.

    Why: ``transformers`` 5 picks the tokenizer class from the model's ``model_type`` and
    rebuilds its text pipeline; next to a Qwen2 model it makes a ``Qwen2Tokenizer`` whose
    byte-level splitting finds none of the saved words, so every text encodes to special
    tokens only and training sees empty prompts and answers without any error.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    spec = path / "tokenizer.json"
    if spec.is_file():
        try:
            kind = json.loads(spec.read_text(encoding="utf-8")).get("model", {}).get("type")
        except (OSError, ValueError):
            kind = None
        if kind == "WordLevel":
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _check_weight_files(path: Path) -> None:
    """A clear error for a model folder without safetensors weights (before, transformers said
    "no file named model.safetensors" after the tokenizer had loaded)."""
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.glob("*.bin"))
    if pickled:
        raise ValueError(
            f"{path}: holds {', '.join(pickled)} but no .safetensors weights; rlcourse reads "
            "safetensors only (a pickled file can run code when loaded). Convert once with "
            "transformers, which writes safetensors: AutoModelForCausalLM.from_pretrained(path)"
            ".save_pretrained(path)")
    files = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
    raise FileNotFoundError(f"{path}: no model weights (*.safetensors) in this folder; it holds "
                            f"{files}")


def load_causal_lm(path: str | os.PathLike, dtype: Any = None, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` from a local directory, safetensors only, on the
    CPU: the one place a causal LM's weights are read (:func:`load_model`, and the backbone of
    :meth:`rlcourse.models.ValueHeadModel.from_pretrained`). ``dtype`` as in :func:`load_model`.
    """
    from transformers import AutoModelForCausalLM

    _check_weight_files(Path(path))
    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_as_dtype(dtype) if dtype is not None else torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )


def load_model(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: Any = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from a local directory holding any causal LM and tokenizer.

    Uses ``AutoModelForCausalLM`` / :func:`load_tokenizer` with safetensors only. ``dtype``:
    ``None`` (float32), ``"auto"`` (as saved), a ``torch.dtype`` or a name such as ``"bf16"``.
    ``device="auto"`` picks cuda, mps or cpu. Custom model code runs only with
    ``trust_remote_code=True``. The model is returned in eval mode.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save a model and its tokenizer with ``save_pretrained`` (safetensors), atomically.

    Works for plain causal LMs and for :class:`ValueHeadModel` / :class:`RewardModel`.
    """

    def write(tmp: Path) -> None:
        with _quiet_transformers():
            # A ValueHeadModel / RewardModel (asked of the class: a PeftModel wrapping one would
            # answer for it through __getattr__, and must save its adapter instead).
            if hasattr(type(model), "HEAD_FILE"):
                model._write(tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory_write(path, write)
