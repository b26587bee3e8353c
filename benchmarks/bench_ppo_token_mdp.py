"""PPO on the toy token MDP against the exact solution.

For several seeds: train a policy with :func:`rlcourse.ppo.ppo_step` (a frozen copy of the
initial uniform policy as reference) and record

- the exact expected return of the policy (a backward sweep over the prefix tree) against the
  exact optimum V*(root), and the training time until it first reaches 95 % of it;
- how well the learned critic matches the exact values of the final policy on the states that
  policy visits (Pearson correlation over the distinct visited prefixes, and weighted by visit
  counts), both against the exact KL-shaped value (the quantity the critic is trained to
  predict) and against the exact value of the judge's reward alone.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_ppo_token_mdp.py            # writes results json
    OMP_NUM_THREADS=1 python benchmarks/bench_ppo_token_mdp.py --seeds 3 --kind mlp

Results go to ``benchmarks/results/ppo_token_mdp.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from rlcourse import ppo
from rlcourse.files import atomic_write_text
from rlcourse.worlds.token_mdp import PrefixPolicy, TokenMDP

RESULTS = Path(__file__).resolve().parent / "results" / "ppo_token_mdp.json"


def critic_vs_exact(mdp: TokenMDP, policy: torch.nn.Module, ref: torch.nn.Module,
                    kl_coef: float) -> dict[str, float]:
    """Correlation of the critic with the exact V_pi on the prefixes the policy visits.

    :meth:`TokenMDP.critic_vs_exact`, under the key names this results file has always used.
    """
    got = mdp.critic_vs_exact(policy, ref, kl_coef)
    return {
        "n_visited_states": got["n_visited_states"],
        "corr_shaped_distinct": got["corr_distinct"],
        "corr_shaped_weighted": got["corr_weighted"],
        "corr_reward_only_distinct": got["corr_reward_only_distinct"],
        "mean_abs_error_shaped_weighted": got["mean_abs_error"],
    }


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    mdp = TokenMDP(n_tokens=args.n_tokens, horizon=args.horizon, reward=args.reward,
                   n_prompts=args.n_prompts)
    optimum = mdp.optimal_return()
    torch.manual_seed(seed)
    policy = PrefixPolicy(mdp, args.kind, hidden=args.hidden)
    ref = ppo.freeze(policy)
    config = ppo.PPOConfig(kl_coef=args.kl_coef, clip_score=None, minibatch_size=args.minibatch,
                           ppo_epochs=args.epochs, vf_coef=args.vf_coef, lam=args.lam)
    sample = mdp.sample_fn(args.batch)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    kl_ctl = config.kl_controller()
    gen = torch.Generator().manual_seed(seed)
    train_time, t_reach, step_reach = 0.0, None, None
    curve = []
    step = 0
    while train_time < args.budget_s:
        start = time.perf_counter()
        metrics, _ = ppo.ppo_step(policy, ref, mdp.score, sample, optimizer, config, kl_ctl, gen)
        train_time += time.perf_counter() - start
        step += 1
        if step % args.eval_every == 0:
            exact = mdp.evaluate(policy).root  # not timed: the exact check is ours, not PPO's
            curve.append((step, round(train_time, 3), exact, metrics["score"], metrics["kl"]))
            if t_reach is None and exact >= 0.95 * optimum:
                t_reach, step_reach = train_time, step
                if args.stop_at_target:
                    break
        if step >= args.max_steps:
            break
    final = mdp.evaluate(policy).root
    out = {
        "seed": seed,
        "optimum": optimum,
        "uniform_return": mdp.evaluate(ref).root,
        "final_exact_return": final,
        "final_fraction_of_optimum": final / optimum,
        "train_seconds_to_95pct": t_reach,
        "steps_to_95pct": step_reach,
        "steps": step,
        "train_seconds": train_time,
        "curve": curve,
    }
    out.update(critic_vs_exact(mdp, policy, ref, args.kl_coef))
    return out


def summarise(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if v is not None]
    if not clean:
        return {"mean": None, "min": None, "max": None, "std": None}
    return {"mean": statistics.fmean(clean), "min": min(clean), "max": max(clean),
            "std": statistics.pstdev(clean)}


def run_kind(args: argparse.Namespace, kind: str) -> dict:
    """All seeds for one policy kind, and their summary."""
    args = argparse.Namespace(**{**vars(args), "kind": kind})
    if args.lr is None:
        args.lr = 0.1 if kind == "tabular" else 3e-3
    runs = [run_seed(args, seed) for seed in range(args.seeds)]
    reached = [r["train_seconds_to_95pct"] is not None and r["train_seconds_to_95pct"] <= 60
               for r in runs]
    keys = ("train_seconds_to_95pct", "final_fraction_of_optimum", "corr_shaped_distinct",
            "corr_shaped_weighted", "corr_reward_only_distinct")
    summary = {"seeds_reaching_95pct_within_60s": f"{sum(reached)}/{len(runs)}"}
    summary.update({k: summarise([r[k] for r in runs]) for k in keys})
    print(f"--- {kind}: reached 95% of the optimum within 60 s: "
          f"{summary['seeds_reaching_95pct_within_60s']}")
    for key in keys:
        v = summary[key]
        if v["mean"] is not None:
            print(f"{key:28s} {v['mean']:.3f} ± {v['std']:.3f}  (min {v['min']:.3f}, "
                  f"max {v['max']:.3f})")
    return {"lr": args.lr, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-tokens", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=7)
    parser.add_argument("--n-prompts", type=int, default=4)
    parser.add_argument("--reward", default="instructed")
    parser.add_argument("--kind", default="both", choices=["tabular", "mlp", "both"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--kl-coef", type=float, default=0.02)
    parser.add_argument("--vf-coef", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--minibatch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--stop-at-target", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    mdp = TokenMDP(n_tokens=args.n_tokens, horizon=args.horizon, reward=args.reward,
                   n_prompts=args.n_prompts)
    kinds = ["tabular", "mlp"] if args.kind == "both" else [args.kind]
    result = {
        "benchmark": "PPO on the token MDP vs the exact optimum",
        "world": {"n_tokens": mdp.n_tokens, "horizon": mdp.horizon, "n_prompts": mdp.n_prompts,
                  "reward": args.reward, "n_decision_states": mdp.n_states,
                  "optimal_return": mdp.optimal_return(),
                  "optimal_texts": {p: mdp.greedy_texts(p)[:3] for p in range(mdp.n_prompts)}},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "kinds": {kind: run_kind(args, kind) for kind in kinds},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
