"""The shared stages of one pipeline seed: the task's data, the SFT model, the preference data,
the reference's log-probs, the reward model and the reference's evaluation samples."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from dpo_engine.distributed import RankJob, Ranks, ranks
from dpo_engine.seeds import derive_seed
from reward.bradley_terry import bayes_ceiling, pairwise_accuracy
from reward.model import RewardModel
from reward.normalise import Normaliser
from reward.train import PairTensors, evaluate_reward_model, train_reward_model

from ..configs import to_dict
from ..data import write_preferences
from ..evaluate import estimate_from_samples, wilson_interval
from ..files import write_json
from ..logprobs import SequenceBatch, batched_sequence_logps, collate
from ..methods.base import PreferenceTensors
from ..methods.sft import supervised_finetune
from ..policy import load_tensors, save_module, save_policy, save_tensors, seed_everything
from ..policy_eval import ReferenceSamples, reference_samples
from ..preferences import Candidates, shuffle_train_labels
from ..stage_store import Stage, write_parquet
from ..tasks import get_task_class
from ..training import TrainLog
from .context import METRIC_COLUMNS, Bench, train_rows


# --- stage 1: the task's data ---------------------------------------------------------------


def prepare_task(bench: Bench) -> Stage:
    config = bench.config
    cls = get_task_class(config.task)
    key = {"task": config.task, "config": to_dict(config.task_config)}
    sources = cls.source_fingerprint(config.task_config)
    if sources:  # local files the task reads: editing them must invalidate the stage
        key["sources"] = sources
    return bench.run_stage("task", key, lambda out: cls.prepare(config.task_config, out))


# --- stage 2: the reference (SFT) model -------------------------------------------------------


def train_sft(bench: Bench, task_stage: Stage) -> Stage:
    config = bench.config
    seed = derive_seed(config.seed, "sft")

    def build(out: Path) -> None:
        with ranks(config.nproc_per_cell, RankJob(_sft_training, (bench, task_stage, seed, False)), bench.device):
            model, train_log = _sft_training(bench, task_stage, seed, bench.progress)
        save_policy(model, out / "model")
        write_parquet(train_rows(train_log, "sft", float("nan"), config.seed), out / "train_metrics.parquet")

    sft_data = to_dict(config.sft) if get_task_class(config.task).exact is False else {}
    return bench.run_stage("sft", {"task": task_stage.key, "sft": sft_data, "seed": seed,
                                   "precision": bench.precision.name, "ranks": config.nproc_per_cell}, build)


def _sft_training(bench: Bench, task_stage: Stage, seed: int, progress: bool) -> tuple[torch.nn.Module, TrainLog]:
    """The SFT model trained from its initial weights, and its training log: the stage's work on
    every rank (rank 0 writes it)."""
    task = bench.task(task_stage)
    seed_everything(seed)
    model = task.initial_model(seed).to(bench.device)
    data = task.reference_training_data()
    train_log = TrainLog()
    if data is not None:
        prompts, completions = data
        train_log.compute.start()  # the reference's training: a cost every cell shares
        supervised_finetune(
            model, prompts, completions, bench.config.sft, pad_id=task.pad_id,
            generator=torch.Generator().manual_seed(seed), log=train_log, label="SFT", progress=progress,
            precision=bench.precision,
        )
    return model, train_log


# --- stage 3: preference data -----------------------------------------------------------------


def samples_preferences(bench: Bench) -> bool:
    """Whether the run's preference data is sampled (and so has a candidates stage)."""
    return get_task_class(bench.config.task).samples_preferences(bench.config.task_config)


def build_candidates(bench: Bench, task_stage: Stage, sft: Stage) -> Stage:
    """The K completions per train prompt the preference labels are drawn from, with their gold
    rewards. Its key leaves out how they are labelled, so the reward models at other label
    temperatures label the same completions (and sample nothing)."""
    config = bench.config
    seed = derive_seed(config.seed, "preferences")
    sampling = {name: getattr(config.preferences, name) for name in Candidates.SAMPLING_FIELDS}

    def build(out: Path) -> None:
        candidates = bench.task(task_stage).preference_candidates(bench.reference(sft), config.preferences, seed)
        write_parquet(candidates.to_frame(), out / "candidates.parquet")

    return bench.run_stage("candidates", {"sft": sft.key, "sampling": sampling, "seed": seed}, build)


def build_preferences(bench: Bench, task_stage: Stage, sft: Stage, candidates: Stage | None = None) -> Stage:
    """The labelled preference data: the candidates labelled at the config's label temperature, or
    the task's own data. ``candidates``: the stage built for this config's sampling fields (built
    here when None)."""
    config = bench.config
    seed = derive_seed(config.seed, "preferences")
    if candidates is None and samples_preferences(bench):
        candidates = build_candidates(bench, task_stage, sft)

    def build(out: Path) -> None:
        task = bench.task(task_stage)
        loaded = Candidates.from_frame(pd.read_parquet(candidates.path / "candidates.parquet")) if candidates else None
        frames = task.preference_frames(bench.reference(sft), config.preferences, seed, loaded)
        if config.preferences.shuffle_labels:
            frames = replace(frames, pairs=shuffle_train_labels(frames.pairs, np.random.default_rng(derive_seed(seed, "shuffle_labels"))))
        if frames.pairs.empty:
            raise ValueError("the preference data is empty: every sampled pair tied or repeated")
        info = {
            "preferences_fingerprint": write_preferences(frames.pairs, out / "preferences.parquet"),
            "n_pairs": len(frames.pairs), "n_prompts": frames.n_prompts,
            "n_dropped_ties": frames.n_dropped_ties, "n_dropped_repeats": frames.n_dropped_repeats,
            "n_heldout_pairs": int((frames.pairs["split"] == "heldout").sum()),
        }
        if frames.rankings is not None:
            info["rankings_fingerprint"] = write_preferences(frames.rankings, out / "rankings.parquet")
            info["n_rankings"] = len(frames.rankings)
        write_json(out / "info.json", info)

    return bench.run_stage("preferences", {"sft": sft.key, "candidates": candidates.key if candidates else None,
                                           "preferences": to_dict(config.preferences), "seed": seed}, build)


def preference_info(stage: Stage) -> dict:
    return json.loads((stage.path / "info.json").read_text())


def _pairs_frame(stage: Stage, split: str) -> pd.DataFrame:
    frame = pd.read_parquet(stage.path / "preferences.parquet")
    return frame[frame["split"] == split].reset_index(drop=True)


def _collate_texts(task, prompts, completions) -> SequenceBatch:
    return collate([task.encode_prompt(p) for p in prompts], [task.encode_completion(c) for c in completions], task.pad_id)


# --- stage 4: reference log-probs, computed once -----------------------------------------------


def reference_logps(bench: Bench, task_stage: Stage, sft: Stage, prefs: Stage) -> Stage:
    def build(out: Path) -> None:
        task, reference = bench.task(task_stage), bench.reference(sft)
        frame = _pairs_frame(prefs, "train")
        tensors = {
            "chosen": batched_sequence_logps(reference, _collate_texts(task, frame["prompt"], frame["chosen"])),
            "rejected": batched_sequence_logps(reference, _collate_texts(task, frame["prompt"], frame["rejected"])),
        }
        if (prefs.path / "rankings.parquet").exists():
            rankings = pd.read_parquet(prefs.path / "rankings.parquet")
            rankings = rankings[rankings["split"] == "train"]
            k = len(rankings["ranking"].iloc[0])
            tensors["ranked"] = torch.stack([
                batched_sequence_logps(reference, _collate_texts(task, rankings["prompt"], [r[j] for r in rankings["ranking"]]))
                for j in range(k)
            ], dim=1)
        save_tensors(tensors, out / "ref_logps.safetensors")

    return bench.run_stage("ref_logps", {"sft": sft.key, "preferences": prefs.key}, build)


def preference_tensors(bench: Bench, task_stage: Stage, prefs: Stage, ref: Stage) -> PreferenceTensors:
    def load() -> PreferenceTensors:
        task = bench.task(task_stage)
        frame = _pairs_frame(prefs, "train")
        logps = load_tensors(ref.path / "ref_logps.safetensors")
        ranked, ref_ranked = None, None
        if "ranked" in logps:
            rankings = pd.read_parquet(prefs.path / "rankings.parquet")
            rankings = rankings[rankings["split"] == "train"]
            k = logps["ranked"].shape[1]
            ranked = [_collate_texts(task, rankings["prompt"], [r[j] for r in rankings["ranking"]]) for j in range(k)]
            ref_ranked = logps["ranked"]
        return PreferenceTensors(
            prompts=list(frame["prompt"]),
            chosen=_collate_texts(task, frame["prompt"], frame["chosen"]),
            rejected=_collate_texts(task, frame["prompt"], frame["rejected"]),
            ref_chosen_logps=logps["chosen"], ref_rejected_logps=logps["rejected"],
            ranked=ranked, ref_ranked_logps=ref_ranked, fingerprint=preference_info(prefs)["preferences_fingerprint"],
        )

    return bench.memo(("prefs", prefs.key, ref.key), load)


def _pair_tensors(batch_w: SequenceBatch, batch_l: SequenceBatch) -> PairTensors:
    return PairTensors(batch_w.input_ids, batch_w.attention_mask, batch_l.input_ids, batch_l.attention_mask)


# --- stage 5: the reward model --------------------------------------------------------------------


def train_rm(bench: Bench, task_stage: Stage, sft: Stage, prefs: Stage) -> Stage:
    config = bench.config
    seed = derive_seed(config.seed, "reward_model")

    def build(out: Path) -> None:
        task = bench.task(task_stage)
        train = _pairs_frame(prefs, "train")
        heldout = _pairs_frame(prefs, "heldout")
        with ranks(config.nproc_per_cell, RankJob(_rm_training, (bench, task_stage, sft, prefs, seed, False)), bench.device):
            model, train_pairs, train_log = _rm_training(bench, task_stage, sft, prefs, seed, bench.progress)
        pairs = _pair_tensors_of(task)
        normalisers = fit_normalisers(task, model, sft_samples(train))
        model.set_normaliser(normalisers["reward_model"])
        normalisers["reward_model"] = model.normaliser  # as the model keeps it (float32)
        write_json(out / "normalisers.json", {
            "fitted_on": "the unique (prompt, completion) texts of the train pairs, chosen and rejected: SFT samples",
            **{name: n.to_dict() if n else None for name, n in normalisers.items()},
        })
        save_module(model, out / "reward_model.safetensors")
        rows = train_rows(train_log, "reward_model", float("nan"), config.seed)
        metric_rows = []
        tr_w, tr_l = evaluate_reward_model(model, train_pairs, task.pad_id)
        metric_rows.append(_accuracy_row("rm_train_accuracy", tr_w, tr_l))
        if len(heldout):
            r_w, r_l = evaluate_reward_model(model, pairs(heldout), task.pad_id)
            metric_rows.append(_accuracy_row("rm_accuracy", r_w, r_l))
            # Labels from outside (an hf dataset) carry no gold rewards, so no Bayes ceiling.
            if heldout[["gold_chosen", "gold_rejected"]].notna().all().all():
                ceiling = bayes_ceiling(heldout["gold_chosen"], heldout["gold_rejected"], config.preferences.label_temperature)
                metric_rows.append({"metric": "rm_bayes_ceiling", "value": ceiling, "stderr": float("nan"),
                                    "ci_low": float("nan"), "ci_high": float("nan"), "n": len(heldout)})
            metric_rows += _calibration_rows(r_w.numpy() - r_l.numpy())
        # Reward-model rows carry their labels' Bradley-Terry temperature in the temperature column.
        label_t = config.preferences.label_temperature
        extra = pd.DataFrame([{"method": "reward_model", "beta": float("nan"), "seed": config.seed, "step": 0, "temperature": label_t, **r}
                              for r in metric_rows])
        write_parquet(pd.concat([rows, extra], ignore_index=True)[METRIC_COLUMNS[2:]], out / "metrics.parquet")

    return bench.run_stage("reward_model", {"sft": sft.key, "preferences": prefs.key,
                                            "reward_model": to_dict(config.reward_model), "seed": seed,
                                            "precision": bench.precision.name, "ranks": config.nproc_per_cell}, build)


def _pair_tensors_of(task: Any) -> Callable[[pd.DataFrame], PairTensors]:
    """A frame of (prompt, chosen, rejected) texts as token tensors of the task."""
    return lambda f: _pair_tensors(_collate_texts(task, f["prompt"], f["chosen"]), _collate_texts(task, f["prompt"], f["rejected"]))


def _rm_training(bench: Bench, task_stage: Stage, sft: Stage, prefs: Stage, seed: int,
                 progress: bool) -> tuple[RewardModel, PairTensors, TrainLog]:
    """The reward model fitted to the train pairs, the pairs and the training log: the stage's
    training on every rank (rank 0 evaluates and writes it)."""
    task = bench.task(task_stage)
    seed_everything(seed)
    train_pairs = _pair_tensors_of(task)(_pairs_frame(prefs, "train"))
    model = RewardModel(bench.reference(sft)).to(bench.device)
    for p in model.parameters():
        p.requires_grad_(True)
    train_log = TrainLog()
    train_reward_model(
        model, train_pairs, bench.config.reward_model, pad_id=task.pad_id, generator=torch.Generator().manual_seed(seed),
        log=train_log.log, progress=progress, ranks=Ranks.current(), precision=bench.precision,
    )
    return model, train_pairs, train_log


def sft_samples(pairs: pd.DataFrame) -> pd.DataFrame:
    """The unique (prompt, completion) texts of preference pairs, chosen and rejected, in order of
    first appearance. The train pairs' completions are the SFT model's samples (the candidates
    they were labelled from), so the reward normalisers are fitted on them."""
    sides = [pairs[["prompt", side]].rename(columns={side: "completion"}) for side in ("chosen", "rejected")]
    return pd.concat(sides, ignore_index=True).drop_duplicates(ignore_index=True)


def fit_normalisers(task: Any, model: RewardModel, samples: pd.DataFrame) -> dict[str, Normaliser | None]:
    """r̂'s and the gold reward's normalisers, fitted on ``samples`` (:func:`sft_samples`): the
    reward model's raw scores, and the scores of the judge PPO-GT optimises (the gold reward; None
    when the task has no judge apart from this reward model). Raw accuracy and calibration are
    computed apart from them."""
    batch = _collate_texts(task, samples["prompt"], samples["completion"])
    raw = model.score(batch.input_ids, batch.attention_mask)
    judge = task.judge(model)
    gold = judge.score(list(samples["prompt"]), list(samples["completion"])) if judge is not None else None
    return {"reward_model": Normaliser.fit(raw.numpy()), "gold": Normaliser.fit(gold) if gold is not None else None}


def gold_normaliser(stage: Stage | None) -> Normaliser | None:
    """The gold reward's normaliser fitted when the reward-model ``stage`` was built (None without one)."""
    return fitted_normaliser(stage, "gold")


def fitted_normaliser(stage: Stage | None, scorer: str) -> Normaliser | None:
    """``scorer``'s normaliser ("gold" or "reward_model") fitted when the reward-model ``stage`` was
    built (None without one)."""
    if stage is None:
        return None
    data = json.loads((stage.path / "normalisers.json").read_text()).get(scorer)
    return Normaliser.from_dict(data) if data else None


def _accuracy_row(metric: str, r_w: torch.Tensor, r_l: torch.Tensor) -> dict:
    outcomes = ((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).numpy()
    est = estimate_from_samples(outcomes)
    low, high = wilson_interval(float(outcomes.mean()), len(outcomes))
    return {"metric": metric, "value": pairwise_accuracy(r_w, r_l), "stderr": est.stderr, "ci_low": low, "ci_high": high, "n": len(outcomes)}


def _calibration_rows(margins: np.ndarray, n_bins: int = 5) -> list[dict]:
    """Reliability of σ(r_w − r_l) as P(chosen wins): per predicted-probability bin, the share won.

    Each held-out pair appears in both orders (margin and −margin), so every bin has outcomes.
    """
    predicted = 1 / (1 + np.exp(-np.concatenate([margins, -margins])))
    won = np.concatenate([np.ones_like(margins), np.zeros_like(margins)])
    edges = np.linspace(0, 1, n_bins + 1)
    rows = []
    for b in range(n_bins):
        in_bin = (predicted >= edges[b]) & (predicted < edges[b + 1] if b < n_bins - 1 else predicted <= 1)
        n = int(in_bin.sum())
        if n == 0:
            continue
        p = float(won[in_bin].mean())
        low, high = wilson_interval(p, n)
        rows.append({"metric": "rm_calibration", "step": b, "temperature": float(predicted[in_bin].mean()),
                     "value": p, "stderr": float("nan"), "ci_low": low, "ci_high": high, "n": n})
    return rows


# --- stage 6: the reference's eval samples ----------------------------------------------------------


def reference_eval(bench: Bench, task_stage: Stage, sft: Stage) -> Stage:
    config = bench.config

    def build(out: Path) -> None:
        task, reference = bench.task(task_stage), bench.reference(sft)
        for t in config.evaluation.temperatures:
            ref = reference_samples(task, reference, t, derive_seed(config.seed, "reference_eval", t))
            write_parquet(pd.DataFrame({"completion": ref.completions, "gold": ref.gold}), out / f"reference_T{t:g}.parquet")
        frontier = task.exact_frontier(reference, np.geomspace(0.01, 100, 60))
        rows = [{"method": "optimum", "beta": f["beta"], "seed": config.seed, "step": 0, "temperature": 1.0, "metric": m,
                 "value": f[m], "stderr": 0.0, "ci_low": f[m], "ci_high": f[m], "n": 1}
                for f in frontier for m in ("gold_reward", "kl")]
        write_parquet(pd.DataFrame(rows, columns=METRIC_COLUMNS[2:]), out / "metrics.parquet")

    return bench.run_stage("reference_eval", {"sft": sft.key, "temperatures": list(config.evaluation.temperatures),
                                              "seed": config.seed}, build)


def load_reference_samples(stage: Stage, temperature: float) -> ReferenceSamples:
    frame = pd.read_parquet(stage.path / f"reference_T{temperature:g}.parquet")
    return ReferenceSamples(temperature, list(frame["completion"]), frame["gold"].to_numpy())
