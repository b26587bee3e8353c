"""How long does the shipped small GPT take to make from scratch? Pretraining + SFT.

    OMP_NUM_THREADS=1 python benchmarks/bench_sft.py [--repeat 1] [--layers 3] [--device cpu]

Runs steps 1–3 of ``data/build.py`` (tokenizer, pretraining corpus, base model, SFT set, SFT
model) with the shipped configuration into a temporary folder, and prints the wall time of
pretraining and of SFT, the tokens per second, and the system load average before and after
(other processes on the machine slow the run down; the load says how busy it was).
Results go to ``benchmarks/results/sft.json``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _build_module():
    spec = importlib.util.spec_from_file_location("data_build", ROOT / "data" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_build"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_once(build, cfg) -> dict:
    from rlcourse.data import tokenize_sft
    from rlcourse.engine import TrainConfig, sft_loss_fn, train
    from rlcourse.models import build_model, build_tokenizer
    from rlcourse.worlds.assistant import DEFAULT_WORLD as world

    rng = __import__("numpy").random.default_rng(cfg.seed)
    train_prompts, _ = world.split_prompts(cfg.n_eval_per_topic, seed=rng)
    tok = build_tokenizer(world.vocabulary())
    docs = world.pretraining_corpus(cfg.n_pretrain_docs, seed=rng, prompts=train_prompts)
    model = build_model(tok, seed=cfg.seed, n_layers=cfg.n_layers, hidden_size=cfg.hidden_size,
                        n_heads=cfg.n_heads)

    def config(lr, steps, seed):
        return TrainConfig(lr=lr, max_steps=steps, batch_size=cfg.batch_size,
                           warmup_steps=cfg.warmup_steps, seed=seed, log_every=20,
                           device=cfg.device, progress=False)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    h1 = train(model, sft_loss_fn, build.text_items(tok, docs),
               config(cfg.pretrain_lr, cfg.pretrain_steps, cfg.seed))
    pretrain_s = time.perf_counter() - t0
    rows = world.sft_dataset(train_prompts, cfg.n_sft, seed=rng)
    t0 = time.perf_counter()
    h2 = train(model, sft_loss_fn, tokenize_sft(tok, rows, cfg.max_length),
               config(cfg.sft_lr, cfg.sft_steps, cfg.seed + 1))
    sft_s = time.perf_counter() - t0
    tps = [r["tokens_per_s"] for r in h1.rows + h2.rows if "tokens_per_s" in r]
    return {
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_s": round(pretrain_s, 1),
        "sft_s": round(sft_s, 1),
        "pretrain_plus_sft_s": round(pretrain_s + sft_s, 1),
        "median_tokens_per_s": round(sorted(tps)[len(tps) // 2]),
        "final_pretrain_loss": round(h1.last("loss"), 4),
        "final_sft_loss": round(h2.last("loss"), 4),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sft.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    build = _build_module()
    cfg = build.BuildConfig(device=args.device)
    if args.layers:
        cfg.n_layers = args.layers
    runs = []
    for k in range(args.repeat):
        r = run_once(build, cfg)
        runs.append(r)
        print(f"run {k + 1}: {cfg.n_layers} layers, {r['n_parameters']:,} parameters: "
              f"pretraining {cfg.pretrain_steps} steps {r['pretrain_s']} s, SFT {cfg.sft_steps} "
              f"steps {r['sft_s']} s, together {r['pretrain_plus_sft_s']} s "
              f"({r['median_tokens_per_s']} tokens/s; load average "
              f"{r['load_average_before']:.1f} -> {r['load_average_after']:.1f} on "
              f"{os.cpu_count()} cores)", flush=True)
    result = {
        "what": "pretraining + SFT of the shipped small GPT from scratch (data/build.py steps 1-3)",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "note": "the machine was shared with other processes; see the load averages",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from rlcourse.files import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
