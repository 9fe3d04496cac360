"""The method registry: what a method needs, its validated config, and how it trains.

A method is one file: a frozen config dataclass (fields documented with ``configs.field``) and a
``train(ctx, config) -> Policy`` function, registered with :func:`register_method`. Third-party
packages register methods through the entry point group ``dpo_bench.methods`` (the entry point
names a module or callable; importing it registers the method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from reward.normalise import Normaliser

from ..configs import ConfigError, from_dict
from ..frontier import best_of_n_kl_bound
from ..generation import Samples, sample
from ..logprobs import SequenceBatch, batched_sequence_logps, batched_token_kl
from ..precision import FP32, Precision
from ..training import CheckpointFn, TrainLog

Need = Literal["preferences", "rankings", "reward_model", "gold"]

Role = Literal["reference", "rlhf", "direct", "oracle", "inference", "baseline"]
"""What a method is in the verdict: the reference; RLHF (PPO against the learned reward model); a
direct method trained on the preferences (the DPO family, and a researcher's own method by
default), which the verdict compares with RLHF; an oracle that optimises the gold reward; an
inference-time baseline (best-of-N); or a supervised baseline (Preferred-FT, Unlikelihood)."""


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``strength`` names the config field a sweep varies (β, kl_coef, n, α); ``stronger_when``
    says whether a larger value of it regularises toward the reference more ("higher", as β
    and kl_coef), less ("lower", as N of best-of-N), or whether it is no KL regulariser at all
    (None, as SimPO's β, which has no reference to stay near). ``data_parallel``: its training
    runs on the ranks of ``nproc_per_cell`` (:mod:`dpo_engine.distributed`; every trainer on
    :func:`~dpo_bench.training.optimise` does); other methods train in one process.
    """

    name: str
    description: str
    config_cls: type
    train: Callable[["MethodContext", Any], "Policy"]
    needs: frozenset[str] = frozenset()
    strength: str | None = None
    stronger_when: Literal["higher", "lower"] | None = "higher"
    role: Role = "direct"
    data_parallel: bool = False

    def make_config(self, overrides: dict | None = None, strength: float | None = None) -> Any:
        data = dict(overrides or {})
        if strength is not None:
            if self.strength is None:
                raise ConfigError(f"method '{self.name}' has no strength parameter to sweep")
            value = strength
            # An integer strength (best-of-N's N) stays an integer.
            if isinstance(getattr(self.config_cls(), self.strength), int) and float(value).is_integer():
                value = int(value)
            data[self.strength] = value
        return from_dict(self.config_cls, data, f"methods.{self.name}")


METHODS: dict[str, Method] = {}
_LOADED_ENTRY_POINTS: set[str] = set()


def register_method(
    name: str,
    *,
    description: str,
    config: type,
    needs: Sequence[str] = (),
    strength: str | None = None,
    stronger_when: Literal["higher", "lower"] | None = "higher",
    role: Role = "direct",
    data_parallel: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``train(ctx, config) -> Policy`` as method ``name`` (``role``: see
    :data:`Role`; ``data_parallel``: see :class:`Method`)."""

    def wrap(train: Callable) -> Callable:
        if strength is not None and strength not in config.__dataclass_fields__:
            raise ValueError(f"method '{name}': strength '{strength}' is not a field of {config.__name__}")
        METHODS[name] = Method(name, description, config, train, frozenset(needs), strength, stronger_when, role, data_parallel)
        return train

    return wrap


def load_plugins() -> None:
    """Import every ``dpo_bench.methods`` entry point not imported yet, so their methods register."""
    for ep in entry_points(group="dpo_bench.methods"):
        if ep.value not in _LOADED_ENTRY_POINTS:
            _LOADED_ENTRY_POINTS.add(ep.value)
            ep.load()


def get_method(name: str) -> Method:
    if name not in METHODS:
        load_plugins()
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# --- what a method receives -----------------------------------------------------------------


@dataclass
class PreferenceTensors:
    """The preference data as token ids, with reference log-probs computed once.

    Pairs: ``chosen``/``rejected`` batches (N pairs). Rankings (when K > 2 data exists):
    ``ranked`` holds K batches, ranked best first, for the same ``ranking_prompts``.
    """

    prompts: list[str]
    chosen: SequenceBatch
    rejected: SequenceBatch
    ref_chosen_logps: torch.Tensor  # (N,)
    ref_rejected_logps: torch.Tensor  # (N,)
    ranked: list[SequenceBatch] | None = None
    ref_ranked_logps: torch.Tensor | None = None  # (M, K)
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


class SharedStore(Protocol):
    """Tensors that cells share: the cells of a run with the same upstream stages and replicate
    seed read what the first of them built (``stages.StoreShared``, on the stage store). For work
    that does not depend on the cell's strength, such as best-of-N's reference draws."""

    seed: int  # the same for those cells; another replicate seed gets another

    def tensors(self, name: str, key: dict, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]: ...


class Policy(Protocol):
    """What evaluation needs from a trained method."""

    def sample(self, prompt_ids: Sequence[Sequence[int]], *, generator: torch.Generator, temperature: float) -> Samples: ...


@dataclass
class MethodContext:
    """Everything a method's ``train`` may use. Methods never build these themselves."""

    task: Any  # tasks.base.Task
    reference: nn.Module  # frozen; copy it to get a trainable policy
    device: torch.device
    seed: int
    generator: torch.Generator
    checkpoint: CheckpointFn  # call at each evaluation step with the current policy
    n_checkpoints: int
    log: TrainLog = field(default_factory=TrainLog)
    preferences: PreferenceTensors | None = None
    reward_model: Any = None  # reward.model.RewardModel: raw .score and normalised .normalised_score (input_ids, attention_mask)
    gold_scores: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None
    # The gold scores' mean and std on the SFT samples the reward model's normaliser was fitted on
    # (reward.normalise.Normaliser); None where no reward-model stage fitted one.
    gold_normaliser: Normaliser | None = None
    freeze_blocks: int = 0
    freeze_embeddings: bool = False
    progress: bool = True
    label: str = ""
    shared: SharedStore | None = None  # None: nothing is shared (each cell draws its own)
    # The forward passes' mixed precision (dpo_bench.precision): the run's, resolved for its device.
    precision: Precision = FP32

    def sample(self, model: nn.Module, prompt_ids: Sequence[Sequence[int]], temperature: float = 1.0) -> Samples:
        return sample(
            model, prompt_ids, max_new_tokens=self.task.max_new_tokens, eos_id=self.task.eos_id,
            pad_id=self.task.pad_id, generator=self.generator, temperature=temperature,
        )

    def train_prompt_ids(self) -> list[list[int]]:
        return [self.task.encode_prompt(p) for p in self.task.train_prompts]


class ModelPolicy:
    """A policy that is a language model: samples come from it, its log-probs give the KL."""

    def __init__(self, model: nn.Module, task: Any):
        self.model = model
        self.task = task

    def sample(self, prompt_ids: Sequence[Sequence[int]], *, generator: torch.Generator, temperature: float) -> Samples:
        return sample(
            self.model, prompt_ids, max_new_tokens=self.task.max_new_tokens, eos_id=self.task.eos_id,
            pad_id=self.task.pad_id, generator=generator, temperature=temperature,
        )

    def sequence_logps(self, batch: SequenceBatch) -> torch.Tensor:
        return batched_sequence_logps(self.model, batch)

    def kl_estimate(self, samples: Samples, reference: nn.Module) -> np.ndarray:
        """Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) per sample (B,): on the policy's own samples, an
        unbiased, non-negative estimate of the sequence KL (:func:`~dpo_bench.logprobs.batched_token_kl`)."""
        return batched_token_kl(self.model, reference, samples.batch).numpy()

    def analytic_kl(self) -> float | None:
        """An upper bound on the KL known without sampling (best-of-N's); None for a trained model."""
        return None

    def distribution(self, context_ids: torch.Tensor) -> torch.Tensor:
        """Exact π(·|x) for single-token contexts (the bandit's tabular policy)."""
        with torch.no_grad():
            return self.model.probabilities(context_ids.to(next(self.model.parameters()).device)).cpu()


def best_of_n_kl(n: int) -> float:
    """log N − (N−1)/N (Stiennon et al. 2020): an upper bound on the KL of best-of-N sampling from the
    reference, exact for a continuous reward distribution (:func:`~dpo_bench.frontier.best_of_n_kl_bound`)."""
    return best_of_n_kl_bound(n)
