"""Experiment tracking: a finished run in MLflow, TensorBoard or Weights & Biases.

With ``[tracking] backend = "mlflow"``, ``"tensorboard"`` or ``"wandb"`` (``--tracking``), a run is
logged once its files are written: one tracking run for the benchmark run (its config, data
fingerprints, the verdict's differences, the report and its figures as artifacts) and, nested in it
(W&B: in its group), one per cell (method, strength, seed, the cell's method config, every
``train/*`` curve by step and every evaluation metric at each checkpoint). ``dpo-bench track
RUN_DIR`` logs a run written before.

The log is written from the run's own files (``run.json``, ``metrics.parquet``), so it holds the
numbers the report shows, whichever process or machine trained the cells. A tracking failure is
a note in ``run.json``, never a failed run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from .bench import from_dict_config

BACKENDS = ("mlflow", "tensorboard", "wandb")
#: What each backend needs installed (the `tracking` extra brings them).
MODULES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}
ARTIFACTS = ("report.md", "report.html", "run.json", "frontier.parquet", "comparisons.parquet")


def tracking_error(backend: str) -> str | None:
    """Why ``backend`` cannot log from this environment (one line), or None."""
    if not backend:
        return None
    if backend not in BACKENDS:
        return f"tracking.backend: '{backend}' is not one of {', '.join(BACKENDS)}"
    if importlib.util.find_spec(MODULES[backend]) is None:
        return (f"tracking.backend = '{backend}' needs the {MODULES[backend]} package: "
                "pip install 'dpo-bench[tracking]' (or set no backend)")
    return None


def metric_name(metric: str, temperature: float) -> str:
    """A metric's name as trackers accept it (MLflow: letters, digits, _ - . / and spaces); an
    evaluation at a temperature other than 1 gets it as a suffix."""
    name = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", metric.replace("β", "beta").replace("=", "_"))
    if isinstance(temperature, float) and not math.isnan(temperature) and temperature != 1.0:
        name += f"/T{temperature:g}"
    return name


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (and dataclasses) as dotted keys with string values (lists as JSON)."""
    if is_dataclass(data) and not isinstance(data, type):
        data = asdict(data)
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(data) if isinstance(data, (list, tuple)) else str(data)}


class LoggedRun:
    """What a benchmark run logs: its record, its cells and each cell's metric rows."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.record = json.loads((self.dir / "run.json").read_text())
        self.metrics = pd.read_parquet(self.dir / "metrics.parquet")

    @property
    def name(self) -> str:
        return self.record["run_id"]

    def params(self) -> dict[str, str]:
        params = {"run_id": self.name, "task": self.record["task"], "preset": self.record.get("preset") or "",
                  "seeds": json.dumps(self.record.get("seeds", [])), "code_version": self.record.get("code_version", ""),
                  "status": self.record.get("status", "")}
        params.update(flatten({k: v for k, v in self.record["config"].items() if k != "grid"}, "config."))
        params["config.grid"] = json.dumps(self.record["config"].get("grid", []))
        params.update({f"fingerprint.{k}": str(v) for k, v in (self.record.get("fingerprints") or {}).items()})
        return params

    def verdict(self) -> dict[str, float]:
        """The headline's differences: ``verdict/<a> - <b> at <budget> nats`` (and its adjusted p)."""
        path = self.dir / "comparisons.parquet"
        if not path.exists():
            return {}
        out = {}
        for row in pd.read_parquet(path).itertuples():
            key = metric_name(f"verdict/{row.method_a} - {row.method_b} at {row.kl_budget:g} nats", 1.0)
            out[key], out[f"{key}/p_adjusted"] = float(row.diff), float(row.p_adjusted)
        return out

    def cells(self) -> Iterator[tuple[str, dict[str, str], list[tuple[str, float, int]]]]:
        """(label, params, [(metric, value, step)]) for each cell of the run."""
        built = {cell.label: cell for cell in from_dict_config(self.record["config"]).cells()}
        rows = self.metrics[self.metrics["value"].notna()]
        for label, info in (self.record.get("cells") or {}).items():
            strength = info.get("strength")
            mine = rows[(rows["method"] == info["name"]) & (rows["seed"] == info["seed"])]
            mine = mine[mine["beta"].isna()] if strength is None else mine[mine["beta"] == strength]
            mine = mine.drop_duplicates(["metric", "temperature", "step"], keep="last")  # the SFT cell repeats its pipeline's rows
            params = {"method": info["method"], "name": info["name"], "strength": str(strength),
                      "seed": str(info["seed"]), "status": info.get("status", "")}
            if label in built:
                params.update(flatten(built[label].config(), "config."))
            points = [(metric_name(r.metric, r.temperature), float(r.value), int(r.step) if r.step == r.step else 0)
                      for r in mine.itertuples()]
            yield label, params, points


def log_run(run_dir: Path | str, backend: str, uri: str = "", experiment: str = "dpo-bench") -> str:
    """Log the run in ``run_dir`` to ``backend``; returns where it went."""
    error = tracking_error(backend)
    if error:
        raise ValueError(error)
    run = LoggedRun(Path(run_dir))
    return {"mlflow": _log_mlflow, "tensorboard": _log_tensorboard, "wandb": _log_wandb}[backend](run, uri, experiment)


def _log_mlflow(run: LoggedRun, uri: str, experiment: str) -> str:
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(tracking_uri=uri or None)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)

    def log(run_id: str, params: dict[str, str], points: list[tuple[str, float, int]]) -> None:
        # MLflow takes at most 100 params and 1000 metrics a batch, a param's value up to 6000 characters.
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=items[start:start + 100])
        metrics = [Metric(name, value, 0, step) for name, value, step in points]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])

    parent = client.create_run(experiment_id, run_name=run.name, tags={"dpo_bench.run_dir": str(run.dir.resolve())})
    log(parent.info.run_id, run.params(), [(k, v, 0) for k, v in run.verdict().items()])
    for name in ARTIFACTS:
        if (run.dir / name).exists():
            client.log_artifact(parent.info.run_id, str(run.dir / name))
    if (run.dir / "figures").is_dir():
        client.log_artifacts(parent.info.run_id, str(run.dir / "figures"), "figures")
    for label, params, points in run.cells():
        child = client.create_run(experiment_id, run_name=label,
                                  tags={"mlflow.parentRunId": parent.info.run_id, "dpo_bench.cell": label})
        log(child.info.run_id, params, points)
        client.set_terminated(child.info.run_id, "FINISHED" if params["status"] in ("ok", "") else "FAILED")
    client.set_terminated(parent.info.run_id)
    return f"MLflow run {parent.info.run_id} in experiment '{experiment}' at {mlflow.get_tracking_uri() if not uri else uri}"


def _log_tensorboard(run: LoggedRun, uri: str, experiment: str) -> str:
    from torch.utils.tensorboard import SummaryWriter

    root = Path(uri) if uri else run.dir.parent / "tensorboard"
    base = root / run.name
    with SummaryWriter(str(base)) as writer:
        writer.add_text("config", "```\n" + json.dumps(run.record["config"], indent=1) + "\n```")
        writer.add_text("fingerprints", json.dumps(run.record.get("fingerprints") or {}, indent=1))
        if (run.dir / "report.md").exists():
            writer.add_text("report", (run.dir / "report.md").read_text(encoding="utf-8"))
        for name, value in run.verdict().items():
            writer.add_scalar(name, value, 0)
    for label, params, points in run.cells():
        with SummaryWriter(str(base / re.sub(r"[^\w.=-]+", "_", label))) as writer:
            writer.add_text("params", json.dumps(params, indent=1))
            for name, value, step in points:
                writer.add_scalar(name, value, step)
    return f"TensorBoard event files under {base} (tensorboard --logdir {root})"


def _log_wandb(run: LoggedRun, uri: str, experiment: str) -> str:
    """W&B has no nested runs: the benchmark run and each cell are runs of one group (the run id),
    the cells' job type their method. Offline unless ``WANDB_MODE`` says otherwise (this machine
    may have no network or key): ``wandb sync`` uploads the directory later."""
    import wandb

    root = Path(uri) if uri else run.dir.parent / "wandb"
    root.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("WANDB_MODE", "offline")
    common = {"project": experiment, "group": run.name, "dir": str(root), "mode": mode, "reinit": "create_new"}

    parent = wandb.init(name=run.name, job_type="benchmark", config=run.params(), **common)
    try:
        parent.summary.update(run.verdict())
        report = wandb.Artifact(re.sub(r"[^\w.-]+", "_", f"{run.name}-report"), type="report")
        for name in ARTIFACTS:
            if (run.dir / name).exists():
                report.add_file(str(run.dir / name))
        if (run.dir / "figures").is_dir():
            report.add_dir(str(run.dir / "figures"), name="figures")
        parent.log_artifact(report)
    finally:
        parent.finish()
    for label, params, points in run.cells():
        cell = wandb.init(name=label, job_type=params["method"], config=params, **common)
        try:
            # W&B's steps only go forward within a run: one log call per step, every metric of it.
            by_step: dict[int, dict[str, float]] = {}
            for name, value, step in points:
                by_step.setdefault(step, {})[name] = value
            for step in sorted(by_step):
                cell.log(by_step[step], step=step)
        finally:
            cell.finish(exit_code=0 if params["status"] in ("ok", "") else 1)
    where = f"W&B runs of group '{run.name}' in project '{experiment}' under {root / 'wandb'}"
    return where + (" (offline: upload with `wandb sync` on each run directory)" if mode == "offline" else "")
