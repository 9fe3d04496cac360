"""The corpus of reviews, the prompts cut from them, and the policy's word-level tokenizer."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .grammar import ReviewGrammar, check_probability
from .lexicon import vader_reads

# Corpus, prompts, tokenizer.


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
            check_probability(name, getattr(self, name))
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
