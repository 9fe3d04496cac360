"""The review grammar: one tree of nodes drives both the sampler and the recogniser, which is what
makes the recogniser (the fluency measure) exact with respect to the generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .lexicon import (
    OPENING_SLOT_PROBABILITY, ADJECTIVE_CANDIDATES, ADVERB_CANDIDATES, BE, CREWS, DETERMINERS, FEELING_CANDIDATES,
    FILM_KINDS, FILM_MODIFIERS, INTENSIFIERS, NOUNS, PARTICIPLES, PLACES, RELATIVES, SEEM, TIMES, VERB_CANDIDATES,
    VERB_INTENSIFIERS, WATCHED, WORKS, sentiment_split, vader_lexicon,
)

# Grammar nodes. One tree drives both the sampler and the recogniser, which is what makes the
# recogniser exact with respect to the generator.


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


def check_probability(name: str, value: float) -> None:
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
            check_probability(name, value)
        self.p_intensifier = float(p_intensifier)
        self.p_not = float(p_not)
        self.p_but = float(p_but)
        self.p_exclaim = float(p_exclaim)
        self.p_second_sentence = float(p_second_sentence)
        self.p_closing = float(p_closing)

        adjectives = sentiment_split(ADJECTIVE_CANDIDATES)
        adverbs = sentiment_split(ADVERB_CANDIDATES)
        verbs = sentiment_split(VERB_CANDIDATES)
        feelings = sentiment_split(FEELING_CANDIDATES)
        lexicon = vader_lexicon()
        # Every sentiment word of the grammar -> its VADER valence.
        self.sentiment_words: dict[str, float] = {
            w: lexicon[w]
            for pair in (adjectives, adverbs, verbs, feelings)
            for ws in pair
            for w in ws
        }

        words = _words
        det, noun = words(*DETERMINERS), words(*NOUNS)
        be, seem = words(*BE), words(*SEEM)
        intensifier = _Optional(words(*INTENSIFIERS), "intensifier")
        verb_intensifier = _Optional(words(*VERB_INTENSIFIERS), "intensifier")
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
                (det, words(*WORKS), be, intensifier, _Sentiment(*adverbs),
                 words(*PARTICIPLES), end)
            ),
            # the cast performed wonderfully .
            _Seq((det, words(*CREWS), words("performed"), intensifier, _Sentiment(*adverbs), end)),
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
                (det, words(*WORKS), be, adj_phrase, words("from"), words("start"), words("to"),
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

        watched = _phrases(WATCHED)
        work = _Seq((det, slot(words(*FILM_MODIFIERS)), words(*FILM_KINDS)))
        where, when = slot(_phrases(PLACES)), slot(_phrases(TIMES))
        relative = words(*RELATIVES)
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
        check_probability("p_positive", p_positive)
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


