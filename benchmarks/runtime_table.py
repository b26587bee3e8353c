"""Runtime of one DPO training step, per model size and device: tokens per second.

One DPO step = one forward over chosen and rejected stacked in the batch, the DPO loss against
precomputed reference log-probs, backward, gradient clipping and an AdamW update: exactly what
``python -m rlcourse.recipes recipes/dpo.yaml`` runs (:func:`rlcourse.preference.train_preference`
on :func:`rlcourse.engine.train`). Tokens per second counts the real (unpadded) tokens of chosen
and rejected answers with their prompts, as the engine logs them (``History`` column
``tokens_per_s``), over the steps after a warm-up.

Models: the shipped SFT checkpoint (3 layers, hidden 128) and two larger configurations of the
same tiny Llama-style architecture, freshly initialised (speed does not depend on the weights).
Data: the first pairs of ``data/preferences.jsonl``, batch 8 pairs.

Rows for GPUs are written as "not measured" unless the script runs on a machine with CUDA; the
GPU step of a 0.5B-sized model is measured by ``benchmarks/gpu_check.sh`` (``results/gpu.json``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/runtime_table.py      # writes results/runtime_table.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rlcourse.config import DATA_DIR
from rlcourse.data import load_preferences
from rlcourse.engine import TrainConfig, train
from rlcourse.files import atomic_write_text
from rlcourse.models import build_model, load_model
from rlcourse.preference import make_loss_fn, precompute_reference_logps, tokenize_pairs

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_table.json"
#: The GPU row when the script runs without CUDA: not measured here, measured by gpu_check.sh.
NO_GPU_STATUS = ("not measured by this script (it ran on a CPU); "
                 "the GPU step is in benchmarks/results/gpu.json")

#: name -> tiny_config keyword arguments (None: the shipped SFT checkpoint).
SIZES: dict[str, dict[str, int] | None] = {
    "shipped SFT (3 x 128)": None,
    "6 x 256": {"n_layers": 6, "hidden_size": 256, "n_heads": 8},
    "8 x 512": {"n_layers": 8, "hidden_size": 512, "n_heads": 8},
}


def measure(size: dict[str, int] | None, n_pairs: int = 64, batch_size: int = 8,
            steps: int = 12, warmup: int = 2, device: str = "cpu",
            mixed_precision: str = "no") -> dict[str, Any]:
    """Tokens per second and seconds per step of DPO training steps on ``device``.

    The first ``warmup`` steps are discarded (allocation, first-call overheads); the median
    over the remaining steps is reported.
    """
    sft, tok = load_model(DATA_DIR / "checkpoints" / "sft", device=device)
    model = sft if size is None else build_model(tok, seed=0, **size).to(device)
    pairs = load_preferences(DATA_DIR / "preferences.jsonl")[:n_pairs]
    items = tokenize_pairs(tok, pairs, max_length=128)
    items = precompute_reference_logps(copy.deepcopy(model), items, pad_id=tok.pad_token_id)
    config = TrainConfig(lr=1e-4, max_steps=steps, batch_size=batch_size, log_every=1,
                         device=device, mixed_precision=mixed_precision, progress=False)
    model.train()
    start = time.perf_counter()
    history = train(model, make_loss_fn("dpo", beta=0.1), items, config)
    total = time.perf_counter() - start
    rates = [r["tokens_per_s"] for r in history.rows if "tokens_per_s" in r][warmup:]
    tokens_per_step = statistics.fmean(
        int(it["chosen_attention_mask"].sum() + it["rejected_attention_mask"].sum())
        for it in items) * batch_size
    median = statistics.median(rates)
    return {
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "config": size or "shipped",
        "batch_pairs": batch_size,
        "tokens_per_step": round(tokens_per_step),
        "tokens_per_s": round(median),
        "tokens_per_s_min": round(min(rates)),
        "tokens_per_s_max": round(max(rates)),
        "seconds_per_step": round(tokens_per_step / median, 4),
        "steps_timed": len(rates),
        "wall_seconds": round(total, 2),
        "device": device,
        "mixed_precision": mixed_precision,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, size in SIZES.items():
        row = {"model": name, **measure(size, steps=args.steps)}
        row["device_name"] = f"CPU ({platform.processor() or platform.machine()}), 1 thread"
        rows.append(row)
        print(f"{name:24s} {row['n_parameters']:>11,d} params  {row['tokens_per_s']:>8,d} tok/s  "
              f"{row['seconds_per_step']:.3f} s/step", flush=True)
    if torch.cuda.is_available():
        for name, size in SIZES.items():
            row = {"model": name, **measure(size, steps=args.steps, device="cuda",
                                            mixed_precision="auto")}
            row["device_name"] = torch.cuda.get_device_name()
            rows.append(row)
    else:
        rows.append({"model": "any", "device": "cuda", "device_name": "NVIDIA GPU",
                     "status": NO_GPU_STATUS})
    result = {
        "benchmark": "tokens per second of one DPO training step (forward of chosen + rejected, "
                     "backward, AdamW), batch 8 pairs, reference log-probs precomputed",
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "note": "a 2-core machine shared with other processes: rough timings"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
