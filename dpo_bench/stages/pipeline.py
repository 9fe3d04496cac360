"""One pipeline seed's shared stages, in dependency order: the run's DAG, defined once.

The in-process run (:func:`dpo_bench.run.plan_stages`) and the Prefect flow
(:mod:`pipelines.benchmark`, a task per step) both walk :data:`PIPELINE`; a grid cell then reads the
stages it needs (:func:`dpo_bench.run.upstream_for`), and the jobs beside the grid start once their
inputs are built (:func:`dpo_bench.stages.checks.worker_jobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..stage_store import Stage
from .context import Bench
from .shared import (
    build_candidates, build_preferences, prepare_task, reference_eval, reference_logps, samples_preferences, train_rm, train_sft,
)


def _always(bench: Bench) -> bool:
    return True


def _needs_reference_logps(bench: Bench) -> bool:
    """Whether a method of the grid trains on preference pairs or rankings (with their reference log-probs)."""
    return bool(bench.config.needs() & {"preferences", "rankings"})


@dataclass(frozen=True)
class Step:
    """One shared stage: its name among the pipeline's stages, its title (the Prefect task's name),
    what the run says as it starts it ("" for nothing), how it is built from the stages before it,
    whether this run wants it (else the pipeline holds None), whether it downloads (a model or data
    from a hub: the flow retries it), and whether it runs before any worker starts (it needs every
    core)."""

    name: str
    title: str
    message: str
    build: Callable[[Bench, dict], Stage]
    wanted: Callable[[Bench], bool] = _always
    downloads: bool = False
    before_workers: bool = False


PIPELINE: tuple[Step, ...] = (
    Step("task", "prepare task", "preparing the task", lambda bench, s: prepare_task(bench),
         downloads=True, before_workers=True),
    Step("sft", "train SFT", "training the SFT model", lambda bench, s: train_sft(bench, s["task"]),
         downloads=True, before_workers=True),
    Step("ref_eval", "evaluate reference", "evaluating the reference", lambda bench, s: reference_eval(bench, s["task"], s["sft"]),
         before_workers=True),
    Step("candidates", "sample preference candidates", "sampling the preference candidates",
         lambda bench, s: build_candidates(bench, s["task"], s["sft"]), wanted=samples_preferences),
    Step("preferences", "label preferences", "building the preference data",
         lambda bench, s: build_preferences(bench, s["task"], s["sft"], s["candidates"])),
    Step("ref_logps", "reference log-probs", "",
         lambda bench, s: reference_logps(bench, s["task"], s["sft"], s["preferences"]), wanted=_needs_reference_logps),
    Step("reward_model", "train reward model", "training the reward model",
         lambda bench, s: train_rm(bench, s["task"], s["sft"], s["preferences"])),
)


def run_steps(bench: Bench, stages: dict[str, Stage | None], steps: tuple[Step, ...] | list[Step],
              build: Callable[[Step, Bench, dict], Stage], before: Callable[[Step], None] = lambda step: None) -> dict:
    """Walk ``steps`` into ``stages``: for each step this run wants, ``before(step)`` and then
    ``build(step, bench, stages)`` (the step itself, or a task that runs it); None for the others."""
    for step in steps:
        if step.wanted(bench):
            before(step)
            stages[step.name] = build(step, bench, stages)
        else:
            stages[step.name] = None
    return stages
