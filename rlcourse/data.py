"""Layer 2: JSONL datasets in the formats the ecosystem uses, validated, and tokenised batches.

Formats (one JSON object per line, the same keys as Hugging Face TRL):

- preferences: ``{"prompt": str, "chosen": str, "rejected": str}`` (the slides' key ``"reject"``
  is accepted as an alias of ``"rejected"``)
- unpaired (KTO): ``{"prompt": str, "completion": str, "label": true|false}``
- SFT: ``{"prompt": str, "completion": str}``

Each text may instead be TRL's *conversational* form, a list of messages
``[{"role": "user", "content": "..."}, ...]`` (all texts of a row, and all rows of a file, in
the same form). Such rows are rendered with the tokenizer's chat template
(:func:`render_conversation`): the prompt with ``add_generation_prompt=True``, the completion as
the rendered whole conversation minus the rendered prompt (which must be a prefix of it).

Two more of TRL's forms are read and turned into the above (:func:`trl_row`):

- SFT as ``{"messages": [...]}``, a whole conversation: the last message (the assistant's) is
  the completion, the messages before it the prompt. Only that last answer is trained on, as
  the prompt/completion form trains on the completion (TRL trains on every token of
  ``messages`` unless ``assistant_only_loss``);
- preferences with an *implicit prompt*, ``{"chosen": [...], "rejected": [...]}`` as two whole
  conversations (or two texts) sharing their beginning: the shared messages are the prompt,
  the rest of each the answers, as TRL's ``extract_prompt``. Between two texts the prompt ends
  at the last whitespace both share (TRL cuts at the first differing character, even inside a
  word; prompt and answer are tokenised apart here, so the cut stays on a word boundary). A
  plain-text ``prompt`` beside conversational ``chosen``/``rejected`` is ignored and the
  prompt extracted, as TRL's ``maybe_extract_prompt`` does.

Every error is a :class:`DataError` naming the file, the line and the field; an empty file (or one
of blank lines only) is an error too. Rows come back as :class:`Record` objects
(plain dicts that remember ``source`` and ``line``), so later steps such as tokenisation can
still say which line of which file an over-long example came from.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlcourse.files import atomic_write_text
from rlcourse.models import encode_prompt_completion

__all__ = [
    "ALIASES",
    "TEXT",
    "DataError",
    "Record",
    "as_rows",
    "field_of",
    "is_conversational",
    "load_preferences",
    "load_sft",
    "load_unpaired",
    "pad_collate",
    "pairs_to_unpaired",
    "read_jsonl",
    "completion_for",
    "extract_prompt",
    "prompt_text",
    "render_conversation",
    "render_rows",
    "split_messages",
    "split_padded",
    "tokenize_preferences",
    "tokenize_sft",
    "tokenize_unpaired",
    "trl_row",
    "write_jsonl",
]


class DataError(ValueError):
    """Bad data: the message starts with ``file:line:`` (or ``file:``) and says what is wrong."""


class Record(dict):
    """A row of a JSONL file: a ``dict`` that also knows its ``source`` file and ``line``."""

    __slots__ = ("source", "line")

    def __init__(self, *args: Any, source: str | None = None, line: int | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.source = source
        self.line = line

    @property
    def where(self) -> str:
        """``"file:line"`` (or ``"row"`` when the origin is unknown), for error messages."""
        if self.source is None:
            return "row" if self.line is None else f"row {self.line}"
        return f"{self.source}:{self.line}"


def _where(row: Any, i: int, source: str | None) -> str:
    if isinstance(row, Record) and (row.source is not None or row.line is not None):
        return row.where
    return f"{source}:{i + 1}" if source else f"row {i}"


#: Accepted spelling of a field -> its canonical name (the slides write ``"reject"``).
ALIASES: dict[str, str] = {"reject": "rejected"}


def field_of(record: Any, name: str, where: str = "row") -> Any:
    """``record[name]`` (or the attribute ``name`` of an object), accepting the spellings of
    :data:`ALIASES` (``"reject"`` for ``"rejected"``); a ``KeyError`` naming ``where`` when
    the field is missing."""
    if isinstance(record, Mapping):
        if name in record:
            return record[name]
        for alias, key in ALIASES.items():
            if key == name and alias in record:
                return record[alias]
    elif hasattr(record, name):
        return getattr(record, name)
    raise KeyError(f"{where}: missing field {name!r}")


def as_rows(records: Iterable[Any], fields: Sequence[str]) -> list[Any]:
    """Rows as mappings with the canonical keys ``fields`` (:func:`field_of`), TRL's
    ``messages`` and implicit-prompt rows turned into prompt and completion (:func:`trl_row`).
    Rows that already have the fields pass through untouched (a :class:`Record` keeps its
    ``file:line`` for error messages, also when converted)."""
    rows = []
    for i, given in enumerate(records):
        if isinstance(given, Mapping) and all(f in given for f in fields):
            rows.append(given)
            continue
        where = _where(given, i, None)
        r = trl_row(dict(given), where) if isinstance(given, Mapping) else given
        row = {f: field_of(r, f, where) for f in fields}
        if isinstance(r, Mapping):  # keep the other fields (a KTO label, a row's own extras)
            row = {**{k: v for k, v in r.items() if k not in ALIASES}, **row}
        if isinstance(given, Record):
            row = Record(row, source=given.source, line=given.line)
        rows.append(row)
    return rows


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def extract_prompt(chosen: Any, rejected: Any, where: str = "row") -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a preference with an implicit prompt (TRL's
    ``extract_prompt``): two conversations (lists of messages) that begin with the same
    messages, or two texts that begin with the same words. The shared messages (the shared text
    up to its last whitespace) are the prompt, the rest of each the answers. A
    :class:`DataError` naming ``where`` when nothing is shared or when an answer would be empty
    (one is a beginning of the other)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = _common_prefix(chosen, rejected)
        if n == 0:
            raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no first "
                            "message to take as the prompt (TRL's implicit prompt is the "
                            "messages both conversations begin with)")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        shared = _common_prefix(chosen, rejected)
        n = max((i for i in range(shared) if chosen[i].isspace()), default=0)
        if not chosen[:n].strip():
            raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no first "
                            "words to take as the prompt (give the prompt as its own field)")
    else:
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be texts or both lists of "
                        "messages")
    if n >= min(len(chosen), len(rejected)):
        raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' leave no answer "
                        "once their shared beginning is taken as the prompt (one is the "
                        "beginning of the other, or they are the same)")
    return chosen[:n], chosen[n:], rejected[n:]


def split_messages(messages: Any, where: str = "row") -> tuple[list, list]:
    """``(prompt, completion)`` of TRL's SFT row ``{"messages": [...]}``: the last message,
    which must be the assistant's, is the completion, the messages before it (at least one)
    the prompt."""
    problem = _messages_problem(messages) if isinstance(messages, list) else \
        f"must be a list of messages, got {type(messages).__name__}"
    if problem:
        raise DataError(f"{where}: field 'messages' {problem}")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(f"{where}: field 'messages' must end with the assistant's answer "
                        "after at least one message (the prompt); it ends with a "
                        f"{messages[-1]['role']!r} message of {len(messages)}")
    return list(messages[:-1]), [messages[-1]]


def trl_row(obj: dict[str, Any], where: str = "row") -> dict[str, Any]:
    """TRL's other row forms as the ones read here (in place, returned): ``{"messages"}``
    (no prompt and completion) -> ``prompt``, ``completion`` (:func:`split_messages`);
    ``chosen``/``rejected`` without a ``prompt``, or with a plain-text prompt beside
    conversations -> the extracted ``prompt`` (:func:`extract_prompt`). Other rows unchanged."""
    if "messages" in obj and "prompt" not in obj and "completion" not in obj:
        obj["prompt"], obj["completion"] = split_messages(obj.pop("messages"), where)
    rejected = next((k for k in ("rejected", *(a for a, c in ALIASES.items() if c ==
                                               "rejected")) if k in obj), None)
    if "chosen" in obj and rejected is not None:
        prompt = obj.get("prompt")
        implicit = prompt is None or (isinstance(obj["chosen"], list)
                                      and isinstance(prompt, str))
        if implicit:
            obj["prompt"], obj["chosen"], obj[rejected] = extract_prompt(
                obj["chosen"], obj[rejected], where)
    return obj


def pairs_to_unpaired(records: Iterable[Any]) -> list[dict]:
    """Split each pair ``(x, y_w, y_l)`` into ``(x, y_w, desirable)`` and ``(x, y_l, undesirable)``.

    KTO's data format: ``{"prompt", "completion", "label"}`` with ``label`` True for desirable.
    """
    out = []
    for i, r in enumerate(records):
        prompt = field_of(r, "prompt", f"pair {i}")
        out.append({"prompt": prompt, "completion": field_of(r, "chosen", f"pair {i}"),
                    "label": True})
        out.append({"prompt": prompt, "completion": field_of(r, "rejected", f"pair {i}"),
                    "label": False})
    return out


class _Text:
    """Marker type for :func:`read_jsonl`: a string, or a list of ``{role, content}`` messages."""


#: A field that holds plain text or TRL's conversational form (a list of messages).
TEXT = _Text


def _messages_problem(value: list) -> str | None:
    """What is wrong with a list of chat messages (``None``: nothing)."""
    if not value:
        return "is an empty list of messages"
    for i, m in enumerate(value, start=1):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            return (f"message {i} must be an object with string 'role' and 'content', "
                    f"got {m!r:.60}")
    return None


def is_conversational(row: Mapping[str, Any], key: str = "prompt") -> bool:
    """True when ``row[key]`` is a list of ``{role, content}`` messages (TRL's conversational
    format) rather than a string."""
    return isinstance(row.get(key), list)


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
               _Text: "a string or a list of {role, content} messages"}


def _check_type(value: Any, typ: type) -> bool:
    if typ is _Text:
        return isinstance(value, (str, list))
    if typ is bool:
        return isinstance(value, bool)
    if typ in (int, float):  # JSON booleans are not numbers here
        return isinstance(value, (int, float) if typ is float else int) and not isinstance(
            value, bool
        )
    return isinstance(value, typ)


def read_jsonl(
    path: str | os.PathLike,
    required: Sequence[str] | Mapping[str, type] = (),
    nonempty: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
    convert: Any = None,
) -> list[Record]:
    """Read a JSON-lines file into a list of :class:`Record` (blank lines are skipped).

    ``required`` lists the keys every row must have; as a sequence the values must be strings,
    as a mapping ``{key: type}`` they must have that type (``bool`` means JSON ``true``/``false``,
    :data:`TEXT` a string or a non-empty list of ``{role, content}`` messages, in the same form
    for every :data:`TEXT` field of a row).
    ``nonempty`` keys must not be empty or whitespace-only. ``aliases`` maps an accepted
    spelling to the canonical key (``{"reject": "rejected"}``); the row is stored under the
    canonical key. Every error is a :class:`DataError` (a ``ValueError``) that names the file,
    the line and the field. ``convert(row, "file:line")``, if given, rewrites each row (after
    the aliases, before the checks), e.g. :func:`trl_row`.
    """
    path = Path(path)
    types = dict(required) if isinstance(required, Mapping) else {k: str for k in required}
    aliases = dict(aliases or {})
    rows: list[Record] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                msg = f"{where}: malformed JSON ({err.msg} at column {err.colno})"
                raise DataError(msg) from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for alias, key in aliases.items():
                if alias in obj:
                    if key in obj:
                        raise DataError(f"{where}: both '{key}' and its alias '{alias}' given")
                    obj[key] = obj.pop(alias)
            if convert is not None:
                obj = convert(obj, where)
            for key, typ in types.items():
                if key not in obj:
                    have = ", ".join(sorted(obj)) or "none"
                    raise DataError(f"{where}: missing field '{key}' (fields present: {have})")
                if not _check_type(obj[key], typ):
                    raise DataError(
                        f"{where}: field '{key}' must be {_TYPE_NAMES.get(typ, typ.__name__)}, "
                        f"got {type(obj[key]).__name__} {obj[key]!r:.40}"
                    )
                if typ is _Text and isinstance(obj[key], list):
                    problem = _messages_problem(obj[key])
                    if problem:
                        raise DataError(f"{where}: field '{key}' {problem}")
            texts = [k for k, t in types.items() if t is _Text]
            if len({isinstance(obj[k], list) for k in texts}) > 1:
                raise DataError(f"{where}: fields {', '.join(texts)} mix plain text and lists "
                                "of messages; give all of them in one form")
            for key in nonempty:
                if isinstance(obj.get(key), str) and not obj[key].strip():
                    raise DataError(f"{where}: field '{key}' is empty")
            rows.append(Record(obj, source=str(path), line=lineno))
    return rows


def _some(rows: list[Record], path: str | os.PathLike) -> list[Record]:
    """``rows``, or a :class:`DataError` when the file held no row (empty or blank lines only):
    training on nothing would otherwise fail far from the cause, or not at all."""
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def load_preferences(path: str | os.PathLike) -> list[Record]:
    """Pairwise preferences: rows ``{"prompt", "chosen", "rejected"}`` (``"reject"`` accepted),
    or TRL's implicit prompt, ``{"chosen", "rejected"}`` sharing their beginning
    (:func:`extract_prompt`).

    ``chosen`` and ``rejected`` must be non-empty strings; the prompt may be empty. Pairs whose
    chosen and rejected texts are equal are kept, with one warning that counts them.
    """
    rows = _some(read_jsonl(
        path, {"prompt": TEXT, "chosen": TEXT, "rejected": TEXT},
        nonempty=("chosen", "rejected"), aliases=ALIASES, convert=trl_row,
    ), path)
    same = [r.where for r in rows if _same(r["chosen"], r["rejected"])]
    if same:  # such a pair carries no preference: every pairwise loss has zero gradient on it
        shown = ", ".join(same[:5]) + (" ..." if len(same) > 5 else "")
        warnings.warn(f"{len(same)} of {len(rows)} pairs have chosen == rejected ({shown})",
                      stacklevel=2)
    return rows


def load_unpaired(path: str | os.PathLike) -> list[Record]:
    """Unpaired feedback (KTO): rows ``{"prompt", "completion", "label"}``, label a JSON bool
    (``true`` = desirable)."""
    return _some(read_jsonl(
        path, {"prompt": TEXT, "completion": TEXT, "label": bool}, nonempty=("completion",)
    ), path)


def load_sft(path: str | os.PathLike) -> list[Record]:
    """Supervised fine-tuning pairs: rows ``{"prompt", "completion"}``, or TRL's
    ``{"messages": [...]}`` (:func:`split_messages`: the last, assistant message is the
    completion)."""
    return _some(read_jsonl(path, {"prompt": TEXT, "completion": TEXT},
                            nonempty=("completion",), convert=trl_row), path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON lines (UTF-8, keys in insertion order), atomically: a temporary file in
    the same directory is written, fsynced and renamed over ``path``
    (:func:`rlcourse.files.atomic_write_text`)."""
    return atomic_write_text(
        path, (json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))


# --------------------------------------------------------------------------------------------
# Tokenisation: whole dataset once (lengths checked up front), then cheap padding per batch
# --------------------------------------------------------------------------------------------
def split_padded(batch: Mapping[str, torch.Tensor], prefix: str = ""
                 ) -> list[dict[str, torch.Tensor]]:
    """Cut a right-padded batch (``input_ids``, ``attention_mask``, ``completion_mask``) into
    unpadded per-example tensors, their keys prefixed with ``prefix``."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        out.append({
            f"{prefix}input_ids": batch["input_ids"][i, :n].clone(),
            f"{prefix}attention_mask": batch["attention_mask"][i, :n].clone(),
            f"{prefix}completion_mask": batch["completion_mask"][i, :n].clone(),
        })
    return out


def prompt_text(prompt: Any) -> str:
    """The text of a prompt, for a reward function or a verifier that reads text: a string as
    it is; a conversation (TRL's list of ``{role, content}`` messages) as its messages'
    contents joined by newlines (a one-turn conversation: the user's message)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


def completion_for(prompt: Any, text: str) -> Any:
    """A sampled completion in the form of its prompt: the text for a plain prompt, the
    assistant's message ``[{"role": "assistant", "content": text}]`` for a conversational one
    (so that the row is one form, as :func:`render_rows` requires)."""
    if isinstance(prompt, str):
        return text
    return [{"role": "assistant", "content": text}]


def render_conversation(tokenizer: Any, prompt: list[Mapping[str, str]],
                        completion: list[Mapping[str, str]], where: str = "row"
                        ) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` of a conversational row, by the tokenizer's template.

    ``prompt_text = apply_chat_template(prompt, add_generation_prompt=True)``;
    ``full = apply_chat_template(prompt + completion)``; ``completion_text = full minus
    prompt_text``, which must be a prefix of ``full`` (else the completion cannot be cut out
    and a :class:`DataError` says so). The completion keeps the template's end-of-turn tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: a conversational row (lists of messages) needs a tokenizer "
                        "with a chat template, and this tokenizer has none; give the texts as "
                        "plain strings or set tokenizer.chat_template")
    prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False,
                                                add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(f"{where}: the chat template renders the prompt (with the generation "
                        "prompt) differently inside the whole conversation, so the completion "
                        f"cannot be cut out: prompt {prompt_text[-40:]!r}, conversation "
                        f"{full[:len(prompt_text)][-40:]!r}")
    return prompt_text, full[len(prompt_text):]


def render_rows(tokenizer: Any, rows: Sequence[Mapping[str, Any]], key: str,
                names: Sequence[str] | None = None) -> tuple[list[Any], list[Any], list[bool]]:
    """Prompts, completions (field ``key``) and, per row, whether they are rendered
    conversations (:func:`render_conversation`), as
    :func:`rlcourse.models.encode_prompt_completion` reads them. Every row must be in the form
    of the first."""
    names = list(names) if names is not None else [_where(r, i, None) for i, r in enumerate(rows)]
    prompts, completions, formatted = [], [], []
    first = is_conversational(rows[0]) if rows else False
    for r, name in zip(rows, names, strict=True):
        conversational = is_conversational(r) or is_conversational(r, key)
        if conversational != first:
            raise DataError(f"{name}: {'messages' if conversational else 'plain text'} while "
                            f"{names[0]} is {'messages' if first else 'plain text'}; give every "
                            "row of a data set in one form")
        if conversational:
            p, c = render_conversation(tokenizer, r["prompt"], r[key], name)
        else:
            p, c = r["prompt"], r[key]
        prompts.append(p)
        completions.append(c)
        formatted.append(conversational)
    return prompts, completions, formatted


def _encode(tokenizer: Any, rows: Sequence[Mapping[str, Any]], key: str, max_length: int,
            truncation: str, names: Sequence[str], suffix: str = "") -> dict[str, torch.Tensor]:
    """:func:`rlcourse.models.encode_prompt_completion` of ``prompt`` + ``row[key]`` (plain or
    conversational rows); its errors (an over-long row, named ``file:line``) raised as
    :class:`DataError`."""
    prompts, completions, formatted = render_rows(tokenizer, rows, key, names)
    try:
        return encode_prompt_completion(tokenizer, prompts, completions, max_length,
                                        truncation=truncation,
                                        names=[f"{n}{suffix}" for n in names],
                                        formatted=formatted)
    except ValueError as err:
        if isinstance(err, DataError):
            raise
        raise DataError(str(err)) from None


def tokenize_sft(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    max_length: int,
    truncation: str = "error",
    source: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenise SFT rows into per-example ``input_ids``, ``attention_mask``, ``completion_mask``
    (see :func:`rlcourse.models.encode_prompt_completion`). Over-long rows raise an error naming
    ``file:line``, or with ``truncation="left"``/``"right"`` are cut with one counted warning.
    Batch them with :func:`pad_collate`."""
    rows = as_rows(rows, ("prompt", "completion"))
    names = [_where(r, i, source) for i, r in enumerate(rows)]
    batch = _encode(tokenizer, rows, "completion", max_length, truncation, names)
    return split_padded(batch)


def tokenize_unpaired(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    max_length: int,
    truncation: str = "error",
    source: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Like :func:`tokenize_sft`, plus ``label`` (a 0-d bool tensor) per example."""
    items = tokenize_sft(tokenizer, rows, max_length, truncation, source)
    for item, r in zip(items, rows, strict=True):
        item["label"] = torch.tensor(bool(r["label"]))
    return items


def tokenize_preferences(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    max_length: int,
    truncation: str = "error",
    source: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenise preference rows into per-example ``chosen_input_ids``,
    ``chosen_attention_mask``, ``chosen_completion_mask`` and the same for ``rejected_``.

    Each of prompt+chosen and prompt+rejected must fit in ``max_length`` tokens; otherwise an
    error naming ``file:line (chosen|rejected)``, or a counted truncation warning. A pair that
    truncation makes identical (the two answers differed only in what was cut) is dropped,
    with one warning naming the file, how many and which lines (a ``DataError`` if that is every
    pair): it would train nothing and count as a wrong answer in the accuracy.
    """
    rows = as_rows(rows, ("prompt", "chosen", "rejected"))
    names = [_where(r, i, source) for i, r in enumerate(rows)]
    chosen = _encode(tokenizer, rows, "chosen", max_length, truncation, names, " (chosen)")
    rejected = _encode(tokenizer, rows, "rejected", max_length, truncation, names, " (rejected)")
    items = [
        {**c, **r}
        for c, r in zip(split_padded(chosen, "chosen_"), split_padded(rejected, "rejected_"),
                      strict=True)
    ]
    cut = (chosen["truncated"] | rejected["truncated"]).tolist()
    same = [i for i, it in enumerate(items) if cut[i] and torch.equal(
        it["chosen_input_ids"], it["rejected_input_ids"])]
    if same:  # e.g. answers that differ only in their last words, cut before them
        files = sorted({n.rsplit(":", 1)[0] for n in names if ":" in n}) or ["the data"]
        shown = ", ".join(names[i] for i in same[:5]) + (" ..." if len(same) > 5 else "")
        message = (f"{', '.join(files)}: {len(same)} of {len(items)} pairs have chosen == "
                   f"rejected after truncation to max_length={max_length} ({shown}); such a "
                   "pair carries no preference (loss ln 2, no gradient, accuracy 0)")
        if len(same) == len(items):
            raise DataError(f"{message}; every pair is such a pair: raise max_length or "
                            "truncate the other side")
        warnings.warn(f"{message}: dropped", stacklevel=2)
        dropped = set(same)
        items = [it for i, it in enumerate(items) if i not in dropped]
    return items


def pad_collate(
    items: Sequence[Mapping[str, Any]], pad_id: int = 0, padding_side: str = "right"
) -> dict[str, Any]:
    """Stack per-example items into a batch.

    1-D tensors are padded to ONE common width (the longest in the batch, across all keys, so
    ``chosen_*`` and ``rejected_*`` can be concatenated along the batch for a single forward):
    keys ending in ``input_ids`` with ``pad_id``, every other key with 0. 0-d tensors and
    numbers are stacked; anything else is collected into a list.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(
        (v.shape[0] for it in items for v in it.values() if torch.is_tensor(v) and v.dim() == 1),
        default=0,
    )
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        v0 = values[0]
        if torch.is_tensor(v0) and v0.dim() == 1:
            fill = pad_id if key.endswith("input_ids") else 0
            padded = torch.full((len(values), width), fill, dtype=v0.dtype)
            for i, v in enumerate(values):
                if padding_side == "right":
                    padded[i, : v.shape[0]] = v
                else:
                    padded[i, width - v.shape[0] :] = v
            out[key] = padded
        elif torch.is_tensor(v0) and v0.dim() == 0:
            out[key] = torch.stack(values)
        elif isinstance(v0, (int, float, bool)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
