"""Kill and resume: `dpo-bench run` is SIGKILLed while a grid cell trains; the same command run
again takes every finished stage from the cache, leaves nothing half-written that a run would
trust, and ends with the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpo_bench.bench import load_config
from dpo_bench.run import run_benchmark
from dpo_bench.stages import LOCKS
from dpo_bench.training import WALL_CLOCK_METRICS

DPO_BENCH = str(Path(sys.executable).parent / "dpo-bench")

# Every stage, tiny; one DPO cell long enough to be killed in the middle of its training. One
# torch thread: on a busy 2-core machine two OpenMP threads per process ran 2.5x slower.
SMALL = """
task = "sentiment"
seed = 3
threads = 1

[sentiment]
n_reviews = 2000
n_train_prompts = 300
n_val_prompts = 24
n_eval_prompts = 48

[sft]
steps = 40
warmup_steps = 10

[reward_model]
steps = 10

[evaluation]
n_checkpoints = 2

[[grid]]
method = "dpo"
values = [0.5]
config = { steps = 60, lr = 1e-4 }
"""
UPSTREAM = {"task", "sft", "reference_eval", "candidates", "preferences", "ref_logps", "reward_model"}


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cell_tmp_dir(cache: Path) -> Path | None:
    cells = cache / "cell"
    return next(iter(sorted(cells.glob(".*.tmp-*"))), None) if cells.is_dir() else None


def _frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    frames = {name: pd.read_parquet(run_dir / f"{name}.parquet") for name in ("metrics", "samples", "invariance")}
    metrics = frames["metrics"].drop(columns="run_id")
    # Wall-clock metrics are measured, not computed: no two runs share them.
    frames["metrics"] = metrics[~metrics["metric"].isin(WALL_CLOCK_METRICS)].reset_index(drop=True)
    return frames


def test_a_run_killed_during_a_grid_cell_resumes_to_the_uninterrupted_result(tmp_path, prefect_harness,
                                                                              restore_torch_threads):
    from prefect.settings import PREFECT_API_URL

    config_file = tmp_path / "small.toml"
    config_file.write_text(SMALL)
    reports, cache = tmp_path / "reports", tmp_path / "cache"
    command = [DPO_BENCH, "run", "--config", str(config_file), "--reports-dir", str(reports), "--cache-dir", str(cache),
               "--run-id", "resumed", "--quiet"]
    # The subprocesses use the session's Prefect server instead of starting their own.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _cell_tmp_dir(cache) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        tmp_cell = _cell_tmp_dir(cache)
        assert tmp_cell is not None, f"no grid cell started\n{log.read_text()[-3000:]}"
        time.sleep(0.5)  # into the cell's training
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Killed mid-cell: the cell exists only as its temporary directory, the run wrote no results.
    assert tmp_cell.is_dir() and not (tmp_cell / "_complete.json").exists()
    assert [p.name for p in (cache / "cell").iterdir()] == [tmp_cell.name]
    assert not (reports / "resumed" / "run.json").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    run_dir = reports / "resumed"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert set(record["cached_stages"]) == UPSTREAM  # only the killed cell was computed again

    # Nothing half-written is trusted: every stage directory a run reads is complete, and the
    # killed run's temporary directory is gone (the resumed run removed it: its process was dead).
    for stage_dir in cache.iterdir():
        if stage_dir.name == LOCKS:  # the stages' build locks, not a stage
            continue
        for entry in stage_dir.iterdir():
            assert not entry.name.startswith("."), entry
            assert (entry / "_complete.json").is_file(), entry
    assert not tmp_cell.exists()

    uninterrupted = run_benchmark(load_config(None, config_file), tmp_path / "baseline", run_id="baseline",
                                  cache_dir=tmp_path / "fresh-cache", progress=False)
    resumed, baseline = _frames(run_dir), _frames(uninterrupted)
    for name in resumed:
        pd.testing.assert_frame_equal(resumed[name], baseline[name], check_exact=True, obj=name)


def _processes_with(variable: str) -> list[str]:
    """This machine's processes whose environment holds ``variable`` (``NAME=value``): their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if variable.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads processes' environments from /proc")
def test_a_terminated_run_stops_prefects_temporary_server_with_it(tmp_path):
    """SIGTERM (a scheduler's, kill's) while the flow runs: the run ends with status 143 and leaves no
    process behind, Prefect's temporary server (a process of its own) included."""
    home = tmp_path / "prefect-home"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    log = tmp_path / "terminated.log"
    command = [DPO_BENCH, "run", "--task", "bandit", "--preset", "quick", "--reports-dir", str(tmp_path / "reports"), "--quiet"]
    proc = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "Beginning flow run" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be terminated\n{log.read_text()[-3000:]}"
        assert _processes_with(f"PREFECT_HOME={home}"), "no temporary server started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while _processes_with(f"PREFECT_HOME={home}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(f"PREFECT_HOME={home}") == []
