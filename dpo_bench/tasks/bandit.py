"""The exact task: one-token contexts x, one-token responses y, a policy that is a table.

The policy is a :class:`~dpo_bench.policy.TabularLM` behind the same interface as a language
model, so every method runs unchanged. What a language model only lets us estimate is exact
here: expected gold reward, KL(π‖π_ref), win rate against the reference, and the KL-constrained
optimum π_β = π_ref·exp(r/β)/Z (DPO paper Eq. 4), which traces the reward-KL frontier no policy
can lie above.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from reward.gold import TableGold

from ..configs import ConfigError, field, positive
from ..policy import TabularLM
from .base import Task, register_task
from .corpus import build_tokenizer


@dataclass(frozen=True)
class BanditConfig:
    """The tabular bandit: sizes, the gold reward table, the reference policy."""

    n_contexts: int = field(4, "number of one-token contexts x")
    n_responses: int = field(8, "number of one-token responses y")
    table_seed: int = field(0, "seed of the gold reward table and the reference logits")
    reward_scale: float = field(1.0, "gold rewards are drawn uniformly from [-scale, scale]")
    reference_spread: float = field(1.0, "std of the reference logits (0 = uniform reference)")
    train_repeats: int = field(256, "preference prompts per context")
    eval_repeats: int = field(100, "sampled eval prompts per context (for the samples table; metrics are exact)")

    def __post_init__(self) -> None:
        for name in ("n_contexts", "n_responses", "reward_scale", "train_repeats", "eval_repeats"):
            positive(name, getattr(self, name))
        if self.n_responses < 2:
            raise ConfigError(f"n_responses must be >= 2, got {self.n_responses}")
        if self.reference_spread < 0:
            raise ConfigError(f"reference_spread must be >= 0, got {self.reference_spread}")


def bandit_tables(config: BanditConfig) -> tuple[np.ndarray, np.ndarray]:
    """(gold reward table (X, Y), reference logits (X, Y)), deterministic in ``table_seed``."""
    rng = np.random.default_rng(config.table_seed)
    rewards = rng.uniform(-config.reward_scale, config.reward_scale, size=(config.n_contexts, config.n_responses))
    logits = rng.normal(0.0, config.reference_spread, size=(config.n_contexts, config.n_responses))
    return rewards, logits


def optimal_policy(ref_probs: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """π_β(y|x) = π_ref(y|x)·exp(r(x,y)/β) / Z(x), the maximiser of E[r] − β·KL (DPO paper Eq. 4)."""
    with np.errstate(divide="ignore"):
        logits = np.log(ref_probs) + rewards / beta
    logits = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def exact_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p‖q) per row with 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def exact_metrics(probs: np.ndarray, ref_probs: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
    """Expected gold reward, KL and win rate against the reference, contexts uniform."""
    reward = float((probs * rewards).sum(-1).mean())
    kl = float(exact_kl_rows(probs, ref_probs).mean())
    beats = (rewards[:, :, None] > rewards[:, None, :]) + 0.5 * (rewards[:, :, None] == rewards[:, None, :])
    win = float(np.einsum("xy,xz,xyz->x", probs, ref_probs, beats).mean())
    return {"gold_reward": reward, "kl": kl, "win_rate": win}


@register_task
class BanditTask(Task):
    name = "bandit"
    config_cls = BanditConfig
    exact = True
    ends_with_eos = False  # a response is one token: there is no EOS to emit, and none is missing

    @classmethod
    def prepare(cls, config: BanditConfig, workdir: Path) -> None:
        # Everything is a deterministic function of the config; nothing to write.
        Path(workdir).mkdir(parents=True, exist_ok=True)

    def __init__(self, config: BanditConfig, workdir: Path):
        super().__init__(config, workdir)
        self.contexts = [f"x{i}" for i in range(config.n_contexts)]
        self.responses = [f"y{j}" for j in range(config.n_responses)]
        self.tokenizer = build_tokenizer(self.contexts + self.responses)
        self.rewards, self.ref_logits = bandit_tables(config)
        self.gold = TableGold(self.rewards, self.contexts, self.responses)
        self.train_prompts = [x for x in self.contexts for _ in range(config.train_repeats)]
        self.eval_prompts = [x for x in self.contexts for _ in range(config.eval_repeats)]
        self.max_new_tokens = 1
        self.fingerprints = {}
        self.context_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(self.contexts))
        self.response_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(self.responses))

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self._id(prompt, self.contexts)]

    def encode_completion(self, completion: str) -> list[int]:
        return [self._id(completion, self.responses)]

    def _id(self, token: str, allowed: list[str]) -> int:
        token = token.strip()
        if token not in allowed:
            raise ValueError(f"'{token}' is not one of the bandit's tokens {allowed[0]}..{allowed[-1]}")
        return int(self.tokenizer.convert_tokens_to_ids(token))

    def decode_completion(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def reference_training_data(self) -> None:
        return None

    def initial_model(self, seed: int) -> nn.Module:
        """The reference table: π_ref(·|x) = softmax(reference logits) over the responses."""
        vocab = len(self.tokenizer)
        table = torch.zeros(vocab, vocab)
        table[self.context_ids[:, None], self.response_ids[None, :]] = torch.tensor(self.ref_logits, dtype=torch.float32)
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[self.response_ids] = True
        return TabularLM(vocab, allowed, table)

    # --- exact quantities ---
    def response_probs(self, policy: Any) -> np.ndarray:
        """π(y|x) as an (X, Y) array for a policy exposing ``distribution`` (or a TabularLM)."""
        if isinstance(policy, nn.Module):
            with torch.no_grad():
                probs = policy.probabilities(self.context_ids.to(next(policy.parameters()).device)).cpu()
        else:
            probs = policy.distribution(self.context_ids)
        return probs[:, self.response_ids].double().numpy()

    def exact_evaluation(self, policy: Any, reference: nn.Module) -> dict[str, float]:
        return exact_metrics(self.response_probs(policy), self.response_probs(reference), self.rewards)

    def exact_frontier(self, reference: nn.Module, betas: Sequence[float]) -> list[dict[str, float]]:
        ref = self.response_probs(reference)
        return [{"beta": float(b), **exact_metrics(optimal_policy(ref, self.rewards, b), ref, self.rewards)} for b in betas]
