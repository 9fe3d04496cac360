"""The results store: every run's record and metrics in one SQL database.

Scheduled runs append here, so a run's report can compare each method with the previous runs of
the same preset, and ``dpo-bench history`` can print the trend. By default the store is a
SQLite file ``<reports-dir>/results.db``; any SQLAlchemy URL (``postgresql://host/db``) makes a
shared one. SQLAlchemy Core only, and every value goes in as a bound parameter: a method or run
name holding quotes or SQL is stored as the text it is.

Two tables: ``runs`` (one row per run id: preset, task, seed, status, times, config, fingerprints,
versions, code version) and ``metrics`` (the long rows of the run's ``metrics.parquet``).
Appending a run id that is already stored replaces its rows, so a run recorded twice is counted
once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

# Only report code (pandas, no torch): `dpo-bench history` and `compare` start fast.
from .report.history import HISTORY_METRICS, final_summary
from .files import atomic_write
from .schema import FLOAT_METRIC_COLUMNS, METRIC_COLUMNS

log = logging.getLogger("dpo_bench")

DB_NAME = "results.db"
# Earlier runs a report compares with (the latest is the baseline; the rest draw the trend).
PREVIOUS_RUNS = 10
COMPLETED = ("completed", "completed_with_failures")

metadata = sa.MetaData()

runs_table = sa.Table(
    "runs", metadata,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("preset", sa.String(255), index=True),
    sa.Column("task", sa.String(255)),
    sa.Column("seed", sa.Integer),
    sa.Column("status", sa.String(64)),
    # ISO 8601 in UTC: sorts as text, and reads the same in every database.
    sa.Column("started_at", sa.String(40), index=True),
    sa.Column("finished_at", sa.String(40)),
    sa.Column("wall_seconds", sa.Float),
    sa.Column("code_version", sa.String(64)),
    sa.Column("config_hash", sa.String(64)),
    sa.Column("config", sa.Text),
    sa.Column("fingerprints", sa.Text),
    sa.Column("versions", sa.Text),
    sa.Column("host", sa.String(255)),
    sa.Column("orchestrator", sa.String(64)),
    sa.Column("run_dir", sa.Text),
    sa.Column("recorded_at", sa.String(40)),
)

metrics_table = sa.Table(
    "metrics", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(255), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("task", sa.String(255)),
    sa.Column("method", sa.String(255), index=True),
    sa.Column("beta", sa.Float),
    sa.Column("seed", sa.Integer),
    sa.Column("step", sa.Integer),
    sa.Column("temperature", sa.Float),
    sa.Column("metric", sa.String(255)),
    sa.Column("value", sa.Float),
    sa.Column("stderr", sa.Float),
    sa.Column("ci_low", sa.Float),
    sa.Column("ci_high", sa.Float),
    sa.Column("n", sa.Integer),
)


class StoreError(RuntimeError):
    """The results store cannot be read or written (bad URL, unreachable server, locked file)."""


def default_url(reports_dir: str | Path) -> str:
    """The SQLite file ``<reports_dir>/results.db`` as a SQLAlchemy URL."""
    return sa.URL.create("sqlite", database=str(Path(reports_dir).resolve() / DB_NAME)).render_as_string()


def display_url(url: str) -> str:
    """The URL with its password hidden: safe for run.json, logs and reports."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid URL>"


def engine_for(url: str) -> sa.Engine:
    """An engine with the schema in place; a SQLite file's directory is created."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as e:
        raise StoreError(f"not a SQLAlchemy database URL: {display_url(url)} ({e})") from None
    connect_args: dict[str, Any] = {}
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # Two scheduled runs may finish together: wait for the other's write instead of failing.
            connect_args["timeout"] = 60
        engine = sa.create_engine(parsed, connect_args=connect_args)
        metadata.create_all(engine)
    except (sa.exc.SQLAlchemyError, ModuleNotFoundError, OSError) as e:
        raise StoreError(f"cannot open the results store {display_url(url)}: {e}") from None
    return engine


def _none_if_nan(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def config_hash(config: dict) -> str:
    """Hash of a resolved config, ignoring settings that change speed or where results are shown, not the results."""
    kept = {k: v for k, v in config.items() if k not in ("threads", "device", "report", "tracking")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_row(record: dict, run_dir: Path) -> dict:
    def js(value: Any) -> str:
        return json.dumps(value if value is not None else {}, sort_keys=True, default=str)

    config = record.get("config") or {}
    return {
        "run_id": str(record["run_id"]), "preset": record.get("preset"), "task": record.get("task"),
        "seed": record.get("seed"), "status": record.get("status"),
        "started_at": record.get("started_at"), "finished_at": record.get("finished_at"),
        "wall_seconds": _none_if_nan(record.get("wall_seconds")), "code_version": record.get("code_version"),
        "config_hash": config_hash(config), "config": js(config), "fingerprints": js(record.get("fingerprints")),
        "versions": js(record.get("versions")), "host": record.get("host"), "orchestrator": record.get("orchestrator", "in-process"),
        "run_dir": str(Path(run_dir).resolve()), "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _metric_rows(metrics: pd.DataFrame, run_id: str) -> list[dict]:
    frame = metrics.reindex(columns=list(METRIC_COLUMNS)).assign(run_id=run_id)
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    for row in rows:
        for col in ("seed", "step", "n"):
            if row[col] is not None:
                row[col] = int(row[col])
        for col in FLOAT_METRIC_COLUMNS:
            row[col] = _none_if_nan(float(row[col])) if row[col] is not None else None
    return rows


def append_run(run_dir: str | Path, url: str) -> int:
    """Record the run in ``run_dir`` (its run.json and metrics.parquet); returns the metric rows stored.

    One transaction: a run id already in the store has its rows replaced, never duplicated.
    """
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    run_id = str(record["run_id"])
    rows = _metric_rows(metrics, run_id)
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.delete(metrics_table).where(metrics_table.c.run_id == run_id))
            conn.execute(sa.delete(runs_table).where(runs_table.c.run_id == run_id))
            conn.execute(sa.insert(runs_table), [_run_row(record, run_dir)])
            if rows:
                conn.execute(sa.insert(metrics_table), rows)
    except sa.exc.SQLAlchemyError as e:
        raise StoreError(f"cannot record run {run_id} in {display_url(url)}: {e}") from None
    finally:
        engine.dispose()
    return len(rows)


def _frame(result: sa.CursorResult, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([dict(r) for r in result.mappings()], columns=columns)


def runs(url: str, preset: str | None = None, task: str | None = None, run_ids: list[str] | None = None) -> pd.DataFrame:
    """Stored runs, oldest first (without their config and fingerprint text)."""
    cols = [c for c in runs_table.c if c.name not in ("config", "fingerprints", "versions")]
    query = sa.select(*cols).order_by(runs_table.c.started_at, runs_table.c.run_id)
    if preset is not None:
        query = query.where(runs_table.c.preset == preset)
    if task is not None:
        query = query.where(runs_table.c.task == task)
    if run_ids is not None:
        query = query.where(runs_table.c.run_id.in_(list(run_ids)))
    return _read(url, query, [c.name for c in cols])


def previous_runs(url: str, preset: str, task: str | None = None, before: str | None = None,
                  exclude: str | None = None, limit: int = PREVIOUS_RUNS) -> pd.DataFrame:
    """The latest ``limit`` completed runs of ``preset`` (and ``task``) started before ``before``, oldest first."""
    cols = [c for c in runs_table.c if c.name not in ("config", "fingerprints", "versions")]
    query = sa.select(*cols).where(runs_table.c.preset == preset, runs_table.c.status.in_(COMPLETED))
    if task is not None:
        query = query.where(runs_table.c.task == task)
    if before is not None:
        query = query.where(runs_table.c.started_at < before)
    if exclude is not None:
        query = query.where(runs_table.c.run_id != exclude)
    query = query.order_by(runs_table.c.started_at.desc(), runs_table.c.run_id.desc()).limit(limit)
    frame = _read(url, query, [c.name for c in cols])
    return frame.iloc[::-1].reset_index(drop=True)


def run_metrics(url: str, run_ids: list[str], method: str | None = None, final_only: bool = False) -> pd.DataFrame:
    """The stored metric rows of these runs (long format, as in metrics.parquet).

    ``final_only`` keeps the evaluations at temperature 1.0, which is all a final summary reads.
    """
    cols = [metrics_table.c[name] for name in METRIC_COLUMNS]
    query = sa.select(*cols).where(metrics_table.c.run_id.in_(list(run_ids))).order_by(metrics_table.c.id)
    if method is not None:
        query = query.where(metrics_table.c.method == method)
    if final_only:
        query = query.where(metrics_table.c.temperature == 1.0)
    frame = _read(url, query, list(METRIC_COLUMNS))
    for col in FLOAT_METRIC_COLUMNS:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    return frame


def run_config(url: str, run_id: str) -> dict | None:
    query = sa.select(runs_table.c.config).where(runs_table.c.run_id == run_id)
    frame = _read(url, query, ["config"])
    return json.loads(frame["config"].iloc[0]) if len(frame) else None


def _read(url: str, query: sa.Select, columns: list[str]) -> pd.DataFrame:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            return _frame(conn.execute(query), columns)
    except sa.exc.SQLAlchemyError as e:
        raise StoreError(f"cannot read the results store {display_url(url)}: {e}") from None
    finally:
        engine.dispose()


def summaries(url: str, run_frame: pd.DataFrame, method: str | None = None,
              metrics_wanted: tuple[str, ...] = HISTORY_METRICS) -> pd.DataFrame:
    """Final (method, beta, metric) summaries of the runs in ``run_frame``, with their run columns."""
    columns = list(run_frame.columns) + ["method", "beta", "metric", "value", "stderr", "ci_low", "ci_high", "n", "seeds"]
    if run_frame.empty:
        return pd.DataFrame(columns=columns)
    metrics = run_metrics(url, list(run_frame["run_id"]), method=method, final_only=True)
    parts = []
    for _, run in run_frame.iterrows():
        summary = final_summary(metrics[metrics["run_id"] == run["run_id"]], metrics_wanted)
        if not summary.empty:
            parts.append(summary.assign(**{k: run[k] for k in run_frame.columns}))
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def history(url: str, preset: str | None = None, method: str | None = None, task: str | None = None,
            metrics_wanted: tuple[str, ...] = HISTORY_METRICS) -> pd.DataFrame:
    """Every stored run's final result per (method, beta, metric), oldest run first."""
    return summaries(url, runs(url, preset=preset, task=task), method=method, metrics_wanted=metrics_wanted)


def write_history(run_dir: str | Path, url: str, limit: int = PREVIOUS_RUNS) -> pd.DataFrame:
    """Write ``history.parquet``: this run's final summary and those of the previous runs of its
    preset and task (the report's History section compares them)."""
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    this_hash = config_hash(record.get("config") or {})
    earlier = previous_runs(url, preset=record.get("preset"), task=record.get("task"), before=record.get("started_at"),
                            exclude=str(record["run_id"]), limit=limit)
    current = final_summary(pd.read_parquet(run_dir / "metrics.parquet"), HISTORY_METRICS).assign(
        run_id=str(record["run_id"]), started_at=record.get("started_at"), current=True, same_config=True)
    parts = [current]
    if not earlier.empty:
        before = summaries(url, earlier)
        parts.append(before.assign(current=False, same_config=before["config_hash"] == this_hash))
    columns = ["run_id", "started_at", "current", "same_config", "method", "beta", "metric", "value", "stderr",
               "ci_low", "ci_high", "n", "seeds"]
    frame = pd.concat([p.reindex(columns=columns) for p in parts if not p.empty], ignore_index=True) \
        if any(not p.empty for p in parts) else pd.DataFrame(columns=columns)
    frame["current"] = frame["current"].astype(bool)
    frame["same_config"] = frame["same_config"].astype(bool)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(run_dir / "history.parquet", buffer.getvalue())
    return frame


def record_run(run_dir: str | Path, url: str) -> str | None:
    """Compare the run with its predecessors (``history.parquet``), then append it to the store.

    A store that cannot be reached must not lose a finished run: the error is logged and
    returned (the caller notes it in run.json), and the run's files stay complete.
    """
    try:
        write_history(run_dir, url)
        append_run(run_dir, url)
    except StoreError as e:
        log.warning("results store: %s", e)
        return str(e)
    except Exception as e:  # noqa: BLE001 — a bug here must not lose a finished run's files either
        log.exception("results store: recording the run failed")
        return f"{type(e).__name__}: {e}"
    return None
