"""Learning from the policy's own samples (rlcourse.online) on tiny models.

Oracles: labellers and rewards written in the test (a preference for one word), exact argmax,
brute-force enumeration of every n-subset, a numerical integral of the best-of-n density, and
functional forms fitted to data generated from known parameters.
"""

from __future__ import annotations

import ast
import copy
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlcourse import online, ppo
from rlcourse.grpo import GroupConfig, train_group_lm
from rlcourse.models import build_model, build_tokenizer, encode_prompt_completion
from rlcourse.worlds.assistant import tokens

torch.set_num_threads(1)

WORDS = ["apple", "pear", "plum", "fig", "is", "good", "."]
PROMPTS = ["name a fruit", "say a fruit", "tell a fruit", "give a fruit"]
TARGET = "apple"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS + " ".join(PROMPTS).split())


def tiny(tok, seed=0):
    return build_model(tok, n_layers=1, hidden_size=32, n_heads=2, seed=seed)


def target_share(model, tok, n=64, seed=123) -> float:
    """Share of the target word among the words the model says (its own samples)."""
    from rlcourse.models import generate

    texts = generate(model, tok, PROMPTS * (n // len(PROMPTS)), max_new_tokens=6, seed=seed).texts
    words = [w for t in texts for w in tokens(t)]
    return sum(w == TARGET for w in words) / max(1, len(words))


def first_token_logprob(model, tok, word: str) -> float:
    """Mean over prompts of log pi(word as the first answer token | prompt)."""
    enc = encode_prompt_completion(tok, PROMPTS, [word] * len(PROMPTS), 32)
    ids, att, comp = enc["input_ids"], enc["attention_mask"], enc["completion_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
    first = comp.float().argmax(1)  # first completion position
    rows = torch.arange(ids.shape[0])
    logp = torch.log_softmax(logits[rows, first - 1], -1)[rows, ids[rows, first]]
    return float(logp.mean())


def count_target(prompts, texts) -> np.ndarray:
    return np.array([tokens(t).count(TARGET) for t in texts], dtype=np.float64)


def prefers_target(prompts, a, b):
    """A noiseless labeller: the answer with more target words wins, equal counts skipped."""
    ca, cb = count_target(prompts, a), count_target(prompts, b)
    return [None if x == y else bool(x > y) for x, y in zip(ca, cb, strict=True)]


# --------------------------------------------------------------------------------------------
# labellers
# --------------------------------------------------------------------------------------------
def test_label_pairs_orders_by_verdict_and_drops_what_carries_no_preference():
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    a = ["x y", "same", "", "u", "k"]
    b = ["z", "same", "w", "v", "m"]
    verdicts = {"x y": True, "u": False, "k": None}
    seen = []

    def label_fn(ps, xs, ys):
        seen.extend(xs)
        return [verdicts[x] for x in xs]

    pairs = online.label_pairs(prompts, a, b, label_fn)
    # identical and empty answers are never shown to the labeller; None is skipped
    assert seen == ["x y", "u", "k"]
    assert pairs == [{"prompt": "p1", "chosen": "x y", "rejected": "z"},
                     {"prompt": "p4", "chosen": "v", "rejected": "u"}]
    with pytest.raises(ValueError, match="2 verdicts for 3 pairs"):
        online.label_pairs(prompts, a, b, lambda ps, xs, ys: [True, False])


def test_reward_labeller_prefers_the_higher_reward_and_skips_ties():
    label = online.reward_labeller(count_target)
    assert label(["q"] * 3, ["apple apple", "pear", "apple"], ["apple", "apple", "fig"]) == [
        True, False, True]
    assert label(["q"], ["pear"], ["fig"]) == [None]


def test_labeller_draws_from_one_seeded_generator():
    class Coin:  # stands in for the annotator: prefers a with probability 1/2
        def label(self, prompt, a, b, rng):
            return bool(rng.random() < 0.5)

    first = online.labeller(Coin(), seed=3)(["q"] * 50, ["a"] * 50, ["b"] * 50)
    again = online.labeller(Coin(), seed=3)(["q"] * 50, ["a"] * 50, ["b"] * 50)
    other = online.labeller(Coin(), seed=4)(["q"] * 50, ["a"] * 50, ["b"] * 50)
    expected = (np.random.default_rng(3).random(50) < 0.5).tolist()
    assert first == again == expected and other != first


def test_online_module_never_sees_the_judge():
    """The methods learn from label_fn / reward_fn only: rlcourse.online imports no world, no
    evaluation and no true score (they would let a method peek at the judge)."""
    src = Path(online.__file__).read_text()
    tree = ast.parse(src)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [m for m in imported if "worlds" in m or "evaluation" in m], imported
    code = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
    code += [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    assert "true_score" not in code and "score_breakdown" not in code


# --------------------------------------------------------------------------------------------
# online DPO
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference", ["sft", "previous"])
def test_online_dpo_with_a_labeller_that_prefers_a_word_raises_its_probability(tok, reference):
    model = tiny(tok)
    before = first_token_logprob(model, tok, TARGET)
    share_before = target_share(model, tok)
    cfg = online.OnlineDPOConfig(rounds=3, beta=0.5, lr=3e-3, epochs=2, batch_size=16,
                                 max_new_tokens=6, reference=reference)
    rows = online.online_dpo(model, tok, PROMPTS * 16, prefers_target, cfg, seed=0)
    assert len(rows) == 3 and all(r["n_pairs"] > 0 for r in rows)
    assert first_token_logprob(model, tok, TARGET) > before + 0.5
    assert target_share(model, tok) > share_before + 0.1


def test_online_dpo_follows_the_labels_not_any_hidden_truth(tok):
    """The opposite labeller pushes the word down: the labels alone decide the direction."""
    model = tiny(tok)
    before = first_token_logprob(model, tok, TARGET)

    def avoids_target(ps, a, b):
        return [None if v is None else not v for v in prefers_target(ps, a, b)]

    cfg = online.OnlineDPOConfig(rounds=2, beta=0.5, lr=3e-3, epochs=2, batch_size=16,
                                 max_new_tokens=6)
    online.online_dpo(model, tok, PROMPTS * 16, avoids_target, cfg, seed=0)
    assert first_token_logprob(model, tok, TARGET) < before - 0.5


def test_online_dpo_samples_from_the_current_policy_each_round(tok):
    """Round k's pairs come from the policy after round k-1: the labeller sees the target word
    more often in later rounds."""
    model = tiny(tok)
    seen = []

    def spy(ps, a, b):
        seen.append(float(np.mean(np.concatenate([count_target(ps, a), count_target(ps, b)]))))
        return prefers_target(ps, a, b)

    cfg = online.OnlineDPOConfig(rounds=3, beta=0.5, lr=3e-3, epochs=2, batch_size=16,
                                 max_new_tokens=6)
    online.online_dpo(model, tok, PROMPTS * 16, spy, cfg, seed=0)
    assert seen[2] > seen[0] + 0.2


def test_online_dpo_rejects_an_unknown_reference(tok):
    with pytest.raises(ValueError, match="reference: must be one of sft, previous"):
        online.OnlineDPOConfig(reference="ref")


# --------------------------------------------------------------------------------------------
# best-of-n and rejection sampling
# --------------------------------------------------------------------------------------------
def test_best_of_n_picks_the_reward_argmax_exactly(tok):
    model = tiny(tok)

    def reward(prompts, texts):  # distinct values: a hash of the text
        return np.array([(hash(t) % 9973) / 9973 + 0.001 * i for i, t in enumerate(texts)])

    bon = online.best_of_n(model, tok, PROMPTS, 5, reward, seed=1, max_new_tokens=6)
    assert bon.rewards.shape == (4, 5) and len(bon.texts) == 4
    flat_texts = [t for row in bon.texts for t in row]
    flat_r = reward(None, flat_texts).reshape(4, 5)
    empty = np.array([[not t.strip() for t in row] for row in bon.texts])
    flat_r[empty] = -np.inf
    for i in range(4):
        j = int(np.argmax(flat_r[i]))
        assert bon.best[i] == j and bon.best_texts[i] == bon.texts[i][j]
        assert bon.best_rewards[i] == flat_r[i, j] == bon.rewards[i].max()


def test_best_of_n_never_picks_an_empty_answer_when_another_exists(tok):
    model = tiny(tok)
    bon = online.best_of_n(model, tok, PROMPTS, 6, lambda p, t: -count_target(p, t), seed=2,
                           max_new_tokens=3)
    for row, best in zip(bon.texts, bon.best_texts, strict=True):
        assert best.strip() or not any(t.strip() for t in row)


def test_rejection_sampling_ft_raises_the_rewarded_word(tok):
    model = tiny(tok)
    before = first_token_logprob(model, tok, TARGET)
    rows = online.rejection_sampling_ft(
        model, tok, PROMPTS * 8, count_target,
        online.RSFTConfig(rounds=2, n=6, lr=3e-3, epochs=2, batch_size=16, max_new_tokens=6),
        seed=0)
    assert rows[1]["mean_best_reward"] > rows[0]["mean_reward"]
    assert first_token_logprob(model, tok, TARGET) > before + 0.5


# --------------------------------------------------------------------------------------------
# GRPO / RLOO on a language model
# --------------------------------------------------------------------------------------------
def test_group_loop_answers_each_prompt_in_consecutive_rows(tok):
    """The group baseline needs each prompt's K answers side by side: the reward function sees
    ``n_prompts`` distinct prompts, each ``group_size`` times in consecutive rows."""
    seen = []

    def reward(prompts, completions):
        seen.append(list(prompts))
        return [0.0] * len(completions)

    cfg = GroupConfig(group_size=3, n_prompts=2)
    train_group_lm(tiny(tok), tok, PROMPTS, reward, cfg, n_steps=2, lr=1e-3, seed=0,
                   max_new_tokens=4, device="cpu", progress=False)
    for prompts in seen:
        assert len(prompts) == 6
        groups = [prompts[3 * g:3 * g + 3] for g in range(2)]
        assert all(len(set(group)) == 1 for group in groups)
        assert groups[0][0] != groups[1][0]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_methods_with_a_word_reward_raise_its_probability(tok, advantage):
    """GRPO and RLOO of a language model go through the one group loop,
    :func:`rlcourse.grpo.train_group_lm`, with a text reward (here: the target word's count)."""
    model = tiny(tok)
    ref = ppo.freeze(copy.deepcopy(model))
    before = first_token_logprob(model, tok, TARGET)

    def reward(prompts, completions):  # target words in the answer
        return [float(c.split().count(TARGET)) for c in completions]

    cfg = GroupConfig(advantage=advantage, group_size=6, n_prompts=4, kl_coef=0.01, epochs=1)
    hist = train_group_lm(model, tok, PROMPTS, reward, cfg, n_steps=15, lr=3e-3, seed=0,
                          max_new_tokens=6, ref_model=ref, device="cpu", progress=False)
    assert "kl_k3" in hist[0]
    assert first_token_logprob(model, tok, TARGET) > before + 0.5


# --------------------------------------------------------------------------------------------
# over-optimisation: KL of best-of-n, unbiased best-of-n estimates, the fits
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 64])
def test_best_of_n_kl_matches_the_integral_of_its_density(n):
    u = (np.arange(200_000) + 0.5) / 200_000  # midpoint rule on [0, 1]
    log_dens = math.log(n) + (n - 1) * np.log(u)
    integral = float(np.mean(np.exp(log_dens) * log_dens))
    assert online.best_of_n_kl(n) == pytest.approx(integral, abs=2e-4)
    assert online.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert online.best_of_n_kl(1) == 0.0


def test_best_of_n_kl_matches_a_discrete_exact_kl():
    """N equally likely outcomes with distinct rewards: best-of-n puts mass
    (i^n - (i-1)^n)/N^n on the i-th; its KL to uniform tends to log n - (n-1)/n."""
    big, n = 100_000, 4
    i = np.arange(1, big + 1, dtype=np.float64)
    q = (i / big) ** n - ((i - 1) / big) ** n
    kl = float(np.sum(q * np.log(q * big)))
    assert online.best_of_n_kl(n) == pytest.approx(kl, abs=1e-3)


def test_best_of_n_expectation_equals_the_average_over_every_subset():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for n in (1, 2, 3, 7):
        brute = []
        for row in range(3):
            vals = [gold[row, list(s)][np.argmax(proxy[row, list(s)])]
                    for s in itertools.combinations(range(7), n)]
            brute.append(np.mean(vals))
        assert np.allclose(online.best_of_n_expectation(proxy, gold, n), brute)
    assert np.allclose(online.best_of_n_expectation(proxy, gold, 1), gold.mean(1))
    with pytest.raises(ValueError, match="n must be in 1..7"):
        online.best_of_n_expectation(proxy, gold, 8)


def test_fits_recover_known_parameters_and_peaks():
    d = np.linspace(0.2, 3.0, 15)
    a, b = online.fit_bon(d, d * (0.8 - 0.3 * d))
    assert (a, b) == pytest.approx((0.8, 0.3))
    assert online.peak_bon(a, b) == pytest.approx(0.8 / 0.6)
    a, b = online.fit_rl(d, d * (0.5 - 0.4 * np.log(d)))
    assert (a, b) == pytest.approx((0.5, 0.4))
    grid = np.linspace(0.01, 10, 200_001)
    assert online.peak_rl(a, b) == pytest.approx(grid[np.argmax(grid * (a - b * np.log(grid)))],
                                                 abs=1e-3)
    with pytest.raises(ValueError, match="d = sqrt"):
        online.fit_rl([0.0, 1.0], [0.0, 1.0])


# --------------------------------------------------------------------------------------------
# the benchmark's summary: means over seeds, reruns replace, quick rows and other keys untouched
# --------------------------------------------------------------------------------------------
def test_benchmark_summary_of_runs(tmp_path):
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_online_methods.py"
    spec = importlib.util.spec_from_file_location("run_online_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(method, seed, wr, se, quick=False, base="online_dpo"):
        r = {k: 0.0 for k in bench.METRICS}
        r.update(method=method, base_method=base, seed=seed, quick=quick, win_rate=wr,
                 win_rate_stderr=se, train_seconds=10.0, settings={"labels_from": "annotator"},
                 history=[{"round": 0}])
        return r

    runs = [row("online_dpo", 0, 0.9, 0.1), row("online_dpo", 0, 0.6, 0.03),  # rerun wins
            row("online_dpo", 1, 0.7, 0.04), row("online_dpo", 2, 0.1, 0.5, quick=True),
            row("x_here", 0, 0.5, 0.01)]
    runs_file = tmp_path / "runs.jsonl"
    runs_file.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = tmp_path / "side_by_side.json"
    out.write_text(json.dumps({"methods": {"dpo": 1}, "sft": 2}))
    bench.summarise(runs_file, out)
    result = json.loads(out.read_text())
    assert result["methods"] == {"dpo": 1} and result["sft"] == 2
    m = result["online_methods"]["methods"]
    s = m["online_dpo"]["summary"]
    assert s["n_seeds"] == 2 and s["seeds"] == [0, 1]
    assert s["win_rate"] == pytest.approx(0.65)
    assert s["win_rate_stderr_of_mean"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)
    assert "history" not in m["online_dpo"]["runs"][0]
    assert m["x_here"]["label"].endswith("[x_here]")


# --------------------------------------------------------------------------------------------
# online DPO with every paired loss of the objectives table
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss, kwargs, passed", [
    ("dpo", {}, {"beta": 0.5}),
    ("ipo", {"tau": 0.3}, {"tau": 0.3}),            # no beta: IPO's strength is tau
    ("rdpo", {"alpha": 0.05}, {"beta": 0.5, "alpha": 0.05}),
    ("orpo", {"lam": 0.2}, {"lam": 0.2}),
    ("simpo", {"gamma": 0.5}, {"beta": 0.5, "gamma": 0.5}),
])
def test_online_rounds_train_every_paired_loss_with_its_own_hyperparameters(
        tok, monkeypatch, loss, kwargs, passed):
    seen = {}
    real = online.train_preference

    def spy(method, *args, **kw):
        seen["method"] = method
        seen["hp"] = {k: v for k, v in kw.items() if k in ("beta", "tau", "alpha", "lam",
                                                             "gamma")}
        return real(method, *args, **kw)

    monkeypatch.setattr(online, "train_preference", spy)
    model = tiny(tok)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = online.OnlineDPOConfig(rounds=1, epochs=1, batch_size=4, max_new_tokens=4, loss=loss,
                                 loss_kwargs=kwargs)
    rows = online.online_dpo(model, tok, PROMPTS * 2, prefers_target, cfg)
    assert rows[0]["n_pairs"] > 0
    assert seen == {"method": loss, "hp": passed}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_online_rounds_refuse_unpaired_losses_and_unknown_hyperparameters():
    with pytest.raises(ValueError, match="loss: must be a paired preference loss"):
        online.OnlineDPOConfig(loss="kto")
    with pytest.raises(ValueError, match="loss_kwargs: must be keys of ipo's hyperparameters "
                                         r"\(length_normalize, tau\); unknown: lam"):
        online.OnlineDPOConfig(loss="ipo", loss_kwargs={"lam": 0.1})


# --------------------------------------------------------------------------------------------
# conversational prompts (TRL's lists of messages)
# --------------------------------------------------------------------------------------------
CONVERSATIONS = [[{"role": "user", "content": p}] for p in PROMPTS]


def test_online_rounds_take_conversational_prompts_and_give_rewards_text(tok):
    """Before, the sampled answers (text) were paired with message-list prompts and rendering
    the rows raised "Chat messages should be dicts"; and a reward function was handed lists of
    messages where its signature promises strings."""
    seen = []

    def reward(prompts, texts):
        seen.extend(prompts)
        return [float(t.split().count(TARGET)) for t in texts]

    model = tiny(tok)
    cfg = online.OnlineDPOConfig(rounds=1, epochs=1, batch_size=4, max_new_tokens=4)
    rows = online.online_dpo(model, tok, CONVERSATIONS * 2, online.reward_labeller(reward), cfg)
    assert rows[0]["round"] == 0 and set(seen) <= set(PROMPTS) and seen
    seen.clear()
    rsft = online.rejection_sampling_ft(tiny(tok), tok, CONVERSATIONS, reward,
                                        online.RSFTConfig(rounds=1, n=4, epochs=1, batch_size=4,
                                                          max_new_tokens=4))
    assert rsft[0]["round"] == 0 and set(seen) == set(PROMPTS)


def test_a_conversational_pair_is_rendered_like_a_plain_one(tok):
    pairs = online.label_pairs(CONVERSATIONS[:1], ["apple is good ."], ["fig ."],
                               lambda p, a, b: [True])
    assert pairs == [{"prompt": CONVERSATIONS[0],
                      "chosen": [{"role": "assistant", "content": "apple is good ."}],
                      "rejected": [{"role": "assistant", "content": "fig ."}]}]


def test_group_methods_give_rewards_the_prompt_text_of_a_conversation(tok):
    from rlcourse import grpo

    seen = []

    def reward(prompts, texts):
        seen.extend(prompts)
        return [float(t.split().count(TARGET)) for t in texts]

    cfg = GroupConfig(group_size=2, n_prompts=2)
    grpo.train_group_lm(tiny(tok), tok, CONVERSATIONS, reward, cfg, n_steps=1, lr=1e-3,
                        max_new_tokens=4, device="cpu", progress=False)
    assert len(seen) == 4 and all(isinstance(p, str) and p in PROMPTS for p in seen)
