"""The columns of ``metrics.parquet``, the run's long-format table of results, in one place: the
stages write them, the report and the results store read them (no import of torch here)."""

from __future__ import annotations

METRIC_COLUMNS = (
    "run_id", "task", "method", "beta", "seed", "step", "temperature",
    "metric", "value", "stderr", "ci_low", "ci_high", "n",
)
# The columns that are floats even when a frame holds none of them (an empty run, a store's NULLs).
FLOAT_METRIC_COLUMNS = ("beta", "temperature", "value", "stderr", "ci_low", "ci_high")
# How labels write a method's strength parameter (``register_method(..., strength=...)``): β, α, or its own name
# (kl_coef, n).
STRENGTH_SYMBOLS = {"beta": "β", "alpha": "α"}
