"""Reading a run directory: the only inputs a report is built from.

A report must be rebuildable from a run directory alone (``dpo-bench report RUN_DIR``), so this
module reads files and never imports training code. Every reader tolerates missing optional files
and missing keys: an old or partial run should still give a report, just a shorter one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..schema import FLOAT_METRIC_COLUMNS, METRIC_COLUMNS, STRENGTH_SYMBOLS

# Methods that are not policies: they have rows in metrics.parquet but no cell in the results.
NON_POLICY_METHODS = frozenset({"reward_model", "optimum"})
REFERENCE_METHOD = "sft"

# Default names of each method's strength value when run.json does not say (see DESIGN.md).
_DEFAULT_STRENGTH = {"ppo": "kl_coef", "best_of_n": "N", "unlikelihood": "alpha"}


#: What the training curves can be drawn against: each cell's ``compute/`` metric and the axis label
#: (the names of ``[report] curves_x``).
CURVES_X = {
    "steps": ("compute/steps", "optimiser steps"),
    "samples": ("compute/samples", "samples generated in training"),
    "tokens": ("compute/tokens", "tokens trained on"),
    "seconds": ("compute/seconds", "wall seconds of training"),
}


@dataclass(frozen=True)
class RewardScale:
    """What the report's reward numbers are: the gold reward, or a judge's scores.

    ``metric`` is the metric (and wide column) name, ``name`` how tables and axes call it,
    ``judge`` what win rates are judged by, and ``note`` the plain warning a report opens with
    when the numbers are not a gold reward (empty for the gold reward).
    """

    metric: str = "gold_reward"
    name: str = "gold reward"
    judge: str = "the gold reward"
    note: str = ""

    @property
    def is_gold(self) -> bool:
        return self.metric == "gold_reward"


GOLD = RewardScale()


def judge_scale(config: dict[str, Any] | None) -> RewardScale:
    """The scale of a run whose metrics are ``judge_reward``, described from its hf config."""
    hf = (config or {}).get("hf") or {}
    judge = str(hf.get("judge", "reward_model"))
    if judge == "reward_model":
        return RewardScale(
            "judge_reward", "judge reward (learned RM)", "the learned reward model (a proxy)",
            "There is no gold reward in this run: rewards and win rates are judged by the learned reward model, "
            "a proxy. PPO optimises that same model, so these numbers flatter PPO; read them as agreement "
            "with the reward model, not as true quality.")
    what = f"the classifier {hf.get('judge_model', '')}".rstrip() if judge == "classifier" else f"the registered judge '{judge}'"
    return RewardScale(
        "judge_reward", "judge reward", f"{what} (not a gold reward)",
        f"There is no gold reward in this run: rewards and win rates are judged by {what}, which the config "
        "does not declare to be the ground truth; read them as that judge's opinion.")


@dataclass(frozen=True)
class RunData:
    """Everything a report reads from one run directory."""

    run_dir: Path
    metrics: pd.DataFrame
    samples: pd.DataFrame | None = None
    invariance: pd.DataFrame | None = None
    run: dict[str, Any] = field(default_factory=dict)
    # history.parquet: this run's and earlier runs' final results (absent in older run directories)
    history: pd.DataFrame | None = None
    # frontier.parquet and comparisons.parquet: gold reward at KL budgets, and the verdict's tests
    frontier: pd.DataFrame | None = None
    comparisons: pd.DataFrame | None = None
    # the training curves' x-axis chosen when the report is rebuilt (None: the run's [report] curves_x)
    curves_x_override: str | None = None

    def __post_init__(self) -> None:
        if self.curves_x_override is not None and self.curves_x_override not in CURVES_X:
            raise ValueError(f"curves_x: unknown axis '{self.curves_x_override}'; choose one of {', '.join(CURVES_X)}")

    @property
    def curves_x(self) -> str:
        """The training curves' x-axis (a key of :data:`CURVES_X`): the override, else the run's config, else steps."""
        if self.curves_x_override is not None:
            return self.curves_x_override
        chosen = ((self.run.get("config") or {}).get("report") or {}).get("curves_x")
        return chosen if chosen in CURVES_X else "steps"

    @property
    def checks(self) -> pd.DataFrame | None:
        """The invariance rows that are checks (pass/fail, with a negative control); in runs written
        before findings existed (no ``kind`` column), every row is one."""
        return self._invariance_kind("check")

    @property
    def findings(self) -> pd.DataFrame | None:
        """The invariance rows that are findings: measured numbers, with no tolerance or verdict."""
        return self._invariance_kind("finding")

    def _invariance_kind(self, kind: str) -> pd.DataFrame | None:
        inv = self.invariance
        if inv is None:
            return None
        rows = inv[inv["kind"] == kind] if "kind" in inv else (inv if kind == "check" else inv.iloc[0:0])
        return rows.reset_index(drop=True) if len(rows) else None

    @property
    def run_id(self) -> str:
        if self.run.get("run_id"):
            return str(self.run["run_id"])
        ids = self.metrics["run_id"].dropna().unique() if len(self.metrics) else []
        return str(ids[0]) if len(ids) else self.run_dir.name

    @property
    def reward(self) -> RewardScale:
        """The gold reward, unless the run's evaluations are a judge's (``judge_reward``)."""
        if (self.metrics["metric"] == "judge_reward").any():
            return judge_scale(self.run.get("config"))
        return GOLD

    @property
    def task(self) -> str:
        if self.run.get("task"):
            return str(self.run["task"])
        tasks = self.metrics["task"].dropna().unique() if len(self.metrics) else []
        return str(tasks[0]) if len(tasks) else "unknown"

    def strength_name(self, method: str) -> str:
        """Name of the method's strength value (β, kl_coef, N, α ...) for labels."""
        info = (self.run.get("methods") or {}).get(method)
        name = info.get("strength") if isinstance(info, dict) else None
        name = str(name) if name else _DEFAULT_STRENGTH.get(method, "beta")
        return STRENGTH_SYMBOLS.get(name, name)

    def config_label(self, method: str, beta: float) -> str:
        """'dpo (β=0.1)'; just the method when it has no strength value (e.g. sft)."""
        if beta is None or (isinstance(beta, float) and math.isnan(beta)):
            return str(method)
        return f"{method} ({self.strength_name(method)}={format_strength(beta)})"

    def cell_label(self, method: str, beta: float, seed: int, with_seed: bool) -> str:
        label = self.config_label(method, beta)
        return f"{label}, seed {seed}" if with_seed else label

    @property
    def multi_seed(self) -> bool:
        """True when some (method, beta) was trained with more than one seed."""
        ev = policy_rows(self.metrics)
        if ev.empty:
            return False
        counts = ev.groupby(["method", "beta"], dropna=False)["seed"].nunique()
        return bool((counts > 1).any())


def format_strength(value: float) -> str:
    return f"{value:g}"


def policy_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows that belong to trained or reference policies (not the RM, not the exact optimum)."""
    return metrics[~metrics["method"].isin(NON_POLICY_METHODS)]


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return pd.read_parquet(path)


def _normalise_metrics(df: pd.DataFrame | None) -> pd.DataFrame:
    if df is None:
        df = pd.DataFrame(columns=list(METRIC_COLUMNS))
    df = df.copy()
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    for col in FLOAT_METRIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("seed", "step", "n"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype("int64")
    for col in ("run_id", "task", "method", "metric"):
        df[col] = df[col].astype("object").where(df[col].notna(), "").astype(str)
    return df.reset_index(drop=True)


def _read_run_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read metrics, samples, invariance checks and run.json from ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    metrics = _normalise_metrics(_read_parquet(run_dir / "metrics.parquet"))
    samples = _read_parquet(run_dir / "samples.parquet")
    invariance = _read_parquet(run_dir / "invariance.parquet")
    if invariance is not None and invariance.empty:
        invariance = None
    if samples is not None and samples.empty:
        samples = None
    return RunData(
        run_dir=run_dir,
        metrics=metrics,
        samples=samples,
        invariance=invariance,
        run=_read_run_json(run_dir / "run.json"),
        history=_read_parquet(run_dir / "history.parquet"),
        frontier=_read_parquet(run_dir / "frontier.parquet"),
        comparisons=_read_parquet(run_dir / "comparisons.parquet"),
    )
