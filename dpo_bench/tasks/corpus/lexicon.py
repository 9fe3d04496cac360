"""The review grammar's words: hand-written candidates kept where VADER scores them, and what VADER
reads.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence


# Word lists. The lexicon has no parts of speech, so the candidates are written by hand and only
# those VADER scores with |valence| >= MIN_ABS_VALENCE survive (see `sentiment_split`).

MIN_ABS_VALENCE = 1.0
"""A candidate sentiment word is kept only if VADER's |valence| is at least this."""

_WORD_SHAPE = re.compile(r"[a-z]{3,}")

STOPLIST = frozenset(
    """lol lmao rofl wtf omg yolo fav xoxo thx ftw smh
    damn hell crap crappy sucks suck shit fuck fucking ass bitch bastard dick piss pissed
    screwed sexy hot kill killer dead die sick""".split()
)
"""Slang, acronyms, profanity and words whose review sense differs from their VADER sense."""

ADJECTIVE_CANDIDATES = """
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

ADVERB_CANDIDATES = """
beautifully brilliantly wonderfully perfectly gracefully elegantly cleverly nicely charmingly
delightfully impressively smartly wisely
badly terribly horribly dreadfully stupidly weakly miserably painfully awkwardly dully foolishly
carelessly pathetically
""".split()

VERB_CANDIDATES = """
loved enjoyed adored admired liked appreciated treasured praised cherished
hated disliked despised loathed regretted resented dreaded abhorred mocked
""".split()

FEELING_CANDIDATES = """
happy glad joyful cheerful delighted excited inspired hopeful grateful thrilled amused pleased
relaxed
sad unhappy bored annoyed angry depressed disappointed miserable frustrated confused upset uneasy
lonely nervous anxious disgusted
""".split()

# Neutral words: none of these is in VADER's lexicon (a test checks it).
NOUNS = """
movie film plot acting ending script cast director story soundtrack dialogue music pacing
screenplay sequel cinematography finale premise twist remake
""".split()
WORKS = "movie film story script screenplay sequel remake episode".split()
CREWS = "cast crew ensemble actor actress director".split()
PARTICIPLES = "made shot written directed edited acted".split()
DETERMINERS = ["the", "this"]
BE = ["was", "is"]
SEEM = ["felt", "seemed"]
# Intensifiers are VADER boosters that are not themselves sentiment words.
INTENSIFIERS = "really very extremely quite so incredibly totally".split()
VERB_INTENSIFIERS = "really absolutely totally completely".split()

# The opening: who watched what, where, when and with whom. Every word is neutral to VADER (a
# test checks each against the lexicon, the boosters and the negations), which rules out some
# natural choices: "friend", "friends", "comedy", "horror", "romance", "thriller", "festival",
# "holidays", "alone" and "original" all carry a valence.
RELATIVES = """
sister brother wife husband roommate dad mom parents kids cousin girlfriend boyfriend partner
neighbor
""".split()
WATCHED = ["watched", "saw", "rented", "streamed", "caught", "rewatched", "finally watched",
            "went to see"]
# Kinds of film that no body sentence names: after "the" the next word tells opening from body.
FILM_KINDS = """
documentary western drama musical mystery adaptation prequel cartoon biopic anime miniseries
reboot satire fantasy
""".split()
FILM_MODIFIERS = "new latest recent old animated indie french italian japanese korean".split()
PLACES = ["at the cinema", "at the theater", "at home", "on netflix", "on the plane",
           "on my laptop", "on tv", "on the couch"]
TIMES = ["last night", "last week", "last weekend", "this weekend", "yesterday", "on friday",
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


def sentiment_split(candidates: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
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


