"""Methods that learn from the policy's own samples, on the small GPT, side by side.

Online DPO (labels from the simulated annotator or from the reward model), rejection-sampling
fine-tuning (best-of-n by the reward model, then SFT) and GRPO/RLOO (the reward model as reward,
a k3 KL penalty to the SFT model), each started from the shipped SFT checkpoint
(:mod:`rlcourse.online`). The methods see labels or reward-model scores only; the world's true
score judges the result: win rate against the SFT model on the 200 held-out prompts x 5 samples
(the same SFT samples as ``run_side_by_side.py``: evaluation seed 1000), bootstrap standard error,
KL to the SFT model.

The reward model is chapter 8's (``bench_rlhf_small_gpt.py``): a Bradley-Terry head on the base
checkpoint, trained on 85 % of the shipped pairs (split by prompt, seed 0), 5 epochs at 1e-3;
trained once and cached under ``runs/online/reward_model``. Its floating-point result depends on
the thread count and torch build, so a reward model retrained on another machine scores slightly
differently (the committed grid and the over-optimisation file each record their machine).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/run_online_methods.py --methods online_dpo --seeds 1
    OMP_NUM_THREADS=1 python benchmarks/run_online_methods.py --seeds 3          # the grid
    OMP_NUM_THREADS=1 python benchmarks/run_online_methods.py --summarise        # -> JSON files
    OMP_NUM_THREADS=1 python benchmarks/run_online_methods.py --overopt          # Gao et al.
    python benchmarks/run_online_methods.py --jobs 16 --seeds 3 --methods a,b  # a 16-core machine
    OMP_NUM_THREADS=1 python benchmarks/run_online_methods.py --protocol --seeds 3 --first-seed 10
    OMP_NUM_THREADS=1 python benchmarks/run_online_methods.py --summarise-protocol

Every finished run appends one JSON row to ``benchmarks/results/online_methods_runs.jsonl``
(nothing is lost when the grid is stopped); ``--summarise`` puts the mean over seeds under the
key ``online_methods`` of ``benchmarks/results/side_by_side.json`` (other keys untouched).
``--overopt`` writes ``benchmarks/results/overoptimisation.json``.

**Which prompts chose, which reported.** The grid above was judged on the 200 evaluation
prompts, and its variants (rounds, beta, reference) were compared and picked on those same
prompts: its numbers are development numbers (``side_by_side.json`` records
``"selected_on"``/``"reported_on"`` accordingly). ``--protocol`` redoes the online-DPO choice
properly, with fresh prompts the models never saw
(:meth:`rlcourse.worlds.assistant.AssistantWorld.fresh_prompts`): new training seeds; every
candidate (each online-DPO trajectory judged at several round counts, and offline DPO as in
``run_side_by_side.py``) is judged on a *validation* split and on a *test* split of fresh
prompts, each against several independent draws of SFT answers; ``--summarise-protocol`` picks
the candidate with the highest mean share of gain on validation (baseline draw 0) and reports it
on test: mean over seeds with the paired bootstrap error over prompts across seeds
(:func:`rlcourse.evaluation.seed_mean_paired`), and the share of gain over the baseline draws
(:func:`rlcourse.evaluation.spread_over_draws`), in ``benchmarks/results/online_protocol.json``
(``"selected_on": "validation"``, ``"reported_on": "test"``). The per-comparison true scores
behind it are rows of ``online_protocol_runs.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlcourse import online, ppo
from rlcourse import reward_model as rmod
from rlcourse.config import DATA_DIR, REPO_ROOT
from rlcourse.data import load_preferences, read_jsonl
from rlcourse.engine import TrainConfig
from rlcourse.evaluation import (
    ceiling_indicators,
    evaluate_against,
    kl_to_reference,
    perfect_assistant_scores,
    sample_stats,
    seed_mean_paired,
    spread_over_draws,
    win_indicators,
)
from rlcourse.files import atomic_write_text
from rlcourse.grpo import GroupConfig, train_group_lm
from rlcourse.models import RewardModel, generate, load_model
from rlcourse.worlds.assistant import DEFAULT_WORLD, Annotator

RESULTS = Path(__file__).resolve().parent / "results"
RUNS_FILE = RESULTS / "online_methods_runs.jsonl"
SIDE_BY_SIDE = RESULTS / "side_by_side.json"
OVEROPT = RESULTS / "overoptimisation.json"
PROTOCOL_RUNS = RESULTS / "online_protocol_runs.jsonl"
PROTOCOL = RESULTS / "online_protocol.json"
RM_CACHE = REPO_ROOT / "runs" / "online" / "reward_model"
EVAL_SEED = 1000

#: name -> (kind, label source, hyperparameters)
RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "online_dpo": ("online_dpo", "annotator",
                   {"rounds": 8, "beta": 0.5, "lr": 5e-4, "reference": "sft"}),
    "online_dpo_16r": ("online_dpo", "annotator",
                       {"rounds": 16, "beta": 0.2, "lr": 5e-4, "reference": "sft"}),
    "online_dpo_prev": ("online_dpo", "annotator",
                        {"rounds": 16, "beta": 0.5, "lr": 5e-4, "reference": "previous"}),
    "online_dpo_prev24": ("online_dpo", "annotator",
                          {"rounds": 24, "beta": 0.5, "lr": 5e-4, "reference": "previous"}),
    "online_dpo_prev_2p": ("online_dpo", "annotator",
                           {"rounds": 16, "beta": 0.5, "lr": 5e-4, "reference": "previous",
                            "pairs_per_prompt": 2}),
    "online_dpo_rm_prev": ("online_dpo", "reward_model",
                           {"rounds": 16, "beta": 0.5, "lr": 5e-4, "reference": "previous"}),
    "grpo_kl02": ("group", "reward_model",
                  {"advantage": "grpo", "steps": 60, "lr": 1e-4, "kl_coef": 0.2, "n_prompts": 16,
                   "group_size": 8, "epochs": 2, "minibatch_size": 32}),
    "online_dpo_rm": ("online_dpo", "reward_model",
                      {"rounds": 8, "beta": 0.5, "lr": 5e-4, "reference": "sft"}),
    "rsft": ("rsft", "reward_model", {"rounds": 3, "n": 8, "lr": 5e-4}),
    "grpo": ("group", "reward_model",
             {"advantage": "grpo", "steps": 60, "lr": 1e-4, "kl_coef": 0.05, "n_prompts": 16,
              "group_size": 8, "epochs": 2, "minibatch_size": 32}),
    "rloo": ("group", "reward_model",
             {"advantage": "rloo", "steps": 60, "lr": 1e-4, "kl_coef": 0.05, "n_prompts": 16,
              "group_size": 8, "epochs": 2, "minibatch_size": 32}),
}
LABELS = {"online_dpo": "online DPO (annotator, ref SFT, 8 rounds, beta 0.5)",
          "online_dpo_16r": "online DPO (annotator, ref SFT, 16 rounds, beta 0.2)",
          "online_dpo_prev": "online DPO (annotator, ref previous round, 16 rounds)",
          "online_dpo_prev24": "online DPO (annotator, ref previous round, 24 rounds)",
          "online_dpo_prev_2p": "online DPO (annotator, ref previous, 16 rounds, 2 pairs/prompt)",
          "online_dpo_rm_prev": "online DPO (RM labels, ref previous round, 16 rounds)",
          "grpo_kl02": "GRPO (RM reward, KL coef 0.2)",
          "online_dpo_rm": "online DPO (RM labels, ref SFT, 8 rounds, beta 0.5)",
          "rsft": "rejection-sampling FT (RM best-of-8)",
          "grpo": "GRPO (RM reward)", "rloo": "RLOO (RM reward)"}
METRICS = ("win_rate", "win_rate_stderr", "lc_win_rate", "model_mean_length",
           "model_mean_score", "kl", "model_share_flawed", "model_share_repetition",
           "model_share_false", "model_share_rude", "model_share_off_topic",
           "model_share_garbled", "model_share_best", "ceiling", "share_of_gain",
           "share_of_gain_stderr")


def load_world() -> dict[str, Any]:
    sft, tok = load_model(DATA_DIR / "checkpoints" / "sft", device="cpu")
    return {
        "sft": sft.eval(), "tok": tok,
        "train_prompts": [r["prompt"] for r in read_jsonl(DATA_DIR / "train_prompts.jsonl")],
        "eval_prompts": [r["prompt"] for r in read_jsonl(DATA_DIR / "eval_prompts.jsonl")],
    }


def reward_model(world: dict[str, Any], log: bool = True) -> RewardModel:
    """Chapter 8's reward model (see the module docstring), cached under ``runs/online``."""
    if RM_CACHE.exists():
        return RewardModel.from_pretrained(RM_CACHE, device="cpu").eval()
    base, _ = load_model(DATA_DIR / "checkpoints" / "base", device="cpu")
    pairs = load_preferences(DATA_DIR / "preferences.jsonl")
    train_pairs, _ = rmod.split_pairs_by_prompt(pairs, 0.15, seed=0)
    cfg = TrainConfig(lr=1e-3, epochs=5, batch_size=32, warmup_steps=10, seed=0, device="cpu",
                      log_every=10, progress=False)
    start = time.perf_counter()
    rm, _ = rmod.train_reward_model(copy.deepcopy(base), world["tok"], train_pairs, cfg, seed=0)
    if log:
        print(f"reward model trained in {time.perf_counter() - start:.0f} s", flush=True)
    rm.save_pretrained(RM_CACHE, world["tok"])
    return rm.eval()


def evaluate(model: Any, world: dict[str, Any], n_samples: int = 5) -> dict[str, Any]:
    ev = evaluate_against(model, world["sft"], world["tok"], world["eval_prompts"],
                          n_samples=n_samples, seed=EVAL_SEED)
    s = ev.summary()
    out = {k: s[k] for k in METRICS}
    out.update(n_comparisons=ev.win.n, wins=ev.win.wins, ties=ev.win.ties, losses=ev.win.losses,
               kl_stderr=s["kl_stderr"], baseline_mean_score=s["baseline_mean_score"])
    out["samples"] = [{"prompt": ev.prompts[i], "model": ev.texts[i], "sft": ev.baseline_texts[i]}
                      for i in range(0, len(ev.prompts), max(1, len(ev.prompts) // 4))][:4]
    return out


def train_method(name: str, seed: int, world: dict[str, Any], rm: RewardModel,
                 quick: bool = False, overrides: dict[str, Any] | None = None
                 ) -> tuple[Any, list[dict], dict[str, Any]]:
    """Train one method from the SFT model; returns (model, history rows, settings)."""
    kind, source, hp = RUNS[name]
    hp = {**hp, **(overrides or {})}
    tok, prompts = world["tok"], world["train_prompts"]
    torch.manual_seed(seed)
    model = copy.deepcopy(world["sft"])
    scorer = online.reward_model_scorer(rm, tok)
    if kind == "online_dpo":
        annotator = Annotator(world=DEFAULT_WORLD, temperature=0.4)  # as data/build.py
        label_fn = (online.labeller(annotator, seed=seed) if source == "annotator"
                    else online.reward_labeller(scorer))
        cfg = online.OnlineDPOConfig(**hp)
        if quick:
            cfg.rounds, cfg.prompts_per_round = 1, 64
        history = online.online_dpo(model, tok, prompts, label_fn, cfg, seed=seed,
                                    callback=_print_round(name))
        n_labels = sum(r["n_pairs"] for r in history)
    elif kind == "rsft":
        cfg = online.RSFTConfig(**hp)
        if quick:
            cfg.rounds, cfg.n = 1, 2
            prompts = prompts[:64]
        history = online.rejection_sampling_ft(model, tok, prompts, scorer, cfg, seed=seed,
                                               callback=_print_round(name))
        n_labels = cfg.rounds * cfg.n * len(prompts) * cfg.samples_per_prompt
    elif kind == "group":
        steps, lr = hp.pop("steps"), hp.pop("lr")
        cfg = GroupConfig(**hp)
        if quick:
            steps, cfg.n_prompts, cfg.group_size = 2, 4, 4
        ref = ppo.freeze(world["sft"]) if cfg.kl_coef else None
        history = train_group_lm(model, tok, prompts, online.reward_model_scorer(rm, tok), cfg,
                                 steps, lr=lr, max_new_tokens=48, ref_model=ref, seed=seed,
                                 device="cpu", progress=False, callback=_print_step(name))
        n_labels = steps * cfg.n_prompts * cfg.group_size
        hp = {**hp, "steps": steps, "lr": lr}
    else:  # pragma: no cover
        raise ValueError(kind)
    return model, history, {"kind": kind, "labels_from": source, **hp,
                            "n_reward_queries_or_labels": n_labels}


def _print_round(name: str):
    def cb(k: int, row: dict, model: Any) -> None:
        print(f"  {name} round {k}: " + ", ".join(
            f"{a} {b:.3g}" if isinstance(b, float) else f"{a} {b}" for a, b in row.items()
            if a != "round"), flush=True)
    return cb


def _print_step(name: str):
    def cb(step: int, m: dict) -> None:
        if step % 10 == 0:
            print(f"  {name} step {step}: RM {m['score']:+.3f} kl_k3 {m.get('kl_k3', 0):.3f} "
                  f"zero_groups {m['zero_groups']:.2f}", flush=True)
    return cb


def run_grid(names: list[str], seeds: list[int], quick: bool, out: Path,
             overrides: dict[str, Any], tag: str | None) -> None:
    torch.set_num_threads(1)
    world = load_world()
    rm = reward_model(world)
    for name in names:
        for seed in seeds:
            start = time.perf_counter()
            model, history, settings = train_method(name, seed, world, rm, quick, overrides)
            seconds = time.perf_counter() - start
            ev = evaluate(model, world, n_samples=1 if quick else 5)
            row = {"method": tag or name, "base_method": name, "seed": seed,
                   "train_seconds": round(seconds, 1), "quick": quick, "settings": settings,
                   "history": history, **ev,
                   "machine": {"platform": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "cores": os.cpu_count()}}
            print(f"{tag or name} seed {seed}: win {ev['win_rate']:.3f} ± "
                  f"{ev['win_rate_stderr']:.3f} (ceiling {ev['ceiling']:.3f}, share of gain "
                  f"{ev['share_of_gain']:.2f}), KL {ev['kl']:.2f}, score "
                  f"{ev['model_mean_score']:.3f}, best {ev['model_share_best']:.2f} "
                  f"({seconds:.0f} s)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


def run_parallel(names: list[str], seeds: list[int], jobs: int, out: Path,
                 overopt: bool = False, quick: bool = False) -> None:
    """Every (method, seed) as its own one-thread process, ``jobs`` at a time (a machine with
    more cores than this one); each writes its own JSONL file, appended to ``out`` at the end.
    The reward model is trained (or loaded) once before the fan-out."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(min(8, jobs))  # the reward model, before the one-thread runs
    reward_model(load_world())
    parts = REPO_ROOT / "runs" / "online" / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    script = str(Path(__file__).resolve())
    q = ["--quick"] if quick else []
    cmds = [[sys.executable, script, "--overopt", *q]] if overopt else []
    cmds += [[sys.executable, script, *q, "--methods", n, "--seeds", "1", "--first-seed", str(s),
              "--out", str(parts / f"{n}_{s}.jsonl")] for n in names for s in seeds]

    def one(cmd: list[str]) -> int:
        name = "overopt" if "--overopt" in cmd else Path(cmd[-1]).stem
        with (parts / f"{name}.log").open("w") as log:
            return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(one, cmds))
    print("exit codes", codes, flush=True)
    with out.open("a", encoding="utf-8") as fh:
        for f in sorted(parts.glob("*.jsonl")):
            fh.write(f.read_text())


def summarise(runs_file: Path = RUNS_FILE, out: Path = SIDE_BY_SIDE) -> dict[str, Any]:
    """Mean over seeds of every non-quick method row -> ``side_by_side.json["online_methods"]``.

    For each method, the last row of each seed counts (a rerun replaces an earlier one)."""
    rows = [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        if not r.get("quick"):
            by.setdefault(r["method"], {})[r["seed"]] = r
    methods = {}
    for name, seeds in by.items():
        runs = [seeds[s] for s in sorted(seeds)]
        s: dict[str, Any] = {"n_seeds": len(runs), "seeds": sorted(seeds)}
        for key in (*METRICS, "train_seconds"):
            values = [r[key] for r in runs]
            s[key] = statistics.fmean(values)
            if len(values) > 1:
                s[f"{key}_min"], s[f"{key}_max"] = min(values), max(values)
                s[f"{key}_seed_std"] = statistics.stdev(values)
        # stderr of the seed mean from the per-seed bootstrap errors, as if the evaluations were
        # independent. They are not: every seed is judged against the same SFT answers, so this
        # understates the error (the per-comparison verdicts needed for the paired bootstrap,
        # evaluation.seed_mean_paired, were not kept for these runs; --protocol keeps them).
        s["win_rate_stderr_of_mean"] = (sum(r["win_rate_stderr"] ** 2 for r in runs) ** 0.5
                                        / len(runs))
        label = LABELS.get(runs[0]["base_method"], name)
        if name != runs[0]["base_method"]:  # recorded under a tag (--tag)
            label += f" [{name}]"
        methods[name] = {"label": label,
                         "settings": runs[0]["settings"], "summary": s,
                         "runs": [{k: v for k, v in r.items() if k != "history"}
                                  for r in runs]}
    results = json.loads(out.read_text()) if out.exists() else {}
    results["online_methods"] = {
        "note": "learn from the policy's own samples; labels from the simulated annotator or "
                "the reward model only; judged by the true score (benchmarks/"
                "run_online_methods.py; per-run rows with training histories in "
                "online_methods_runs.jsonl)",
        "selected_on": "eval_prompts",
        "reported_on": "eval_prompts",
        "split_note": "development numbers: the variants (rounds, beta, reference) were compared "
                      "and chosen on the same 200 eval prompts x 5 samples (one SFT draw, seed "
                      f"{EVAL_SEED + 1}) that these rows report; win_rate_stderr_of_mean treats "
                      "the seeds as independent evaluations although they share that SFT draw. "
                      "The choice made on a validation split and reported on a test split is in "
                      "online_protocol.json (--protocol).",
        "n_prompts": 200, "n_samples_per_prompt": 5,
        "methods": methods,
    }
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    return results["online_methods"]


def overoptimisation(quick: bool, n_max: int, rl_steps: int, rl_every: int, seed: int = 0,
                     out: Path = OVEROPT, rl_lr: float = 1e-4) -> dict[str, Any]:
    """Gao et al. (2022) in miniature: best-of-n and GRPO against the reward model."""
    torch.set_num_threads(1)
    world = load_world()
    rm = reward_model(world)
    tok, sft = world["tok"], world["sft"]
    prompts = world["eval_prompts"][: 40 if quick else 200]
    scorer = online.reward_model_scorer(rm, tok)
    t0 = time.perf_counter()
    # ---- best-of-n: n_max SFT samples per prompt, unbiased estimates for every n <= n_max
    many = [p for p in prompts for _ in range(n_max)]
    texts = generate(sft, tok, many, max_new_tokens=48, seed=seed + 5000).texts
    proxy = scorer(many, texts).reshape(len(prompts), n_max)
    gold = np.array([DEFAULT_WORLD.true_score(p, t) for p, t in zip(many, texts, strict=True)]
                    ).reshape(len(prompts), n_max)
    # one SFT answer per prompt as the baseline of a win rate
    base_texts = generate(sft, tok, prompts, max_new_tokens=48, seed=seed + 6000).texts
    base = np.array([DEFAULT_WORLD.true_score(p, t) for p, t in zip(prompts, base_texts,
                                                                    strict=True)])
    win = np.where(gold > base[:, None], 1.0, np.where(gold < base[:, None], 0.0, 0.5))
    ns = [n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128) if n <= n_max]
    bon = []
    for n in ns:
        bon.append({"n": n, "kl": online.best_of_n_kl(n),
                    "rm_score": float(online.best_of_n_expectation(proxy, proxy, n).mean()),
                    "true_score": float(online.best_of_n_expectation(proxy, gold, n).mean()),
                    "win_rate_vs_sft": float(online.best_of_n_expectation(proxy, win, n).mean()),
                    "oracle_true_score": float(online.best_of_n_expectation(gold, gold,
                                                                            n).mean())})
        print(f"best-of-{n}: KL {bon[-1]['kl']:.2f} RM {bon[-1]['rm_score']:+.3f} true "
              f"{bon[-1]['true_score']:+.3f} win {bon[-1]['win_rate_vs_sft']:.3f}", flush=True)
    bon_seconds = time.perf_counter() - t0
    # ---- RL: GRPO against the reward model without a KL penalty, measured along the way
    model = copy.deepcopy(sft)
    cfg = GroupConfig(advantage="grpo", n_prompts=16, group_size=8, kl_coef=0.0, epochs=2,
                      minibatch_size=32)
    if quick:
        cfg.n_prompts, cfg.group_size = 4, 4
    rl = []

    def measure(step: int) -> None:
        g = generate(model, tok, [p for p in prompts for _ in range(2)], max_new_tokens=48,
                     seed=seed + 7000 + step)
        from rlcourse.evaluation import kl_to_reference

        kl, kl_se = kl_to_reference(model, sft, g)
        rs = scorer(g.prompts, g.texts)
        ts = [DEFAULT_WORLD.true_score(p, t) for p, t in zip(g.prompts, g.texts, strict=True)]
        rl.append({"step": step, "kl": kl, "kl_stderr": kl_se, "rm_score": float(np.mean(rs)),
                   "true_score": float(np.mean(ts))})
        print(f"GRPO step {step}: KL {kl:.2f} RM {rl[-1]['rm_score']:+.3f} true "
              f"{rl[-1]['true_score']:+.3f}", flush=True)

    measure(0)

    def cb(step: int, m: dict) -> None:  # step is 1-based
        if step % rl_every == 0:
            measure(step)

    t1 = time.perf_counter()
    train_group_lm(model, tok, world["train_prompts"], online.reward_model_scorer(rm, tok), cfg,
                   rl_steps, lr=rl_lr, max_new_tokens=48, seed=seed, device="cpu",
                   progress=False, callback=cb)
    rl_seconds = time.perf_counter() - t1
    # ---- fits: R(d) - R(0) against d = sqrt(KL)
    fits = {}
    r0_bon = {k: bon[0][k] for k in ("rm_score", "true_score")}
    r0_rl = {k: rl[0][k] for k in ("rm_score", "true_score")}
    for key in ("rm_score", "true_score"):
        d = np.sqrt([b["kl"] for b in bon[1:]])
        a, b = online.fit_bon(d, [x[key] - r0_bon[key] for x in bon[1:]])
        fits[f"bon_{key}"] = {"alpha": a, "beta": b, "d_peak": online.peak_bon(a, b),
                              "r0": r0_bon[key]}
        pts = [x for x in rl[1:] if x["kl"] > 0]
        d = np.sqrt([x["kl"] for x in pts])
        a, b = online.fit_rl(d, [x[key] - r0_rl[key] for x in pts])
        fits[f"rl_{key}"] = {"alpha": a, "beta": b, "d_peak": online.peak_rl(a, b),
                             "r0": r0_rl[key]}
    result = {
        "benchmark": "reward over-optimisation in miniature (Gao, Schulman, Hilton 2022)",
        "settings": {"n_prompts": len(prompts), "n_max": n_max, "rl": online.config_dict(cfg),
                     "rl_steps": rl_steps, "rl_every": rl_every, "rl_lr": rl_lr, "seed": seed,
                     "quick": quick},
        "best_of_n": bon, "rl": rl, "fits": fits,
        "seconds": {"best_of_n": bon_seconds, "rl": rl_seconds},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# The protocol: choose on a validation split of fresh prompts, report on a test split
# --------------------------------------------------------------------------------------------

#: Online-DPO trajectories of the protocol: the settings of a RUNS row, trained for the largest
#: round count listed and judged after each one. A shorter run is the start of a longer one
#: (each round's prompts, samples and labels depend on the seed and the round index only), so
#: judging one trajectory after 8, 16, 24 and 32 rounds gives the four round-count candidates.
TRAJECTORIES: dict[str, tuple[str, tuple[int, ...]]] = {
    "online_dpo": ("online_dpo", (4, 8)),                     # reference SFT, beta 0.5
    "online_dpo_16r": ("online_dpo_16r", (8, 16)),            # reference SFT, beta 0.2
    "online_dpo_prev": ("online_dpo_prev", (8, 16, 24, 32)),  # reference previous, beta 0.5
}
#: The fresh-prompt splits: prompts drawn with ``prompt_seed``, ``n_samples`` answers each from
#: the model (seed ``sample_seed``) and from the SFT model for baseline draw d (seed
#: ``sample_seed + 1 + d``).
PROTOCOL_SPLITS: dict[str, dict[str, int]] = {
    "validation": {"n_prompts": 400, "n_samples": 3, "prompt_seed": 1, "sample_seed": 20_000},
    "test": {"n_prompts": 400, "n_samples": 3, "prompt_seed": 2, "sample_seed": 30_000},
    # Not a split of the protocol: the 200 original evaluation prompts, which chose the
    # development grid's variants, judged as the grid was (model seed EVAL_SEED; baseline draw 0
    # is the grid's own SFT answers, seed EVAL_SEED + 1). The same retrained models on the old
    # prompts and on fresh ones separate "new phrasings" from "chosen on the prompts reported".
    "original": {"n_prompts": 200, "n_samples": 5, "prompt_seed": -1, "sample_seed": EVAL_SEED},
}
#: The splits every counted seed must have been judged on (the others are summarised over the
#: seeds judged on them).
REQUIRED_SPLITS = ("validation", "test")
BASELINE_DRAWS = 5
PROTOCOL_NOTE = ("shrunk to fit about an hour on one thread of a 2-core CPU shared with other "
                 "jobs: the online-DPO family only (three trajectories judged after several "
                 "round counts, and offline DPO), 400 fresh prompts x 3 answers per split, as "
                 "many new training seeds as finished; the reward-model methods of the "
                 "development grid were not rerun")


def protocol_splits(quick: bool) -> dict[str, dict[str, Any]]:
    """The splits with their prompts (fewer in quick mode)."""
    out = {}
    for name, spec in PROTOCOL_SPLITS.items():
        spec = {**spec, **({"n_prompts": 24, "n_samples": 1} if quick else {})}
        if name == "original":
            prompts = [r["prompt"] for r in read_jsonl(DATA_DIR / "eval_prompts.jsonl")]
            prompts = prompts[: spec["n_prompts"]]
        else:
            prompts = DEFAULT_WORLD.fresh_prompts(name, spec["n_prompts"],
                                                  seed=spec["prompt_seed"])
        out[name] = {**spec, "prompts": prompts}
    return out


def judge(model: Any, sft: Any, tok: Any, split: dict[str, Any], seed: int) -> dict[str, Any]:
    """The true score of every answer of ``model`` to the split's prompts (``n_samples`` each,
    sampling seed ``seed``), KL to the SFT model on those answers, and their sample stats."""
    many = [p for p in split["prompts"] for _ in range(split["n_samples"])]
    g = generate(model, tok, many, max_new_tokens=48, seed=seed)
    scores = [DEFAULT_WORLD.true_score(p, t) for p, t in zip(many, g.texts, strict=True)]
    kl, kl_se = kl_to_reference(model, sft, g)
    stats = sample_stats(many, g.texts).as_dict()
    return {"scores": scores, "kl": kl, "kl_stderr": kl_se,
            **{f"model_{k}": v for k, v in stats.items()},
            "samples": [{"prompt": many[i], "model": g.texts[i]} for i in (0, len(many) // 2)]}


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_protocol(seeds: list[int], quick: bool, out: Path) -> None:
    """Train every trajectory and offline DPO for each seed; judge each candidate on both
    splits. Rows already in ``out`` (same candidate, split, seed) are not redone."""
    torch.set_num_threads(1)
    world = load_world()
    sft, tok = world["sft"], world["tok"]
    splits = protocol_splits(quick)
    draws = 2 if quick else BASELINE_DRAWS
    old = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() \
        else []
    done = {(r["kind"], r.get("candidate"), r["split"], r.get("seed"), r.get("draw"))
            for r in old if r.get("quick") == quick}
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict[str, Any]) -> None:
        row = {**row, "quick": quick, "machine": _machine()}
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    # the SFT answers every candidate is compared with, one row per (split, draw), and the SFT
    # model judged like a candidate (SFT against SFT: about one half)
    for name, split in splits.items():
        spec = {k: v for k, v in split.items() if k != "prompts"}
        for d in range(draws):
            if ("baseline", None, name, None, d) not in done:
                j = judge(sft, sft, tok, split, split["sample_seed"] + 1 + d)
                write({"kind": "baseline", "split": name, "draw": d, "prompts": split["prompts"],
                       **spec, "scores": j["scores"],
                       **{k: v for k, v in j.items() if k.startswith("model_")}})
        if ("sft", None, name, None, None) not in done:
            write({"kind": "sft", "split": name, **spec,
                   **judge(sft, sft, tok, split, split["sample_seed"])})

    def judge_all(key: str, seed: int, model: Any, extra: dict[str, Any]) -> None:
        for name, split in splits.items():
            if ("candidate", key, name, seed, None) in done:
                continue
            j = judge(model, sft, tok, split, split["sample_seed"])
            write({"kind": "candidate", "candidate": key, "split": name, "seed": seed,
                   **extra, **j})
            print(f"  {key} seed {seed} {name}: true score {j['model_mean_score']:.3f}, "
                  f"KL {j['kl']:.2f}", flush=True)

    annotator = Annotator(world=DEFAULT_WORLD, temperature=0.4)  # as data/build.py
    for seed in seeds:
        for traj, (run_name, judge_at) in TRAJECTORIES.items():
            if quick:
                judge_at = (1, 2)
            keys = [f"{traj}@{r}" for r in judge_at]
            if all(("candidate", k, n, seed, None) in done for k in keys for n in splits):
                continue
            _, _, hp = RUNS[run_name]
            cfg = online.OnlineDPOConfig(**{**hp, "rounds": max(judge_at)})
            if quick:
                cfg.prompts_per_round = 64
            torch.manual_seed(seed)
            model = copy.deepcopy(sft)
            labels, start = [0], time.perf_counter()

            def cb(k: int, row: dict, m: Any, traj=traj, judge_at=judge_at, cfg=cfg,
                   labels=labels, start=start, seed=seed) -> None:
                labels[0] += row["n_pairs"]
                if k + 1 in judge_at:
                    settings = {**online.config_dict(cfg), "rounds": k + 1}
                    judge_all(f"{traj}@{k + 1}", seed, m,
                              {"trajectory": traj, "rounds": k + 1, "n_labels": labels[0],
                               "train_seconds": round(time.perf_counter() - start, 1),
                               "settings": settings})

            online.online_dpo(model, tok, world["train_prompts"],
                              online.labeller(annotator, seed=seed), cfg, seed=seed, callback=cb)
        if not all(("candidate", "offline_dpo", n, seed, None) in done for n in splits):
            judge_all("offline_dpo", seed, *_offline_dpo(seed, quick))
        print(f"seed {seed} done", flush=True)


def _offline_dpo(seed: int, quick: bool) -> tuple[Any, dict[str, Any]]:
    """Chapter 13's DPO row (``run_side_by_side.py``: its recipe, overrides and settings) on the
    2,559 shipped pairs, one training seed."""
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run_side_by_side as sbs

    from rlcourse.recipes import load_recipe, run_recipe

    over = sbs.overrides("dpo", seed, DATA_DIR, REPO_ROOT / "runs" / "protocol")
    if quick:
        over["train.epochs"] = 0.05
    warnings.filterwarnings("ignore", message=".*chosen == rejected.*")
    start = time.perf_counter()
    result = run_recipe(load_recipe(REPO_ROOT / "recipes" / "dpo.yaml", over), save=False,
                        progress=False)
    n_pairs = len(load_preferences(DATA_DIR / "preferences.jsonl"))
    settings = {"recipe": "recipes/dpo.yaml", "lr": sbs.RUNS["dpo"][2], **sbs.RUNS["dpo"][3],
                "epochs": sbs.EPOCHS}
    return result.model.eval(), {"trajectory": "offline_dpo", "rounds": 0, "n_labels": n_pairs,
                                 "train_seconds": round(time.perf_counter() - start, 1),
                                 "settings": settings}


def protocol_label(key: str, rounds: int) -> str:
    """A candidate's label, from the RUNS row behind it."""
    if key == "offline_dpo":
        return "offline DPO (2,559 shipped pairs, chapter 13)"
    _, _, hp = RUNS[TRAJECTORIES[key.split("@")[0]][0]]
    ref = "SFT" if hp["reference"] == "sft" else "previous round"
    return f"online DPO (annotator, ref {ref}, beta {hp['beta']}, {rounds} rounds)"


def summarise_protocol(runs_file: Path = PROTOCOL_RUNS, out: Path | None = PROTOCOL,
                       quick: bool = False, n_bootstrap: int = 2000) -> dict[str, Any]:
    """Choose on validation, report on test: ``online_protocol.json``.

    Only the seeds for which every candidate was judged on both splits count. For every
    candidate, split and baseline draw: the mean over seeds with paired-bootstrap errors
    (:func:`rlcourse.evaluation.seed_mean_paired`). The selected candidate has the highest
    share of gain on validation (mean over its baseline draws); it is reported on test, where
    the share of gain is given for each draw and over draws (:func:`spread_over_draws`)."""
    rows = [json.loads(x) for x in runs_file.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("quick", False) == quick]
    base = {(r["split"], r["draw"]): r for r in rows if r["kind"] == "baseline"}
    sft_rows = {r["split"]: r for r in rows if r["kind"] == "sft"}
    cand: dict[str, dict[tuple[str, int], dict]] = {}
    for r in rows:
        if r["kind"] == "candidate":
            cand.setdefault(r["candidate"], {})[(r["split"], r["seed"])] = r
    order = list(PROTOCOL_SPLITS)
    splits = sorted({s for s, _ in base}, key=order.index)
    all_seeds = sorted({seed for c in cand.values() for _, seed in c})
    seeds = [s for s in all_seeds
             if all((n, s) in c for c in cand.values() for n in REQUIRED_SPLITS)]
    seeds_of = {n: seeds if n in REQUIRED_SPLITS else
                [s for s in seeds if all((n, s) in c for c in cand.values())] for n in splits}
    splits = [n for n in splits if seeds_of[n]]
    if not seeds:
        raise SystemExit(f"{runs_file}: no seed has every candidate judged on every split")
    draws = {n: sorted(d for s, d in base if s == n) for n in splits}
    info = {}
    for n in splits:
        b = base[(n, 0)]
        info[n] = {"n_prompts": b["n_prompts"], "n_samples": b["n_samples"],
                   "n_comparisons": len(b["scores"]), "prompt_seed": b["prompt_seed"],
                   "sample_seed": b["sample_seed"],
                   "baseline_draw_seeds": [b["sample_seed"] + 1 + d for d in draws[n]],
                   "seeds": seeds_of[n],
                   "prompts": ("data/eval_prompts.jsonl (the development grid's prompts; not a "
                               "split of the protocol, chooses nothing)") if n == "original" else
                   "DEFAULT_WORLD.fresh_prompts(split, n_prompts, seed=prompt_seed)"}

    def judged(scores_by_seed: list[list[float]], n: str, d: int, boot_seed: int) -> dict:
        b = base[(n, d)]
        many = [p for p in b["prompts"] for _ in range(b["n_samples"])]
        sb = np.array(b["scores"])
        c = ceiling_indicators(sb, perfect_assistant_scores(many)).reshape(b["n_prompts"], -1)
        w = np.stack([win_indicators(s, sb).reshape(b["n_prompts"], -1)
                      for s in scores_by_seed])
        return seed_mean_paired(w, c, n_bootstrap, seed=boot_seed).as_dict()

    candidates = {}
    for i, (key, by) in enumerate(sorted(cand.items())):
        entry: dict[str, Any] = {}
        for n in splits:
            runs = [by[(n, s)] for s in seeds_of[n]]
            per_draw = [judged([r["scores"] for r in runs], n, d, 1000 * i + d)
                        for d in draws[n]]
            entry[n] = {
                "draws": per_draw,
                **{k: spread_over_draws([x[k] for x in per_draw]).as_dict()
                   for k in ("win_rate", "ceiling", "share_of_gain")},
                "share_of_gain_stderr_mean": float(np.mean([x["share_of_gain_stderr"]
                                                            for x in per_draw])),
                "win_rate_stderr_mean": float(np.mean([x["win_rate_stderr"] for x in per_draw])),
                **{k: statistics.fmean(r[k] for r in runs)
                   for k in ("kl", "model_mean_score", "model_mean_length", "model_share_flawed",
                             "model_share_best", "model_share_repetition", "model_share_garbled")},
                "samples": runs[0]["samples"],
            }
        r0 = by[(splits[0], seeds[0])]
        candidates[key] = {
            "label": protocol_label(key, r0["rounds"]), "trajectory": r0["trajectory"],
            "rounds": r0["rounds"], "settings": r0["settings"],
            "n_labels": statistics.fmean(by[(splits[0], s)]["n_labels"] for s in seeds),
            "train_seconds": statistics.fmean(by[(splits[0], s)]["train_seconds"]
                                              for s in seeds),
            **entry}
    selected = max(candidates,
                   key=lambda k: candidates[k]["validation"]["share_of_gain"]["mean"])
    sel = candidates[selected]
    sft_check = {n: {"win_rate": spread_over_draws([
        judged([sft_rows[n]["scores"]], n, d, 7)["win_rate"] for d in draws[n]]).as_dict()}
        for n in splits if n in sft_rows}
    result = {
        "benchmark": "online DPO: the variant chosen on a validation split of fresh prompts, "
                     "reported on a test split that played no part in choosing",
        "selected_on": "validation", "reported_on": "test",
        "selection_rule": "the candidate with the highest share of gain on the validation split "
                          "(mean over seeds, then over the baseline draws)",
        "seeds": seeds, "n_seeds": len(seeds), "required_splits": list(REQUIRED_SPLITS),
        "seeds_started": all_seeds,
        "splits": info, "baseline_draws": len(draws.get("test", [])),
        "n_bootstrap": n_bootstrap,
        "standard_errors": "paired bootstrap over prompts across seeds "
                           "(rlcourse.evaluation.seed_mean_paired); naive_stderr = sd of the "
                           "per-seed win rates / sqrt(seeds), for comparison",
        "compute_note": PROTOCOL_NOTE, "quick": quick,
        "selected": selected,
        "report": {"label": sel["label"], "validation_share_of_gain": sel["validation"][
            "share_of_gain"], "test": sel["test"]},
        "candidates": candidates,
        "sft_vs_sft": sft_check,
        "machine": next(iter(cand[selected].values()))["machine"],
    }
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(RUNS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="hyperparameter overrides k=v")
    parser.add_argument("--tag", default=None, help="record the runs under this method name")
    parser.add_argument("--out", type=Path, default=RUNS_FILE)
    parser.add_argument("--summarise", action="store_true")
    parser.add_argument("--protocol", action="store_true",
                        help="train the protocol's candidates for --seeds seeds from --first-seed")
    parser.add_argument("--summarise-protocol", action="store_true")
    parser.add_argument("--jobs", type=int, default=0, help="run (method, seed) pairs in "
                        "this many parallel processes")
    parser.add_argument("--with-overopt", action="store_true", help="with --jobs: also --overopt")
    parser.add_argument("--overopt", action="store_true")
    parser.add_argument("--n-max", type=int, default=64)
    parser.add_argument("--rl-steps", type=int, default=60)
    parser.add_argument("--rl-every", type=int, default=4)
    parser.add_argument("--rl-lr", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.summarise:
        s = summarise(args.out)
        for name, m in s["methods"].items():
            x = m["summary"]
            print(f"{name:20s} {x['n_seeds']} seeds: win {x['win_rate']:.3f} "
                  f"(± {x['win_rate_stderr_of_mean']:.3f}) KL {x['kl']:.2f}")
        return
    if args.summarise_protocol:
        r = summarise_protocol(args.out if args.out != RUNS_FILE else PROTOCOL_RUNS,
                               None if args.quick else PROTOCOL, quick=args.quick)
        for key, c in r["candidates"].items():
            print(f"{key:22s} validation share {c['validation']['share_of_gain']['mean']:.3f}  "
                  f"test share {c['test']['share_of_gain']['mean']:.3f} "
                  f"(draws {c['test']['share_of_gain']['min']:.3f}-"
                  f"{c['test']['share_of_gain']['max']:.3f})  KL {c['test']['kl']:.2f}")
        print(f"selected on validation: {r['selected']} ({r['n_seeds']} seeds)")
        return
    if args.protocol:
        out = args.out if args.out != RUNS_FILE else (
            REPO_ROOT / "runs" / "protocol_quick.jsonl" if args.quick else PROTOCOL_RUNS)
        run_protocol(list(range(args.first_seed, args.first_seed + args.seeds)), args.quick, out)
        return
    if args.overopt:
        overoptimisation(args.quick, 16 if args.quick else args.n_max,
                         4 if args.quick else args.rl_steps, 2 if args.quick else args.rl_every,
                         out=REPO_ROOT / "runs" / "overopt_quick.json" if args.quick else OVEROPT,
                         rl_lr=args.rl_lr)
        return
    names = args.methods.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(RUNS)}")
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if args.jobs:
        run_parallel(names, list(range(args.first_seed, args.first_seed + args.seeds)),
                     args.jobs, args.out, args.with_overopt, args.quick)
        return
    out = args.out if not args.quick or args.out != RUNS_FILE else REPO_ROOT / "runs" / "q.jsonl"
    run_grid(names, list(range(args.first_seed, args.first_seed + args.seeds)), args.quick, out,
             overrides, args.tag)


if __name__ == "__main__":
    sys.exit(main())
