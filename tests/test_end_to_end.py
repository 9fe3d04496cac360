"""The `quick` preset end to end (two whole-pipeline seeds): through the Prefect flow, every output
file, finite metrics, the frontier and the verdict, identical results when run again from scratch
in this process, and a cached rerun that recomputes nothing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.bench import load_config
from dpo_bench.run import run_benchmark
from dpo_bench.stages import METRIC_COLUMNS
from dpo_bench.training import WALL_CLOCK_METRICS

RUN_FILES = ["report.md", "report.html", "metrics.parquet", "samples.parquet", "per_prompt.parquet", "frontier.parquet",
             "comparisons.parquet", "invariance.parquet", "run.json", "figures/frontier.png", "figures/win_rates.png",
             "figures/training_curves.png"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, prefect_harness):
    from pipelines.benchmark import benchmark_flow

    reports = tmp_path_factory.mktemp("reports")
    cache = tmp_path_factory.mktemp("cache")
    config = load_config("quick")
    # No Dask workers: the cells run in the flow's process with its threads, as in run_benchmark
    # (test_dask.py runs a grid on workers).
    run_dir = benchmark_flow(config=config.to_dict(), reports_dir=str(reports), run_id="flow", cache_dir=str(cache),
                             progress=False, workers=0)
    return config, reports, cache, run_dir


def _metrics(run_dir) -> pd.DataFrame:
    """The run's metrics but the wall-clock ones, which no two runs share."""
    metrics = pd.read_parquet(f"{run_dir}/metrics.parquet").drop(columns="run_id")
    return metrics[~metrics["metric"].isin(WALL_CLOCK_METRICS)].reset_index(drop=True)


def test_every_output_file_is_written(quick_run):
    _, reports, _, run_dir = quick_run
    assert run_dir == str(reports / "flow")
    for name in RUN_FILES:
        assert (reports / "flow" / name).is_file(), name


def test_metrics_follow_the_contract_and_are_finite(quick_run):
    config, _, _, run_dir = quick_run
    metrics = pd.read_parquet(f"{run_dir}/metrics.parquet")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert np.isfinite(metrics["value"].to_numpy(dtype=float)).all()
    finals = metrics[(metrics["temperature"] == 1.0) & (metrics["metric"] == "gold_reward")]
    assert {c.method for c in config.cells()} <= set(finals["method"])
    kl = metrics[(metrics["metric"] == "kl") & (metrics["method"] == "sft")]
    assert (kl["value"] == 0).all()
    # Every evaluation carries its uncertainty.
    evals = metrics[metrics["metric"].isin(["gold_reward", "kl", "win_rate"]) & (metrics["method"] != "sft")]
    assert evals["stderr"].notna().all() and (evals["n"] > 1).all()
    wins = metrics[metrics["metric"] == "win_rate"]
    assert ((wins["ci_low"] <= wins["value"]) & (wins["value"] <= wins["ci_high"])).all()


def test_run_record_has_what_reproduces_the_run(quick_run):
    config, _, cache, run_dir = quick_run
    record = json.loads(open(f"{run_dir}/run.json").read())
    assert record["seeds"] == list(config.pipeline_seeds) == [0, 1] and record["status"] == "completed"
    assert record["config"] == config.to_dict()
    assert {"preferences", "corpus", "train_prompts", "eval_prompts"} <= set(record["fingerprints"])
    assert record["cache_dir"] == str(cache.resolve())
    assert record["orchestrator"] == "prefect"
    assert "torch" in record["versions"] and record["device"] == "cpu"
    # Every stage's and cell's torch thread count: their numbers depend on it at float level.
    threads = record["torch_threads"]
    assert {f"{stage}, seed {s}" for stage in ("task", "sft", "preferences", "reward_model") for s in (0, 1)} <= set(threads)
    assert {c.label for c in config.cells()} <= set(threads)
    # The SFT stage and the reference's cell each keep their own time.
    assert {"sft, seed 0", "sft seed=0", "sft, seed 1", "sft seed=1"} <= set(record["timings"])
    # Each seed is its own pipeline: its own SFT model, preference data and reward model.
    keys = {seed: record["pipelines"][seed]["stage_keys"] for seed in ("0", "1")}
    assert keys["0"]["task"] == keys["1"]["task"]
    assert all(keys["0"][stage] != keys["1"][stage] for stage in ("sft", "candidates", "preferences", "reward_model"))
    assert all(isinstance(n, int) and n >= 1 for n in threads.values())


def test_invariance_checks_pass_and_their_controls_fail(quick_run):
    _, _, _, run_dir = quick_run
    rows = pd.read_parquet(f"{run_dir}/invariance.parquet")
    checks = rows[rows["kind"] == "check"]
    # The quick preset runs the bandit checks only (the empirical checks are the default preset's).
    assert {c.split(",")[0] for c in checks["check"]} == {
        "bandit_convergence[dpo", "bandit_convergence[ppo", "lemma2_bandit_ppo[r̂]", "lemma2_bandit_ppo[r̂+f]"}
    assert len(checks) == 6
    assert checks["passed"].astype(bool).all()
    assert checks["negative_control_detected"].astype(bool).all()
    assert (rows["kind"] == "finding").any()


def test_the_report_has_its_sections(quick_run):
    _, _, _, run_dir = quick_run
    markdown = open(f"{run_dir}/report.md").read()
    for section in ("Headline", "Results", "Frontier", "Reward model", "Invariance checks", "Provenance"):
        assert f"## {section}" in markdown
    assert "Bayes ceiling" in markdown


def test_the_frontier_and_the_verdict_are_drawn_between_seeds(quick_run):
    config, _, _, run_dir = quick_run
    frontier = pd.read_parquet(f"{run_dir}/frontier.parquet")
    assert {"method", "kl_budget", "gold_reward", "ci_low", "ci_high", "n_seeds"} <= set(frontier.columns)
    assert set(frontier["kl_budget"]) <= set(config.verdict.kl_budgets) and (frontier["n_seeds"] == 2).all()
    assert ((frontier["ci_low"] <= frontier["gold_reward"]) & (frontier["gold_reward"] <= frontier["ci_high"])).all()
    comparisons = pd.read_parquet(f"{run_dir}/comparisons.parquet")
    # compared exactly at the budgets both methods cover with their own policies in every seed
    covered = frontier[frontier["covered"]].groupby("kl_budget")["method"].apply(set)
    assert set(comparisons["kl_budget"]) == {k for k, m in covered.items() if {"ppo", "dpo"} <= m}
    assert not comparisons.empty  # quick's grid shares a covered budget: the verdict path runs
    assert set(comparisons["method_a"]) == {"ppo"} and set(comparisons["method_b"]) == {"dpo"}
    assert (comparisons["test"] == "paired t over 2 seeds").all() and (comparisons["p_adjusted"] >= comparisons["p"]).all()
    per_prompt = pd.read_parquet(f"{run_dir}/per_prompt.parquet")
    sizes = per_prompt[(per_prompt["method"] == "sft")].groupby(["seed", "split"]).size().to_dict()
    task = config.sentiment
    assert sizes == {(s, split): n for s in (0, 1) for split, n in (("test", task.n_eval_prompts), ("val", task.n_val_prompts))}
    headline = open(f"{run_dir}/report.md").read().split("## Headline", 1)[1].split("##", 1)[0]
    assert "RLHF (ppo)" in headline.splitlines()[2] and "2 whole-pipeline seeds" in headline


def test_the_flow_and_the_in_process_run_give_the_same_results(quick_run, tmp_path):
    """Seed 0's pipeline, which the flow builds through its step tasks, built again in this process
    from an empty cache: the same metrics and per-prompt rows. (Seed 1's pipeline runs through
    plan_stages on either path; the frontier and the verdict are functions of these rows.)"""
    config, _, _, run_dir = quick_run
    again = run_benchmark(config.for_seed(0), tmp_path, run_id="again", cache_dir=tmp_path / "fresh-cache", progress=False)
    flow_metrics = _metrics(run_dir)
    flow_metrics = flow_metrics[flow_metrics["seed"] == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(flow_metrics, _metrics(again))
    per_prompt = pd.read_parquet(f"{run_dir}/per_prompt.parquet")
    pd.testing.assert_frame_equal(per_prompt[per_prompt["seed"] == 0].reset_index(drop=True),
                                  pd.read_parquet(again / "per_prompt.parquet"))


def test_a_second_run_comes_from_the_cache(quick_run):
    config, reports, cache, run_dir = quick_run
    second = run_benchmark(config, reports, run_id="second", cache_dir=cache, progress=False)
    record = json.loads((second / "run.json").read_text())
    assert set(record["cached_stages"]) == {"task", "sft", "reference_eval", "candidates", "preferences", "ref_logps", "reward_model", "cell"}
    assert all(seconds == 0 for seconds in record["timings"].values())
    pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(second))


def test_report_rebuilds_from_the_run_files_alone(quick_run, tmp_path):
    import shutil

    from pipelines.cli import main

    _, _, _, run_dir = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.md").unlink()
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").stat().st_size > 10_000


def test_a_cell_exports_as_a_transformers_model_with_its_card(quick_run, tmp_path, capsys):
    """`dpo-bench export`: AutoModelForCausalLM and AutoTokenizer load the directory, and its
    log-probs of the cell's own test samples are the cell's policy's; the card names the cell and
    its final gold reward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_bench.logprobs import collate, sequence_logps
    from dpo_bench.policy import load_policy
    from pipelines.cli import main

    _, reports, _, run_dir = quick_run
    record = json.loads((reports / "flow" / "run.json").read_text())
    label = next(label for label, cell in record["cells"].items() if cell["method"] == "dpo")
    cell = record["cells"][label]
    out = tmp_path / "exported"
    assert main(["export", run_dir, label, str(out)]) == 0
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    samples = pd.read_parquet(f"{cell['stage']}/samples.parquet").head(8)
    prompts = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in samples["prompt"]]
    completions = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in samples["completion"]]
    batch = collate(prompts, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        exported = sequence_logps(model, batch)
        original = sequence_logps(load_policy(cell["policy"]).eval(), batch)
    assert torch.equal(exported, original) and torch.isfinite(exported).all()
    card = (out / "README.md").read_text()
    metrics = pd.read_parquet(f"{run_dir}/metrics.parquet")
    gold = metrics[(metrics["method"] == "dpo") & (metrics["seed"] == cell["seed"]) & (metrics["metric"] == "gold_reward")
                   & (metrics["temperature"] == 1.0) & (metrics["beta"] == cell["strength"])].sort_values("step").iloc[-1]
    assert f"`{label}`" in card and f"| gold_reward | {gold['value']:.4g} ± {gold['stderr']:.3g} |" in card
    # a second export into the same directory, an unknown cell and the SFT model (no trained policy) are one-line errors
    for argv, message in (([run_dir, label, str(out)], "exists and is not empty"),
                          ([run_dir, "dpo β=9 seed=0", str(tmp_path / "x")], "no cell 'dpo β=9 seed=0'"),
                          ([run_dir, "sft seed=0", str(tmp_path / "y")], "kept no trained policy")):
        capsys.readouterr()
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
