"""Rebuild everything the book ships in ``data/``: ``python data/build.py --seed 0``.

Steps (all seeded; single-threaded, a few minutes on a laptop CPU):

1. the assistant world (:mod:`rlcourse.worlds.assistant`): prompts split into training and
   held-out evaluation prompts, and the word-level tokenizer built from its vocabulary;
2. a pretraining corpus of raw text (sentences of mixed quality) and the *base* model,
   a tiny Llama-style GPT trained on it from scratch;
3. an SFT set (prompt/completion, with a share of flawed answers, as real SFT data has) and
   the *SFT* model, fine-tuned from the base model;
4. preference pairs sampled from the SFT model (two samples per training prompt, labelled by
   the simulated annotator) and the unpaired (KTO) split of those pairs;
5. measurements: the SFT model against the base model on held-out prompts (win rate by the
   ground-truth judge), the flaws left in SFT samples, annotator agreement;
6. ``MANIFEST.json``: size and sha256 of every generated file;
7. the reasoning world (:mod:`rlcourse.worlds.reasoning`, :func:`build_reasoning`, under
   ``reasoning/``): worked solutions with slips, a tiny model trained on them from scratch in the
   chat format, the held-out validation and test problems in GSM8K's ``question``/``answer``
   form, and the model's accuracy on validation. ``--only reasoning`` rebuilds this step alone
   (and the manifest). Its files hold no wall-clock numbers, so a rebuild is bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Generated files are listed in the manifest; these are sources and stay out of it.
SOURCES = {"build.py", "README.md", "MANIFEST.json"}


@dataclass
class BuildConfig:
    """Every knob of the build. The defaults make the shipped data."""

    seed: int = 0
    n_layers: int = 3
    hidden_size: int = 128
    n_heads: int = 4
    n_eval_per_topic: int = 25
    n_pretrain_docs: int = 6000
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    n_sft: int = 4000
    sft_steps: int = 1200
    sft_lr: float = 2e-3
    batch_size: int = 32
    warmup_steps: int = 50
    max_length: int = 96
    n_pair_prompts: int = 3600
    annotator_temperature: float = 0.4
    eval_samples_per_prompt: int = 5
    max_new_tokens: int = 48
    device: str = "cpu"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(out: Path, extra: dict | None = None) -> dict:
    """List every generated file under ``out`` with its size and sha256 in ``MANIFEST.json``."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel in SOURCES or "__pycache__" in rel or rel.startswith("."):
            continue
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
        **(extra or {}),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def text_items(tokenizer, texts):
    """Raw text for pretraining: ``<bos> text <eos>``, every token a target."""
    import torch

    items = []
    for text in texts:
        ids = [tokenizer.bos_token_id]
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id]
        t = torch.tensor(ids, dtype=torch.long)
        items.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
    return items


def build(out: Path, cfg: BuildConfig, log=print) -> dict:
    """Run every step, write the files into ``out`` and return the results dict."""
    import numpy as np
    import torch

    from rlcourse.data import tokenize_sft, write_jsonl
    from rlcourse.engine import TrainConfig, sft_loss_fn, train
    from rlcourse.evaluation import evaluate_against, sample_stats
    from rlcourse.models import build_model, build_tokenizer, generate, save_model
    from rlcourse.worlds.assistant import (
        DEFAULT_WORLD,
        Annotator,
        label_agreement,
        pair_length_balance,
        preference_pairs,
        unpaired_from_pairs,
    )

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world = DEFAULT_WORLD
    rng = np.random.default_rng(cfg.seed)

    # 1. prompts and tokenizer ------------------------------------------------------------
    train_prompts, eval_prompts = world.split_prompts(cfg.n_eval_per_topic, seed=rng)
    write_jsonl(out / "train_prompts.jsonl", ({"prompt": p} for p in train_prompts))
    write_jsonl(out / "eval_prompts.jsonl", ({"prompt": p} for p in eval_prompts))
    tokenizer = build_tokenizer(world.vocabulary())
    log(f"{len(train_prompts)} training and {len(eval_prompts)} evaluation prompts; "
        f"vocabulary {len(tokenizer)} tokens")

    def config(lr: float, steps: int, seed: int) -> TrainConfig:
        return TrainConfig(lr=lr, max_steps=steps, batch_size=cfg.batch_size,
                           warmup_steps=cfg.warmup_steps, schedule="cosine", seed=seed,
                           log_every=20, device=cfg.device, progress=sys.stderr.isatty())

    # 2. pretraining ------------------------------------------------------------------------
    docs = world.pretraining_corpus(cfg.n_pretrain_docs, seed=rng, prompts=train_prompts)
    write_jsonl(out / "pretrain.jsonl", ({"text": d} for d in docs))
    model = build_model(tokenizer, seed=cfg.seed, n_layers=cfg.n_layers,
                        hidden_size=cfg.hidden_size, n_heads=cfg.n_heads)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.n_layers} layers, hidden {cfg.hidden_size}, {n_params:,} parameters")
    t0 = time.perf_counter()
    pre_history = train(model, sft_loss_fn, text_items(tokenizer, docs),
                        config(cfg.pretrain_lr, cfg.pretrain_steps, cfg.seed))
    pretrain_s = time.perf_counter() - t0
    log(f"pretraining: {cfg.pretrain_steps} steps in {pretrain_s:.0f} s, "
        f"loss {pre_history.last('loss'):.3f}")
    model.eval()
    save_model(model, tokenizer, out / "checkpoints" / "base")
    base = copy.deepcopy(model)

    # 3. SFT -------------------------------------------------------------------------------
    sft_rows = world.sft_dataset(train_prompts, cfg.n_sft, seed=rng)
    write_jsonl(out / "sft.jsonl", sft_rows)
    t0 = time.perf_counter()
    sft_history = train(model, sft_loss_fn, tokenize_sft(tokenizer, sft_rows, cfg.max_length),
                        config(cfg.sft_lr, cfg.sft_steps, cfg.seed + 1))
    sft_s = time.perf_counter() - t0
    log(f"SFT: {cfg.sft_steps} steps in {sft_s:.0f} s, loss {sft_history.last('loss'):.3f}")
    model.eval()
    save_model(model, tokenizer, out / "checkpoints" / "sft")
    (out / "history").mkdir(exist_ok=True)
    for name, hist in (("pretrain", pre_history), ("sft", sft_history)):
        (out / "history" / f"{name}.json").write_text(json.dumps(hist.to_rows()) + "\n")

    # 4. preference pairs sampled from the SFT model ---------------------------------------
    t0 = time.perf_counter()
    pair_prompts = [train_prompts[int(i)]
                    for i in rng.integers(len(train_prompts), size=cfg.n_pair_prompts)]
    a = generate(model, tokenizer, pair_prompts, max_new_tokens=cfg.max_new_tokens,
                 seed=cfg.seed + 11).texts
    b = generate(model, tokenizer, pair_prompts, max_new_tokens=cfg.max_new_tokens,
                 seed=cfg.seed + 12).texts
    sampling_s = time.perf_counter() - t0
    annotator = Annotator(world=world, temperature=cfg.annotator_temperature)
    pairs = preference_pairs(pair_prompts, a, b, annotator, seed=rng)
    write_jsonl(out / "preferences.jsonl", pairs)
    unpaired = unpaired_from_pairs(pairs, desirable_fraction=None, seed=rng)
    write_jsonl(out / "unpaired.jsonl", unpaired)
    identical = sum(x == y for x, y in zip(a, b, strict=True))
    empty = sum(x != y and not (x.strip() and y.strip()) for x, y in zip(a, b, strict=True))
    log(f"{len(pairs)} preference pairs from {cfg.n_pair_prompts} prompts ({identical} "
        f"identical and {empty} with an empty answer dropped, the rest skipped as ties)")

    # 5. measurements ------------------------------------------------------------------------
    t0 = time.perf_counter()
    result = evaluate_against(model, base, tokenizer, eval_prompts,
                              n_samples=cfg.eval_samples_per_prompt,
                              max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 21)
    eval_s = time.perf_counter() - t0
    agreement = label_agreement(pairs, world)
    results = {
        "sft_vs_base": result.summary() | {
            "n_comparisons": result.win.n,
            "wins": result.win.wins, "ties": result.win.ties, "losses": result.win.losses,
        },
        "best_score": world.max_score(),
        "sft_data": sample_stats([r["prompt"] for r in sft_rows],
                                 [r["completion"] for r in sft_rows], world).as_dict(),
        "preferences": {
            "n_pairs": len(pairs),
            "n_prompts_sampled": cfg.n_pair_prompts,
            "identical_dropped": identical,
            "empty_dropped": empty,
            "annotator_temperature": cfg.annotator_temperature,
            "label_agreement": agreement["agreement"],
            "true_ties": agreement["true_ties"],
            **pair_length_balance(pairs, world),
        },
        "unpaired": {"n": len(unpaired), "n_desirable": sum(r["label"] for r in unpaired)},
        "model": {"n_parameters": n_params, "n_layers": cfg.n_layers,
                  "hidden_size": cfg.hidden_size, "vocab_size": len(tokenizer)},
        "timings_s": {
            "pretrain": round(pretrain_s, 1), "sft": round(sft_s, 1),
            "pretrain_plus_sft": round(pretrain_s + sft_s, 1),
            "sample_pairs": round(sampling_s, 1), "evaluate": round(eval_s, 1),
            "total": round(time.perf_counter() - start, 1),
            "note": "torch.set_num_threads(1) on a 2-core CPU shared with other processes",
        },
        "config": asdict(cfg),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log(f"SFT vs base on {result.win.n} held-out samples: win rate {result.win}, "
        f"LC {result.lc_win_rate:.3f}")
    s = result.model
    log(f"SFT samples: mean true score {s.mean_score:.3f} (best {world.max_score():.1f}); "
        f"false facts {s.share_false:.1%}, rude {s.share_rude:.1%}, "
        f"repetition {s.share_repetition:.1%}, off-topic {s.share_off_topic:.1%}, "
        f"garbled {s.share_garbled:.1%}")
    log(f"annotator agreement with the true ordering: {agreement['agreement']:.1%}")

    # 6. manifest --------------------------------------------------------------------------------
    import torch as _torch
    import transformers

    manifest = write_manifest(out, {
        "built_with": {"python": platform.python_version(), "torch": _torch.__version__,
                       "transformers": transformers.__version__},
        "command": f"python data/build.py --seed {cfg.seed}",
    })
    log(f"data: {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.1f} MB")
    return results


@dataclass
class ReasoningBuildConfig:
    """Every knob of the reasoning build (:func:`build_reasoning`). The defaults make the
    shipped ``reasoning/`` folder."""

    seed: int = 0
    n_layers: int = 2
    hidden_size: int = 96
    n_heads: int = 4
    n_sft: int = 40000
    n_sft_shipped: int = 500
    sft_steps: int = 2000
    sft_lr: float = 3e-3
    batch_size: int = 64
    warmup_steps: int = 50
    max_length: int = 128
    n_rl_prompts: int = 4000
    n_validation: int = 500
    n_test: int = 500
    eval_samples_per_problem: int = 8
    max_new_tokens: int = 48
    device: str = "cpu"


def _history_rows(history) -> list[dict]:
    """Training-curve rows without wall-clock fields (tokens/s, memory): bit for bit."""
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "peak_mem_mb")}
            for row in history.to_rows()]


def build_reasoning(out: Path, cfg: ReasoningBuildConfig, log=print) -> dict:
    """The reasoning world's data and model under ``out/reasoning``; returns the results dict.

    1. problems, all distinct: ``n_sft`` SFT rows ``{prompt, completion, answer}``, the
       completion a worked solution with slips (the first ``n_sft_shipped`` shipped as
       ``sft_sample.jsonl``; the rest are regenerated from the seed), ``n_rl_prompts`` fresh
       training problems for RL (``rl_prompts.jsonl``: ``{prompt, answer}``), and the held-out
       ``validation.jsonl`` and ``test.jsonl`` in GSM8K's form (``{question, answer}``, the
       answer a worked solution ending in ``#### N``), disjoint from training by construction
       (:func:`rlcourse.worlds.reasoning.problem_split`);
    2. the model: a tiny Llama-style GPT trained from scratch on the SFT rows in the chat format
       (``checkpoints/sft``). Its pretraining and its SFT are one stage here: the world has no
       text but problems and their solutions;
    3. ``results.json``: its greedy accuracy and sampled pass@k on validation (test is for the
       benchmark, ``benchmarks/run_rlvr.py``).
    """
    import numpy as np
    import torch

    from rlcourse.data import tokenize_sft, write_jsonl
    from rlcourse.engine import TrainConfig, sft_loss_fn, train
    from rlcourse.models import build_model, generate, save_model
    from rlcourse.verifiers import gsm8k_exact_match, pass_at_k_curve
    from rlcourse.worlds.reasoning import DEFAULT_REASONING_WORLD, reasoning_tokenizer

    torch.set_num_threads(1)
    world = DEFAULT_REASONING_WORLD
    root = out / "reasoning"
    root.mkdir(parents=True, exist_ok=True)
    # a stream of its own: the assistant world's files do not change when this step does
    rng = np.random.default_rng([cfg.seed, 20])
    start = time.perf_counter()

    # 1. problems ----------------------------------------------------------------------------
    stream = world.iter_problems("train", rng)  # distinct problems for every use below
    sft_rows = []
    for _ in range(cfg.n_sft):
        p = next(stream)
        sft_rows.append({"prompt": p.question, "completion": world.worked_solution(p, rng)[0],
                         "answer": str(p.answer)})
    write_jsonl(root / "sft_sample.jsonl", sft_rows[:cfg.n_sft_shipped])
    rl_rows = [{"prompt": p.question, "answer": str(p.answer)}
               for p in (next(stream) for _ in range(cfg.n_rl_prompts))]
    write_jsonl(root / "rl_prompts.jsonl", rl_rows)
    held_out = {}
    for split, n in (("validation", cfg.n_validation), ("test", cfg.n_test)):
        held_out[split] = world.problems(split, n, rng)
        write_jsonl(root / f"{split}.jsonl", (p.row() for p in held_out[split]))
    tokenizer = reasoning_tokenizer(world)
    data_right = float(np.mean([world.final_answer(r["completion"]) == r["answer"]
                                for r in sft_rows]))
    log(f"reasoning: {len(sft_rows)} SFT rows ({data_right:.1%} right), {len(rl_rows)} RL "
        f"prompts, {cfg.n_validation} validation and {cfg.n_test} test problems; vocabulary "
        f"{len(tokenizer)} tokens")

    # 2. the model ------------------------------------------------------------------------------
    model = build_model(tokenizer, seed=cfg.seed, n_layers=cfg.n_layers,
                        hidden_size=cfg.hidden_size, n_heads=cfg.n_heads)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    sft = train(model, sft_loss_fn, tokenize_sft(tokenizer, sft_rows, cfg.max_length),
                TrainConfig(lr=cfg.sft_lr, max_steps=cfg.sft_steps, batch_size=cfg.batch_size,
                            warmup_steps=cfg.warmup_steps, schedule="cosine", seed=cfg.seed,
                            log_every=50, device=cfg.device, progress=sys.stderr.isatty()))
    log(f"reasoning SFT: {cfg.sft_steps} steps in {time.perf_counter() - t0:.0f} s, "
        f"loss {sft.last('loss'):.3f}")
    model.eval()
    save_model(model, tokenizer, root / "checkpoints" / "sft")
    (root / "history").mkdir(exist_ok=True)
    (root / "history" / "sft.json").write_text(json.dumps(_history_rows(sft)) + "\n")

    # 3. accuracy on validation ----------------------------------------------------------------
    problems = held_out["validation"]
    answers = [str(p.answer) for p in problems]
    greedy = generate(model, tokenizer, [p.question for p in problems],
                      max_new_tokens=cfg.max_new_tokens, do_sample=False)
    n = cfg.eval_samples_per_problem
    sampled = generate(model, tokenizer, [p.question for p in problems for _ in range(n)],
                       max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed + 31)
    correct = np.array(gsm8k_exact_match(None, sampled.texts, [a for a in answers
                                                               for _ in range(n)]))
    curve = pass_at_k_curve(correct.reshape(len(problems), n).astype(bool))
    results = {
        "model": {"n_parameters": n_params, "n_layers": cfg.n_layers,
                  "hidden_size": cfg.hidden_size, "vocab_size": len(tokenizer)},
        "sft_data": {"n_rows": len(sft_rows), "share_right": data_right},
        "validation": {
            "n_problems": len(problems),
            "greedy_accuracy": float(np.mean(gsm8k_exact_match(None, greedy.texts, answers))),
            "samples_per_problem": n,
            "pass_at_k": {str(k): round(v[0], 6) for k, v in curve.items()},
            "sloppy_solution_accuracy": float(np.mean([world.clean_rate(p) for p in problems])),
        },
        "slips": asdict(world.slips),
        "difficulty": asdict(world.difficulty),
        "config": asdict(cfg),
    }
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log(f"reasoning model ({n_params:,} parameters) on validation: greedy "
        f"{results['validation']['greedy_accuracy']:.3f}, sampled pass@k "
        f"{results['validation']['pass_at_k']}; {time.perf_counter() - start:.0f} s in all")
    return results


def refresh_manifest(out: Path) -> dict:
    """Rewrite ``MANIFEST.json`` over every generated file, keeping its other keys."""
    path = out / "MANIFEST.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    extra = {k: v for k, v in old.items() if k not in ("total_bytes", "files")}
    return write_manifest(out, extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: data/)")
    parser.add_argument("--only", choices=("assistant", "reasoning"), default=None,
                        help="rebuild one world's files only (and the manifest)")
    for name, value in asdict(BuildConfig()).items():
        if name == "seed":
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out, only = args.pop("out"), args.pop("only")
    if only != "reasoning":
        build(out, BuildConfig(**args))
    if only != "assistant":
        build_reasoning(out, ReasoningBuildConfig(seed=args["seed"]))
        manifest = refresh_manifest(out)
        print(f"data: {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
