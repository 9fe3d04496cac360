"""Experiment tracking end to end from the CLI: `dpo-bench run --tracking mlflow` leaves one parent
run with a child per cell in a real local MLflow store (SQLite), holding the numbers of the run's
own files; `dpo-bench track RUN_DIR --tracking tensorboard` writes event files that TensorBoard
reads back, and `--tracking wandb` offline runs whose logs read back; a missing tracker package or a
bad run directory is one line, before anything runs."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
import torch

from dpo_bench import tracking
from dpo_bench.tracking import metric_name
from pipelines.cli import main

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    before, cwd = torch.get_num_threads(), os.getcwd()
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    try:
        code = main(["run", "--task", "bandit", "--preset", "quick", "--no-prefect", "--quiet", "--reports-dir",
                     str(root / "reports"), "--run-id", "tracked", "--tracking", "mlflow", "--tracking-uri", uri])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(before)
    assert code == 0
    return root / "reports" / "tracked", uri


def _final(metrics: pd.DataFrame, name: str, strength: float | None, seed: int, metric: str) -> float:
    rows = metrics[(metrics["method"] == name) & (metrics["seed"] == seed) & (metrics["metric"] == metric)]
    rows = rows[rows["beta"].isna()] if strength is None else rows[rows["beta"] == strength]
    rows = rows[rows["temperature"].isna() | (rows["temperature"] == 1.0)]
    return float(rows.sort_values("step")["value"].iloc[-1])


def test_a_tracked_run_is_one_parent_run_with_a_child_per_cell_holding_its_numbers(tracked_run):
    import mlflow

    run_dir, uri = tracked_run
    record = json.loads((run_dir / "run.json").read_text())
    assert record["tracking"].startswith("MLflow run ")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("dpo-bench")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["tracked"]
    parent = parents[0]
    assert parent.data.params["task"] == "bandit" and parent.data.params["preset"] == "quick"
    assert parent.data.params["config.sft.steps"] == str(record["config"]["sft"]["steps"])
    assert {k.removeprefix("fingerprint.") for k in parent.data.params if k.startswith("fingerprint.")} == set(record["fingerprints"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "run.json", "figures"} <= artifacts

    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(record["cells"])
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    for label, cell in record["cells"].items():
        child = children[label]
        assert child.data.params["method"] == cell["method"] and child.data.params["seed"] == str(cell["seed"])
        assert child.info.status == "FINISHED"
        for metric in ("gold_reward", "kl"):  # the last logged value is the cell's final one
            assert child.data.metrics[metric] == pytest.approx(_final(metrics, cell["name"], cell["strength"], cell["seed"], metric))
        if cell["method"] in ("dpo", "ipo", "ppo"):
            loss = client.get_metric_history(child.info.run_id, "train/loss")
            assert len(loss) > 1 and all(math.isfinite(m.value) for m in loss)
            assert child.data.params["config.beta" if cell["method"] != "ppo" else "config.kl_coef"] == str(cell["strength"])
    # The checkpoints are steps of the curve: one gold reward per evaluated checkpoint.
    trained = next(label for label, c in record["cells"].items() if c["method"] == "dpo")
    history = client.get_metric_history(children[trained].info.run_id, "gold_reward")
    assert len(history) == record["config"]["evaluation"]["n_checkpoints"] and len({m.step for m in history}) == len(history)


def test_track_writes_tensorboard_event_files_that_read_back(tracked_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_run
    assert main(["track", str(run_dir), "--tracking", "tensorboard", "--tracking-uri", str(tmp_path / "tb")]) == 0
    record = json.loads((run_dir / "run.json").read_text())
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    base = tmp_path / "tb" / "tracked"
    cells = sorted(p for p in base.iterdir() if p.is_dir())
    assert len(cells) == len(record["cells"])
    label, cell = next((label, c) for label, c in record["cells"].items() if c["method"] == "ppo")
    events = EventAccumulator(str(next(p for p in cells if p.name == label.replace(" ", "_")))).Reload()
    gold = events.Scalars("gold_reward")
    assert gold[-1].value == pytest.approx(_final(metrics, cell["name"], cell["strength"], cell["seed"], "gold_reward"), rel=1e-6)
    assert "train/kl" in events.Tags()["scalars"]
    assert "report/text_summary" in EventAccumulator(str(base)).Reload().Tags()["tensors"]


def test_track_writes_offline_wandb_runs_of_one_group_that_read_back(tracked_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from .wandb_log import records, values

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default here
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, _ = tracked_run
    assert main(["track", str(run_dir), "--tracking", "wandb", "--tracking-uri", str(tmp_path / "wb")]) == 0
    record = json.loads((run_dir / "run.json").read_text())
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    logs = {}
    for path in (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"):
        read = list(records(path))
        run = next(r.run for r in read if r.WhichOneof("record_type") == "run")
        logs[run.display_name] = (run, read)
    assert set(logs) == {"tracked", *record["cells"]}
    assert {run.run_group for run, _ in logs.values()} == {"tracked"}

    parent, read = logs["tracked"]
    assert parent.job_type == "benchmark" and parent.project == "dpo-bench"
    config = values(parent.config.update)
    assert config["task"] == "bandit" and config["config.sft.steps"] == str(record["config"]["sft"]["steps"])
    summary = {k: v for r in read if r.WhichOneof("record_type") == "summary" for k, v in values(r.summary.update).items()}
    verdict = tracking.LoggedRun(run_dir).verdict()
    assert verdict and {k: summary[k] for k in verdict} == pytest.approx(verdict)
    files = {c.path for r in read if r.WhichOneof("record_type") == "artifact" for c in r.artifact.manifest.contents}
    assert {"report.md", "report.html", "run.json"} <= files and any(f.startswith("figures/") for f in files)

    for label, cell in record["cells"].items():
        run, read = logs[label]
        assert run.job_type == cell["method"]
        config = values(run.config.update)
        assert config["seed"] == str(cell["seed"]) and config["method"] == cell["method"]
        history = [values(r.history.item) for r in read if r.WhichOneof("record_type") == "history"]
        steps = [h["_step"] for h in history if "_step" in h]
        assert steps == sorted(steps)
        gold = [h["gold_reward"] for h in history if "gold_reward" in h]
        assert gold[-1] == pytest.approx(_final(metrics, cell["name"], cell["strength"], cell["seed"], "gold_reward"))
        if cell["method"] in ("dpo", "ipo", "ppo"):
            assert len([h for h in history if "train/loss" in h]) > 1
        assert [r.exit.exit_code for r in read if r.WhichOneof("record_type") == "exit"] == [0]


def test_a_missing_tracker_package_is_one_line_before_anything_runs(monkeypatch, capsys, tmp_path):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    assert main(["run", "--task", "bandit", "--preset", "quick", "--no-prefect", "--reports-dir", str(tmp_path),
                 "--tracking", "mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dpo-bench: tracking.backend = 'mlflow' needs the mlflow package: pip install 'dpo-bench[tracking]' "
                   "(or set no backend)")
    assert not any(tmp_path.iterdir())
    assert main(["check-config", "--task", "bandit", "--preset", "quick", "--tracking", "mlflow"]) == 2


def test_track_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["track", str(tmp_path), "--tracking", "tensorboard"]) == 2
    assert capsys.readouterr().err.strip() == f"dpo-bench: {tmp_path}: no run.json (not a directory written by `dpo-bench run`)"


@pytest.mark.parametrize("metric, temperature, expected", [
    ("gold_reward", 1.0, "gold_reward"),
    ("gold_reward", 0.7, "gold_reward/T0.7"),
    ("train/loss", math.nan, "train/loss"),
    ("h2h/dpo (β=0.1)", 1.0, "h2h/dpo _beta_0.1_"),
    ("objective/best_of_n (N=4)", 1.0, "objective/best_of_n _N_4_"),
])
def test_metric_names_are_what_mlflow_accepts(metric, temperature, expected):
    assert metric_name(metric, temperature) == expected
