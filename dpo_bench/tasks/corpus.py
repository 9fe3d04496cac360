"""The synthetic movie-review corpus of the `sentiment` task.

A seeded generator of short movie reviews (an offline stand-in for IMDb), the grammar that
produced them (used again as the fluency measure: "could the generator have written this?"),
the prompts cut from them, and a word-level tokenizer for the policy.

A review is a neutral opening sentence ("we saw the new documentary at the cinema on friday .")
followed by a body of one or two sentiment-bearing sentences and, sometimes, a closing
("overall , the film was not good ."). A prompt is the opening, perhaps with the first few
neutral words of the body, cut before any word VADER reads: writing the sentiment is the
policy's job, and the gold reward (see `reward.gold.RelativeVaderGold`) scores what it wrote.

Sentiment words are taken from VADER's lexicon; every other word of the grammar is neutral to
VADER except the intensifiers, which are VADER boosters, and "not", which VADER negates.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# Word lists. The lexicon has no parts of speech, so the candidates are written by hand and only
# those VADER scores with |valence| >= MIN_ABS_VALENCE survive (see `_sentiment_split`).
# ---------------------------------------------------------------------------------------------

MIN_ABS_VALENCE = 1.0
"""A candidate sentiment word is kept only if VADER's |valence| is at least this."""

_WORD_SHAPE = re.compile(r"[a-z]{3,}")

STOPLIST = frozenset(
    """lol lmao rofl wtf omg yolo fav xoxo thx ftw smh
    damn hell crap crappy sucks suck shit fuck fucking ass bitch bastard dick piss pissed
    screwed sexy hot kill killer dead die sick""".split()
)
"""Slang, acronyms, profanity and words whose review sense differs from their VADER sense."""

_ADJECTIVE_CANDIDATES = """
good great excellent wonderful amazing awesome fantastic brilliant superb outstanding beautiful
lovely charming delightful enjoyable fun funny hilarious clever smart bold fresh gorgeous elegant
graceful impressive inspiring powerful perfect pleasant remarkable stunning terrific magnificent
marvelous nice sweet exciting engaging entertaining thoughtful intelligent creative original
glorious splendid heartwarming satisfying
bad terrible awful horrible dreadful poor weak boring dull stupid dumb ugly painful annoying
irritating disappointing lame messy pathetic ridiculous worthless useless depressing miserable
lousy unpleasant disgusting horrendous dismal nasty frustrating horrid inferior incompetent
offensive dreary repetitive embarrassing insulting idiotic mindless disastrous pitiful feeble lazy
hopeless shameful crude foolish
""".split()

_ADVERB_CANDIDATES = """
beautifully brilliantly wonderfully perfectly gracefully elegantly cleverly nicely charmingly
delightfully impressively smartly wisely
badly terribly horribly dreadfully stupidly weakly miserably painfully awkwardly dully foolishly
carelessly pathetically
""".split()

_VERB_CANDIDATES = """
loved enjoyed adored admired liked appreciated treasured praised cherished
hated disliked despised loathed regretted resented dreaded abhorred mocked
""".split()

_FEELING_CANDIDATES = """
happy glad joyful cheerful delighted excited inspired hopeful grateful thrilled amused pleased
relaxed
sad unhappy bored annoyed angry depressed disappointed miserable frustrated confused upset uneasy
lonely nervous anxious disgusted
""".split()

# Neutral words: none of these is in VADER's lexicon (a test checks it).
_NOUNS = """
movie film plot acting ending script cast director story soundtrack dialogue music pacing
screenplay sequel cinematography finale premise twist remake
""".split()
_WORKS = "movie film story script screenplay sequel remake episode".split()
_CREWS = "cast crew ensemble actor actress director".split()
_PARTICIPLES = "made shot written directed edited acted".split()
_DETERMINERS = ["the", "this"]
_BE = ["was", "is"]
_SEEM = ["felt", "seemed"]
# Intensifiers are VADER boosters that are not themselves sentiment words.
_INTENSIFIERS = "really very extremely quite so incredibly totally".split()
_VERB_INTENSIFIERS = "really absolutely totally completely".split()

# The opening: who watched what, where, when and with whom. Every word is neutral to VADER (a
# test checks each against the lexicon, the boosters and the negations), which rules out some
# natural choices: "friend", "friends", "comedy", "horror", "romance", "thriller", "festival",
# "holidays", "alone" and "original" all carry a valence.
_RELATIVES = """
sister brother wife husband roommate dad mom parents kids cousin girlfriend boyfriend partner
neighbor
""".split()
_WATCHED = ["watched", "saw", "rented", "streamed", "caught", "rewatched", "finally watched",
            "went to see"]
# Kinds of film that no body sentence names: after "the" the next word tells opening from body.
_FILM_KINDS = """
documentary western drama musical mystery adaptation prequel cartoon biopic anime miniseries
reboot satire fantasy
""".split()
_FILM_MODIFIERS = "new latest recent old animated indie french italian japanese korean".split()
_PLACES = ["at the cinema", "at the theater", "at home", "on netflix", "on the plane",
           "on my laptop", "on tv", "on the couch"]
_TIMES = ["last night", "last week", "last weekend", "this weekend", "yesterday", "on friday",
          "on saturday", "on sunday", "after work", "after dinner"]

OPENING_SLOT_PROBABILITY = 0.5
"""Probability of each optional slot of an opening (a film modifier, a place, a time, company)."""


@functools.lru_cache(maxsize=1)
def vader_lexicon() -> dict[str, float]:
    """VADER's lexicon, word -> mean valence (loaded once per process)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return dict(SentimentIntensityAnalyzer().lexicon)


@functools.lru_cache(maxsize=1)
def _vader_rule_words() -> frozenset[str]:
    from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE

    # "but" and "least" have rules of their own in VADER; "!" and "?" add emphasis.
    return frozenset(BOOSTER_DICT) | frozenset(NEGATE) | {"but", "least", "!", "?"}


def vader_reads(word: str) -> bool:
    """True iff VADER gives `word` a role: a valence in its lexicon, a booster, a negation, or a
    word or mark with a rule of its own ("but", "least", "!", "?"). Every other word is neutral."""
    return word in vader_lexicon() or word in _vader_rule_words()


def _sentiment_split(candidates: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(positive, negative) candidates that pass the shape, stoplist and valence filters."""
    lexicon = vader_lexicon()
    positive, negative = [], []
    for word in dict.fromkeys(candidates):
        if not _WORD_SHAPE.fullmatch(word) or word in STOPLIST:
            continue
        valence = lexicon.get(word, 0.0)
        if valence >= MIN_ABS_VALENCE:
            positive.append(word)
        elif valence <= -MIN_ABS_VALENCE:
            negative.append(word)
    return tuple(positive), tuple(negative)


# ---------------------------------------------------------------------------------------------
# Grammar nodes. One tree drives both the sampler and the recogniser, which is what makes the
# recogniser exact with respect to the generator.
# ---------------------------------------------------------------------------------------------


class _Nfa:
    """A Thompson NFA over words: `edges[s]` maps a word to target states, `eps[s]` lists
    epsilon moves."""

    def __init__(self) -> None:
        self.edges: list[dict[str, list[int]]] = []
        self.eps: list[list[int]] = []

    def new_state(self) -> int:
        self.edges.append({})
        self.eps.append([])
        return len(self.edges) - 1

    def add_words(self, source: int, words: Sequence[str], target: int) -> None:
        for word in words:
            self.edges[source].setdefault(word, []).append(target)


@dataclass(frozen=True)
class _Words:
    """A slot filled uniformly from a neutral word class (or one fixed word)."""

    words: tuple[str, ...]

    def sample(self, rng: np.random.Generator, probs: _Probs, out: list[str]) -> None:
        out.append(self.words[int(rng.random() * len(self.words))])

    def compile(self, nfa: _Nfa, start: int) -> int:
        end = nfa.new_state()
        nfa.add_words(start, self.words, end)
        return end

    def max_length(self) -> int:
        return 1

    def vocabulary(self) -> set[str]:
        return set(self.words)


@dataclass(frozen=True)
class _Sentiment:
    """A slot that takes a positive word with probability p_positive, else a negative one."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]

    def sample(self, rng: np.random.Generator, probs: _Probs, out: list[str]) -> None:
        words = self.positive if rng.random() < probs.positive else self.negative
        out.append(words[int(rng.random() * len(words))])

    def compile(self, nfa: _Nfa, start: int) -> int:
        end = nfa.new_state()
        nfa.add_words(start, self.positive + self.negative, end)
        return end

    def max_length(self) -> int:
        return 1

    def vocabulary(self) -> set[str]:
        return set(self.positive) | set(self.negative)


@dataclass(frozen=True)
class _Seq:
    parts: tuple

    def sample(self, rng: np.random.Generator, probs: _Probs, out: list[str]) -> None:
        for part in self.parts:
            part.sample(rng, probs, out)

    def compile(self, nfa: _Nfa, start: int) -> int:
        state = start
        for part in self.parts:
            state = part.compile(nfa, state)
        return state

    def max_length(self) -> int:
        return sum(part.max_length() for part in self.parts)

    def vocabulary(self) -> set[str]:
        return set().union(*(part.vocabulary() for part in self.parts))


@dataclass(frozen=True)
class _Optional:
    """`body` present with the probability named by `kind` (an attribute of `_Probs`)."""

    body: object
    kind: str

    def sample(self, rng: np.random.Generator, probs: _Probs, out: list[str]) -> None:
        if rng.random() < getattr(probs, self.kind):
            self.body.sample(rng, probs, out)

    def compile(self, nfa: _Nfa, start: int) -> int:
        # Fresh entry and exit states keep the skip edge from leaking into sibling branches.
        entry, exit_ = nfa.new_state(), nfa.new_state()
        nfa.eps[start].extend([entry, exit_])
        nfa.eps[self.body.compile(nfa, entry)].append(exit_)
        return exit_

    def max_length(self) -> int:
        return self.body.max_length()

    def vocabulary(self) -> set[str]:
        return self.body.vocabulary()


@dataclass(frozen=True)
class _Alternatives:
    """Exactly one of `options`, chosen uniformly."""

    options: tuple

    def sample(self, rng: np.random.Generator, probs: _Probs, out: list[str]) -> None:
        self.options[int(rng.random() * len(self.options))].sample(rng, probs, out)

    def compile(self, nfa: _Nfa, start: int) -> int:
        exit_ = nfa.new_state()
        for option in self.options:
            entry = nfa.new_state()
            nfa.eps[start].append(entry)
            nfa.eps[option.compile(nfa, entry)].append(exit_)
        return exit_

    def max_length(self) -> int:
        return max(option.max_length() for option in self.options)

    def vocabulary(self) -> set[str]:
        return set().union(*(option.vocabulary() for option in self.options))


@dataclass(frozen=True)
class _Terminal:
    """The sentence's last token: "!" with probability p_exclaim, else "."."""

    def sample(self, rng: np.random.Generator, probs: _Probs, out: list[str]) -> None:
        out.append("!" if rng.random() < probs.exclaim else ".")

    def compile(self, nfa: _Nfa, start: int) -> int:
        end = nfa.new_state()
        nfa.add_words(start, (".", "!"), end)
        return end

    def max_length(self) -> int:
        return 1

    def vocabulary(self) -> set[str]:
        return {".", "!"}


@dataclass(frozen=True)
class _Probs:
    positive: float
    intensifier: float
    negation: float
    but: float
    exclaim: float
    second_sentence: float
    closing: float
    opening_slot: float


def _check_probability(name: str, value: float) -> None:
    # Open interval: every branch must stay producible, or the recogniser would over-accept.
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")


def _words(*ws: str) -> _Words:
    return _Words(tuple(ws))


def _phrases(texts: Sequence[str]) -> _Alternatives:
    """One of several fixed phrases ("went to see", "at the cinema"), chosen uniformly."""
    return _Alternatives(tuple(_Seq(tuple(_words(w) for w in text.split())) for text in texts))


class ReviewGrammar:
    """Short movie reviews: a neutral opening, a body of sentiment-bearing sentences drawn from
    ten templates, sometimes a closing; their sampler and an exact recogniser.

    Built deterministically from fixed word lists and VADER's lexicon. The recogniser is a lazily
    determinised NFA compiled from the same tree that `sample` walks, so `is_sentence` accepts
    exactly the token sequences (whole reviews) `sample` can return, given probabilities in (0, 1).
    """

    def __init__(
        self,
        *,
        p_intensifier: float = 0.35,
        p_not: float = 0.2,
        p_but: float = 0.2,
        p_exclaim: float = 0.03,
        p_second_sentence: float = 0.85,
        p_closing: float = 0.25,
    ) -> None:
        for name, value in [
            ("p_intensifier", p_intensifier),
            ("p_not", p_not),
            ("p_but", p_but),
            ("p_exclaim", p_exclaim),
            ("p_second_sentence", p_second_sentence),
            ("p_closing", p_closing),
        ]:
            _check_probability(name, value)
        self.p_intensifier = float(p_intensifier)
        self.p_not = float(p_not)
        self.p_but = float(p_but)
        self.p_exclaim = float(p_exclaim)
        self.p_second_sentence = float(p_second_sentence)
        self.p_closing = float(p_closing)

        adjectives = _sentiment_split(_ADJECTIVE_CANDIDATES)
        adverbs = _sentiment_split(_ADVERB_CANDIDATES)
        verbs = _sentiment_split(_VERB_CANDIDATES)
        feelings = _sentiment_split(_FEELING_CANDIDATES)
        lexicon = vader_lexicon()
        # Every sentiment word of the grammar -> its VADER valence.
        self.sentiment_words: dict[str, float] = {
            w: lexicon[w]
            for pair in (adjectives, adverbs, verbs, feelings)
            for ws in pair
            for w in ws
        }

        words = _words
        det, noun = words(*_DETERMINERS), words(*_NOUNS)
        be, seem = words(*_BE), words(*_SEEM)
        intensifier = _Optional(words(*_INTENSIFIERS), "intensifier")
        verb_intensifier = _Optional(words(*_VERB_INTENSIFIERS), "intensifier")
        adjective = _Sentiment(*adjectives)
        adj_phrase = _Seq((intensifier, adjective))
        # "not" only after a copula ("was not good"), never after "felt".
        negatable = _Seq((_Optional(words("not"), "negation"), intensifier, adjective))
        but_clause = _Optional(
            _Seq(
                (
                    words(","),
                    words("but"),
                    det,
                    noun,
                    _Alternatives((_Seq((be, negatable)), _Seq((seem, adj_phrase)))),
                )
            ),
            "but",
        )
        end = _Terminal()
        self._sentences: tuple[_Seq, ...] = (
            # the plot was not very good .
            _Seq((det, noun, be, negatable, but_clause, end)),
            # the acting felt really dull .
            _Seq((det, noun, seem, adj_phrase, but_clause, end)),
            # i thought the ending was not bad , but the script felt weak .
            _Seq((words("i"), words("thought"), det, noun, be, negatable, but_clause, end)),
            # i really loved the film .
            _Seq((words("i"), verb_intensifier, _Sentiment(*verbs), det, noun, but_clause, end)),
            # the movie was very beautifully shot .
            _Seq(
                (det, words(*_WORKS), be, intensifier, _Sentiment(*adverbs),
                 words(*_PARTICIPLES), end)
            ),
            # the cast performed wonderfully .
            _Seq((det, words(*_CREWS), words("performed"), intensifier, _Sentiment(*adverbs), end)),
            # the ending made me feel so sad .
            _Seq(
                (det, noun, words("made"), words("me"), words("feel"), intensifier,
                 _Sentiment(*feelings), end)
            ),
            # the movie was funny and really boring .
            _Seq((det, noun, be, adj_phrase, words("and"), adj_phrase, end)),
            # i found the script extremely clever .
            _Seq((words("i"), words("found"), det, noun, adj_phrase, but_clause, end)),
            # the sequel was dull from start to finish .
            _Seq(
                (det, words(*_WORKS), be, adj_phrase, words("from"), words("start"), words("to"),
                 words("finish"), end)
            ),
        )
        sentence = _Alternatives(self._sentences)
        closing = _Alternatives(
            (
                # overall , the film was not good .
                _Seq((words("overall"), words(","), det, noun, be, negatable, end)),
                # overall , i really enjoyed it .
                _Seq((words("overall"), words(","), words("i"), verb_intensifier,
                      _Sentiment(*verbs), words("it"), end)),
            )
        )

        def slot(node: object) -> _Optional:
            return _Optional(node, "opening_slot")

        watched = _phrases(_WATCHED)
        work = _Seq((det, slot(words(*_FILM_MODIFIERS)), words(*_FILM_KINDS)))
        where, when = slot(_phrases(_PLACES)), slot(_phrases(_TIMES))
        relative = words(*_RELATIVES)
        self._opening = _Alternatives(
            (
                # i watched this drama last night with my sister .
                _Seq((words("i", "we"), watched, work, where, when,
                      slot(_Seq((words("with"), words("my"), relative))), words("."))),
                # my brother and i rented the new western at home .
                _Seq((words("my"), relative, words("and"), words("i"), watched, work, where, when,
                      words("."))),
            )
        )
        self._review = _Seq(
            (
                self._opening,
                sentence,
                _Optional(sentence, "second_sentence"),
                _Optional(closing, "closing"),
            )
        )
        self.positive_words = tuple(sorted(w for w, v in self.sentiment_words.items() if v > 0))
        self.negative_words = tuple(sorted(w for w, v in self.sentiment_words.items() if v < 0))
        # Every token the grammar can produce, sorted.
        self.vocabulary: tuple[str, ...] = tuple(sorted(self._review.vocabulary()))
        # Every token an opening can hold: all neutral to VADER (a test checks it).
        self.opening_vocabulary: tuple[str, ...] = tuple(sorted(self._opening.vocabulary()))
        self._compile()

    @property
    def n_templates(self) -> int:
        """Number of body-sentence templates."""
        return len(self._sentences)

    @property
    def max_opening_tokens(self) -> int:
        """Length of the longest opening, in tokens (its final "." included)."""
        return self._opening.max_length()

    @property
    def max_review_tokens(self) -> int:
        """Length of the longest review, in tokens."""
        return self._review.max_length()

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, rng: np.random.Generator, p_positive: float) -> list[str]:
        """One review as a list of tokens; each sentiment slot is positive w.p. p_positive."""
        _check_probability("p_positive", p_positive)
        probs = _Probs(
            p_positive, self.p_intensifier, self.p_not, self.p_but, self.p_exclaim,
            self.p_second_sentence, self.p_closing, OPENING_SLOT_PROBABILITY,
        )
        out: list[str] = []
        self._review.sample(rng, probs, out)
        return out

    # -- recognition ----------------------------------------------------------------------------

    def _compile(self) -> None:
        nfa = _Nfa()
        start = nfa.new_state()
        accept = self._review.compile(nfa, start)
        self._nfa = nfa
        self._nfa_accept = accept
        # Lazy subset construction: DFA state i is the NFA state set `_dfa_sets[i]`; -1 is dead.
        self._dfa_sets: list[frozenset[int]] = []
        self._dfa_ids: dict[frozenset[int], int] = {}
        self._dfa_next: list[dict[str, int]] = []
        self._dfa_accepting: list[bool] = []
        self._dfa_start = self._dfa_state(self._closure({start}))

    def _closure(self, states: set[int]) -> frozenset[int]:
        stack, seen = list(states), set(states)
        while stack:
            for nxt in self._nfa.eps[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return frozenset(seen)

    def _dfa_state(self, states: frozenset[int]) -> int:
        if not states:
            return -1
        ident = self._dfa_ids.get(states)
        if ident is None:
            ident = len(self._dfa_sets)
            self._dfa_ids[states] = ident
            self._dfa_sets.append(states)
            self._dfa_next.append({})
            self._dfa_accepting.append(self._nfa_accept in states)
        return ident

    def _step(self, state: int, token: str) -> int:
        cached = self._dfa_next[state].get(token)
        if cached is None:
            targets = {t for s in self._dfa_sets[state] for t in self._nfa.edges[s].get(token, ())}
            cached = self._dfa_state(self._closure(targets)) if targets else -1
            self._dfa_next[state][token] = cached
        return cached

    def _run(self, tokens: Sequence[str]) -> int:
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of tokens, not a string; use str.split()")
        state = self._dfa_start
        for token in tokens:
            state = self._step(state, token)
            if state < 0:
                return -1
        return state

    def is_sentence(self, tokens: Sequence[str]) -> bool:
        """True iff `sample` could return exactly this token sequence: one whole review."""
        state = self._run(tokens)
        return state >= 0 and self._dfa_accepting[state]

    def is_prefix(self, tokens: Sequence[str]) -> bool:
        """True iff the tokens start some producible review (the empty sequence and whole
        reviews included). Exact because every NFA state lies on a start-to-accept path."""
        return self._run(tokens) >= 0


# ---------------------------------------------------------------------------------------------
# Corpus, prompts, tokenizer.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusConfig:
    """How the synthetic review corpus and its prompts are generated."""

    n_reviews: int = 32000
    """Number of reviews in the corpus."""
    p_positive: float = 0.47
    """Probability that a sentiment slot takes a positive word; 0.47 puts the corpus mean VADER
    compound of whole reviews near 0 (measured on 32000 reviews: -0.003 at seed 0, where 0.45
    gives -0.033 and 0.5 gives +0.044)."""
    seed: int = 0
    """Seed of the corpus generator and of the prompt split."""
    max_prompt_body_tokens: int = 5
    """A prompt is the opening plus up to this many neutral tokens of the first body sentence."""
    p_intensifier: float = 0.35
    """Probability that an optional intensifier ("really", "very", ...) is present."""
    p_not: float = 0.2
    """Probability that a copula is negated ("was not good")."""
    p_but: float = 0.2
    """Probability that a sentence carries a ", but ..." clause where its template allows one."""
    p_exclaim: float = 0.03
    """Probability that a sentence ends in "!" rather than "."."""
    p_second_sentence: float = 0.85
    """Probability that the body has a second sentence."""
    p_closing: float = 0.25
    """Probability that the review ends with an "overall , ..." closing sentence."""

    def __post_init__(self) -> None:
        if not isinstance(self.n_reviews, int) or self.n_reviews < 1:
            raise ValueError(f"n_reviews must be a positive integer, got {self.n_reviews!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in _GRAMMAR_PROBABILITIES + ("p_positive",):
            _check_probability(name, getattr(self, name))
        body = self.max_prompt_body_tokens
        if not isinstance(body, int) or body < 0:
            raise ValueError(f"max_prompt_body_tokens must be a non-negative integer, got {body!r}")

    @property
    def grammar(self) -> ReviewGrammar:
        """The grammar these probabilities describe (cached per distinct setting)."""
        return _grammar(*(getattr(self, name) for name in _GRAMMAR_PROBABILITIES))

    @property
    def max_prompt_tokens(self) -> int:
        """Length of the longest possible prompt, in tokens."""
        return self.grammar.max_opening_tokens + self.max_prompt_body_tokens


_GRAMMAR_PROBABILITIES = (
    "p_intensifier", "p_not", "p_but", "p_exclaim", "p_second_sentence", "p_closing",
)


@functools.lru_cache(maxsize=8)
def _grammar(*probabilities: float) -> ReviewGrammar:
    return ReviewGrammar(**dict(zip(_GRAMMAR_PROBABILITIES, probabilities)))


def generate_corpus(config: CorpusConfig) -> list[str]:
    """`config.n_reviews` reviews, tokens joined by single spaces; a function of the config."""
    grammar = config.grammar
    rng = np.random.default_rng(config.seed)
    return [" ".join(grammar.sample(rng, config.p_positive)) for _ in range(config.n_reviews)]


def _hash_key(seed: int, text: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()


def neutral_lead(tokens: Sequence[str]) -> int:
    """How many tokens at the start of `tokens` are neutral: before the first word VADER reads
    (`vader_reads`) or the first punctuation mark."""
    for i, token in enumerate(tokens):
        if vader_reads(token) or token in {".", ",", "!"}:
            return i
    return len(tokens)


def prompt_of(review: str, body_tokens: int) -> str:
    """The review's opening (up to and including its first ".") plus the first `body_tokens`
    tokens of its body, which must be neutral: a ValueError otherwise."""
    tokens = review.split()
    if "." not in tokens:
        raise ValueError(f"review has no opening sentence (no '.'): {review!r}")
    opening = tokens.index(".") + 1
    if body_tokens > neutral_lead(tokens[opening:]):
        raise ValueError(f"the first {body_tokens} body tokens of {review!r} are not all neutral")
    return " ".join(tokens[: opening + body_tokens])


def make_prompts(
    reviews: Sequence[str],
    n_train: int,
    n_val: int,
    n_test: int,
    *,
    max_body_tokens: int = 5,
    seed: int = 0,
) -> tuple[list[str], list[str], list[str]]:
    """Disjoint train, validation and test prompts: distinct neutral openings of reviews.

    Each review yields one prompt (`prompt_of`): its opening plus k neutral tokens of its body,
    k drawn uniformly from [0, min(max_body_tokens, neutral lead)], so the prompt stops before
    any word VADER reads and the completion writes all of the review's sentiment. The distinct
    prompts are ordered by a seeded hash of their text: the first `n_test` are test prompts, the
    next `n_val` validation and the next `n_train` train prompts, disjoint as strings (and the
    test prompts do not change when `n_train` or `n_val` do).
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    if max_body_tokens < 0:
        raise ValueError(f"max_body_tokens must be non-negative, got {max_body_tokens}")
    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    for review in reviews:
        tokens = review.split()
        opening = tokens.index(".") + 1 if "." in tokens else 0
        longest = min(max_body_tokens, neutral_lead(tokens[opening:]))
        prompts.setdefault(prompt_of(review, int(rng.integers(0, longest + 1))), None)
    needed = n_train + n_val + n_test
    if len(prompts) < needed:
        raise ValueError(
            f"only {len(prompts)} distinct prompts in {len(reviews)} reviews, "
            f"need n_train + n_val + n_test = {needed}"
        )
    ordered = sorted(prompts, key=lambda p: _hash_key(seed, p))
    return ordered[n_test + n_val : needed], ordered[n_test : n_test + n_val], ordered[:n_test]


PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
"""Special tokens in id order: <pad> = 0, <eos> = 1, <unk> = 2."""


def build_tokenizer(vocabulary: Sequence[str]):
    """A word-level `PreTrainedTokenizerFast`: specials at ids 0-2, then `vocabulary` in order.

    Splits on whitespace only, so punctuation must already be its own token (as in the corpus);
    `bos_token` is `<eos>` (GPT-2 style), and decoding joins tokens with single spaces.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = list(vocabulary)
    if len(set(words)) != len(words):
        raise ValueError("vocabulary has duplicate tokens")
    for word in words:
        if not word or word != word.strip() or len(word.split()) != 1:
            raise ValueError(f"vocabulary token {word!r} is empty or contains whitespace")
        if word in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary token {word!r} clashes with a special token")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=EOS_TOKEN,
        # The default clean-up would glue " ." to the previous word and break round trips.
        clean_up_tokenization_spaces=False,
    )


def fluent(grammar: ReviewGrammar, prompt: str, completion: str) -> bool:
    """True iff prompt and completion together form a whole review the grammar could produce."""
    return grammar.is_sentence((prompt + " " + completion).split())
