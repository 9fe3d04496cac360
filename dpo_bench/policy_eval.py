"""Evaluating a policy at a checkpoint: gold reward, sequence KL to the reference, win rate
against the reference's completion for the same prompt, fluency, proxy reward, length.

Sampled estimates carry their standard errors; on an exact task (the bandit) gold reward, KL and
win rate are computed in closed form instead and reported with stderr 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection

import numpy as np
import pandas as pd
import torch
from torch import nn

from .configs import ConfigError, field, positive
from .evaluate import Estimate, estimate_from_samples, sequence_kl, win_rate
from .generation import sample
from .logprobs import batched_sequence_logps


@dataclass(frozen=True)
class EvalConfig:
    """How policies are evaluated."""

    n_checkpoints: int = field(4, "evaluations along each training run (its reward-KL curve)")
    temperatures: tuple[float, ...] = field((1.0,), "sampling temperatures; those other than 1 are evaluated at the final checkpoint only")
    n_saved_prompts: int = field(50, "eval prompts whose final completions are saved to samples.parquet")

    def __post_init__(self) -> None:
        positive("n_checkpoints", self.n_checkpoints)
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        if 1.0 not in self.temperatures:
            raise ConfigError("temperatures must include 1.0 (KL and the frontier are measured there)")


@dataclass(frozen=True)
class ReferenceSamples:
    """The reference's completions for the eval prompts at one temperature, with their judge's
    scores (the gold reward; NaN until a judge that is the learned reward model exists)."""

    temperature: float
    completions: list[str]
    gold: np.ndarray


def reference_samples(task, reference: nn.Module, temperature: float, seed: int) -> ReferenceSamples:
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = [task.encode_prompt(p) for p in task.eval_prompts]
    s = sample(reference, prompt_ids, max_new_tokens=task.max_new_tokens, eos_id=task.eos_id, pad_id=task.pad_id,
               generator=generator, temperature=temperature)
    completions = [task.decode_completion(c) for c in s.completion_ids]
    judge = task.judge()
    scores = judge.score(task.eval_prompts, completions) if judge is not None else np.full(len(completions), np.nan)
    return ReferenceSamples(temperature, completions, scores)


def _row(metric: str, est: Estimate) -> dict[str, Any]:
    return {"metric": metric, "value": est.value, "stderr": est.stderr, "ci_low": est.ci_low, "ci_high": est.ci_high, "n": est.n}


def exact_estimate(value: float, n: int = 1) -> Estimate:
    return Estimate(float(value), 0.0, float(value), float(value), n)


def evaluate_policy(
    policy: Any,
    *,
    task,
    reference: nn.Module,
    reference_samples: ReferenceSamples,
    reward_model: Any,
    generator: torch.Generator,
    temperature: float = 1.0,
    judge: Any = None,
    only: Collection[str] | None = None,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Metric rows (``metric, value, stderr, ci_low, ci_high, n``) and the per-prompt samples.

    Completions are judged by ``judge`` (default: the task's gold scorer). Its scores are named
    ``task.reward_metric``: ``gold_reward`` for a gold scorer, ``judge_reward`` for a proxy.
    ``only`` restricts the rows to these metrics and skips the forward passes the others need
    (the log-probs for the KL, the reward model for the proxy reward).
    """
    prompts = task.eval_prompts
    prompt_ids = [task.encode_prompt(p) for p in prompts]
    samples = policy.sample(prompt_ids, generator=generator, temperature=temperature)
    completions = [task.decode_completion(c) for c in samples.completion_ids]
    reward = task.reward_metric
    gold = (judge if judge is not None else task.gold).score(prompts, completions)
    fluent = task.fluency(prompts, completions)
    lengths = np.array([len(c) for c in samples.completion_ids], dtype=float)
    wanted = (lambda metric: True) if only is None else (lambda metric: metric in only)  # noqa: E731
    missing = np.full(len(prompts), np.nan)
    ref_logps, policy_logps = missing, missing
    if wanted("kl"):
        ref_logps = batched_sequence_logps(reference, samples.batch).numpy()
        policy_logps = policy.sequence_logps(samples.batch)
        policy_logps = missing if policy_logps is None else policy_logps.numpy()
    proxy = missing
    if reward_model is not None and wanted("proxy_reward"):
        proxy = reward_model.score(samples.batch.input_ids, samples.batch.attention_mask).numpy()

    rows = [
        _row(reward, estimate_from_samples(gold)),
        _row("win_rate", win_rate(gold, reference_samples.gold)),
        _row("fluency", estimate_from_samples(fluent.astype(float))) if fluent is not None else None,
        _row("length", estimate_from_samples(lengths)),
    ]
    rows = [r for r in rows if r is not None]
    if reward_model is not None:
        rows.append(_row("proxy_reward", estimate_from_samples(proxy)))
    if temperature == 1.0:
        if wanted("kl"):
            analytic = policy.analytic_kl()
            kl = exact_estimate(analytic, len(prompts)) if analytic is not None else sequence_kl(policy_logps, ref_logps)
            rows.append(_row("kl", kl))
        exact = task.exact_evaluation(policy, reference)
        if exact:
            # Closed forms replace the sampled estimates of the same quantities.
            rows = [r for r in rows if r["metric"] not in exact] + [_row(m, exact_estimate(v, len(prompts))) for m, v in exact.items()]
    rows = [r for r in rows if wanted(r["metric"])]
    frame = pd.DataFrame({
        "prompt": prompts, "completion": completions, reward: gold, "proxy_reward": proxy,
        "policy_logp": policy_logps, "ref_logp": ref_logps, "fluent": fluent if fluent is not None else np.nan,
        "ref_completion": reference_samples.completions, f"ref_{reward}": reference_samples.gold,
    })
    return rows, frame


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
