"""The assistant world: grammar, prompts, the ground-truth judge (hand-scored examples), the
simulated annotator (Bradley–Terry formula written out), and the dataset generators."""

import math

import numpy as np
import pytest

from rlcourse.worlds.assistant import (
    DEFAULT_WORLD,
    TAXI_TASTE,
    Annotator,
    AssistantWorld,
    ResponseMix,
    ScoreWeights,
    label_agreement,
    pair_length_balance,
    preference_pairs,
    split_sentences,
    tokens,
    true_score,
    unpaired_from_pairs,
)

W = DEFAULT_WORLD
RAIN = "what do you know about rain?"  # a weather prompt


# ---- grammar and prompts ---------------------------------------------------------------------


def test_vocabulary_is_small_and_covers_every_sentence_and_prompt():
    vocab = set(W.vocabulary())
    assert 150 <= len(vocab) <= 260
    assert {".", "?"} <= vocab
    for text in W.sentences() + W.prompts():
        assert set(tokens(text)) <= vocab, text


def test_eight_topics_with_true_and_false_twins():
    assert len(W.topics) == 8
    for topic in W.topics:
        assert len(topic.facts) >= 5
        for true, false in topic.facts:
            assert true != false
            # a hallucination differs from its true twin in a word or two, not in topic
            assert len(set(tokens(true)) ^ set(tokens(false))) <= 4


def test_every_prompt_maps_to_its_topic():
    for topic in W.topics:
        for prompt in W.prompts(topic.name):
            assert W.topic_of(prompt) == topic.name
    assert W.topic_of("hello   what do you know about rain ?") == "weather"  # spacing-insensitive
    with pytest.raises(ValueError, match="names none"):
        W.topic_of("what is the meaning of life?")


def test_split_prompts_is_disjoint_balanced_and_seeded():
    train, evaluation = W.split_prompts(n_eval_per_topic=25, seed=0)
    assert not set(train) & set(evaluation)
    assert len(set(train)) + len(set(evaluation)) == len(W.prompts())
    assert len(evaluation) == 25 * 8
    for topic in W.topics:
        assert sum(W.topic_of(p) == topic.name for p in evaluation) == 25
    assert W.split_prompts(25, seed=0) == (train, evaluation)
    assert W.split_prompts(25, seed=1)[1] != evaluation


def test_split_sentences_handles_spacing_missing_period_and_empty_pieces():
    assert split_sentences("rain is wet. snow is cold.") == [
        ("rain is wet.", True),
        ("snow is cold.", True),
    ]
    assert split_sentences("rain is wet . snow is") == [("rain is wet.", True), ("snow is", False)]
    assert split_sentences("rain is wet. .") == [("rain is wet.", True), (".", True)]
    assert split_sentences("") == []


# ---- the judge, scored by hand ---------------------------------------------------------------
# Default weights: relevance 1 (full at 2 distinct true facts), false 1, rude 1, off-topic 0.5,
# repetition 0.5, garbled 0.5; each penalty applies once if the flaw is present.

HAND_SCORED = [
    ("rain is wet. snow is cold.", 1.0),
    ("rain is wet.", 0.5),
    ("", 0.0),
    ("let me explain. i hope this helps.", 0.0),
    ("rain is wet. rain is dry.", 0.5 - 1.0),
    ("rain is wet. rain is wet.", 0.5 - 0.5),  # repetition, and only one distinct fact
    ("rain is wet. snow is cold. you are dumb.", 1.0 - 1.0),
    ("rain is wet. snow is cold. poor people are lazy.", 1.0 - 1.0),
    ("rain is wet. snow is cold. a dog can bark.", 1.0 - 0.5),
    ("rain is wet. snow is cold. a dog can fly.", 1.0 - 1.0 - 0.5),  # false AND off-topic
    ("rain is wet. snow is cold. snow is", 1.0 - 0.5),  # unterminated: garbled
    ("rain rain is wet. snow is cold.", 0.5 - 0.5 - 0.5),  # garbled + word repeated
    ("snow is stupid.", 0.0 - 1.0 - 0.5),  # rude word inside garbled text
    ("rain is dry. snow is hot. rain is dry.", 0.0 - 1.0 - 0.5),
    ("rain is wet. snow is cold. you are dumb. a dog can bark. snow is hot. snow is hot.",
     1.0 - 1.0 - 1.0 - 0.5 - 0.5),
]


@pytest.mark.parametrize("response,expected", HAND_SCORED)
def test_true_score_on_hand_scored_examples(response, expected):
    assert W.true_score(RAIN, response) == pytest.approx(expected, abs=1e-12)
    assert true_score(RAIN, response) == pytest.approx(expected, abs=1e-12)


def test_breakdown_counts():
    b = W.score_breakdown(RAIN, "let me explain. rain is wet. a dog can fly. you are dumb. rain is")
    assert (b.n_sentences, b.n_true, b.n_false, b.n_off_topic) == (5, 1, 1, 1)
    assert (b.n_hedge, b.n_rude, b.n_biased, b.n_garbled) == (1, 1, 0, 1)
    assert b.n_tokens == 19
    assert b.relevance == 0.5 and not b.repetition
    assert b.has_false and b.has_rude and b.is_flawed and not b.has_repetition
    assert b.penalties == {
        "false_fact": 1.0, "rude": 1.0, "off_topic": 0.5, "repetition": 0.0, "garbled": 0.5
    }
    assert b.score == pytest.approx(0.5 - 3.0)


def test_decoded_and_spaced_text_score_the_same():
    assert W.true_score(RAIN, "rain is wet . snow is cold .") == 1.0
    assert W.score_breakdown(RAIN, "rain is wet.").n_tokens == 4


def test_best_response_is_optimal_at_every_length():
    for prompt in W.prompts()[::37]:
        for n in range(2, 7):
            best = W.best_response(prompt, n_facts=n, seed=n)
            assert W.true_score(prompt, best) == W.max_score() == 1.0
            assert len(split_sentences(best)) == n
            # hedges add length and cost nothing
            assert W.true_score(prompt, "let me explain. " + best + " i hope this helps.") == 1.0
    with pytest.raises(ValueError):
        W.best_response(RAIN, n_facts=0)


def test_a_flaw_said_twice_costs_no_more_than_once():
    once = W.true_score(RAIN, "rain is wet. snow is cold. snow is hot.")
    assert W.true_score(RAIN, "rain is wet. snow is hot. snow is cold. rain is dry.") == once


def test_weights_are_parameters():
    world = AssistantWorld(weights=ScoreWeights(false_fact=3.0, facts_for_full_relevance=3))
    assert world.true_score(RAIN, "rain is wet. snow is cold. rain is dry.") == pytest.approx(
        2 / 3 - 3.0
    )
    assert world.max_score() == 1.0


# ---- the annotator ---------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_probability_matches_the_formula():
    good, bad = "rain is wet. snow is cold.", "rain is wet. rain is dry."
    for t in (0.1, 0.25, 1.0):
        ann = Annotator(temperature=t)
        assert ann.prob_prefers(RAIN, good, bad) == pytest.approx(_sigmoid((1.0 - -0.5) / t))
        assert ann.prob_prefers(RAIN, bad, good) == pytest.approx(_sigmoid((-0.5 - 1.0) / t))
    noiseless = Annotator(temperature=0.0)
    assert noiseless.prob_prefers(RAIN, good, bad) == 1.0
    assert noiseless.prob_prefers(RAIN, bad, good) == 0.0
    assert noiseless.prob_prefers(RAIN, good, good) == 0.5


def test_length_bias_and_taste_enter_the_utility():
    short, long = "rain is wet. snow is cold.", "rain is wet. snow is cold. i hope this helps."
    assert W.true_score(RAIN, short) == W.true_score(RAIN, long)
    per_sentence = Annotator(temperature=0.5, length_bias=0.3)
    assert per_sentence.utility(RAIN, long) - per_sentence.utility(RAIN, short) == pytest.approx(
        0.3
    )
    assert per_sentence.prob_prefers(RAIN, long, short) == pytest.approx(_sigmoid(0.3 / 0.5))
    per_token = Annotator(temperature=0.5, length_bias=0.1, length_unit="token")
    assert per_token.utility(RAIN, long) - per_token.utility(RAIN, short) == pytest.approx(0.5)
    home = "how should i get home after work?"
    taxi, bus = "a taxi is fast. a map shows the way.", "a bus is cheap. a map shows the way."
    fussy = Annotator(temperature=0.25, taste=TAXI_TASTE)
    assert W.true_score(home, taxi) == W.true_score(home, bus) == 1.0
    assert fussy.prob_prefers(home, taxi, bus) == pytest.approx(_sigmoid(1.0 / 0.25))
    with pytest.raises(ValueError):
        Annotator(length_unit="word")


def test_labels_follow_the_probability_and_ties_are_skipped():
    good, bad = "rain is wet. snow is cold.", "rain is wet."
    ann = Annotator(temperature=0.5)
    rng = np.random.default_rng(0)
    n = 20_000
    share = np.mean([ann.label(RAIN, good, bad, rng) for _ in range(n)])
    p = _sigmoid(0.5 / 0.5)
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert ann.label(RAIN, good, "snow is cold. rain is wet.", rng) is None
    coin = Annotator(temperature=0.5, skip_ties=False)
    assert coin.label(RAIN, good, "snow is cold. rain is wet.", rng) in (True, False)


def test_preference_pairs_drop_identical_and_tied_pairs():
    prompts = [RAIN] * 4
    a = ["rain is wet. snow is cold.", "rain is wet.", "rain is dry.", "snow is cold. rain is wet."]
    b = ["rain is wet. snow is cold.", "rain is wet. snow is cold.", "rain is wet.",
         "rain is wet. snow is cold."]
    pairs = preference_pairs(prompts, a, b, Annotator(temperature=0.0))
    assert pairs == [
        {"prompt": RAIN, "chosen": "rain is wet. snow is cold.", "rejected": "rain is wet."},
        {"prompt": RAIN, "chosen": "rain is wet.", "rejected": "rain is dry."},
    ]
    assert label_agreement(pairs) == {"agreement": 1.0, "true_ties": 0.0, "n": 2.0}
    assert preference_pairs([RAIN], ["rain is wet."], [" "], Annotator()) == []
    kept = preference_pairs([RAIN], ["rain is wet."], [""], Annotator(temperature=0.0),
                            drop_empty=False)
    assert kept == [{"prompt": RAIN, "chosen": "rain is wet.", "rejected": ""}]
    with pytest.raises(ValueError, match="differ in length"):
        preference_pairs(prompts, a, b[:2], Annotator())


def test_unpaired_split_and_class_balance():
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(100)]
    every = unpaired_from_pairs(pairs, desirable_fraction=None, seed=0)
    assert len(every) == 200 and sum(r["label"] for r in every) == 100
    for r in every:
        assert r["completion"][0] == ("c" if r["label"] else "r")
        assert r["completion"][1:] == r["prompt"][1:]
    for p, n_good, n_bad in ((0.5, 100, 100), (0.8, 100, 25), (0.2, 25, 100), (0.1, 11, 100)):
        records = unpaired_from_pairs(pairs, desirable_fraction=p, seed=1)
        labels = [r["label"] for r in records]
        assert (sum(labels), len(labels) - sum(labels)) == (n_good, n_bad)
    with pytest.raises(ValueError):
        unpaired_from_pairs(pairs, desirable_fraction=1.0)


# ---- generators ------------------------------------------------------------------------------


def test_sampled_responses_are_grammatical_and_seeded():
    grammar = set(W.sentences())
    train, _ = W.split_prompts()
    rng = np.random.default_rng(0)
    for prompt in train[:200]:
        response = W.sample_response(prompt, rng)
        assert all(t and s in grammar for s, t in split_sentences(response))
    assert W.sample_response(RAIN, 7) == W.sample_response(RAIN, 7)


def test_sft_mix_has_the_intended_shares_of_flaws():
    train, _ = W.split_prompts()
    mix = ResponseMix()
    data = W.sft_dataset(train, 4000, seed=0, mix=mix)
    assert set(data[0]) == {"prompt", "completion"}
    b = [W.score_breakdown(d["prompt"], d["completion"]) for d in data]
    # a false fact survives unless a later flaw replaced it; the share is a little below p_false
    assert 0.8 * mix.p_false < np.mean([x.has_false for x in b]) <= mix.p_false + 0.02
    assert 0.8 * mix.p_rude < np.mean([x.has_rude for x in b]) <= mix.p_rude + 0.02
    assert 0.8 * mix.p_repeat < np.mean([x.has_repetition for x in b]) <= mix.p_repeat + 0.02
    assert np.mean([x.n_garbled for x in b]) == 0
    assert 0.3 < np.mean([not x.is_flawed for x in b]) < 0.7  # room to improve on SFT


def test_length_and_quality_are_decoupled_in_generated_pairs():
    train, _ = W.split_prompts()
    rng = np.random.default_rng(3)
    prompts = train * 4
    a = [W.sample_response(p, rng) for p in prompts]
    b = [W.sample_response(p, rng) for p in prompts]
    pairs = preference_pairs(prompts, a, b, Annotator(temperature=0.0), seed=0)
    balance = pair_length_balance(pairs)
    # The truly better answer is the longer one about half of the time. (The grammar leans a
    # little towards "longer is better", because flaws replace facts; the SFT model's own
    # repetitions lengthen its bad answers and balance the pairs sampled from it, which
    # tests/test_shipped_data.py checks on the shipped pairs.)
    assert 0.42 < balance["better_longer"] < 0.6
    assert abs(balance["mean_len_chosen"] - balance["mean_len_rejected"]) < 1.5  # of ~19 words


def test_pretraining_corpus_uses_grammar_and_only_the_given_prompts():
    train, evaluation = W.split_prompts()
    docs = W.pretraining_corpus(300, seed=0, prompts=train)
    grammar = set(W.sentences())
    questions = 0
    for doc in docs:
        opening = [p for p in train if doc.startswith(p + " ")]
        if opening:  # the document opens with a training question
            questions += 1
            doc = doc[len(max(opening, key=len)) + 1 :]
        assert not any(doc.startswith(p + " ") for p in evaluation)
        assert all(t and s in grammar for s, t in split_sentences(doc)), doc
    assert 0.15 < questions / len(docs) < 0.45
    assert W.pretraining_corpus(5, seed=1) == W.pretraining_corpus(5, seed=1)


# ---- fresh prompts: new phrasings, seeded, with disjoint splits ------------------------------


def test_original_prompts_and_generators_are_unchanged():
    """Other chapters' numbers rest on these outputs: the fresh-prompt generator only adds."""
    import hashlib

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    assert sha("\n".join(W.prompts())) == (
        "5c84df4110750eb4d53044cf111a90273b0e9f8c0de85d66212d80d2467884f1")
    train, evaluation = W.split_prompts(25, seed=0)
    assert sha("\n".join(train) + "|" + "\n".join(evaluation)) == (
        "7b009b096134f9870a6b60cbeab5f3738c2569d62a9f9d5cd1afb1d2c996f75b")
    answers = [W.sample_response(p, seed=i) for i, p in enumerate(W.prompts()[::7])]
    assert sha("\n".join(answers)) == (
        "3fb7a3128034fa47c189bbe5640e8d92632e2fcc41d134895e904737c37cc7c2")


def test_fresh_prompt_splits_never_share_a_prompt_whatever_the_seeds():
    from rlcourse.worlds.assistant import FRESH_SPLITS, prompt_split

    drawn = {name: set() for name in FRESH_SPLITS}
    for name in FRESH_SPLITS:
        for seed in (0, 1, 2):
            prompts = W.fresh_prompts(name, 300, seed=seed)
            assert len(set(prompts)) == 300  # distinct within a draw
            assert all(prompt_split(p) == name for p in prompts)
            drawn[name] |= set(prompts)
    names = list(FRESH_SPLITS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not drawn[a] & drawn[b], (a, b)
    # none is one of the original 804 prompts the shipped data and checkpoints were built from
    assert not set().union(*drawn.values()) & set(W.prompts())
    # the split is a function of the text alone (spacing-insensitive, like topic_of)
    p = next(iter(drawn["test"]))
    assert prompt_split(p.replace(" ", "  ")) == "test"
    with pytest.raises(ValueError, match="split must be"):
        W.fresh_prompts("dev", 1)


def test_fresh_prompts_are_seeded_balanced_and_in_the_vocabulary():
    a = W.fresh_prompts("validation", 160, seed=7)
    assert W.fresh_prompts("validation", 160, seed=7) == a
    assert W.fresh_prompts("validation", 160, seed=8) != a
    # a longer draw starts with the shorter one: the stream is endless and seeded
    assert W.fresh_prompts("validation", 400, seed=7)[:160] == a
    vocab = set(W.vocabulary())
    for p in a:
        assert set(tokens(p)) <= vocab, p
    topics = [W.topic_of(p) for p in a]
    assert all(topics.count(t.name) == 20 for t in W.topics)  # blocks of all eight topics
    # new phrasings, not only new combinations of the old pieces
    old_bodies = {b for t in W.topics for b in W._topic_prompts(t)}
    assert sum(not any(p.endswith(b) for b in old_bodies) for p in a) > 100


def test_fresh_prompt_names_its_topic():
    rng = np.random.default_rng(0)
    for topic in W.topics:
        for _ in range(50):
            assert W.topic_of(W.fresh_prompt(topic.name, rng, p_two=0.5)) == topic.name


def test_one_request_phrasings_per_topic_number_as_the_docstring_says():
    from rlcourse.worlds.assistant import FRESH_OPENERS, FRESH_TEMPLATES

    rng = np.random.default_rng(0)
    topic = W.topics[0]
    k = len(topic.keywords)
    seen = {W.fresh_prompt(topic.name, rng, p_two=0.0) for _ in range(40_000)}
    assert len(seen) == len(FRESH_OPENERS) * len(FRESH_TEMPLATES) * (k + k * (k - 1)) == 1728
