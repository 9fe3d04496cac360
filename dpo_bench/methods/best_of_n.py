"""Best-of-N: N samples from the reference, keep the one the learned reward model scores highest.

It reads r̂, the reward model's score normalised on SFT samples, as PPO and the proxy reward do: a
positive affine map of the raw score, so the same completion wins, and the pool's scores are on
the proxy reward's scale.

No training. Its KL to the reference is estimated per prompt from a pool of reference draws, by the
exact discrete formula of Beirami et al. 2024 on the pool's empirical distribution;
log N − (N−1)/N (Stiennon et al. 2020, appendix) is only an upper bound, reported beside it. On the
bandit its exact distribution follows from order statistics of the reward model's scores.

In a run, the cells of every N share one pool of draws (common random numbers): draw r of a
prompt is the same for N = 4, 16 and 32, so N = 4 keeps the best of the first 4 of the draws N = 32
chooses among. The pool is built a round (one draw per prompt) at a time and kept in the stage
store, so the largest N pays for it and the others read it; a cell computes the rounds it lacks from
the last down, so two cells that start together meet in the middle instead of drawing twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dpo_engine.seeds import derive_seed

from ..configs import ConfigError, field
from ..frontier import best_of_n_kl_estimate
from ..generation import Samples, sample
from ..logprobs import collate
from .base import MethodContext, SharedStore, best_of_n_kl, register_method


@dataclass(frozen=True)
class BestOfNConfig:
    """Best-of-N sampling against the learned reward model."""

    n: int = field(4, "N: completions drawn from the reference per prompt (larger moves further from it)")
    kl_pool: int = field(32, "reference draws per prompt that the KL estimate reads (at least n are drawn; the cells of a "
                             "run share the draws, so the pool costs one sampling pass of this size)")

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.kl_pool < 1:
            raise ConfigError(f"kl_pool must be >= 1, got {self.kl_pool}")

    @property
    def pool(self) -> int:
        """Draws per prompt: the N the policy picks among come first, the KL estimate reads all."""
        return max(self.n, self.kl_pool)


class BestOfNPolicy:
    def __init__(self, reference, reward_model, n: int, task, shared: SharedStore | None = None, pool: int | None = None):
        self.reference, self.reward_model, self.n, self.task, self.shared = reference, reward_model, n, task, shared
        self.pool = max(n, pool or n)
        self._pool_scores: torch.Tensor | None = None  # (P, pool) of the last sample() call
        self._pool_truncated: np.ndarray | None = None  # (P, pool) bool: each draw cut at the length cap without EOS

    def sample(self, prompt_ids: Sequence[Sequence[int]], *, generator: torch.Generator, temperature: float) -> Samples:
        """The best of N draws per prompt: from the run's shared pool when there is one (``generator``
        is then unused), else fresh draws from ``generator``. ``pool`` draws are made per prompt;
        the policy picks among the first N, and :meth:`kl_estimate` reads them all."""
        prompts = [list(p) for p in prompt_ids]
        if self.shared is None:
            repeated = [p for p in prompts for _ in range(self.pool)]
            drawn = self._draw(repeated, generator, temperature)
            scores = drawn["scores"].view(-1, self.pool)
            completions = [drawn["completions"][i * self.pool:(i + 1) * self.pool] for i in range(len(prompts))]
        else:
            rounds = {r: self._round(prompts, temperature, r) for r in reversed(range(self.pool))}
            scores = torch.stack([rounds[r]["scores"] for r in range(self.pool)], dim=1)
            completions = [[rounds[r]["completions"][i] for r in range(self.pool)] for i in range(len(prompts))]
        self._pool_scores = scores
        self._pool_truncated = np.stack([self.task.truncated(row) for row in completions]) if completions else None
        # The first of equal scores wins (argmax returns the first maximum).
        best = scores[:, :self.n].argmax(-1).tolist()
        picked = [row[b] for row, b in zip(completions, best)]
        return Samples(prompts, picked, collate(prompts, picked, self.task.pad_id))

    def kl_estimate(self, samples: Samples, reference=None) -> np.ndarray:
        """Per prompt, KL(best-of-N ‖ reference) from the pool the last samples were picked from (see
        :func:`dpo_bench.frontier.best_of_n_kl_estimate`): identical completions score alike, so
        ties group repeated draws."""
        if self._pool_scores is None or self._pool_scores.shape[0] != len(samples):
            raise RuntimeError("kl_estimate reads the pool of the last sample() call; sample these prompts first")
        return best_of_n_kl_estimate(self._pool_scores.double().numpy(), self.n)

    def pool_draws(self) -> tuple[np.ndarray, np.ndarray]:
        """The last sample() call's pool, (P, pool) each: every draw's normalised reward-model score
        and whether it was cut at the length cap without EOS (the regularised optimum's estimate
        reads them: :meth:`dpo_bench.verdict.Objective.optimum`)."""
        if self._pool_scores is None:
            raise RuntimeError("pool_draws reads the draws of the last sample() call; sample first")
        return self._pool_scores.double().numpy(), self._pool_truncated

    def _draw(self, prompts: list[list[int]], generator: torch.Generator, temperature: float) -> dict:
        task = self.task
        drawn = sample(self.reference, prompts, max_new_tokens=task.max_new_tokens, eos_id=task.eos_id, pad_id=task.pad_id,
                       generator=generator, temperature=temperature)
        return {"completions": drawn.completion_ids,
                "scores": self.reward_model.normalised_score(drawn.batch.input_ids, drawn.batch.attention_mask).float()}

    def _round(self, prompts: list[list[int]], temperature: float, r: int) -> dict:
        """Draw ``r`` of the shared pool: one completion per prompt and its reward-model score."""
        def build() -> dict[str, torch.Tensor]:
            generator = torch.Generator().manual_seed(derive_seed(self.shared.seed, "best_of_n", temperature, r))
            drawn = self._draw(prompts, generator, temperature)
            return {"completions": pack(drawn["completions"]), "scores": drawn["scores"]}

        key = {"prompts": fingerprint_ids(prompts), "temperature": temperature, "round": r}
        tensors = self.shared.tensors("best_of_n_draws", key, build)
        return {"completions": unpack(tensors["completions"]), "scores": tensors["scores"]}

    def sequence_logps(self, batch) -> None:
        return None

    def analytic_kl(self) -> float:
        """log N − (N−1)/N: an upper bound on the KL (exact for a continuous reward distribution)."""
        return best_of_n_kl(self.n)

    def distribution(self, context_ids: torch.Tensor) -> torch.Tensor:
        """Exact best-of-N distribution for one-token responses (the bandit)."""
        with torch.no_grad():
            ref = self.reference.probabilities(context_ids).double()
        out = torch.zeros_like(ref)
        for row, x in enumerate(context_ids.tolist()):
            support = torch.nonzero(ref[row] > 0).squeeze(-1)
            ids = torch.stack([torch.full_like(support, x), support], dim=1)
            scores = self.reward_model.normalised_score(ids, torch.ones_like(ids)).double().numpy()
            probs = ref[row, support].numpy()
            # Group tied scores; P(best lies in a group) = F(≤g)^N − F(<g)^N, split within it by π_ref.
            for s in np.unique(scores):
                in_group = scores == s
                below = probs[scores < s].sum()
                p_group = (below + probs[in_group].sum()) ** self.n - below ** self.n
                out[row, support[in_group]] = torch.from_numpy(p_group * probs[in_group] / probs[in_group].sum())
        return out


def pack(rows: list[list[int]]) -> torch.Tensor:
    """Token-id rows of different lengths as one tensor, right-padded with -1."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def unpack(packed: torch.Tensor) -> list[list[int]]:
    return [[t for t in row if t >= 0] for row in packed.tolist()]


def fingerprint_ids(rows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@register_method(
    "best_of_n",
    description="best of N reference samples by the learned reward model (no training; an inference-time baseline)",
    config=BestOfNConfig,
    needs=("reward_model",),
    strength="n",
    stronger_when="lower",
    role="inference",
)
def run_best_of_n(ctx: MethodContext, config: BestOfNConfig) -> BestOfNPolicy:
    policy = BestOfNPolicy(ctx.reference, ctx.reward_model, config.n, ctx.task, ctx.shared, config.pool)
    # No training: its cost is N samples (and N reward-model scores) per prompt it answers.
    ctx.log.compute.inference_samples = config.n
    ctx.checkpoint(0, policy)
    return policy
