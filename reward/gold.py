"""Gold (ground-truth) reward scorers: what every method is finally judged by.

`RelativeVaderGold` is the default task's reward (the offline stand-in for the DPO paper's
sentiment classifier): VADER's score of what the policy wrote. `VaderGold` scores prompt and
completion together; `TableGold` is the exact reward of the tabular bandit task.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class GoldScorer(Protocol):
    """Scores completions of prompts; `score` returns float64 of shape (n,)."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray: ...


def _check_lengths(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be sequences of strings, not a string")
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions differ in length: {len(prompts)} != {len(completions)}"
        )


class VaderGold:
    """VADER's compound score of prompt and completion read together, in [-1, 1].

    The prompt is part of the text, so it can negate or intensify the completion ("the movie
    was not" + "good ." is negative). Sampling repeats texts a lot, so scores are memoised in a
    bounded LRU cache of `cache_size` texts.
    """

    name = "vader"

    def __init__(self, cache_size: int = 1 << 16) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be a non-negative integer, got {cache_size!r}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()
        self._compound = functools.lru_cache(maxsize=cache_size)(self._compound_uncached)

    @staticmethod
    def text(prompt: str, completion: str) -> str:
        """The text VADER reads for one (prompt, completion) pair."""
        return (prompt + " " + completion).strip()

    def _compound_uncached(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)["compound"])

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses and size of the memo cache."""
        return self._compound.cache_info()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Compound scores, float64 of shape (n,)."""
        _check_lengths(prompts, completions)
        return np.fromiter(
            (self._compound(self.text(p, c)) for p, c in zip(prompts, completions)),
            dtype=np.float64,
            count=len(prompts),
        )


class RelativeVaderGold(VaderGold):
    """VADER's compound score of prompt and completion read together, minus the prompt's own:
    the sentiment the completion adds, in [-2, 2].

    Reading the two together keeps what the prompt does to the completion ("the movie was not"
    + "good ." is negative); subtracting the prompt's score keeps the prompt's own sentiment from
    counting as the policy's. With a neutral prompt (the sentiment task's openings) the
    subtraction is exactly 0 and the score is VADER's score of the whole review. A shift that
    depends on the prompt alone leaves the KL-regularised optimal policy unchanged (the DPO
    paper's Lemma 2), so the subtraction changes what is reported, not what a method should learn.
    """

    name = "vader_relative"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Compound of prompt + completion minus compound of the prompt, float64 of shape (n,)."""
        together = super().score(prompts, completions)
        own = np.fromiter(
            (self._compound(p.strip()) for p in prompts), dtype=np.float64, count=len(prompts)
        )
        return together - own


class TableGold:
    """The exact reward of the bandit task: `table[context, response]`.

    A prompt is one context token (e.g. "x3") and a completion one response token (e.g. "y5");
    surrounding whitespace is ignored. `table` has shape (n_contexts, n_responses).
    """

    name = "table"

    def __init__(
        self,
        table: np.ndarray,
        context_tokens: Sequence[str],
        response_tokens: Sequence[str],
    ) -> None:
        values = np.array(table, dtype=np.float64)
        if values.ndim != 2:
            raise ValueError(f"table must be 2-dimensional, got shape {values.shape}")
        if values.shape != (len(context_tokens), len(response_tokens)):
            raise ValueError(
                f"table shape {values.shape} does not match "
                f"({len(context_tokens)} contexts, {len(response_tokens)} responses)"
            )
        if not np.all(np.isfinite(values)):
            raise ValueError("table must be finite")
        self._contexts = self._index(context_tokens, "context_tokens")
        self._responses = self._index(response_tokens, "response_tokens")
        values.setflags(write=False)
        self._table = values

    @staticmethod
    def _index(tokens: Sequence[str], field: str) -> dict[str, int]:
        index = {token: i for i, token in enumerate(tokens)}
        if len(index) != len(tokens):
            raise ValueError(f"{field} has duplicate tokens")
        return index

    @property
    def table(self) -> np.ndarray:
        """The reward table, float64 of shape (n_contexts, n_responses), read-only."""
        return self._table

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """`table[ix, iy]` per pair, float64 of shape (n,); unknown tokens raise ValueError."""
        _check_lengths(prompts, completions)
        rows = np.empty(len(prompts), dtype=np.intp)
        cols = np.empty(len(prompts), dtype=np.intp)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            x, y = prompt.strip(), completion.strip()
            if x not in self._contexts:
                raise ValueError(f"unknown context token {x!r}")
            if y not in self._responses:
                raise ValueError(f"unknown response token {y!r}")
            rows[i], cols[i] = self._contexts[x], self._responses[y]
        return self._table[rows, cols].copy()
