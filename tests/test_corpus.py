"""The review generator, its grammar (the fluency measure), prompts and tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer
from vaderSentiment.vaderSentiment import BOOSTER_DICT, SentimentIntensityAnalyzer

from dpo_bench.tasks.corpus import (
    CorpusConfig,
    ReviewGrammar,
    build_tokenizer,
    fluent,
    generate_corpus,
    make_prompts,
)

SLANG_AND_PROFANITY = {
    "lol", "lmao", "rofl", "wtf", "omg", "ayor", "yolo", "fav", "xoxo", "thx", "damn", "hell",
    "crap", "sucks", "shit", "fuck", "ass", "bitch", "bastard", "dick", "piss", "fubar", "snafu",
}


@pytest.fixture(scope="module")
def grammar() -> ReviewGrammar:
    return ReviewGrammar()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus(CorpusConfig(n_sentences=3000, seed=11))


@pytest.fixture(scope="module")
def lexicon() -> dict[str, float]:
    return SentimentIntensityAnalyzer().lexicon


# -- the grammar accepts what it generates ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_sampled_sentence_is_a_sentence_and_its_prefixes_are_prefixes(grammar, seed):
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        tokens = grammar.sample(rng, 0.5)
        assert grammar.is_sentence(tokens), tokens
        for k in range(len(tokens)):
            assert grammar.is_prefix(tokens[:k]), tokens[:k]
            # A proper prefix is never already complete: the terminal comes last.
            assert not grammar.is_sentence(tokens[:k]), tokens[:k]


def test_generated_corpus_is_grammatical_and_tokens_are_space_separated(grammar, corpus):
    assert len(corpus) == 3000
    for sentence in corpus:
        assert sentence == " ".join(sentence.split())
        assert grammar.is_sentence(sentence.split()), sentence


@pytest.mark.parametrize(
    "text",
    [
        "the acting was really wonderful .",
        "i thought the plot was not bad , but the ending felt dull .",
        "i really loved the film !",
        "the movie was very beautifully shot .",
        "the cast performed wonderfully .",
        "overall , the film was not good .",
        "the ending made me feel so sad .",
        "the movie was funny and really boring .",
        "i found the script extremely clever , but the acting was awful .",
        "the sequel was dull from start to finish .",
    ],
)
def test_hand_written_sentences_are_accepted(grammar, text):
    assert grammar.is_sentence(text.split())


@pytest.mark.parametrize(
    "text",
    [
        "the the movie was good .",  # repeated word
        "the movie was very very good .",  # repeated intensifier
        "the movie was good ! !",  # repeated "!"
        "the movie was good . .",
        "the movie was good ! .",
        "the movie was good",  # cut short
        "the movie was good , but",  # cut short inside the clause
        "the movie was zorgful .",  # unknown word
        "the movie was lol .",  # slang is not in the vocabulary
        "the good was movie .",  # words in the wrong slots
        "the movie felt not good .",  # "not" only after a copula
        "the cast performed good .",  # adjective in an adverb slot
        "i loved the movie good .",
        "overall , the film was good , but the plot was bad .",  # no clause in this template
        "but the movie was good .",  # leading "but"
        "the movie was good",
        ". the movie was good",
        "",
    ],
)
def test_ungrammatical_strings_are_rejected(grammar, text):
    assert not grammar.is_sentence(text.split())


def test_prefix_examples(grammar):
    assert grammar.is_prefix([])
    assert grammar.is_prefix("the movie was not".split())
    assert grammar.is_prefix("the movie was good".split())
    assert grammar.is_prefix("the movie was good .".split())
    assert not grammar.is_prefix("the movie was good . the".split())
    assert not grammar.is_prefix("the the".split())
    assert not grammar.is_prefix("the movie felt not".split())
    assert not grammar.is_prefix(["zorgful"])


def test_a_string_is_not_taken_for_a_token_sequence(grammar):
    with pytest.raises(TypeError):
        grammar.is_sentence("the movie was good .")


def test_fluent_reads_prompt_and_completion_together(grammar):
    assert fluent(grammar, "the movie was", "really good .")
    assert fluent(grammar, "the movie was not", "good , but the plot felt dull .")
    assert not fluent(grammar, "the movie was", "good . good")
    assert not fluent(grammar, "the movie was", "good ! !")
    assert not fluent(grammar, "the movie was", "")


def _tokens_strategy(grammar: ReviewGrammar):
    words = list(grammar.vocabulary) + ["zorgful"]
    return st.lists(st.sampled_from(words), max_size=18)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_sequences_sentence_implies_prefix_and_prefixes_are_closed(grammar, data):
    tokens = data.draw(_tokens_strategy(grammar))
    if grammar.is_sentence(tokens):
        assert grammar.is_prefix(tokens)
    if grammar.is_prefix(tokens):
        assert all(grammar.is_prefix(tokens[:k]) for k in range(len(tokens)))
    else:
        extra = data.draw(_tokens_strategy(grammar))
        assert not grammar.is_prefix(tokens + extra)
        assert not grammar.is_sentence(tokens + extra)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       edit=st.sampled_from(["delete", "insert", "replace", "swap"]),
       where=st.floats(0, 1, exclude_max=True), word=st.integers(0, 10**6))
def test_edited_sentences_keep_the_invariants(grammar, seed, edit, where, word):
    tokens = grammar.sample(np.random.default_rng(seed), 0.5)
    i = int(where * len(tokens))
    w = grammar.vocabulary[word % len(grammar.vocabulary)]
    if edit == "delete":
        tokens = tokens[:i] + tokens[i + 1:]
    elif edit == "insert":
        tokens = tokens[:i] + [w] + tokens[i:]
    elif edit == "replace":
        tokens = tokens[:i] + [w] + tokens[i + 1:]
    else:
        j = min(i + 1, len(tokens) - 1)
        tokens[i], tokens[j] = tokens[j], tokens[i]
    if grammar.is_sentence(tokens):
        assert grammar.is_prefix(tokens)
        # A sentence has exactly one terminal, at the end, and no doubled token.
        assert tokens[-1] in {".", "!"}
        assert sum(t in {".", "!"} for t in tokens) == 1
        assert all(a != b for a, b in zip(tokens, tokens[1:]))
    prefix_flags = [grammar.is_prefix(tokens[:k]) for k in range(len(tokens) + 1)]
    # Once a sequence stops being a prefix, no extension is one again.
    first_bad = prefix_flags.index(False) if False in prefix_flags else len(prefix_flags)
    assert not any(prefix_flags[first_bad:])


def _complete(grammar: ReviewGrammar, tokens: list[str], budget: int = 25) -> bool:
    """Depth-first search for a completion to a full sentence (no prefix may be a dead end)."""
    if grammar.is_sentence(tokens):
        return True
    if budget == 0:
        return False
    # Try terminals first, then words: short completions are found quickly.
    for token in (".", "!", *grammar.vocabulary):
        if grammar.is_prefix(tokens + [token]) and _complete(grammar, tokens + [token], budget - 1):
            return True
    return False


@settings(max_examples=40, deadline=None)
@given(choices=st.lists(st.integers(0, 10**6), min_size=1, max_size=10))
def test_every_prefix_reached_by_a_walk_can_be_completed(grammar, choices):
    tokens: list[str] = []
    for choice in choices:
        options = [t for t in grammar.vocabulary if grammar.is_prefix(tokens + [t])]
        if not options:
            assert grammar.is_sentence(tokens)
            break
        tokens.append(options[choice % len(options)])
    assert _complete(grammar, tokens)


# -- vocabulary ---------------------------------------------------------------------------------


def test_vocabulary_is_sorted_unique_and_has_no_slang(grammar):
    vocab = grammar.vocabulary
    assert list(vocab) == sorted(set(vocab))
    assert {".", ",", "!", "not", "but", "the", "movie"} <= set(vocab)
    assert not SLANG_AND_PROFANITY & set(vocab)
    for word in vocab:
        assert re.fullmatch(r"[a-z]+|[.,!]", word), word


def test_vocabulary_is_exactly_what_the_generator_emits(grammar):
    rng = np.random.default_rng(5)
    seen = {t for _ in range(20000) for t in grammar.sample(rng, 0.5)}
    assert seen == set(grammar.vocabulary)


def test_sentiment_words_come_from_vader_and_everything_else_is_neutral(grammar, lexicon):
    assert len(grammar.positive_words) >= 40 and len(grammar.negative_words) >= 40
    for word, valence in grammar.sentiment_words.items():
        assert re.fullmatch(r"[a-z]{3,}", word), word
        assert lexicon[word] == valence and abs(valence) >= 1.0, word
    assert all(grammar.sentiment_words[w] > 0 for w in grammar.positive_words)
    assert all(grammar.sentiment_words[w] < 0 for w in grammar.negative_words)
    neutral = set(grammar.vocabulary) - set(grammar.sentiment_words)
    assert not neutral & set(lexicon), sorted(neutral & set(lexicon))
    assert {"really", "very", "extremely"} <= neutral & set(BOOSTER_DICT)


# -- corpus -------------------------------------------------------------------------------------


def test_corpus_is_deterministic_in_the_seed():
    a = generate_corpus(CorpusConfig(n_sentences=500, seed=3))
    assert a == generate_corpus(CorpusConfig(n_sentences=500, seed=3))
    assert a != generate_corpus(CorpusConfig(n_sentences=500, seed=4))


def test_corpus_mean_compound_is_near_zero(corpus):
    analyzer = SentimentIntensityAnalyzer()
    compound = np.array([analyzer.polarity_scores(s)["compound"] for s in corpus])
    assert abs(compound.mean()) < 0.05
    # Both signs are common: the corpus is mixed, not neutral.
    assert 0.35 < (compound > 0).mean() < 0.65


def test_p_positive_moves_the_corpus_sentiment():
    analyzer = SentimentIntensityAnalyzer()

    def mean(p):
        sentences = generate_corpus(CorpusConfig(n_sentences=800, p_positive=p, seed=1))
        return np.mean([analyzer.polarity_scores(s)["compound"] for s in sentences])

    assert mean(0.9) > 0.3 and mean(0.1) < -0.3


def test_exclamation_is_rare_and_never_doubled(corpus):
    tokens = [s.split() for s in corpus]
    share = np.mean([t[-1] == "!" for t in tokens])
    assert 0.005 < share < 0.08
    assert not any("! !" in s for s in corpus)
    lengths = [len(t) for t in tokens]
    assert min(lengths) >= 5 and max(lengths) <= 20


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_sentences", 0),
        ("p_positive", 0.0),
        ("p_positive", 1.0),
        ("seed", -1),
        ("min_prompt_tokens", 0),
        ("max_prompt_tokens", 1),
        ("p_intensifier", 1.5),
        ("p_not", 0.0),
        ("p_but", -0.1),
        ("p_exclaim", 1.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CorpusConfig(**{field: value})


def test_grammar_probabilities_are_validated():
    with pytest.raises(ValueError, match="p_not"):
        ReviewGrammar(p_not=0.0)
    with pytest.raises(ValueError, match="p_positive"):
        ReviewGrammar().sample(np.random.default_rng(0), 1.0)


# -- prompts ------------------------------------------------------------------------------------


def test_prompts_are_disjoint_distinct_proper_prefixes(grammar, corpus):
    train, evaluation = make_prompts(corpus, 1000, 200, min_tokens=2, max_tokens=8, seed=0)
    assert len(train) == 1000 and len(evaluation) == 200
    assert len(set(train)) == 1000 and len(set(evaluation)) == 200
    assert not set(train) & set(evaluation)
    starts = {" ".join(s.split()[:k]) for s in corpus for k in range(2, 9) if k < len(s.split())}
    for prompt in train + evaluation:
        tokens = prompt.split()
        assert 2 <= len(tokens) <= 8
        assert prompt in starts
        assert grammar.is_prefix(tokens) and not grammar.is_sentence(tokens)


def test_prompts_are_deterministic_and_respect_length_bounds(corpus):
    a = make_prompts(corpus, 300, 50, min_tokens=3, max_tokens=4, seed=7)
    assert a == make_prompts(corpus, 300, 50, min_tokens=3, max_tokens=4, seed=7)
    assert a != make_prompts(corpus, 300, 50, min_tokens=3, max_tokens=4, seed=8)
    assert all(3 <= len(p.split()) <= 4 for p in a[0] + a[1])


def test_too_few_distinct_prefixes_raise(corpus):
    with pytest.raises(ValueError, match="distinct prefixes"):
        make_prompts(corpus[:50], 100, 10, min_tokens=2, max_tokens=8, seed=0)


# -- tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(grammar):
    return build_tokenizer(grammar.vocabulary)


def test_tokenizer_special_ids_and_size(tokenizer, grammar):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id == 1
    assert len(tokenizer) == len(grammar.vocabulary) + 3
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<eos>", "<unk>"]


def test_tokenizer_round_trips_every_sentence_one_id_per_token(tokenizer, corpus):
    for sentence in corpus[:500]:
        ids = tokenizer(sentence)["input_ids"]
        assert len(ids) == len(sentence.split())
        assert 2 not in ids
        assert tokenizer.decode(ids) == sentence


def test_tokenizer_unknown_words_and_special_tokens(tokenizer):
    ids = tokenizer("the zorgful movie")["input_ids"]
    assert ids[1] == 2 and ids[0] != 2
    sentence = "the movie was good ."
    ids = tokenizer(sentence)["input_ids"] + [tokenizer.eos_token_id, 0, 0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    assert tokenizer.decode(ids) == sentence + " <eos> <pad> <pad>"


def test_tokenizer_saves_and_loads(tokenizer, corpus, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.bos_token_id) == (
        0, 1, 2, 1,
    )
    for sentence in corpus[:100]:
        ids = loaded(sentence)["input_ids"]
        assert ids == tokenizer(sentence)["input_ids"]
        assert loaded.decode(ids) == sentence
    batch = loaded(["the movie was good .", "the movie"], padding=True)
    assert batch["input_ids"][1][2:] == [0, 0, 0]
    assert batch["attention_mask"] == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


@pytest.mark.parametrize("vocabulary", [["a", "a"], ["a b"], [""], ["<pad>"]])
def test_tokenizer_rejects_bad_vocabularies(vocabulary):
    with pytest.raises(ValueError):
        build_tokenizer(vocabulary)
