"""One DPO training step: rlcourse against Hugging Face TRL's ``DPOTrainer``, on the CPU.

Both train the same tiny Llama-style model (built here, 2 layers, hidden 128) on the same
preference pairs (sampled from the assistant world and labelled by its annotator) with the
same batch, optimiser (AdamW, constant learning rate, gradient clipping at 1), fp32 and one
thread. The training set *is* one batch, so every step of both sees exactly the same
examples and the logged losses are comparable step by step.

Measured:

- the loss of the first step with the reference equal to the policy (``ln 2`` for both), and
  the first two losses with a reference that differs from the policy (the same model after a
  little training on other data): the two implementations must agree;
- the wall time per optimizer step, step to step (median over steps after a warm-up), and the
  process's CPU time per step (``time.process_time``: on a shared machine the time other
  processes take from this one's core does not count, so it is the steadier of the two), for
  rlcourse (reference log-probs precomputed once, the default of ``train_preference``) and for
  TRL in fp32 twice: a reference forward every step (its default) and with
  ``precompute_ref_log_probs=True``; rlcourse also without packing (``rlcourse_padded``: the
  batch scored padded, as before padding-free packing); and, for information, TRL as
  ``DPOConfig`` comes out of the box, which switches on bf16 autocast even on a CPU (its losses
  then differ from fp32 in the fourth digit, which is why the comparisons above set
  ``bf16=False``).

TRL is a benchmark-only extra (``pip install -e ".[bench]"``). Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_trl_step.py          # writes results/trl_step.json
    OMP_NUM_THREADS=1 python benchmarks/bench_trl_step.py --rounds 1 --batch 8   # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from rlcourse.engine import TrainConfig
from rlcourse.files import atomic_write_text
from rlcourse.models import build_model, build_tokenizer, format_prompt
from rlcourse.preference import (
    make_loss_fn,
    precompute_reference_logps,
    tokenize_pairs,
    train_preference,
)
from rlcourse.worlds.assistant import DEFAULT_WORLD, Annotator, preference_pairs

RESULTS = Path(__file__).resolve().parent / "results" / "trl_step.json"


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs: two grammar samples per prompt, labelled by the default annotator."""
    world = DEFAULT_WORLD
    prompts = world.prompts()
    pairs: list[dict] = []
    k = 0
    while len(pairs) < n:
        batch = [prompts[(7 * (k + i)) % len(prompts)] for i in range(2 * n)]
        a = [world.sample_response(p, seed=seed * 100_000 + 2 * (k + i)) for i, p in
             enumerate(batch)]
        b = [world.sample_response(p, seed=seed * 100_000 + 2 * (k + i) + 1) for i, p in
             enumerate(batch)]
        pairs += preference_pairs(batch, a, b, Annotator(), seed=seed + k)
        k += 2 * n
    return pairs[:n]


def config(steps: int, batch: int, lr: float) -> TrainConfig:
    return TrainConfig(lr=lr, max_steps=steps, batch_size=batch, grad_accum_steps=1,
                       max_grad_norm=1.0, warmup_steps=0, schedule="constant", log_every=1,
                       device="cpu", progress=False, seed=0)


def step_times(stamps: list[float], warmup: int) -> list[float]:
    diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return diffs[warmup:] if len(diffs) > warmup else diffs


def stamp() -> tuple[float, float]:
    """``(wall, CPU)`` seconds now: ``perf_counter`` and ``process_time``."""
    return time.perf_counter(), time.process_time()


# --------------------------------------------------------------------------------------------
# rlcourse
# --------------------------------------------------------------------------------------------


def run_rlcourse(policy, reference, tok, pairs, steps, lr, beta, packed: bool = True) -> dict:
    """``packed=False``: the batch is scored padded (``packing_width`` patched to ``None``), to
    show what padding-free packing saves."""
    import rlcourse.models.scoring as scoring

    if not packed:
        width, scoring.packing_width = scoring.packing_width, lambda model, mask: None
        try:
            return run_rlcourse(policy, reference, tok, pairs, steps, lr, beta)
        finally:
            scoring.packing_width = width
    model = copy.deepcopy(policy)
    stamps: list[tuple[float, float]] = []

    def on_step(step, history, m):
        stamps.append(stamp())

    items = precompute_reference_logps(reference, tokenize_pairs(tok, pairs, max_length=128))
    run = train_preference("dpo", model, items, config(steps, len(pairs), lr), tokenizer=tok,
                           beta=beta, engine_kwargs={"callbacks": [on_step]})
    return {"losses": run.history.series("loss")[1], "stamps": stamps}


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------


def run_trl(policy, reference, tok, pairs, steps, lr, beta, precompute: bool,
            bf16: bool = False) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps: list[tuple[float, float]] = []
    losses: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(stamp())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    # TRL appends the EOS token to non-conversational completions and tokenises prompt and
    # prompt + completion; with the chat-formatted prompt and a leading space the token ids
    # are exactly those of rlcourse (checked below).
    rows = [{"prompt": format_prompt(p["prompt"], tok), "chosen": " " + p["chosen"],
             "rejected": " " + p["rejected"]} for p in pairs]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=len(pairs), max_steps=steps,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            weight_decay=0.0, beta=beta, logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", seed=0, max_length=128, disable_tqdm=True,
            dataloader_num_workers=0, precompute_ref_log_probs=precompute, optim="adamw_torch",
            bf16=bf16,  # TRL's DPOConfig defaults to bf16 autocast, even on a CPU; rlcourse: fp32
        )
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                             args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Stamp()])
        first = trainer.train_dataset[0]
        ids = first["prompt_ids"] + first["chosen_ids"]
        ours = tokenize_pairs(tok, pairs[:1], max_length=128)[0]["chosen_input_ids"].tolist()
        same_tokens = ids == ours
        trainer.train()
    return {"losses": losses, "stamps": stamps, "same_tokens": same_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="steps per run")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each variant, in turns")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed in each run")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    pairs = make_pairs(args.batch)
    texts = [" ".join([p["prompt"], p["chosen"], p["rejected"]]) for p in pairs]
    tok = build_tokenizer(DEFAULT_WORLD.vocabulary() + texts)
    policy = build_model(tok, seed=0)  # 2 layers, hidden 128
    n_params = sum(p.numel() for p in policy.parameters())

    # A reference that differs from the policy: the policy after 20 SFT-like steps on other pairs.
    other = make_pairs(args.batch, seed=1)
    reference = copy.deepcopy(policy)
    train_preference("simpo", reference, other, config(20, len(other), 1e-3), tokenizer=tok)

    # Agreement: pi = pi_ref (ln 2), then pi != pi_ref for two steps.
    agree = {}
    for name, ref in (("policy_is_reference", policy), ("policy_differs", reference)):
        ours = run_rlcourse(policy, ref, tok, pairs, 2, args.lr, args.beta)
        theirs = run_trl(policy, ref, tok, pairs, 2, args.lr, args.beta, precompute=False)
        agree[name] = {"rlcourse": ours["losses"], "trl": theirs["losses"],
                       "same_token_ids": theirs["same_tokens"]}
    # The same loss straight from the loss function, no training loop, as a third opinion.
    items = precompute_reference_logps(reference, tokenize_pairs(tok, pairs, 128))
    from rlcourse.data import pad_collate

    with torch.no_grad():
        direct, _ = make_loss_fn("dpo", beta=args.beta)(policy, pad_collate(items))
    agree["policy_differs"]["loss_fn_direct"] = float(direct)

    # Timing: the variants take turns, round after round, so that a change in the load of a
    # shared machine hits all of them alike; the median is over every timed step of all rounds.
    runs = {
        "rlcourse": dict(),
        "rlcourse_padded": dict(packed=False),  # the same without packing
        "trl_default": dict(precompute=False),
        "trl_precompute_ref": dict(precompute=True),
        # What DPOConfig gives out of the box: bf16 autocast (on a CPU too), reference forward.
        "trl_out_of_the_box_bf16": dict(precompute=False, bf16=True),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    bf16_losses = None
    for _ in range(args.rounds):
        for name, kw in runs.items():
            if name.startswith("rlcourse"):
                out = run_rlcourse(policy, reference, tok, pairs, args.steps, args.lr, args.beta,
                                   **kw)
            else:
                out = run_trl(policy, reference, tok, pairs, args.steps, args.lr, args.beta, **kw)
            if name == "trl_out_of_the_box_bf16":
                bf16_losses = out["losses"][:2]
            times[name] += step_times([w for w, _ in out["stamps"]], args.warmup)
            cpu_times[name] += step_times([c for _, c in out["stamps"]], args.warmup)
    timing = {
        name: {"median_step_s": statistics.median(t), "mean_step_s": statistics.fmean(t),
               "median_step_cpu_s": statistics.median(cpu_times[name]),
               "n_steps_timed": len(t)}
        for name, t in times.items()
    }

    import transformers
    import trl

    first_equal = all(
        math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
        for v in agree.values() for a, b in zip(v["rlcourse"], v["trl"], strict=True)
    )
    result = {
        "what": "one DPO optimizer step, rlcourse vs TRL DPOTrainer, same model/data/batch, CPU",
        "model": {"layers": 2, "hidden": 128, "parameters": n_params, "vocab": len(tok)},
        "batch_pairs": len(pairs),
        "sequences_per_step": 2 * len(pairs),
        "beta": args.beta,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps_per_run": args.steps,
        "losses": agree,
        "first_step_losses_equal": first_equal,
        "trl_bf16_default_first_losses_policy_differs": bf16_losses,
        "timing": timing,
        "ratio_rlcourse_to_trl_default": timing["rlcourse"]["median_step_s"]
        / timing["trl_default"]["median_step_s"],
        "ratio_rlcourse_to_trl_precompute": timing["rlcourse"]["median_step_s"]
        / timing["trl_precompute_ref"]["median_step_s"],
        "ratio_rlcourse_to_trl_default_cpu": timing["rlcourse"]["median_step_cpu_s"]
        / timing["trl_default"]["median_step_cpu_s"],
        "ratio_rlcourse_to_trl_precompute_cpu": timing["rlcourse"]["median_step_cpu_s"]
        / timing["trl_precompute_ref"]["median_step_cpu_s"],
        "ratio_packed_to_padded": timing["rlcourse"]["median_step_s"]
        / timing["rlcourse_padded"]["median_step_s"],
        "ratio_packed_to_padded_cpu": timing["rlcourse"]["median_step_cpu_s"]
        / timing["rlcourse_padded"]["median_step_cpu_s"],
        "ratio_meaning": "rlcourse's median step time divided by TRL's (below 1: rlcourse is "
                         "faster); _cpu: process CPU time per step",
        "versions": {"torch": torch.__version__, "trl": trl.__version__,
                     "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
