"""Prefect's temporary API server, started by ``dpo-bench run`` itself.

Without ``PREFECT_API_URL`` a flow's first API call starts a temporary local server (a uvicorn
subprocess on Prefect's SQLite database in ``PREFECT_HOME``; 4-7 s on 2 cores). ``dpo-bench run``
starts that same server (Prefect keeps one per process) in a background thread before it loads
torch, the config and the flow's modules, so that the two overlap. The flow then runs with
``PREFECT_API_URL`` set to it, so Dask workers (which receive the flow's settings with each task)
report to it too: left to Prefect's ephemeral mode, every worker process started a temporary
server of its own on the same SQLite database. With nobody watching a temporary server for
crashed runs, flow heartbeats are turned off (their thread otherwise holds the end of every flow
for up to a second).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class TemporaryAPI:
    """Prefect's temporary server, starting in a background thread."""

    def __init__(self) -> None:
        from prefect.server.api.server import SubprocessASGIServer

        # The instance Prefect's own get_client() would start: the flow reuses it.
        self.server = SubprocessASGIServer()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._start, name="prefect-temporary-server", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        try:
            self.server.start()
        except BaseException as e:  # noqa: BLE001 — re-raised in the main thread by wait()
            self.error = e

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End a server that never served (the run stopped before its flow) without waiting for it.

        Killed, not terminated: a uvicorn still starting up ignored SIGTERM for Prefect's 5 s grace.
        """
        process = self.server.server_process
        if process is not None:
            process.kill()
        with contextlib.suppress(Exception):
            self.server.stop()


def start_temporary_api() -> TemporaryAPI | None:
    """Start the temporary server now, unless a Prefect API is configured (or ephemeral mode is off)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    return TemporaryAPI()


@contextlib.contextmanager
def flow_settings(api: TemporaryAPI | None) -> Iterator[None]:
    """Wait for the early server; the flow (and its Dask workers) use it, without heartbeats."""
    if api is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    api.wait()
    with temporary_settings(updates={PREFECT_API_URL: api.server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
