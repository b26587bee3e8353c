"""GPU check, the Python half of ``benchmarks/gpu_check.sh``: DPO and GRPO steps of a
Qwen2.5-0.5B-sized model in bf16, TRL's ``DPOTrainer`` on the same batch, one part per process.

Parts (``--part``), each writing one JSON file (``--out``), so that one failure or timeout
loses nothing else:

* ``env``: versions, the device, bf16 support;
* ``dpo``: rlcourse DPO steps (:func:`rlcourse.preference.train_preference`, reference
  log-probs precomputed, fp32 master weights with bf16 autocast through ``accelerate``);
* ``dpo_lora``: the same with LoRA r=16 on every linear layer and gradient checkpointing;
* ``grpo``: GRPO steps (:func:`rlcourse.grpo.group_step`: K samples per prompt drawn with the
  KV-cache generator :func:`rlcourse.models.generate`, a rule reward, k3 KL to a frozen bf16
  reference) under bf16 autocast;
* ``trl``: TRL's ``DPOTrainer`` (``precompute_ref_log_probs=True``, ``bf16=True``) on the same
  rows, tokenised to the same ids;
* ``trl_grpo``: TRL's ``GRPOTrainer`` on the same prompts, K, answer length, reward and KL
  coefficient (``loss_type="grpo"``, ``bf16=True``; it samples with ``transformers``'
  ``generate``, KV cache, no vLLM);
* ``--merge``: the part files -> one ``gpu.json``, with the rlcourse/TRL ratios of tokens/s and
  peak memory, and the predicted (:func:`rlcourse.memory.training_step_memory`, bf16
  activations, chunked logits) against the measured peak of each DPO part.

TRL and ``datasets`` are not needed by rlcourse itself; on a machine without network,
``gpu_check.sh`` installs them from wheels carried in the ignored folder ``.wheels/`` (made
on a machine with network: ``pip download trl datasets -d .wheels``, for the GPU machine's
Python version; torch is not needed there).

Tokens/s counts the real tokens of the sequences trained on (chosen + rejected; for GRPO the
prompt + response rows of the update), median over the timed steps after a warm-up. MFU =
``6 N tokens/s / peak`` with ``N`` the model's parameters and ``peak`` the GPU's dense bf16
FLOP/s (H200/H100 SXM: 989 TFLOP/s; ``--peak-tflops`` to change): the usual approximation
without attention FLOPs. Peak memory: ``torch.cuda.max_memory_allocated`` of the part.

The model is built from its config with random weights (no download) and the tokenizer is the
book's word-level one (:func:`rlcourse.models.build_tokenizer`), so the check runs offline.
``--smoke``: a tiny model on the CPU (seconds), to check the script itself.
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
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without an install
    sys.path.insert(0, str(ROOT))

QWEN05B = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
               max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(QWEN05B, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024)
PEAK_TFLOPS = 989.0  # NVIDIA H200 / H100 SXM, dense bf16 (datasheet; 1979 is with sparsity)


# --------------------------------------------------------------------------------------------
# Shared set-up
# --------------------------------------------------------------------------------------------
def _words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def setup(args):
    """Tokenizer, model config, device and the preference rows (the same for every part)."""
    import random

    import torch
    from transformers import Qwen2Config

    from rlcourse.models import build_tokenizer

    device = "cpu" if args.smoke else "cuda"
    words = _words(400)
    tok = build_tokenizer(words)
    sizes = TINY if args.smoke else QWEN05B
    config = Qwen2Config(**sizes, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    rng = random.Random(0)
    prompt_len, completion_len = (8, 24) if args.smoke else (args.prompt_len, args.completion_len)
    rows = [{"prompt": " ".join(rng.choices(words, k=prompt_len)),
             "chosen": " ".join(rng.choices(words, k=completion_len)),
             "rejected": " ".join(rng.choices(words, k=completion_len))}
            for _ in range(args.pairs)]
    torch.backends.cuda.matmul.allow_tf32 = True
    return tok, config, device, rows


def build(config, device: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model  # fp32 master weights; bf16 is the autocast compute dtype


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def _timed(stamps: list[float], warmup: int) -> list[float]:
    diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return diffs[warmup:] if len(diffs) > warmup else diffs


def _mfu(n_params: int, tokens_per_s: float, peak_tflops: float) -> float:
    return 6 * n_params * tokens_per_s / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------
def part_env(args) -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available()}
    for mod in ("accelerate", "peft", "trl", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - report whatever is missing
            out[mod] = f"missing ({type(err).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device_name=p.name, device_memory_gib=p.total_memory / 2**30,
                   bf16_supported=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    return out


def part_dpo(args, lora: bool = False) -> dict:
    import torch

    from rlcourse.adapters import LoraSettings, apply_lora
    from rlcourse.engine import TrainConfig
    from rlcourse.memory import TransformerShape, training_step_memory
    from rlcourse.preference import n_tokens, precompute_reference_logps, tokenize_pairs
    from rlcourse.preference import train_preference as train_pref

    tok, config, device, rows = setup(args)
    model = build(config, device)
    n_params = sum(p.numel() for p in model.parameters())
    if lora:  # the frozen base in bf16 (peft keeps the adapters in fp32)
        model = apply_lora(model.to(torch.bfloat16), LoraSettings(r=16))
    items = tokenize_pairs(tok, rows, max_length=4096)
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        if lora:
            with model.disable_adapter():
                items = precompute_reference_logps(model, items, batch_size=args.pairs)
        else:
            items = precompute_reference_logps(model, items, batch_size=args.pairs)
    if device == "cuda":
        torch.cuda.synchronize()
    reference_seconds = time.perf_counter() - start
    stamps: list[float] = []

    def stamp(step, history, m):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    steps = args.warmup + args.steps + 1
    cfg = TrainConfig(lr=1e-6, max_steps=steps, batch_size=args.pairs, log_every=1,
                      device="cpu" if device == "cpu" else "auto", mixed_precision="bf16",
                      progress=False, warmup_steps=0, schedule="constant",
                      gradient_checkpointing=lora)
    _reset_peak(device)
    run = train_pref("dpo", model, items, cfg, beta=0.1, engine_kwargs={"callbacks": [stamp]})
    times = _timed(stamps, args.warmup)
    tokens_per_step = n_tokens(items)  # one step reads every pair (batch = the data)
    median = statistics.median(times)
    tps = tokens_per_step / median
    seq_len = max(int(it["chosen_input_ids"].numel()) for it in items)
    predicted = training_step_memory(
        TransformerShape.from_config(config), 2 * args.pairs, seq_len,
        lora_r=16 if lora else None, checkpointing=lora, weight_bytes=2 if lora else 4,
        trainable_bytes=4, activation_bytes=2, foreach=True, logits="chunked")
    losses = run.history.series("loss")[1]
    return {"what": "rlcourse DPO step" + (" LoRA r=16 + gradient checkpointing" if lora else
                                           ", full fine-tune"),
            "n_parameters": n_params, "pairs": args.pairs, "tokens_per_step": tokens_per_step,
            "seq_len_max": seq_len, "median_step_s": median, "steps_timed": len(times),
            "tokens_per_s": tps, "mfu": _mfu(n_params, tps, args.peak_tflops),
            "peak_memory_gib": _peak_gib(device),
            "predicted_peak_gib": predicted.peak / 2**30,
            "predicted_phase": predicted.phase, "logits": "chunked",
            "reference_pass_s": reference_seconds,
            "first_loss": losses[0], "last_loss": losses[-1]}


def part_grpo(args) -> dict:
    import torch

    from rlcourse.grpo import GroupConfig, group_step
    from rlcourse.models import generate

    tok, config, device, rows = setup(args)
    policy = build(config, device)
    n_params = sum(p.numel() for p in policy.parameters())
    reference = copy.deepcopy(policy).to(torch.bfloat16).eval().requires_grad_(False)
    n_prompts, k = (2, 4) if args.smoke else (args.grpo_prompts, args.grpo_k)
    new_tokens = 8 if args.smoke else args.grpo_new_tokens
    gcfg = GroupConfig(advantage="grpo", group_size=k, n_prompts=n_prompts, kl_coef=0.04,
                       epochs=1, temperature=1.0)
    group_prompts = [r["prompt"] for r in rows[:n_prompts] for _ in range(k)]
    sampling: list[float] = []
    n_tokens: list[int] = []

    def sample_fn(model, generator):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen = generate(model, tok, group_prompts, max_new_tokens=new_tokens,
                       temperature=gcfg.temperature, seed=len(sampling))  # KV cache
        out = {"input_ids": gen.full_ids, "attention_mask": gen.full_attention_mask,
               "completion_mask": gen.full_completion_mask}
        out = {key: v.to(device) for key, v in out.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        sampling.append(time.perf_counter() - t0)
        n_tokens.append(int(out["attention_mask"].sum()))
        return out

    def reward_fn(ids, attn, mask):  # a rule: the share of even token ids in the response
        resp = mask.float()
        return ((ids[:, 1:] % 2 == 0).float() * resp).sum(1) / resp.sum(1).clamp(min=1)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    policy.train()
    step_times = []
    _reset_peak(device)
    for _ in range(1 + args.grpo_steps):  # one warm-up step (sampling is the slow part)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            metrics = group_step(policy, reference, reward_fn, sample_fn, optimizer, gcfg)
        if device == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
    timed = slice(1, None)
    step = statistics.median(step_times[timed])
    sample = statistics.median(sampling[timed])
    tokens = statistics.median(n_tokens[timed])
    update_tps = tokens / max(step - sample, 1e-9)
    return {"what": "rlcourse GRPO step (group_step: sample K per prompt with the KV-cache "
                    "generator, rule reward, k3 KL to a bf16 reference, one AdamW update)",
            "n_parameters": n_params, "prompts": n_prompts, "k": k,
            "new_tokens": new_tokens, "tokens_per_step": tokens, "median_step_s": step,
            "tokens_per_s": tokens / step, "median_sampling_s": sample,
            "update_tokens_per_s": update_tps,
            "update_mfu": _mfu(n_params, update_tps, args.peak_tflops),
            "peak_memory_gib": _peak_gib(device), "last_metrics": metrics,
            "note": "tokens_per_s: prompt + answer tokens of the step over the whole step "
                    "(sampling included); update = step - sampling (old/ref log-probs, "
                    "forward, backward, AdamW)"}


def part_trl_grpo(args) -> dict:
    """TRL's GRPOTrainer on the prompts, K, answer length, reward and KL of ``part_grpo``."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlcourse.models import format_prompt

    tok, config, device, rows = setup(args)
    policy = build(config, device)
    n_params = sum(p.numel() for p in policy.parameters())
    n_prompts, k = (2, 4) if args.smoke else (args.grpo_prompts, args.grpo_k)
    new_tokens = 8 if args.smoke else args.grpo_new_tokens
    stamps: list[float] = []
    tokens: list[int] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    def even_share(prompts, completions, completion_ids, **kw):  # part_grpo's reward
        tokens.append(sum(len(c) for c in completion_ids))
        return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]

    data = Dataset.from_list([{"prompt": format_prompt(r["prompt"], tok)}
                              for r in rows[:n_prompts]])
    with tempfile.TemporaryDirectory() as out:
        # TRL builds its reference (beta > 0) from the model's path: save the random model
        policy.save_pretrained(f"{out}/model")
        tok.save_pretrained(f"{out}/model")
        del policy
        targs = GRPOConfig(
            output_dir=out, per_device_train_batch_size=n_prompts * k, num_generations=k,
            max_completion_length=new_tokens, beta=0.04, loss_type="grpo", temperature=1.0,
            learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
            max_steps=args.grpo_steps + 1, logging_steps=1, report_to=[], save_strategy="no",
            seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=not args.smoke,
            use_cpu=args.smoke, optim="adamw_torch",
            model_init_kwargs={"dtype": "float32"})  # fp32 master weights, as part grpo
        trainer = GRPOTrainer(model=f"{out}/model", reward_funcs=[even_share], args=targs,
                              train_dataset=data, processing_class=tok, callbacks=[Stamp()])
        _reset_peak(device)
        start = time.perf_counter()
        trainer.train()
    import trl

    times = _timed([start, *stamps], 1)  # the first step is a warm-up
    step = statistics.median(times)
    prompt_tokens = sum(len(tok(format_prompt(r["prompt"], tok))["input_ids"])
                        for r in rows[:n_prompts]) * k
    step_tokens = prompt_tokens + statistics.median(tokens[1:] or tokens)
    return {"what": "TRL GRPOTrainer, bf16, loss_type=grpo, beta=0.04, same prompts, K, answer "
                    "length and reward as part grpo (transformers generate, KV cache)",
            "trl": trl.__version__, "n_parameters": n_params, "prompts": n_prompts, "k": k,
            "new_tokens": new_tokens, "tokens_per_step": step_tokens, "median_step_s": step,
            "steps_timed": len(times), "tokens_per_s": step_tokens / step,
            "peak_memory_gib": _peak_gib(device)}


def part_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rlcourse.models import format_prompt
    from rlcourse.preference import n_tokens, tokenize_pairs

    tok, config, device, rows = setup(args)
    policy = build(config, device)
    n_params = sum(p.numel() for p in policy.parameters())
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trl_rows = [{"prompt": format_prompt(r["prompt"], tok), "chosen": " " + r["chosen"],
                 "rejected": " " + r["rejected"]} for r in rows]
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        targs = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs,
            max_steps=args.warmup + args.steps + 1, learning_rate=1e-6,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=0.1,
            logging_steps=1, report_to=[], save_strategy="no", seed=0, max_length=4096,
            disable_tqdm=True, dataloader_num_workers=0, precompute_ref_log_probs=True,
            bf16=not args.smoke, use_cpu=args.smoke, optim="adamw_torch")
        trainer = DPOTrainer(model=policy, ref_model=None, args=targs,
                             train_dataset=Dataset.from_list(trl_rows), processing_class=tok,
                             callbacks=[Stamp()])
        first = trainer.train_dataset[0]
        ours = tokenize_pairs(tok, rows[:1], max_length=4096)[0]["chosen_input_ids"].tolist()
        same = first["prompt_ids"] + first["chosen_ids"] == ours if "prompt_ids" in first \
            else None
        _reset_peak(device)
        trainer.train()
    import trl

    times = _timed(stamps, args.warmup)
    median = statistics.median(times)
    tokens_per_step = n_tokens(tokenize_pairs(tok, rows, max_length=4096))
    tps = tokens_per_step / median
    return {"what": "TRL DPOTrainer, precompute_ref_log_probs=True, bf16, same rows",
            "trl": trl.__version__, "same_token_ids": same, "n_parameters": n_params,
            "tokens_per_step": tokens_per_step, "median_step_s": median,
            "steps_timed": len(times), "tokens_per_s": tps,
            "mfu": _mfu(n_params, tps, args.peak_tflops), "peak_memory_gib": _peak_gib(device)}


PARTS = {"env": part_env, "dpo": part_dpo, "dpo_lora": lambda a: part_dpo(a, lora=True),
         "grpo": part_grpo, "trl": part_trl, "trl_grpo": part_trl_grpo}


def merge(args) -> dict:
    parts = {}
    for name in PARTS:
        f = args.parts_dir / f"{name}.json"
        if f.exists():
            parts[name] = json.loads(f.read_text())
        else:
            parts[name] = {"status": "did not finish (timeout or crash; see its log)"}
    summary = {}
    for method, ours, theirs in (("dpo", parts.get("dpo", {}), parts.get("trl", {})),
                                 ("grpo", parts.get("grpo", {}), parts.get("trl_grpo", {}))):
        for key in ("tokens_per_s", "peak_memory_gib"):
            if ours.get(key) and theirs.get(key):
                summary[f"{method}_{key}_rlcourse_over_trl"] = ours[key] / theirs[key]
    for name in ("dpo", "dpo_lora"):
        part = parts.get(name, {})
        if part.get("peak_memory_gib") and part.get("predicted_peak_gib"):
            ratio = part["peak_memory_gib"] / part["predicted_peak_gib"]
            summary[f"{name}_memory_measured_over_predicted"] = ratio
            summary[f"{name}_memory_within_10_percent"] = abs(ratio - 1) <= 0.1
    return {"what": "GPU check: DPO and GRPO steps of a Qwen2.5-0.5B-sized model (random init) "
                    "in bf16, and TRL DPOTrainer on the same batch",
            "smoke": args.smoke, "peak_tflops_bf16_dense": args.peak_tflops,
            "mfu_formula": "6 * n_parameters * tokens_per_s / (peak_tflops * 1e12)",
            "pairs": args.pairs, "prompt_words": args.prompt_len,
            "completion_words": args.completion_len, "summary": summary, "parts": parts,
            "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=list(PARTS))
    p.add_argument("--merge", action="store_true")
    p.add_argument("--out", type=Path, help="the part's JSON (or gpu.json with --merge)")
    p.add_argument("--parts-dir", type=Path, help="with --merge: where the part files are")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128, help="prompt words (= tokens)")
    p.add_argument("--completion-len", type=int, default=383, help="answer words")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grpo-prompts", type=int, default=8)
    p.add_argument("--grpo-k", type=int, default=8)
    p.add_argument("--grpo-new-tokens", type=int, default=128)
    p.add_argument("--grpo-steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    args = p.parse_args(argv)
    if args.smoke:
        args.pairs, args.steps, args.warmup, args.grpo_steps = 4, 2, 1, 2
    if args.merge:
        result = merge(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from rlcourse.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1, default=str) + "\n")
        print(json.dumps(result["summary"]))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = {"status": "ok", **PARTS[args.part](args)}
    except Exception as err:  # noqa: BLE001 - record the failure, the other parts go on
        result = {"status": f"failed: {type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-4000:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from rlcourse.files import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=1, default=str) + "\n")
    print(args.part, result["status"])
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
