"""Preference optimisation without RL on the shipped data: DPO, IPO, R-DPO, KTO, ORPO, SimPO.

Every run starts from a shipped checkpoint (the SFT model; ORPO from the *base* model), trains
on the shipped preference pairs with :func:`rlcourse.preference.train_preference` and is
judged against the SFT model on the held-out prompts by the world's ground-truth score
(:func:`rlcourse.evaluation.evaluate_against`: win rate with bootstrap standard error,
length-controlled win rate, mean length and true score of the samples, KL to the SFT model).

Groups of runs (``--only`` picks some; results are merged into the JSON file):

``methods``  the final configuration of each method (the chapters' headline numbers)
``dpo_beta`` DPO for several β (the DPO chapter's slider) and the likelihood-order pitfall
``orpo``     ORPO from the base model for several λ (λ = 0 is SFT on the chosen answers)
``kto``      KTO on unpaired data: all examples, 90 % fewer desirable ones, and the
             annotator's individual taste ("taxi rather than bus") against DPO
``simpo``    a small SimPO sweep, then the ablations without length normalisation and γ = 0

Usage::

    OMP_NUM_THREADS=1 python benchmarks/run_preference_methods.py             # everything
    OMP_NUM_THREADS=1 python benchmarks/run_preference_methods.py --only methods,kto
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlcourse.config import DATA_DIR
from rlcourse.data import load_preferences, read_jsonl
from rlcourse.engine import TrainConfig
from rlcourse.evaluation import evaluate_against
from rlcourse.files import atomic_write_text
from rlcourse.losses import implicit_rewards
from rlcourse.models import generate, load_model
from rlcourse.preference import (
    score_pairs,
    train_preference,
)
from rlcourse.worlds.assistant import (
    DEFAULT_WORLD,
    TAXI_TASTE,
    Annotator,
    label_agreement,
    preference_pairs,
    tokens,
    unpaired_from_pairs,
)

RESULTS = Path(__file__).resolve().parent / "results" / "preference_methods.json"

#: The final configuration of each method: (start checkpoint, learning rate, epochs, loss
#: hyperparameters). Batch 32 pairs, AdamW, 10 warm-up steps then cosine decay.
FINAL: dict[str, tuple[str, float, float, dict[str, Any]]] = {
    "dpo": ("sft", 5e-4, 2, {"beta": 0.5}),
    "ipo": ("sft", 5e-4, 2, {"tau": 1.0}),
    "rdpo": ("sft", 5e-4, 2, {"beta": 0.5, "alpha": 0.05}),
    "kto": ("sft", 5e-4, 2, {"beta": 1.0}),
    "orpo": ("base", 1e-3, 8, {"lam": 0.5}),
    "simpo": ("sft", 2e-4, 2, {"beta": 10.0, "gamma": 3.0}),
}
BATCH = 32
WARMUP = 10
EVAL_SAMPLES = 5  # per held-out prompt: 200 prompts -> 1000 comparisons


class Lab:
    """The shipped data and checkpoints, and one function to train-and-evaluate."""

    def __init__(self, data_dir: Path, eval_samples: int, seed: int = 0) -> None:
        self.data_dir = data_dir
        self.pairs = load_preferences(data_dir / "preferences.jsonl")
        self.eval_prompts = [r["prompt"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")]
        self.train_prompts = [r["prompt"] for r in read_jsonl(data_dir / "train_prompts.jsonl")]
        self.sft, self.tok = load_model(data_dir / "checkpoints" / "sft", device="cpu")
        self.base, _ = load_model(data_dir / "checkpoints" / "base", device="cpu")
        self.eval_samples = eval_samples
        self.seed = seed

    def start(self, name: str):
        return copy.deepcopy(self.sft if name == "sft" else self.base)

    def evaluate(self, model, n_texts: int = 6) -> dict[str, Any]:
        ev = evaluate_against(model, self.sft, self.tok, self.eval_prompts,
                              n_samples=self.eval_samples, seed=self.seed + 1000)
        s = ev.summary()
        out = {
            "win_rate": s["win_rate"], "win_rate_stderr": s["win_rate_stderr"],
            # the perfect assistant's win rate against the same SFT answers, and the share of
            # the achievable gain, (WR - 1/2)/(ceiling - 1/2), with a paired bootstrap error
            "ceiling": s["ceiling"], "share_of_gain": s["share_of_gain"],
            "share_of_gain_stderr": s["share_of_gain_stderr"],
            "lc_win_rate": s["lc_win_rate"], "kl": s["kl"], "kl_stderr": s["kl_stderr"],
            "n_comparisons": ev.win.n, "wins": ev.win.wins, "ties": ev.win.ties,
            "losses": ev.win.losses,
        }
        out.update({k: v for k, v in s.items() if k.startswith(("model_", "baseline_"))})
        step = max(1, len(ev.prompts) // n_texts)
        out["samples"] = [{"prompt": ev.prompts[i], "model": ev.texts[i],
                           "sft": ev.baseline_texts[i]} for i in range(0, len(ev.prompts), step)
                          ][:n_texts]
        return out

    def run(self, method: str, start: str, lr: float, epochs: float, data: Any = None,
            keep_model: bool = False, **hp: Any) -> dict[str, Any]:
        model = self.start(start)
        model.train()
        cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=BATCH, warmup_steps=WARMUP,
                          schedule="cosine", seed=self.seed, log_every=10, device="cpu",
                          progress=False)
        t0 = time.perf_counter()
        run = train_preference(method, model, self.pairs if data is None else data, cfg,
                               tokenizer=self.tok, max_length=128, seed=self.seed, **hp)
        wall = time.perf_counter() - t0
        model.eval()
        result = {
            "method": method, "start": start, "lr": lr, "epochs": epochs, "batch_size": BATCH,
            "hyperparameters": run.hyperparameters,
            "train_seconds": round(run.train_seconds, 1),
            "reference_seconds": round(run.reference_seconds, 1),
            "wall_seconds": round(wall, 1),
            "tokens_per_second": round(run.tokens_per_second),
            "peak_memory_mib": round(run.peak_memory_bytes / 2**20),
            "n_train_examples": len(run.items),
            "history": _thin(run.history.to_rows()),
            **self.evaluate(model),
        }
        print(f"  {method:6s} from {start} lr={lr:g} ep={epochs} {hp}: "
              f"win {result['win_rate']:.3f} ± {result['win_rate_stderr']:.3f} (share of gain "
              f"{result['share_of_gain']:.2f})  LC {result['lc_win_rate']:.3f}  "
              f"KL {result['kl']:.2f}  "
              f"len {result['model_mean_length']:.1f}  score {result['model_mean_score']:.3f}  "
              f"({run.train_seconds:.0f} s)", flush=True)
        if keep_model:
            result["_model"] = model
            result["_items"] = run.items
        return result


def _thin(rows: list[dict], keep: tuple[str, ...] = (
        "step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies", "logps/chosen", "logps/rejected", "kl", "nll_loss",
        "log_odds_ratio", "grad_norm")) -> list[dict]:
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items() if k in keep}
            for r in rows]


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def group_methods(lab: Lab) -> dict:
    out = {"sft": {k: v for k, v in lab.evaluate(lab.sft).items()
                   if k.startswith("baseline_") or k == "samples"}}
    for method, (start, lr, epochs, hp) in FINAL.items():
        out[method] = lab.run(method, start, lr, epochs, **hp)
    return out


def group_dpo_beta(lab: Lab) -> dict:
    sweep = []
    keep = None
    for beta in (0.05, 0.1, 0.2, 0.5, 1.0):
        r = lab.run("dpo", "sft", 5e-4, 2, beta=beta, keep_model=beta == FINAL["dpo"][3]["beta"])
        if "_model" in r:
            keep = r
        sweep.append(_public(r))
    slow = _public(lab.run("dpo", "sft", 2e-4, 2, beta=0.1))
    # IPO with TRL's per-token log-ratios and a small tau: the target 1/(2 tau) = 5 nats per
    # token is far out of reach, and the model runs away from the reference.
    ipo_small_tau = _public(lab.run("ipo", "sft", 5e-4, 2, tau=0.1))

    # The pitfall: implicit reward order vs likelihood order, on the training pairs.
    model, items = keep["_model"], keep["_items"]
    beta = FINAL["dpo"][3]["beta"]
    s = score_pairs(model, items)
    r_w = implicit_rewards(s["policy_chosen_logps"], s["reference_chosen_logps"], beta)
    r_l = implicit_rewards(s["policy_rejected_logps"], s["reference_rejected_logps"], beta)
    mean_w = s["policy_chosen_logps"] / s["chosen_lengths"]
    mean_l = s["policy_rejected_logps"] / s["rejected_lengths"]
    reward_right = r_w > r_l
    likelihood_right = mean_w > mean_l
    disagree = reward_right & ~likelihood_right
    idx = torch.nonzero(disagree).flatten().tolist()[:6]
    examples = [{
        "prompt": lab.pairs[i]["prompt"], "chosen": lab.pairs[i]["chosen"],
        "rejected": lab.pairs[i]["rejected"],
        "reward_chosen": round(float(r_w[i]), 3), "reward_rejected": round(float(r_l[i]), 3),
        "mean_logp_chosen": round(float(mean_w[i]), 3),
        "mean_logp_rejected": round(float(mean_l[i]), 3),
    } for i in idx]
    pitfall = {
        "beta": beta,
        "n_pairs": len(items),
        "reward_accuracy": float(reward_right.float().mean()),
        "likelihood_accuracy": float(likelihood_right.float().mean()),
        "reward_right_likelihood_wrong": float(disagree.float().mean()),
        "examples": examples,
    }
    return {"sweep": sweep, "beta_0.1_lr_2e-4": slow, "ipo_tau_0.1": ipo_small_tau,
            "pitfall": pitfall}


def group_orpo(lab: Lab) -> dict:
    # The final lambda is in the "methods" group; here the same training with lambda = 0 (SFT
    # on the chosen answers only, from the base model) and with TRL's default 0.1.
    _, lr, epochs, _ = FINAL["orpo"]
    runs = [_public(lab.run("orpo", "base", lr, epochs, lam=lam)) for lam in (0.0, 0.1)]
    return {"lambda_sweep": runs}


def _taste_rate(texts: list[str]) -> dict:
    taxi = sum("taxi" in tokens(t) for t in texts)
    bus = sum("bus" in tokens(t) for t in texts)
    n = len(texts)
    return {"taxi": taxi / n, "bus": bus / n, "n": n}


def group_kto(lab: Lab) -> dict:
    out: dict[str, Any] = {}
    n_pairs = len(lab.pairs)
    _, lr, epochs, hp = FINAL["kto"]
    beta = hp["beta"]
    # (a) the pairs split into unpaired examples (the default of train_preference).
    # (b) 90 % fewer desirable examples: all undesirable, 10 % of the desirable ones; once
    #     with equal weights, once with lambda_D raised so that lambda_D n_D / n_U = 1.
    few = unpaired_from_pairs(lab.pairs, desirable_fraction=0.1 / 1.1, seed=lab.seed)
    n_d = sum(r["label"] for r in few)
    n_u = len(few) - n_d
    out["unpaired_all"] = _public(lab.run("kto", "sft", lr, epochs, beta=beta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["desirable_10pct_equal_weights"] = _public(
            lab.run("kto", "sft", lr, epochs, data=few, beta=beta))
    out["desirable_10pct_weighted"] = _public(lab.run(
        "kto", "sft", lr, epochs, data=few, beta=beta, desirable_weight=n_u / n_d))
    out["desirable_10pct_counts"] = {"desirable": n_d, "undesirable": n_u, "pairs": n_pairs}
    # DPO on the same 10 %: only the pairs whose chosen answer was kept.
    kept = {(r["prompt"], r["completion"]) for r in few if r["label"]}
    dpo_pairs = [p for p in lab.pairs if (p["prompt"], p["chosen"]) in kept]
    _, dlr, depochs, dhp = FINAL["dpo"]
    out["dpo_on_the_kept_pairs"] = _public(lab.run("dpo", "sft", dlr, depochs, data=dpo_pairs,
                                                   **dhp))
    out["dpo_on_the_kept_pairs"]["n_pairs"] = len(dpo_pairs)

    # (c) the annotator's individual taste: pairs sampled from the SFT model on the travel
    #     prompts (and the rest), labelled by an annotator who likes "taxi" and dislikes "bus".
    out["taste"] = taste_experiment(lab)
    return out


def taste_experiment(lab: Lab) -> dict:
    world = DEFAULT_WORLD
    prompts = lab.train_prompts
    rng = np.random.default_rng(lab.seed + 7)
    pair_prompts = [prompts[int(i)] for i in rng.integers(len(prompts), size=3600)]
    a = generate(lab.sft, lab.tok, pair_prompts, max_new_tokens=48, seed=lab.seed + 31).texts
    b = generate(lab.sft, lab.tok, pair_prompts, max_new_tokens=48, seed=lab.seed + 32).texts
    biased = preference_pairs(pair_prompts, a, b,
                              Annotator(world, temperature=0.35, taste=TAXI_TASTE), seed=1)
    travel = [p for p in lab.eval_prompts if world.topic_of(p) == "travel"]
    result: dict[str, Any] = {"n_pairs": len(biased), "agreement": label_agreement(biased),
                              "taste": TAXI_TASTE, "n_eval_prompts": len(travel)}

    def mentions(model) -> dict:
        texts = generate(model, lab.tok, [p for p in travel for _ in range(10)],
                         max_new_tokens=48, seed=lab.seed + 41).texts
        return _taste_rate(texts)

    result["sft"] = mentions(lab.sft)
    chosen = [p["chosen"] for p in biased]
    rejected = [p["rejected"] for p in biased]
    result["data"] = {"chosen": _taste_rate(chosen), "rejected": _taste_rate(rejected)}
    for method in ("dpo", "kto"):
        _, lr, epochs, hp = FINAL[method]
        r = lab.run(method, "sft", lr, epochs, data=biased, keep_model=True, **hp)
        result[method] = {"mentions": mentions(r["_model"]),
                          **{k: v for k, v in _public(r).items() if k != "history"}}
    return result


def group_simpo(lab: Lab) -> dict:
    sweep = []
    for lr, beta, gamma in ((5e-4, 2.0, 1.0), (5e-4, 2.5, 1.25), (2e-4, 2.0, 1.0),
                            (2e-4, 5.0, 2.0), (2e-4, 10.0, 3.0), (1e-4, 10.0, 5.0)):
        sweep.append(_public(lab.run("simpo", "sft", lr, 2, beta=beta, gamma=gamma)))
    _, lr, epochs, hp = FINAL["simpo"]
    ablations = {
        "simpo": _public(lab.run("simpo", "sft", lr, epochs, **hp)),
        "without_length_normalisation": _public(lab.run(
            "simpo", "sft", lr, epochs, **hp, length_normalize=False)),
        "gamma_0": _public(lab.run("simpo", "sft", lr, epochs, **{**hp, "gamma": 0.0})),
    }
    # Without length normalisation the summed log-probs are ~|y| times larger: the same beta
    # is a much stronger push, so also try beta / (mean length).
    mean_len = float(np.mean([len(tokens(p["chosen"])) + 1 for p in lab.pairs]))
    ablations["without_length_normalisation_beta_scaled"] = _public(lab.run(
        "simpo", "sft", lr, epochs, **{**hp, "beta": hp["beta"] / mean_len},
        length_normalize=False))
    ablations["mean_chosen_tokens"] = mean_len
    return {"sweep": sweep, "ablations": ablations}


GROUPS: dict[str, Callable[[Lab], dict]] = {
    "methods": group_methods,
    "dpo_beta": group_dpo_beta,
    "orpo": group_orpo,
    "kto": group_kto,
    "simpo": group_simpo,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*truncated.*")
    lab = Lab(args.data, args.eval_samples)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        results[name] = GROUPS[name](lab)
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0)
        results["meta"] = {
            "data": str(args.data.relative_to(args.data.parent.parent))
            if args.data.is_absolute() else str(args.data),
            "n_pairs": len(lab.pairs), "n_eval_prompts": len(lab.eval_prompts),
            "eval_samples_per_prompt": args.eval_samples, "batch_size": BATCH,
            "warmup_steps": WARMUP, "final": {k: {"start": v[0], "lr": v[1], "epochs": v[2],
                                                  **v[3]} for k, v in FINAL.items()},
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "note": "CPU, one thread, machine shared with other processes: timings are rough",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=1, default=_json_default) + "\n")
    print(f"wrote {args.out}")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o)}")


if __name__ == "__main__":
    main()
