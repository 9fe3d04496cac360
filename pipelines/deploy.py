"""Scheduled runs: the benchmark flow as a Prefect deployment with a cron schedule.

Two ways to run it on a schedule, both against the Prefect API in ``PREFECT_API_URL`` (a
``prefect server start`` of your own, or Prefect Cloud):

- :func:`serve_benchmark` registers the deployment and serves it from this process: the process
  polls the API and runs each scheduled flow run in a subprocess (``dpo-bench serve``).
- :func:`deploy_benchmark` registers it on a work pool, for a ``prefect worker`` to run
  (``dpo-bench deploy``).

The deployment's parameters hold the resolved config, so a scheduled run does what the command
that created it would have done, and every run appends to the results store that the next run's
report compares with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, validate_cron_string
from prefect.settings import PREFECT_API_URL

from pipelines.benchmark import benchmark_flow

FLOW_NAME = benchmark_flow.name
ENTRYPOINT = "pipelines/benchmark.py:benchmark_flow"
PROJECT_DIR = Path(__file__).resolve().parent.parent


class DeployError(RuntimeError):
    """A deployment cannot be made (no API to register it on, a bad schedule)."""


def api_url() -> str:
    """The Prefect API a deployment registers on; without one there is nothing to schedule on."""
    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set: scheduled runs need a Prefect server that outlives this command. "
            "Start one with `prefect server start` and set "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (see README, 'Scheduled runs')."
        )
    return url


def check_cron(cron: str) -> str:
    try:
        return validate_cron_string(cron)
    except ValueError as e:
        raise DeployError(f"--cron: not a cron expression: {cron!r} ({e})") from None


def flow_parameters(config: dict, reports_dir: str | Path, cache_dir: str | Path | None = None,
                    results_db: str | None = None, use_cache: bool = True, workers: int | None = None,
                    dask_address: str | None = None) -> dict[str, Any]:
    """The flow's parameters for every scheduled run; paths are absolute (runs start elsewhere).

    ``workers`` None lets each run choose its Dask workers on the machine that runs it.
    """
    return {
        "config": config,
        "reports_dir": str(Path(reports_dir).resolve()),
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
        "results_db": results_db,
        "use_cache": use_cache,
        "progress": False,  # no terminal to draw bars on
        "workers": workers,
        "dask_address": dask_address,
    }


def _description(config: dict) -> str:
    return (f"dpo-bench, preset {config.get('preset', 'custom')}, task {config.get('task', 'sentiment')}: "
            "SFT, preferences, reward model, the method grid, evaluation and the report; each run appends "
            "to the results store and its report compares with the previous runs of the preset.")


def _tags(config: dict) -> list[str]:
    return ["dpo-bench", f"preset:{config.get('preset', 'custom')}", f"task:{config.get('task', 'sentiment')}"]


def build_deployment(name: str, cron: str, parameters: dict[str, Any], timezone: str | None = None) -> RunnerDeployment:
    """The benchmark flow as a deployment with a cron schedule (registered when served)."""
    return benchmark_flow.to_deployment(
        name=name, schedule=Cron(check_cron(cron), timezone=timezone), parameters=parameters,
        description=_description(parameters["config"]), tags=_tags(parameters["config"]),
    )


def serve_benchmark(deployment: RunnerDeployment, limit: int = 1) -> None:
    """Register the deployment and run its flow runs until interrupted (SIGTERM pauses the schedule).

    ``limit`` runs at most that many benchmarks at once: they share the machine's cores.
    """
    api_url()
    serve(deployment, limit=limit)


def deploy_benchmark(name: str, cron: str, parameters: dict[str, Any], work_pool: str, timezone: str | None = None,
                     source: str | None = None, work_queue: str | None = None) -> UUID:
    """Register the deployment on ``work_pool``; a worker of that pool runs it from ``source``.

    ``source`` is where the worker finds the code: this project's directory by default (a
    worker on this machine), or a git URL.
    """
    api_url()
    flow = benchmark_flow.from_source(source=source or str(PROJECT_DIR), entrypoint=ENTRYPOINT)
    return flow.deploy(
        name=name, work_pool_name=work_pool, work_queue_name=work_queue,
        schedule=Cron(check_cron(cron), timezone=timezone), parameters=parameters,
        description=_description(parameters["config"]), tags=_tags(parameters["config"]),
        build=False, push=False, print_next_steps=False,
    )
