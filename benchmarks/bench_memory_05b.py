"""Peak memory of one DPO step of a Qwen2.5-0.5B-sized model on the CPU, measured and predicted.

The model has Qwen2.5-0.5B's architecture and sizes (``Qwen2Config``: hidden 896, 24 layers, 14
heads, 2 key/value heads, MLP 4864, vocabulary 151,936, tied embeddings; 494M parameters),
randomly initialised (no download). One DPO step through :func:`rlcourse.preference.
train_preference`: the reference pass, then one AdamW step on 2 pairs (4 sequences) of 256
tokens, fp32, one thread. Three configurations, each in a fresh Python process so that its peak
resident set (``ru_maxrss``) is its own:

* ``full``: every weight trained; the reference is a frozen copy during the reference pass;
* ``lora``: LoRA r=16 on every linear layer; the reference is the model with adapters disabled;
* ``lora_gc``: the same plus gradient checkpointing.

Beside each measurement, :func:`rlcourse.memory.training_step_memory`'s prediction plus the
process's resident set before the model exists (Python, torch, transformers: measured, not
predicted).

Full against chunked logits (``--logits``): the LoRA + gradient-checkpointing step at 4 pairs of
1,024 tokens (8 sequences, 8,192 tokens), where the logits dominate: ``[8, 1024, 151936]``
float32 logits alone are 5 GB and their log-softmax as much again. Measured twice, each in its
fresh process: ``chunked``, as rlcourse scores today (log-probabilities from the hidden states a
chunk of tokens at a time, :func:`rlcourse.models.next_token_logprobs`), and ``full logits``,
the same step with :func:`rlcourse.models.scoring.output_layer` patched to ``None`` so that
every sequence is scored through the model's full logits, as before. Written to the same file
under ``logits_comparison`` with the predictions of ``training_step_memory(...,
logits="chunked" | "full")``.

Two allocators. The prediction counts the bytes of live tensors; the resident set also holds
what the C allocator keeps after ``free``. glibc's ``malloc`` serves blocks under its mmap
threshold (raised at run time up to 32 MiB) from heaps it rarely returns, so the freed
temporaries of the forward pass fragment them and the resident set grows beyond the live
tensors; with ``MALLOC_MMAP_THRESHOLD_=1048576`` every block of 1 MiB or more is its own
mapping, returned at ``free``, and the resident set follows the live tensors. Each
configuration is measured both ways (``glibc default`` and ``mmap threshold 1 MiB``). Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_05b.py    # writes results/memory_05b.json
    python benchmarks/bench_memory_05b.py --tiny                # a small model, seconds (a check)
    python benchmarks/bench_memory_05b.py --allocators mmap    # one allocator, merged into the file
    OMP_NUM_THREADS=1 python benchmarks/bench_memory_05b.py --logits --allocators mmap
                                                        # full vs chunked logits, 4 x 1,024 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory_05b.json"
ALLOCATORS = {"default": ("glibc default", {}),
              "mmap": ("mmap threshold 1 MiB", {"MALLOC_MMAP_THRESHOLD_": "1048576"})}
CONFIGS = {"full": {}, "lora": {"lora_r": 16}, "lora_gc": {"lora_r": 16, "checkpointing": True}}
#: The logits comparison: the LoRA + checkpointing step, scored chunked and through full logits.
SCORING = {"chunked": "chunked", "full_logits": "full"}
LOGITS_CONFIG = "lora_gc"
QWEN = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
            max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(QWEN, vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=384)


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure(name: str, pairs: int, seq_len: int, prompt_len: int, tiny: bool,
            scoring: str = "chunked") -> dict:
    """One configuration in this process (run it in a fresh one). ``scoring="full"``: every
    sequence scored through the model's full logits (``output_layer`` patched to ``None``)."""
    import accelerate  # noqa: F401  (imported by training; part of the baseline, not the model)
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlcourse.adapters import LoraSettings, apply_lora
    from rlcourse.engine import TrainConfig
    from rlcourse.preference import train_preference

    torch.set_num_threads(1)
    if scoring == "full":
        import rlcourse.models.scoring as scoring_module

        scoring_module.output_layer = lambda model: None
    baseline = _rss_bytes()
    opts = CONFIGS[name]
    config = Qwen2Config(**(TINY if tiny else QWEN))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    if opts.get("lora_r"):
        model = apply_lora(model, LoraSettings(r=opts["lora_r"]))
    g = torch.Generator().manual_seed(1)

    def seq() -> dict:
        ids = torch.randint(0, config.vocab_size, (seq_len,), generator=g)
        comp = torch.zeros(seq_len, dtype=torch.long)
        comp[prompt_len:] = 1
        return {"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long),
                "completion_mask": comp}

    items = []
    for _ in range(pairs):
        c, r = seq(), seq()
        items.append({**{f"chosen_{k}": v for k, v in c.items()},
                      **{f"rejected_{k}": v for k, v in r.items()}})
    cfg = TrainConfig(lr=1e-5, max_steps=1, batch_size=pairs, log_every=1, device="cpu",
                      progress=False, warmup_steps=0, schedule="constant",
                      gradient_checkpointing=bool(opts.get("checkpointing")))
    start = time.perf_counter()
    run = train_preference("dpo", model, items, cfg, beta=0.1)
    seconds = time.perf_counter() - start
    return {"config": name, "logits": scoring, "peak_rss_bytes": _peak_bytes(),
            "baseline_rss_bytes": baseline,
            "n_parameters": n_params,
            "trainable_parameters": sum(p.numel() for p in model.parameters()
                                        if p.requires_grad),
            "loss": run.history.rows[0]["loss"], "reference_seconds": run.reference_seconds,
            "train_seconds": run.train_seconds, "total_seconds": seconds}


def predict(name: str, pairs: int, seq_len: int, tiny: bool, logits: str = "full") -> dict:
    from transformers import Qwen2Config

    from rlcourse.memory import TransformerShape, training_step_memory

    shape = TransformerShape.from_config(Qwen2Config(**(TINY if tiny else QWEN)))
    opts = CONFIGS[name]
    m = training_step_memory(shape, 2 * pairs, seq_len, lora_r=opts.get("lora_r"),
                             checkpointing=bool(opts.get("checkpointing")),
                             reference_copy=not opts.get("lora_r"),
                             reference_sequences=pairs,  # chosen, then rejected, per forward
                             logits=logits)
    return {"predicted_bytes": m.peak, "predicted_phase": m.phase,
            "predicted_parts_gib": {k: round(v, 4) for k, v in m.gib().items()},
            "predicted_trainable": m.trainable}


def _add_prediction(row: dict, pairs: int, seq_len: int, tiny: bool) -> None:
    # rows measured before chunked scoring carry no "logits": they were scored through the
    # full logits
    row.update(predict(row["config"], pairs, seq_len, tiny, row.setdefault("logits", "full")))
    row["predicted_with_baseline_bytes"] = row["predicted_bytes"] + row["baseline_rss_bytes"]
    row["ratio_measured_to_predicted"] = round(
        row["peak_rss_bytes"] / row["predicted_with_baseline_bytes"], 4)
    row["ratio_above_baseline"] = round(
        (row["peak_rss_bytes"] - row["baseline_rss_bytes"]) / row["predicted_bytes"], 4)


def _run_one(name: str, scoring: str, allocator: str, pairs: int, seq_len: int, prompt_len: int,
             tiny: bool) -> dict:
    """``name`` measured in a fresh process under ``allocator``; its prediction added."""
    label, malloc_env = ALLOCATORS[allocator]
    cmd = [sys.executable, __file__, "--one", name, "--pairs", str(pairs), "--seq-len",
           str(seq_len), "--prompt-len", str(prompt_len), "--scoring", scoring]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **malloc_env}
    proc = subprocess.run(cmd + (["--tiny"] if tiny else []), capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} ({scoring}) failed:\n{proc.stderr[-3000:]}")
    row = {"allocator": label, **json.loads(proc.stdout.strip().splitlines()[-1])}
    _add_prediction(row, pairs, seq_len, tiny)
    print(f"{label:22s} {name:8s} {scoring:8s} peak {row['peak_rss_bytes'] / 2**30:6.2f} GiB   "
          f"predicted {row['predicted_with_baseline_bytes'] / 2**30:6.2f} GiB "
          f"({row['predicted_phase']})   ratio {row['ratio_measured_to_predicted']:.3f}   step "
          f"{row['train_seconds']:.1f} s", flush=True)
    return row


def _summarise(comparison: dict) -> None:
    """Peak of the chunked step relative to the full-logits step, per allocator: the whole
    resident set, and above the baseline (what the step itself adds)."""
    summary = {}
    for label in {r["allocator"] for r in comparison["rows"]}:
        by = {r["logits"]: r for r in comparison["rows"] if r["allocator"] == label}
        if {"full", "chunked"} <= set(by):
            full, chunked = by["full"], by["chunked"]
            summary[label] = {
                "peak_reduction": round(1 - chunked["peak_rss_bytes"] / full["peak_rss_bytes"],
                                        4),
                "peak_reduction_above_baseline": round(1 - (
                    chunked["peak_rss_bytes"] - chunked["baseline_rss_bytes"]) / (
                    full["peak_rss_bytes"] - full["baseline_rss_bytes"]), 4),
                "same_loss": chunked["loss"] == full["loss"],
            }
    comparison["summary"] = summary


def compare_logits(args: argparse.Namespace, out: Path) -> None:
    """Full against chunked logits on the LoRA + checkpointing step (one process each),
    written under ``logits_comparison`` of ``out``; the other rows are kept."""
    pairs = args.pairs if args.pairs != 2 else 4          # the defaults of this comparison
    seq_len = args.seq_len if args.seq_len != 256 else 1024
    rows = [_run_one(LOGITS_CONFIG, scoring, allocator, pairs, seq_len, args.prompt_len,
                     args.tiny)
            for allocator in args.allocators for scoring in SCORING.values()]
    comparison = {
        "what": "peak RSS of one DPO step (reference pass + 1 AdamW step), LoRA r=16 + gradient "
                "checkpointing, scored chunked vs through the full logits, fresh process each",
        "config": LOGITS_CONFIG, "pairs": pairs, "sequences": 2 * pairs, "seq_len": seq_len,
        "prompt_len": args.prompt_len, "dtype": "float32", "threads": 1, "rows": rows,
    }
    _summarise(comparison)
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    result["logits_comparison"] = comparison
    out.parent.mkdir(parents=True, exist_ok=True)
    from rlcourse.files import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(comparison["summary"], indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a small model (a quick check)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config
    parser.add_argument("--repredict", action="store_true",
                        help="recompute the predictions of the saved measurements, measure nothing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS),
                        default=list(ALLOCATORS))
    parser.add_argument("--logits", action="store_true",
                        help="full vs chunked logits on the LoRA + checkpointing step "
                             "(default 4 pairs of 1,024 tokens)")
    parser.add_argument("--scoring", default="chunked", help=argparse.SUPPRESS)  # with --one
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.pairs, args.seq_len, args.prompt_len,
                                 args.tiny, args.scoring)))
        return
    out = args.out or (RESULTS if not args.tiny else RESULTS.with_name("memory_05b_tiny.json"))
    from rlcourse.files import atomic_write_text

    if args.repredict:
        result = json.loads(out.read_text())
        for row in result["rows"]:
            _add_prediction(row, result["pairs"], result["seq_len"], args.tiny)
        comparison = result.get("logits_comparison")
        if comparison:
            for row in comparison["rows"]:
                _add_prediction(row, comparison["pairs"], comparison["seq_len"], args.tiny)
            _summarise(comparison)
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")
        print(f"rewrote the predictions in {out}")
        return
    if args.logits:
        compare_logits(args, out)
        return
    rows = []
    if out.exists() and set(args.allocators) != set(ALLOCATORS):  # keep the other allocator's
        rows = [r for r in json.loads(out.read_text())["rows"]
                if r.get("allocator", "glibc default") not in
                {ALLOCATORS[a][0] for a in args.allocators}]
    for allocator, name in [(a, n) for a in args.allocators for n in CONFIGS]:
        row = _run_one(name, "chunked", allocator, args.pairs, args.seq_len, args.prompt_len,
                       args.tiny)
        rows.append(row)
    import torch
    import transformers

    result = {
        "what": "peak RSS of one DPO step (reference pass + 1 AdamW step), fresh process per "
                "configuration, vs rlcourse.memory.training_step_memory + measured baseline",
        "model": "Qwen2.5-0.5B architecture and sizes, random init (Qwen2Config)"
        if not args.tiny else "tiny Qwen2 (check only)",
        "pairs": args.pairs, "sequences": 2 * args.pairs, "seq_len": args.seq_len,
        "prompt_len": args.prompt_len, "dtype": "float32", "threads": 1,
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "rows": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
    }
    for r in rows:
        r.setdefault("allocator", "glibc default")
    rows.sort(key=lambda r: (r["allocator"] != "mmap threshold 1 MiB", list(CONFIGS).index(
        r["config"])))
    if out.exists():  # keep the logits comparison, measured by its own run
        old = json.loads(out.read_text())
        if "logits_comparison" in old:
            result["logits_comparison"] = old["logits_comparison"]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
