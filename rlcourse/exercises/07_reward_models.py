"""Exercises of chapter 7, "Reward models"."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from rlcourse import reward_model as rmod
from rlcourse.exercises import Case, Exercise, register
from rlcourse.exercises.solutions import build_reward_model
from rlcourse.losses import bradley_terry_loss

CHAPTER = "07_reward_models"


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ---- the Bradley-Terry loss --------------------------------------------------------------------
def _bt(chosen_rewards, rejected_rewards):
    return bradley_terry_loss(chosen_rewards, rejected_rewards).mean()


def _bt_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case((_t([0.0]), _t([0.0])), label="equal rewards: log 2"),
        Case((_t([2.0, -1.0]), _t([1.0, 1.0])), label="hand example"),
        Case((_t(rng.normal(size=8) * 3), _t(rng.normal(size=8) * 3)), label="random"),
        Case((_t([400.0, -400.0]), _t([-400.0, 400.0])), label="large margins: stay finite"),
    ]


register(Exercise(
    name="bradley_terry_loss",
    chapter=CHAPTER,
    reference=_bt,
    cases=_bt_cases,
    hint="mean of -log sigma(r_w - r_l); use F.logsigmoid for stability.",
    wrong_answers=[
        (lambda w, r: -F.logsigmoid(r - w).mean(), "reversed: the chosen reward comes first"),
        (lambda w, r: -torch.sigmoid(w - r).mean(), "forgot the log"),
        # the specific mistake first: on large margins both of these give inf
        (lambda w, r: -torch.log(torch.sigmoid(w - r)).mean(),
         "log(sigmoid(x)) is -inf for very negative x: use logsigmoid"),
        (lambda w, r: -torch.log(torch.sigmoid(w - r)).sum(), "sum instead of mean"),
    ],
))


# ---- the reward sits at the last real token ----------------------------------------------------
def _last_token_reward(token_scores, attention_mask):
    T = attention_mask.shape[1]
    last = T - 1 - attention_mask.long().flip(-1).argmax(-1)
    return token_scores[torch.arange(token_scores.shape[0]), last]


def _ltr_cases(rng: np.random.Generator) -> list[Case]:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    both = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    return [Case((_t(rng.normal(size=(2, 5))), m), label=name)
            for m, name in ((right, "right padding"), (left, "left padding"),
                            (both, "padding on both sides"))]


register(Exercise(
    name="reward_at_last_token",
    chapter=CHAPTER,
    reference=_last_token_reward,
    cases=_ltr_cases,
    hint="Find the index of the LAST 1 in each row of the mask (flip, argmax) and gather there.",
    wrong_answers=[
        (lambda s, m: s[:, -1], "read the last column: with right padding that is a pad token"),
        (lambda s, m: s[torch.arange(s.shape[0]), m.sum(-1) - 1],
         "mask.sum() - 1 is the last real token only with right padding"),
        (lambda s, m: (s * m).sum(-1) / m.sum(-1), "averaged over tokens: the RM reads one token"),
    ],
))


# ---- accuracy against the true ordering --------------------------------------------------------
def _acc_truth(rm_chosen, rm_rejected, true_chosen, true_rejected):
    return rmod.pair_accuracy(rm_chosen, rm_rejected, true_chosen, true_rejected)


def _acc_cases(rng: np.random.Generator) -> list[Case]:
    cases = [Case((np.array([3.0, 1.0, 5.0, 0.0]), np.array([1.0, 2.0, 2.0, 0.0]),
                   np.array([1.0, 0.0, 0.0, 2.0]), np.array([0.0, 1.0, 2.0, 2.0])),
                  label="hand example: a true tie is left out -> 2/3")]
    for n in (10, 30):
        true_c = rng.integers(-2, 3, size=n).astype(float)
        true_r = rng.integers(-2, 3, size=n).astype(float)
        rm_c = true_c + rng.normal(size=n)
        rm_r = true_r + rng.normal(size=n)
        rm_r[:3] = rm_c[:3]  # some model ties
        cases.append(Case((rm_c, rm_r, true_c, true_r), label=f"{n} pairs with ties"))
    return cases


def _acc_keep_ties(rc, rr, tc, tr):
    d, t = np.asarray(rc) - np.asarray(rr), np.asarray(tc) - np.asarray(tr)
    return float(np.mean((np.sign(d) == np.sign(t)) + 0.5 * (d == 0) * (t != 0)))


def _acc_labels(rc, rr, tc, tr):
    return rmod.pair_accuracy(rc, rr)


def _acc_strict(rc, rr, tc, tr):
    d, t = np.asarray(rc) - np.asarray(rr), np.asarray(tc) - np.asarray(tr)
    keep = t != 0
    return float(np.mean(np.sign(d[keep]) == np.sign(t[keep])))


register(Exercise(
    name="accuracy_vs_truth",
    chapter=CHAPTER,
    reference=_acc_truth,
    cases=_acc_cases,
    hint="Keep the pairs whose TRUE scores differ; count agreement of sign(r_c - r_r) with "
         "sign(s_c - s_r), a model tie counting 1/2.",
    wrong_answers=[
        (_acc_keep_ties, "pairs with equal true scores have no right answer: leave them out"),
        (_acc_labels, "that is the accuracy against the labels, not the truth"),
        (_acc_strict, "a model tie should count one half"),
    ],
))


# ---- build it yourself: a reward model, graded against the truth -------------------------------
RM_ACCURACY_BAR = 0.7


@functools.lru_cache(maxsize=1)
def _rm_data():
    """Chapter 7's split of the shipped pairs (15 % of the prompts held out, seed 0), and the
    true scores of the held-out answers."""
    from rlcourse.config import DATA_DIR
    from rlcourse.data import load_preferences
    from rlcourse.worlds.assistant import DEFAULT_WORLD

    pairs = load_preferences(DATA_DIR / "preferences.jsonl")
    train_pairs, test_pairs = rmod.split_pairs_by_prompt(pairs, 0.15, seed=0)
    truth = DEFAULT_WORLD.true_score
    true_chosen = [truth(p["prompt"], p["chosen"]) for p in test_pairs]
    true_rejected = [truth(p["prompt"], p["rejected"]) for p in test_pairs]
    return train_pairs, test_pairs, true_chosen, true_rejected


INVERTED = ("below 0.5 means your model orders more pairs the wrong way round than the right "
            "way: its ranking is inverted (chosen and rejected swapped, or the sign of the loss "
            "or of the score flipped); a model that ranked at random would get 0.5")


def grade_reward_model(fn) -> tuple[bool, str]:
    """``score = fn(train_pairs)``; then ``score(prompt, response)`` on both answers of the
    386 held-out pairs of chapter 7 (prompts never seen in training). Passes when the accuracy
    against the true ordering reaches 0.7 (chapter 7's small-GPT reward model: 0.808; the
    annotator's own labels: 0.873; a word-count model, the solution: about 0.77). An accuracy
    below 0.5 is reported as an inverted ranking."""
    train_pairs, test_pairs, true_chosen, true_rejected = _rm_data()
    score = fn([dict(p) for p in train_pairs])
    chosen = [float(score(p["prompt"], p["chosen"])) for p in test_pairs]
    rejected = [float(score(p["prompt"], p["rejected"])) for p in test_pairs]
    vs_truth = rmod.pair_accuracy(chosen, rejected, true_chosen, true_rejected)
    vs_labels = rmod.pair_accuracy(chosen, rejected)
    report = (f"on {len(test_pairs)} held-out pairs: accuracy against the true ordering "
              f"{vs_truth:.3f} (bar {RM_ACCURACY_BAR}), against the labels {vs_labels:.3f}")
    if vs_truth < 0.5:
        report += f"; {INVERTED}"
    return vs_truth >= RM_ACCURACY_BAR, report


# ---- the mechanism: does the model order the pairs it was trained on? -------------------------
RM_PROBE_PAIRS, RM_FIT_BAR = 120, 0.7


@functools.lru_cache(maxsize=1)
def _rm_probe_pairs():
    """The first 120 training pairs whose two answers have the same number of words: a length
    score ties on every one of them, so only what is *in* the answers can order them."""
    from rlcourse.worlds.assistant import tokens

    train_pairs = _rm_data()[0]
    same = [p for p in train_pairs if len(tokens(p["chosen"])) == len(tokens(p["rejected"]))]
    return same[:RM_PROBE_PAIRS]


def rm_mechanism(fn):
    """The unit check before the graded run: ``score = fn(pairs)`` on 120 training pairs whose
    answers have equal length must order those same pairs like their labels, accuracy at least
    0.7 (a Bradley-Terry model fits the pairs it is trained on: the solution 1.0, with 10 Adam
    steps in place of 300 still 0.86; a length score 0.5, every pair a tie; an inverted
    ranking 0.0)."""
    from rlcourse.exercises import Finding

    pairs = _rm_probe_pairs()
    score = fn([dict(p) for p in pairs])
    margins = np.array([float(score(p["prompt"], p["chosen"]))
                        - float(score(p["prompt"], p["rejected"])) for p in pairs])
    fit = float(np.mean((margins > 0) + 0.5 * (margins == 0)))
    if fit >= RM_FIT_BAR:
        return None
    message = (f"trained on {len(pairs)} pairs whose two answers have the same number of words, "
               f"your model orders those same pairs like their labels with accuracy {fit:.3f} "
               f"(a tie counts 1/2; the bar is {RM_FIT_BAR}: a Bradley-Terry model fits the "
               f"pairs it was trained on, the solution 1.0)")
    if fit < 0.5:
        message += f"; {INVERTED}"
    elif np.mean(margins == 0) > 0.5:
        message += "; most pairs are ties: the score does not depend on what the answers say"
    return Finding("fits_its_pairs", message + ".", np.sign(margins))


def _rm_evidence_distance(mine, theirs) -> float:
    """Share of the probe pairs the two models order differently (a match below 20 %)."""
    return float(np.mean(mine.evidence != theirs.evidence)) / 0.2


def _rm_reversed(pairs):
    return build_reward_model([{**p, "chosen": p["rejected"], "rejected": p["chosen"]}
                               for p in pairs])


def _rm_length(pairs):
    from rlcourse.worlds.assistant import tokens

    return lambda prompt, response: float(len(tokens(response)))


register(Exercise(
    name="build_reward_model",
    chapter=CHAPTER,
    reference=build_reward_model,
    solution=build_reward_model,
    cases=lambda rng: [],
    grade=grade_reward_model,
    mechanism=rm_mechanism,
    evidence_distance=_rm_evidence_distance,
    hint="Any model of r(prompt, response) trained on the pairs with the Bradley-Terry loss "
         "-log sigma(r_w - r_l). A linear model on word counts (DEFAULT_WORLD.vocabulary(), "
         "assistant.tokens) trained full batch with Adam is enough; return a function "
         "score(prompt, response) -> float.",
    wrong_answers=[
        (_rm_reversed, "its ranking is inverted: trained with chosen and rejected swapped (or "
                       "the sign of the loss or of the score flipped), it prefers the worse "
                       "answer"),
        (_rm_length, "scored by length: in this world the judge does not reward length"),
    ],
))
