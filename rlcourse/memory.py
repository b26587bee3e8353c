"""How much memory a method needs before a single activation is stored (layer 1, pure arithmetic).

Mixed-precision training with Adam keeps, per trainable parameter (Rajbhandari et al., 2020,
"ZeRO", section 3.1):

    2 bytes  bf16/fp16 weights  +  2 bytes  gradients
  + 4 bytes  fp32 master weights + 4 bytes Adam first moment + 4 bytes Adam second moment
  = 16 bytes per parameter.

A frozen model (reward model, reference model) needs only its weights: 2 bytes per parameter in
bf16. Activations, the KV cache of generation and framework overhead come on top and depend on
batch size and sequence length; :func:`method_memory_gib` leaves them out on purpose.

:func:`training_step_memory` adds them for one training step of a Llama/Qwen2-style decoder
(:class:`TransformerShape`): weights, gradients, AdamW, the activations autograd keeps (with and
without gradient checkpointing, full fine-tuning or LoRA), the logits, and the phase whose sum
is the peak. ``benchmarks/bench_memory_05b.py`` checks it against a measured DPO step of a
Qwen2.5-0.5B-sized model.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlcourse.losses import OBJECTIVES

BYTES_TRAINABLE_MIXED_ADAM = 16
BYTES_FROZEN_HALF = 2
GIB = 2**30

#: Bytes of float32 logits one chunk of tokens may hold when log-probabilities are computed
#: from the hidden states in chunks (:func:`rlcourse.models.chunked_logprobs` reads it): 256 MiB,
#: ``2**28 // (4 V)`` tokens a chunk, 441 for Qwen2.5's vocabulary of 151,936.
LOGIT_CHUNK_BYTES = 2**28


@dataclass(frozen=True)
class ModelRole:
    """One model a method keeps in memory: its name, whether it is trained, size in parameters."""

    name: str
    trainable: bool
    n_params: int

    @property
    def bytes(self) -> int:
        """16 N bytes if trained with mixed-precision Adam, 2 N bytes if frozen in bf16."""
        per_param = BYTES_TRAINABLE_MIXED_ADAM if self.trainable else BYTES_FROZEN_HALF
        return per_param * self.n_params


def model_roles(method: str, n_params: int, precompute_reference: bool = False) -> list[ModelRole]:
    """The models ``method`` holds at once, all assumed to have ``n_params`` parameters.

    * ``ppo``: actor and critic trained, reward model and reference frozen (the four models);
    * ``sft`` and every preference loss of :data:`rlcourse.losses.OBJECTIVES` without a
      reference (``orpo``, ``simpo``, ...): the policy alone;
    * the losses with a reference (``dpo``, ``ipo``, ``rdpo``, ``kto``, ...): the policy and a
      frozen reference, unless the reference log-probs are precomputed once before training
      (then the reference is released).
    """
    method = method.lower()
    policy = ModelRole("policy", True, n_params)
    if method == "ppo":
        return [
            ModelRole("actor", True, n_params),
            ModelRole("critic", True, n_params),
            ModelRole("reward model", False, n_params),
            ModelRole("reference", False, n_params),
        ]
    objective = OBJECTIVES.get(method) if method != "bt" else None  # bt: the reward model's
    if method == "sft" or objective is not None:
        if objective is not None and objective.needs_reference and not precompute_reference:
            return [policy, ModelRole("reference", False, n_params)]
        return [policy]
    known = ", ".join(["ppo", "sft", *(m for m in OBJECTIVES if m != "bt")])
    raise ValueError(f"unknown method {method!r}; expected one of {known}")


def method_memory_gib(method: str, n_params: int, precompute_reference: bool = False) -> float:
    """Weights, gradients and optimiser state of every model ``method`` holds, in GiB:
    :math:`\\sum_m b_m N / 2^{30}` with :math:`b_m = 16` (trained) or :math:`2` (frozen)."""
    return sum(r.bytes for r in model_roles(method, n_params, precompute_reference)) / GIB


# --------------------------------------------------------------------------------------------
# One training step of a decoder-only transformer: weights, gradients, AdamW, activations
# --------------------------------------------------------------------------------------------
#: The linear layers of a Llama/Qwen2 decoder layer, grouped by the tensor they read.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TransformerShape:
    """The sizes of a Llama/Qwen2-style decoder (RMSNorm, rotary, grouped-query attention,
    SwiGLU MLP): vocabulary ``V``, hidden ``H``, layers ``L``, attention heads ``n_h``, key/value
    heads ``n_kv`` (``H_kv = n_kv H / n_h``), MLP width ``I``; ``qkv_bias`` (Qwen2: yes, Llama:
    no), ``tied`` input/output embeddings."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = True
    qkv_bias: bool = True

    @classmethod
    def from_config(cls, config) -> TransformerShape:
        """From a ``transformers`` config (``Qwen2Config``, ``LlamaConfig``, ...)."""
        return cls(
            vocab=config.vocab_size, hidden=config.hidden_size,
            layers=config.num_hidden_layers, heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate=config.intermediate_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        )

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each linear layer of one decoder layer."""
        h, kv, i = self.hidden, self.kv_hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def n_params(self) -> int:
        """``V H (1 or 2) + L (sum of linear weights + qkv biases + 2 H norm gains) + H``."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += self.hidden + 2 * self.kv_hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + self.hidden


#: Qwen2.5-0.5B and Qwen2.5-7B (their ``config.json``); chapter 14 and the benchmarks use them.
QWEN25_05B = TransformerShape(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2,
                              intermediate=4864, tied=True)
QWEN25_7B = TransformerShape(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                             intermediate=18944, tied=False)


def _targets(target_modules) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return LINEARS
    unknown = [t for t in target_modules if t not in LINEARS]
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; known: {', '.join(LINEARS)}")
    return tuple(target_modules)


def lora_parameters(shape: TransformerShape, r: int, target_modules="all-linear") -> int:
    """Adapter numbers: ``L * sum over adapted layers of r (d_in + d_out)``."""
    lin = shape.linear_shapes()
    return shape.layers * sum(r * sum(lin[t]) for t in _targets(target_modules))


def activation_values_per_token(shape: TransformerShape, lora_r: int | None = None,
                                target_modules="all-linear") -> int:
    """Values one decoder layer keeps for backward, per token (the autograd graph's saved
    tensors; counted with ``torch.autograd.graph.saved_tensors_hooks`` on Qwen2, SDPA attention).

    Full fine-tuning: ``8 H + 2 H_kv + 4 I + 2 + n_h``: the layer input and the two norms' input,
    normalised and scaled outputs (``6 H``), rotated queries (``H``), keys and values
    (``2 H_kv``), the attention output (``H``), the MLP's gate, its SiLU, up and their product
    (``4 I``), two inverse RMS and ``n_h`` log-sum-exps. Under LoRA the frozen norm gains need
    no normalised copy (``-2 H``), a linear layer's input is kept only if an adapter reads it,
    and each adapter keeps its rank-``r`` projection (``+ r``).
    """
    h, kv, i = shape.hidden, shape.kv_hidden, shape.intermediate
    small = 2 + shape.heads
    if lora_r is None:
        return 8 * h + 2 * kv + 4 * i + small
    t = set(_targets(target_modules))
    values = 2 * h + h + 2 * kv + h + 3 * i + small     # x, x2, q_rot, k, v, attention out, g/s/u
    values += h if t & {"q_proj", "k_proj", "v_proj"} else 0   # n1, read by q/k/v adapters
    values += h if t & {"gate_proj", "up_proj"} else 0        # n2
    values += i if "down_proj" in t else 0                    # s * u, read by down's adapter
    return values + lora_r * len(t)


@dataclass(frozen=True)
class StepMemory:
    """Predicted bytes of one training step (see :func:`training_step_memory`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    reference_pass: int
    peak: int
    phase: str
    trainable: int

    def gib(self) -> dict[str, float]:
        return {k: (v / GIB if isinstance(v, int) else v) for k, v in self.__dict__.items()
                if k not in ("phase", "trainable")}


def training_step_memory(
    shape: TransformerShape,
    n_sequences: int,
    seq_len: int,
    *,
    lora_r: int | None = None,
    target_modules="all-linear",
    checkpointing: bool = False,
    weight_bytes: int = 4,
    trainable_bytes: int = 4,
    activation_bytes: int = 4,
    reference_copy: bool = False,
    reference_sequences: int | None = None,
    foreach: bool = False,
    logits: str = "chunked",
) -> StepMemory:
    """Peak memory of one AdamW step on ``n_sequences`` sequences of ``seq_len`` tokens.

    With ``N`` parameters, ``P`` trained ones (all, or the LoRA adapters), ``S`` sequences of
    ``T`` tokens, ``a`` bytes per activation and ``w``/``t`` bytes per frozen/trained weight:

    * weights ``W = w (N - P) + t P``; gradients ``G = t P``; AdamW ``2 t P`` (first and second
      moments), plus its temporaries during the update: one tensor at a time (PyTorch's
      default on a CPU) the square root of the second moment and its quotient, two tensors the
      size of the largest trained one; with ``foreach=True`` (the default on GPUs) a square root
      of every second moment at once, ``t P``;
    * layer activations ``A = a S T L v`` with ``v`` from :func:`activation_values_per_token`,
      or with checkpointing ``a S T (L H + v)`` (every layer's input, one layer recomputed);
    * the logits, with ``logits="chunked"`` (how :func:`rlcourse.models.sequence_logprobs`
      scores a ``transformers`` model: from the hidden states, ``c = min(S T, 2**28 // (4 V))``
      tokens at a time, :data:`LOGIT_CHUNK_BYTES`) ``2 * 4 c V`` bytes: one chunk's float32
      logits and the temporary of its log-sum-exp (forward), or its logits turned in place
      into their gradient (backward); with ``logits="full"`` (the whole ``(S, T, V)`` logits,
      as a model's own output and :func:`rlcourse.models.score_sequences` give them)
      ``3 * 4 S T V`` bytes: at the end of the forward pass the logits, the contiguous copy
      ``log_softmax`` makes of ``logits[:, :-1]`` and the log-softmax (kept for backward); at
      the start of backward the kept log-softmax and two gradient buffers. Plus the trained
      output layer's gradient ``t V H`` when the embeddings train;
    * the reference pass (DPO, IPO, R-DPO, KTO) before training: a no-grad forward whose peak is
      the logits of ``S_ref`` sequences as above (``2 * 4 c V`` or ``3 * 4 S_ref T V``), plus a
      copy of the weights unless the reference is the model with adapters disabled
      (``reference_copy``).

    The peak is the largest of three phases: reference pass ``W (+ W) + logits``; the end
    of the forward / start of backward ``W + A + logits + output-layer gradient``; the optimizer
    step ``W + G + 2 t P + temporaries``. Framework overhead (the Python process, CUDA context)
    comes on top.
    """
    if logits not in ("chunked", "full"):
        raise ValueError(f"logits must be 'chunked' or 'full', got {logits!r}")
    n = shape.n_params
    p = lora_parameters(shape, lora_r, target_modules) if lora_r else n
    weights = weight_bytes * (n - p) + trainable_bytes * p if lora_r else trainable_bytes * n
    grads = trainable_bytes * p
    optimizer = 2 * trainable_bytes * p
    if lora_r:
        lin = shape.linear_shapes()
        largest = trainable_bytes * max(lora_r * max(lin[t]) for t in _targets(target_modules))
    else:
        largest = trainable_bytes * shape.vocab * shape.hidden
    update_temporaries = trainable_bytes * p if foreach else 2 * largest
    tokens = n_sequences * seq_len
    per_layer = activation_values_per_token(shape, lora_r, target_modules)
    if checkpointing:
        activations = activation_bytes * tokens * (shape.layers * shape.hidden + per_layer)
    else:
        activations = activation_bytes * tokens * shape.layers * per_layer
    chunk = max(1, LOGIT_CHUNK_BYTES // (4 * shape.vocab))

    def logit_bytes(n_tokens: int) -> int:
        if logits == "full":
            return 3 * 4 * n_tokens * shape.vocab
        return 2 * 4 * min(n_tokens, chunk) * shape.vocab

    head_grad = 0 if lora_r else trainable_bytes * shape.vocab * shape.hidden
    ref_tokens = (reference_sequences or n_sequences) * seq_len
    reference = 0
    if reference_sequences is not None:
        reference = weights * (2 if reference_copy else 1) + logit_bytes(ref_tokens)
    phases = {
        "reference pass": reference,
        "backward": weights + activations + logit_bytes(tokens) + head_grad,
        "optimizer step": weights + grads + optimizer + update_temporaries,
    }
    phase = max(phases, key=phases.get)
    return StepMemory(weights=weights, gradients=grads, optimizer=optimizer,
                      activations=activations, logits=logit_bytes(tokens), reference_pass=reference,
                      peak=phases[phase], phase=phase, trainable=p)
