"""Layer 2: the small GPT, its tokenizer, log-probabilities, generation, value and reward heads.

Everything here works on plain Hugging Face ``transformers`` objects, so the tiny Llama-style
model that the book trains on a laptop can be swapped for any causal LM loaded with
:func:`load_model` (a local directory holding a model and its tokenizer).

Alignment convention used throughout (the "shift"): for a sequence ``ids[0..T-1]`` the model's
``logits[:, t]`` is the distribution of the *next* token ``ids[:, t+1]``. Per-token quantities
therefore have length ``T-1`` and entry ``t`` belongs to token ``ids[:, t+1]``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlcourse.config import resolve_device
from rlcourse.files import atomic_directory_write  # re-exported: its old home

# One implementation of the last-real-token index (layer 1), re-exported here for the heads.
from rlcourse.rl import last_token_index

#: The special tokens of the word-level tokenizer, in id order (``<pad>`` is id 0).
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>")
#: Chat template of the word-level tokenizer; renders ``<bos> <user> {prompt} <assistant>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %} <user> {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %} <assistant> {{ m['content'] }} {{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} <assistant>{% endif %}"
)

__all__ = [
    "SPECIAL_TOKENS",
    "Generation",
    "RewardModel",
    "atomic_directory_write",
    "ValueHeadModel",
    "build_model",
    "build_tokenizer",
    "encode_prompt_completion",
    "format_completion",
    "format_prompt",
    "freeze_untied_lm_head",
    "generate",
    "last_token_index",
    "load_model",
    "load_tokenizer",
    "logprobs_from_logits",
    "position_ids_from_mask",
    "save_model",
    "sequence_logprobs",
    "tiny_config",
]


# --------------------------------------------------------------------------------------------
# Tokenizer and chat format
# --------------------------------------------------------------------------------------------
def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    # Split on whitespace, then make every punctuation character its own token:
    # "Hello, world." -> ["Hello", ",", "world", "."]
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )


def build_tokenizer(words: Iterable[str], chat_template: bool = True):
    """Build a word-level tokenizer (offline) whose vocabulary is every word found in ``words``.

    ``words`` may be single words or whole texts: each item is split exactly as the tokenizer
    will split text later (on whitespace, punctuation characters as their own tokens), so
    ``build_tokenizer(corpus_sentences)`` covers the corpus. Ids: ``<pad>`` 0, ``<unk>`` 1,
    ``<bos>`` 2, ``<eos>`` 3, ``<user>`` 4, ``<assistant>`` 5, then the words sorted.
    Unknown words map to ``<unk>``. Decoding joins tokens with single spaces and removes the
    space before punctuation (``"hello , world ."`` decodes to ``"hello, world."``).

    Returns a ``transformers.PreTrainedTokenizerFast`` that round-trips through
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained(path)``.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    vocab_words: set[str] = set()
    for item in words:
        for piece, _ in pre.pre_tokenize_str(str(item)):
            if piece not in SPECIAL_TOKENS:
                vocab_words.add(piece)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(vocab_words):
        vocab[w] = len(vocab)
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<user>", "<assistant>"],
        clean_up_tokenization_spaces=True,
        padding_side="right",
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def format_prompt(prompt: str | Sequence[Mapping[str, str]], tokenizer: Any = None) -> str:
    """The chat-style prompt text: ``"<bos> <user> {prompt} <assistant>"``.

    With a ``tokenizer`` that has a chat template (a real model's, or ours), the text comes from
    ``tokenizer.apply_chat_template`` with ``add_generation_prompt=True`` instead, so the same
    code formats prompts for any model. The completion that follows ends with the EOS token
    (see :func:`format_completion`). A ``prompt`` given as a list of ``{role, content}``
    messages (TRL's conversational form) is rendered by the chat template as it stands.
    """
    if isinstance(prompt, (list, tuple)):  # TRL's conversational form: a list of messages
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("a prompt given as a list of messages needs a tokenizer with a "
                             "chat template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False,
                                             add_generation_prompt=True)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        if tokenizer.chat_template == CHAT_TEMPLATE:
            return f"<bos> <user> {prompt} <assistant>"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"<bos> <user> {prompt} <assistant>"


def format_completion(completion: str, tokenizer: Any = None) -> str:
    """The completion text as the model sees it in training: ``"{completion} <eos>"``."""
    eos = getattr(tokenizer, "eos_token", None) or "<eos>"
    return f"{completion} {eos}"


def _left_truncate_warning(n: int, total: int, max_length: int, where: list[str]) -> None:
    shown = ", ".join(where[:5]) + (" ..." if len(where) > 5 else "")
    warnings.warn(
        f"truncated {n} of {total} examples to max_length={max_length} ({shown})",
        stacklevel=3,
    )


def encode_prompt_completion(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    padding_side: str = "right",
    truncation: str = "error",
    names: Sequence[str] | None = None,
    add_eos: bool = True,
    formatted: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise prompt/completion pairs into one padded batch.

    Each example is ``ids(format_prompt(prompt)) + ids(completion) + [eos]`` (prompt and
    completion are tokenised separately and concatenated, so no token straddles the boundary).
    Where ``formatted[i]`` is true, prompt ``i`` was already rendered by a chat template and
    completion ``i`` ends with the template's end of turn: ``ids(prompt) + ids(completion)``
    (see :func:`rlcourse.data.render_conversation`). Returns ``input_ids`` and
    ``attention_mask`` [B, L], ``completion_mask`` [B, L] (1 on completion tokens including
    EOS; 0 on prompt and padding), ``prompt_lengths`` and ``completion_lengths`` [B] (real
    tokens, padding excluded) and ``truncated`` [B] (bool).

    Examples longer than ``max_length``:
      - ``truncation="error"`` (default): ``ValueError`` naming the example (``names[i]``, e.g.
        ``"prefs.jsonl:17"``, else its index) and the lengths.
      - ``"left"``: drop the oldest prompt tokens (the completion is kept whole); one warning
        counts the truncated examples.
      - ``"right"``: cut the end of the completion (EOS may be lost); counted warning.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if truncation not in ("error", "left", "right"):
        raise ValueError(f"truncation must be 'error', 'left' or 'right', got {truncation!r}")
    pad_id = _pad_id(tokenizer)
    # formatted[i]: prompt i is already rendered by a chat template (it is used as is) and
    # completion i carries the template's own end of turn (no EOS is appended).
    formatted = list(formatted) if formatted is not None else [False] * len(prompts)
    p_texts = [p if f else format_prompt(p, tokenizer) for p, f in zip(prompts, formatted,
                                                                        strict=True)]
    p_ids = tokenizer(p_texts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"] if prompts else []
    rows: list[tuple[list[int], list[int]]] = []
    truncated: list[bool] = []
    where: list[str] = []
    for i, (p, c) in enumerate(zip(p_ids, c_ids, strict=True)):
        c = list(c) + ([tokenizer.eos_token_id] if add_eos and not formatted[i] else [])
        p = list(p)
        over = len(p) + len(c) - max_length
        name = names[i] if names is not None else f"example {i}"
        if over > 0:
            if truncation == "error":
                raise ValueError(
                    f"{name}: prompt ({len(p)} tokens) + completion ({len(c)} tokens incl. EOS) "
                    f"= {len(p) + len(c)} tokens exceeds max_length={max_length}; shorten it or "
                    "pass truncation='left' (drop prompt start) or 'right' (cut completion end)"
                )
            if truncation == "left":
                if over >= len(p):
                    raise ValueError(
                        f"{name}: the completion alone ({len(c)} tokens) does not fit in "
                        f"max_length={max_length} with at least one prompt token"
                    )
                p = p[over:]
            else:
                if over >= len(c):
                    raise ValueError(
                        f"{name}: the prompt alone ({len(p)} tokens) does not leave room for one "
                        f"completion token within max_length={max_length}"
                    )
                c = c[: len(c) - over]
            where.append(name)
        truncated.append(over > 0)
        rows.append((p, c))
    if where:
        _left_truncate_warning(len(where), len(rows), max_length, where)
    width = max((len(p) + len(c) for p, c in rows), default=0)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    comp = torch.zeros((B, width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        start = 0 if padding_side == "right" else width - n
        input_ids[i, start : start + n] = torch.tensor(p + c, dtype=torch.long)
        attention[i, start : start + n] = 1
        comp[i, start + len(p) : start + n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": comp,
        "prompt_lengths": torch.tensor([len(p) for p, _ in rows], dtype=torch.long),
        "completion_lengths": torch.tensor([len(c) for _, c in rows], dtype=torch.long),
        "truncated": torch.tensor(truncated, dtype=torch.bool),
    }


# --------------------------------------------------------------------------------------------
# The tiny model; loading and saving any causal LM
# --------------------------------------------------------------------------------------------
def tiny_config(
    vocab_size: int,
    n_layers: int = 2,
    hidden_size: int = 128,
    n_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    arch: str = "llama",
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    **extra: Any,
):
    """A ``transformers`` config for a tiny Llama-style (``arch="llama"``) or Qwen2-style
    (``arch="qwen2"``) decoder: RMSNorm, rotary positions, SwiGLU MLP, tied input/output
    embeddings, no dropout. ``intermediate_size`` defaults to ``3 * hidden_size``.

    Parameter count (tied embeddings, ``V`` vocab, ``H`` hidden, ``I`` intermediate, ``L``
    layers): ``V*H + L*(4*H*H + 3*H*I + 2*H) + H``; with ``V=157, H=128, L=2`` about 0.45M.
    """
    from transformers import LlamaConfig, Qwen2Config

    if hidden_size % n_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by n_heads={n_heads}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attention_dropout=0.0,
    )
    common.update(extra)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")


def build_model(tokenizer: Any, *, seed: int = 0, **config_kwargs: Any):
    """A freshly initialised tiny causal LM for ``tokenizer`` (see :func:`tiny_config`).

    The vocabulary size and the pad/bos/eos ids come from the tokenizer; ``seed`` fixes the
    initial weights without touching the global random state.
    """
    from transformers import AutoModelForCausalLM

    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for k, v in ids.items():
        if v is not None:
            config_kwargs.setdefault(k, v)
    config = tiny_config(len(tokenizer), **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
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
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_as_dtype(dtype) if dtype is not None else torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save a model and its tokenizer with ``save_pretrained`` (safetensors), atomically.

    Works for plain causal LMs and for :class:`ValueHeadModel` / :class:`RewardModel`.
    """

    def write(tmp: Path) -> None:
        with _quiet_transformers():
            if isinstance(model, (ValueHeadModel, RewardModel)):
                model._write(tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory_write(path, write)


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability of ``labels`` under ``logits``:
    ``log p(y) = log_softmax(z)[y] = z_y - logsumexp(z)``.

    Computed as ``log_softmax`` then ``gather``, in float32 (stable in bf16/fp16 too).
    ``logits`` [..., V], ``labels`` [...] (int) -> [...] float32.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``0, 1, 2, ...`` counted over real tokens only: ``cumsum(mask) - 1``, 0 on
    padding. With left padding the first real token gets position 0, as it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    )
    if isinstance(out, tuple):  # e.g. ValueHeadModel returns (logits, values)
        return out[0]
    return out.logits


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    reduce: str = "sum",
) -> torch.Tensor:
    """Log-probability of the completion tokens given everything before them.

    ``lp[b, t] = log pi(ids[b, t+1] | ids[b, :t+1]) * completion_mask[b, t+1]`` for
    ``t = 0..T-2`` (logits[:, :-1] predict ids[:, 1:]); prompt and padding positions are exactly 0.

    - ``reduce="none"``: ``lp`` [B, T-1]; column ``t`` belongs to token ``t+1``.
    - ``reduce="sum"``: ``log pi(y|x) = sum_t lp[b, t]`` [B] (DPO, KTO, R-DPO, RLOO).
    - ``reduce="mean"``: ``sum_t lp[b, t] / |y|`` [B], the log of the geometric mean per-token
      probability (SimPO, ORPO); 0 for an empty completion rather than NaN.

    Position ids are counted from the attention mask, so left, right (or both-sided) padding
    gives the same values as each sequence run alone.
    """
    logits = _logits(model, input_ids, attention_mask)
    lp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    mask = completion_mask[:, 1:].to(lp.dtype)
    lp = lp * mask
    if reduce == "none":
        return lp
    if reduce == "sum":
        return lp.sum(-1)
    if reduce == "mean":
        return lp.sum(-1) / mask.sum(-1).clamp(min=1.0)
    raise ValueError(f"reduce must be 'sum', 'mean' or 'none', got {reduce!r}")


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """Sampled completions and the log-probabilities of the sampled tokens.

    Shapes: prompts padded on the LEFT to ``P``; completions padded on the RIGHT to ``T``.

    - ``prompt_ids``, ``prompt_attention_mask`` [B, P]
    - ``completion_ids`` [B, T] (pad after EOS), ``completion_mask`` [B, T] (1 up to and
      including EOS)
    - ``logprobs`` [B, T]: ``log pi(a_t|s_t)`` under the raw model (temperature 1, no top-k/p),
      what PPO's ratio and KL need; 0 where the mask is 0
    - ``sampling_logprobs`` [B, T]: log-prob under the distribution actually sampled from (after
      temperature, top-k, top-p; 0 for greedy decoding)
    - ``full_ids``, ``full_attention_mask``, ``full_completion_mask`` [B, P+T]: prompt and
      completion side by side, ready for :func:`sequence_logprobs`
    - ``texts``: decoded completions without special tokens; ``prompts``: the input strings
    """

    prompts: list[str]
    prompt_ids: torch.Tensor
    prompt_attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    sampling_logprobs: torch.Tensor
    texts: list[str] = field(default_factory=list)

    @property
    def full_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def full_attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_attention_mask, self.completion_mask], dim=1)

    @property
    def full_completion_mask(self) -> torch.Tensor:
        return torch.cat([torch.zeros_like(self.prompt_attention_mask), self.completion_mask], 1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        """Number of completion tokens per sample, EOS included."""
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return len(self.prompts)


def _pad_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS for tokenizers without a pad token (many real LMs)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass ``top_p``.

    Nucleus: sort probabilities descending and keep token ``i`` while the mass *before* it is
    below ``top_p`` (the most likely token is always kept).
    """
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _inverse_cdf_sample(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from ``exp(logp)`` by inverting the CDF at ``u`` in [0, 1).

    One uniform number per (prompt, step), drawn up front, makes each row's sample depend only on
    the seed and the row's index: the same samples whatever the batch size.
    """
    probs = logp.double().exp()
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    # Guard against rounding at the top end: never go past the last token with p > 0.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(-1)
    return torch.minimum(idx, last)


def _pad_to(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = t.new_full((t.shape[0], extra), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


@torch.no_grad()
def _generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor,
    do_sample: bool,
    chat: bool = True,
) -> tuple[torch.Tensor, ...]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    texts = [format_prompt(p, tokenizer) for p in prompts] if chat else prompts
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if min(len(e) for e in enc) == 0:
        raise ValueError("a prompt encodes to zero tokens; with chat=False start it with <bos>")
    P = max(len(e) for e in enc)
    prompt_ids = torch.full((len(enc), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(enc), P), dtype=torch.long)
    for i, e in enumerate(enc):
        prompt_ids[i, P - len(e) :] = torch.tensor(e, dtype=torch.long)
        prompt_mask[i, P - len(e) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    B = prompt_ids.shape[0]
    cache = DynamicCache()
    # transformers >= 5.2x names the KV-cache argument ``cache``; older versions
    # ``past_key_values``. The DynamicCache object is updated in place either way.
    params = inspect.signature(type(model).forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    attn = prompt_mask
    pos = position_ids_from_mask(attn)
    step_ids, step_pos = prompt_ids, pos
    next_pos = pos[:, -1:] + 1
    alive = torch.ones(B, dtype=torch.bool, device=device)
    toks, lps, slps, masks = [], [], [], []
    for step in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attn,
            position_ids=step_pos,
            use_cache=True,
            **{cache_kw: cache},
            **extra,
        )
        logits = out.logits[:, -1].float()
        raw_logp = F.log_softmax(logits, dim=-1)
        if do_sample and temperature > 0:
            filtered = _filter_logits(logits / temperature, top_k, top_p)
            samp_logp = F.log_softmax(filtered, dim=-1)
            nxt = _inverse_cdf_sample(samp_logp, uniforms[:, step].to(device))
            s_lp = samp_logp.gather(-1, nxt[:, None]).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
            s_lp = torch.zeros(B, device=device)  # a point mass: log 1 = 0
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        m = alive.long()
        toks.append(nxt)
        masks.append(m)
        lps.append(raw_logp.gather(-1, nxt[:, None]).squeeze(-1) * m)
        slps.append(s_lp * m)
        if eos_id is not None:
            alive = alive & (nxt != eos_id)
        if not alive.any():
            break
        # Finished rows keep feeding pad tokens with mask 0 so the batch stays rectangular.
        attn = torch.cat([attn, m[:, None]], dim=1)
        step_ids, step_pos = nxt[:, None], next_pos
        next_pos = next_pos + 1
    return (
        prompt_ids.cpu(),
        prompt_mask.cpu(),
        torch.stack(toks, 1).cpu(),
        torch.stack(masks, 1).cpu(),
        torch.stack(lps, 1).cpu(),
        torch.stack(slps, 1).cpu(),
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    do_sample: bool = True,
    batch_size: int = 512,
    progress: bool = False,
    chat: bool = True,
    first_row: int = 0,
) -> Generation:
    """Sample a completion for every prompt (chat-formatted by :func:`format_prompt`).

    Token by token with a KV cache: ``a_t ~ softmax(filter(z_t / temperature))`` where ``filter``
    keeps the ``top_k`` largest logits and the smallest set of tokens with mass >= ``top_p``;
    ``do_sample=False`` (or ``temperature=0``) takes the argmax. A row stops after EOS.
    Records ``log pi(a_t|s_t) = log_softmax(z_t)[a_t]`` (raw model) and the log-prob under the
    sampling distribution (see :class:`Generation`). ``seed`` makes the samples repeatable
    without touching the global random state; sample ``i`` depends only on the seed and ``i``
    (not on ``batch_size``). Prompts are processed ``batch_size`` at a time. ``chat=False``
    continues the prompt text as given (no chat format; include ``<bos>`` yourself), for
    sampling from a pretrained base model. ``first_row``: these prompts are rows ``first_row,
    first_row + 1, ...`` of a larger batch drawn with the same seed (each process of a
    multi-process run draws its share of one global batch, with the samples one process would
    draw).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    # u[i, t] decides prompt i's token t (see _inverse_cdf_sample).
    uniforms = torch.rand((first_row + len(prompts), max_new_tokens), generator=generator,
                          dtype=torch.float64)[first_row:]
    was_training = model.training
    model.eval()
    parts = []
    try:
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="generate", leave=False)
        for s in starts:
            parts.append(
                _generate_batch(
                    model, tokenizer, prompts[s : s + batch_size], max_new_tokens, temperature,
                    top_k, top_p, uniforms[s : s + batch_size], do_sample, chat,
                )
            )
    finally:
        model.train(was_training)
    pad_id = _pad_id(tokenizer)
    P = max(p[0].shape[1] for p in parts)
    T = max(p[2].shape[1] for p in parts)
    cat = lambda i, w, v, left: torch.cat([_pad_to(p[i], w, v, left) for p in parts])  # noqa: E731
    completion_ids = cat(2, T, pad_id, False)
    completion_mask = cat(3, T, 0, False)
    texts = [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids, completion_mask, strict=True)
    ]
    return Generation(
        prompts=prompts,
        prompt_ids=cat(0, P, pad_id, True),
        prompt_attention_mask=cat(1, P, 0, True),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=cat(4, T, 0, False).float(),
        sampling_logprobs=cat(5, T, 0, False).float(),
        texts=texts,
    )


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
        from transformers import AutoModelForCausalLM

        path = Path(path)
        with _quiet_transformers():
            backbone = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=_as_dtype(dtype) if dtype is not None else torch.float32,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
            )
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
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=True,
        ) if logits else None
        if out is not None:
            return out.logits, out.hidden_states[-1]
        # Without logits: run only the decoder (no [B, T, V] tensor).
        base = self.model.base_model
        h = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state
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
