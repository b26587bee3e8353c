"""The DPO recipe with LoRA + gradient checkpointing on a Qwen2.5-0.5B-sized model, on the CPU.

What a reader runs to take chapter 9's DPO to a real model, end to end through the command line:
a model directory (Qwen2.5-0.5B's architecture and sizes, random weights, saved with
``save_pretrained``; the book's word-level tokenizer), a JSONL file of preference pairs, and::

    python -m rlcourse.recipes recipes/dpo.yaml --model DIR --data pairs.jsonl --output OUT \\
        lora.r=16 lora.alpha=32 lora.merge=true train.gradient_checkpointing=true \\
        train.max_steps=2 train.batch_size=2 ...

Records the exit code, wall time, the first losses (``ln 2`` at step 1: the adapted model is
the reference), the child's peak resident memory and what was saved. Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_recipe_lora_05b.py  # results/recipe_lora_05b.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "recipe_lora_05b.json"
QWEN = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
            max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--words", type=int, default=120, help="words per answer")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlcourse.data import write_jsonl
    from rlcourse.models import build_tokenizer, save_model

    words = [f"w{i}" for i in range(500)]
    tok = build_tokenizer(words)
    rng = random.Random(0)
    pairs = [{"prompt": " ".join(rng.choices(words, k=40)),
              "chosen": " ".join(rng.choices(words, k=args.words)),
              "rejected": " ".join(rng.choices(words, k=args.words))} for _ in range(args.pairs)]
    with tempfile.TemporaryDirectory(prefix="qwen05b-") as tmp:
        tmp = Path(tmp)
        config = Qwen2Config(**QWEN, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        save_model(AutoModelForCausalLM.from_config(config), tok, tmp / "model")
        write_jsonl(tmp / "pairs.jsonl", pairs)
        cmd = [sys.executable, "-m", "rlcourse.recipes", str(ROOT / "recipes" / "dpo.yaml"),
               "--model", str(tmp / "model"), "--data", str(tmp / "pairs.jsonl"),
               "--output", str(tmp / "out"), "lora.r=16", "lora.alpha=32", "lora.merge=true",
               "train.gradient_checkpointing=true", f"train.max_steps={args.steps}",
               "train.batch_size=2", "train.grad_accum_steps=1", "train.lr=1e-4",
               "train.warmup_steps=0", "train.log_every=1", "train.progress=false",
               "train.device=cpu", "max_length=256", "reference_batch_size=4"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out = tmp / "out"
        history = json.loads((out / "history.json").read_text()) if proc.returncode == 0 else []
        result = {
            "what": "python -m rlcourse.recipes recipes/dpo.yaml with LoRA r=16 (all linear) + "
                    "gradient checkpointing on a Qwen2.5-0.5B-sized model (random init), CPU, "
                    "fp32, one thread",
            "command": " ".join(c if "/" not in c else Path(c).name for c in cmd[1:]),
            "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "peak_rss_gib_child": round(peak / 2**30, 3),
            "losses": [r["loss"] for r in history if "loss" in r],
            "saved_model": sorted(p.name for p in (out / "model").iterdir())
            if (out / "model").is_dir() else [],
            "saved_merged": sorted(p.name for p in (out / "merged").iterdir())
            if (out / "merged").is_dir() else [],
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
        }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
