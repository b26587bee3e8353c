"""Loading and saving any causal LM and its tokenizer (a local directory).

Models are read from local folders only: a name that is not a folder is refused at once, with a
pointer to downloading it when it looks like a Hugging Face Hub id (``org/name``), so no call
here ever waits on the network (:func:`local_model_dir`). A folder holding a LoRA adapter (a
LoRA recipe's ``OUTPUT/model``: ``adapter_config.json``) is read as its base model with the
adapter merged in, and says so (:func:`load_causal_lm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
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


#: A Hugging Face Hub id (``Qwen/Qwen2.5-0.5B``): two names joined by one slash, no path syntax.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: The file that marks a folder as a LoRA adapter (``peft``'s ``save_pretrained``).
ADAPTER_CONFIG = "adapter_config.json"


def local_model_dir(path: str | os.PathLike, what: str = "model") -> Path:
    """``path`` as a :class:`~pathlib.Path` when it is a local folder; otherwise a
    ``FileNotFoundError`` at once, without touching the network.

    rlcourse never downloads: ``from_pretrained("org/name")`` would contact the Hugging Face
    Hub (and retry for about a minute offline). A missing path shaped like a Hub id gets a
    message saying how to download it once and pass the folder instead.
    """
    p = Path(path)
    if p.is_dir():
        return p
    text = str(path)
    if _HUB_ID.match(text) and not p.exists():
        raise FileNotFoundError(
            f"{what} {text!r}: no such local folder. rlcourse loads models from local folders "
            f"only and never contacts the Hugging Face Hub; if {text!r} is a Hub id, download it "
            f"once (huggingface-cli download {text} --local-dir DIR, or snapshot_download) and "
            "pass DIR")
    raise FileNotFoundError(f"{path}: no such {what} directory")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding a LoRA adapter (``adapter_config.json``) rather than a model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> Path:
    """The base model folder of the adapter in ``path``: ``base_model_name_or_path`` of its
    ``adapter_config.json``, as written (relative to the working directory, as the recipe that
    trained it named it) or else relative to the adapter folder; a Hub id is refused
    (:func:`local_model_dir`)."""
    path = Path(path)
    config = path / ADAPTER_CONFIG
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config}: not readable as JSON ({err})") from None
    if not base:
        raise ValueError(f"{config}: names no base model (base_model_name_or_path)")
    for candidate in (Path(base), path / base):
        if candidate.is_dir():
            return candidate
    return local_model_dir(base, f"base model of the adapter {path} ({ADAPTER_CONFIG}):")


def _architectures(path: Path) -> list[str]:
    try:
        return list(json.loads((path / "config.json").read_text(encoding="utf-8"))
                    .get("architectures") or [])
    except (OSError, ValueError):
        return []


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
    path = local_model_dir(path, "tokenizer")  # before importing transformers (seconds)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = path / "tokenizer.json"
    if spec.is_file():
        try:
            kind = json.loads(spec.read_text(encoding="utf-8")).get("model", {}).get("type")
        except (OSError, ValueError):
            kind = None
        if kind == "WordLevel":
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                         local_files_only=True)


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

    A LoRA adapter folder (``adapter_config.json``, e.g. a LoRA SFT run's ``OUTPUT/model``) is
    read as its base (:func:`adapter_base`, itself possibly an adapter) with the adapter merged
    in, ``W = W0 + alpha/r * B A``, every weight trainable; one line on stderr says so. Why
    merge rather than keep training that adapter: what follows (DPO's reference, GRPO's KL, a
    new ``lora:`` section) needs the adapted model as ITS starting point, and with the SFT
    adapter merged a new adapter switched off gives exactly that model back.
    """
    path = local_model_dir(path)  # before importing transformers (seconds)
    if is_adapter_dir(path):
        return _merged_adapter(path, dtype, trust_remote_code)
    if any(a.endswith("ForSequenceClassification") for a in _architectures(path)):
        raise ValueError(f"{path}: holds a sequence classifier ({', '.join(_architectures(path))}"
                         "), e.g. a reward model, not a causal LM; load a reward model with "
                         "rlcourse.models.RewardModel.from_pretrained")
    _check_weight_files(path)
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_as_dtype(dtype) if dtype is not None else torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            local_files_only=True,
        )


def _merged_adapter(path: Path, dtype: Any, trust_remote_code: bool) -> Any:
    """The causal LM of adapter folder ``path``: its base with the adapter merged in."""
    import warnings

    from peft import PeftModel

    base_dir = adapter_base(path)
    base = load_causal_lm(base_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        # peft asks the model `is_gradient_checkpointing`, which transformers 5 deprecates.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
    model.requires_grad_(True)  # peft froze the base; the merged model is a plain model
    # An adapter trained on top of this model names it as its base: the adapter folder, which
    # this function reads back as the same merged model (a chain SFT adapter -> DPO adapter).
    model.name_or_path = model.config._name_or_path = str(path.resolve())
    print(f"{path}: a LoRA adapter ({ADAPTER_CONFIG}) on the base model {base_dir}; merged into "
          "the base (W = W0 + alpha/r * B A) and used as one model", file=sys.stderr)
    return model


def load_model(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: Any = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from a local directory holding any causal LM and tokenizer.

    Uses ``AutoModelForCausalLM`` / :func:`load_tokenizer` with safetensors only (an adapter
    folder: its base with the adapter merged, :func:`load_causal_lm`). ``dtype``:
    ``None`` (float32), ``"auto"`` (as saved), a ``torch.dtype`` or a name such as ``"bf16"``.
    ``device="auto"`` picks cuda, mps or cpu. Custom model code runs only with
    ``trust_remote_code=True``. The model is returned in eval mode.
    """
    path = local_model_dir(path)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    # an adapter saved without its tokenizer (peft alone) reads its base's
    tokenizer = load_tokenizer(path if has_tokenizer or not is_adapter_dir(path)
                               else adapter_base(path), trust_remote_code=trust_remote_code)
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
                model._write(tmp, tokenizer)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory_write(path, write)
