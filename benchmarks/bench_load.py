"""How fast are the layer-2/3 basics on this machine? Load, sample, score, train a tiny model.

    OMP_NUM_THREADS=1 python benchmarks/bench_load.py [--hidden 128] [--layers 2] [--device auto]

Prints one line per measurement (seconds, samples/s, tokens/s, peak memory). Nothing here is
asserted; the numbers are for the book's "how long will this take" notes.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rlcourse.config import resolve_device
from rlcourse.data import tokenize_sft
from rlcourse.engine import TrainConfig, sft_loss_fn, train
from rlcourse.models import (
    build_model,
    build_tokenizer,
    generate,
    load_model,
    save_model,
    sequence_logprobs,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=150)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)

    words = [f"w{i}" for i in range(args.vocab)]
    tok = build_tokenizer(words)
    model = build_model(tok, hidden_size=args.hidden, n_layers=args.layers, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {len(tok)}, "
          f"{n_params / 1e6:.2f}M parameters, device {device}, threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        save_model(model, tok, d + "/ckpt")
        print(f"save_model: {time.perf_counter() - t:.3f} s")
        load_model(d + "/ckpt", device=device)  # warm the imports
        t = time.perf_counter()
        model, tok = load_model(d + "/ckpt", device=device)
        print(f"load_model: {time.perf_counter() - t:.3f} s")

    prompts = [" ".join(words[i % 50: i % 50 + 5]) for i in range(args.samples)]
    t = time.perf_counter()
    gen = generate(model, tok, prompts, max_new_tokens=args.new_tokens, seed=0)
    dt = time.perf_counter() - t
    n_tok = int(gen.completion_mask.sum())
    print(f"generate: {args.samples} samples, {n_tok} tokens in {dt:.2f} s "
          f"({args.samples / dt:.0f} samples/s, {n_tok / dt:.0f} tokens/s)")

    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, args.samples, 256):
            sl = slice(s, s + 256)
            sequence_logprobs(model, gen.full_ids[sl].to(device),
                              gen.full_attention_mask[sl].to(device),
                              gen.full_completion_mask[sl].to(device))
    dt = time.perf_counter() - t
    print(f"sequence_logprobs: {args.samples} sequences in {dt:.2f} s")

    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, gen.texts, strict=True)
            if c.strip()]
    items = tokenize_sft(tok, rows, max_length=64)
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=32, log_every=10, progress=False,
                      device=args.device)
    t = time.perf_counter()
    hist = train(model, sft_loss_fn, items, cfg)
    dt = time.perf_counter() - t
    last = hist.last()
    print(f"train (SFT, batch 32): {len(items)} examples, {last['step']} steps in {dt:.2f} s, "
          f"{last['tokens_per_s']:.0f} tokens/s, peak memory {last['peak_mem_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
