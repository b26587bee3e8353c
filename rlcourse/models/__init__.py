"""Layer 2: the small GPT, its tokenizer, log-probabilities, generation, value and reward heads.

Everything here works on plain Hugging Face ``transformers`` objects, so the tiny Llama-style
model that the book trains on a laptop can be swapped for any causal LM loaded with
:func:`load_model` (a local directory holding a model and its tokenizer).

Alignment convention used throughout (the "shift"): for a sequence ``ids[0..T-1]`` the model's
``logits[:, t]`` is the distribution of the *next* token ``ids[:, t+1]``. Per-token quantities
therefore have length ``T-1`` and entry ``t`` belongs to token ``ids[:, t+1]``.

The package is split by job; every name is re-exported here, so ``from rlcourse.models import
X`` is the one import the rest of the code base uses:

- :mod:`rlcourse.models.tokenizer`: the word-level tokenizer, chat format, prompt/completion
  encoding;
- :mod:`rlcourse.models.construction`: the tiny Llama-style config and model;
- :mod:`rlcourse.models.io`: loading and saving any causal LM and its tokenizer (the one
  ``from_pretrained`` of a backbone: :func:`load_causal_lm`);
- :mod:`rlcourse.models.logprobs`: per-token log-probabilities from logits, or from hidden
  states in chunks without the full logits (:func:`chunked_logprobs`), position ids;
- :mod:`rlcourse.models.packing`: a padded batch's real tokens packed into rows without padding
  (:func:`pack_sequences`);
- :mod:`rlcourse.models.scoring`: the one way to score sequences under a model
  (:func:`call_model`, :func:`score_sequences`, :func:`next_token_logprobs`,
  :func:`sequence_logprobs`);
- :mod:`rlcourse.models.generation`: sampling with the sampled tokens' log-probabilities;
- :mod:`rlcourse.models.heads`: the value head, the reward model, freezing an unused LM head.
"""

from __future__ import annotations

from rlcourse.files import atomic_directory_write  # re-exported: its old home
from rlcourse.models.construction import build_model, tiny_config
from rlcourse.models.generation import (
    Generation,
    _filter_logits,  # noqa: F401 (tests import it from here)
    generate,
    max_positions,
)
from rlcourse.models.heads import RewardModel, ValueHeadModel, freeze_untied_lm_head
from rlcourse.models.io import (
    is_adapter_dir,
    load_causal_lm,
    load_model,
    load_tokenizer,
    local_model_dir,
    save_model,
    saved_dtype,
)
from rlcourse.models.logprobs import (
    chunked_logprobs,
    logprobs_from_logits,
    position_ids_from_mask,
)
from rlcourse.models.packing import PackedBatch, pack_rows, pack_sequences
from rlcourse.models.scoring import (
    ScoredSequences,
    call_model,
    last_hidden_states,
    next_token_logprobs,
    output_layer,
    output_logits,
    output_values,
    packed_logprobs,
    packing_width,
    score_sequences,
    sequence_logprobs,
    shifted_logprobs,
    shifted_mask,
    takes_position_ids,
    unwrap_model,
)
from rlcourse.models.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer,
    encode_prompt_completion,
    encode_prompts,
    format_completion,
    format_prompt,
    uses_book_format,
)

# One implementation of the last-real-token index (layer 1), re-exported here for the heads.
from rlcourse.rl import last_token_index

__all__ = [
    "shifted_mask",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "Generation",
    "RewardModel",
    "ScoredSequences",
    "atomic_directory_write",
    "ValueHeadModel",
    "build_model",
    "build_tokenizer",
    "call_model",
    "chunked_logprobs",
    "encode_prompt_completion",
    "encode_prompts",
    "format_completion",
    "format_prompt",
    "is_adapter_dir",
    "freeze_untied_lm_head",
    "generate",
    "max_positions",
    "last_hidden_states",
    "next_token_logprobs",
    "output_layer",
    "last_token_index",
    "load_causal_lm",
    "load_model",
    "load_tokenizer",
    "local_model_dir",
    "logprobs_from_logits",
    "output_logits",
    "output_values",
    "PackedBatch",
    "pack_rows",
    "pack_sequences",
    "packed_logprobs",
    "packing_width",
    "position_ids_from_mask",
    "save_model",
    "uses_book_format",
    "saved_dtype",
    "score_sequences",
    "sequence_logprobs",
    "shifted_logprobs",
    "takes_position_ids",
    "tiny_config",
    "unwrap_model",
]
