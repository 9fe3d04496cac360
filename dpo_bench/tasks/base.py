"""The task interface: what a benchmark task provides to every stage, and the task registry.

A task owns its tokenizer, its train and eval prompts, its gold scorer, how to encode prompts
and completions, and how to build the reference policy. Methods and evaluation see only this
interface, so a method written once runs on the sentiment, bandit and hf tasks alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..generation import truncated

TASKS: dict[str, type["Task"]] = {}


def register_task(cls: type["Task"]) -> type["Task"]:
    TASKS[cls.name] = cls
    return cls


def get_task_class(name: str) -> type["Task"]:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


class Task(ABC):
    """A prepared benchmark task. Construction is cheap once :meth:`prepare` has written ``workdir``."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    #: True when expected reward, KL and the optimum are computed exactly (the bandit).
    exact: ClassVar[bool] = False
    #: Completion length cap when sampling.
    max_new_tokens: int
    #: True when ``gold`` is the task's ground truth. A task judged by a proxy (``hf`` with the
    #: learned reward model, or with a judge not declared gold) sets it False, and evaluation
    #: then names its scores ``judge_reward``: a ``gold_reward`` only ever comes from a gold scorer.
    has_gold: bool = True
    #: True when a completion is meant to end with EOS, so that one cut at ``max_new_tokens``
    #: without it is truncated (reported, and penalised by PPO); the bandit's one-token responses
    #: have no EOS to emit.
    ends_with_eos: ClassVar[bool] = True
    #: Where the task's own models (a judge, a pretrained policy) run; the stages set it.
    device: torch.device = torch.device("cpu")

    def __init__(self, config: Any, workdir: Path):
        self.config = config
        self.workdir = Path(workdir)

    @classmethod
    def source_fingerprint(cls, config: Any) -> dict[str, str]:
        """Fingerprints of local files the task reads (a data file, a model directory), so the
        task stage's cache key changes when they do; tasks that read nothing return {}."""
        return {}

    @classmethod
    def summary(cls, config: Any, workdir: Path) -> dict[str, Any]:
        """What a run records about the prepared task, ideally without loading it (no tokenizer,
        no models: a cached run then need not import transformers): ``fingerprints`` of its data
        and ``has_gold``. This default loads the task; tasks override it to read their files."""
        task = cls(config, workdir)
        return {"fingerprints": dict(getattr(task, "fingerprints", {})), "has_gold": task.has_gold}

    @classmethod
    def load_model(cls, config: Any, directory: Path, device: torch.device) -> nn.Module:
        """Load a policy saved by :func:`~dpo_bench.policy.save_policy` (the reference); tasks with
        runtime options that checkpoints do not keep (gradient checkpointing) apply them here."""
        from ..policy import load_policy

        return load_policy(directory, device)

    @classmethod
    @abstractmethod
    def prepare(cls, config: Any, workdir: Path) -> None:
        """Generate or load everything the task needs (corpus, tokenizer, prompts) into ``workdir``."""

    # --- text <-> tokens ---
    tokenizer: Any
    train_prompts: list[str]
    eval_prompts: list[str]  # the test prompts: every reported number is theirs
    #: Prompts where a method's best setting is chosen, disjoint from the test prompts; a task
    #: without them has the frontier's settings chosen on the test prompts (the report says so).
    val_prompts: list[str] = []

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @abstractmethod
    def encode_prompt(self, prompt: str) -> list[int]: ...

    @abstractmethod
    def encode_completion(self, completion: str) -> list[int]: ...

    @abstractmethod
    def decode_completion(self, ids: Sequence[int]) -> str: ...

    def truncated(self, completion_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """(B,) bool: the sampled completions cut at ``max_new_tokens`` without EOS (none, where a
        completion does not end with one)."""
        if not self.ends_with_eos:
            return np.zeros(len(completion_ids), dtype=bool)
        return truncated(completion_ids, self.eos_id, self.max_new_tokens)

    # --- scoring ---
    gold: Any  # reward.gold.GoldScorer, or None for a task without a scorer of its own

    @property
    def reward_metric(self) -> str:
        """The name evaluation gives the judge's scores: ``gold_reward`` only for a gold scorer."""
        return "gold_reward" if self.has_gold else "judge_reward"

    def judge(self, reward_model: Any = None) -> Any:
        """The scorer completions are judged by (evaluation, win rates, PPO-GT): the gold scorer
        unless a task overrides it. None when the judge is the learned reward model and
        ``reward_model`` is not given yet (the reference is evaluated before it is trained)."""
        return self.gold

    def fluency(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray | None:
        """Share-of-grammatical alarm; tasks without a grammar report every completion as fluent.
        A task that cannot judge fluency at all returns None, and no fluency is reported."""
        return np.ones(len(prompts), dtype=bool)

    # --- the preference data ---
    @classmethod
    def samples_preferences(cls, config: Any) -> bool:
        """Whether the preference data is sampled from the reference and labelled by the gold
        reward (the default). Its sampled candidates are then a stage of their own, which the
        reward models at other label temperatures share; a task with its own labelled data says no."""
        return True

    def preference_candidates(self, reference: nn.Module, config: Any, seed: int) -> Any:
        """K completions per train prompt sampled from ``reference``, with their gold rewards
        (a :class:`~dpo_bench.preferences.Candidates`; ``config`` is the run's PreferenceConfig)."""
        from ..preferences import sample_candidates

        return sample_candidates(self, reference, config, seed)

    def preference_frames(self, reference: nn.Module, config: Any, seed: int, candidates: Any = None) -> Any:
        """The preference data every method consumes (a :class:`~dpo_bench.preferences.PreferenceFrames`):
        by default ``candidates`` (sampled here when None) labelled by the gold reward at the
        config's label temperature; a task with its own preference data (``hf``) returns that instead."""
        from ..preferences import label_candidates

        if candidates is None:
            candidates = self.preference_candidates(reference, config, seed)
        return label_candidates(candidates, config, seed)

    # --- the reference policy ---
    @abstractmethod
    def reference_training_data(self) -> tuple[list[list[int]], list[list[int]]] | None:
        """(prompt ids, completion ids) for supervised fine-tuning of the reference, or None."""

    @abstractmethod
    def initial_model(self, seed: int) -> nn.Module:
        """The model SFT starts from (or the reference itself when there is no SFT data)."""

    def exact_evaluation(self, policy: Any, reference: nn.Module) -> dict[str, float] | None:
        """Exact gold reward, KL and win rate when the task can compute them (the bandit)."""
        return None

    def exact_frontier(self, reference: nn.Module, betas: Sequence[float]) -> list[dict[str, float]]:
        return []


def fingerprint_strings(strings: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in strings:
        h.update(s.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def as_tensor_lists(ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    return [torch.tensor(list(x), dtype=torch.long) for x in ids]
