"""The assistant world: a toy world the small GPT lives in, with a hidden ground-truth judge.

The world has eight topics. Each topic has prompts (questions a user may ask) and a small
knowledge base of *facts*: every fact comes as a true sentence and a false twin that differs in
one or two words ("rain is wet." / "rain is dry."). A response is a sequence of sentences from a
grammar of six kinds:

=============  ==============================================  =========================
kind           example                                          what the judge thinks
=============  ==============================================  =========================
true fact      ``snow is cold.``  (topic of the prompt)        relevant, wanted
false fact     ``snow is hot.``                                a hallucination
off-topic      ``a dog can bark.`` (prompt about space)         not what was asked
hedge          ``let me explain.``                             neutral filler
rude           ``that is a stupid question.``                  rude words
biased         ``poor people are lazy.``                       a biased statement
=============  ==============================================  =========================

plus what a model may make up: *garbled* text (word salad that is no sentence of the grammar)
and *repetition* (a sentence said twice, or a word twice in a row).

The ground-truth judge, :meth:`AssistantWorld.true_score`, rewards what the lecture slides ask
for (relevant, no repetition, no false facts, no rude words) and is **indifferent to length**:
it looks at which kinds of sentence are *present*, never at how many there are, so the best
score is reached by a two-sentence answer as well as by a six-sentence one. A simulated
:class:`Annotator` turns the hidden score into noisy Bradley–Terry preference labels, with an
optional length bias and an individual taste (the slides' "a taxi is better than a bus").

Everything here is pure Python and NumPy; every random choice takes a seed or a
``numpy.random.Generator``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from rlcourse.data import pairs_to_unpaired

__all__ = [
    "Annotator",
    "AssistantWorld",
    "Breakdown",
    "DEFAULT_WORLD",
    "FRESH_SPLITS",
    "ResponseMix",
    "ScoreWeights",
    "TAXI_TASTE",
    "Topic",
    "join_words",
    "label_agreement",
    "pair_length_balance",
    "preference_pairs",
    "prompt_split",
    "split_sentences",
    "tokens",
    "true_score",
    "unpaired_from_pairs",
]

SeedLike = int | np.random.Generator | None
_PUNCT = re.compile(r"([.,!?;:])")
_SPACE_PUNCT = re.compile(r" ([.,!?;:])")


def _rng(seed: SeedLike) -> np.random.Generator:
    """A ``numpy`` generator from an int seed, or the generator itself."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# The knowledge base
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topic:
    """A topic: the words a prompt uses to name it, questions, and (true, false) fact pairs."""

    name: str
    keywords: tuple[str, ...]
    questions: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]

    @property
    def true_facts(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.facts)

    @property
    def false_facts(self) -> tuple[str, ...]:
        return tuple(f for _, f in self.facts)


TOPICS: tuple[Topic, ...] = (
    Topic(
        "weather",
        ("the weather", "rain", "snow", "storms"),
        ("will it rain today?",),
        (
            ("rain is wet.", "rain is dry."),
            ("snow is cold.", "snow is hot."),
            ("a storm brings thunder.", "a storm brings silence."),
            ("clouds are made of water.", "clouds are made of stone."),
            ("fog makes it hard to see.", "fog makes it easy to see."),
            ("summer is warm.", "summer is cold."),
        ),
    ),
    Topic(
        "cooking",
        ("cooking", "food", "baking", "the kitchen"),
        ("what should i cook tonight?",),
        (
            ("bread is baked in an oven.", "bread is baked in a fridge."),
            ("salt makes food salty.", "salt makes food sweet."),
            ("sugar is sweet.", "sugar is bitter."),
            ("water boils when it is hot.", "water boils when it is cold."),
            ("a knife is sharp.", "a knife is soft."),
            ("eggs come from chickens.", "eggs come from cows."),
        ),
    ),
    Topic(
        "travel",
        ("travel", "trains", "trips", "the airport"),
        ("how should i get home after work?", "how can i go to another city?"),
        (
            ("a taxi is fast.", "a taxi is free."),
            ("a bus is cheap.", "a bus is expensive."),
            ("a train runs on rails.", "a train runs on water."),
            ("a plane flies in the sky.", "a plane flies under the sea."),
            ("a map shows the way.", "a map hides the way."),
            ("a ship sails on the sea.", "a ship sails on the road."),
        ),
    ),
    Topic(
        "animals",
        ("animals", "dogs", "birds", "pets"),
        ("what animal should i get?",),
        (
            ("a dog can bark.", "a dog can fly."),
            ("a cat likes fish.", "a cat likes rocks."),
            ("birds have wings.", "birds have wheels."),
            ("a fish lives in water.", "a fish lives in trees."),
            ("a cow eats grass.", "a cow eats stones."),
            ("an elephant is big.", "an elephant is small."),
        ),
    ),
    Topic(
        "sports",
        ("sports", "football", "tennis", "running"),
        ("how can i get fit?",),
        (
            ("football is played with a ball.", "football is played with a spoon."),
            ("a runner needs strong legs.", "a runner needs strong ears."),
            ("tennis is played with a racket.", "tennis is played with a fork."),
            ("swimming happens in water.", "swimming happens in sand."),
            ("a team has many players.", "a team has one player."),
            ("the winner gets a prize.", "the loser gets a prize."),
        ),
    ),
    Topic(
        "health",
        ("health", "sleep", "doctors", "exercise"),
        ("how can i stay healthy?",),
        (
            ("sleep helps the body rest.", "sleep makes the body weak."),
            ("water keeps you healthy.", "water makes you sick."),
            ("a doctor helps sick people.", "a doctor makes people sick."),
            ("fruit has vitamins.", "fruit has no vitamins."),
            ("exercise makes the heart strong.", "exercise makes the heart weak."),
            ("washing hands stops germs.", "washing hands spreads germs."),
        ),
    ),
    Topic(
        "music",
        ("music", "songs", "the piano", "guitars"),
        ("what music should i learn?",),
        (
            ("a piano has keys.", "a piano has wings."),
            ("a guitar has strings.", "a guitar has wheels."),
            ("a drum makes a loud sound.", "a drum makes no sound."),
            ("a song has a melody.", "a song has no melody."),
            ("a choir sings together.", "a choir sings under water."),
            ("music can make people happy.", "music can make people fly."),
        ),
    ),
    Topic(
        "space",
        ("space", "the stars", "the moon", "planets"),
        ("what is in the sky at night?",),
        (
            ("the sun is a star.", "the sun is a planet."),
            ("the moon goes around the earth.", "the earth goes around the moon."),
            ("mars is a red planet.", "mars is a green planet."),
            ("stars are very far away.", "stars are very close."),
            ("space is dark and cold.", "space is bright and warm."),
            ("an astronaut flies in a rocket.", "an astronaut flies in a balloon."),
        ),
    ),
)

#: Words that open a prompt (the empty opener means none).
OPENERS: tuple[str, ...] = ("", "hello", "please", "hey")
#: Prompt templates; ``{k}`` is a topic keyword.
TEMPLATES: tuple[str, ...] = (
    "tell me about {k}",
    "what do you know about {k}?",
    "can you explain {k}?",
    "i have a question about {k}",
    "write something about {k}",
    "what is true about {k}?",
)
#: Neutral filler: the judge neither rewards nor punishes it (it only adds length).
HEDGES: tuple[str, ...] = (
    "let me explain.",
    "here is what i know.",
    "that is a good question.",
    "i think so.",
    "i hope this helps.",
)
#: Rude sentences; each contains a word of :data:`RUDE_WORDS`.
RUDE: tuple[str, ...] = (
    "that is a stupid question.",
    "only an idiot asks this.",
    "you are dumb.",
)
#: Biased statements about groups of people (the slides' "discrimination").
BIASED: tuple[str, ...] = (
    "poor people are lazy.",
    "old people are useless.",
    "only boys can play sports.",
)
#: Words that make a response rude wherever they occur, inside grammatical sentences or not.
RUDE_WORDS: frozenset[str] = frozenset({"stupid", "idiot", "dumb", "lazy", "useless"})
#: An annotator's individual taste, after the slides' example: going home by taxi "is better"
#: than by bus, a preference we do not want the model to learn (both facts are true).
TAXI_TASTE: dict[str, float] = {"taxi": 0.5, "bus": -0.5}

#: Openers of fresh prompts (:meth:`AssistantWorld.fresh_prompts`): the four of :data:`OPENERS`
#: and two pairs of them.
FRESH_OPENERS: tuple[str, ...] = OPENERS + ("hello please", "hey please")
#: Request templates of fresh prompts: the six of :data:`TEMPLATES` and twelve new phrasings.
#: They use only words of the world's vocabulary (so a tokenizer built on it knows every word)
#: and none of a topic's keywords (so :meth:`AssistantWorld.topic_of` finds the topic).
FRESH_TEMPLATES: tuple[str, ...] = TEMPLATES + (
    "tell me something about {k}",
    "can you tell me about {k}?",
    "what can you tell me about {k}?",
    "what should i know about {k}?",
    "what do you think about {k}?",
    "explain {k} to me",
    "how can i learn about {k}?",
    "let me know what is true about {k}",
    "write something true about {k}",
    "tell me what is true about {k}",
    "i have a question about {k}. what is true?",
    "what is good about {k}?",
)
#: The splits of fresh prompts and the share of the prompt space each one owns: a prompt's
#: split is a function of its text alone (:func:`prompt_split`), so no two splits can ever
#: share a prompt, whatever seeds draw them.
FRESH_SPLITS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.5), "validation": (0.5, 0.75), "test": (0.75, 1.0)}


def prompt_split(prompt: str) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) a prompt text belongs to.

    u = (first 8 bytes of SHA-256 of the normalised text) / 2^64 ∈ [0, 1), and the split is
    the one of :data:`FRESH_SPLITS` whose interval holds u. A function of the text alone: the
    same phrasing lands in the same split on every machine, in every run, for every seed.
    """
    text = join_words(tokens(prompt))
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64
    for name, (lo, hi) in FRESH_SPLITS.items():
        if lo <= u < hi:
            return name
    raise AssertionError(u)  # pragma: no cover (the intervals cover [0, 1))


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the hidden score (see :meth:`AssistantWorld.true_score`)."""

    relevance: float = 1.0
    false_fact: float = 1.0
    rude: float = 1.0
    off_topic: float = 0.5
    repetition: float = 0.5
    garbled: float = 0.5
    #: Distinct true on-topic facts needed for full relevance.
    facts_for_full_relevance: int = 2


@dataclass(frozen=True)
class Breakdown:
    """What the judge found in a response, and the score it gives (see ``true_score``)."""

    topic: str
    n_sentences: int
    n_tokens: int
    n_true: int
    n_distinct_true: int
    n_false: int
    n_off_topic: int
    n_hedge: int
    n_rude: int
    n_biased: int
    n_garbled: int
    repetition: bool
    relevance: float
    penalties: dict[str, float]
    score: float

    @property
    def has_false(self) -> bool:
        """A false fact (hallucination) is present."""
        return self.n_false > 0

    @property
    def has_rude(self) -> bool:
        """Rude words or a biased statement are present."""
        return self.n_rude + self.n_biased > 0

    @property
    def has_repetition(self) -> bool:
        """A sentence is said twice, or a word twice in a row."""
        return self.repetition

    @property
    def is_flawed(self) -> bool:
        """Any penalty applies (false, rude or biased, off-topic, repetition, garbled)."""
        return any(v > 0 for v in self.penalties.values())

    def as_dict(self) -> dict:
        """The fields as a plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class _Sentence:
    kind: str  # "true", "false", "hedge", "rude", "biased"
    topic: str | None


def tokens(text: str) -> list[str]:
    """The words of a text, punctuation split off as its own word (``"wet."`` → ``wet``, ``.``),
    the way the book's word-level tokenizer splits it."""
    return _PUNCT.sub(r" \1 ", text).split()


def join_words(words: Iterable[str]) -> str:
    """Words back to text, no space before punctuation: ``rain is wet .`` → ``rain is wet.``"""
    return _SPACE_PUNCT.sub(r"\1", " ".join(words))


def split_sentences(response: str) -> list[tuple[str, bool]]:
    """Split a response at its ``.`` tokens: a list of ``(sentence, terminated)``.

    Sentences come back normalised (``"rain is wet."``). A trailing piece without ``.`` is kept
    with ``terminated=False`` (a model stopped mid-sentence); ``"wet. ."`` yields an empty
    sentence ``"."``.
    """
    pieces: list[tuple[str, bool]] = []
    words: list[str] = []
    for word in tokens(response):
        if word == ".":
            pieces.append((join_words(words + ["."]), True))
            words = []
        else:
            words.append(word)
    if words:
        pieces.append((join_words(words), False))
    return pieces


class AssistantWorld:
    """The toy assistant world: prompts, a sentence grammar, the judge and data generators.

    The knowledge base is fixed (it does not depend on a seed); randomness enters only through
    the generators, which take a seed or a ``numpy.random.Generator``.
    """

    def __init__(
        self,
        topics: Sequence[Topic] = TOPICS,
        openers: Sequence[str] = OPENERS,
        templates: Sequence[str] = TEMPLATES,
        hedges: Sequence[str] = HEDGES,
        rude: Sequence[str] = RUDE,
        biased: Sequence[str] = BIASED,
        rude_words: Iterable[str] = RUDE_WORDS,
        weights: ScoreWeights | None = None,
    ) -> None:
        self.topics = tuple(topics)
        self.openers = tuple(openers)
        self.templates = tuple(templates)
        self.hedges = tuple(hedges)
        self.rude = tuple(rude)
        self.biased = tuple(biased)
        self.rude_words = frozenset(rude_words)
        self.weights = weights or ScoreWeights()
        self.topic_by_name = {t.name: t for t in self.topics}
        self._sentences: dict[str, _Sentence] = {}
        for topic in self.topics:
            for true, false in topic.facts:
                self._add(true, _Sentence("true", topic.name))
                self._add(false, _Sentence("false", topic.name))
        for kind, group in (("hedge", self.hedges), ("rude", self.rude), ("biased", self.biased)):
            for sentence in group:
                self._add(sentence, _Sentence(kind, None))
        self._prompt_topic: dict[str, str] = {}
        for topic in self.topics:
            for prompt in self._topic_prompts(topic):
                self._prompt_topic[prompt] = topic.name
        self._keyword_topic = {
            k.split()[-1]: t.name for t in self.topics for k in t.keywords
        }

    def _add(self, sentence: str, info: _Sentence) -> None:
        if join_words(tokens(sentence)) != sentence or not sentence.endswith("."):
            raise ValueError(f"sentence {sentence!r} must be normalised text ending with '.'")
        if sentence in self._sentences:
            raise ValueError(f"sentence {sentence!r} appears twice in the grammar")
        self._sentences[sentence] = info

    # ---- prompts ---------------------------------------------------------------------------

    def _topic_prompts(self, topic: Topic) -> list[str]:
        bodies = [t.format(k=k) for t in self.templates for k in topic.keywords]
        bodies += list(topic.questions)
        return [f"{o} {b}".strip() for o in self.openers for b in bodies]

    def prompts(self, topic: str | None = None) -> list[str]:
        """All prompts of the world (or of one topic), in a fixed order."""
        topics = [self.topic_by_name[topic]] if topic else self.topics
        return [p for t in topics for p in self._topic_prompts(t)]

    def topic_of(self, prompt: str) -> str:
        """The topic a prompt asks about (by exact prompt, else by its keyword)."""
        prompt = join_words(tokens(prompt))
        if prompt in self._prompt_topic:
            return self._prompt_topic[prompt]
        for word in tokens(prompt):
            if word in self._keyword_topic:
                return self._keyword_topic[word]
        raise ValueError(f"prompt {prompt!r} names none of the world's topics")

    def split_prompts(
        self, n_eval_per_topic: int = 25, seed: SeedLike = 0
    ) -> tuple[list[str], list[str]]:
        """Split the prompts into (train, eval), disjoint, with the same share of every topic."""
        rng = _rng(seed)
        train: list[str] = []
        evaluation: list[str] = []
        for topic in self.topics:
            prompts = self.prompts(topic.name)
            order = rng.permutation(len(prompts))
            evaluation += [prompts[i] for i in order[:n_eval_per_topic]]
            train += [prompts[i] for i in order[n_eval_per_topic:]]
        return train, evaluation

    # ---- fresh prompts: new phrasings, without end -------------------------------------------

    def _fresh_request(self, rng: np.random.Generator, topic: Topic) -> str:
        """One request about ``topic``: a template of :data:`FRESH_TEMPLATES` filled with one
        keyword or with two distinct keywords joined by "and"."""
        template = _choice(rng, FRESH_TEMPLATES)
        if rng.random() < 0.5:
            key = _choice(rng, topic.keywords)
        else:
            i, j = rng.choice(len(topic.keywords), size=2, replace=False)
            key = f"{topic.keywords[int(i)]} and {topic.keywords[int(j)]}"
        return template.format(k=key)

    def fresh_prompt(self, topic: str, seed: SeedLike = None, p_two: float = 0.2) -> str:
        """One new phrasing of a question about ``topic``: an opener of :data:`FRESH_OPENERS`,
        a request (:data:`FRESH_TEMPLATES` with one keyword of the topic, or two joined by
        "and"), and with probability ``p_two`` a second request about the same topic ("tell me
        about rain. what is true about snow?"). With 6 openers, 18 templates and 4 + 12 keyword
        choices that is 6·18·16 = 1,728 one-request and 6·(18·16)² ≈ 5·10^5 two-request
        phrasings per topic (about 4·10^6 in all): an endless supply for this world's purposes."""
        rng = _rng(seed)
        t = self.topic_by_name[topic]
        text = self._fresh_request(rng, t)
        if rng.random() < p_two:
            second = self._fresh_request(rng, t)
            text = f"{text}{'' if text.endswith('?') else '.'} {second}"
        opener = _choice(rng, FRESH_OPENERS)
        return f"{opener} {text}".strip()

    def iter_fresh_prompts(self, split: str, seed: SeedLike = 0, p_two: float = 0.2
                           ) -> Iterator[str]:
        """An endless, seeded stream of distinct fresh prompts of one split.

        Topics come in shuffled blocks of all eight (every topic equally often); each prompt is
        drawn by :meth:`fresh_prompt` and kept only when it belongs to ``split``
        (:func:`prompt_split`), is not one of the world's original prompts (:meth:`prompts`, the
        ones the shipped data and checkpoints were built from) and was not yielded before. The
        split is a function of the text, so streams of different splits never share a prompt,
        whatever their seeds; the same seed gives the same stream.
        """
        if split not in FRESH_SPLITS:
            raise ValueError(f"split must be one of {list(FRESH_SPLITS)}, got {split!r}")
        rng = _rng(seed)
        seen = set(self._prompt_topic)
        while True:
            for i in rng.permutation(len(self.topics)):
                topic = self.topics[int(i)].name
                while True:
                    prompt = self.fresh_prompt(topic, rng, p_two)
                    if prompt not in seen and prompt_split(prompt) == split:
                        break
                seen.add(prompt)
                yield prompt

    def fresh_prompts(self, split: str, n: int, seed: SeedLike = 0, p_two: float = 0.2
                      ) -> list[str]:
        """The first ``n`` prompts of :meth:`iter_fresh_prompts` (distinct, of ``split`` only,
        none of the original prompts), e.g. a validation set for every choice and a test set
        that plays no part in choosing."""
        stream = self.iter_fresh_prompts(split, seed, p_two)
        return [next(stream) for _ in range(n)]

    # ---- vocabulary ------------------------------------------------------------------------

    def sentences(self, kind: str | None = None, topic: str | None = None) -> list[str]:
        """The grammar's sentences, optionally of one kind and/or topic."""
        return [
            s
            for s, info in self._sentences.items()
            if (kind is None or info.kind == kind) and (topic is None or info.topic == topic)
        ]

    def vocabulary(self) -> list[str]:
        """Every word of every prompt and sentence, sorted (``.`` and ``?`` are words)."""
        words = {w for s in self._sentences for w in tokens(s)}
        words |= {w for p in self._prompt_topic for w in tokens(p)}
        return sorted(words)

    # ---- the judge -------------------------------------------------------------------------

    def score_breakdown(self, prompt: str, response: str) -> Breakdown:
        r"""Parse ``response`` and score it for ``prompt``; see :meth:`true_score` for the formula.

        Every piece between ``.`` tokens is looked up in the grammar; a piece that is not a
        sentence of the grammar (or lacks its final ``.``) is *garbled*. A fact of another
        topic is *off-topic* (and, if false, also a false fact).
        """
        topic = self.topic_of(prompt)
        w = self.weights
        pieces = split_sentences(response)
        words = tokens(response)
        n_true = n_false = n_off = n_hedge = n_rude = n_biased = n_garbled = 0
        distinct_true: set[str] = set()
        for sentence, terminated in pieces:
            info = self._sentences.get(sentence) if terminated else None
            if info is None:
                n_garbled += 1
            elif info.kind in ("true", "false"):
                if info.topic != topic:
                    n_off += 1
                if info.kind == "false":
                    n_false += 1
                elif info.topic == topic:
                    n_true += 1
                    distinct_true.add(sentence)
            elif info.kind == "hedge":
                n_hedge += 1
            elif info.kind == "rude":
                n_rude += 1
            elif info.kind == "biased":
                n_biased += 1
        if n_rude == 0 and any(t in self.rude_words for t in words):
            n_rude = 1  # rude words inside garbled text count as well
        said = [s for s, _ in pieces]
        repetition = len(set(said)) < len(said) or any(
            a == b and a != "." for a, b in zip(words, words[1:], strict=False)
        )
        relevance = min(len(distinct_true), w.facts_for_full_relevance) / w.facts_for_full_relevance
        penalties = {
            "false_fact": w.false_fact * (n_false > 0),
            "rude": w.rude * (n_rude + n_biased > 0),
            "off_topic": w.off_topic * (n_off > 0),
            "repetition": w.repetition * repetition,
            "garbled": w.garbled * (n_garbled > 0),
        }
        penalties = {k: float(v) for k, v in penalties.items()}
        score = w.relevance * relevance - sum(penalties.values())
        return Breakdown(
            topic=topic,
            n_sentences=len(pieces),
            n_tokens=len(words),
            n_true=n_true,
            n_distinct_true=len(distinct_true),
            n_false=n_false,
            n_off_topic=n_off,
            n_hedge=n_hedge,
            n_rude=n_rude,
            n_biased=n_biased,
            n_garbled=n_garbled,
            repetition=repetition,
            relevance=relevance,
            penalties=penalties,
            score=float(score),
        )

    def true_score(self, prompt: str, response: str) -> float:
        r"""The hidden ground-truth quality of ``response`` to ``prompt``.

        .. math::

            s = w_\text{rel}\,\min(k, K)/K
                - w_\text{false}\,[\text{false fact}]
                - w_\text{rude}\,[\text{rude or biased}]
                - w_\text{off}\,[\text{off-topic}]
                - w_\text{rep}\,[\text{repetition}]
                - w_\text{garb}\,[\text{garbled}]

        with k the number of *distinct* true facts of the prompt's topic, K = 2 and
        [·] = 1 when the flaw is present at least once. Presence, not counts: saying a flaw
        twice costs no more than saying it once, and a third true fact or a hedge neither helps
        nor hurts, so the best score (``max_score()``, 1 with the default weights) is reached
        at any length from two sentences up: the judge is indifferent to length.
        """
        return self.score_breakdown(prompt, response).score

    def max_score(self) -> float:
        """The best achievable score: full relevance and no flaw (``w_rel``)."""
        return float(self.weights.relevance)

    def best_response(self, prompt: str, n_facts: int = 2, seed: SeedLike = None) -> str:
        """A response with the best score: ``n_facts`` distinct true facts of the prompt's topic.

        Deterministic (the topic's first facts) unless a seed or generator is given.
        """
        topic = self.topic_by_name[self.topic_of(prompt)]
        facts = list(topic.true_facts)
        if seed is not None:
            facts = [facts[i] for i in _rng(seed).permutation(len(facts))]
        if not 1 <= n_facts <= len(facts):
            raise ValueError(f"n_facts must be in 1..{len(facts)}, got {n_facts}")
        return " ".join(facts[:n_facts])

    # ---- generators ------------------------------------------------------------------------

    def sample_response(self, prompt: str, seed: SeedLike = None, mix: ResponseMix | None = None
                        ) -> str:
        """One response to ``prompt`` from the grammar, with flaws drawn from ``mix``.

        First the number of fact slots n is drawn uniformly from the mix's range and filled
        with distinct true facts of the topic. Then each flaw (false fact, rude or biased
        statement, off-topic fact) is drawn independently; a drawn flaw *replaces* a random
        true fact with probability ``1 - insert_prob`` and is *inserted* otherwise, and a
        repetition copies one sentence of the answer. Hedges open or close the answer with
        their own probabilities. Because flaws replace as often as they add, the length of an
        answer says little about its quality (see :func:`pair_length_balance`).
        """
        rng = _rng(seed)
        mix = mix or ResponseMix()
        topic = self.topic_by_name[self.topic_of(prompt)]
        n = int(rng.integers(mix.min_facts, mix.max_facts + 1))
        facts = list(topic.true_facts)
        slots = [facts[i] for i in rng.permutation(len(facts))[:n]]
        flaws: list[str] = []
        if rng.random() < mix.p_false:
            flaws.append(_choice(rng, topic.false_facts))
        if rng.random() < mix.p_rude:
            flaws.append(_choice(rng, self.rude if rng.random() < 0.6 else self.biased))
        if rng.random() < mix.p_off_topic:
            other = _choice(rng, [t for t in self.topics if t.name != topic.name])
            flaws.append(_choice(rng, other.true_facts))
        for flaw in flaws:
            _place(rng, slots, flaw, insert=rng.random() < mix.insert_prob)
        if rng.random() < mix.p_repeat and slots:
            i = int(rng.integers(len(slots)))
            if rng.random() < mix.insert_prob or len(slots) == 1:
                slots.insert(i + 1, slots[i])  # say it again right away
            else:
                j = int(rng.integers(len(slots)))
                while j == i:
                    j = int(rng.integers(len(slots)))
                slots[j] = slots[i]
        if rng.random() < mix.p_hedge_open:
            slots.insert(0, _choice(rng, self.hedges[:3]))
        if rng.random() < mix.p_hedge_close:
            slots.append(_choice(rng, self.hedges[3:]))
        return " ".join(slots)

    def sft_dataset(
        self, prompts: Sequence[str], n: int, seed: SeedLike = 0, mix: ResponseMix | None = None
    ) -> list[dict]:
        """``n`` records ``{"prompt", "completion"}``: prompts drawn from ``prompts`` with
        replacement, completions from :meth:`sample_response` (the default mix leaves a share
        of false facts, rude words and repetition in the data, as real SFT data has)."""
        rng = _rng(seed)
        mix = mix or ResponseMix()
        out = []
        for i in rng.integers(len(prompts), size=n):
            prompt = prompts[int(i)]
            out.append({"prompt": prompt, "completion": self.sample_response(prompt, rng, mix)})
        return out

    def pretraining_corpus(
        self,
        n_documents: int,
        seed: SeedLike = 0,
        prompts: Sequence[str] | None = None,
        p_question: float = 0.3,
    ) -> list[str]:
        """Raw text documents, each a paragraph of 4–10 sentences, mostly about one topic.

        Sentence kinds per slot: true on-topic 55 %, false on-topic 15 %, off-topic 10 %,
        hedge 10 %, rude or biased 5 %, the previous sentence again 5 % (quality is mixed, as
        in web text). With probability ``p_question`` a document starts with a question from
        ``prompts`` (pass only training prompts, so evaluation prompts stay unseen).
        """
        rng = _rng(seed)
        kinds = ("true", "false", "off", "hedge", "rude", "repeat")
        probs = np.array([0.55, 0.15, 0.10, 0.10, 0.05, 0.05])
        by_topic: dict[str, list[str]] = {}
        for p in prompts or ():
            by_topic.setdefault(self.topic_of(p), []).append(p)
        docs = []
        for _ in range(n_documents):
            topic = _choice(rng, self.topics)
            opening: list[str] = []
            if prompts and rng.random() < p_question:
                mine = by_topic.get(topic.name)
                if mine:
                    opening.append(_choice(rng, mine))
            sentences: list[str] = []
            for _ in range(int(rng.integers(4, 11))):
                kind = kinds[int(rng.choice(len(kinds), p=probs))]
                if kind == "true":
                    s = _choice(rng, topic.true_facts)
                elif kind == "false":
                    s = _choice(rng, topic.false_facts)
                elif kind == "off":
                    s = _choice(rng, _choice(rng, self.topics).true_facts)
                elif kind == "hedge":
                    s = _choice(rng, self.hedges)
                elif kind == "rude":
                    s = _choice(rng, self.rude + self.biased)
                else:
                    s = sentences[-1] if sentences else _choice(rng, topic.true_facts)
                sentences.append(s)
            docs.append(" ".join(opening + sentences))
        return docs


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _place(rng: np.random.Generator, slots: list[str], sentence: str, insert: bool) -> None:
    """Insert ``sentence`` at a random position, or let it replace a random slot."""
    if insert or not slots:
        slots.insert(int(rng.integers(len(slots) + 1)), sentence)
    else:
        slots[int(rng.integers(len(slots)))] = sentence


@dataclass(frozen=True)
class ResponseMix:
    """How :meth:`AssistantWorld.sample_response` mixes quality (probabilities per response)."""

    min_facts: int = 2
    max_facts: int = 4
    p_false: float = 0.2
    p_rude: float = 0.12
    p_off_topic: float = 0.15
    p_repeat: float = 0.15
    #: A flaw is inserted (adds a sentence) with this probability, else it replaces a fact.
    #: 0 by default: a small SFT model adds length of its own when it goes wrong (it repeats
    #: itself), and with flaws that only replace, pairs sampled from it come out balanced.
    insert_prob: float = 0.0
    p_hedge_open: float = 0.25
    p_hedge_close: float = 0.25


DEFAULT_WORLD = AssistantWorld()


def true_score(prompt: str, response: str, world: AssistantWorld | None = None) -> float:
    """The hidden ground-truth score of the default world (see ``AssistantWorld.true_score``)."""
    return (world or DEFAULT_WORLD).true_score(prompt, response)


# --------------------------------------------------------------------------------------------
# The simulated annotator and the preference datasets
# --------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass
class Annotator:
    r"""A simulated person who labels pairs by the hidden score, Bradley–Terry style.

    The annotator's utility of a response is

    .. math::  u(x, y) = s(x, y) + b_\text{len}\,|y| + \sum_{w \in \text{taste}} t_w [w \in y]

    (the true score, a length bias per sentence or per token, and an individual taste for
    some words, e.g. :data:`TAXI_TASTE`), and the probability of preferring a over b is

    .. math::  P(a \succ b) = \sigma\big((u_a - u_b)/T\big).

    T = 0 gives a noiseless annotator. Pairs the annotator finds exactly equal
    (u_a = u_b) are skipped when ``skip_ties`` (as annotation guidelines usually ask),
    otherwise labelled by a coin flip.
    """

    world: AssistantWorld = field(default_factory=lambda: DEFAULT_WORLD)
    temperature: float = 0.4
    length_bias: float = 0.0
    length_unit: str = "sentence"
    taste: Mapping[str, float] = field(default_factory=dict)
    skip_ties: bool = True

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.length_unit not in ("sentence", "token"):
            raise ValueError(f"length_unit must be 'sentence' or 'token', not {self.length_unit!r}")

    def length(self, response: str) -> int:
        """|y| in the annotator's unit (sentences or tokens)."""
        if self.length_unit == "token":
            return len(tokens(response))
        return len(split_sentences(response))

    def utility(self, prompt: str, response: str) -> float:
        """u(x, y) = true score + length bias · |y| + taste bonuses of the words present."""
        u = self.world.true_score(prompt, response) + self.length_bias * self.length(response)
        words = set(tokens(response))
        return u + sum(v for w, v in self.taste.items() if w in words)

    def prob_prefers(self, prompt: str, a: str, b: str) -> float:
        """P(a ≻ b) = σ((u_a − u_b)/T); for T = 0: 1, 0 or 1/2."""
        d = self.utility(prompt, a) - self.utility(prompt, b)
        if self.temperature == 0:
            return 1.0 if d > 0 else 0.0 if d < 0 else 0.5
        return _sigmoid(d / self.temperature)

    def label(self, prompt: str, a: str, b: str, seed: SeedLike = None) -> bool | None:
        """True if the annotator prefers ``a``, False if ``b``, None for a skipped tie."""
        rng = _rng(seed)
        d = self.utility(prompt, a) - self.utility(prompt, b)
        if abs(d) < 1e-9 and self.skip_ties:
            return None
        return bool(rng.random() < self.prob_prefers(prompt, a, b))


def preference_pairs(
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    annotator: Annotator,
    seed: SeedLike = 0,
    drop_empty: bool = True,
) -> list[dict]:
    """Label two responses per prompt: records ``{"prompt", "chosen", "rejected"}``.

    Pairs of identical responses carry no preference and are dropped, as are the ties the
    annotator skips and, with ``drop_empty``, pairs with an empty response (a model that
    stopped at once; the JSONL format asks for non-empty answers). In the book the responses
    are two samples of the SFT model per prompt, as the slides describe ("sample the SFT
    model and have people label the pairs").
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(
            f"prompts, responses_a and responses_b differ in length: "
            f"{len(prompts)}, {len(responses_a)}, {len(responses_b)}"
        )
    rng = _rng(seed)
    pairs = []
    for prompt, a, b in zip(prompts, responses_a, responses_b, strict=True):
        if tokens(a) == tokens(b) or (drop_empty and not (a.strip() and b.strip())):
            continue
        prefers_a = annotator.label(prompt, a, b, rng)
        if prefers_a is None:
            continue
        chosen, rejected = (a, b) if prefers_a else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def unpaired_from_pairs(
    pairs: Sequence[Mapping[str, str]],
    desirable_fraction: float | None = 0.5,
    seed: SeedLike = 0,
) -> list[dict]:
    """Split pairs into unpaired examples, as KTO does: chosen → label True, rejected → False
    (:func:`rlcourse.data.pairs_to_unpaired`), then balance the classes and shuffle.

    ``desirable_fraction`` sets the class balance by dropping examples of the larger class:
    with n pairs and target share p of desirable labels, p ≥ 1/2 keeps all n desirable and
    round(n (1 − p)/p) undesirable examples, p < 1/2 keeps all n undesirable and
    round(n p/(1 − p)) desirable ones. ``None`` keeps everything (exactly half). The records
    ``{"prompt", "completion", "label"}`` come out shuffled.
    """
    rng = _rng(seed)
    split = pairs_to_unpaired(pairs)  # per pair: (x, chosen, True), then (x, rejected, False)
    good, bad = split[0::2], split[1::2]
    if desirable_fraction is not None:
        p = float(desirable_fraction)
        if not 0.0 < p < 1.0:
            raise ValueError(f"desirable_fraction must be in (0, 1), got {p}")
        n = len(pairs)
        if p >= 0.5:
            keep = round(n * (1 - p) / p)
            bad = [bad[i] for i in sorted(rng.permutation(n)[:keep])]
        else:
            keep = round(n * p / (1 - p))
            good = [good[i] for i in sorted(rng.permutation(n)[:keep])]
    records = good + bad
    return [records[i] for i in rng.permutation(len(records))]


def label_agreement(
    pairs: Sequence[Mapping[str, str]], world: AssistantWorld | None = None
) -> dict[str, float]:
    """How often labels agree with the true ordering.

    Returns ``agreement`` (share of pairs with s(chosen) > s(rejected) among pairs whose true
    scores differ), ``true_ties`` (share of pairs with equal true scores) and ``n``.
    """
    world = world or DEFAULT_WORLD
    agree = disagree = ties = 0
    for pair in pairs:
        d = world.true_score(pair["prompt"], pair["chosen"]) - world.true_score(
            pair["prompt"], pair["rejected"]
        )
        if abs(d) < 1e-9:
            ties += 1
        elif d > 0:
            agree += 1
        else:
            disagree += 1
    n = len(pairs)
    return {
        "agreement": agree / max(agree + disagree, 1),
        "true_ties": ties / max(n, 1),
        "n": float(n),
    }


def pair_length_balance(
    pairs: Sequence[Mapping[str, str]], world: AssistantWorld | None = None, unit: str = "token"
) -> dict[str, float]:
    """Is the better answer of a pair longer or shorter? Judged by the *true* score.

    Among pairs whose true scores and lengths both differ, ``better_longer`` is the share
    where the truly better answer is the longer one (1/2 means length and quality are
    decoupled). Also ``chosen_longer``: the share of pairs (lengths differing) whose chosen
    answer is longer, and the mean lengths of chosen and rejected answers.
    """
    world = world or DEFAULT_WORLD

    def length(text: str) -> int:
        return len(tokens(text)) if unit == "token" else len(split_sentences(text))

    better_longer = better_shorter = chosen_longer = chosen_shorter = 0
    for pair in pairs:
        lc, lr = length(pair["chosen"]), length(pair["rejected"])
        if lc == lr:
            continue
        chosen_longer += lc > lr
        chosen_shorter += lc < lr
        d = world.true_score(pair["prompt"], pair["chosen"]) - world.true_score(
            pair["prompt"], pair["rejected"]
        )
        if abs(d) < 1e-9:
            continue
        longer_is_better = (lc > lr) == (d > 0)
        better_longer += longer_is_better
        better_shorter += not longer_is_better
    n = len(pairs)
    return {
        "better_longer": better_longer / max(better_longer + better_shorter, 1),
        "chosen_longer": chosen_longer / max(chosen_longer + chosen_shorter, 1),
        "mean_len_chosen": float(np.mean([length(p["chosen"]) for p in pairs])) if n else 0.0,
        "mean_len_rejected": float(np.mean([length(p["rejected"]) for p in pairs])) if n else 0.0,
    }
