"""The reward-model stage's normalisers: fitted on the train pairs' SFT samples, kept with the
reward model, read by PPO, best-of-N and the proxy reward; never by the reward model's accuracy
and calibration, which read raw margins (σ(r_w − r_l) is the Bradley-Terry probability)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.bench import load_config
from dpo_bench.run import Timings, plan_stages
from dpo_bench.stages import Bench, gold_normaliser, sft_samples
from dpo_bench.stages.shared import _calibration_rows, _collate_texts, _pairs_frame
from reward.bradley_terry import pairwise_accuracy
from reward.normalise import Normaliser


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    config = load_config("quick", overrides={"task": "bandit", "evaluation": {"n_checkpoints": 1}})
    bench = Bench(config, tmp_path_factory.mktemp("cache"), progress=False)
    stages = plan_stages(bench, Timings())
    return bench, stages, bench.task(stages["task"]), bench.reward_model(stages["reward_model"], stages["sft"])


def _raw_scores(task, rm, prompts, completions) -> np.ndarray:
    batch = _collate_texts(task, prompts, completions)
    return rm.score(batch.input_ids, batch.attention_mask).double().numpy()


def test_the_sft_samples_are_the_unique_texts_of_the_train_pairs():
    pairs = pd.DataFrame({"prompt": ["a", "a", "b"], "chosen": ["x", "y", "x"], "rejected": ["y", "z", "z"]})
    samples = sft_samples(pairs)
    assert list(zip(samples["prompt"], samples["completion"])) == [("a", "x"), ("a", "y"), ("b", "x"), ("a", "z"), ("b", "z")]


def test_the_stage_fits_both_normalisers_on_the_train_pairs_sft_samples(bandit):
    bench, stages, task, rm = bandit
    train = _pairs_frame(stages["preferences"], "train")
    samples = sft_samples(train)
    raw = _raw_scores(task, rm, samples["prompt"], samples["completion"])
    # by hand: the mean and population std of the loaded model's raw scores of those texts
    assert rm.normaliser.n == len(samples)
    assert rm.normaliser.mean == pytest.approx(raw.mean(), rel=1e-6, abs=1e-6)  # kept as float32
    assert rm.normaliser.std == pytest.approx(np.sqrt(((raw - raw.mean()) ** 2).mean()), rel=1e-6)
    # the gold reward's: the gold column of the same samples (the candidates' gold rewards)
    gold = pd.concat([train[["prompt", "chosen", "gold_chosen"]].set_axis(["prompt", "completion", "gold"], axis=1),
                      train[["prompt", "rejected", "gold_rejected"]].set_axis(["prompt", "completion", "gold"], axis=1)])
    gold = gold.drop_duplicates(["prompt", "completion"])["gold"].to_numpy()
    expected = Normaliser.fit(gold)
    got = gold_normaliser(stages["reward_model"])
    assert (got.n, got.mean, got.std) == (expected.n, pytest.approx(expected.mean), pytest.approx(expected.std))
    record = json.loads((stages["reward_model"].path / "normalisers.json").read_text())
    assert Normaliser.from_dict(record["reward_model"]) == rm.normaliser


def test_normalised_scores_have_mean_zero_and_std_one_on_those_samples(bandit):
    _, stages, task, rm = bandit
    samples = sft_samples(_pairs_frame(stages["preferences"], "train"))
    batch = _collate_texts(task, samples["prompt"], samples["completion"])
    r_hat = rm.normalised_score(batch.input_ids, batch.attention_mask).double().numpy()
    assert r_hat.mean() == pytest.approx(0.0, abs=1e-5)
    assert r_hat.std() == pytest.approx(1.0, abs=1e-5)


def test_accuracy_and_calibration_read_the_raw_margins(bandit):
    """The stage's rm_accuracy and rm_calibration rows are those of the raw scores; the loaded model's
    forward (what evaluate_reward_model reads) is raw; and normalising changes no ranking."""
    _, stages, task, rm = bandit
    heldout = _pairs_frame(stages["preferences"], "heldout")
    r_w = _raw_scores(task, rm, heldout["prompt"], heldout["chosen"])
    r_l = _raw_scores(task, rm, heldout["prompt"], heldout["rejected"])
    metrics = pd.read_parquet(stages["reward_model"].path / "metrics.parquet")
    accuracy = metrics.loc[metrics["metric"] == "rm_accuracy", "value"].item()
    assert accuracy == pytest.approx(pairwise_accuracy(r_w, r_l))
    calibration = metrics[metrics["metric"] == "rm_calibration"].sort_values("step")
    expected = pd.DataFrame(_calibration_rows(r_w - r_l))
    np.testing.assert_allclose(calibration["value"], expected["value"], atol=1e-6)
    np.testing.assert_allclose(calibration["temperature"], expected["temperature"], atol=1e-5)
    n = rm.normaliser
    assert pairwise_accuracy(n(r_w), n(r_l)) == pytest.approx(accuracy)
    batch = _collate_texts(task, heldout["prompt"], heldout["chosen"])
    with torch.no_grad():
        forward = rm(batch.input_ids, batch.attention_mask).double().numpy()
    np.testing.assert_allclose(forward, r_w, atol=1e-6)
