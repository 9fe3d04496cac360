"""Runs in the real world: a diverging cell, two runs at once, an unwritable directory, files from strangers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from dpo_bench.bench import load_config
from dpo_bench.configs import field
from dpo_bench.methods.base import METHODS, ModelPolicy, register_method
from dpo_bench.methods.sft import trainable_copy
from dpo_bench.policy import load_policy
from dpo_bench.run import RunExistsError, RunLock, run_benchmark
from dpo_bench.training import WALL_CLOCK_METRICS, check_finite


@dataclass(frozen=True)
class DivergingConfig:
    """Evaluates at step 2, then its loss turns NaN at step 3."""

    lr: float = field(0.05, "learning rate")


@pytest.fixture(scope="module", autouse=True)
def diverging_method():
    @register_method("diverging", description="a method whose loss turns NaN (test only)", config=DivergingConfig)
    def train(ctx, config):
        policy = trainable_copy(ctx)
        for step in (1, 2, 3):
            loss = torch.tensor(float("nan") if step == 3 else 1.0 / step)
            check_finite(loss, ctx.label, step, ctx.log)
            ctx.log.log(step, 1, **{"train/loss": loss.item()})
            if step == 2:
                ctx.checkpoint(step, policy)
        return ModelPolicy(policy, ctx.task)

    yield
    METHODS.pop("diverging")


def test_a_nan_loss_fails_its_cell_keeps_its_last_good_checkpoint_and_the_others_finish(tmp_path):
    config = load_config("quick", overrides={"task": "bandit", "seed": 0, "grid": [
        {"method": "sft"}, {"method": "diverging"}, {"method": "dpo", "values": [0.5], "config": {"steps": 20}}]})
    run_dir = run_benchmark(config, tmp_path, run_id="nan", progress=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed_with_failures"
    assert record["failed_cells"] == ["diverging seed=0"]
    status = record["cells"]["diverging seed=0"]
    assert "loss is nan at step 3" in status["error"] and "train/loss=0.5" in status["error"]
    assert status["last_good_checkpoint"] == 2
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert set(metrics[metrics["step"] == 2]["method"]) >= {"diverging"}
    assert (metrics["method"] == "dpo").any()
    headline = (run_dir / "report.md").read_text()
    assert "Cell diverging seed=0 FAILED" in headline
    cell_dirs = [p for p in (tmp_path / ".cache" / "cell").iterdir() if "diverging" in (p / "status.json").read_text()]
    load_policy(cell_dirs[0] / "policy")  # the last good checkpoint is on disk and loads


def test_a_second_run_with_the_same_id_refuses(tmp_path):
    with RunLock(tmp_path / "same"):
        with pytest.raises(RunExistsError, match="already running .* choose another --run-id"):
            with RunLock(tmp_path / "same"):
                pass
    # A lock left by a killed run (dead pid) is taken over.
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / ".lock").write_text("999999999")
    with RunLock(tmp_path / "stale"):
        assert (tmp_path / "stale" / ".lock").read_text() == str(os.getpid())


def test_an_unwritable_reports_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = load_config("quick", overrides={"task": "bandit"})
    with pytest.raises(OSError, match="cannot write to the reports directory"):
        run_benchmark(config, blocker / "reports", progress=False)


def test_checkpoints_are_never_unpickled(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=1, bos_token_id=1, eos_token_id=1)
    model = GPT2LMHeadModel(config)
    config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle, as a stranger's checkpoint may be
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load_policy(tmp_path)


def test_from_run_repeats_the_resolved_config(tmp_path):
    import argparse

    from pipelines.cli import resolve_config

    config = load_config("quick", overrides={"seed": 5, "sft": {"steps": 7}})
    (tmp_path / "run.json").write_text(json.dumps({"config": config.to_dict()}))
    args = argparse.Namespace(from_run=str(tmp_path), preset=None, config=None, seed=None, device=None, task=None,
                              threads=None, methods=None)
    assert resolve_config(args) == config


def test_adding_a_method_does_not_change_another_methods_numbers(tmp_path):
    grid = [{"method": "dpo", "values": [0.5], "config": {"steps": 30}}]
    alone = load_config("quick", overrides={"task": "bandit", "grid": grid})
    more = load_config("quick", overrides={"task": "bandit", "grid": [{"method": "ipo", "values": [0.5]}] + grid})
    a = run_benchmark(alone, tmp_path / "a", run_id="a", use_cache=False, progress=False)
    b = run_benchmark(more, tmp_path / "b", run_id="b", use_cache=False, progress=False)

    def dpo_rows(run_dir):
        m = pd.read_parquet(run_dir / "metrics.parquet")
        # Head-to-head rows compare with the other methods, so they differ by design.
        # Wall-clock seconds are measured, not computed: no two runs share them.
        m = m[(m["method"] == "dpo") & ~m["metric"].str.startswith("h2h/") & ~m["metric"].isin(WALL_CLOCK_METRICS)]
        return m.drop(columns="run_id").reset_index(drop=True)

    pd.testing.assert_frame_equal(dpo_rows(a), dpo_rows(b))
