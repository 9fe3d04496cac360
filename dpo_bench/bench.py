"""The benchmark's configuration and the grid it expands to.

A :class:`BenchConfig` is what ``dpo-bench run`` resolves from a preset, a TOML file and CLI
flags; it is frozen, validated on construction (every error names its field), and saved with
every run.
"""

from __future__ import annotations

import functools
import re
import tomllib
import warnings
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from reward.train import RewardTrainConfig

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .configs import ConfigError, TRLNameNote, field, from_dict, non_negative, to_dict, translate_trl_names
from .precision import PRECISIONS
from .methods.base import METHODS, get_method, load_plugins
from .methods.sft import SFTConfig
from .invariance import ChecksConfig
from .policy_eval import EvalConfig
from .preferences import PreferenceConfig
from .presets import preset_names
from .schema import STRENGTH_SYMBOLS
from .tasks import TASK_CONFIGS, get_task_class
from .verdict import VerdictConfig


@dataclass(frozen=True)
class GridEntry:
    """One method of the grid: its strength values and config overrides."""

    method: str = field("", "registered method name (see `dpo-bench methods`)")
    values: tuple[float, ...] = field((), "values of the method's strength parameter to sweep (empty: its default)")
    config: dict[str, Any] = field(default_factory=dict, doc="overrides of the method's config fields")
    name: str = field("", "name in reports and metrics (default: the method); give variants of one method distinct names")
    preferences: dict[str, Any] = field(
        default_factory=dict, doc="overrides of [preferences] for this entry's own preference data (e.g. k = 4, n_prompts = 3000)"
    )
    freeze_blocks: int | None = field(None, "overrides the run's freeze_blocks for this entry")
    freeze_embeddings: bool | None = field(None, "overrides the run's freeze_embeddings for this entry")

    def __post_init__(self) -> None:
        if not self.method:
            raise ConfigError("method: every grid entry needs a method name")
        # TRL's names in the overrides are stored as ours, so that run.json and the cells' keys read
        # alike however the entry was written.
        config = dict(self.config)
        if "loss_type" in config:
            object.__setattr__(self, "method", trl_loss_method(self.method, config))
        names = [f.name for f in fields(get_method(self.method).config_cls)]
        object.__setattr__(self, "config", translate_trl_names(config, names, f"grid '{self.name or self.method}'.config"))
        if self.preferences:
            from_dict(PreferenceConfig, self.preferences, "preferences")
        if self.freeze_blocks is not None and self.freeze_blocks < 0:
            raise ConfigError(f"freeze_blocks must be >= 0, got {self.freeze_blocks}")
        method = get_method(self.method)
        if self.values and method.strength is None:
            raise ConfigError(f"values: method '{self.method}' has no strength parameter to sweep")
        # Validate the overrides and every value now, before anything runs.
        for value in self.values or (None,):
            method.make_config(self.config, value)


#: TRL DPOConfig's ``loss_type`` values and the methods that implement them here.
TRL_LOSS_TYPES = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "simpo": "simpo"}


def trl_loss_method(method: str, config: dict) -> str:
    """The method a ``dpo`` grid entry with TRL's ``loss_type`` in its config names (``config``
    loses the key); sigmoid with label smoothing is cDPO, as in TRL."""
    loss_type = config.pop("loss_type")
    if method != "dpo":
        raise ConfigError(f"loss_type is TRL's DPOConfig field; give it in an entry with method = 'dpo', not '{method}'")
    if loss_type not in TRL_LOSS_TYPES:
        raise ConfigError(f"loss_type '{loss_type}' has no method here; known: {', '.join(TRL_LOSS_TYPES)} "
                          "(see `dpo-bench methods`)")
    chosen = TRL_LOSS_TYPES[loss_type]
    smoothing = config.get("label_smoothing", config.get("epsilon", 0.0))
    if loss_type == "sigmoid":
        if smoothing:
            chosen = "cdpo"
        else:
            config.pop("label_smoothing", None)
    warnings.warn(TRLNameNote(f"grid entry 'dpo': loss_type = '{loss_type}' is TRL's; read as method = '{chosen}'"), stacklevel=4)
    return chosen


@dataclass(frozen=True)
class Cell:
    """One trained policy of the grid: (method, strength value, pipeline seed), with its entry's variant settings."""

    method: str
    value: float | None
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()
    name: str = ""
    preferences: tuple[tuple[str, Any], ...] = ()
    freeze_blocks: int | None = None
    freeze_embeddings: bool | None = None

    @property
    def display_name(self) -> str:
        """What metrics and reports call this cell's method (a grid entry's ``name``, else the method)."""
        return self.name or self.method

    @property
    def label(self) -> str:
        method = get_method(self.method)
        parts = [self.display_name]
        if method.strength is not None:
            symbol = STRENGTH_SYMBOLS.get(method.strength, method.strength)
            parts.append(f"{symbol}={self.strength_value:g}")
        parts.append(f"seed={self.seed}")
        return " ".join(parts)

    def config(self) -> Any:
        """The method's config, built from the entry's settings and strength (and validated) once per
        cell and then kept: every stage, rank and report of the cell reads the same object."""
        return self._method_config

    @functools.cached_property
    def _method_config(self) -> Any:
        return get_method(self.method).make_config(dict(self.overrides), self.value)

    def __getstate__(self) -> dict:
        # A method's config class may be made at run time (the DPO family's, from its loss), which
        # pickle cannot name: a cell crosses to a worker without it and builds it there.
        state = dict(self.__dict__)
        state.pop("_method_config", None)
        return state

    @property
    def strength_value(self) -> float:
        """The value the metrics record in their ``beta`` column (NaN for methods without one)."""
        method = get_method(self.method)
        if method.strength is None:
            return float("nan")
        return float(getattr(self.config(), method.strength))


@dataclass(frozen=True)
class QuestionsConfig:
    """Which grid entries answer the open questions of the DPO reading notes (report section)."""

    pl_listwise: str = field("", "grid entry (name) trained with dpo_pl on K-wise rankings")
    pl_pairwise: str = field("", "grid entry trained pairwise on as many labelled completions")
    freeze_frozen: str = field("", "grid entry trained with blocks frozen")
    freeze_base: str = field("", "the same method without freezing")


@dataclass(frozen=True)
class ReportConfig:
    """How the report draws what the run measured (a report rebuilt by `dpo-bench report` may choose again)."""

    curves_x: Literal["steps", "samples", "tokens", "seconds"] = field(
        "steps", "x-axis of the training-curves figure: optimiser steps, samples generated in training, tokens trained on, "
                 "or wall seconds of training (each cell's compute/ metrics), so methods are compared at equal compute")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking: the finished run logged to MLflow, TensorBoard or W&B (dpo_bench/tracking.py)."""

    backend: Literal["", "mlflow", "tensorboard", "wandb"] = field(
        "", "log the finished run (a parent run with a child per cell: config, fingerprints, curves, metrics at each "
            "checkpoint, the report) to 'mlflow', 'tensorboard' or 'wandb' (W&B: offline unless WANDB_MODE says "
            "otherwise; the `tracking` extra); empty: no tracking")
    uri: str = field("", "MLflow's tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's ./mlruns), TensorBoard's "
                         "log directory (default: <reports-dir>/tensorboard) or W&B's directory (default: "
                         "<reports-dir>/wandb)")
    experiment: str = field("dpo-bench", "the MLflow experiment, or W&B project, the runs are logged under")


# auto (see policy.resolve_device) or a device the benchmark runs on; torch.device accepts more (xla,
# hpu, ...) that nothing here supports, and would fail only when the first stage starts.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs; `dpo-bench run --config FILE.toml` reads this structure."""

    preset: str = field("custom", "name of the preset this config came from")
    task: str = field("sentiment", "benchmark task: sentiment (default, offline), bandit (exact, tabular) or hf (your model and data)")
    seed: int = field(0, "the pipeline seed when `seeds` is empty; every stage and cell derives its own seed from it")
    seeds: tuple[int, ...] = field((), "whole-pipeline seeds: each seed trains its own SFT model, samples and labels its own "
                                       "preference data, trains its own reward model and every cell; the report's intervals and "
                                       "tests are drawn between seeds (empty: the one seed `seed`)")
    device: str = field("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    threads: int = field(0, "torch threads per stage (0 = torch's default)")
    precision: str = field("auto", "mixed precision of training: fp32, bf16 or fp16 (autocast with float32 weights and "
                                   "optimiser; fp16 with loss scaling); auto: bf16 on a CUDA GPU that supports it, else fp32. "
                                   "Evaluation runs in float32")
    nproc_per_cell: int = field(1, "processes (ranks) that train each stage and cell together, data parallel on "
                                   "torch.distributed (gloo on the CPU, NCCL on GPUs, one GPU a rank): each its share of "
                                   "every batch, gradients summed before the step; 1 trains in one process")
    freeze_blocks: int = field(0, "fix the first n transformer blocks of every trained policy")
    freeze_embeddings: bool = field(False, "fix the token and position embeddings of every trained policy")
    sentiment: Any = field(default_factory=lambda: TASK_CONFIGS["sentiment"](), doc="the sentiment task")
    bandit: Any = field(default_factory=lambda: TASK_CONFIGS["bandit"](), doc="the exact bandit task")
    hf: Any = field(default_factory=lambda: TASK_CONFIGS["hf"](), doc="your own model and data (any transformers causal LM, TRL-format preferences)")
    sft: SFTConfig = field(default_factory=SFTConfig, doc="training the reference (SFT) model")
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig, doc="the preference data")
    reward_model: RewardTrainConfig = field(default_factory=RewardTrainConfig, doc="the Bradley-Terry reward model")
    evaluation: EvalConfig = field(default_factory=EvalConfig, doc="evaluation of every policy")
    checks: ChecksConfig = field(default_factory=ChecksConfig, doc="the invariance checks on trained models (the bandit convergence check, and the empirical ones)")
    questions: QuestionsConfig = field(default_factory=QuestionsConfig, doc="grid entries that answer the reading notes' questions")
    verdict: VerdictConfig = field(default_factory=VerdictConfig, doc="the frontier's KL budgets and the headline's verdict")
    report: ReportConfig = field(default_factory=ReportConfig, doc="how the report draws the run (the training curves' x-axis)")
    tracking: TrackingConfig = field(default_factory=TrackingConfig, doc="experiment tracking (MLflow, TensorBoard) of the finished run")
    grid: tuple[GridEntry, ...] = field((), "the methods to run")

    def __post_init__(self) -> None:
        if self.task not in TASK_CONFIGS:
            raise ConfigError(f"task: unknown task '{self.task}'; known tasks: {', '.join(sorted(TASK_CONFIGS))}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"device: unknown device '{self.device}'; use auto, cpu, cuda, cuda:N (N a GPU index) or mps")
        non_negative("threads", self.threads)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: unknown precision '{self.precision}'; use {', '.join(PRECISIONS)}")
        if self.nproc_per_cell < 1:
            raise ConfigError(f"nproc_per_cell: must be >= 1, got {self.nproc_per_cell}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: each seed may appear once, got {list(self.seeds)}")
        for s in self.seeds:
            non_negative("seeds", s)
        non_negative("freeze_blocks", self.freeze_blocks)
        if not self.grid:
            raise ConfigError("grid: the grid is empty; add at least one [[grid]] entry with a method")
        names = {c.display_name for c in self.cells()}
        for key in ("pl_listwise", "pl_pairwise", "freeze_frozen", "freeze_base"):
            value = getattr(self.questions, key)
            if value and value not in names:
                raise ConfigError(f"questions.{key}: no grid entry is named '{value}'; entries: {', '.join(sorted(names))}")
        labels = [c.label for c in self.cells()]
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise ConfigError(f"grid: cells appear twice: {', '.join(duplicates)}")
        if self.checks.label_temperatures and not get_task_class(self.task).samples_preferences(self.task_config):
            raise ConfigError("checks.label_temperatures: this task's preference data carries its own labels (hf data that "
                              "is not data_format = \"text\"), so they cannot be drawn at another temperature; remove it")
        if self.nproc_per_cell > 1:
            for cell in self.cells():
                rollouts, minibatches = (getattr(cell.config(), k, None) for k in ("rollout_batch", "n_minibatches"))
                share, left = divmod(rollouts or 0, self.nproc_per_cell)
                if rollouts is not None and (left or share < (minibatches or 1)):
                    raise ConfigError(f"grid ({cell.label}): rollout_batch = {rollouts} must split into nproc_per_cell = "
                                      f"{self.nproc_per_cell} equal shares of at least n_minibatches = {minibatches} rollouts")
        # A task may need more than valid fields to run (hf: a model, data, a judge for PPO-GT).
        check_runnable = getattr(self.task_config, "check_runnable", None)
        if check_runnable is not None:
            check_runnable(self.needs())

    @property
    def task_config(self) -> Any:
        return getattr(self, self.task)

    @property
    def pipeline_seeds(self) -> tuple[int, ...]:
        """The seeds of the run's whole pipelines, in the order they run."""
        return self.seeds or (self.seed,)

    def for_seed(self, seed: int) -> "BenchConfig":
        """The config of one pipeline: every stage of it reads ``seed``."""
        return replace(self, seed=seed, seeds=())

    def cells(self) -> list[Cell]:
        """Every cell of every pipeline seed, seed by seed in grid order."""
        out = []
        for seed in self.pipeline_seeds:
            for entry in self.grid:
                overrides = tuple(sorted(entry.config.items()))
                for value in entry.values or (None,):
                    out.append(Cell(entry.method, value, seed, overrides, entry.name, tuple(sorted(entry.preferences.items())),
                                    entry.freeze_blocks, entry.freeze_embeddings))
        return out

    def needs(self) -> set[str]:
        needed: set[str] = set()
        for entry in self.grid:
            needed |= get_method(entry.method).needs
        return needed

    def with_methods(self, names: list[str]) -> "BenchConfig":
        """Keep only the grid entries of ``names`` (each must be registered; absent ones get defaults)."""
        return from_dict_config(select_methods(self.to_dict(), names))

    def to_dict(self) -> dict:
        return to_dict(self)


def from_dict_config(data: dict) -> BenchConfig:
    """A :class:`BenchConfig` from plain data (a parsed TOML file, or ``run.json``'s config)."""
    # Task sections are typed by the task registry, which the dataclass annotation cannot name.
    data = dict(data)
    for name, config_cls in TASK_CONFIGS.items():
        if name in data and not isinstance(data[name], config_cls):
            data[name] = from_dict(config_cls, data[name], name)
    if "grid" in data:
        for i, e in enumerate(data["grid"]):
            if isinstance(e, dict) and "seeds" in e:
                raise ConfigError(f"grid[{i}].seeds: a seed is now a whole pipeline (its own SFT model, preference data and "
                                  f"reward model); set the top-level seeds = [...] instead")
        data["grid"] = [e if isinstance(e, GridEntry) else from_dict(GridEntry, e, f"grid[{i}]") for i, e in enumerate(data["grid"])]
    return from_dict(BenchConfig, data)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge plain config data; tables merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_data(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"preset: unknown preset '{name}'; known presets: {', '.join(names)}")
    data = tomllib.loads(resources.files("dpo_bench.presets").joinpath(f"{name}.toml").read_text())
    data.setdefault("preset", name)
    return data


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def select_methods(data: dict, names: list[str]) -> dict:
    """A config's plain data with only the grid entries of ``names`` (each must be registered;
    absent ones get defaults); the reference, every frontier's anchor, stays. Questions whose grid
    entries are gone are dropped: this run cannot answer them."""
    for name in names:
        get_method(name)
    names = list(dict.fromkeys(["sft", *names]))
    kept = [dict(e) for e in data.get("grid", []) if isinstance(e, dict) and e.get("method") in names]
    kept += [{"method": n} for n in names if n not in {e["method"] for e in kept}]
    entries = {e.get("name") or e["method"] for e in kept}
    questions = {k: (v if v in entries else "") for k, v in data.get("questions", {}).items()}
    return {**data, "grid": kept, **({"questions": questions} if "questions" in data else {})}


def load_config(preset: str | None = None, path: str | Path | None = None, overrides: dict | None = None,
                methods: list[str] | None = None) -> BenchConfig:
    """Preset, then the TOML file, then ``overrides`` (e.g. from CLI flags), merged in that order;
    then only the grid entries of ``methods``, if given, before the config is validated (so that a
    method left out cannot fail it).

    A preset or file may hold ``[task_overrides.<task>]`` tables: settings that apply only when
    that task runs (a table policy wants a learning rate a transformer would not survive). They
    apply right after their own preset or file, so a file overrides its preset's task settings.
    """
    base: dict = preset_data(preset) if preset else {}
    file_data: dict = {}
    if path:
        file_data = read_toml(path)
        # A file that names its own preset starts from it.
        if not preset and "preset" in file_data:
            base = preset_data(file_data["preset"])
    overrides = dict(overrides or {})
    task = overrides.get("task", file_data.get("task", base.get("task", "sentiment")))
    # Each layer's settings for the task apply right after that layer, so a file's keys override
    # the preset's task settings too (a file's own grid replaces the preset's bandit grid).
    data: dict = {}
    for layer in (base, file_data):
        data = _merge_replacing_grid(data, _one_seed(layer))
        data.pop("task_overrides", None)
        data = _merge_replacing_grid(data, _task_overrides(layer).get(task, {}))
    data = merge(data, _one_seed(overrides))
    try:
        return from_dict_config(select_methods(data, methods) if methods else data)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None


def _one_seed(layer: dict) -> dict:
    """A layer that names a ``seed`` but no ``seeds`` asks for that one pipeline, whatever seeds the
    layers below it ran."""
    return {**layer, "seeds": []} if "seed" in layer and "seeds" not in layer else layer


def _task_overrides(data: dict) -> dict:
    task_overrides = data.get("task_overrides", {}) or {}
    if not isinstance(task_overrides, dict) or any(not isinstance(v, dict) for v in task_overrides.values()):
        raise ConfigError("task_overrides: expected tables named after tasks, e.g. [task_overrides.bandit]")
    unknown = sorted(set(task_overrides) - set(TASK_CONFIGS))
    if unknown:
        raise ConfigError(f"task_overrides.{unknown[0]}: unknown task; known tasks: {', '.join(sorted(TASK_CONFIGS))}")
    return task_overrides


def _merge_replacing_grid(base: dict, override: dict) -> dict:
    out = merge(base, override)
    if "grid" in override:
        out["grid"] = override["grid"]
    return out


def known_methods() -> list[str]:
    load_plugins()
    return sorted(METHODS)
