"""The preference dataset every method consumes: K completions per train prompt from the
reference, labelled on the gold reward: each of the K(K−1)/2 pairs by the Bradley-Terry model (the
DPO paper's IMDb recipe, K = 4: six pairs a prompt), or whole K-wise rankings by Plackett-Luce.
Sampling (:func:`sample_candidates`) and labelling (:func:`label_candidates`) are separate steps,
so labels at several temperatures can be drawn from one set of candidates.

Temperature 0 labels deterministically by the gold reward (the DPO paper's choice); pairs whose
gold rewards tie carry no label and are dropped, as are pairs of identical (or empty) completions
(with Plackett-Luce rankings, the whole row).
A fraction of prompts is held out: the reward model's accuracy and the DPO policy's implicit-reward
accuracy are measured on pairs no method trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from reward.bradley_terry import sample_bt_labels, sample_pl_rankings

from .configs import ConfigError, field, non_negative
from .data import rankings_to_pairs
from .generation import sample


@dataclass(frozen=True)
class PreferenceConfig:
    """How the preference data is sampled and labelled."""

    k: int = field(2, "completions sampled per train prompt (2 = pairs; > 2 = Plackett-Luce rankings)")
    label_temperature: float = field(0.0, "Bradley-Terry temperature of the labels (0 = deterministic, as the DPO paper)")
    sampling_temperature: float = field(1.0, "temperature when sampling completions from the reference")
    labels: Literal["pairwise", "plackett_luce"] = field(
        "pairwise", "K > 2: label every pair by Bradley-Terry (the DPO paper's IMDb recipe), or rank each prompt's K "
                    "completions by Plackett-Luce (needed by dpo_pl; pairwise methods then read pairs_from_rankings)"
    )
    pairs_from_rankings: Literal["best_vs_worst", "all_pairs", "adjacent"] = field(
        "best_vs_worst", "with labels = \"plackett_luce\": how pairwise methods read the K-wise rankings"
    )
    heldout_fraction: float = field(0.1, "share of train prompts held out to measure reward accuracy")
    n_prompts: int = field(0, "use only the first n train prompts (0 = all)")
    shuffle_labels: bool = field(False, "replace every train pair's label by a fair coin, so the data carries no preference "
                                        "(a negative control: the implicit-reward check's DPO on shuffled labels); held-out pairs keep theirs")

    def __post_init__(self) -> None:
        non_negative("n_prompts", self.n_prompts)
        if self.k < 2:
            raise ConfigError(f"k must be >= 2, got {self.k}")
        non_negative("label_temperature", self.label_temperature)
        non_negative("sampling_temperature", self.sampling_temperature)
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.shuffle_labels and self.labels == "plackett_luce":
            raise ConfigError("shuffle_labels shuffles pairwise labels; it does not apply to labels = \"plackett_luce\"")


@dataclass(frozen=True)
class PreferenceFrames:
    """``pairs``: prompt, chosen, rejected, gold_chosen, gold_rejected, split.
    ``rankings`` (K > 2): prompt, ranking (best first), gold (aligned with ranking), split."""

    pairs: pd.DataFrame
    rankings: pd.DataFrame | None
    n_prompts: int
    n_dropped_ties: int  # pairs (or, for rankings, rows) dropped for tied gold rewards
    n_dropped_repeats: int  # pairs (rows) dropped for identical or empty completions


def heldout_split(prompts: list[str], fraction: float) -> list[str]:
    """"heldout" for a stable hash-chosen share of rows, else "train".

    The hash covers the row number too: the bandit task repeats each one-token prompt many times.
    """
    cut = int(fraction * 2**32)
    keys = (f"{i}\x00{p}".encode() for i, p in enumerate(prompts))
    return ["heldout" if int.from_bytes(hashlib.sha256(k).digest()[:4], "little") < cut else "train" for k in keys]


@dataclass(frozen=True)
class Candidates:
    """The K completions sampled per train prompt, before any label: ``completions`` and their
    ``gold`` rewards are (n_prompts, K) arrays. Labels at any temperature are drawn from them, so
    the reward models at other label temperatures see the same completions as the main one."""

    prompts: list[str]
    completions: np.ndarray  # (n, K) of str
    gold: np.ndarray  # (n, K) float

    #: The PreferenceConfig fields that decide the candidates; the others only decide the labels.
    SAMPLING_FIELDS: ClassVar[tuple[str, ...]] = ("k", "sampling_temperature", "n_prompts")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"prompt": self.prompts, "completions": [list(r) for r in self.completions],
                             "gold": [list(map(float, r)) for r in self.gold]})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "Candidates":
        completions = np.array([list(r) for r in frame["completions"]], dtype=object)
        return cls(list(frame["prompt"]), completions, np.array([list(r) for r in frame["gold"]], dtype=float))


def sample_candidates(
    task, reference: nn.Module, config: PreferenceConfig, seed: int, batch_size: int = 512
) -> Candidates:
    """Sample K completions per train prompt from ``reference`` and score them by the gold reward."""
    prompts = list(task.train_prompts[: config.n_prompts or None])
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = [task.encode_prompt(p) for p in prompts]
    repeated = [ids for ids in prompt_ids for _ in range(config.k)]
    samples = sample(
        reference, repeated, max_new_tokens=task.max_new_tokens, eos_id=task.eos_id, pad_id=task.pad_id,
        generator=generator, temperature=config.sampling_temperature, batch_size=batch_size,
    )
    completions = np.array([task.decode_completion(c) for c in samples.completion_ids], dtype=object).reshape(-1, config.k)
    gold = task.gold.score([p for p in prompts for _ in range(config.k)], completions.ravel().tolist()).reshape(-1, config.k)
    return Candidates(prompts, completions, np.asarray(gold, dtype=float))


def label_candidates(candidates: Candidates, config: PreferenceConfig, seed: int) -> PreferenceFrames:
    """Label the candidates by the Bradley-Terry (K = 2) or Plackett-Luce (K > 2) model on their gold
    rewards at ``config.label_temperature``, with the label RNG seeded by ``seed``."""
    prompts, completions, gold = candidates.prompts, candidates.completions, candidates.gold
    k = completions.shape[1]
    if k != config.k:
        raise ValueError(f"the candidates have {k} completions per prompt, the preference config asks for k = {config.k}")
    rng = np.random.default_rng(seed)
    splits = heldout_split(prompts, config.heldout_fraction)

    # Rows whose completions repeat cannot be ranked (and a pair of equal texts is no preference).
    distinct = np.array([len(set(row)) == k and all(c for c in row) for row in completions])
    n_repeats = int((~distinct).sum())
    if k == 2:
        a_wins, tie = sample_bt_labels(rng, gold[:, 0], gold[:, 1], config.label_temperature)
        keep = distinct & ~tie
        chosen_col = np.where(a_wins, 0, 1)
        rows = np.arange(len(prompts))
        pairs = pd.DataFrame({
            "prompt": prompts,
            "chosen": completions[rows, chosen_col],
            "rejected": completions[rows, 1 - chosen_col],
            "gold_chosen": gold[rows, chosen_col],
            "gold_rejected": gold[rows, 1 - chosen_col],
            "split": splits,
        })[keep].reset_index(drop=True)
        return PreferenceFrames(pairs, None, len(prompts), int((distinct & tie).sum()), n_repeats)

    if config.labels == "pairwise":
        return _all_pairs(prompts, completions, gold, splits, config.label_temperature, rng)
    order, tied = sample_pl_rankings(rng, gold, config.label_temperature)
    keep = distinct & ~tied
    rankings = pd.DataFrame({
        "prompt": prompts,
        "ranking": [list(completions[i, order[i]]) for i in range(len(prompts))],
        "gold": [list(map(float, gold[i, order[i]])) for i in range(len(prompts))],
        "split": splits,
    })[keep].reset_index(drop=True)
    pairs = pairs_from_rankings(rankings, config.pairs_from_rankings)
    return PreferenceFrames(pairs, rankings, len(prompts), int((distinct & tied).sum()), n_repeats)


def _all_pairs(prompts: list[str], completions: np.ndarray, gold: np.ndarray, splits: list[str], temperature: float,
               rng: np.random.Generator) -> PreferenceFrames:
    """Every one of each prompt's K(K−1)/2 pairs, each labelled by its own Bradley-Terry draw; pairs
    of identical or empty completions, and pairs whose gold rewards tie (at temperature 0), dropped.
    A prompt's pairs share its split, so no held-out prompt is trained on."""
    n, k = completions.shape
    a, b = np.triu_indices(k, 1)
    rows = np.repeat(np.arange(n), len(a))
    col_a, col_b = np.tile(a, n), np.tile(b, n)
    text_a, text_b = completions[rows, col_a], completions[rows, col_b]
    a_wins, tie = sample_bt_labels(rng, gold[rows, col_a], gold[rows, col_b], temperature)
    repeat = np.array([x == y or not x or not y for x, y in zip(text_a, text_b)], dtype=bool)
    keep = ~repeat & ~tie
    chosen_col, rejected_col = np.where(a_wins, col_a, col_b), np.where(a_wins, col_b, col_a)
    pairs = pd.DataFrame({
        "prompt": np.asarray(prompts, dtype=object)[rows],
        "chosen": completions[rows, chosen_col],
        "rejected": completions[rows, rejected_col],
        "gold_chosen": gold[rows, chosen_col],
        "gold_rejected": gold[rows, rejected_col],
        "split": np.asarray(splits, dtype=object)[rows],
    })[keep].reset_index(drop=True)
    return PreferenceFrames(pairs, None, n, int((tie & ~repeat).sum()), int(repeat.sum()))


def shuffle_train_labels(pairs: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """``pairs`` with each train pair's label replaced by a fair coin: where it lands tails, chosen and
    rejected (and their gold rewards) swap. The labels then say nothing about the completions; the
    held-out pairs keep theirs, so what a model trained on the result learnt is measured against
    the true labels."""
    flip = (rng.random(len(pairs)) < 0.5) & (pairs["split"] == "train").to_numpy()
    out = pairs.copy()
    for a, b in (("chosen", "rejected"), ("gold_chosen", "gold_rejected")):
        out.loc[flip, a], out.loc[flip, b] = pairs.loc[flip, b].to_numpy(), pairs.loc[flip, a].to_numpy()
    return out


def pairs_from_rankings(rankings: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Pairs (with their gold rewards and split) read from K-wise rankings."""
    rankings = rankings.reset_index(drop=True)
    pairs = rankings_to_pairs(rankings[["prompt", "ranking"]], mode=mode)
    # rankings_to_pairs keeps each pair's source row as its index.
    rows = pairs.index.to_numpy()
    gold_of = [dict(zip(r, g)) for r, g in zip(rankings["ranking"], rankings["gold"])]
    pairs = pairs.reset_index(drop=True)
    pairs["gold_chosen"] = [gold_of[i][c] for i, c in zip(rows, pairs["chosen"])]
    pairs["gold_rejected"] = [gold_of[i][r] for i, r in zip(rows, pairs["rejected"])]
    pairs["split"] = rankings["split"].to_numpy()[rows]
    return pairs
