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

from .lexicon import MIN_ABS_VALENCE, OPENING_SLOT_PROBABILITY, STOPLIST, vader_lexicon, vader_reads
from .grammar import ReviewGrammar
from .reviews import (
    CorpusConfig, SPECIAL_TOKENS, build_tokenizer, fluent, generate_corpus, make_prompts, neutral_lead, prompt_of,
)

__all__ = [
    "CorpusConfig",
    "MIN_ABS_VALENCE",
    "OPENING_SLOT_PROBABILITY",
    "ReviewGrammar",
    "SPECIAL_TOKENS",
    "STOPLIST",
    "build_tokenizer",
    "fluent",
    "generate_corpus",
    "make_prompts",
    "neutral_lead",
    "prompt_of",
    "vader_lexicon",
    "vader_reads",
]
