"""Exercises of chapter 14, "From the tiny GPT to a real model": memory of the models a method
holds, the batch arithmetic of several GPUs, and position ids under left padding."""

from __future__ import annotations

import math

import numpy as np
import torch

from rlcourse.exercises import Case, Exercise, register
from rlcourse.memory import method_memory_gib
from rlcourse.models import position_ids_from_mask

CHAPTER = "14_real_model"
SIZES = (0.5e9, 1.5e9, 7e9, 70e9)


# ---- memory of a method ------------------------------------------------------------------------
def _memory_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for method in ("ppo", "dpo", "kto", "orpo", "simpo", "sft"):
        for n in (SIZES[int(rng.integers(len(SIZES)))], 1e6):
            cases.append(Case((method, int(n), False), label=f"{method}, {n:.3g} parameters"))
    cases += [Case(("dpo", int(7e9), True), label="DPO with precomputed reference log-probs"),
              Case(("ppo", int(7e9), True), label="PPO: nothing to precompute")]
    return cases


def _wrong_memory(trained: int, frozen: int, gib: float = 2**30, drop_precompute=False):
    def memory(method, n_params, precompute_reference):
        m = method.lower()
        if m == "ppo":
            total = 2 * trained + 2 * frozen
        elif m in ("dpo", "ipo", "rdpo", "kto"):
            skip = precompute_reference and not drop_precompute
            total = trained + (0 if skip else frozen)
        else:
            total = trained
        return total * n_params / gib
    return memory


register(Exercise(
    name="method_memory_gib",
    chapter=CHAPTER,
    reference=lambda method, n, pre: method_memory_gib(method, n, pre),
    cases=_memory_cases,
    hint="Per trained parameter (bf16 mixed precision with Adam): 2 (weights) + 2 (gradients) + "
         "4 (fp32 master copy) + 4 + 4 (Adam's two moments) = 16 bytes; per frozen parameter "
         "2 bytes. PPO trains actor and critic and freezes reward model and reference; DPO, IPO, "
         "R-DPO and KTO add a frozen reference unless its log-probs were precomputed; ORPO, "
         "SimPO and SFT hold the policy alone. GiB = 2^30 bytes.",
    wrong_answers=[
        (_wrong_memory(4, 2), "forgot the optimizer: Adam keeps an fp32 master copy and two "
         "moments, 12 more bytes per trained parameter"),
        (_wrong_memory(16, 2, gib=1e9), "a GiB is 2^30 bytes, not 10^9"),
        (_wrong_memory(16, 4), "frozen models are kept in bf16: 2 bytes per parameter"),
        (_wrong_memory(16, 2, drop_precompute=True), "with precomputed reference log-probs the "
         "reference model is released before training"),
        (_wrong_memory(8, 2), "fp32 master weights (4) plus two Adam moments (4 + 4) come on top "
         "of bf16 weights and gradients"),
    ],
))


# ---- optimizer steps on several GPUs ------------------------------------------------------------
def _steps(n_examples: int, per_device_batch: int, grad_accum_steps: int,
           n_processes: int) -> int:
    return math.ceil(n_examples / (per_device_batch * grad_accum_steps * n_processes))


register(Exercise(
    name="steps_per_epoch",
    chapter=CHAPTER,
    reference=_steps,
    cases=lambda rng: [Case((2559, 8, 4, 1), label="one GPU"),
                       Case((2559, 8, 4, 8), label="eight GPUs"),
                       Case((60000, 4, 16, 4)),
                       Case((1000, 10, 10, 10), label="exactly one step"),
                       Case((1001, 10, 10, 10), label="one example too many: a last short step")],
    hint="One optimizer step consumes the global batch: per-device batch x accumulation steps x "
         "number of processes. A last partial batch still makes a step.",
    wrong_answers=[
        (lambda n, b, a, p: math.ceil(n / (b * a)), "each of the p processes takes its own "
         "batch: the global batch is b * a * p"),
        (lambda n, b, a, p: math.ceil(n / (b * p)), "accumulation: one step per a micro-batches"),
        (lambda n, b, a, p: n // (b * a * p), "the last, partial batch still makes a step"),
    ],
))


# ---- position ids under left padding -----------------------------------------------------------
def _mask_cases(rng: np.random.Generator) -> list[Case]:
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    lengths = rng.integers(1, 9, 4)
    rand = torch.zeros(4, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        rand[i, 8 - n:] = 1
    return [Case((left,), label="left padding (generation)"),
            Case((right,), label="right padding (training)"), Case((rand,), label="random")]


register(Exercise(
    name="position_ids",
    chapter=CHAPTER,
    reference=position_ids_from_mask,
    cases=_mask_cases,
    hint="The first REAL token of every row gets position 0, the next 1, ...: count real tokens "
         "with a cumulative sum of the attention mask, minus one; padding positions get 0.",
    wrong_answers=[
        (lambda m: torch.arange(m.shape[1]).expand_as(m),
         "with left padding the first real token is not at column 0: positions must count real "
         "tokens only (a model with absolute position embeddings reads shifted positions "
         "otherwise)"),
        (lambda m: m.long().cumsum(-1), "positions start at 0: subtract one"),
        (lambda m: m.long().cumsum(-1) - 1, "padding positions must not be -1: clamp at 0"),
    ],
))


# ---- LoRA: how many numbers are trained ------------------------------------------------------
def _lora_count(shapes: list[tuple[int, int]], r: int) -> int:
    return sum(r * (d_in + d_out) for d_in, d_out in shapes)


def _qwen_layer(hidden: int, kv: int, mlp: int) -> list[tuple[int, int]]:
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp),
            (hidden, mlp), (mlp, hidden)]


register(Exercise(
    name="lora_parameters",
    chapter=CHAPTER,
    reference=_lora_count,
    cases=lambda rng: [Case(([(896, 896)], 16), label="one square layer"),
                       Case((_qwen_layer(896, 128, 4864), 16),
                            label="the seven linear layers of one Qwen2.5-0.5B layer, r=16"),
                       Case((_qwen_layer(3584, 512, 18944) * 28, 8),
                            label="all 28 layers of Qwen2.5-7B, r=8"),
                       Case(([(int(a), int(b)) for a, b in rng.integers(1, 500, (5, 2))],
                             int(rng.integers(1, 9))), label="random shapes")],
    hint="An adapted layer W0 (d_out x d_in) gets A (r x d_in) and B (d_out x r): r (d_in + d_out) "
         "trained numbers; W0 itself is frozen. Sum over the adapted layers.",
    wrong_answers=[
        (lambda shapes, r: sum(a * b for a, b in shapes), "that counts the frozen weights W0; "
         "LoRA trains only A and B"),
        (lambda shapes, r: sum(r * a for a, b in shapes), "B (d_out x r) is trained too"),
        (lambda shapes, r: sum(r * r for _ in shapes),
         "A is r x d_in and B is d_out x r, not r x r"),
    ],
))
