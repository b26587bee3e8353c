"""The methods side by side: DPO, IPO, R-DPO, KTO, ORPO and SimPO with the same budget.

The slides' result tables in miniature. Every method trains through its recipe
(``recipes/<method>.yaml``, loaded with :func:`rlcourse.recipes.load_recipe` and run with
:func:`rlcourse.recipes.run_recipe`: the command a practitioner runs on a GPU), with the overrides
below for the tiny model: the same data (the shipped 2,559 pairs; KTO splits them into 5,118
unpaired examples), the same number of epochs, batch 32 pairs, 10 warm-up steps then cosine decay,
one CPU thread. Every method starts from the SFT checkpoint except ORPO, which by design does SFT
and preference learning in one stage and starts from the *base* checkpoint (an extra row trains
ORPO from the SFT checkpoint for comparison). Learning rates and loss hyperparameters are each
method's tuned setting from ``benchmarks/run_preference_methods.py``.

Each model is judged against the SFT model on the 200 held-out prompts, 5 samples per prompt, by
the world's hidden true score (:func:`rlcourse.evaluation.evaluate_against`): win rate ± bootstrap
standard error beside its ceiling (a perfect assistant's win rate against the same SFT answers)
and share of gain (WR - 1/2)/(ceiling - 1/2), length-controlled win rate, mean length and true
score of the samples, KL to the SFT model. With ``--seeds N`` every method is trained N times
(training seeds 0..N-1).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/run_side_by_side.py               # ~10 min per seed
    OMP_NUM_THREADS=1 python benchmarks/run_side_by_side.py --seeds 3

Results go to ``benchmarks/results/side_by_side.json``. The file is *merged*, not overwritten:
``--methods a,b`` adds or replaces only the rows ``a`` and ``b`` and keeps every other method's
results (and the SFT and base rows, which are evaluated only when missing)::

    OMP_NUM_THREADS=1 python benchmarks/run_side_by_side.py --methods ipo_summed,ipo_tau1 --seeds 3

Which prompts chose, which reported: the learning rates and loss hyperparameters were tuned by
``run_preference_methods.py`` on the same 200 evaluation prompts this file reports, so its
numbers are development numbers; ``settings`` records this (``"selected_on"``,
``"reported_on"``, seeds, prompt counts; ``--record-only`` rewrites them without training).
Chapter 16's online-DPO choice made on a validation split of fresh prompts and reported on a
test split is in ``online_protocol.json`` (``run_online_methods.py --protocol``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from rlcourse.config import DATA_DIR, REPO_ROOT
from rlcourse.data import read_jsonl
from rlcourse.evaluation import evaluate_against
from rlcourse.files import atomic_write_text
from rlcourse.models import load_model
from rlcourse.recipes import load_recipe, run_recipe

RESULTS = Path(__file__).resolve().parent / "results" / "side_by_side.json"
#: Where the choices behind this file were made and where it reports (see the docstring).
SPLITS = {
    "selected_on": "eval_prompts",
    "reported_on": "eval_prompts",
    "split_note": "development numbers: learning rates and loss hyperparameters were tuned "
                  "(run_preference_methods.py) on the same 200 eval prompts x 5 samples that "
                  "these rows report, against one draw of SFT answers (seed 1001) shared by "
                  "every run; no separate test split. Chapter 16's protocol "
                  "(online_protocol.json) chooses on validation and reports on test.",
}

EPOCHS = 2
BATCH = 32
WARMUP = 10
#: name -> (recipe, start checkpoint, learning rate, loss hyperparameters)
RUNS: dict[str, tuple[str, str, float, dict[str, Any]]] = {
    "dpo": ("dpo", "sft", 5e-4, {"beta": 0.5}),
    "ipo": ("ipo", "sft", 5e-4, {"tau": 0.1}),
    "rdpo": ("rdpo", "sft", 5e-4, {"beta": 0.5, "alpha": 0.05}),
    "kto": ("kto", "sft", 5e-4, {"beta": 0.5}),
    "orpo": ("orpo", "base", 1e-3, {"lam": 1.0}),
    "simpo": ("simpo", "sft", 2e-4, {"beta": 10.0, "gamma": 3.0}),
    "orpo_from_sft": ("orpo", "sft", 1e-3, {"lam": 1.0}),
    # IPO's target margin 1/(2 tau) is in nats PER TOKEN when the log-ratios are averaged per
    # token (TRL), but summed over the answer in the original DPO code: the same tau = 0.1 asks
    # for a ~20 times larger margin per answer with the first. Two ways to a sane target:
    "ipo_summed": ("ipo", "sft", 5e-4, {"tau": 0.1, "length_normalize": False}),
    "ipo_tau1": ("ipo", "sft", 5e-4, {"tau": 1.0}),
}
LABELS = {"dpo": "DPO", "ipo": "IPO", "rdpo": "R-DPO", "kto": "KTO", "orpo": "ORPO",
          "simpo": "SimPO", "orpo_from_sft": "ORPO (from SFT)",
          "ipo_summed": "IPO (summed, tau 0.1)", "ipo_tau1": "IPO (per token, tau 1)"}
METRICS = ("win_rate", "win_rate_stderr", "lc_win_rate", "model_mean_length",
           "model_mean_score", "kl", "model_share_flawed", "model_share_repetition",
           "model_share_false", "model_share_rude", "model_share_off_topic")
#: Recorded for every run from now on; rows run before they were added lack them (the ceiling
#: fields of older rows were added by benchmarks/annotate_ceiling.py). The ceiling is the perfect
#: assistant's win rate against the same SFT answers; share_of_gain = (WR - 1/2)/(ceiling - 1/2).
EXTRA_METRICS = ("model_share_garbled", "ceiling", "share_of_gain", "share_of_gain_stderr")


def overrides(name: str, seed: int, data_dir: Path, out: Path) -> dict[str, Any]:
    """The key=value overrides that turn ``recipes/<method>.yaml`` into this run."""
    recipe, start, lr, hp = RUNS[name]
    data = data_dir / ("unpaired.jsonl" if recipe == "kto" else "preferences.jsonl")
    return {
        "model": str(data_dir / "checkpoints" / start), "data": str(data),
        "output": str(out / name), "max_length": 128, "seed": seed,
        "train.lr": lr, "train.epochs": EPOCHS, "train.batch_size": BATCH,
        "train.grad_accum_steps": 1, "train.warmup_steps": WARMUP, "train.schedule": "cosine",
        "train.mixed_precision": "no", "train.device": "cpu", "train.checkpoint_dir": None,
        "train.checkpoint_every": 0, "train.log_every": 10, "train.progress": False,
        **{f"loss.{k}": v for k, v in hp.items()},
    }


def evaluate(model: Any, sft: Any, tok: Any, prompts: list[str], n_samples: int,
             n_texts: int = 4) -> dict[str, Any]:
    ev = evaluate_against(model, sft, tok, prompts, n_samples=n_samples, seed=1000)
    s = ev.summary()
    out = {k: s[k] for k in (*METRICS, *EXTRA_METRICS)}
    out.update(n_comparisons=ev.win.n, wins=ev.win.wins, ties=ev.win.ties, losses=ev.win.losses,
               kl_stderr=s["kl_stderr"], baseline_mean_length=s["baseline_mean_length"],
               baseline_mean_score=s["baseline_mean_score"])
    step = max(1, len(ev.prompts) // n_texts)
    out["samples"] = [{"prompt": ev.prompts[i], "model": ev.texts[i], "sft": ev.baseline_texts[i]}
                      for i in range(0, len(ev.prompts), step)][:n_texts]
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over training seeds, and the spread (min, max) when there are several."""
    out: dict[str, Any] = {"n_seeds": len(runs)}
    keys = (*METRICS, *(k for k in EXTRA_METRICS if all(k in r for r in runs)),
            "train_seconds", "tokens_per_second")
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        if len(values) > 1:
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
            out[f"{key}_seed_std"] = statistics.stdev(values)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--methods", default=",".join(RUNS))  # comma-separated keys of RUNS
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--eval-samples", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "side_by_side")
    parser.add_argument("--record-only", action="store_true",
                        help="only rewrite the split fields of settings; train nothing")
    args = parser.parse_args(argv)
    if args.record_only:
        results = json.loads(args.out.read_text())
        results["settings"].update(SPLITS, seeds=sorted({r["seed"] for m in results["methods"]
                                                          .values() for r in m["runs"]}))
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
        return results
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*chosen == rejected.*")
    prompts = [r["prompt"] for r in read_jsonl(args.data / "eval_prompts.jsonl")]
    sft, tok = load_model(args.data / "checkpoints" / "sft", device="cpu")
    base, _ = load_model(args.data / "checkpoints" / "base", device="cpu")
    names = args.methods.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(RUNS)}")
    # Merge into the existing results: methods not named in --methods keep their rows.
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["settings"] = {
        "epochs": EPOCHS, "batch_size": BATCH, "warmup_steps": WARMUP, "schedule": "cosine",
        "eval_prompts": len(prompts), "eval_samples_per_prompt": args.eval_samples,
        **SPLITS, "seeds": list(range(args.seeds)),
        "runs": {k: {"recipe": f"recipes/{v[0]}.yaml", "start": v[1], "lr": v[2], **v[3]}
                 for k, v in RUNS.items()},
        "labels": LABELS,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "note": "one CPU thread on a 2-core machine shared with other processes"},
    }
    t0 = time.perf_counter()
    seconds_before = results.get("seconds", 0)
    # The SFT row: SFT against itself (two independent samples) must be a coin flip, and the
    # base model shows where ORPO starts. Evaluated once; later runs keep the stored rows.
    for key, model in (("sft", sft), ("base", base)):
        if key not in results:
            results[key] = evaluate(model, sft, tok, prompts, args.eval_samples)
    print(f"SFT vs SFT {results['sft']['win_rate']:.3f}; base vs SFT "
          f"{results['base']['win_rate']:.3f}", flush=True)
    methods = results.setdefault("methods", {})
    for name in names:
        runs = []
        for seed in range(args.seeds):
            recipe = load_recipe(REPO_ROOT / "recipes" / f"{RUNS[name][0]}.yaml",
                                 overrides(name, seed, args.data, args.work))
            start = time.perf_counter()
            result = run_recipe(recipe, save=False, progress=False)
            seconds = time.perf_counter() - start
            row = {"seed": seed, "wall_seconds": round(seconds, 1),
                   "train_seconds": result.summary.get("train_seconds"),
                   "reference_seconds": result.summary.get("reference_seconds"),
                   "tokens_per_second": result.summary.get("tokens_per_second"),
                   "n_train_examples": result.summary.get("n_examples"),
                   "steps": result.history[-1]["step"],
                   "final_loss": next(r["loss"] for r in reversed(result.history) if "loss" in r),
                   **evaluate(result.model, sft, tok, prompts, args.eval_samples)}
            runs.append(row)
            print(f"  {LABELS[name]:16s} seed {seed}: win {row['win_rate']:.3f} ± "
                  f"{row['win_rate_stderr']:.3f} (share of gain {row['share_of_gain']:.2f} of "
                  f"ceiling {row['ceiling']:.3f})  LC {row['lc_win_rate']:.3f}  "
                  f"len {row['model_mean_length']:.1f}  score {row['model_mean_score']:.3f}  "
                  f"KL {row['kl']:.2f}  ({seconds:.0f} s)", flush=True)
        methods[name] = {"label": LABELS[name], "summary": summarise(runs), "runs": runs}
        # Total wall time of every invocation that wrote this file.
        results["seconds"] = seconds_before + round(time.perf_counter() - t0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
