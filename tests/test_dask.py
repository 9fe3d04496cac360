"""The grid on a real local Dask cluster of two worker processes (`dpo-bench run --workers 2`):
the cells run in the workers, each with its torch threads pinned, the workers report to the run's
one Prefect server, and the metrics equal those of the same config run in-process, exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpo_bench.bench import from_dict_config
from dpo_bench.run import run_benchmark
from dpo_bench.training import WALL_CLOCK_METRICS
from dpo_engine.seeds import derive_seed
from pipelines.cli import main


@pytest.fixture
def restore_torch_threads():
    # Stages pin the calling thread's torch threads (config.threads); later tests keep theirs.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _markers(cache: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cache / stage).glob("*/_complete.json"))]


# The bandit's quick settings on two pipeline seeds, plus what a parallel run starts beside the
# grid: the grid's own 3-wise preference data, a reward model at another label temperature (the
# checks': first seed only), best-of-N's shared draws.
GRID = """
preset = "quick"
task = "bandit"
seeds = [0, 1]

[checks]
label_temperatures = [1.0]

[[grid]]
method = "sft"

[[grid]]
method = "dpo"
values = [0.5]
config = { steps = 200, lr = 0.05 }

[[grid]]
method = "dpo_pl"
name = "dpo_pl_k3"
values = [0.5]
preferences = { k = 3, labels = "plackett_luce" }
config = { steps = 200, lr = 0.05 }

[[grid]]
method = "ppo"
values = [0.1]
config = { iterations = 60, lr = 0.05 }

[[grid]]
method = "best_of_n"
values = [2, 8]
"""


def test_the_grid_on_two_dask_workers_equals_the_in_process_run(tmp_path, capfd, prefect_harness, restore_torch_threads,
                                                                monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import pipelines.benchmark

    progress: list[tuple[int, int]] = []
    monkeypatch.setattr(pipelines.benchmark, "_progress", lambda n, total, label: progress.append((n, total)))

    reports = tmp_path / "dask"
    config_file = tmp_path / "grid.toml"
    config_file.write_text(GRID)
    # As a user runs it, with no Prefect API configured: one temporary server for the flow and its
    # workers (here the session's test server, which Prefect registers as the temporary one).
    # Each worker process once started a server of its own.
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["run", "--config", str(config_file), "--workers", "2", "--reports-dir", str(reports),
                     "--run-id", "dask", "--quiet"]) == 0
    err = capfd.readouterr().err
    assert err.count("Starting temporary server") <= 1
    # Dask's scheduler chatter (and the CommClosedError it logs at INFO on a normal shutdown) is not shown.
    assert "distributed.scheduler" not in err and "CommClosedError" not in err
    record = json.loads((reports / "dask" / "run.json").read_text())
    assert record["status"] == "completed" and record["orchestrator"] == "prefect"
    # The run's own stages keep torch's default threads in this process; the two workers share the cores.
    assert record["config"]["threads"] == 0
    worker_threads = max(1, (os.cpu_count() or 1) // 2)

    # Every cell was built in a worker process, both workers took cells, and each cell ran with
    # the pinned thread count (Dask starts workers with OMP_NUM_THREADS=1, so also check the
    # pinning itself in test_setup_threads_pins_a_worker below).
    cells = _markers(reports / ".cache", "cell")
    config = from_dict_config(record["config"])
    assert len(cells) == len(config.cells())
    # The grid's progress ("cell i/N done"), counted as each cell finishes, whichever finishes first.
    n = len(config.cells())
    assert progress == [(i, n) for i in range(1, n + 1)]
    pids = {c["pid"] for c in cells}
    assert os.getpid() not in pids and len(pids) == 2
    assert {c["torch_threads"] for c in cells} == {worker_threads}
    assert {record["torch_threads"][c.label] for c in config.cells()} == {worker_threads}
    # The first seed's pipeline ran in this process, the second seed's on a worker.
    first = derive_seed(0, "sft")
    sft = {m["key_data"]["seed"] == first: m["pid"] for m in _markers(reports / ".cache", "sft")}
    assert sft[True] == os.getpid() and sft[False] in pids
    # The jobs ran on the workers too: each seed's 3-wise candidates and their labels, the reward
    # model at T = 1 for the first seed (on its main candidates: one candidates stage per sampling
    # config), the shared draws (best-of-N's KL pool of 32 rounds per seed).
    candidates = sorted((m["key_data"]["sampling"]["k"], m["pid"] in pids) for m in _markers(reports / ".cache", "candidates"))
    assert candidates == [(2, False), (2, True), (3, True), (3, True)]
    reward_models = [m["pid"] for m in _markers(reports / ".cache", "reward_model")]
    assert len(reward_models) == 3 and reward_models.count(os.getpid()) == 1 and len(set(reward_models) & pids) >= 1
    shared = _markers(reports / ".cache", "shared")
    assert len(shared) == 2 * 32 and {m["pid"] for m in shared} <= pids
    # The bandit convergence check ran on a worker too (queued after the cells, to fill a worker they leave idle).
    assert [m["pid"] in pids for m in _markers(reports / ".cache", "bandit_checks")] == [True]

    local = run_benchmark(config, tmp_path / "local", run_id="local", progress=False)
    dask_metrics = pd.read_parquet(reports / "dask" / "metrics.parquet").drop(columns="run_id")
    local_metrics = pd.read_parquet(local / "metrics.parquet").drop(columns="run_id")
    clocked = dask_metrics["metric"].isin(WALL_CLOCK_METRICS)  # measured, not computed: no two runs share them
    pd.testing.assert_frame_equal(dask_metrics[~clocked].reset_index(drop=True),
                                  local_metrics[~local_metrics["metric"].isin(WALL_CLOCK_METRICS)].reset_index(drop=True),
                                  check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(reports / "dask" / "invariance.parquet"), pd.read_parquet(local / "invariance.parquet"))
    assert (reports / "dask" / "report.html").is_file() and (reports / "dask" / "history.parquet").is_file()


def _probe_threads(config_data: dict, cache: str) -> tuple[int, int, int]:
    """In a worker: (pid, torch threads before, torch threads while a stage builds)."""
    from dpo_bench.stages import Bench

    before = torch.get_num_threads()
    seen = {}
    bench = Bench(from_dict_config(config_data), Path(cache))
    bench.run_stage("probe", {}, lambda out: seen.update(threads=torch.get_num_threads()))
    return os.getpid(), before, seen["threads"]


def test_setup_threads_pins_a_worker(tmp_path):
    from distributed import Client, LocalCluster

    from dpo_bench.bench import load_config

    config = load_config("quick", overrides={"task": "bandit", "threads": 2}).to_dict()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pid, before, during = client.submit(_probe_threads, config, str(tmp_path), pure=False).result(timeout=120)
    assert pid != os.getpid()
    assert before == 1  # Dask's default for worker processes
    assert during == 2


def _malloc_env() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_workers_allocate_like_a_plain_process(monkeypatch):
    """Dask's MALLOC_TRIM_THRESHOLD_=65536 pins glibc's mmap threshold: every freed tensor went
    back to the OS and was page-faulted in again (247 s of system CPU in a default run, 27 s without)."""
    import dask
    from distributed import Client, LocalCluster

    from pipelines.benchmark import task_runner_for

    # An earlier cluster in this process wrote Dask's value into os.environ; a shell would not have it.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    key = "distributed.nanny.pre-spawn-environ"
    saved = dict(dask.config.get(key))
    try:
        dask.config.set({f"{key}.MALLOC_TRIM_THRESHOLD_": 65536})  # Dask's default (an earlier run may have unset it)
        assert task_runner_for(2, None) is not None
        environ = dask.config.get(key)
        assert environ.get("MALLOC_TRIM_THRESHOLD_") is None and environ.get("OMP_NUM_THREADS") is not None
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
            assert client.submit(_malloc_env).result() is None
    finally:
        dask.config.set({key: saved})


# A smaller exact grid for a cluster started by hand: two pipeline seeds, so that both workers
# train, and the methods whose cells read every upstream stage.
EXTERNAL_GRID = """
preset = "quick"
task = "bandit"
seeds = [0, 1]

[checks]
empirical = false
label_temperatures = []

[[grid]]
method = "sft"

[[grid]]
method = "dpo"
values = [0.5]
config = { steps = 40, lr = 0.05 }

[[grid]]
method = "ppo"
values = [0.1]
config = { iterations = 12, lr = 0.05 }

[[grid]]
method = "best_of_n"
values = [4]
"""


@pytest.fixture
def external_cluster(tmp_path):
    """A `dask scheduler` and two `dask worker` processes on 127.0.0.1, started as a user starts
    them on their machines (one thread each): (the scheduler's address, the workers' pids)."""
    import subprocess
    import sys
    import time

    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [[dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)]]
    commands += [[dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--name", f"worker-{i}",
                  "--no-dashboard", "--host", "127.0.0.1"] for i in range(2)]
    processes = []
    try:
        for i, command in enumerate(commands):
            with open(logs / f"{i}.log", "w") as log:
                processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            if i == 0:
                deadline = time.monotonic() + 60
                while not scheduler_file.exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            pids = set(client.run(os.getpid).values())
            address = client.scheduler.address
        yield address, pids
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_the_grid_on_a_cluster_started_by_hand_equals_the_in_process_run(tmp_path, prefect_harness, restore_torch_threads,
                                                                        external_cluster):
    """`--dask-address`: the cells run in the hand-started workers (both take some) and the
    metrics equal those of the same config run in this process, exactly."""
    address, worker_pids = external_cluster
    reports = tmp_path / "external"
    config_file = tmp_path / "grid.toml"
    config_file.write_text(EXTERNAL_GRID)
    assert main(["run", "--config", str(config_file), "--dask-address", address, "--reports-dir", str(reports),
                 "--run-id", "external", "--quiet"]) == 0
    record = json.loads((reports / "external" / "run.json").read_text())
    assert record["status"] == "completed"
    config = from_dict_config(record["config"])
    cells = _markers(reports / ".cache", "cell")
    assert len(cells) == len(config.cells())
    assert {c["pid"] for c in cells} == worker_pids

    local = run_benchmark(config, tmp_path / "local", run_id="local", progress=False)
    external_metrics = pd.read_parquet(reports / "external" / "metrics.parquet").drop(columns="run_id")
    local_metrics = pd.read_parquet(local / "metrics.parquet").drop(columns="run_id")
    pd.testing.assert_frame_equal(external_metrics[~external_metrics["metric"].isin(WALL_CLOCK_METRICS)].reset_index(drop=True),
                                  local_metrics[~local_metrics["metric"].isin(WALL_CLOCK_METRICS)].reset_index(drop=True),
                                  check_exact=True)


def test_gpu_workers_see_one_device_each_and_offer_one_gpu():
    from pipelines.workers import gpu_worker_specs

    specs = gpu_worker_specs(3, 2, threads=4)
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["0", "1", "0"]
    assert all(s["options"]["resources"] == {"GPU": 1} and s["options"]["nthreads"] == 1 for s in specs.values())
    assert {s["options"]["env"]["OMP_NUM_THREADS"] for s in specs.values()} == {"4"}


def test_tasks_ask_for_a_gpu_on_a_cluster_that_offers_them(prefect_harness):
    """No GPU needed: two workers built as the local GPU cluster builds them beside one plain
    worker. Every task lands on a GPU worker, and both devices take some."""
    from distributed import Nanny, Scheduler, SpecCluster
    from prefect import flow, task
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    from pipelines.benchmark import one_gpu_per_task
    from pipelines.workers import gpu_worker_specs

    @task
    def device_of_worker() -> tuple[int, str | None]:  # local, so that it pickles by value
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

    workers = {**gpu_worker_specs(2, 2, threads=1), "cpu": {"cls": Nanny, "options": {"nthreads": 1}}}
    runner = DaskTaskRunner(cluster_class=SpecCluster, cluster_kwargs={
        "workers": workers, "scheduler": {"cls": Scheduler, "options": {"dashboard_address": ":0"}}})

    @flow(task_runner=runner)
    def spread() -> list:
        # The started runner, from the context: a flow that closes over it would ship its client.
        with one_gpu_per_task(FlowRunContext.get().task_runner):
            futures = [device_of_worker.submit() for _ in range(8)]
        return [f.result() for f in futures]

    assert {device for _, device in spread()} == {"0", "1"}


def test_a_cluster_without_gpu_workers_puts_no_constraint_on_tasks():
    """A task asking for a resource that no worker offers would wait forever."""
    from types import SimpleNamespace

    import dask

    from pipelines.benchmark import one_gpu_per_task
    from pipelines.workers import offers_gpus

    plain = {"workers": {"tcp://a": {"resources": {}}, "tcp://b": {}}}
    gpu = {"workers": {"tcp://a": {"resources": {}}, "tcp://b": {"resources": {"GPU": 2}}}}
    assert not offers_gpus(plain) and offers_gpus(gpu) and not offers_gpus({})
    for info, expected in ((plain, {}), (gpu, {"resources": {"GPU": 1}})):
        runner = SimpleNamespace(client=SimpleNamespace(scheduler_info=lambda info=info: info))
        with one_gpu_per_task(runner):
            assert dask.get_annotations() == expected


def _closed_connection_filters() -> bool:
    """In a worker: whether the handlers Dask's loggers reach drop closed-connection records."""
    import logging

    from pipelines.dask_quiet import ClosedConnections

    handlers = logging.getLogger("distributed").handlers + logging.getLogger().handlers
    return bool(handlers) and all(any(isinstance(f, ClosedConnections) for f in h.filters) for h in handlers)


def test_a_shutdowns_closed_connections_are_not_logged_by_the_run_or_its_workers():
    """A worker's heartbeat racing the scheduler's close logs a CommClosedError traceback at ERROR
    (seen on a loaded machine): the local workers preload a filter that drops it, and nothing else."""
    import logging

    import dask
    from distributed import Client, LocalCluster
    from distributed.comm.core import CommClosedError

    from pipelines.benchmark import quiet_worker_logs
    from pipelines.dask_quiet import ClosedConnections

    with dask.config.set({"distributed.worker.preload": []}):
        quiet_worker_logs()
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            assert list(client.run(_closed_connection_filters).values()) == [True]
    keep = ClosedConnections()
    try:
        raise CommClosedError("in <TCP (closed) ConnectionPool.heartbeat_worker>: Stream is closed")
    except CommClosedError:
        import sys

        closed = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                                   "Failed to communicate with scheduler during heartbeat.", None, sys.exc_info())
    other = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, "Compute Failed", None, None)
    assert not keep.filter(closed) and keep.filter(other)
