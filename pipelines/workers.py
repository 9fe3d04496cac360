"""How many Dask workers a run's grid gets, and how many torch threads each: decided on the
machine that runs the flow (a scheduled run may start on another machine than the command that
registered it). No Prefect import: ``dpo-bench run --no-prefect`` uses it too.
"""

from __future__ import annotations

import importlib.util
import os


def resolve_workers(requested: int | None, config) -> int:
    """``requested``, or by default one Dask worker per core for a grid on a multi-core CPU: small
    models use two cores better as two processes of one thread than as one process of two
    (benchmarks/RESULTS.md); a short grid, or the exact task's table policies, do not repay
    starting the workers, and without the ``dask`` extra there are none to start."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"workers must be >= 0, got {requested}")
        return requested
    from dpo_bench.policy import resolve_device
    from dpo_bench.tasks import get_task_class

    cores, cells = os.cpu_count() or 1, len(config.cells())
    if importlib.util.find_spec("prefect_dask") is None:
        return 0
    if resolve_device(config.device).type != "cpu" or get_task_class(config.task).exact or cores < 2 or cells < 4:
        return 0
    return min(cores, cells)


def worker_threads(workers: int, config) -> int:
    """Torch threads per worker: the config's, else the worker's share of the cores (0: no workers).

    N local worker processes share the cores: each cell runs with its share of threads, with no
    oversubscription; the stages before the grid run in the flow's process on every core.
    """
    if not workers:
        return 0
    return config.threads or max(1, (os.cpu_count() or 1) // workers)
