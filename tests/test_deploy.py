"""Scheduled runs against a real Prefect server: `prefect server start` on 127.0.0.1 with its own
PREFECT_HOME, then `dpo-bench serve --cron ...` registers the deployment; the server's scheduler
creates its runs; a triggered run completes and writes its report and its store record.
`dpo-bench deploy` registers the same deployment on a work pool."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dpo_engine.seeds import derive_seed
from pipelines.cli import main

BIN = Path(sys.executable).parent
CRON = "0 3 * * *"
# The flow runs the exact bandit task with two methods: seconds, not minutes.
CONFIG_FLAGS = ["--task", "bandit", "--preset", "quick", "--methods", "sft,dpo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_LOGGING_TO_API_ENABLED="false", **extra)
    return env


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on a free port, stopped after the module's tests."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    log = root / "server.log"
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(root / "home"), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(healthy, 90, "the Prefect server to start", proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def client(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as c:
        yield c


def test_serve_schedules_runs_and_a_triggered_run_writes_its_report(server, client, tmp_path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, \
        FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment

    reports = tmp_path / "reports"
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [str(BIN / "dpo-bench"), "serve", "--cron", CRON, *CONFIG_FLAGS, "--workers", "2", "--name", "nightly",
         "--reports-dir", str(reports)],
        env=_env(tmp_path / "serve-home", PREFECT_API_URL=server, PREFECT_RUNNER_POLL_FREQUENCY="1"),
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def deployment():
            try:
                return client.read_deployment_by_name("dpo-bench/nightly")
            except Exception:  # noqa: BLE001 — not registered yet
                return None

        dep = _wait(deployment, 90, "the deployment to be registered", serve, log)
        assert [s.schedule.cron for s in dep.schedules] == [CRON] and all(s.active for s in dep.schedules)
        assert dep.parameters["reports_dir"] == str(reports.resolve())
        assert dep.parameters["config"]["task"] == "bandit"
        assert [e["method"] for e in dep.parameters["config"]["grid"]] == ["sft", "dpo"]
        assert dep.parameters["workers"] == 2 and dep.parameters["dask_address"] is None

        # The server's scheduler fills in the deployment's next runs by itself.
        scheduled_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
        deployment_filter = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        scheduled = _wait(lambda: client.read_flow_runs(flow_run_filter=scheduled_filter, deployment_filter=deployment_filter),
                          60, "the scheduler to create runs", serve, log)
        assert len(scheduled) >= 3
        times = sorted(r.next_scheduled_start_time for r in scheduled)
        assert all((t.hour, t.minute) == (3, 0) for t in times)
        assert (times[1] - times[0]).total_seconds() == 24 * 3600

        # Trigger one now; the serving process picks it up and runs it.
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: server}):
            run = run_deployment("dpo-bench/nightly", timeout=150, poll_interval=1)
        assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
    finally:
        _stop(serve)
    run_dirs = [p for p in reports.iterdir() if (p / "run.json").is_file()]
    assert len(run_dirs) == 1
    record = json.loads((run_dirs[0] / "run.json").read_text())
    assert record["status"] == "completed" and record["task"] == "bandit" and record["orchestrator"] == "prefect"
    assert (run_dirs[0] / "report.html").stat().st_size > 10_000
    assert "## History" in (run_dirs[0] / "report.md").read_text()
    assert (reports / "results.db").is_file()
    # The scheduled run started its own Dask workers: its cells were built outside the flow's process.
    markers = {stage: [json.loads(m.read_text()) for m in (reports / ".cache" / stage).glob("*/_complete.json")]
               for stage in ("sft", "cell")}
    # quick's two pipeline seeds: the first SFT in the flow's process, the second on a worker.
    assert len(markers["sft"]) == 2 and len(markers["cell"]) == 6  # per seed: sft and dpo at two β
    flow_pid = next(m["pid"] for m in markers["sft"] if m["key_data"]["seed"] == derive_seed(0, "sft"))
    assert all(m["pid"] != flow_pid for m in markers["cell"])
    # SIGTERM to `serve` pauses its schedule: no more runs start while nobody serves them.
    assert client.read_deployment_by_name("dpo-bench/nightly").paused


def test_deploy_registers_on_a_work_pool(server, client, tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    client.create_work_pool(WorkPoolCreate(name="benchmarks", type="process"))
    with temporary_settings(updates={PREFECT_API_URL: server}):
        assert main(["deploy", "--cron", CRON, *CONFIG_FLAGS, "--pool", "benchmarks", "--name", "pooled",
                     "--reports-dir", str(tmp_path)]) == 0
    dep = client.read_deployment_by_name("dpo-bench/pooled")
    assert dep.work_pool_name == "benchmarks"
    assert [s.schedule.cron for s in dep.schedules] == [CRON]
    assert dep.entrypoint == "pipelines/benchmark.py:benchmark_flow"


def test_serve_without_an_api_explains_what_to_start(tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["serve", "--cron", CRON, *CONFIG_FLAGS, "--reports-dir", str(tmp_path)]) == 2
    assert "prefect server start" in capsys.readouterr().err
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["serve", "--cron", "every day", *CONFIG_FLAGS, "--reports-dir", str(tmp_path)]) == 2
    assert "not a cron expression" in capsys.readouterr().err
