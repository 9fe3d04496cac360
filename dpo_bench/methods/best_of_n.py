"""Best-of-N: N samples from the reference, keep the one the learned reward model scores highest.

No training; its KL to the reference is log N − (N−1)/N (Stiennon et al. 2020, appendix), and on
the bandit its exact distribution follows from order statistics of the reward model's scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..configs import ConfigError, field
from ..generation import Samples, sample
from .base import MethodContext, best_of_n_kl, register_method


@dataclass(frozen=True)
class BestOfNConfig:
    """Best-of-N sampling against the learned reward model."""

    n: int = field(4, "N: completions drawn from the reference per prompt (larger moves further from it)")

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")


class BestOfNPolicy:
    def __init__(self, reference, reward_model, n: int, task):
        self.reference, self.reward_model, self.n, self.task = reference, reward_model, n, task

    def sample(self, prompt_ids: Sequence[Sequence[int]], *, generator: torch.Generator, temperature: float) -> Samples:
        repeated = [p for p in prompt_ids for _ in range(self.n)]
        drawn = sample(
            self.reference, repeated, max_new_tokens=self.task.max_new_tokens, eos_id=self.task.eos_id,
            pad_id=self.task.pad_id, generator=generator, temperature=temperature,
        )
        scores = self.reward_model.score(drawn.batch.input_ids, drawn.batch.attention_mask).view(-1, self.n)
        pick = torch.arange(len(prompt_ids)) * self.n + scores.argmax(-1)
        return Samples(
            [list(p) for p in prompt_ids], [drawn.completion_ids[i] for i in pick.tolist()], drawn.batch.select(pick),
        )

    def sequence_logps(self, batch) -> None:
        return None

    def analytic_kl(self) -> float:
        return best_of_n_kl(self.n)

    def distribution(self, context_ids: torch.Tensor) -> torch.Tensor:
        """Exact best-of-N distribution for one-token responses (the bandit)."""
        with torch.no_grad():
            ref = self.reference.probabilities(context_ids).double()
        out = torch.zeros_like(ref)
        for row, x in enumerate(context_ids.tolist()):
            support = torch.nonzero(ref[row] > 0).squeeze(-1)
            ids = torch.stack([torch.full_like(support, x), support], dim=1)
            scores = self.reward_model.score(ids, torch.ones_like(ids)).double().numpy()
            probs = ref[row, support].numpy()
            # Group tied scores; P(best lies in a group) = F(≤g)^N − F(<g)^N, split within it by π_ref.
            for s in np.unique(scores):
                in_group = scores == s
                below = probs[scores < s].sum()
                p_group = (below + probs[in_group].sum()) ** self.n - below ** self.n
                out[row, support[in_group]] = torch.from_numpy(p_group * probs[in_group] / probs[in_group].sum())
        return out


@register_method(
    "best_of_n",
    description="best of N reference samples by the learned reward model (no training; KL = log N − (N−1)/N)",
    config=BestOfNConfig,
    needs=("reward_model",),
    strength="n",
    stronger_when="lower",
)
def run_best_of_n(ctx: MethodContext, config: BestOfNConfig) -> BestOfNPolicy:
    policy = BestOfNPolicy(ctx.reference, ctx.reward_model, config.n, ctx.task)
    ctx.checkpoint(0, policy)
    return policy
