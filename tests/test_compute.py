"""What a cell's training costs: optimiser steps, samples generated, tokens trained on and wall
seconds, counted by the trainers and recorded as ``compute/`` metrics at every logged step and
checkpoint."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import torch

from dpo_bench.bench import Cell, load_config
from dpo_bench.logprobs import collate, item_tokens
from dpo_bench.methods.sft import SFTConfig, supervised_finetune
from dpo_bench.policy import GPT2Spec, build_gpt2
from dpo_bench.run import Timings, plan_stages, upstream_for
from dpo_bench.stages import Bench, run_cell
from dpo_bench.training import COMPUTE_METRICS, ComputeMeter, TrainLog


def test_the_meter_stops_its_clock_while_paused():
    meter = ComputeMeter()
    assert meter.seconds == 0.0  # not started: no clock
    meter.start()
    time.sleep(0.02)
    with meter.paused():
        paused_at = meter.seconds
        time.sleep(0.05)
        assert meter.seconds == paused_at
    assert 0.02 <= meter.seconds < 0.05 + 0.02
    meter.add(steps=2, samples=64, tokens=100)
    meter.add(steps=1, tokens=50)
    metrics = meter.metrics()
    assert set(metrics) == set(COMPUTE_METRICS.values())
    assert (metrics["compute/steps"], metrics["compute/samples"], metrics["compute/tokens"]) == (3, 64, 150)


def test_the_log_records_compute_once_a_step_and_only_once_started():
    log = TrainLog()
    log.log(1, **{"train/loss": 1.0})
    assert [name for _, name, _, _ in log.records] == ["train/loss"]  # a stage that meters nothing records none
    log.compute.start()
    log.compute.add(steps=1, tokens=7)
    log.log(2, **{"train/loss": 0.5})
    log.log_compute(2)  # a checkpoint right after a logged step adds nothing
    log.log_compute(3)  # a checkpoint at a step nothing was logged at (best-of-N's step 0, say) adds its own
    compute = [(step, name, value) for step, name, value, _ in log.records if name.startswith("compute/")]
    assert [s for s, n, _ in compute if n == "compute/tokens"] == [2, 3]
    assert ("compute/tokens" in {n for _, n, _ in compute}) and (2, "compute/tokens", 7.0) in compute


class _Tok:
    bos_token_id = eos_token_id = 1
    pad_token_id = 0

    def __len__(self):
        return 20


def test_optimise_counts_steps_and_the_tokens_of_each_batch():
    """SFT with the whole data in each batch: every step reads every item's prompt and completion."""
    model = build_gpt2(GPT2Spec(n_layer=1, n_embd=16, n_head=2, n_positions=32), _Tok(), 0)
    prompts = [[1, 2], [1], [3, 4, 5]]
    completions = [[6, 7, 8], [9], [10, 11]]
    log = TrainLog()
    log.compute.start()
    config = SFTConfig(steps=3, batch_size=3, warmup_steps=0, shards=1)
    supervised_finetune(model, prompts, completions, config, pad_id=0, generator=torch.Generator().manual_seed(0), log=log,
                        progress=False)
    assert log.compute.steps == 3 and log.compute.samples == 0
    assert log.compute.tokens == 3 * (5 + 2 + 5)


def test_a_pair_puts_both_its_completions_through_the_passes():
    chosen = collate([[1, 2], [1]], [[3, 4, 5], [6]], pad_id=0)
    rejected = collate([[1, 2], [1]], [[7], [8, 9, 10, 11]], pad_id=0)
    assert item_tokens(chosen, rejected).tolist() == [5 + 3, 2 + 5]


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    config = load_config("quick", overrides={"task": "bandit", "evaluation": {"n_checkpoints": 2}})
    bench = Bench(config, tmp_path_factory.mktemp("cache"), progress=False)
    return bench, plan_stages(bench, Timings())


def _compute(bench, stages, cell: Cell) -> pd.DataFrame:
    stage = run_cell(bench, cell, upstream_for(cell, stages))
    metrics = pd.read_parquet(stage.path / "metrics.parquet")
    rows = metrics[metrics["metric"].str.startswith("compute/")]
    return rows.pivot_table(index="step", columns="metric", values="value")


def test_ppo_counts_its_rollouts_its_minibatch_steps_and_their_tokens(bandit):
    bench, stages = bandit
    cell = Cell("ppo", 0.1, 0, (("epochs", 2), ("iterations", 4), ("n_minibatches", 2), ("rollout_batch", 8)))
    compute = _compute(bench, stages, cell)
    assert list(compute.index) == [1, 2, 3, 4]  # every iteration, the checkpoints (2 and 4) among them
    final = compute.loc[4]
    assert final["compute/steps"] == 4 * 2 * 2 and final["compute/samples"] == 4 * 8
    # A bandit sequence is one context token and one response token; each epoch reads every rollout once.
    assert final["compute/tokens"] == 2 * 4 * 8 * 2
    assert compute["compute/seconds"].is_monotonic_increasing and compute.loc[1, "compute/seconds"] > 0
    assert (compute["compute/inference_samples"] == 1).all()


def test_offline_methods_sample_nothing_and_best_of_n_samples_n_per_prompt_at_inference(bandit):
    bench, stages = bandit
    dpo = _compute(bench, stages, Cell("dpo", 0.5, 0, (("batch_size", 16), ("steps", 6))))
    assert list(dpo.index) == [1, 2, 3, 4, 5, 6]
    assert dpo.loc[6, "compute/steps"] == 6 and dpo.loc[6, "compute/samples"] == 0
    assert dpo.loc[6, "compute/tokens"] == 6 * 16 * 2 * 2  # 16 pairs a step, two 2-token sequences each
    best = _compute(bench, stages, Cell("best_of_n", 8, 0))
    assert list(best.index) == [0]
    assert best.loc[0, ["compute/steps", "compute/samples", "compute/tokens"]].tolist() == [0, 0, 0]
    assert best.loc[0, "compute/inference_samples"] == 8
    # The reference trains nothing; its drawing at evaluation is not training time.
    reference = _compute(bench, stages, Cell("sft", None, 0))
    assert reference.loc[0, ["compute/steps", "compute/samples", "compute/tokens"]].tolist() == [0, 0, 0]
    assert reference.loc[0, "compute/seconds"] < 0.5
