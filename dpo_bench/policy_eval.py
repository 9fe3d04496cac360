"""Evaluating a policy at a checkpoint: gold reward, sequence KL to the reference, win rate
against the reference's completion for the same prompt, fluency, proxy reward (the learned reward
model's score normalised on SFT samples, r̂: the reward PPO optimises), length.

Sampled estimates carry their standard errors; on an exact task (the bandit) gold reward, KL and
win rate are computed in closed form instead and reported with stderr 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from dpo_engine.distributed import Ranks

from .configs import ConfigError, field, positive
from .evaluate import Estimate, estimate_from_samples, win_rate
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
    splits: Sequence[str] = ("test",),
    ranks: Ranks = Ranks(),
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Metric rows (``metric, value, stderr, ci_low, ci_high, n``) and the per-prompt samples.

    Completions are judged by ``judge`` (default: the task's gold scorer). Its scores are named
    ``task.reward_metric``: ``gold_reward`` for a gold scorer, ``judge_reward`` for a proxy.
    ``only`` restricts the rows to these metrics and skips the forward passes the others need
    (the log-probs for the KL, the reward model for the proxy reward).

    ``splits``: the prompts sampled, "test" (``task.eval_prompts``, the reported ones) and
    "val" (``task.val_prompts``, where a method's best setting is chosen). The metric rows are
    the test prompts'; the frame holds one row per prompt of every split, with its ``split``.

    KL: ``kl`` is the sequence KL(π‖π_ref) estimated from the samples by the policy's own
    ``kl_estimate`` (a language model: the exact per-token KL summed along each completion;
    best-of-N: from its pool of reference draws), else by the log-ratio of the samples.

    Under ``ranks`` (a process group, :mod:`dpo_engine.distributed`) every rank calls it at once:
    each samples its run of the prompts with its own ``generator``, and every rank returns the rows
    and frame of all the prompts.
    """
    test, val = list(task.eval_prompts), list(getattr(task, "val_prompts", []) or [])
    unknown = set(splits) - {"test", "val"}
    if unknown or "test" not in splits:
        raise ValueError(f"splits must hold 'test' and may hold 'val', got {list(splits)}")
    prompts = test + (val if "val" in splits else [])
    split = np.array(["test"] * len(test) + ["val"] * (len(prompts) - len(test)))
    is_test = split == "test"
    reward = task.reward_metric
    wanted = (lambda metric: True) if only is None else (lambda metric: metric in only)  # noqa: E731
    judged = lambda some: _judged_samples(policy, some, task=task, reference=reference, reward_model=reward_model,  # noqa: E731
                                          generator=generator, temperature=temperature, judge=judge, wanted=wanted)
    if ranks.distributed:
        # Each rank samples and judges its run of the prompts; every rank gets all of them, in order.
        share = np.array_split(np.arange(len(prompts)), ranks.size)[ranks.rank]
        parts: list[dict] = [{} for _ in range(ranks.size)]
        dist.all_gather_object(parts, judged([prompts[i] for i in share]))
        columns = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    else:
        columns = judged(prompts)
    completions, gold, fluent, lengths, truncated = (columns[k] for k in ("completion", "gold", "fluent", "length", "truncated"))
    ref_logps, policy_logps, kl, proxy = (columns[k] for k in ("ref_logp", "policy_logp", "kl", "proxy_reward"))
    completions, fluent = list(completions), (None if np.isnan(fluent).all() else fluent.astype(bool))

    rows = [
        _row(reward, estimate_from_samples(gold[is_test])),
        _row("win_rate", win_rate(gold[is_test], reference_samples.gold)),
        _row("fluency", estimate_from_samples(fluent[is_test].astype(float))) if fluent is not None else None,
        _row("length", estimate_from_samples(lengths[is_test])),
        _row("truncated", estimate_from_samples(truncated[is_test].astype(float))),
    ]
    rows = [r for r in rows if r is not None]
    if reward_model is not None:
        rows.append(_row("proxy_reward", estimate_from_samples(proxy[is_test])))
    if temperature == 1.0:
        if wanted("kl"):
            rows.append(_row("kl", estimate_from_samples(kl[is_test])))
            bound = policy.analytic_kl()
            if bound is not None:  # best-of-N's log N − (N−1)/N: an upper bound, shown beside the estimate
                rows.append(_row("kl_bound", exact_estimate(bound, int(is_test.sum()))))
        exact = task.exact_evaluation(policy, reference)
        if exact:
            # Closed forms replace the sampled estimates of the same quantities.
            rows = [r for r in rows if r["metric"] not in exact] + [_row(m, exact_estimate(v, int(is_test.sum()))) for m, v in exact.items()]
    rows = [r for r in rows if wanted(r["metric"])]
    ref_completions = list(reference_samples.completions) + [None] * (len(prompts) - len(test))
    ref_gold = np.concatenate([np.asarray(reference_samples.gold, dtype=float), np.full(len(prompts) - len(test), np.nan)])
    frame = pd.DataFrame({
        "split": split, "prompt_index": np.concatenate([np.arange(len(test)), np.arange(len(prompts) - len(test))]),
        "prompt": prompts, "completion": completions, reward: gold, "proxy_reward": proxy,
        "policy_logp": policy_logps, "ref_logp": ref_logps, "kl": kl, "length": lengths, "truncated": truncated,
        "fluent": fluent if fluent is not None else np.nan,
        "ref_completion": ref_completions, f"ref_{reward}": ref_gold,
    })
    return rows, frame


def _judged_samples(policy: Any, prompts: Sequence[str], *, task, reference: nn.Module, reward_model: Any,
                    generator: torch.Generator, temperature: float, judge: Any, wanted) -> dict[str, np.ndarray]:
    """The policy's completions of ``prompts`` and every per-prompt quantity the evaluation reads:
    one array per column, NaN where a quantity is not ``wanted`` (or, for fluency, not defined)."""
    missing = np.full(len(prompts), np.nan)
    if not prompts:
        return {k: missing for k in ("completion", "gold", "fluent", "length", "truncated", "ref_logp", "policy_logp",
                                     "kl", "proxy_reward")}
    prompt_ids = [task.encode_prompt(p) for p in prompts]
    samples = policy.sample(prompt_ids, generator=generator, temperature=temperature)
    completions = [task.decode_completion(c) for c in samples.completion_ids]
    fluent = task.fluency(prompts, completions)
    ref_logps, policy_logps, kl = missing, missing, missing
    if wanted("kl"):
        ref_logps = batched_sequence_logps(reference, samples.batch).numpy()
        policy_logps = policy.sequence_logps(samples.batch)
        policy_logps = missing if policy_logps is None else policy_logps.numpy()
        estimate = getattr(policy, "kl_estimate", None)
        estimated = estimate(samples, reference) if estimate is not None else None
        kl = np.asarray(estimated, dtype=float) if estimated is not None else policy_logps - ref_logps
    proxy = missing
    if reward_model is not None and wanted("proxy_reward"):
        # r̂, the normalised score PPO optimises and best-of-N ranks by: E[r̂] − c·KL is PPO's objective.
        proxy = reward_model.normalised_score(samples.batch.input_ids, samples.batch.attention_mask).numpy()
    return {
        "completion": np.array(completions, dtype=object),
        "gold": np.asarray((judge if judge is not None else task.gold).score(prompts, completions), dtype=float),
        "fluent": np.asarray(fluent, dtype=float) if fluent is not None else missing,  # 1/0, NaN: not judged
        "length": np.array([len(c) for c in samples.completion_ids], dtype=float),
        "truncated": np.asarray(task.truncated(samples.completion_ids)),
        "ref_logp": ref_logps, "policy_logp": policy_logps, "kl": kl, "proxy_reward": proxy,
    }


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
