"""The benchmark's stages as plain functions over a content-addressed store.

Every expensive stage (task data, SFT, preference candidates and labels, reference log-probs,
reward model, reference evaluation, each grid cell, what cells share such as best-of-N's draws)
writes its outputs to ``<cache>/<stage>/<key>/``. The key
hashes the stage's resolved config, the keys of its upstream stages and the library's code
version, so a second run recomputes nothing, changing one method's β retrains only that cell,
and changing the SFT config retrains everything downstream. Outputs are built in a temporary
directory and renamed into place, so a run killed at any point leaves nothing half-written that
a later run would trust. Stages pass :class:`Stage` handles (a key and a path), never tensors,
so they cross process boundaries (Dask workers) and hash the same everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import pandas as pd
import torch

from reward.bradley_terry import bayes_ceiling, pairwise_accuracy
from reward.model import RewardModel
from reward.normalise import Normaliser
from reward.train import PairTensors, evaluate_reward_model, train_reward_model

from . import schema
from .bench import BenchConfig, Cell
from .configs import from_dict, to_dict
from .data import write_preferences
from .distributed import RankJob, Ranks, rank_device, ranks
from .evaluate import estimate_from_samples, wilson_interval
from .files import atomic_path, write_json
from .logprobs import SequenceBatch, batched_sequence_logps, collate
from .methods.base import MethodContext, ModelPolicy, PreferenceTensors, get_method
from .methods.sft import supervised_finetune
from .policy import (
    derive_seed, load_module, load_policy, load_tensors, resolve_device, save_module, save_policy, save_tensors, seed_everything,
)
from .policy_eval import ReferenceSamples, evaluate_policy, reference_samples
from .precision import Precision
from .preferences import Candidates, PreferenceConfig, shuffle_train_labels
from .tasks import get_task_class
from .training import CheckpointFn, NonFiniteLossError, TrainLog

log = logging.getLogger("dpo_bench")

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


METRIC_COLUMNS = list(schema.METRIC_COLUMNS)


def code_version() -> str:
    """Hash of the library's source: a code change invalidates every cached stage. The report
    package is left out: no stage reads it (its figures are cached on a hash of their own)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for base in (root, root.parent / "reward", root.parent / "dpo_engine"):
        for path in sorted(p for p in base.rglob("*.py") if (root / "report") not in p.parents):
            h.update(str(path.relative_to(base.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Stage:
    """A finished stage: its cache key and the directory holding its outputs."""

    name: str
    key: str
    path: Path
    cached: bool = False
    seconds: float = 0.0


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


_HOST = socket.gethostname().replace("-", "_")


def _remove_stale_builds(path: Path) -> None:
    """Delete the temporary build directories of ``path``'s stage left by killed processes of this host."""
    for tmp in path.parent.glob(f".{path.name}.tmp-{_HOST}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# The stage locks' directory in the cache (beside the stages' directories, not inside them).
LOCKS = ".locks"


@contextlib.contextmanager
def build_lock(lock_file: Path):
    """An exclusive lock while a stage is built: ``flock`` on ``lock_file`` (released by the OS if the
    holder dies). The lock files stay: removing one while another process waits on it would let a
    third lock a new file at once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        if fcntl is None:  # no flock on this platform: builds may repeat, the rename keeps one
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def process_alive(pid: int) -> bool:
    """Whether a process of this host has ``pid`` (one we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PROCESS_MEMO: dict[str, dict] = {}


def _process_memo(scope: str) -> dict:
    if scope not in _PROCESS_MEMO:
        _PROCESS_MEMO.clear()  # a worker holds one run's models at a time
    return _PROCESS_MEMO.setdefault(scope, {})


@dataclass
class Bench:
    """A resolved config plus where stages are cached: everything a stage function needs.

    Pickles small (config and paths); loaded models are memoised per process.
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

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_memo"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # A Dask worker unpickles a Bench for every cell it runs: one memo per process and cache
        # lets the task, reference and reward model load once per worker, not once per cell.
        # Memo keys are content-addressed stage keys, so sharing them across cells is safe.
        self._memo = _process_memo(f"{Path(self.cache_dir).resolve()}|{self.config.device}")

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

    def setup_threads(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)

    # --- the store ---
    def run_stage(self, name: str, key_data: dict, build: Callable[[Path], None]) -> Stage:
        key = stable_hash({"stage": name, "code": self.version, **key_data})[:24]
        path = Path(self.cache_dir) / name / key
        if (done := self._finished(name, key, path)) is not None:
            return done
        # One build at a time per stage across the processes of this machine (and of others, where the
        # shared filesystem honours flock): a Dask worker, a second run on the same cache or the flow
        # that asks for a stage another is building waits for it and reads it, instead of building
        # it again.
        with build_lock(Path(self.cache_dir) / LOCKS / name / f"{key}.lock"):
            if (done := self._finished(name, key, path)) is not None:
                return done
            return self._build(name, key, key_data, path, build)

    def _finished(self, name: str, key: str, path: Path) -> Stage | None:
        """The stage at ``path`` if it is complete and this run may read it, else None."""
        if (path / "_complete.json").exists():
            if self.use_cache:
                return Stage(name, key, path, cached=True)
            if self.built_this_run(path):
                return Stage(name, key, path, cached=False, seconds=0.0)
        return None

    def _build(self, name: str, key: str, key_data: dict, path: Path, build: Callable[[Path], None]) -> Stage:
        self.setup_threads()
        start = time.perf_counter()
        _remove_stale_builds(path)
        tmp = path.with_name(f".{key}.tmp-{_HOST}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        seconds = time.perf_counter() - start
        # pid and torch threads: where the stage ran (a Dask worker?) and with how many threads.
        write_json(tmp / "_complete.json", {"stage": name, "key": key, "seconds": seconds, "key_data": key_data,
                                            "pid": os.getpid(), "torch_threads": torch.get_num_threads()})
        if path.exists():
            if (path / "_complete.json").exists() and (self.use_cache or self.built_this_run(path)):
                # Another process built the same stage meanwhile (same key, same content): keep
                # theirs, which a third process may be reading.
                shutil.rmtree(tmp, ignore_errors=True)
                return Stage(name, key, path, cached=False, seconds=seconds)
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process built the same stage meanwhile (same key, same content): keep theirs.
            if not (path / "_complete.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return Stage(name, key, path, cached=False, seconds=seconds)

    def built_this_run(self, path: Path) -> bool:
        try:
            return (path / "_complete.json").stat().st_mtime >= self.started
        except FileNotFoundError:
            return False

    def memo(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = load()
        return self._memo[key]

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
        write_parquet(_train_rows(train_log, "sft", float("nan"), config.seed), out / "train_metrics.parquet")

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


def _train_rows(train_log: TrainLog, method: str, beta: float, seed: int) -> pd.DataFrame:
    rows = [
        {"method": method, "beta": beta, "seed": seed, "step": step, "temperature": float("nan"), "metric": name,
         "value": value, "stderr": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": n}
        for step, name, value, n in train_log.records
    ]
    return pd.DataFrame(rows, columns=METRIC_COLUMNS[2:])


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
        rows = _train_rows(train_log, "reward_model", float("nan"), config.seed)
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


def judged_reference_samples(bench: Bench, up: "Upstream", task: Any, judge: Any, temperature: float) -> ReferenceSamples:
    """The reference's eval completions with their judge's scores. A judge that is the learned
    reward model did not exist when the reference was evaluated, so it scores them here, once."""
    ref = load_reference_samples(up.ref_eval, temperature)
    if judge is None or np.isfinite(ref.gold).all():
        return ref
    key = ("judged_reference", up.ref_eval.key, up.reward_model.key if up.reward_model else None, temperature)
    return bench.memo(key, lambda: ReferenceSamples(temperature, ref.completions, judge.score(task.eval_prompts, ref.completions)))


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
        train = _train_rows(ctx.log, name, strength, cell.seed)
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


def built_threads(stage: Stage) -> int | None:
    """The torch thread count the stage was built with. Its numbers depend on it at float level
    (the order of parallel sums), so a run records it; the cache key leaves it out."""
    try:
        return json.loads((stage.path / "_complete.json").read_text()).get("torch_threads")
    except (OSError, ValueError):
        return None


# --- the empirical checks' stages (invariance.py turns their outputs into checks) ----------------


def implicit_reward_data(bench: Bench, stages: dict, cell: Cell, stage: Stage) -> "ImplicitRewards":
    """For a trained DPO-like cell: implicit rewards β·log π/π_ref of the held-out pairs, and of K reference
    samples per held-out prompt next to their gold rewards (for the within-prompt correlation)."""
    from .invariance import ImplicitRewards

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
    from .generation import sample

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
    from .invariance import prompt_shift

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
    each, and which of the pipeline's stages it needs. They are the empirical checks' own stages
    (the Lemma 2 PPO runs, the reward models at other label temperatures; only with ``checks``: the
    checks read the first pipeline seed's), the DPO cell trained on shuffled labels (the implicit-reward
    check's control), and the grid's own preference data (an entry's ``preferences`` override, such
    as 4-wise rankings)."""
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
    return builders


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
