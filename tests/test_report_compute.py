"""The report's compute: the compute columns of the table of cells, the training curves against a
chosen axis, and Gao et al.'s over-optimisation figure (gold and proxy reward against √KL)."""

from __future__ import annotations

import json
import typing
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from dpo_bench.bench import ReportConfig, load_config
from dpo_bench.configs import ConfigError
from dpo_bench.report import build_report
from dpo_bench.report.figures import Palette, curve_x, figures_key, reward_against_sqrt_kl
from dpo_bench.report.load import CURVES_X, load_run
from dpo_bench.report.results import checkpoint_results, final_results
from pipelines.cli import build_parser, resolve_config

from .test_report import STEPS, _row, _sections, make_run


def _with_compute(run_dir, cells=(("ppo", 0.1, 0), ("dpo", 0.1, 0))):
    """Compute rows every 20 steps for ``cells`` (PPO: 64 rollouts a step), and the SFT cell's zeros."""
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    run_id = metrics["run_id"].iloc[0]
    rows = [_row(run_id, "sft", np.nan, 0, 0, np.nan, f"compute/{name}", 0.0, n=0)
            for name in ("steps", "samples", "tokens", "seconds")]
    for method, beta, seed in cells:
        for step in range(20, STEPS[-1] + 41, 20):  # past the last checkpoint: a failed cell's later logging
            values = {"steps": step, "samples": 64 * step if method == "ppo" else 0, "tokens": 1000 * step, "seconds": step / 10}
            rows += [_row(run_id, method, beta, seed, step, np.nan, f"compute/{k}", v, n=0) for k, v in values.items()]
    pd.concat([metrics, pd.DataFrame(rows)], ignore_index=True).to_parquet(run_dir / "metrics.parquet")
    return run_dir


def test_the_table_of_cells_shows_each_cells_compute_at_its_final_checkpoint(tmp_path):
    run_dir = _with_compute(make_run(tmp_path))
    final = final_results(load_run(run_dir)).set_index(["method", "beta"])
    ppo = final.loc[("ppo", 0.1)]
    # The final checkpoint is step 300: what was logged after it is not the policy's cost.
    assert (ppo["compute_steps"], ppo["compute_samples"], ppo["compute_tokens"], ppo["compute_seconds"]) == (300, 19200, 300000, 30)
    assert final.loc[("dpo", 0.1), "compute_samples"] == 0
    sft = final[final.index.get_level_values("method") == "sft"].iloc[0]
    assert sft["compute_steps"] == 0  # the NaN strength of the SFT cell still finds its row
    assert np.isnan(final.loc[("ipo", 0.5), "compute_steps"])  # a cell that recorded none

    build_report(run_dir)
    results = _sections((run_dir / "report.md").read_text(encoding="utf-8"))["Results"]
    assert "optimiser steps" in results and "tokens trained on" in results and "training time" in results
    ppo_line = next(line for line in results.splitlines() if line.startswith(r"| ppo (kl\_coef=0.1)"))
    assert "| 300 | 19,200 | 300,000 | 30.0 s |" in ppo_line
    assert "every cell shares them" in results


def test_best_of_n_shows_its_samples_per_prompt_at_inference(tmp_path):
    run_dir = make_run(tmp_path)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    run_id = metrics["run_id"].iloc[0]
    rows = [_row(run_id, "ppo", 0.1, 0, 300, np.nan, f"compute/{k}", v, n=0)
            for k, v in (("steps", 0), ("samples", 0), ("tokens", 0), ("seconds", 0.001), ("inference_samples", 16))]
    pd.concat([metrics, pd.DataFrame(rows)], ignore_index=True).to_parquet(run_dir / "metrics.parquet")
    build_report(run_dir)
    results = _sections((run_dir / "report.md").read_text(encoding="utf-8"))["Results"]
    assert "0 (+ 16 per prompt at inference)" in results


def test_the_training_curves_are_drawn_against_the_chosen_axis(tmp_path):
    run_dir = _with_compute(make_run(tmp_path))
    data = load_run(run_dir)
    train = data.metrics[data.metrics["metric"].str.startswith("train/")]
    assert data.curves_x == "steps"  # the default, where the run's config does not say
    for axis, scale in (("tokens", 1000), ("seconds", 0.1), ("steps", 1)):
        rows, x_label = curve_x(replace(data, curves_x_override=axis), train)
        assert x_label == CURVES_X[axis][1]
        ppo = rows[(rows["method"] == "ppo") & (rows["beta"] == 0.1) & (rows["metric"] == "train/loss")]
        np.testing.assert_allclose(ppo["x"], ppo["step"] * scale)
        assert set(rows["method"]) == {"ppo", "dpo"}  # cells without compute have no x on this axis
    # An older run without compute rows: the trainers' steps, and the label says why.
    (tmp_path / "old").mkdir()
    rows, x_label = curve_x(load_run(make_run(tmp_path / "old")), train)
    assert x_label.startswith("training step (this run recorded no compute") and (rows["x"] == rows["step"]).all()
    # The figure cache tells the axes apart.
    assert figures_key(data) != figures_key(replace(data, curves_x_override="tokens"))

    paths = build_report(run_dir, curves_x="tokens")
    assert "training_curves" in paths
    curves = _sections((run_dir / "report.md").read_text(encoding="utf-8"))["Training curves"]
    assert "against tokens trained on" in curves
    with pytest.raises(ValueError, match="unknown axis 'flops'.*steps, samples, tokens, seconds"):
        build_report(run_dir, curves_x="flops")


def test_the_axis_is_a_config_option_and_a_flag():
    assert typing.get_args(typing.get_type_hints(ReportConfig)["curves_x"]) == tuple(CURVES_X)
    assert load_config("quick", overrides={"report": {"curves_x": "seconds"}}).report.curves_x == "seconds"
    with pytest.raises(ConfigError, match="report.curves_x"):
        load_config("quick", overrides={"report": {"curves_x": "flops"}})
    args = build_parser().parse_args(["check-config", "--preset", "quick", "--curves-x", "samples"])
    assert resolve_config(args).report.curves_x == "samples"
    args = build_parser().parse_args(["report", "some/run", "--curves-x", "seconds"])
    assert args.curves_x == "seconds"


def _with_gao_cells(run_dir):
    """PPO as RLHF, and a best-of-N (inference-time) over N = 2, 4, 16 with its KL estimates."""
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    run_id = metrics["run_id"].iloc[0]
    rows = []
    for n, kl, gold, proxy in ((2, 0.3, 0.1, 0.5), (4, 0.8, 0.2, 1.0), (16, 1.9, 0.25, 1.6)):
        rows += [_row(run_id, "best_of_n", float(n), 0, 0, 1.0, m, v, 0.01)
                 for m, v in (("gold_reward", gold), ("proxy_reward", proxy), ("kl", kl))]
    pd.concat([metrics, pd.DataFrame(rows)], ignore_index=True).to_parquet(run_dir / "metrics.parquet")
    record = json.loads((run_dir / "run.json").read_text())
    record["methods"]["ppo"]["role"] = "rlhf"
    record["methods"]["best_of_n"] = {"strength": "n", "role": "inference"}
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def test_the_over_optimisation_figure_shows_best_of_n_and_ppo_against_sqrt_kl(tmp_path):
    (tmp_path / "plain").mkdir()
    plain = load_run(make_run(tmp_path / "plain"))  # no RLHF and no best-of-N cell: nothing to draw
    assert reward_against_sqrt_kl(plain, checkpoint_results(plain), Palette(plain.metrics)) is None
    run_dir = _with_gao_cells(make_run(tmp_path))
    data = load_run(run_dir)
    png = reward_against_sqrt_kl(data, checkpoint_results(data), Palette(data.metrics))
    assert png is not None and png.startswith(b"\x89PNG")
    build_report(run_dir)
    frontier = _sections((run_dir / "report.md").read_text(encoding="utf-8"))["Frontier"]
    assert "figures/reward_vs_sqrt_kl.png" in frontier and "Gao et al. 2022" in frontier
    assert (run_dir / "figures" / "reward_vs_sqrt_kl.png").is_file()


def test_the_readmes_report_config_chooses_the_curves_axis(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- report-config -->", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "report.toml"
    path.write_text('preset = "quick"\n' + block)
    assert load_config(path=path).report.curves_x == "tokens"
