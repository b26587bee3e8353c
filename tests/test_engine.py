"""Tests for rlcourse.engine: resume equals an uninterrupted run, accumulation equals a big batch,
one step equals a plain PyTorch step, schedules follow their formulas, config and history I/O."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pytest
import torch

from rlcourse.data import pad_collate, tokenize_sft
from rlcourse.engine import EpochSampler, History, NonFiniteError, TrainConfig, sft_loss_fn, train
from rlcourse.models import RewardModel, build_model, build_tokenizer

matplotlib.use("Agg")
torch.set_num_threads(1)

WORDS = "what is a river ? the river is long . a cat is small and a dog is big , hello world"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([WORDS])


@pytest.fixture(scope="module")
def items(tok):
    prompts = ["what is a river?", "hello", "a cat?", "a dog?", "what is a cat?"]
    comps = ["the river is long.", "hello world", "a cat is small.", "a dog is big.",
             "a cat is small and a dog is big."]
    rows = [{"prompt": prompts[i % 5], "completion": comps[(i * 3) % 5]} for i in range(20)]
    return tokenize_sft(tok, rows, 32)


def _model(tok, seed=0):
    return build_model(tok, hidden_size=32, n_layers=2, n_heads=4, seed=seed)


def _cfg(**kw):
    base = dict(lr=1e-2, batch_size=4, grad_accum_steps=1, max_steps=6, log_every=1,
                progress=False, warmup_steps=0, schedule="constant", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def noisy_loss(model, batch):
    """SFT loss with random per-example weights: the result depends on the torch RNG, so a
    resumed run only matches if the RNG state was restored."""
    from rlcourse.models import sequence_logprobs

    lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                           batch["completion_mask"], reduce="mean")
    w = torch.rand(lp.shape[0])
    return -(w * lp).mean(), {"w": w.mean()}


def test_resume_after_crash_equals_uninterrupted(tok, items, tmp_path):
    # 20 examples, batch 4, accumulation 2: 5 micro-batches -> 3 optimizer steps per epoch
    # (the last with one micro-batch), so checkpoints fall mid-epoch and at epoch ends.
    cfg = dict(max_steps=11, batch_size=4, grad_accum_steps=2, checkpoint_every=4,
               schedule="cosine", warmup_steps=2)
    ref = _model(tok)
    h_ref = train(ref, noisy_loss, items, _cfg(**cfg))

    class Crash(Exception):
        pass

    def crash_at_6(step, history, model):
        if step == 6:
            raise Crash

    run_dir = tmp_path / "ck"
    first = _model(tok)
    with pytest.raises(Crash):
        train(first, noisy_loss, items, _cfg(**cfg, checkpoint_dir=str(run_dir)),
              callbacks=[crash_at_6])
    assert sorted(p.name for p in run_dir.iterdir()) == ["step-00000004"]
    fresh = _model(tok)  # a new process: fresh weights, everything else from the checkpoint
    torch.manual_seed(999)  # and a different global RNG state
    h = train(fresh, noisy_loss, items, _cfg(**cfg, checkpoint_dir=str(run_dir)))
    for k, v in _params(ref).items():
        assert torch.allclose(dict(fresh.named_parameters())[k], v, atol=1e-6, rtol=0), k
    assert [r["step"] for r in h.rows] == list(range(1, 12))
    assert [r["loss"] for r in h.rows] == pytest.approx([r["loss"] for r in h_ref.rows],
                                                        abs=1e-6)
    # A third call finds the finished run and returns at once with the same weights.
    again = _model(tok, seed=5)
    h2 = train(again, noisy_loss, items, _cfg(**cfg, checkpoint_dir=str(run_dir)))
    assert h2.last("step") == 11
    for k, v in _params(ref).items():
        assert torch.allclose(dict(again.named_parameters())[k], v, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_size"):
        train(_model(tok), noisy_loss, items,
              _cfg(**{**cfg, "batch_size": 2}, checkpoint_dir=str(run_dir)))


def test_grad_accumulation_1x8_equals_8x1(tok, items):
    def loss(model, batch):
        return sft_loss_fn(model, batch, reduction="sequence")

    big = _model(tok)
    train(big, loss, items[:16], _cfg(batch_size=8, grad_accum_steps=1, max_steps=2))
    small = _model(tok)
    train(small, loss, items[:16], _cfg(batch_size=1, grad_accum_steps=8, max_steps=2))
    for k, v in _params(big).items():
        assert torch.allclose(dict(small.named_parameters())[k], v, atol=1e-5), k


def test_token_mean_with_accumulation_equals_one_big_batch(tok, items):
    # The default SFT loss is a mean over all completion tokens of the optimizer step. Items of
    # unequal length make micro-batch token means differ from it: the engine must hand
    # sft_loss_fn the step's token count, summed over its micro-batches.
    big = _model(tok)
    h_big = train(big, sft_loss_fn, items[:16], _cfg(batch_size=8, grad_accum_steps=1,
                                                     max_steps=2))
    small = _model(tok)
    h_small = train(small, sft_loss_fn, items[:16], _cfg(batch_size=2, grad_accum_steps=4,
                                                         max_steps=2))
    for k, v in _params(big).items():
        torch.testing.assert_close(dict(small.named_parameters())[k], v, rtol=0, atol=1e-5)
    # the logged loss (mean over micro-batches) is the big batch's token mean too
    assert h_small.series("loss")[1] == pytest.approx(h_big.series("loss")[1], abs=1e-6)
    assert h_small.series("nll_per_token")[1] == pytest.approx(h_big.series("loss")[1],
                                                               abs=1e-6)


def test_one_step_equals_plain_pytorch(tok, items):
    # Oracle: the textbook loop without accelerate. Whole dataset in one batch (order-free),
    # no clipping, constant lr, no weight decay.
    data = items[:8]
    m_engine = _model(tok)
    train(m_engine, sft_loss_fn, data,
          _cfg(batch_size=8, max_steps=1, max_grad_norm=None, lr=1e-3))
    m_plain = _model(tok)
    opt = torch.optim.AdamW(m_plain.parameters(), lr=1e-3, weight_decay=0.0)
    batch = pad_collate(data)
    labels = batch["input_ids"].clone()
    labels[batch["completion_mask"] == 0] = -100  # the Hugging Face convention
    out = m_plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=labels)
    out.loss.backward()
    opt.step()
    for k, v in _params(m_plain).items():
        assert torch.allclose(dict(m_engine.named_parameters())[k], v, atol=1e-6), k


def test_sft_loss_matches_huggingface_labels(tok, items):
    model = _model(tok)
    batch = pad_collate(items[:5])
    labels = batch["input_ids"].clone()
    labels[batch["completion_mask"] == 0] = -100
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=labels).loss
        ours, metrics = sft_loss_fn(model, batch)
        assert ours.item() == pytest.approx(hf.item(), abs=1e-5)
        assert float(metrics["ppl"]) == pytest.approx(math.exp(hf.item()), rel=1e-5)
        # per-sequence reduction: mean over examples of each example's token mean
        per = []
        for i in range(5):
            lab = labels[i : i + 1]
            per.append(model(input_ids=batch["input_ids"][i : i + 1],
                             attention_mask=batch["attention_mask"][i : i + 1],
                             labels=lab).loss.item())
        seq, _ = sft_loss_fn(model, batch, reduction="sequence")
        assert seq.item() == pytest.approx(sum(per) / 5, abs=1e-5)


def test_every_trainable_parameter_changes_and_frozen_ones_do_not(tok, items):
    rm = RewardModel.build(tok, hidden_size=32, n_layers=2, seed=0)
    rm.model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = _params(rm)

    def bt_like(model, batch):
        r = model(batch["input_ids"], batch["attention_mask"])
        return -torch.nn.functional.logsigmoid(r).mean(), {}

    train(rm, bt_like, items, _cfg(lr=0.1, max_steps=3))
    for k, p in rm.named_parameters():
        if p.requires_grad:
            assert not torch.allclose(p, before[k]), f"{k} did not change"
        else:
            assert torch.equal(p, before[k]), f"frozen {k} changed"


def test_repeatable_with_same_seed_and_not_with_another(tok, items):
    runs = []
    for seed in (0, 0, 1):
        m = _model(tok)
        h = train(m, sft_loss_fn, items, _cfg(seed=seed, max_steps=4))
        runs.append((_params(m), [r["loss"] for r in h.rows]))
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]  # another seed, another data order


def test_epoch_sampler_is_a_seeded_permutation():
    s = EpochSampler(10, seed=3)
    a = list(s)
    assert sorted(a) == list(range(10)) and list(s) == a
    s.set_epoch(1)
    assert list(s) != a and sorted(s) == list(range(10))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_and_schedule_follow_the_formula(tok, items, schedule):
    lr, W, T = 0.01, 2, 6
    h = train(_model(tok), sft_loss_fn, items,
              _cfg(lr=lr, warmup_steps=W, max_steps=T, schedule=schedule))

    def expected(k):  # the learning rate used for step k+1, logged after step k
        if k < W:
            return lr * k / W
        frac = (k - W) / (T - W)
        return {"cosine": lr * 0.5 * (1 + math.cos(math.pi * frac)),
                "linear": lr * (1 - frac),
                "constant": lr}[schedule]

    steps, lrs = h.series("lr")
    assert steps == list(range(1, T + 1))
    assert lrs == pytest.approx([expected(k) for k in steps], abs=1e-12)


def test_epochs_count_eval_hook_and_callback_stop(tok, items):
    seen = []

    def eval_fn(model):
        seen.append(model.training)
        return {"eval_score": 1.5}

    h = train(_model(tok), sft_loss_fn, items,
              _cfg(max_steps=None, epochs=2, batch_size=4, grad_accum_steps=2, eval_every=4,
                   log_every=2), eval_fn=eval_fn)
    assert h.last("step") == 6  # ceil(5 micro-batches / 2) = 3 steps per epoch, 2 epochs
    assert h.series("eval_score")[0] == [4, 6]  # every 4 steps and at the end
    assert seen == [False, False]  # eval mode during evaluation
    assert h.series("loss")[0] == [2, 4, 6]
    row = h.last()
    for key in ("lr", "grad_norm", "epoch", "tokens_per_s", "peak_mem_mb", "nll_per_token"):
        assert key in row
    h = train(_model(tok), sft_loss_fn, items, _cfg(max_steps=10),
              callbacks=[lambda step, hist, m: step == 3])
    assert h.last("step") == 3


def test_config_from_dict_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 5.0e-4\nbatch_size: 16\nschedule: linear\nbetas: [0.9, 0.95]\n")
    c = TrainConfig.from_yaml(p)
    assert (c.lr, c.batch_size, c.schedule, c.betas) == (5e-4, 16, "linear", (0.9, 0.95))
    assert TrainConfig.from_dict(c.to_dict()) == c
    p.write_text("lr: 1.0\nlearning_rate: 2.0\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown TrainConfig keys \['learning_rate'\]"):
        TrainConfig.from_yaml(p)


def test_history_rows_last_and_plot():
    h = History()
    h.log(1, loss=2.0)
    h.log(2, loss=1.0)
    h.log(2, eval_score=0.5)
    assert h.to_rows() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "eval_score": 0.5}]
    assert h.last("loss") == 1.0 and h.last("missing") is None
    assert h.series("eval_score") == ([2], [0.5])
    ax = h.plot(["loss", "eval_score"])
    assert len(ax.lines) == 2


def test_clear_errors_for_no_batches_and_nan_loss(tok, items):
    with pytest.raises(ValueError, match="no batches"):
        train(_model(tok), sft_loss_fn, items[:3], _cfg(batch_size=4, drop_last=True))

    def nan_loss(model, batch):
        loss, m = sft_loss_fn(model, batch)
        return loss * float("nan"), m

    with pytest.raises(FloatingPointError, match="step 1"):
        train(_model(tok), nan_loss, items, _cfg())


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tok, items,
                                                                             tmp_path):
    """A loss that turns NaN at the third step: the error names the step and the checkpoint of
    step 2 (written before) stays the newest; step 3's NaN never reaches weights or disk."""
    calls = []

    def nan_at_third(model, batch):
        loss, m = sft_loss_fn(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), m

    model = _model(tok)
    with pytest.raises(NonFiniteError, match=r"loss is nan at optimizer step 3.*step-00000002"):
        train(model, nan_at_third, items, _cfg(checkpoint_every=1, checkpoint_dir=str(tmp_path)))
    assert [p.name for p in sorted(tmp_path.glob("step-*"))] == ["step-00000001",
                                                                 "step-00000002"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_infinite_lr_never_writes_a_nan_checkpoint(tok, items, tmp_path):
    """lr = inf turns the weights to NaN in the first update while the first loss is finite:
    without the weight check the step-1 checkpoint (and the final model) would be all NaN."""
    config = _cfg(checkpoint_every=1, checkpoint_dir=str(tmp_path))
    config.lr = float("inf")  # past TrainConfig's range check: the guard must hold regardless
    with pytest.raises(NonFiniteError, match="non-finite weights .* optimizer step 1"):
        train(_model(tok), sft_loss_fn, items, config)
    assert not list(tmp_path.glob("step-*"))


# --------------------------------------------------------------------------------------------
# Watching a run: history.jsonl as it trains, evaluation, TensorBoard, honest tokens/s
# --------------------------------------------------------------------------------------------
def _jsonl(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_history_jsonl_is_appended_as_training_goes_with_evaluation_in_its_row(tok, items,
                                                                             tmp_path):
    seen = []

    def look(step, history, model):  # what a reader of the file sees during training
        seen.append([r["step"] for r in _jsonl(tmp_path / "history.jsonl")])

    def eval_fn(model):
        return {"eval_score": 1.0}

    h = train(_model(tok), sft_loss_fn, items, _cfg(max_steps=4, logging_dir=str(tmp_path),
                                                    eval_every=2),
              eval_fn=eval_fn, callbacks=[look])
    assert seen == [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]
    rows = _jsonl(tmp_path / "history.jsonl")
    assert rows == h.rows  # one line per step, evaluation metrics in the row of their step
    assert [("eval_score" in r) for r in rows] == [False, True, False, True]


def test_history_jsonl_after_a_crash_and_resume_has_each_step_once(tok, items, tmp_path):
    cfg = dict(max_steps=7, checkpoint_every=3, checkpoint_dir=str(tmp_path / "ck"),
               logging_dir=str(tmp_path))

    def crash_at_5(step, history, model):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_model(tok), sft_loss_fn, items, _cfg(**cfg), callbacks=[crash_at_5])
    assert [r["step"] for r in _jsonl(tmp_path / "history.jsonl")] == [1, 2, 3, 4, 5]
    h = train(_model(tok), sft_loss_fn, items, _cfg(**cfg))  # resumes from step 3
    rows = _jsonl(tmp_path / "history.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows == h.rows


def test_tokens_per_second_counts_real_tokens_over_training_step_time_only(tok, items,
                                                                         monkeypatch):
    """A fake clock: every micro-batch takes 1 s, every evaluation 100 s. tokens_per_s must be
    the non-padding tokens of the row's batches over the seconds of those steps alone."""
    import types

    import rlcourse.engine as engine

    clock = types.SimpleNamespace(t=0.0)
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
    real_tokens = []

    def timed_loss(model, batch):
        clock.t += 1.0
        real_tokens.append(int(batch["attention_mask"].sum()))
        return sft_loss_fn(model, batch)

    def slow_eval(model):
        clock.t += 100.0
        return {"eval_x": 0.0}

    # 16 examples, batch 4, accumulation 2: 2 micro-batches per step; rows every 2 steps.
    h = train(_model(tok), timed_loss, items[:16], _cfg(max_steps=4, grad_accum_steps=2,
                                                    log_every=2, eval_every=1),
              eval_fn=slow_eval)
    assert len(real_tokens) == 8
    assert h.series("tokens_per_s")[1] == [sum(real_tokens[:4]) / 4.0,
                                           sum(real_tokens[4:]) / 4.0]
    assert h.totals == {"tokens": sum(real_tokens), "step_seconds": 8.0}
    padded = sum(int(b.numel()) for b in [pad_collate(items[i:i + 4])["attention_mask"]
                                          for i in range(0, 16, 4)])
    assert sum(real_tokens) < 2 * padded  # padding is not counted


def test_tensorboard_receives_the_rows(tok, items, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = train(_model(tok), sft_loss_fn, items, _cfg(max_steps=3, logging_dir=str(tmp_path),
                                                    report_to="tensorboard"))
    files = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert files, list(tmp_path.rglob("*"))
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in h.rows]
    with pytest.raises(ValueError, match="needs a logging_dir"):
        train(_model(tok), sft_loss_fn, items, _cfg(max_steps=1, report_to="tensorboard"))


def test_loss_eval_fn_is_the_mean_over_examples(tok, items):
    from rlcourse.engine import loss_eval_fn

    def loss(model, batch):
        return sft_loss_fn(model, batch, reduction="sequence")

    model = _model(tok)
    per_example = [loss(model, pad_collate([it]))[0].item() for it in items[:7]]
    got = loss_eval_fn(loss, items[:7], batch_size=3)(model)
    assert got["eval_loss"] == pytest.approx(sum(per_example) / 7, abs=1e-6)


def test_train_config_booleans_must_be_booleans(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1.0e-3\ndrop_last: 'false'\n")  # a string: truthy, would drop batches
    with pytest.raises(ValueError, match=r"c.yaml: TrainConfig.drop_last must be true or false"):
        TrainConfig.from_yaml(p)


def test_check_resumed_settings_refuses_what_changed_and_allows_what_may():
    from rlcourse.engine import check_resumed_settings

    saved = {"lr": 1e-3, "n_steps": 10, "betas": [0.9, 0.99]}
    ckpt = Path("runs/x/step-00000004")
    # unchanged (a tuple is saved as a list in state.json); more steps at a constant rate
    check_resumed_settings(ckpt, saved, {"lr": 1e-3, "n_steps": 10, "betas": (0.9, 0.99)})
    check_resumed_settings(ckpt, saved, {"lr": 1e-3, "n_steps": 20, "betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match=r"step-00000004 was written with other settings \(lr\)"):
        check_resumed_settings(ckpt, saved, {**saved, "lr": 2e-3})
    # a decaying rate is shaped by the step count: more steps is another run
    with pytest.raises(ValueError, match=r"\(n_steps\)"):
        check_resumed_settings(ckpt, saved, {**saved, "n_steps": 20}, decay="linear")
    # a setting added later: an old checkpoint had its default, and only that default resumes
    check_resumed_settings(ckpt, saved, {**saved, "warmup_steps": 0}, {"warmup_steps": 0})
    with pytest.raises(ValueError, match=r"\(warmup_steps\)"):
        check_resumed_settings(ckpt, saved, {**saved, "warmup_steps": 5}, {"warmup_steps": 0})
    check_resumed_settings(ckpt, None, {"lr": 9.0})  # a checkpoint that recorded no settings
