"""Test isolation: Prefect state in a temporary directory, no telemetry, one torch thread pool."""

from __future__ import annotations

import atexit
import os
import tempfile

# Set before anything imports prefect: its settings are read at import time.
_PREFECT_HOME = tempfile.mkdtemp(prefix="dpo-bench-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pipelines/cli.py

import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs the files on pytest-xdist workers that share the cores: each worker's torch
# gets its part of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server for the whole session (≈10 s), never a hand-started one."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        server = getattr(SubprocessASGIServer, "_instances", {}).get(None)
        yield
    # The harness has stopped its server; Prefect 3.9 would stop it again at exit, logging to the
    # stream pytest has closed by then (a "--- Logging error ---" traceback after the summary).
    if server is not None:
        atexit.unregister(server.stop)
