"""The run's context: a resolved config on the stage store, and what its stages load from it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dpo_engine.distributed import Ranks, rank_device
from reward.model import RewardModel

from .. import schema
from ..bench import BenchConfig
from ..policy import load_module, resolve_device
from ..precision import Precision
from ..preferences import PreferenceConfig
from ..stage_store import Stage, StageStore, code_version
from ..tasks import get_task_class
from ..training import TrainLog

log = logging.getLogger("dpo_bench")

METRIC_COLUMNS = list(schema.METRIC_COLUMNS)


@dataclass
class Bench(StageStore):
    """A resolved config plus where stages are cached: everything a stage function needs.

    Pickles small (config and paths); loaded models are memoised per process (the store's memo).
    """

    config: BenchConfig
    cache_dir: Path
    use_cache: bool = True
    progress: bool = True
    _memo: dict = field(default_factory=dict, repr=False)
    # The library's code version, in every stage key: computed once when the run starts and carried
    # to its workers and variants, so the run keys every stage alike even if the source is edited
    # while it goes on.
    version: str = ""
    # When the run started (wall clock): with use_cache off, a stage finished since then was built
    # by this run (in another process, or for another cell) and is not built again.
    started: float = 0.0

    def __post_init__(self) -> None:
        if not self.version:
            self.version = code_version()
        if not self.started:
            self.started = time.time()

    def for_seed(self, seed: int) -> "Bench":
        """The same run (store, code version, start, memo) for one pipeline seed."""
        return replace(self, config=self.config.for_seed(seed))

    def with_preferences(self, preferences: PreferenceConfig) -> "Bench":
        """The same run (store, code version, start, memo) with other preference data: a grid
        entry's own, or labels at another temperature."""
        return replace(self, config=replace(self.config, preferences=preferences))

    @property
    def device(self) -> torch.device:
        """The run's device; under ranks (``nproc_per_cell``), this rank's GPU of a CUDA device."""
        return rank_device(resolve_device(self.config.device), Ranks.current().rank)

    @property
    def precision(self) -> Precision:
        """The training's mixed precision, resolved for the device."""
        return Precision.of(self.config.precision, resolve_device(self.config.device))

    # --- the store's hooks ---
    def setup_threads(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)

    def build_record(self) -> dict:
        return {"torch_threads": torch.get_num_threads()}

    def memo_scope(self) -> str:
        return f"{Path(self.cache_dir).resolve()}|{self.config.device}"

    # --- loading stage outputs ---
    def task(self, stage: Stage):
        cls = get_task_class(self.config.task)

        def load():
            task = cls(self.config.task_config, stage.path)
            task.device = self.device  # where its own models (a judge, a pretrained policy) run
            return task

        return self.memo(("task", stage.key), load)

    def task_summary(self, stage: Stage) -> dict[str, Any]:
        """The task's fingerprints, ``has_gold`` and ``reward_metric``, from the loaded task if this
        process has it, else from its files (see ``Task.summary``)."""
        cls = get_task_class(self.config.task)
        loaded = self._memo.get(("task", stage.key))
        summary = ({"fingerprints": dict(getattr(loaded, "fingerprints", {})), "has_gold": loaded.has_gold} if loaded is not None
                   else cls.summary(self.config.task_config, stage.path))
        return {**summary, "exact": cls.exact, "reward_metric": "gold_reward" if summary["has_gold"] else "judge_reward"}

    def reference(self, stage: Stage) -> torch.nn.Module:
        def load():
            model = get_task_class(self.config.task).load_model(self.config.task_config, stage.path / "model", self.device)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            return model

        return self.memo(("reference", stage.key), load)

    def reward_model(self, stage: Stage | None, sft: Stage) -> RewardModel | None:
        if stage is None:
            return None

        def load():
            model = RewardModel(self.reference(sft))
            load_module(model, stage.path / "reward_model.safetensors")
            model.to(self.device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            return model

        return self.memo(("rm", stage.key), load)


def train_rows(train_log: TrainLog, method: str, beta: float, seed: int) -> pd.DataFrame:
    """A training log's records as metric rows (without run_id and task)."""
    rows = [
        {"method": method, "beta": beta, "seed": seed, "step": step, "temperature": float("nan"), "metric": name,
         "value": value, "stderr": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
        for step, name, value, n in train_log.records
    ]
    return pd.DataFrame(rows, columns=METRIC_COLUMNS[2:])
