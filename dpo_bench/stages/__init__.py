"""The benchmark's stages as plain functions over the content-addressed stage store
(:mod:`dpo_bench.stage_store`).

- :mod:`.context`: :class:`Bench`, a resolved config on the store, and what stages load from it;
- :mod:`.shared`: one pipeline seed's shared stages (task data, SFT, preferences, reference
  log-probs, reward model, the reference's evaluation samples);
- :mod:`.cells`: one grid cell, trained and evaluated at its checkpoints;
- :mod:`.checks`: the empirical checks' own stages, the jobs beside the grid, and a run's checks.
"""

from ..stage_store import LOCKS, Stage, built_threads, code_version, process_alive, stable_hash, write_parquet
from .cells import PER_PROMPT_COLUMNS, StoreShared, Upstream, cell_status, pool_frame, run_cell
from .checks import (
    FILLER_JOBS, LEMMA2_PPO_OVERRIDES, check_stage, label_temperature_rm, label_temperature_rms, ppo_against, run_invariance_checks,
    run_job, shuffled_label_cell, worker_jobs,
)
from .context import METRIC_COLUMNS, Bench
from .shared import (
    build_candidates, build_preferences, fitted_normaliser, gold_normaliser, load_reference_samples, preference_info,
    preference_tensors, prepare_task, reference_eval, reference_logps, samples_preferences, sft_samples, train_rm, train_sft,
)

__all__ = [
    "FILLER_JOBS", "LEMMA2_PPO_OVERRIDES", "LOCKS", "METRIC_COLUMNS", "PER_PROMPT_COLUMNS", "Bench", "Stage", "StoreShared", "Upstream",
    "build_candidates", "build_preferences", "built_threads", "cell_status", "check_stage", "code_version", "fitted_normaliser",
    "gold_normaliser", "label_temperature_rm", "label_temperature_rms", "load_reference_samples", "pool_frame", "ppo_against",
    "preference_info", "preference_tensors", "prepare_task", "process_alive", "reference_eval", "reference_logps", "run_cell",
    "run_invariance_checks", "run_job", "samples_preferences", "sft_samples", "shuffled_label_cell", "stable_hash",
    "train_rm", "train_sft", "worker_jobs", "write_parquet",
]
