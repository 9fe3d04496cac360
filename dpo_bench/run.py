"""A whole benchmark run: the stages in order, then the run directory's files and the report.

:func:`plan_stages` and :func:`finish_run` are shared by the in-process runner here and the
Prefect flow in ``pipelines/benchmark.py``, which only adds orchestration around them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from . import store, tracking
from .schema import STRENGTH_SYMBOLS
from .bench import BenchConfig, Cell
from .configs import to_dict
from .files import write_json
from .methods.base import get_method
from .report import build_report
from .verdict import Objective, collect_per_prompt, objective_rows, verdict_frames
from .stages import (
    METRIC_COLUMNS, Bench, Stage, Upstream, built_threads, cell_status, fitted_normaliser, label_temperature_rms, preference_info,
    process_alive, run_cell, run_invariance_checks, write_parquet,
)
from .stages.pipeline import PIPELINE, Step, run_steps

RUN_FILES = ("report.md", "report.html", "metrics.parquet", "samples.parquet", "per_prompt.parquet", "frontier.parquet",
             "comparisons.parquet", "invariance.parquet", "history.parquet", "run.json")

log = logging.getLogger("dpo_bench")


class RunExistsError(RuntimeError):
    """Another run with this id is in progress or finished in the same reports directory."""


def new_run_id(preset: str) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{preset}"


@dataclass
class RunLock:
    """Refuse a second run with the same id while the first is alive (a lock file with its pid)."""

    run_dir: Path

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / ".lock"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = self.path.read_text().strip() or "?"
            if pid.isdigit() and not process_alive(int(pid)):
                self.path.unlink(missing_ok=True)  # a killed run's stale lock
                return self.__enter__()
            raise RunExistsError(
                f"run '{self.run_dir.name}' is already running in {self.run_dir.parent} (pid {pid}); "
                "choose another --run-id or wait for it to finish"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def check_writable(reports_dir: Path) -> None:
    """Fail early, with a clear message, when the reports directory cannot be written."""
    try:
        reports_dir.mkdir(parents=True, exist_ok=True)
        probe = reports_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the reports directory {reports_dir}: {e.strerror or e}") from None


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    def record(self, stage: Stage, label: str = "") -> Stage:
        """Seconds the stage took in this run (0 when it came from the cache), under ``label`` or its name."""
        self.stages[label or stage.name] = round(stage.seconds, 3)
        return stage


def upstream_for(cell: Cell, stages: dict[str, Stage | None]) -> Upstream:
    """Only the stages the method needs enter its cache key, so e.g. best-of-N ignores ref log-probs."""
    needs = get_method(cell.method).needs
    wants_prefs = bool(needs & {"preferences", "rankings"})
    return Upstream(
        task=stages["task"], sft=stages["sft"], ref_eval=stages["ref_eval"],
        preferences=stages["preferences"] if wants_prefs else None,
        ref_logps=stages["ref_logps"] if wants_prefs else None,
        reward_model=stages.get("reward_model"),
    )


def _cell_config_label(cell: Cell) -> str:
    """The report's label of a (method, strength) setting, e.g. 'dpo (β=0.1)'."""
    strength = get_method(cell.method).strength
    if strength is None:
        return cell.display_name
    symbol = STRENGTH_SYMBOLS.get(strength, strength)
    return f"{cell.display_name} ({symbol}={cell.strength_value:g})"


def head_to_head(cells: list[tuple[Cell, Stage]], frames: list[pd.DataFrame], reward_metric: str = "gold_reward") -> pd.DataFrame:
    """Win rates between the best final policy of every method (ties ½, 95% Wilson interval), judged by
    ``reward_metric`` (the gold reward, or the task's judge when it has no gold scorer).

    Rows are ``h2h/<opponent>`` metrics of the row policy, at its final step.
    """
    from .evaluate import win_rate

    metrics = pd.concat(frames, ignore_index=True)
    finals = metrics[(metrics["metric"] == reward_metric) & (metrics["temperature"] == 1.0)]
    best: dict[str, tuple[Cell, Stage, float, int]] = {}
    for cell, stage in cells:
        rows = finals[(finals["method"] == cell.display_name) & (finals["seed"] == cell.seed)
                      & ((finals["beta"] == cell.strength_value) | (finals["beta"].isna() & math.isnan(cell.strength_value)))]
        if rows.empty or not (stage.path / "final_gold.parquet").exists():
            continue
        last = rows.loc[rows["step"].idxmax()]
        if cell.display_name not in best or last["value"] > best[cell.display_name][2]:
            best[cell.display_name] = (cell, stage, float(last["value"]), int(last["step"]))
    out = []
    gold = {name: pd.read_parquet(stage.path / "final_gold.parquet")[reward_metric].to_numpy() for name, (_, stage, _, _) in best.items()}
    for name, (cell, _, _, step) in best.items():
        for other, (other_cell, _, _, _) in best.items():
            if other == name or len(gold[name]) != len(gold[other]):
                continue
            est = win_rate(gold[name], gold[other])
            out.append({"method": name, "beta": cell.strength_value, "seed": cell.seed, "step": step, "temperature": 1.0,
                        "metric": f"h2h/{_cell_config_label(other_cell)}", "value": est.value, "stderr": est.stderr,
                        "ci_low": est.ci_low, "ci_high": est.ci_high, "n": est.n})
    return pd.DataFrame(out, columns=METRIC_COLUMNS[2:])


def code_links() -> dict[str, str]:
    """Where the report's "why" questions are answered in code: file:line of each computation."""
    import inspect

    from .losses import dpo_loss
    from .methods.ppo import kl_penalised_rewards, train_ppo
    from reward.bradley_terry import bt_loss

    root = Path(__file__).resolve().parent.parent
    out = {}
    for name, fn in (("log-sigmoid DPO loss", dpo_loss), ("Bradley-Terry loss", bt_loss),
                     ("KL-penalised per-token reward", kl_penalised_rewards), ("PPO loop", train_ppo)):
        path = Path(inspect.getsourcefile(fn)).resolve()
        out[name] = f"{path.relative_to(root)}:{inspect.getsourcelines(fn)[1]}"
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "prefect", "pandas", "numpy", "scipy", "vaderSentiment", "dpo-bench"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def invariance_checks(bench: Bench, stages: dict[str, Stage | None], cells: list[tuple[Cell, Stage]]) -> pd.DataFrame:
    """The invariance checks, cached like a stage on every stage they read and the run's config
    (a cached run then need not load models to check them again)."""
    key = {
        "config": {k: v for k, v in to_dict(bench.config).items() if k not in ("threads", "device", "preset", "report")},
        # The jobs' stages ("job:...", present when they ran on workers) follow from the config.
        "stages": {name: s.key for name, s in stages.items() if s is not None and not name.startswith("job:")},
        "cells": [s.key for _, s in cells],
    }
    stage = bench.run_stage("invariance", key, lambda out: write_parquet(run_invariance_checks(bench, stages, cells),
                                                                          out / "invariance.parquet"))
    return pd.read_parquet(stage.path / "invariance.parquet")


def rlhf_objective(cell: Cell, stage: Stage, reward_model: Stage | None) -> Objective:
    """What an RLHF cell's PPO maximised, read from its resolved config: c its kl_coef, or with
    ``target_kl`` > 0 the adaptive controller's kl_coef at the final checkpoint (the logged
    ``train/kl_coef``); p its ``missing_eos_penalty``; the raw reward-model score when
    ``normalise_reward`` is off. A method without these fields is held to E[r̂] − c·KL, c its strength."""
    config = cell.config()
    kl_coef = float(getattr(config, "kl_coef", cell.strength_value))
    adaptive = float(getattr(config, "target_kl", 0.0)) > 0
    if adaptive:
        metrics = pd.read_parquet(stage.path / "metrics.parquet")
        logged = metrics[metrics["metric"] == "train/kl_coef"]
        if (stage.path / "per_prompt.parquet").exists():
            final = int(pd.read_parquet(stage.path / "per_prompt.parquet", columns=["step"])["step"].max())
            logged = logged[logged["step"] <= final]
        if logged.empty:
            adaptive = False
        else:
            kl_coef = float(logged.sort_values("step")["value"].iloc[-1])
    raw = None if getattr(config, "normalise_reward", True) else fitted_normaliser(reward_model, "reward_model")
    return Objective(kl_coef, float(getattr(config, "missing_eos_penalty", 0.0)), adaptive, raw)


def dpo_objective(cell: Cell, reward_model: Stage | None) -> Objective | None:
    """What a DPO cell solves, in the reward model's normalised units: DPO at β fits the
    Bradley-Terry reward r implicitly and its optimum is that of max E[r] − β·KL (Rafailov et al.,
    section 4), with r in Bradley-Terry units, the reward model's own; with r̂ = (r − mean)/σ that is
    σ·(E[r̂] − (β/σ)·KL). The learned reward model stands in for the r DPO fits. None for any other
    method (IPO, SLiC and the rest solve other problems) or without a fitted reward model."""
    if cell.method != "dpo" or cell.strength_value is None:
        return None
    normaliser = fitted_normaliser(reward_model, "reward_model")
    return Objective(float(cell.strength_value) / normaliser.std) if normaliser is not None else None


def write_verdict_files(run_dir: Path, cells: list[tuple[Cell, Stage]], config: BenchConfig,
                        pipelines: dict[int, dict[str, Stage | None]] | None = None) -> pd.DataFrame:
    """``per_prompt.parquet`` (every cell's per-prompt results), ``frontier.parquet`` and
    ``comparisons.parquet`` (the verdict) in ``run_dir``; returns the RLHF cells' objective rows
    for the metrics (each cell on its own :func:`rlhf_objective`; ``pipelines``: each seed's
    stages, whose reward model a cell reads)."""
    per_prompt = collect_per_prompt([stage.path / "per_prompt.parquet" for _, stage in cells])
    write_parquet(per_prompt, run_dir / "per_prompt.parquet")
    roles = {c.display_name: get_method(c.method).role for c, _ in cells}
    frames = verdict_frames(per_prompt, roles, config.verdict)
    for name in ("frontier", "comparisons"):
        if name in frames:
            write_parquet(frames[name], run_dir / f"{name}.parquet")
        else:
            (run_dir / f"{name}.parquet").unlink(missing_ok=True)
    if per_prompt.empty:
        return pd.DataFrame()
    reward_models = {seed: stages.get("reward_model") for seed, stages in (pipelines or {}).items()}
    objectives = {(c.display_name, c.strength_value, c.seed): rlhf_objective(c, stage, reward_models.get(c.seed))
                  for c, stage in cells if roles[c.display_name] == "rlhf"}
    for c, _ in cells:
        dpo = dpo_objective(c, reward_models.get(c.seed))
        if dpo is not None:
            objectives[(c.display_name, c.strength_value, c.seed)] = dpo
    pools = collect_per_prompt([stage.path / "pool.parquet" for _, stage in cells])
    return objective_rows(per_prompt, roles, objectives, pools=pools)


def finish_run(
    bench: Bench, run_dir: Path, run_id: str, pipelines: dict[int, dict[str, Stage | None]], cells: list[tuple[Cell, Stage]],
    timings: Timings, started: float, started_at: str, extra: dict | None = None, results_db: str | None = None,
) -> dict[str, Path]:
    """Write metrics, samples, the frontier, invariance, run.json and the report into ``run_dir``.

    ``pipelines`` maps each pipeline seed to its shared stages. The invariance checks read the
    first seed's pipeline. The run is also compared with the previous runs of its preset in the
    results store (``history.parquet``, the report's History section) and appended to it;
    ``results_db`` is a SQLAlchemy URL, by default the SQLite file ``results.db`` beside the run
    directory.
    """
    config = bench.config
    results_db = results_db or store.default_url(run_dir.parent)
    first_seed = next(iter(pipelines))
    first = pipelines[first_seed]
    frames = []
    for seed, stages in pipelines.items():
        frames.append(pd.read_parquet(stages["ref_eval"].path / "metrics.parquet"))
        if stages.get("sft") and (stages["sft"].path / "train_metrics.parquet").exists():
            frames.append(pd.read_parquet(stages["sft"].path / "train_metrics.parquet"))
        if stages.get("reward_model"):
            frames.append(pd.read_parquet(stages["reward_model"].path / "metrics.parquet"))
    samples, statuses = [], {}
    for cell, stage in cells:
        frames.append(pd.read_parquet(stage.path / "metrics.parquet"))
        if (stage.path / "samples.parquet").exists():
            samples.append(pd.read_parquet(stage.path / "samples.parquet"))
        # Where the cell's policy is (its last evaluated checkpoint): `dpo-bench export` reads it.
        policy = stage.path / "policy"
        strength = None if math.isnan(cell.strength_value) else cell.strength_value
        statuses[cell.label] = {**cell_status(stage), "method": cell.method, "name": cell.display_name, "strength": strength,
                                "seed": cell.seed, "stage": str(stage.path.resolve()),
                                "policy": str(policy.resolve()) if policy.is_dir() else None}
    frames.append(label_temperature_rms(bench.for_seed(first_seed), first))
    task = bench.task_summary(first["task"])
    for seed in pipelines:
        frames.append(head_to_head([(c, s) for c, s in cells if c.seed == seed], frames, task["reward_metric"]))
    frames.append(write_verdict_files(run_dir, cells, config, pipelines))
    metrics = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    metrics.insert(0, "task", config.task)
    metrics.insert(0, "run_id", run_id)
    metrics = metrics[METRIC_COLUMNS]
    write_parquet(metrics, run_dir / "metrics.parquet")
    sample_frame = pd.concat(samples, ignore_index=True) if samples else pd.DataFrame()
    write_parquet(sample_frame, run_dir / "samples.parquet")

    invariance = invariance_checks(bench.for_seed(first_seed), first, [(c, s) for c, s in cells if c.seed == first_seed])
    write_parquet(invariance, run_dir / "invariance.parquet")

    fingerprints = dict(task["fingerprints"])
    seeds_info = {}
    for seed, stages in pipelines.items():
        info = preference_info(stages["preferences"]) if stages.get("preferences") else None
        seeds_info[str(seed)] = {"preferences": info, "stage_keys": {n: st.key for n, st in stages.items() if st is not None}}
    if first.get("preferences"):
        info = preference_info(first["preferences"])
        fingerprints.update({k.removesuffix("_fingerprint"): v for k, v in info.items() if k.endswith("_fingerprint")})
    failed = [label for label, s in statuses.items() if s["status"] != "ok"]
    record = {
        "run_id": run_id, "task": config.task, "preset": config.preset, "seed": first_seed, "seeds": list(pipelines),
        "status": "completed" if not failed else "completed_with_failures",
        "started_at": started_at, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "config": to_dict(config), "fingerprints": fingerprints, "versions": versions(),
        "device": str(bench.device), "host": socket.gethostname(), "code_version": bench.version,
        "cache_dir": str(Path(bench.cache_dir).resolve()), "cache_used": bench.use_cache,
        "timings": timings.stages,
        "cached_stages": sorted({s.name for s in [*(x for st in pipelines.values() for x in st.values()), *(x for _, x in cells)]
                                 if s and s.cached}),
        "cells": statuses, "failed_cells": failed,
        "torch_threads": {**{f"{name}{seed_label(config, seed)}": built_threads(s) for seed, st in pipelines.items()
                             for name, s in st.items() if s is not None},
                          **{cell.label: built_threads(stage) for cell, stage in cells}},
        "preferences": seeds_info[str(first_seed)]["preferences"],
        "pipelines": seeds_info,
        "shared_stages": ["task"],
        "methods": {
            c.display_name: {"method": c.method, "description": get_method(c.method).description,
                             "strength": get_method(c.method).strength, "role": get_method(c.method).role}
            for c, _ in sorted(cells, key=lambda cs: cs[0].display_name)
        },
        "notes": [f"cell {label} failed: {statuses[label]['error']}" for label in failed],
        "questions": to_dict(config.questions),
        "code_links": code_links(),
        "results_db": store.display_url(results_db),
        **(extra or {}),
    }
    write_json(run_dir / "run.json", record)
    error = store.record_run(run_dir, results_db)
    if error:
        record["results_db_error"] = error
        record["notes"].append(f"the run was not recorded in the results store: {error}")
        write_json(run_dir / "run.json", record)
    paths = build_report(run_dir)
    if config.tracking.backend:
        track(run_dir, record, config)
    return paths


def track(run_dir: Path, record: dict, config: BenchConfig) -> None:
    """Log the finished run to its tracking backend; a failure is a warning and a note in run.json."""
    try:
        where = tracking.log_run(run_dir, config.tracking.backend, config.tracking.uri, config.tracking.experiment)
        log.info("tracked: %s", where)
        record["tracking"] = where
    except Exception as e:  # noqa: BLE001 - the run's results are written; tracking must not lose them
        log.warning("the run was not logged to %s: %s", config.tracking.backend, e)
        record["notes"].append(f"the run was not logged to {config.tracking.backend}: {e}")
    write_json(run_dir / "run.json", record)


def start_run(
    config: BenchConfig, reports_dir: Path | str, run_id: str | None, cache_dir: Path | str | None,
    use_cache: bool, progress: bool,
) -> tuple[Bench, Path, str, float, str]:
    """What every run does first, in-process or as a flow: check the reports directory is writable,
    name the run, set up its stage cache and start its clocks."""
    reports_dir = Path(reports_dir)
    check_writable(reports_dir)
    run_id = run_id or new_run_id(config.preset)
    bench = Bench(config, Path(cache_dir) if cache_dir else reports_dir / ".cache", use_cache=use_cache, progress=progress)
    return bench, reports_dir / run_id, run_id, time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_benchmark(
    config: BenchConfig,
    reports_dir: Path,
    run_id: str | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
    results_db: str | None = None,
) -> Path:
    """Run every stage of every pipeline seed in this process and write ``reports_dir/<run_id>/``;
    returns that directory.

    ``results_db``: the results store's SQLAlchemy URL (default: ``reports_dir/results.db``).
    """
    bench, run_dir, run_id, started, started_at = start_run(config, reports_dir, run_id, cache_dir, use_cache, progress)
    timings = Timings()
    say = on_stage or (lambda _msg: None)
    with RunLock(run_dir):
        pipelines: dict[int, dict[str, Stage | None]] = {}
        cells = []
        for seed in config.pipeline_seeds:
            seeded = bench.for_seed(seed)
            pipelines[seed] = stages = plan_stages(seeded, timings, say, seed_label(config, seed))
            for cell in seeded.config.cells():
                say(f"training {cell.label}")
                cells.append((cell, timings.record(run_cell(seeded, cell, upstream_for(cell, stages)), cell.label)))
        say("writing the report")
        finish_run(bench, run_dir, run_id, pipelines, cells, timings, started, started_at, results_db=results_db)
    return run_dir


def seed_label(config: BenchConfig, seed: int) -> str:
    """What timings and logs append to a shared stage's name: its pipeline seed, when there are several
    (", seed 1": a cell's label says "seed=1", and the reference's cell is named like its stage)."""
    return f", seed {seed}" if len(config.pipeline_seeds) > 1 else ""


def plan_stages(bench: Bench, timings: Timings, say: Callable[[str], None] = lambda _m: None,
                suffix: str = "") -> dict[str, Stage | None]:
    """One pipeline's shared stages (:data:`~dpo_bench.stages.pipeline.PIPELINE`), in this process,
    skipping those no method of the grid needs."""

    def announce(step: Step) -> None:
        if step.message:
            say(step.message + suffix)

    def build(step: Step, b: Bench, stages: dict) -> Stage:
        stage = step.build(b, stages)
        return timings.record(stage, stage.name + suffix)

    return run_steps(bench, {}, PIPELINE, build, announce)


def read_run(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "run.json").read_text())
