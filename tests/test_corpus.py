"""The review generator, its grammar (the fluency measure), prompts and tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer
from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE, SentimentIntensityAnalyzer

from dpo_bench.tasks.corpus import (
    CorpusConfig,
    ReviewGrammar,
    build_tokenizer,
    fluent,
    generate_corpus,
    make_prompts,
    neutral_lead,
    prompt_of,
    vader_reads,
)

SLANG_AND_PROFANITY = {
    "lol", "lmao", "rofl", "wtf", "omg", "ayor", "yolo", "fav", "xoxo", "thx", "damn", "hell",
    "crap", "sucks", "shit", "fuck", "ass", "bitch", "bastard", "dick", "piss", "fubar", "snafu",
}
TERMINALS = {".", "!"}
OPENING = "we saw the new documentary at the cinema on friday ."


@pytest.fixture(scope="module")
def grammar() -> ReviewGrammar:
    return ReviewGrammar()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus(CorpusConfig(n_reviews=3000, seed=11))


@pytest.fixture(scope="module")
def lexicon() -> dict[str, float]:
    return SentimentIntensityAnalyzer().lexicon


@pytest.fixture(scope="module")
def analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def _opening_length(tokens: list[str]) -> int:
    return tokens.index(".") + 1


# -- the grammar accepts what it generates ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_sampled_review_is_accepted_and_its_prefixes_are_prefixes(grammar, seed):
    rng = np.random.default_rng(seed)
    for _ in range(500):
        tokens = grammar.sample(rng, 0.5)
        assert grammar.is_sentence(tokens), tokens
        opening = _opening_length(tokens)
        for k in range(len(tokens)):
            assert grammar.is_prefix(tokens[:k]), tokens[:k]
            # A proper prefix is a whole review only if it ends a body sentence: never inside the
            # opening, never right after it (the body is required), never inside a sentence.
            if grammar.is_sentence(tokens[:k]):
                assert k > opening and tokens[k - 1] in TERMINALS, tokens[:k]


def test_generated_corpus_is_grammatical_and_tokens_are_space_separated(grammar, corpus):
    assert len(corpus) == 3000
    for review in corpus:
        assert review == " ".join(review.split())
        assert grammar.is_sentence(review.split()), review


@pytest.mark.parametrize(
    "body",
    [
        "the acting was really wonderful .",
        "i thought the plot was not bad , but the ending felt dull .",
        "i really loved the film !",
        "the movie was very beautifully shot . the cast performed wonderfully .",
        "the ending made me feel so sad . the movie was funny and really boring .",
        "i found the script extremely clever , but the acting was awful . "
        "overall , the film was not good .",
        "the sequel was dull from start to finish . overall , i really enjoyed it .",
        "the plot was good . the acting was bad . overall , i hated it .",
    ],
)
def test_hand_written_reviews_are_accepted(grammar, body):
    assert grammar.is_sentence(f"{OPENING} {body}".split())


@pytest.mark.parametrize(
    "opening",
    [
        "i watched this drama last night with my sister .",
        "we saw the new prequel at the cinema on friday .",
        "my roommate and i rented the documentary after work .",
        "i finally watched the old western .",
        "we went to see the latest anime at the theater this weekend .",
    ],
)
def test_hand_written_openings_are_accepted(grammar, opening):
    assert grammar.is_sentence(f"{opening} the plot was good .".split())


@pytest.mark.parametrize(
    "text",
    [
        OPENING,  # the body is required
        "the movie was good .",  # no opening
        f"{OPENING} {OPENING} the plot was good .",  # two openings
        "we saw the great documentary . the plot was good .",  # sentiment in the opening
        "we saw the movie . the plot was good .",  # a body noun in the opening's film slot
        "we saw the documentary with my sister at home . the plot was good .",  # slots out of order
        "my sister and i saw the drama with my brother . the plot was good .",  # company twice
        "we saw the documentary the plot was good .",  # the opening's "." missing
        "we saw the documentary ! the plot was good .",  # an opening does not exclaim
        f"{OPENING} the plot was good . the plot was good . the plot was good .",  # three sentences
        f"{OPENING} overall , the film was good .",  # a closing needs a body sentence first
        f"{OPENING} overall , the film was good . the plot was bad .",  # the closing comes last
        f"{OPENING} the plot was good . overall , i loved it . overall , i loved it .",
        f"{OPENING} the plot was good . <eos>",
        f"{OPENING} the the movie was good .",  # repeated word
        f"{OPENING} the movie was very very good .",  # repeated intensifier
        f"{OPENING} the movie was good ! !",  # repeated "!"
        f"{OPENING} the movie was good . .",
        f"{OPENING} the movie was good",  # cut short
        f"{OPENING} the movie was good , but",  # cut short inside the clause
        f"{OPENING} the movie was zorgful .",  # unknown word
        f"{OPENING} the movie was lol .",  # slang is not in the vocabulary
        f"{OPENING} the good was movie .",  # words in the wrong slots
        f"{OPENING} the movie felt not good .",  # "not" only after a copula
        f"{OPENING} the cast performed good .",  # adjective in an adverb slot
        f"{OPENING} overall , the film was good , but the plot was bad .",  # no clause here
        f"{OPENING} but the movie was good .",  # leading "but"
        "",
    ],
)
def test_near_misses_are_rejected(grammar, text):
    assert not grammar.is_sentence(text.split())


def test_prefix_examples(grammar):
    assert grammar.is_prefix([])
    assert grammar.is_prefix("we saw the".split())
    assert grammar.is_prefix(f"{OPENING} the movie was not".split())
    assert grammar.is_prefix(f"{OPENING} the movie was good .".split())
    assert not grammar.is_prefix("the movie was".split())  # the opening comes first
    assert not grammar.is_prefix(f"{OPENING} the movie felt not".split())
    closed = f"{OPENING} the movie was good . overall , i loved it ."
    assert not grammar.is_prefix(f"{closed} the".split())
    assert not grammar.is_prefix(["zorgful"])


def test_a_string_is_not_taken_for_a_token_sequence(grammar):
    with pytest.raises(TypeError):
        grammar.is_sentence("the movie was good .")


def test_fluent_reads_prompt_and_completion_together(grammar):
    assert fluent(grammar, OPENING, "the movie was really good .")
    assert fluent(grammar, f"{OPENING} the movie was", "not good , but the plot felt dull .")
    assert not fluent(grammar, OPENING, "")  # the body is the completion's to write
    assert not fluent(grammar, f"{OPENING} the movie was", "good . good")
    assert not fluent(grammar, f"{OPENING} the movie was", "good ! !")


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
def test_edited_reviews_keep_the_invariants(grammar, seed, edit, where, word):
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
        # A review ends in a terminal, its opening is neutral and ends in ".", and no token
        # follows itself.
        assert tokens[-1] in TERMINALS
        opening = tokens[: _opening_length(tokens)]
        assert not any(vader_reads(t) for t in opening) and "!" not in opening
        assert all(a != b for a, b in zip(tokens, tokens[1:]))
    prefix_flags = [grammar.is_prefix(tokens[:k]) for k in range(len(tokens) + 1)]
    # Once a sequence stops being a prefix, no extension is one again.
    first_bad = prefix_flags.index(False) if False in prefix_flags else len(prefix_flags)
    assert not any(prefix_flags[first_bad:])


def _complete(grammar: ReviewGrammar, tokens: list[str], budget: int = 30) -> bool:
    """Depth-first search for a completion to a whole review (no prefix may be a dead end)."""
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
@given(choices=st.lists(st.integers(0, 10**6), min_size=1, max_size=20))
def test_every_prefix_reached_by_a_walk_can_be_completed(grammar, choices):
    tokens: list[str] = []
    for choice in choices:
        options = [t for t in grammar.vocabulary if grammar.is_prefix(tokens + [t])]
        if not options:
            assert grammar.is_sentence(tokens)
            break
        tokens.append(options[choice % len(options)])
    assert _complete(grammar, tokens)


def test_lengths_are_bounded_by_the_grammar(grammar, corpus):
    lengths = [len(r.split()) for r in corpus]
    openings = [_opening_length(r.split()) for r in corpus]
    assert max(lengths) <= grammar.max_review_tokens
    assert max(openings) <= grammar.max_opening_tokens
    assert min(openings) >= 5 and min(lengths) >= 10


# -- vocabulary ---------------------------------------------------------------------------------


def test_vocabulary_is_sorted_unique_and_has_no_slang(grammar):
    vocab = grammar.vocabulary
    assert list(vocab) == sorted(set(vocab))
    assert {".", ",", "!", "not", "but", "the", "movie", "watched", "cinema"} <= set(vocab)
    assert set(grammar.opening_vocabulary) < set(vocab)
    assert not SLANG_AND_PROFANITY & set(vocab)
    for word in vocab:
        assert re.fullmatch(r"[a-z]+|[.,!]", word), word


def test_vocabulary_is_exactly_what_the_generator_emits(grammar):
    rng = np.random.default_rng(5)
    seen = {t for _ in range(10000) for t in grammar.sample(rng, 0.5)}
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


def test_every_opening_word_is_neutral_to_vader(grammar, lexicon):
    for word in grammar.opening_vocabulary:
        assert word not in lexicon, word
        assert word not in BOOSTER_DICT and word not in NEGATE, word
        assert word not in {"but", "least", "!", "?"}, word
        assert not vader_reads(word), word
    # Words a reviewer would reach for that VADER reads: kept out of the opening.
    assert not {"friend", "friends", "comedy", "horror", "romance", "festival", "alone"} & set(
        grammar.opening_vocabulary
    )


def test_openings_score_zero_and_are_many(analyzer, corpus):
    openings = {" ".join(r.split()[: _opening_length(r.split())]) for r in corpus}
    # Thousands of distinct openings in 3000 reviews: nearly every review has its own.
    assert len(openings) > 0.9 * len(corpus)
    for opening in openings:
        assert analyzer.polarity_scores(opening)["compound"] == 0.0, opening


def test_vader_reads_its_rules_and_lexicon_but_not_neutral_words():
    for word in ["good", "awful", "very", "not", "but", "!", "without"]:
        assert vader_reads(word), word
    for word in ["the", "movie", "watched", "sister", ".", ","]:
        assert not vader_reads(word), word


# -- corpus -------------------------------------------------------------------------------------


def test_corpus_is_deterministic_in_the_seed():
    a = generate_corpus(CorpusConfig(n_reviews=300, seed=3))
    assert a == generate_corpus(CorpusConfig(n_reviews=300, seed=3))
    assert a != generate_corpus(CorpusConfig(n_reviews=300, seed=4))


def test_corpus_mean_compound_is_near_zero(corpus, analyzer):
    compound = np.array([analyzer.polarity_scores(r)["compound"] for r in corpus])
    assert abs(compound.mean()) < 0.05
    # Both signs are common and the spread is wide: the corpus is mixed, not neutral.
    assert 0.4 < (compound > 0).mean() < 0.6
    assert compound.std() > 0.5


def test_p_positive_moves_the_corpus_sentiment(analyzer):
    def mean(p):
        reviews = generate_corpus(CorpusConfig(n_reviews=600, p_positive=p, seed=1))
        return np.mean([analyzer.polarity_scores(r)["compound"] for r in reviews])

    assert mean(0.9) > 0.5 and mean(0.1) < -0.5


def test_body_sentences_closing_and_exclamations(corpus):
    bodies = [r.split()[_opening_length(r.split()):] for r in corpus]
    n_sentences = np.array([sum(t in TERMINALS for t in b) for b in bodies])
    closing = np.array(["overall" in b for b in bodies])
    # One sentence sometimes, two usually, sometimes a closing after them.
    assert 0.05 < (n_sentences == 1).mean() < 0.2
    assert 0.15 < closing.mean() < 0.35
    assert set(n_sentences) == {1, 2, 3}
    share = np.mean([t == "!" for b in bodies for t in b if t in TERMINALS])
    assert 0.005 < share < 0.08
    assert not any("! !" in r for r in corpus)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_reviews", 0),
        ("p_positive", 0.0),
        ("p_positive", 1.0),
        ("seed", -1),
        ("max_prompt_body_tokens", -1),
        ("p_intensifier", 1.5),
        ("p_not", 0.0),
        ("p_but", -0.1),
        ("p_exclaim", 1.0),
        ("p_second_sentence", 1.0),
        ("p_closing", 0.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CorpusConfig(**{field: value})


def test_grammar_probabilities_are_validated():
    with pytest.raises(ValueError, match="p_not"):
        ReviewGrammar(p_not=0.0)
    with pytest.raises(ValueError, match="p_second_sentence"):
        ReviewGrammar(p_second_sentence=1.0)
    with pytest.raises(ValueError, match="p_positive"):
        ReviewGrammar().sample(np.random.default_rng(0), 1.0)


def test_config_grammar_follows_its_probabilities():
    config = CorpusConfig(p_closing=0.5)
    assert config.grammar.p_closing == 0.5 and config.grammar is CorpusConfig(p_closing=0.5).grammar
    longest = config.grammar.max_opening_tokens + config.max_prompt_body_tokens
    assert config.max_prompt_tokens == longest


# -- prompts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits(corpus):
    return make_prompts(corpus, 1000, 100, 200, max_body_tokens=5, seed=0)


def test_prompts_are_three_disjoint_sets_of_distinct_strings(splits):
    train, val, test = splits
    assert (len(train), len(val), len(test)) == (1000, 100, 200)
    for prompts in splits:
        assert len(set(prompts)) == len(prompts)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)


def test_prompts_are_openings_cut_before_any_word_vader_reads(grammar, corpus, splits, analyzer):
    starts = {" ".join(r.split()[:k]) for r in corpus for k in range(len(r.split()))}
    body_lengths = []
    for prompt in [p for prompts in splits for p in prompts]:
        tokens = prompt.split()
        assert prompt in starts
        assert grammar.is_prefix(tokens) and not grammar.is_sentence(tokens)
        # A whole opening, then only neutral words: the sentiment is the completion's to write.
        assert tokens.count(".") == 1 and "!" not in tokens
        assert not any(vader_reads(t) for t in tokens), prompt
        assert analyzer.polarity_scores(prompt)["compound"] == 0.0
        body_lengths.append(len(tokens) - _opening_length(tokens))
    counts = np.bincount(body_lengths)
    # 0 to 5 body tokens, each length common: prompts do not all end at the opening.
    assert len(counts) == 6 and counts.min() > 0.015 * len(body_lengths)


def test_prompts_stop_where_the_neutral_lead_of_the_body_stops(corpus):
    for review in corpus[:500]:
        tokens = review.split()
        lead = neutral_lead(tokens[_opening_length(tokens):])
        assert 1 <= lead <= 5, review
        body = tokens[_opening_length(tokens):]
        assert vader_reads(body[lead]) or body[lead] in {".", ",", "!"}
        assert prompt_of(review, lead) == " ".join(tokens[: _opening_length(tokens) + lead])
        with pytest.raises(ValueError, match="neutral"):
            prompt_of(review, lead + 1)
    with pytest.raises(ValueError, match="opening"):
        prompt_of("the movie was good", 0)


def test_completion_lengths_leave_the_writing_to_the_policy(corpus):
    """Completion = the review after its prompt, plus EOS: typically 8-24 tokens, never 1."""
    rng = np.random.default_rng(0)
    lengths = []
    for review in corpus:
        tokens = review.split()
        opening = _opening_length(tokens)
        k = int(rng.integers(0, min(5, neutral_lead(tokens[opening:])) + 1))
        prompt = prompt_of(review, k)
        lengths.append(len(tokens) - len(prompt.split()) + 1)
    lengths = np.array(lengths)
    assert 13 <= lengths.mean() <= 17 and 12 <= np.median(lengths) <= 16
    assert lengths.min() >= 3
    assert 0.75 < ((lengths >= 8) & (lengths <= 24)).mean()
    assert (lengths > 32).mean() < 0.005


def test_prompts_are_deterministic_and_test_prompts_do_not_depend_on_the_other_sizes(corpus):
    a = make_prompts(corpus, 300, 50, 80, seed=7)
    assert a == make_prompts(corpus, 300, 50, 80, seed=7)
    assert a != make_prompts(corpus, 300, 50, 80, seed=8)
    smaller = make_prompts(corpus, 100, 50, 80, seed=7)
    assert smaller[2] == a[2] and smaller[1] == a[1] and set(smaller[0]) < set(a[0])


def test_prompts_without_body_tokens_are_openings(corpus):
    train, val, test = make_prompts(corpus, 200, 20, 20, max_body_tokens=0, seed=0)
    assert all(p.endswith(" .") and p.count(".") == 1 for p in train + val + test)


def test_too_few_distinct_prompts_raise(corpus):
    with pytest.raises(ValueError, match="distinct prompts"):
        make_prompts(corpus[:50], 100, 10, 10, seed=0)
    with pytest.raises(ValueError, match="n_val"):
        make_prompts(corpus, 10, -1, 10, seed=0)


# -- tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(grammar):
    return build_tokenizer(grammar.vocabulary)


def test_tokenizer_special_ids_and_size(tokenizer, grammar):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id == 1
    assert len(tokenizer) == len(grammar.vocabulary) + 3
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<eos>", "<unk>"]


def test_tokenizer_round_trips_every_review_one_id_per_token(tokenizer, corpus):
    for review in corpus[:500]:
        ids = tokenizer(review)["input_ids"]
        assert len(ids) == len(review.split())
        assert 2 not in ids
        assert tokenizer.decode(ids) == review


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
    for review in corpus[:100]:
        ids = loaded(review)["input_ids"]
        assert ids == tokenizer(review)["input_ids"]
        assert loaded.decode(ids) == review
    batch = loaded(["the movie was good .", "the movie"], padding=True)
    assert batch["input_ids"][1][2:] == [0, 0, 0]
    assert batch["attention_mask"] == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


@pytest.mark.parametrize("vocabulary", [["a", "a"], ["a b"], [""], ["<pad>"]])
def test_tokenizer_rejects_bad_vocabularies(vocabulary):
    with pytest.raises(ValueError):
        build_tokenizer(vocabulary)
