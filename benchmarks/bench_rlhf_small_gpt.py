"""RLHF of the small GPT: SFT model -> Bradley-Terry reward model -> PPO, judged by the truth.

Uses what ``data/`` ships (the base and SFT checkpoints, the preference pairs, the training and
held-out prompts). Steps:

1. reward model: a :class:`rlcourse.models.RewardModel` on a copy of the base model, trained
   with the shared engine on the preference pairs (a share of the prompts held out);
   evaluated on the held-out pairs and on fresh SFT sample pairs for the held-out evaluation
   prompts, against the labels and against the hidden true score;
2. PPO (:mod:`rlcourse.ppo`) from the SFT model with the four models of the slides (actor,
   separate critic, reward model, frozen reference); the result is judged by the ground-truth
   judge against the SFT model on the held-out prompts (win rate +- bootstrap stderr, KL);
3. a sweep over the KL coefficient, including 0 (no KL penalty: reward-model exploitation).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_rlhf_small_gpt.py            # ~15 min on 1 core
    OMP_NUM_THREADS=1 python benchmarks/bench_rlhf_small_gpt.py --quick    # a smoke test

Writes ``benchmarks/results/rlhf_small_gpt.json`` (read by the PPO chapter) and caches the
reward model under ``runs/rlhf/reward_model`` (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rlcourse import DATA_DIR, REPO_ROOT, ppo
from rlcourse import reward_model as rmod
from rlcourse.data import load_preferences, read_jsonl
from rlcourse.engine import TrainConfig
from rlcourse.evaluation import evaluate_against
from rlcourse.files import atomic_write_text
from rlcourse.models import RewardModel, ValueHeadModel, generate, load_model
from rlcourse.worlds.assistant import DEFAULT_WORLD

RESULTS = Path(__file__).resolve().parent / "results" / "rlhf_small_gpt.json"
RM_CACHE = REPO_ROOT / "runs" / "rlhf" / "reward_model"


def fresh_pairs(model, tokenizer, prompts: list[str], per_prompt: int, seed: int) -> list[dict]:
    """Two SFT samples per (prompt, repeat), unlabelled: for accuracy against the truth."""
    many = [p for p in prompts for _ in range(per_prompt)]
    a = generate(model, tokenizer, many, max_new_tokens=48, seed=seed).texts
    b = generate(model, tokenizer, many, max_new_tokens=48, seed=seed + 1).texts
    return [{"prompt": p, "chosen": x, "rejected": y}
            for p, x, y in zip(many, a, b, strict=True) if x and y]


def train_rm(args, base, tokenizer, train_pairs, test_pairs, fresh) -> tuple[RewardModel, dict]:
    cfg = TrainConfig(lr=args.rm_lr, epochs=args.rm_epochs, batch_size=32, warmup_steps=10,
                      seed=args.seed, device="cpu", log_every=10, progress=False)
    start = time.perf_counter()
    rm, history = rmod.train_reward_model(copy.deepcopy(base), tokenizer, train_pairs, cfg,
                                          seed=args.seed)
    seconds = time.perf_counter() - start
    rm.save_pretrained(RM_CACHE, tokenizer)
    held = rmod.RewardEvaluation.of(rm, tokenizer, test_pairs, DEFAULT_WORLD.true_score)
    new = rmod.RewardEvaluation.of(rm, tokenizer, fresh, DEFAULT_WORLD.true_score)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(new.rm_chosen), size=min(400, len(new.rm_chosen)), replace=False)
    out = {
        "train_seconds": seconds, "n_train_pairs": len(train_pairs),
        "history": history.to_rows(),
        "held_out_pairs": held.summary(),
        # fresh pairs carry no labels: only the comparisons with the truth mean something
        "fresh_pairs_eval_prompts": {k: v for k, v in new.summary().items()
                                     if k not in ("accuracy_vs_labels", "label_accuracy_vs_truth")},
        "scatter": {"rm": np.concatenate([new.rm_chosen[idx], new.rm_rejected[idx]]).tolist(),
                    "true": np.concatenate([new.true_chosen[idx],
                                            new.true_rejected[idx]]).tolist()},
    }
    return rm, out


def run_ppo(args, sft, tokenizer, rm, train_prompts, kl_coef: float, steps: int, seed: int,
            log_every: int = 5) -> tuple[torch.nn.Module, list[dict]]:
    """PPO from the SFT model; returns the trained actor and the per-step history (RM score,
    true score of the rollout, KL to the reference, losses)."""
    torch.manual_seed(seed)
    actor = copy.deepcopy(sft)
    critic = copy.deepcopy(sft)
    policy = ppo.ActorCritic(actor, ValueHeadModel(critic, seed=seed))
    ref = ppo.freeze(sft)
    config = ppo.PPOConfig(kl_coef=kl_coef, minibatch_size=args.minibatch,
                           ppo_epochs=args.ppo_epochs, vf_coef=args.vf_coef)
    sample = ppo.lm_sampler(tokenizer, train_prompts, args.batch, max_new_tokens=48)
    history: list[dict] = []

    def log(step: int, metrics: dict, rollout: ppo.Rollout) -> None:
        texts, prompts = rollout.extra["texts"], rollout.extra["prompts"]
        metrics["true_score"] = float(np.mean([DEFAULT_WORLD.true_score(p, t)
                                               for p, t in zip(prompts, texts, strict=True)]))
        history.append({k: (float(v) if isinstance(v, (int, float)) else v)
                        for k, v in metrics.items()})
        if step % log_every == 0:
            print(f"  kl_coef {kl_coef}: step {step:3d} RM {metrics['score']:+.3f} true "
                  f"{metrics['true_score']:+.3f} KL {metrics['kl']:.2f}", flush=True)

    ppo.train_ppo(policy, ref, ppo.reward_model_fn(rm), sample, config, steps, lr=args.lr,
                  seed=seed, callback=log, progress=False)
    actor.eval()
    return actor, history


def judge(actor, sft, tokenizer, eval_prompts, n_samples: int, seed: int) -> dict:
    result = evaluate_against(actor, sft, tokenizer, eval_prompts, n_samples=n_samples,
                              seed=seed)
    out = result.summary()
    out.update({"n_comparisons": result.win.n, "wins": result.win.wins,
                "ties": result.win.ties, "losses": result.win.losses})
    triples = list(zip(result.prompts, result.texts, result.baseline_texts, strict=True))
    out["examples"] = [{"prompt": p, "policy": a, "sft": b} for p, a, b in triples[::n_samples][:6]]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rm-epochs", type=float, default=5)
    parser.add_argument("--rm-lr", type=float, default=1e-3)
    parser.add_argument("--reuse-rm", action="store_true", help="load the cached reward model")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--kl-coef", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--vf-coef", type=float, default=0.1)
    parser.add_argument("--sweep", default="0,0.05,0.2,0.5")
    parser.add_argument("--sweep-steps", type=int, default=60)
    parser.add_argument("--eval-samples", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rm_epochs, args.steps, args.sweep_steps, args.eval_samples = 0.2, 3, 2, 1
        args.sweep = "0,0.1"
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    sft, tokenizer = load_model(DATA_DIR / "checkpoints" / "sft", device="cpu")
    base, _ = load_model(DATA_DIR / "checkpoints" / "base", device="cpu")
    pairs = load_preferences(DATA_DIR / "preferences.jsonl")
    train_prompts = [r["prompt"] for r in read_jsonl(DATA_DIR / "train_prompts.jsonl")]
    eval_prompts = [r["prompt"] for r in read_jsonl(DATA_DIR / "eval_prompts.jsonl")]
    train_pairs, test_pairs = rmod.split_pairs_by_prompt(pairs, 0.15, seed=args.seed)
    fresh = fresh_pairs(sft, tokenizer, eval_prompts, 5, seed=101)
    print(f"{len(pairs)} pairs: "
          f"{len(train_pairs)} train, {len(test_pairs)} held out; {len(fresh)} fresh pairs")

    if args.reuse_rm and RM_CACHE.exists():
        rm = RewardModel.from_pretrained(RM_CACHE, device="cpu")
        rm_out = json.loads(args.out.read_text())["reward_model"] if args.out.exists() else {}
    else:
        rm, rm_out = train_rm(args, base, tokenizer, train_pairs, test_pairs, fresh)
    print("reward model, fresh pairs:", {k: round(v, 3) for k, v in
                                          rm_out.get("fresh_pairs_eval_prompts", {}).items()})

    start = time.perf_counter()
    actor, history = run_ppo(args, sft, tokenizer, rm, train_prompts, args.kl_coef, args.steps,
                             args.seed)
    ppo_seconds = time.perf_counter() - start
    main_eval = judge(actor, sft, tokenizer, eval_prompts, args.eval_samples, args.seed + 1000)
    print(f"PPO (kl_coef {args.kl_coef}, {args.steps} steps, {ppo_seconds:.0f} s): win rate vs "
          f"SFT {main_eval['win_rate']:.3f} ± {main_eval['win_rate_stderr']:.3f} (share of "
          f"gain {main_eval['share_of_gain']:.2f} of ceiling {main_eval['ceiling']:.3f}), "
          f"KL {main_eval['kl']:.2f}", flush=True)

    sweep = {}
    for kl in [float(x) for x in args.sweep.split(",")]:
        actor_k, hist_k = run_ppo(args, sft, tokenizer, rm, train_prompts, kl, args.sweep_steps,
                                  args.seed)
        ev = judge(actor_k, sft, tokenizer, eval_prompts, max(1, args.eval_samples // 2),
                   args.seed + 2000)
        ev.pop("examples")
        sweep[str(kl)] = {"history": hist_k, "eval": ev}
        print(f"sweep kl_coef {kl}: win rate {ev['win_rate']:.3f} ± {ev['win_rate_stderr']:.3f},"
              f" KL {ev['kl']:.2f}, true score {ev['model_mean_score']:.3f}", flush=True)

    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    result = {
        "benchmark": "RLHF of the small GPT: SFT -> reward model -> PPO",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"n_pairs": len(pairs),
                 "n_train_pairs": len(train_pairs), "n_held_out_pairs": len(test_pairs),
                 "n_fresh_pairs": len(fresh)},
        "reward_model": rm_out,
        "ppo": {"kl_coef": args.kl_coef, "steps": args.steps, "seconds": ppo_seconds,
                "history": history, "eval": main_eval},
        "kl_sweep": sweep,
        "n_parameters": {"actor": n(sft), "critic": n(sft) + n(rm.head),
                         "reward_model": n(rm), "reference": n(sft)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "python": sys.version.split()[0]},
        "total_seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
