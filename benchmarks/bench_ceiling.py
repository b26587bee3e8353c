"""The ceiling of every win rate against the SFT model, and best-of-n by the true score.

Every results file judges its models against the same SFT answers: the shipped SFT model's
samples on the 200 held-out prompts, 5 per prompt, drawn with seed 1001
(:func:`rlcourse.evaluation.evaluate_against` with ``seed=1000`` draws the baseline with
``seed + 1``). Against those answers this script measures

- the **ceiling**: the win rate of a perfect assistant that always gives the world's
  ``best_response`` (ties count half, so the SFT answers that already score the maximum cap it);
- the **floor**: the win rate of an assistant that answers nothing (the empty answer);
- **best-of-n by the true score** for n = 1, 2, 4, 8: the SFT model's best of n own samples,
  picked by the hidden judge (:func:`rlcourse.evaluation.oracle_best_of_n`), with each one's
  share of gain (WR − ½)/(ceiling − ½) and its paired bootstrap error.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_ceiling.py        # about a minute on one thread

Writes ``benchmarks/results/ceiling.json``; ``benchmarks/annotate_ceiling.py`` reads it to add
the ceiling next to the win rates of the other results files.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rlcourse.config import DATA_DIR
from rlcourse.data import read_jsonl
from rlcourse.evaluation import WinRate, oracle_best_of_n
from rlcourse.files import atomic_write_text
from rlcourse.models import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "ceiling.json"


def win_dict(w: WinRate) -> dict:
    out = {"win_rate": w.rate, "win_rate_stderr": w.stderr, "wins": w.wins, "ties": w.ties,
           "losses": w.losses}
    if w.share_of_gain == w.share_of_gain:  # not NaN
        out.update(share_of_gain=w.share_of_gain, share_of_gain_stderr=w.share_of_gain_stderr)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--eval-samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1000)  # the results files' evaluation seed
    parser.add_argument("--ns", default="1,2,4,8")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts = [r["prompt"] for r in read_jsonl(args.data / "eval_prompts.jsonl")]
    sft, tok = load_model(args.data / "checkpoints" / "sft", device="cpu")
    ns = tuple(int(n) for n in args.ns.split(","))
    t0 = time.perf_counter()
    oracle = oracle_best_of_n(sft, tok, prompts, ns=ns, n_samples=args.eval_samples,
                              seed=args.seed, n_bootstrap=args.n_bootstrap)
    seconds = time.perf_counter() - t0
    ceiling = oracle["ceiling"]
    base = oracle["baseline"]
    result = {
        "benchmark": "perfect-assistant ceiling and best-of-n by the true score vs the SFT model",
        "settings": {"eval_prompts": len(prompts), "eval_samples_per_prompt": args.eval_samples,
                     "seed": args.seed, "baseline_seed": args.seed + 1,
                     "candidate_seeds": [args.seed if j == 0 else args.seed + 1 + j
                                         for j in range(max(ns))],
                     "n_bootstrap": args.n_bootstrap, "max_new_tokens": 48, "temperature": 1.0},
        "baseline": {"model": "shipped SFT", **{f"baseline_{k}": v
                                                for k, v in base.as_dict().items()}},
        "ceiling": ceiling.rate,
        "ceiling_stderr": ceiling.stderr,
        "ceiling_formula": "1 - share_best/2: the perfect answer beats every baseline answer "
                           "below the best score and ties the rest",
        "floor_empty_answer": win_dict(oracle["floor"]),
        "best_of_n_by_true_score": {str(n): win_dict(w) for n, w in oracle["best_of_n"].items()},
        "seconds": round(seconds, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
    }
    print(f"baseline: SFT samples, mean score {base.mean_score:.4f}, share best "
          f"{base.share_best:.3f}, mean length {base.mean_length:.3f}")
    print(f"ceiling (perfect assistant) {ceiling}")
    print(f"floor (empty answer)        {oracle['floor']}")
    for n, w in oracle["best_of_n"].items():
        print(f"best-of-{n} by true score    {w}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return result


if __name__ == "__main__":
    main()
