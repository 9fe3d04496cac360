"""Judges: what scores completions when a task has no gold reward.

The built-in tasks are judged by their ground truth (VADER on ``sentiment``, the exact table on
``bandit``). A task built from someone's model and data (``hf``) has none, so its judge is
configurable:

``reward_model``
    the Bradley-Terry reward model this run learned. A proxy: PPO optimises this very model, so
    judging by it flatters PPO, and the report says so.
``classifier``
    a sequence-classification model from the hub or a local directory: a published reward model,
    or a sentiment classifier as in the DPO paper; the score is one output's logit.
any other name
    a Python callable ``score(prompts, completions) -> scores`` registered by a package in the
    entry-point group ``dpo_bench.judges`` (an object with a ``score`` method works too).

Only a judge the config declares to be the task's ground truth reports ``gold_reward``; every
other judge's scores are reported as ``judge_reward``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Sequence

import numpy as np
import torch

JUDGE_GROUP = "dpo_bench.judges"
BUILTIN_JUDGES = {
    "reward_model": "the reward model this run learned (a proxy, and the one PPO optimises)",
    "classifier": "a sequence-classification model (hub id or directory), one output's logit",
}


class Judge(ABC):
    """Scores completions of prompts; ``score`` returns float64 of shape (n,).

    ``is_gold`` is True only for a judge that is the task's ground truth; it decides whether
    evaluation reports ``gold_reward`` or ``judge_reward``.
    """

    name: str = "judge"
    is_gold: bool = False
    description: str = ""

    @abstractmethod
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray: ...


def as_scores(values: Any, n: int, judge: str) -> np.ndarray:
    """Scores as float64 of shape (n,), or an error naming the judge."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    scores = np.asarray(values, dtype=np.float64).reshape(-1) if np.ndim(values) else np.asarray([values], dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"judge '{judge}' returned {scores.shape[0]} scores for {n} completions")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"judge '{judge}' returned a non-finite score")
    return scores


def _check_inputs(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


class CallableJudge(Judge):
    """A registered Python callable ``fn(prompts, completions) -> scores``."""

    def __init__(self, name: str, fn: Callable[[list[str], list[str]], Any], is_gold: bool = False, description: str = ""):
        self.name, self.fn, self.is_gold = name, fn, is_gold
        self.description = description or f"the registered judge '{name}'"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        _check_inputs(prompts, completions)
        return as_scores(self.fn(list(prompts), list(completions)), len(prompts), self.name)


class RewardModelJudge(Judge):
    """The run's learned reward model r(x, y), on the texts re-encoded the task's way."""

    name = "reward_model"
    is_gold = False
    description = "the learned reward model (a proxy for the true reward, and the reward PPO optimises)"

    def __init__(self, reward_model: Any, task: Any, batch_size: int = 256):
        self.reward_model, self.task, self.batch_size = reward_model, task, batch_size

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        from .logprobs import collate

        _check_inputs(prompts, completions)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            p = prompts[start:start + self.batch_size]
            c = completions[start:start + self.batch_size]
            batch = collate([self.task.encode_prompt(x) for x in p], [self.task.encode_completion(y) for y in c], self.task.pad_id)
            out.append(self.reward_model.score(batch.input_ids, batch.attention_mask).double().numpy())
        return as_scores(np.concatenate(out) if out else np.zeros(0), len(prompts), self.name)


class ClassifierJudge(Judge):
    """A sequence-classification model scoring ``prompt + completion``: the logit of ``label``.

    ``label`` is a label name of the model (``POSITIVE``) or an output index; empty means the
    model's only output (a reward model). Long texts are cut from the left, so the completion,
    which is what differs between policies, is always read.
    """

    def __init__(
        self,
        model: str,
        label: str = "",
        *,
        is_gold: bool = False,
        revision: str | None = None,
        trust_remote_code: bool = False,
        safetensors_only: bool = True,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .policy import _quiet_transformers

        _quiet_transformers()
        self.name, self.is_gold, self.batch_size = f"classifier:{model}", is_gold, batch_size
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
            use_safetensors=True if safetensors_only else None,
        ).to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            # Decoder classifiers (GPT-2) find each row's last token through the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        self.index = classifier_output(self.model.config, label, model)
        limit = self.tokenizer.model_max_length
        self.max_length = limit if limit < 1_000_000 else getattr(self.model.config, "max_position_embeddings", 512)
        label_name = (getattr(self.model.config, "id2label", None) or {}).get(self.index, str(self.index))
        self.description = f"the classifier {model}, logit of output {label_name}"

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        _check_inputs(prompts, completions)
        texts = [p + c for p, c in zip(prompts, completions)]
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(self.model(**enc).logits[:, self.index].double().cpu().numpy())
        return as_scores(np.concatenate(out) if out else np.zeros(0), len(texts), self.name)


def classifier_output(config: Any, label: str, model: str = "the classifier") -> int:
    """The output index a classifier judge reads: by label name, by number, or the only one."""
    n = int(getattr(config, "num_labels", 1))
    if label == "":
        if n != 1:
            names = ", ".join(str(v) for v in (getattr(config, "id2label", None) or {}).values())
            raise ValueError(f"{model} has {n} outputs ({names}); set judge_label to the one that is the reward")
        return 0
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if label in label2id and label2id[label] < n:
        return label2id[label]
    if label.isdigit() and int(label) < n:
        return int(label)
    raise ValueError(f"judge_label '{label}' is not an output of {model}; its labels: {', '.join(label2id) or n}")


def judge_entry_points() -> dict[str, EntryPoint]:
    """Judges registered by installed packages: name -> entry point."""
    return {ep.name: ep for ep in entry_points(group=JUDGE_GROUP)}


def known_judges() -> list[str]:
    return list(BUILTIN_JUDGES) + sorted(set(judge_entry_points()) - set(BUILTIN_JUDGES))


def registered_judge(name: str, is_gold: bool = False) -> CallableJudge:
    """The judge an installed package registered under ``name`` in ``dpo_bench.judges``."""
    points = judge_entry_points()
    if name not in points:
        raise ValueError(f"unknown judge '{name}'; known judges: {', '.join(known_judges())}")
    target = points[name].load()
    fn = getattr(target, "score", target)
    if not callable(fn):
        raise TypeError(f"judge '{name}' ({points[name].value}) is not callable and has no score method")
    return CallableJudge(name, fn, is_gold=is_gold, description=f"the registered judge '{name}' ({points[name].value})")
