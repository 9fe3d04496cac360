"""Gold scorers: VADER for the sentiment task, the exact table for the bandit task."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from dpo_bench.tasks.corpus import CorpusConfig, ReviewGrammar, generate_corpus, make_prompts
from reward.gold import GoldScorer, RelativeVaderGold, TableGold, VaderGold


@pytest.fixture(scope="module")
def vader() -> VaderGold:
    return VaderGold()


@pytest.fixture(scope="module")
def analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


# -- VaderGold ----------------------------------------------------------------------------------


def test_vader_reads_the_prompts_negation(vader):
    negated, plain = vader.score(["the movie was not", "the movie was"], ["good .", "good ."])
    assert negated < 0 < plain


def test_vader_reads_the_prompts_intensifier(vader):
    boosted, plain = vader.score(["the movie was extremely", "the movie was"], ["good .", "good ."])
    assert boosted > plain > 0


def test_vader_values_equal_the_reference_analyzer(vader, analyzer):
    sentences = generate_corpus(CorpusConfig(n_reviews=300, seed=2))
    rng = np.random.default_rng(0)
    prompts, completions = [], []
    for sentence in sentences:
        tokens = sentence.split()
        k = int(rng.integers(0, len(tokens) + 1))
        prompts.append(" ".join(tokens[:k]))
        completions.append(" ".join(tokens[k:]))
    scores = vader.score(prompts, completions)
    expected = [analyzer.polarity_scores(s)["compound"] for s in sentences]
    assert scores.dtype == np.float64 and scores.shape == (300,)
    np.testing.assert_array_equal(scores, expected)


def test_vader_text_is_prompt_and_completion_stripped(vader, analyzer):
    assert VaderGold.text("", "good .") == "good ."
    assert VaderGold.text("the movie was ", " bad . ") == "the movie was   bad ."
    (score,) = vader.score([""], ["the plot was awful ."])
    assert score == analyzer.polarity_scores("the plot was awful .")["compound"]


def test_vader_can_be_hacked_by_exclamation_marks(vader):
    # The reason for a KL penalty: "!" raises VADER's score without changing the words.
    plain, shouted = vader.score(["the movie was good", "the movie was good"], [".", "! ! !"])
    assert shouted > plain


def test_vader_memoises_with_a_bounded_cache():
    gold = VaderGold(cache_size=4)
    texts = [f"the movie was {w} ." for w in ["good", "bad", "great", "awful", "dull", "nice"]]
    first = gold.score([""] * 6, texts)
    again = gold.score([""] * 6, texts[-2:] * 3)
    np.testing.assert_array_equal(again, np.tile(first[-2:], 3))
    info = gold.cache_info()
    assert info.maxsize == 4 and info.currsize <= 4 and info.hits >= 6


def test_vader_length_mismatch_and_empty_input(vader):
    with pytest.raises(ValueError, match="length"):
        vader.score(["a", "b"], ["c"])
    with pytest.raises(TypeError):
        vader.score("the movie", "was good .")
    empty = vader.score([], [])
    assert empty.shape == (0,) and empty.dtype == np.float64
    with pytest.raises(ValueError, match="cache_size"):
        VaderGold(cache_size=-1)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.sampled_from(ReviewGrammar().vocabulary), max_size=30),
       cut=st.integers(0, 30))
def test_vader_scores_lie_in_the_unit_interval(vader, words, cut):
    prompt, completion = " ".join(words[:cut]), " ".join(words[cut:])
    (score,) = vader.score([prompt], [completion])
    assert -1.0 <= score <= 1.0


# -- RelativeVaderGold --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relative() -> RelativeVaderGold:
    return RelativeVaderGold()


def test_relative_equals_vader_of_the_whole_review_on_neutral_prompts(relative, vader, analyzer):
    reviews = generate_corpus(CorpusConfig(n_reviews=400, seed=5))
    train, val, test = make_prompts(reviews, 200, 50, 50, seed=5)
    by_prompt = {}
    for review in reviews:
        for k in range(len(review.split()) + 1):
            by_prompt.setdefault(" ".join(review.split()[:k]), review)
    prompts = train + val + test
    completions = [by_prompt[p][len(p) + 1:] for p in prompts]
    scores = relative.score(prompts, completions)
    np.testing.assert_array_equal(scores, vader.score(prompts, completions))
    expected = [analyzer.polarity_scores(by_prompt[p])["compound"] for p in prompts]
    np.testing.assert_array_equal(scores, expected)
    assert scores.dtype == np.float64 and scores.shape == (300,)


def test_relative_removes_the_prompts_own_score(relative, analyzer):
    prompts = ["the movie was great .", "the plot was awful .", "the movie was great ."]
    completions = ["the acting was dull .", "the acting was dull .", ""]
    scores = relative.score(prompts, completions)
    for score, p, c in zip(scores, prompts, completions):
        together = analyzer.polarity_scores(VaderGold.text(p, c))["compound"]
        assert score == together - analyzer.polarity_scores(p)["compound"]
    # The same completion is worth more after a prompt that was negative on its own, and an
    # empty completion adds nothing.
    assert scores[1] > scores[0] and scores[2] == 0.0


def test_relative_still_reads_the_prompts_negation(relative):
    negated, plain = relative.score(["the movie was not", "the movie was"], ["good .", "good ."])
    assert negated < 0 < plain


def test_relative_differs_from_vader_only_by_a_function_of_the_prompt(relative, vader):
    prompts = ["the movie was great ."] * 3 + ["we saw the drama ."] * 3
    completions = ["the plot was dull .", "i loved it .", "the cast performed badly ."] * 2
    shift = vader.score(prompts, completions) - relative.score(prompts, completions)
    np.testing.assert_allclose(shift[:3], shift[0])
    np.testing.assert_array_equal(shift[3:], 0.0)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.sampled_from(ReviewGrammar().vocabulary), max_size=30),
       cut=st.integers(0, 30))
def test_relative_scores_lie_in_minus_two_to_two(relative, words, cut):
    prompt, completion = " ".join(words[:cut]), " ".join(words[cut:])
    (score,) = relative.score([prompt], [completion])
    assert -2.0 <= score <= 2.0


def test_relative_length_mismatch(relative):
    with pytest.raises(ValueError, match="length"):
        relative.score(["a", "b"], ["c"])
    assert relative.score([], []).shape == (0,)


def test_scorers_satisfy_the_protocol(vader, relative):
    table = TableGold(np.zeros((1, 1)), ["x0"], ["y0"])
    assert relative.name != vader.name
    for scorer in (vader, relative, table):
        assert isinstance(scorer, GoldScorer)
        assert isinstance(scorer.name, str) and scorer.name


# -- TableGold ----------------------------------------------------------------------------------


@pytest.fixture()
def table_gold() -> TableGold:
    table = np.arange(12, dtype=np.float64).reshape(3, 4) / 10
    return TableGold(table, [f"x{i}" for i in range(3)], [f"y{j}" for j in range(4)])


def test_table_lookup(table_gold):
    scores = table_gold.score(["x0", "x2", " x1 ", "x2"], ["y3", "y0", "y1\n", "y3"])
    np.testing.assert_array_equal(scores, [0.3, 0.8, 0.5, 1.1])
    assert scores.dtype == np.float64 and scores.shape == (4,)
    assert table_gold.table.shape == (3, 4) and table_gold.table[2, 3] == 1.1


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), max_size=20))
def test_table_lookup_matches_indexing(pairs):
    table = np.random.default_rng(0).normal(size=(3, 4))
    gold = TableGold(table, ["a", "b", "c"], ["p", "q", "r", "s"])
    prompts = ["abc"[i] for i, _ in pairs]
    completions = ["pqrs"[j] for _, j in pairs]
    expected = np.array([table[i, j] for i, j in pairs], dtype=np.float64)
    np.testing.assert_array_equal(gold.score(prompts, completions), expected)


def test_table_unknown_tokens_are_named(table_gold):
    with pytest.raises(ValueError, match="x9"):
        table_gold.score(["x9"], ["y0"])
    with pytest.raises(ValueError, match="y7"):
        table_gold.score(["x0"], ["y7"])
    with pytest.raises(ValueError, match="y0 y1"):
        table_gold.score(["x0"], ["y0 y1"])
    with pytest.raises(ValueError, match="length"):
        table_gold.score(["x0", "x1"], ["y0"])


def test_table_is_a_read_only_copy():
    source = np.ones((2, 2))
    gold = TableGold(source, ["x0", "x1"], ["y0", "y1"])
    source[0, 0] = 5.0
    assert gold.table[0, 0] == 1.0
    with pytest.raises(ValueError):
        gold.table[0, 0] = 2.0
    scores = gold.score(["x0"], ["y0"])
    scores[0] = 9.0
    assert gold.table[0, 0] == 1.0


@pytest.mark.parametrize(
    "table, contexts, responses, message",
    [
        (np.zeros((2, 3)), ["x0", "x1"], ["y0", "y1"], "shape"),
        (np.zeros(3), ["x0"], ["y0", "y1", "y2"], "2-dimensional"),
        (np.zeros((2, 1)), ["x0", "x0"], ["y0"], "context_tokens"),
        (np.zeros((1, 2)), ["x0"], ["y0", "y0"], "response_tokens"),
        (np.array([[np.nan]]), ["x0"], ["y0"], "finite"),
    ],
)
def test_table_construction_errors(table, contexts, responses, message):
    with pytest.raises(ValueError, match=message):
        TableGold(table, contexts, responses)
