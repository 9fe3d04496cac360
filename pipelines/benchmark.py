"""The benchmark as a Prefect flow: wiring only.

Each task is a few lines that call one library function from ``dpo_bench.stages``; the stage
store there does the caching, so a task whose stage is cached returns at once. Grid cells and
the jobs beside them (the checks' own stages, the grid's own preference data) are submitted to
a Dask cluster that the flow starts from its parameters (``workers``, ``dask_address``), so a
scheduled run gets the workers a run from the command line gets; with no workers they run one at
a time in the flow's process.
"""

from __future__ import annotations

import importlib
import logging
from contextlib import nullcontext
from functools import partial
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.states import Completed, State
from pydantic import PlainValidator, WithJsonSchema

from dpo_bench.bench import BenchConfig, Cell, from_dict_config
from dpo_bench.run import RunLock, Timings, finish_run, plan_stages, seed_label, start_run, upstream_for
from dpo_bench.stages import FILLER_JOBS, Bench, Stage, Upstream, run_cell, run_job, worker_jobs
from dpo_bench.stages.pipeline import PIPELINE, Step, run_steps
from pipelines.workers import GPU_RESOURCE, gpu_worker_specs, local_gpus, offers_gpus, resolve_workers, worker_threads


def _logged(stage: Stage, label: str = "") -> Stage:
    logger = get_run_logger()
    name = label or stage.name
    if stage.cached:
        logger.info("%s: cached (%s)", name, stage.path)
    else:
        logger.info("%s: built in %.1f s", name, stage.seconds)
    return stage


def _ended(stage: Stage, label: str = "") -> Stage | State:
    """A stage task's return: the stage, logged; one read from the store ends in a Completed state
    named "Cached" that holds it, so the UI tells it apart from a build. A future's ``result()``
    gives the stage back; a direct call would return the State itself, so the flow calls its tasks
    with ``return_state=True`` and takes ``.result()`` (the stage, or the task's error)."""
    _logged(stage, label)
    return Completed(name="Cached", data=stage, message=f"read from the stage store: {stage.path}") if stage.cached else stage


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Whether a stage that downloads (the task's data, tokenizer and model config; the SFT stage's
    model weights) failed in a way another attempt may not: the network, not the input. A hub that
    HF_HUB_OFFLINE forbids, a bad row or a bad config fail at once."""
    from dpo_bench.data import HubUnreachableError, hub_offline, unreachable

    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(error, HubUnreachableError):
        return not error.offline
    if unreachable(error):  # transformers' "couldn't connect" (an OSError), the hub client's errors
        return not hub_offline()
    return isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in TRANSIENT_ERRORS


#: Errors of the HTTP stack (requests, httpx, huggingface_hub) that another attempt may not meet, by name:
#: importing those packages here only to name their exceptions would slow every run's start.
TRANSIENT_ERRORS = frozenset({"ConnectTimeout", "ReadTimeout", "ConnectError", "RemoteProtocolError", "ChunkedEncodingError",
                              "HfHubHTTPError"})
#: Seconds before the second and third attempts of a stage that downloads (without a network, each attempt
#: itself takes about a minute of the HTTP stack's own retries: a run fails in some 4 minutes).
DOWNLOAD_RETRY_DELAYS = [15, 60]


def _step_task(step: Step) -> Any:
    """The Prefect task of one shared stage of :data:`~dpo_bench.stages.pipeline.PIPELINE`, named by
    its title; one that downloads retries after a transient failure. The store in
    dpo_bench.stages caches on content keys, so Prefect's own input hashing is off."""
    retry = ({"retries": len(DOWNLOAD_RETRY_DELAYS), "retry_delay_seconds": DOWNLOAD_RETRY_DELAYS,
              "retry_condition_fn": transient_failure} if step.downloads else {})

    def build(bench: Bench, stages: dict) -> Stage | State:
        return _ended(step.build(bench, stages))

    build.__qualname__ = build.__name__ = f"{step.name}_task"  # each step a task key of its own
    return task(name=step.title, cache_policy=NONE, **retry)(build)


#: The Prefect task of each step of a pipeline, by the step's name.
STEP_TASKS = {step.name: _step_task(step) for step in PIPELINE}


@task(name="train", task_run_name="train[{label}]", cache_policy=NONE)
def cell_task(bench: Bench, cell: Cell, upstream: Upstream, label: str) -> Stage | State:
    return _ended(run_cell(bench, cell, upstream), label)


@task(name="job", task_run_name="job[{job}]", cache_policy=NONE)
def job_task(bench: Bench, stages: dict, job: str) -> Stage | State:
    return _ended(run_job(bench, stages, job), job)


@task(name="warm up", cache_policy=NONE)
def warm_up_task() -> None:
    """Nothing but the imports a cell needs (this module's, which unpickling the task already
    loads, and the methods'): run on a worker the later seeds' pipelines leave idle while this
    process builds the first seed's stages, so that the worker's first cell does not wait for them."""
    importlib.import_module("dpo_bench.methods")


@task(name="report", cache_policy=NONE)
def report_task(bench: Bench, run_dir: Path, run_id: str, pipelines: dict, cells: list, timings: Timings,
                started: float, started_at: str, extra: dict, results_db: str | None) -> dict:
    return finish_run(bench, run_dir, run_id, pipelines, cells, timings, started, started_at, extra, results_db=results_db)


def task_runner_for(workers: int, dask_address: str | None, gpus: int = 0, threads: int = 1) -> Any:
    """A Dask task runner for the grid (local workers of one Dask thread each, one per GPU with
    ``gpus``, or an existing scheduler), or None: the cells run one at a time in the flow's process."""
    if not workers and not dask_address:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError("Dask workers need the dask extra: pip install 'dpo-bench[dask]' (or run with --workers 0)") from None
    quiet_dask_logs()

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    keep_freed_memory()
    quiet_worker_logs()
    if gpus:
        from distributed import Scheduler

        return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs={
            "workers": gpu_worker_specs(workers, gpus, threads), "scheduler": {"cls": Scheduler, "options": {"dashboard_address": ":0"}}})
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def one_gpu_per_task(runner: Any) -> Any:
    """A context in which the tasks submitted to ``runner`` (started) ask for one GPU each, when
    its cluster's workers offer GPUs (``dask worker --resources GPU=1``, or the local GPU cluster);
    otherwise no constraint, since a task asking for a resource no worker has would never run."""
    import dask

    return dask.annotate(resources={GPU_RESOURCE: 1}) if offers_gpus(runner.client.scheduler_info()) else nullcontext()


def quiet_dask_logs() -> None:
    """Dask's own logs at warnings and errors only.

    At INFO its scheduler logs some 35 lines a run (each worker's registration, connections,
    shutdown), and now and then a CommClosedError traceback when a worker's connection closes in a
    normal shutdown. Set here, after ``distributed`` is imported: importing it sets the level from
    Dask's config. The dashboard's address is still logged, by prefect-dask.
    """
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from pipelines import dask_quiet

    dask_quiet.install()


def keep_freed_memory() -> None:
    """Let the local workers' malloc keep the memory torch frees, as a plain process does.

    Dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to return memory to the OS
    early). That also fixes glibc's mmap threshold at 128 kB, so every tensor above it is a fresh
    mmap, zeroed by page faults, and unmapped when freed. Unset, the workers allocate as a process
    started from the shell does, at a ninth of the system CPU (``python -m benchmarks.presets
    --variants default:prefect`` measures it; git show 8338f62:benchmarks/RESULTS.md, "Dask workers").
    """
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


def quiet_worker_logs() -> None:
    """The local workers drop a shutdown's closed-connection tracebacks too (:mod:`pipelines.dask_quiet`,
    preloaded into each)."""
    import dask

    preload = list(dask.config.get("distributed.worker.preload", []))
    if "pipelines.dask_quiet" not in preload:
        dask.config.set({"distributed.worker.preload": [*preload, "pipelines.dask_quiet"]})


def _bench_config(value: Any) -> BenchConfig:
    """The flow's config from a :class:`BenchConfig` or its plain data (a deployment's parameters,
    the UI's JSON, ``run.json``'s ``config``); bad data fails the flow run's parameter validation
    with the config's own error."""
    return value if isinstance(value, BenchConfig) else from_dict_config(value)


#: The flow's config parameter: typed in the flow, plain data (``BenchConfig.to_dict()``: the TOML
#: file's layout) in the API, a deployment's parameters and the UI.
RunConfig = Annotated[BenchConfig, PlainValidator(_bench_config), WithJsonSchema({
    "type": "object", "title": "config",
    "description": "The run's configuration: a config file's sections and grid as JSON, as in a run's run.json `config`"})]


@flow(name="dpo-bench")
def benchmark_flow(
    config: RunConfig,
    reports_dir: str = "reports",
    run_id: str | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
    results_db: str | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
) -> str:
    """For every pipeline seed: SFT → preferences → reward model → every method of the grid →
    evaluation; then the frontier, the verdict and the report.

    The run appends to the results store ``results_db`` (a SQLAlchemy URL; default
    ``<reports_dir>/results.db``) and its report compares it with the previous runs of its preset.
    Grid cells and the jobs beside them (the checks' own stages, the grid's own preference data)
    run on a local Dask cluster of ``workers`` processes (None: one per core when that pays,
    decided on the machine running the flow; 0: one at a time in this process), or on the Dask
    scheduler at ``dask_address``. Scheduled runs get the same workers as ``dpo-bench run``: the
    flow starts the cluster itself. The first seed's shared stages run in this process; with
    workers, the later seeds' run on them, one pipeline a worker, while this process finishes the
    first seed's, so that no more processes than cores are busy.
    """
    bench_config = config
    logger = get_run_logger()
    bench, run_dir, run_id, started, started_at = start_run(bench_config, reports_dir, run_id, cache_dir, use_cache, progress)
    timings = Timings()
    n_workers = 0 if dask_address else resolve_workers(workers, bench_config)
    first, *later = bench_config.pipeline_seeds
    with RunLock(run_dir):
        logger.info("run %s: task %s, pipeline seeds %s, %d cells, cache %s", run_id, bench_config.task,
                    ", ".join(map(str, bench_config.pipeline_seeds)), len(bench_config.cells()), bench.cache_dir)
        record = partial(_record, timings, seed_label(bench_config, first))
        seeded = bench.for_seed(first)
        stages = run_steps(seeded, {}, [step for step in PIPELINE if step.before_workers], _build_step(record))
        pipelines: dict[int, dict[str, Stage | None]] = {first: stages}
        # The cluster starts after the first SFT, which needs every core; workers get their share of
        # threads. Threads are in no cache key: they change where cells run, not what they compute.
        threads = worker_threads(n_workers, bench_config)
        worker = replace(bench, config=replace(bench_config, threads=threads)) if threads else bench
        gpus = local_gpus(bench_config) if n_workers else 0
        runner = task_runner_for(n_workers, dask_address, gpus, threads or 1)
        with runner if runner is not None else nullcontext(), one_gpu_per_task(runner) if runner is not None else nullcontext():
            jobs: dict[tuple[int, str], Any] = {}
            submitted: list[tuple[Cell, Any]] = []
            if runner is None:
                _first_pipeline(seeded, stages, record, None, jobs)
                done = _cells_here(seeded, stages, timings)
                for seed in later:
                    pipelines[seed], stage_seconds = pipeline_task(bench.for_seed(seed), seed, return_state=True).result()
                    timings.stages.update(stage_seconds)
                    done += _cells_here(bench.for_seed(seed), pipelines[seed], timings)
            else:
                logger.info("grid on %s", dask_address or f"{n_workers} local Dask workers x {threads} torch threads"
                            + (f", one of {gpus} GPUs each" if gpus else ""))
                # The later seeds' pipelines build on the workers, one each, while this process finishes
                # the first seed's: then the first seed's cells, then each later seed's as its pipeline ends.
                futures = {seed: runner.submit(pipeline_task, {"bench": worker.for_seed(seed), "seed": seed}) for seed in later}
                warm = [runner.submit(warm_up_task, {}) for _ in range(n_workers - len(later))]
                _first_pipeline(seeded, stages, record, partial(_submit_jobs, runner, jobs, first, worker.for_seed(first), stages, True), jobs)
                submitted += _submit_cells(runner, worker.for_seed(first), stages)
                for seed, future in futures.items():
                    pipelines[seed], stage_seconds = future.result()
                    timings.stages.update(stage_seconds)
                    _submit_jobs(runner, jobs, seed, worker.for_seed(seed), pipelines[seed], False)
                    submitted += _submit_cells(runner, worker.for_seed(seed), pipelines[seed])
                _submit_jobs(runner, jobs, first, worker.for_seed(first), stages, True, fillers=True)
                done = _collect_cells(submitted, timings)
                for future in warm:
                    future.wait()
            for (seed, job), f in jobs.items():
                pipelines[seed][f"job:{job}"] = timings.record(f.result(), job + seed_label(bench_config, seed))
        paths = report_task(bench, run_dir, run_id, pipelines, done, timings, started, started_at, {"orchestrator": "prefect"},
                            results_db)
    markdown = Path(paths["markdown"]).read_text()
    create_markdown_artifact(markdown=embedded_figures(markdown, run_dir), key=_artifact_key(bench_config.task, bench_config.preset, "report"),
                             description=f"dpo-bench report {run_id}")
    create_table_artifact(table=_results_table(run_dir), key=_artifact_key(bench_config.task, bench_config.preset, "results"),
                          description=f"final results {run_id}")
    logger.info("report: %s", paths["html"])
    return str(run_dir)


def _record(timings: Timings, suffix: str, stage: Stage) -> Stage:
    return timings.record(stage, stage.name + suffix)


def _build_step(record: Callable[[Stage], Stage]) -> Callable[[Step, Bench, dict], Stage]:
    """A step built by its Prefect task in this process, its stage recorded."""
    return lambda step, bench, stages: record(STEP_TASKS[step.name](bench, dict(stages), return_state=True).result())


def _first_pipeline(bench: Bench, stages: dict, record: Callable[[Stage], Stage], submit_jobs: Callable[[], None] | None,
                    jobs: dict) -> None:
    """The first seed's stages after those built before the workers start, in this process, as
    Prefect tasks. With workers, each job beside the grid starts on them as soon as its inputs are
    built (those that need only the SFT model, such as the Lemma 2 PPO runs and the grid's own
    preference variants, now, while this process samples the preference candidates)."""
    run_steps(bench, stages, [step for step in PIPELINE if not step.before_workers], _build_step(record),
              (lambda step: submit_jobs()) if submit_jobs else (lambda step: None))


@task(name="pipeline", task_run_name="pipeline[seed={seed}]", cache_policy=NONE)
def pipeline_task(bench: Bench, seed: int) -> tuple[dict, dict[str, float]] | State:
    """One later seed's shared stages (SFT, reference evaluation, preferences, reward model): (its
    stages, their seconds). On a worker when there are workers, while the first seed's cells train."""
    timings = Timings()
    stages = plan_stages(bench, timings, suffix=f", seed {seed}")
    for name, stage in stages.items():
        if stage is not None:
            _logged(stage, f"{name}, seed {seed}")
    if all(stage is None or stage.cached for stage in stages.values()):
        return Completed(name="Cached", data=(stages, timings.stages), message=f"seed {seed}'s stages read from the stage store")
    return stages, timings.stages


def _cells_here(bench: Bench, stages: dict, timings: Timings) -> list[tuple[Cell, Stage]]:
    """One cell at a time in this process: torch already uses every core, and threads would share its RNG state."""
    cells = bench.config.cells()
    done = []
    for n, cell in enumerate(cells, 1):
        stage = cell_task(bench, cell, upstream_for(cell, stages), cell.label, return_state=True).result()
        done.append((cell, timings.record(stage, cell.label)))
        _progress(n, len(cells), cell.label)
    return done


def _collect_cells(submitted: list[tuple[Cell, Any]], timings: Timings) -> list[tuple[Cell, Stage]]:
    """The submitted cells' stages in submission order, logging "cell i/N" as each finishes."""
    from prefect.futures import as_completed

    index = {id(future): k for k, (_, future) in enumerate(submitted)}
    stages: list[Stage | None] = [None] * len(submitted)
    for n, future in enumerate(as_completed([future for _, future in submitted]), 1):
        k = index[id(future)]
        cell = submitted[k][0]
        stages[k] = timings.record(future.result(), cell.label)
        _progress(n, len(submitted), cell.label)
    return [(cell, stage) for (cell, _), stage in zip(submitted, stages)]


def _progress(n: int, total: int, label: str) -> None:
    """ "cell i/N done: <label>": of the whole grid on workers, of one seed's cells in this process."""
    get_run_logger().info("cell %d/%d done: %s", n, total, label)


def _submit_cells(runner: Any, bench: Bench, stages: dict) -> list[tuple[Cell, Any]]:
    return [(cell, runner.submit(cell_task, {"bench": bench, "cell": cell, "upstream": upstream_for(cell, stages), "label": cell.label}))
            for cell in bench.config.cells()]


def _submit_jobs(runner: Any, jobs: dict, seed: int, bench: Bench, stages: dict, checks: bool, fillers: bool = False) -> None:
    """Start, on the workers, every job of the pipeline whose inputs are built and that is not started
    yet; the fillers (``FILLER_JOBS``) only with ``fillers``, once the grid's cells are queued."""
    for job in worker_jobs(bench, stages, checks):
        if (seed, job) not in jobs and (fillers or job not in FILLER_JOBS):
            jobs[(seed, job)] = runner.submit(job_task, {"bench": bench, "stages": dict(stages), "job": job})


def _artifact_key(task_name: str, preset: str, what: str) -> str:
    """One key per task and preset (a bandit and a sentiment `quick` run are different series)."""
    def clean(text: str) -> str:  # Prefect keys allow lowercase letters, digits and dashes only
        return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")

    return f"dpo-bench-{clean(task_name) or 'task'}-{clean(preset) or 'custom'}-{what}"


def embedded_figures(markdown: str, run_dir: Path) -> str:
    """The report's markdown with each ``figures/*.png`` it links inlined as a data URI, so that
    Prefect's UI, which cannot resolve the run directory's files, shows them."""
    import base64
    import re

    def inline(match: re.Match) -> str:
        path = run_dir / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\((figures/[^)\s]+\.png)\)", inline, markdown)


def _results_table(run_dir: Path) -> list[dict]:
    import pandas as pd

    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    evals = metrics[(metrics["temperature"] == 1.0) & metrics["metric"].isin(["gold_reward", "kl", "win_rate", "fluency"])]
    evals = evals[evals["method"] != "optimum"]
    last = evals.groupby(["method", "beta", "seed"], dropna=False)["step"].transform("max")
    final = evals[evals["step"] == last].pivot_table(index=["method", "beta", "seed"], columns="metric", values="value", dropna=False)
    final = final.reset_index()
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in final.to_dict("records")]
