"""Reward models: the engine's loss by hand, the metrics by hand, and a tiny model that learns
a hidden ordering from noisy-free pairs."""

import math

import numpy as np
import torch

from rlcourse import reward_model as rmod
from rlcourse.data import pad_collate


class _LastTokenId(torch.nn.Module):
    """A fake reward model: r = w * (the last real token id)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, ids, mask):
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        return self.w * ids[torch.arange(ids.shape[0]), last].float()


def test_reward_loss_fn_by_hand_and_reads_the_last_real_token():
    items = [
        {"chosen_input_ids": torch.tensor([1, 4]), "chosen_attention_mask": torch.tensor([1, 1]),
         "rejected_input_ids": torch.tensor([1, 2, 3]),
         "rejected_attention_mask": torch.tensor([1, 1, 1])},
        {"chosen_input_ids": torch.tensor([2]), "chosen_attention_mask": torch.tensor([1]),
         "rejected_input_ids": torch.tensor([5, 6]),
         "rejected_attention_mask": torch.tensor([1, 1])},
    ]
    batch = pad_collate(items)  # padding is 0 and must not be read as the last token
    loss, m = rmod.reward_loss_fn(_LastTokenId(), batch)
    # rewards: chosen 0.5*4 = 2, 0.5*2 = 1; rejected 0.5*3 = 1.5, 0.5*6 = 3
    expected = (math.log1p(math.exp(-(2 - 1.5))) + math.log1p(math.exp(-(1 - 3)))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(float(m["accuracy"]), 0.5)
    assert math.isclose(float(m["margin"]), ((2 - 1.5) + (1 - 3)) / 2)


def test_pair_accuracy_and_correlations_by_hand():
    assert rmod.pair_accuracy([3, 1, 2, 0], [1, 2, 2, -1]) == (1 + 0 + 0.5 + 1) / 4
    # vs truth: pair 3 has a true tie and is left out; pair 2 is ordered against the truth
    acc = rmod.pair_accuracy([3, 1, 5, 0], [1, 2, 2, 0], [1, 0, 0, 2], [0, 1, 2, 2])
    assert acc == 2 / 3
    assert math.isclose(rmod.spearman([1, 2, 3, 4], [10, 20, 25, 100]), 1.0)
    assert math.isclose(rmod.spearman([1, 2, 3], [3, 2, 1]), -1.0)
    # ties get averaged ranks: x ranks [1.5, 1.5, 3], y ranks [1, 2, 3]
    expected = np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]
    assert math.isclose(rmod.spearman([7, 7, 9], [1, 2, 3]), expected)
    assert math.isclose(rmod.pearson([1, 2, 3], [2, 4, 6]), 1.0)


def test_split_pairs_by_prompt_is_disjoint():
    pairs = [{"prompt": f"p{i % 10}", "chosen": "a", "rejected": "b"} for i in range(50)]
    train, test = rmod.split_pairs_by_prompt(pairs, 0.2, seed=1)
    assert len(train) + len(test) == 50 and len(test) == 10
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}


def test_tiny_reward_model_learns_a_hidden_score():
    from rlcourse.data import tokenize_preferences
    from rlcourse.engine import TrainConfig, train
    from rlcourse.models import RewardModel, build_tokenizer

    words = ["good", "bad", "fine", "dull", "the", "day", "was"]
    tok = build_tokenizer(words + ["tell me"])
    rng = np.random.default_rng(0)

    def score(text):  # the hidden truth: +1 per "good", -1 per "bad"
        return text.split().count("good") - text.split().count("bad")

    def sample():
        return " ".join(rng.choice(words, size=int(rng.integers(2, 6))))

    pairs = []
    while len(pairs) < 360:
        a, b = sample(), sample()
        if score(a) != score(b):
            w, l = (a, b) if score(a) > score(b) else (b, a)
            pairs.append({"prompt": f"tell me {len(pairs) % 20}", "chosen": w, "rejected": l})
    train_pairs, test_pairs = pairs[:300], pairs[300:]
    rm = RewardModel.build(tok, seed=0, n_layers=1, hidden_size=32, n_heads=2,
                           max_position_embeddings=32)
    cfg = TrainConfig(lr=3e-3, epochs=4, batch_size=32, progress=False, device="cpu",
                      log_every=5)
    hist = train(rm, rmod.reward_loss_fn, tokenize_preferences(tok, train_pairs, 32), cfg)
    assert hist.last("loss") < math.log(2)
    ev = rmod.RewardEvaluation.of(rm, tok, test_pairs, lambda p, y: score(y), max_length=32)
    assert ev.accuracy_vs_truth >= 0.8 and ev.label_accuracy_vs_truth == 1.0
    assert ev.spearman_vs_truth > 0.5
