"""Closed connections at a local Dask cluster's shutdown, kept out of the run's output.

When the flow closes its cluster, a worker's heartbeat can race the scheduler's close and log a
``CommClosedError`` traceback ("Failed to communicate with scheduler during heartbeat"), at ERROR,
from the worker process: a normal shutdown, not a fault, and seen more often on a loaded machine.
:func:`install` drops such records (a connection-closed error and nothing else) in this process;
``dask_setup`` does it in each local worker, which Dask preloads with this module
(``distributed.worker.preload``). A worker or scheduler that really dies still fails the run
through Prefect's task states.
"""

from __future__ import annotations

import logging


class ClosedConnections(logging.Filter):
    """Drops log records about a connection closed under a worker or the scheduler."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        closed = type(exc).__name__ == "CommClosedError" or "CommClosedError" in record.getMessage()
        return not closed


def install() -> None:
    """The filter on every handler that Dask's loggers reach: their own and the root logger's."""
    closed = ClosedConnections()
    for name in ("distributed", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ClosedConnections) for f in handler.filters):
                handler.addFilter(closed)


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook
    install()
