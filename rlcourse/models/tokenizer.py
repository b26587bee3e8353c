"""The word-level tokenizer, its chat format, and prompt/completion encoding."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

#: The special tokens of the word-level tokenizer, in id order (``<pad>`` is id 0).
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>")
#: Chat template of the word-level tokenizer; renders ``<bos> <user> {prompt} <assistant>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %} <user> {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %} <assistant> {{ m['content'] }} {{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} <assistant>{% endif %}"
)



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


def _pad_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS for tokenizers without a pad token (many real LMs)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def uses_book_format(tokenizer: Any) -> bool:
    """True when prompts take the book's markup ``<bos> <user> {prompt} <assistant>``: no
    tokenizer given, or the word-level tokenizer's own chat template (:data:`CHAT_TEMPLATE`,
    which :func:`build_tokenizer` sets and ``save_pretrained`` keeps): that template is how the
    book's tokenizer says the markup is its format."""
    return tokenizer is None or getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE


def format_prompt(prompt: str | Sequence[Mapping[str, str]], tokenizer: Any = None) -> str:
    """The prompt text a model is given, by the tokenizer's own format.

    - the book's tokenizer (or none given, :func:`uses_book_format`):
      ``"<bos> <user> {prompt} <assistant>"``;
    - a tokenizer with a chat template (a real chat model's): ``apply_chat_template`` of the
      user message with ``add_generation_prompt=True``, so the same code formats prompts for any
      model;
    - a tokenizer WITHOUT a chat template (a base model): the prompt as given, and the
      completion follows it directly, as TRL does for plain text (no markup invented for a
      model that never saw it; :func:`encode_prompts` adds the tokenizer's own leading special
      tokens, e.g. Llama's BOS, as its ``__call__`` would).

    The completion that follows ends with the EOS token (see :func:`format_completion`). A
    ``prompt`` given as a list of ``{role, content}`` messages (TRL's conversational form) is
    rendered by the chat template as it stands.
    """
    if isinstance(prompt, (list, tuple)):  # TRL's conversational form: a list of messages
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("a prompt given as a list of messages needs a tokenizer with a "
                             "chat template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False,
                                             add_generation_prompt=True)
    if uses_book_format(tokenizer):
        return f"<bos> <user> {prompt} <assistant>"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens ``tokenizer(text)`` puts BEFORE any text by itself (Llama's BOS; none
    for GPT-2 or Qwen), read off one probe: what a plain prompt starts with, as in TRL."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start])
    return []


def encode_prompts(tokenizer: Any, prompts: Sequence[Any],
                   formatted: Sequence[bool] | None = None) -> list[list[int]]:
    """Token ids of each prompt as a model is given it: ``format_prompt(prompt)`` tokenised
    without added special tokens (a chat template and the book's markup write their own), and
    for a tokenizer without a chat template the tokenizer's own leading special tokens first
    (its BOS: TRL tokenises plain prompts with them). ``formatted[i]``: prompt ``i`` is already
    rendered text and is only tokenised. Training (:func:`encode_prompt_completion`) and
    sampling (:func:`rlcourse.models.generate`) read prompts through this one function."""
    formatted = list(formatted) if formatted is not None else [False] * len(prompts)
    texts = [p if f else format_prompt(p, tokenizer)
             for p, f in zip(prompts, formatted, strict=True)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    plain = not uses_book_format(tokenizer) and not getattr(tokenizer, "chat_template", None)
    lead = _leading_special_ids(tokenizer) if plain and not all(formatted) else []
    return [list(e) if f else lead + list(e) for e, f in zip(ids, formatted, strict=True)]


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

    Each example is ``encode_prompts(prompt) + ids(completion) + [eos]`` (prompt and
    completion are tokenised separately and concatenated, so no token straddles the boundary;
    the prompt in the tokenizer's format, :func:`format_prompt`: with no chat template, as
    given).
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
    p_ids = encode_prompts(tokenizer, prompts, formatted)
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
