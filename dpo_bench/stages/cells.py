"""One grid cell: a method trained on its pipeline's shared stages and evaluated at its checkpoints."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from dpo_engine.distributed import RankJob, Ranks, ranks
from dpo_engine.seeds import derive_seed
from reward.model import RewardModel

from ..bench import BenchConfig, Cell
from ..configs import from_dict, to_dict
from ..files import write_json
from ..methods.base import MethodContext, ModelPolicy, PreferenceTensors, get_method
from ..policy import load_tensors, save_policy, save_tensors, seed_everything
from ..policy_eval import ReferenceSamples, evaluate_policy
from ..preferences import PreferenceConfig
from ..stage_store import Stage, stable_hash, write_parquet
from ..training import CheckpointFn, NonFiniteLossError, TrainLog
from .context import METRIC_COLUMNS, Bench, log, train_rows
from .shared import build_preferences, gold_normaliser, load_reference_samples, preference_tensors, reference_logps

#: What a cell's per_prompt.parquet keeps of each evaluated prompt (besides the reward, step and cell).
PER_PROMPT_COLUMNS = ["split", "prompt_index", "kl", "proxy_reward", "length", "truncated", "fluent"]


def pool_frame(samples: pd.DataFrame, scores: np.ndarray, truncated: np.ndarray | None) -> pd.DataFrame:
    """A pool of reference draws in long form: ``split, prompt_index, draw, proxy_reward,
    truncated``, one row per draw of each prompt, the prompts in ``samples``' order (the pool's rows)."""
    n_prompts, n_draws = scores.shape
    if len(samples) != n_prompts:
        raise ValueError(f"a pool of {n_prompts} prompts for {len(samples)} samples")
    return pd.DataFrame({
        "split": np.repeat(samples["split"].to_numpy(), n_draws),
        "prompt_index": np.repeat(samples["prompt_index"].to_numpy(), n_draws),
        "draw": np.tile(np.arange(n_draws), n_prompts),
        "proxy_reward": scores.reshape(-1),
        "truncated": (truncated if truncated is not None else np.zeros(scores.shape, dtype=bool)).reshape(-1),
    })


# --- stage 7: one grid cell ------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """The stages a cell reads."""

    task: Stage
    sft: Stage
    ref_eval: Stage
    preferences: Stage | None = None
    ref_logps: Stage | None = None
    reward_model: Stage | None = None

    def keys(self) -> dict[str, str | None]:
        """Each upstream stage's key (None where the cell reads none): what a cell's key hashes."""
        return {f.name: stage.key if (stage := getattr(self, f.name)) else None for f in fields(self)}


def judged_reference_samples(bench: Bench, up: Upstream, task: Any, judge: Any, temperature: float) -> ReferenceSamples:
    """The reference's eval completions with their judge's scores. A judge that is the learned
    reward model did not exist when the reference was evaluated, so it scores them here, once."""
    ref = load_reference_samples(up.ref_eval, temperature)
    if judge is None or np.isfinite(ref.gold).all():
        return ref
    key = ("judged_reference", up.ref_eval.key, up.reward_model.key if up.reward_model else None, temperature)
    return bench.memo(key, lambda: ReferenceSamples(temperature, ref.completions, judge.score(task.eval_prompts, ref.completions)))


class StoreShared:
    """The stage store as a method's :class:`~dpo_bench.methods.base.SharedStore`: tensors keyed on
    the cell's upstream stages, its replicate seed and the method's own key, built once (by the
    first cell that asks) and read by every other cell, run or worker that asks for the same."""

    def __init__(self, bench: Bench, up: Upstream, replicate: int):
        self.bench = bench
        self.upstream = up.keys()
        self.seed = derive_seed(bench.config.seed, "shared", replicate)

    def tensors(self, name: str, key: dict, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        data = {"name": name, "upstream": self.upstream, "seed": self.seed, "key": key}

        def load() -> dict[str, torch.Tensor]:
            stage = self.bench.run_stage("shared", data, lambda out: save_tensors(build(), out / "tensors.safetensors"))
            return load_tensors(stage.path / "tensors.safetensors")

        return self.bench.memo(("shared", stable_hash(data)), load)


def run_cell(bench: Bench, cell: Cell, up: Upstream) -> Stage:
    """Train one (method, value, seed) cell and evaluate it at its checkpoints.

    A non-finite loss does not fail the run: the cell records ``status: failed`` with the error,
    keeps the metrics of its last good checkpoint, and the other cells go on.
    """
    config = bench.config
    method = get_method(cell.method)
    method_config = cell.config()
    seed = derive_seed(config.seed, cell.display_name, cell.strength_value, cell.seed)
    if cell.preferences and up.preferences is not None:
        up = _variant_preferences(bench, cell, up)
    freeze_blocks, freeze_embeddings = _cell_freeze(config, cell)
    # Ranks change a training's random streams (PPO's rollouts) or its float sums: they key the cell.
    nproc = config.nproc_per_cell if method.data_parallel else 1
    name = cell.display_name
    key = {
        "upstream": up.keys(),
        "method": cell.method, "name": name, "config": to_dict(method_config), "seed": seed,
        "evaluation": to_dict(config.evaluation), "freeze": [freeze_blocks, freeze_embeddings],
        "precision": bench.precision.name, "ranks": nproc,
    }

    def build(out: Path) -> None:
        inputs = _cell_inputs(bench, up)
        task, reference, reward_model, judge = inputs.task, inputs.reference, inputs.reward_model, inputs.judge
        rows: list[dict] = []
        per_prompt: list[pd.DataFrame] = []
        pools: list[pd.DataFrame] = []  # a best-of-N cell's reference draws, the optimum's estimate reads them
        last_samples: dict[str, pd.DataFrame] = {}
        strength = cell.strength_value
        train_log = TrainLog()

        def checkpoint(step: int, policy: Any) -> None:
            # What training has cost up to this checkpoint; its evaluation is not training.
            train_log.log_compute(step)
            with train_log.compute.paused():
                evaluate_checkpoint(step, policy)

        def evaluate_checkpoint(step: int, policy: Any) -> None:
            if isinstance(policy, torch.nn.Module):
                if policy is not reference:
                    # The last evaluated policy is kept: after a failure it is the last good checkpoint.
                    save_policy(policy, out / "policy")
                policy = ModelPolicy(policy, task)
            metric_rows, samples = _evaluate_checkpoint(bench, up, inputs, seed, step, policy)
            rows.extend({"step": step, "temperature": 1.0, **r} for r in metric_rows)
            per_prompt.append(samples[PER_PROMPT_COLUMNS + [task.reward_metric]].assign(step=step))
            if hasattr(policy, "pool_draws"):
                pools.append(pool_frame(samples, *policy.pool_draws()).assign(step=step))
            last_samples["samples"] = samples[samples["split"] == "test"].drop(columns=["split", "prompt_index"]).assign(step=step)

        ctx = _method_context(bench, cell, up, inputs, seed, checkpoint, train_log, bench.progress)
        status = {"status": "ok", "error": None, "label": cell.label}
        start = time.perf_counter()
        train_log.compute.start()
        try:
            with ranks(nproc, RankJob(_train_cell_rank, (bench, cell, up, seed)), bench.device):
                policy = method.train(ctx, method_config)
            final_step = max((r["step"] for r in rows), default=0)
            for t in config.evaluation.temperatures:
                if t == 1.0:
                    continue
                eval_gen = torch.Generator().manual_seed(derive_seed(seed, "eval", final_step, t))
                metric_rows, _ = evaluate_policy(
                    policy, task=task, reference=reference, reward_model=reward_model, judge=judge,
                    reference_samples=judged_reference_samples(bench, up, task, judge, t), generator=eval_gen, temperature=t,
                    only=("win_rate", task.reward_metric),
                )
                rows.extend({"step": final_step, "temperature": t, **r} for r in metric_rows)
        except NonFiniteLossError as e:
            log.warning("%s failed: %s", cell.label, e)
            status = {"status": "failed", "error": str(e), "label": cell.label,
                      "last_good_checkpoint": max((r["step"] for r in rows), default=None)}
        except Exception as e:  # noqa: BLE001 — one broken cell must not sink the grid
            log.error("%s failed:\n%s", cell.label, traceback.format_exc())
            status = {"status": "failed", "error": f"{type(e).__name__}: {e}", "label": cell.label}
        status["seconds"] = time.perf_counter() - start
        metrics = pd.DataFrame([{"method": name, "beta": strength, "seed": cell.seed, **r} for r in rows], columns=METRIC_COLUMNS[2:])
        train = train_rows(ctx.log, name, strength, cell.seed)
        if not task.has_gold:  # trainers log the judge's scores as train/gold_reward; name them honestly
            train["metric"] = train["metric"].replace("train/gold_reward", "train/judge_reward")
        write_parquet(pd.concat([metrics, train], ignore_index=True), out / "metrics.parquet")
        if per_prompt:
            # Every checkpoint's per-prompt results on the validation and test prompts: the frontier's input.
            frame = pd.concat(per_prompt, ignore_index=True).rename(columns={task.reward_metric: "reward"})
            write_parquet(frame.assign(method=name, beta=strength, seed=cell.seed), out / "per_prompt.parquet")
        if pools:
            write_parquet(pd.concat(pools, ignore_index=True).assign(seed=cell.seed), out / "pool.parquet")
        if "samples" in last_samples:
            # Every eval prompt's final gold reward, for head-to-head win rates between cells.
            write_parquet(last_samples["samples"][[task.reward_metric]], out / "final_gold.parquet")
            n = config.evaluation.n_saved_prompts
            write_parquet(last_samples["samples"].head(n).assign(method=name, beta=strength, seed=cell.seed), out / "samples.parquet")
        write_json(out / "status.json", status)

    return bench.run_stage("cell", key, build)


@dataclass(frozen=True)
class CellInputs:
    """What a cell's training reads from the upstream stages."""

    task: Any
    reference: torch.nn.Module
    reward_model: RewardModel | None
    judge: Any
    preferences: PreferenceTensors | None


def _cell_inputs(bench: Bench, up: Upstream) -> CellInputs:
    task, reference = bench.task(up.task), bench.reference(up.sft)
    reward_model = bench.reward_model(up.reward_model, up.sft)
    prefs = preference_tensors(bench, up.task, up.preferences, up.ref_logps) if up.preferences and up.ref_logps else None
    return CellInputs(task, reference, reward_model, task.judge(reward_model), prefs)


def _method_context(bench: Bench, cell: Cell, up: Upstream, inputs: CellInputs, seed: int, checkpoint: CheckpointFn,
                    train_log: TrainLog, progress: bool) -> MethodContext:
    """The context a cell's method trains in (every random stream seeded from ``seed`` here)."""
    config = bench.config
    judge = inputs.judge
    freeze_blocks, freeze_embeddings = _cell_freeze(config, cell)
    return MethodContext(
        task=inputs.task, reference=inputs.reference, device=bench.device, seed=seed, generator=seed_everything(seed),
        checkpoint=checkpoint, n_checkpoints=config.evaluation.n_checkpoints, log=train_log, preferences=inputs.preferences,
        reward_model=inputs.reward_model, gold_scores=judge.score if judge is not None else None,
        gold_normaliser=gold_normaliser(up.reward_model),
        freeze_blocks=freeze_blocks, freeze_embeddings=freeze_embeddings, progress=progress, label=cell.label,
        shared=StoreShared(bench, up, cell.seed), precision=bench.precision,
    )


def _cell_freeze(config: BenchConfig, cell: Cell) -> tuple[int, bool]:
    """The blocks and embeddings a cell fixes: its grid entry's, else the run's."""
    return (config.freeze_blocks if cell.freeze_blocks is None else cell.freeze_blocks,
            config.freeze_embeddings if cell.freeze_embeddings is None else cell.freeze_embeddings)


def _evaluate_checkpoint(bench: Bench, up: Upstream, inputs: CellInputs, seed: int, step: int,
                         policy: Any) -> tuple[list[dict], pd.DataFrame]:
    """A checkpoint's evaluation on the test and validation prompts at temperature 1: metric rows
    and per-prompt samples. Under ranks every rank calls it and samples its share of the prompts
    from a stream of its own."""
    where = Ranks.current()
    names = ("eval", step) if not where.distributed else ("eval", step, "rank", where.rank)
    return evaluate_policy(
        policy, task=inputs.task, reference=inputs.reference, reward_model=inputs.reward_model, judge=inputs.judge,
        reference_samples=judged_reference_samples(bench, up, inputs.task, inputs.judge, 1.0),
        generator=torch.Generator().manual_seed(derive_seed(seed, *names)), temperature=1.0, splits=("test", "val"),
        ranks=where,
    )


def _train_cell_rank(bench: Bench, cell: Cell, up: Upstream, seed: int) -> None:
    """A cell's training on a rank other than 0: the same context; at each checkpoint its share of
    the evaluation's sampling, for rank 0 to gather; nothing written."""
    inputs = _cell_inputs(bench, up)

    def checkpoint(step: int, policy: Any) -> None:
        _evaluate_checkpoint(bench, up, inputs, seed, step, ModelPolicy(policy, inputs.task))

    ctx = _method_context(bench, cell, up, inputs, seed, checkpoint, TrainLog(), False)
    get_method(cell.method).train(ctx, cell.config())


def _variant_preferences(bench: Bench, cell: Cell, up: Upstream) -> Upstream:
    """The cell's own preference data (and reference log-probs), built once and cached like any stage."""
    config = bench.config
    preferences = from_dict(PreferenceConfig, {**to_dict(config.preferences), **dict(cell.preferences)}, "preferences")
    variant = bench.with_preferences(preferences)
    prefs = build_preferences(variant, up.task, up.sft)
    return replace(up, preferences=prefs, ref_logps=reference_logps(variant, up.task, up.sft, prefs))


def cell_status(stage: Stage) -> dict:
    return json.loads((stage.path / "status.json").read_text())
