"""How many Dask workers a run's grid gets, how many torch threads each, and which GPU: decided on
the machine that runs the flow (a scheduled run may start on another machine than the command that
registered it). No Prefect import: ``dpo-bench run --no-prefect`` uses it too.
"""

from __future__ import annotations

import importlib.util
import os


def resolve_workers(requested: int | None, config) -> int:
    """``requested``, or by default one Dask worker per core for a grid on a multi-core CPU: small
    models use two cores better as two processes of one thread than as one process of two
    (git show 8338f62:benchmarks/RESULTS.md, "Dask workers"); a short grid, or the exact task's table policies, do not repay
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
    gpus = local_gpus(config)
    if gpus and getattr(config, "nproc_per_cell", 1) > 1:  # a cell's ranks take the GPUs: the cells run in turn
        return 0
    if gpus:  # one cell per GPU
        return min(gpus, cells)
    # A cell's ranks (nproc_per_cell) take cores of their own.
    cores //= max(1, getattr(config, "nproc_per_cell", 1))
    if resolve_device(config.device).type != "cpu" or get_task_class(config.task).exact or cores < 2 or cells < 4:
        return 0
    return min(cores, cells)


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_gpus(config) -> int:
    """The CUDA devices a local cluster gives one worker each: every visible one, when the run's
    device is CUDA without an index (``auto`` on a CUDA machine, or ``cuda``) and there are two or
    more; 0 otherwise (one GPU, or a device the config names, e.g. ``cuda:1``, runs in-process)."""
    from dpo_bench.policy import resolve_device

    device = resolve_device(config.device)
    if device.type != "cuda" or device.index is not None:
        return 0
    count = cuda_device_count()
    return count if count >= 2 else 0


def gpu_worker_specs(workers: int, gpus: int, threads: int) -> dict[str, dict]:
    """A ``distributed.SpecCluster``'s worker specs for ``workers`` processes on ``gpus`` devices:
    worker i sees only device i mod ``gpus`` (``CUDA_VISIBLE_DEVICES``, so its ``auto`` device is
    that GPU) and offers one ``GPU`` resource, which every cell asks for: one cell per GPU at a
    time. One Dask thread each, ``threads`` torch threads."""
    from distributed import Nanny

    return {f"gpu-{i}": {"cls": Nanny, "options": {
        "nthreads": 1, "resources": {GPU_RESOURCE: 1},
        "env": {"CUDA_VISIBLE_DEVICES": str(i % gpus), "OMP_NUM_THREADS": str(threads)},
    }} for i in range(workers)}


#: The Dask worker resource a cell asks for on a cluster whose workers offer it (``dask worker
#: --resources GPU=1``, or the local GPU cluster's workers).
GPU_RESOURCE = "GPU"


def offers_gpus(scheduler_info: dict) -> bool:
    """Whether any worker of a Dask cluster (``Client.scheduler_info()``) offers the GPU resource:
    then every cell asks for one, so a worker runs as many cells at once as it has GPUs."""
    return any(w.get("resources", {}).get(GPU_RESOURCE, 0) > 0 for w in scheduler_info.get("workers", {}).values())


def worker_threads(workers: int, config) -> int:
    """Torch threads per worker: the config's, else the worker's share of the cores (0: no workers).

    N local worker processes share the cores: each cell runs with its share of threads, with no
    oversubscription; the stages before the grid run in the flow's process on every core.
    """
    if not workers:
        return 0
    return config.threads or max(1, (os.cpu_count() or 1) // workers)
