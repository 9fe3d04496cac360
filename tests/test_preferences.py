"""Preference data: candidates are sampled once and labelled at any temperature, so the reward models
at other label temperatures see the same completions as the main one; the jobs a parallel run
starts beside the main chain, and when each may start."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_bench.bench import load_config
from dpo_bench.preferences import Candidates, PreferenceConfig, label_candidates
from dpo_bench.run import Timings, plan_stages
from dpo_bench.stages import Bench, label_temperature_rm, preference_info, worker_jobs
from dpo_bench.stages.shared import _pairs_frame


def _candidates(completions: list[list[str]], gold: list[list[float]]) -> Candidates:
    return Candidates([f"p{i}" for i in range(len(completions))], np.array(completions, dtype=object), np.array(gold, dtype=float))


def test_deterministic_labels_prefer_the_higher_gold_and_drop_ties_and_repeats():
    candidates = _candidates([["a", "b"], ["c", "d"], ["e", "e"], ["f", "g"]], [[0.1, 0.5], [0.2, 0.2], [0.0, 1.0], [0.9, -0.3]])
    frames = label_candidates(candidates, PreferenceConfig(label_temperature=0.0), seed=0)
    assert frames.pairs[["prompt", "chosen", "rejected"]].values.tolist() == [["p0", "b", "a"], ["p3", "f", "g"]]
    assert (frames.n_dropped_ties, frames.n_dropped_repeats, frames.n_prompts) == (1, 1, 4)
    assert (frames.pairs["gold_chosen"] > frames.pairs["gold_rejected"]).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=40), st.integers(0, 2**31))
def test_every_row_is_kept_or_counted_as_dropped(golds, seed):
    n = len(golds)
    candidates = _candidates([[f"x{i}", f"y{i}"] for i in range(n)], [list(map(float, g)) for g in golds])
    frames = label_candidates(candidates, PreferenceConfig(label_temperature=0.0), seed)
    assert len(frames.pairs) + frames.n_dropped_ties + frames.n_dropped_repeats == n
    assert frames.n_dropped_ties == sum(a == b for a, b in golds)
    # At a positive temperature a tie is a coin flip, not a dropped row: every distinct row stays.
    noisy = label_candidates(candidates, PreferenceConfig(label_temperature=1.0), seed)
    assert len(noisy.pairs) == n and noisy.n_dropped_ties == 0


def test_four_samples_give_six_pairs_each_labelled_by_its_own_gold_rewards():
    """The DPO paper's IMDb recipe: K = 4 completions a prompt, all 6 pairs labelled by Bradley-Terry."""
    candidates = _candidates([["a", "b", "c", "d"], ["e", "e", "f", "g"]], [[0.4, -0.2, 0.9, 0.4], [0.1, 0.1, 0.3, -0.5]])
    frames = label_candidates(candidates, PreferenceConfig(k=4, label_temperature=0.0), seed=0)
    pairs = {(r.prompt, r.chosen, r.rejected) for r in frames.pairs.itertuples()}
    # p0: a and d tie (0.4); p1: the two "e" are one completion.
    assert pairs == {("p0", "a", "b"), ("p0", "c", "a"), ("p0", "c", "b"), ("p0", "d", "b"), ("p0", "c", "d"),
                     ("p1", "f", "e"), ("p1", "e", "g"), ("p1", "f", "g")}
    # 12 pairs less the tie (a, d) and the identical pair (e, e); each "e" is paired with f and g.
    assert len(frames.pairs) == 10
    assert (frames.n_dropped_ties, frames.n_dropped_repeats, frames.n_prompts) == (1, 1, 2)
    assert frames.rankings is None
    assert (frames.pairs["gold_chosen"] > frames.pairs["gold_rejected"]).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(-2, 2), min_size=4, max_size=4), min_size=1, max_size=15), st.integers(0, 2**31))
def test_every_pair_of_four_is_kept_or_counted_as_dropped(golds, seed):
    n = len(golds)
    candidates = _candidates([[f"x{i}", f"y{i}", f"z{i}", f"w{i}"] for i in range(n)], [list(map(float, g)) for g in golds])
    frames = label_candidates(candidates, PreferenceConfig(k=4, label_temperature=0.0), seed)
    assert len(frames.pairs) + frames.n_dropped_ties + frames.n_dropped_repeats == 6 * n
    assert frames.n_dropped_ties == sum(g[a] == g[b] for g in golds for a in range(4) for b in range(a + 1, 4))
    # A prompt's pairs share its split: no held-out prompt is trained on.
    assert (frames.pairs.groupby("prompt")["split"].nunique() == 1).all()
    noisy = label_candidates(candidates, PreferenceConfig(k=4, label_temperature=1.0), seed)
    assert len(noisy.pairs) == 6 * n and noisy.n_dropped_ties == 0


def test_candidates_round_trip_through_their_frame_exactly():
    candidates = _candidates([["a b", "c"], ["d", "e f"]], [[0.1234567890123, -2.0], [1e-17, 3.5]])
    back = Candidates.from_frame(candidates.to_frame())
    assert back.prompts == candidates.prompts
    assert (back.completions == candidates.completions).all() and back.gold.tolist() == candidates.gold.tolist()


def test_labelling_with_another_k_names_both():
    candidates = _candidates([["a", "b"]], [[0.0, 1.0]])
    with pytest.raises(ValueError, match="2 completions per prompt.*k = 3"):
        label_candidates(candidates, PreferenceConfig(k=3), seed=0)


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    config = load_config("quick", overrides={
        "task": "bandit", "checks": {"label_temperatures": [1.0]},
        "grid": [{"method": "dpo", "values": [0.5]},
                 {"method": "dpo_pl", "name": "dpo_pl_k3", "values": [0.5], "preferences": {"k": 3}}],
    })
    cache = tmp_path_factory.mktemp("cache")
    bench = Bench(config, cache, progress=False)
    return bench, plan_stages(bench, Timings()), cache


def _unordered_pairs(frame: pd.DataFrame) -> Counter:
    return Counter((p, frozenset((c, r))) for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"]))


def test_the_reward_model_at_another_label_temperature_labels_the_same_completions(bandit):
    bench, stages, cache = bandit
    rm = label_temperature_rm(bench, stages, 1.0)
    assert len(list((cache / "candidates").iterdir())) == 1  # sampled once, for both label temperatures
    noisy_prefs = rm.path.parent.parent / "preferences"
    frames = {p.name: pd.read_parquet(p / "preferences.parquet") for p in noisy_prefs.iterdir() if not p.name.startswith(".")}
    assert len(frames) == 2
    main = pd.read_parquet(stages["preferences"].path / "preferences.parquet")
    noisy = next(f for name, f in frames.items() if name != stages["preferences"].key)
    # The same sampled pairs (T = 0 drops the tied ones), with labels drawn again.
    assert not _unordered_pairs(main) - _unordered_pairs(noisy)
    assert len(noisy) == preference_info(stages["preferences"])["n_pairs"] + preference_info(stages["preferences"])["n_dropped_ties"]
    held = _pairs_frame(stages["preferences"], "heldout")
    assert len(held) and set(held["prompt"]) <= set(noisy.loc[noisy["split"] == "heldout", "prompt"])


def test_jobs_start_as_soon_as_their_inputs_exist(bandit):
    bench, stages, _ = bandit
    before = {k: v for k, v in stages.items() if k in ("task", "sft", "ref_eval")}
    # The grid's own 3-wise data and the bandit convergence check (from the run's own SFT table on
    # the bandit task) need only the SFT model; labelling at T = 1 needs the candidates.
    assert worker_jobs(bench, {"task": stages["task"]}) == []
    assert worker_jobs(bench, before) == ["preferences dpo_pl_k3", "bandit convergence"]
    assert worker_jobs(bench, {**before, "candidates": stages["candidates"]}) == ["reward model T=1", "preferences dpo_pl_k3",
                                                                                 "bandit convergence"]
    # Without the first seed's checks, only the grid's own data.
    assert worker_jobs(bench, before, checks=False) == ["preferences dpo_pl_k3"]
