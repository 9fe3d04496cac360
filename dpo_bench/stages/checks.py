"""The empirical checks' own stages (the Lemma 2 PPO runs, the implicit-reward check's control, the
reward models at other label temperatures), the jobs a parallel run computes beside the grid, and
the checks of a run: :mod:`dpo_bench.invariance` turns these stages' outputs into checks."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from dpo_engine.seeds import derive_seed

from ..bench import Cell
from ..configs import to_dict
from ..generation import sample
from ..invariance import (
    COLUMNS, CheckResult, ImplicitRewards, bandit_checks, implicit_reward_checks, lemma2_empirical, lemma2_speed, prompt_shift,
)
from ..logprobs import batched_sequence_logps
from ..methods.base import MethodContext, ModelPolicy, get_method
from ..policy import load_policy, seed_everything
from ..policy_eval import ReferenceSamples, evaluate_policy
from ..stage_store import Stage, write_parquet
from ..tasks.bandit import BanditConfig, bandit_tables
from .cells import Upstream, _variant_preferences, run_cell
from .context import METRIC_COLUMNS, Bench
from .shared import _collate_texts, _pairs_frame, build_preferences, load_reference_samples, train_rm


def implicit_reward_data(bench: Bench, stages: dict, cell: Cell, stage: Stage) -> "ImplicitRewards":
    """For a trained DPO-like cell: implicit rewards β·log π/π_ref of the held-out pairs, and of K reference
    samples per held-out prompt next to their gold rewards (for the within-prompt correlation)."""
    config = bench.config
    task, reference = bench.task(stages["task"]), bench.reference(stages["sft"])
    policy = load_policy(stage.path / "policy", bench.device).eval()
    beta = cell.strength_value
    heldout = _pairs_frame(stages["preferences"], "heldout")
    prompts = list(dict.fromkeys(heldout["prompt"]))
    k = config.checks.spearman_completions

    def reference_side() -> dict:
        """What every DPO cell shares: the held-out pairs and K reference samples per held-out prompt
        (with their gold rewards), and the reference's log-probs of both (computed once per run)."""
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "spearman"))
        samples = sample_completions(task, reference, [p for p in prompts for _ in range(k)], generator)
        batches = {side: _collate_texts(task, heldout["prompt"], heldout[side]) for side in ("chosen", "rejected")}
        batches["samples"] = samples["batch"]
        return {"logps": {side: batched_sequence_logps(reference, b) for side, b in batches.items()}, "batches": batches,
                "gold": task.gold.score([p for p in prompts for _ in range(k)], samples["completions"])}

    ref = bench.memo(("implicit_reward_reference", stages["sft"].key, stages["preferences"].key, k, config.seed), reference_side)

    def implicit(side: str) -> np.ndarray:
        return (beta * (batched_sequence_logps(policy, ref["batches"][side]) - ref["logps"][side])).double().numpy()

    return ImplicitRewards(implicit("chosen"), implicit("rejected"), pd.factorize(heldout["prompt"])[0],
                           np.repeat(np.arange(len(prompts)), k), implicit("samples"), np.asarray(ref["gold"], dtype=float))


def implicit_reward_cell(bench: Bench) -> Cell | None:
    """The DPO cell whose implicit reward is checked: the grid's first ``dpo`` cell of this pipeline seed."""
    return next((c for c in bench.config.cells() if c.method == "dpo" and c.seed == bench.config.seed), None)


def shuffled_label_cell(cell: Cell) -> Cell:
    """The same cell (method, β, config, name, so the same seed schedule) trained on its preference data
    with every train label replaced by a fair coin: the implicit-reward check's negative control."""
    return replace(cell, preferences=tuple(sorted({**dict(cell.preferences), "shuffle_labels": True}.items())))


def shuffled_label_dpo(bench: Bench, stages: dict) -> Stage:
    """Train the implicit-reward check's control cell (see :func:`shuffled_label_cell`)."""
    cell = shuffled_label_cell(implicit_reward_cell(bench))
    # No reward model upstream: DPO does not read it, and the job starts before it exists.
    up = _variant_preferences(bench, cell, Upstream(stages["task"], stages["sft"], stages["ref_eval"]))
    return run_cell(bench, cell, up)


def implicit_reward_control(bench: Bench, stages: dict, cells: list[tuple[Cell, Stage]]) -> tuple[tuple[Cell, Stage], Stage] | None:
    """((the checked DPO cell, its stage), its shuffled-label control's stage), or None when the grid
    has no DPO cell on this seed or either did not train."""
    cell = implicit_reward_cell(bench)
    stage = next((s for c, s in cells if c == cell), None)
    if cell is None or stage is None or not (stage.path / "policy").exists():
        return None
    control = check_stage(bench, stages, "implicit reward control")
    return ((cell, stage), control) if (control.path / "policy").exists() else None


def reward_model_heldout_accuracy(bench: Bench, stages: dict) -> float | None:
    """The reward model's pairwise accuracy on the held-out pairs (as its stage measured it)."""
    rm = stages.get("reward_model")
    if rm is None:
        return None
    rows = pd.read_parquet(rm.path / "metrics.parquet")
    rows = rows[rows["metric"] == "rm_accuracy"]
    return float(rows["value"].iloc[0]) if len(rows) else None


def sample_completions(task, model, prompts: list[str], generator: torch.Generator) -> dict:
    s = sample(model, [task.encode_prompt(p) for p in prompts], max_new_tokens=task.max_new_tokens,
               eos_id=task.eos_id, pad_id=task.pad_id, generator=generator)
    return {"completions": [task.decode_completion(c) for c in s.completion_ids], "batch": s.batch}


def lemma2_ppo(bench: Bench, stages: dict) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """The Lemma 2 PPO runs: per variant, the final per-prompt samples, and the curve along training."""
    stage = check_stage(bench, stages, "lemma2 PPO")
    return ({v: pd.read_parquet(stage.path / f"{v}.parquet") for v in LEMMA2_VARIANTS},
            {v: pd.read_parquet(stage.path / f"{v}_curve.parquet") for v in LEMMA2_VARIANTS})


LEMMA2_VARIANTS = ("r", "r+f", "r+g")


#: What the Lemma 2 check's PPO runs change in PPO's defaults: they optimise their reward variants
#: raw, without the EOS penalty. Its kl_coef was chosen on the gold reward's own scale (docs/checks.md,
#: "The Lemma 2 check with PPO"), and a normaliser fitted on each variant would divide r + f(x) by a larger
#: std than r (f adds variance), so the runs the check compares would pay different prices for KL:
#: the invariance it tests would fail by construction.
LEMMA2_PPO_OVERRIDES = {"normalise_reward": False, "missing_eos_penalty": 0.0}


def ppo_against(task, reference: torch.nn.Module, device: torch.device, ppo_config: Any, scores: Callable, seed: int,
                reference_samples: ReferenceSamples, label: str, progress: bool = False,
                n_checkpoints: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """PPO-GT from the reference against the reward ``scores(prompts, completions)`` with seed
    schedule ``seed``, evaluated on the eval prompts: (the final per-prompt samples frame, the curve:
    ``iteration``, mean ``gold_reward`` and ``kl`` at ``n_checkpoints`` evenly spaced iterations).
    A custom score has no normaliser, so ``ppo_config.normalise_reward`` must be false (as
    :data:`LEMMA2_PPO_OVERRIDES` sets)."""
    curve: list[dict] = []
    last: dict[str, pd.DataFrame] = {}

    def checkpoint(step: int, policy: Any) -> None:
        # The same generator seed at every evaluation: the policies are compared on common random numbers.
        _, last["samples"] = evaluate_policy(ModelPolicy(policy, task), task=task, reference=reference, reward_model=None,
                                             reference_samples=reference_samples, generator=torch.Generator().manual_seed(seed))
        curve.append({"iteration": step, "gold_reward": float(last["samples"][task.reward_metric].mean()),
                      "kl": float(last["samples"]["kl"].mean())})

    ctx = MethodContext(
        task=task, reference=reference, device=device, seed=seed, generator=seed_everything(seed),
        checkpoint=checkpoint, n_checkpoints=n_checkpoints, gold_scores=scores, progress=progress, label=label,
    )
    get_method("ppo_gt").train(ctx, ppo_config)  # its last checkpoint is its last iteration: the final policy
    return last["samples"], pd.DataFrame(curve, columns=["iteration", "gold_reward", "kl"])


def lemma2_ppo_stage(bench: Bench, stages: dict) -> Stage:
    """Three PPO runs with the same seed schedule against r, r + f(x) and r + f(x) + g(x, y) = f(x) + c·r
    (f: N(0, 1) per prompt, c: ``checks.lemma2_control_scale``); each evaluated on the eval prompts,
    at the end and along training."""
    config = bench.config
    seed = derive_seed(config.seed, "lemma2_ppo")
    variants = LEMMA2_VARIANTS

    def build(out: Path) -> None:
        task, reference = bench.task(stages["task"]), bench.reference(stages["sft"])
        method = get_method("ppo_gt")
        checks = config.checks
        ppo_config = method.make_config({"iterations": checks.lemma2_iterations, "lr": checks.lemma2_lr, **LEMMA2_PPO_OVERRIDES},
                                        checks.lemma2_kl_coef)
        ref_samples = load_reference_samples(stages["ref_eval"], 1.0)
        for variant in variants:
            def scores(prompts, completions, _variant=variant):
                r = task.gold.score(prompts, completions)
                f = prompt_shift(prompts, config.seed)
                return {"r": r, "r+f": r + f, "r+g": f + checks.lemma2_control_scale * r}[_variant]

            samples, curve = ppo_against(task, reference, bench.device, ppo_config, scores, seed, ref_samples,
                                         label=f"lemma2 PPO vs {variant}", progress=bench.progress,
                                         n_checkpoints=checks.lemma2_checkpoints)
            write_parquet(samples, out / f"{variant}.parquet")
            write_parquet(curve, out / f"{variant}_curve.parquet")

    lemma2 = {k: v for k, v in to_dict(config.checks).items() if k.startswith("lemma2_")}
    return bench.run_stage("lemma2_ppo", {"sft": stages["sft"].key, "ref_eval": stages["ref_eval"].key,
                                          "checks": lemma2, "seed": seed}, build)


def label_temperature_rms(bench: Bench, stages: dict) -> pd.DataFrame:
    """Reward models trained on labels drawn at other Bradley-Terry temperatures: their held-out accuracy
    against the Bayes ceiling at that temperature (noisy labels cap any model)."""
    frames = []
    for t in bench.config.checks.label_temperatures:
        rows = pd.read_parquet(check_stage(bench, stages, f"reward model T={t:g}").path / "metrics.parquet")
        frames.append(rows[rows["metric"].isin(["rm_accuracy", "rm_bayes_ceiling", "rm_train_accuracy"])])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=METRIC_COLUMNS[2:])


def label_temperature_rm(bench: Bench, stages: dict, temperature: float) -> Stage:
    """The reward model trained on preference labels drawn at Bradley-Terry ``temperature``, from
    the run's own candidates (the same completions as the main reward model's)."""
    preferences = replace(bench.config.preferences, label_temperature=float(temperature))
    variant = bench.with_preferences(preferences)
    prefs = build_preferences(variant, stages["task"], stages["sft"], stages.get("candidates"))
    return train_rm(variant, stages["task"], stages["sft"], prefs)


def variant_preferences_job(bench: Bench, stages: dict, cell: Cell) -> Stage:
    """A grid entry's own preference data and reference log-probs (``preferences = {...}``), built
    before its cells start. The returned stage is the reference log-probs', with the job's seconds."""
    start = time.perf_counter()
    up = _variant_preferences(bench, cell, Upstream(stages["task"], stages["sft"], stages["ref_eval"]))
    built = not (up.preferences.cached and up.ref_logps.cached)
    return replace(up.ref_logps, cached=not built, seconds=time.perf_counter() - start if built else 0.0)


def _job_builders(bench: Bench, stages: dict, checks: bool = True) -> dict[str, tuple[Callable[[], Stage], tuple[str, ...]]]:
    """The stages besides the main chain and the grid cells, by name, longest first: how to build
    each, and which of the pipeline's stages it needs. They are the checks' own stages (the Lemma 2
    PPO runs, the reward models at other label temperatures, the bandit convergence check; only with
    ``checks``: the checks read the first pipeline seed's), the DPO cell trained on shuffled labels
    (the implicit-reward check's control), and the grid's own preference data (an entry's
    ``preferences`` override, such as 4-wise rankings)."""
    config = bench.config
    builders: dict[str, tuple[Callable[[], Stage], tuple[str, ...]]] = {}
    task = bench.task_summary(stages["task"])
    if checks and config.checks.empirical and not task["exact"] and task["has_gold"]:
        builders["lemma2 PPO"] = (lambda: lemma2_ppo_stage(bench, stages), ("sft", "ref_eval"))
        if implicit_reward_cell(bench) is not None:
            # It labels the run's candidates anew: it starts once they exist, and waits for nothing else.
            builders["implicit reward control"] = (lambda: shuffled_label_dpo(bench, stages), ("sft", "ref_eval", "candidates"))
    for t in config.checks.label_temperatures if checks else ():
        builders[f"reward model T={t:g}"] = (lambda t=float(t): label_temperature_rm(bench, stages, t), ("sft", "candidates"))
    for cell in config.cells():
        name = f"preferences {cell.display_name}"
        if cell.preferences and get_method(cell.method).needs & {"preferences", "rankings"} and name not in builders:
            builders[name] = (lambda cell=cell: variant_preferences_job(bench, stages, cell), ("sft", "ref_eval"))
    if checks:
        # On the bandit task the check starts from the run's own SFT table; on any other, from the bandit config's tables.
        builders["bandit convergence"] = (lambda: bandit_convergence_stage(bench, stages), ("sft",) if task["exact"] else ())
    return builders


# Jobs that are short and need nothing the grid's cells need: a parallel run queues them after the
# cells, so that they take a worker the last cells leave idle rather than one the pipelines need.
FILLER_JOBS = frozenset({"bandit convergence"})


def worker_jobs(bench: Bench, stages: dict, checks: bool = True) -> list[str]:
    """The names of the jobs (see ``_job_builders``) whose inputs ``stages`` holds, longest first. A
    parallel run computes them on the task runner beside the main chain and the grid; the report
    and the cells then read them from the store."""
    return [name for name, (_, needs) in _job_builders(bench, stages, checks).items() if all(n in stages for n in needs)]


def check_stage(bench: Bench, stages: dict, job: str) -> Stage:
    """A job's stage: the one this run already built (``stages["job:<name>"]``, e.g. on a Dask
    worker, so that ``--no-cache`` does not build it twice), or built now."""
    return stages.get(f"job:{job}") or run_job(bench, stages, job)


def run_job(bench: Bench, stages: dict, job: str) -> Stage:
    return _job_builders(bench, stages)[job][0]()


# --- the checks of a run ---------------------------------------------------------------------------


def bandit_reference(bench: Bench, stages: dict) -> tuple[np.ndarray, np.ndarray]:
    """(π_ref (X, Y), gold reward (X, Y)) of the convergence check: the run's own bandit, or the bandit config's tables."""
    task = bench.task(stages["task"])
    if task.exact:
        return task.response_probs(bench.reference(stages["sft"])), task.rewards
    bandit: BanditConfig = bench.config.bandit
    rewards, logits = bandit_tables(bandit)
    ref_probs = np.exp(logits - logits.max(1, keepdims=True))
    return ref_probs / ref_probs.sum(1, keepdims=True), rewards


def bandit_convergence_stage(bench: Bench, stages: dict) -> Stage:
    """The bandit convergence check's rows (:func:`~dpo_bench.invariance.bandit_checks`): a stage of its
    own, so that a parallel run computes it on a worker beside the grid rather than after it."""
    config = bench.config
    seed = derive_seed(config.seed, "bandit_convergence")
    exact = bench.task_summary(stages["task"])["exact"]
    tables = {"sft": stages["sft"].key} if exact else {"bandit": to_dict(config.bandit)}

    def build(out: Path) -> None:
        rows = [r.row() for r in bandit_checks(*bandit_reference(bench, stages), config.checks, seed)]
        write_parquet(pd.DataFrame(rows, columns=COLUMNS), out / "checks.parquet")

    return bench.run_stage("bandit_checks", {**tables, "checks": to_dict(config.checks), "seed": seed}, build)


def run_invariance_checks(bench: Bench, stages: dict, cells: list | None = None) -> pd.DataFrame:
    """Every check this run's data supports, as rows of ``invariance.parquet``."""
    config = bench.config
    bandit = pd.read_parquet(check_stage(bench, stages, "bandit convergence").path / "checks.parquet")
    results: list[CheckResult] = []
    task = bench.task(stages["task"])
    # The empirical checks compare against a gold reward: a task judged only by a proxy has none to compare with.
    if config.checks.empirical and not task.exact and task.has_gold:
        checked = implicit_reward_control(bench, stages, cells or [])
        if checked is not None:
            (cell, stage), control = checked
            results += implicit_reward_checks(cell.label, cell.strength_value, implicit_reward_data(bench, stages, cell, stage),
                                              implicit_reward_data(bench, stages, cell, control), config.checks.spearman_threshold)
            accuracy = reward_model_heldout_accuracy(bench, stages)
            if accuracy is not None:
                results.append(CheckResult.finding("reward_model_accuracy", "held-out pairwise accuracy of the reward model "
                                                   "on the implicit-reward check's pairs", accuracy))
        frames, curves = lemma2_ppo(bench, stages)
        results += lemma2_empirical(frames, config.checks.lemma2_margin_fraction)
        results += lemma2_speed(curves)
    rows = pd.DataFrame([r.row() for r in results], columns=COLUMNS)
    return pd.concat([bandit, rows], ignore_index=True) if len(rows) else bandit
