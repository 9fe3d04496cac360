"""A scalar reward model: a linear head on a causal language model's last hidden state.

The score of a sequence is the head applied at its last real token (the DPO paper's and
InstructGPT's choice). The trunk is any model that returns ``hidden_states`` when asked, so the
same class scores GPT-2 sequences and the bandit's tabular sequences.

Two scales: :meth:`RewardModel.score` is the raw r(x, y), whose differences are Bradley-Terry
log-odds (accuracy and calibration read them); :meth:`RewardModel.normalised_score` is r̂, the score
standardised on the SFT model's samples (:mod:`reward.normalise`), which is what PPO, best-of-N and
the proxy reward read as a reward. The normaliser is kept in the model's buffers, so it is saved and
loaded with the weights.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from dpo_engine.batching import by_length_groups
from .normalise import Normaliser
from dpo_engine.trunk import last_hidden_at, position_ids, selects_positions


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding; shape (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


class RewardModel(nn.Module):
    """r(x, y): ``trunk`` (a causal LM) plus a linear head at the last real token."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = copy.deepcopy(trunk)
        hidden = self.trunk.config.hidden_size if hasattr(self.trunk.config, "hidden_size") else self.trunk.config.n_embd
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # r̂'s normaliser: NaN until set_normaliser (a score is not silently left raw). float32, as
        # the scores are (MPS has no float64).
        for name in ("score_mean", "score_std", "score_count"):
            self.register_buffer(name, torch.tensor(float("nan")))
        # The LM head's logits are not needed: a transformers model computes them for the last
        # position only (a 50k-word vocabulary makes them the largest matmul of a small model).
        self._trunk_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.trunk.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of shape (B,); rows of very different lengths go through the trunk in separate
        passes, each trimmed to its longest row (:mod:`dpo_engine.batching`): the same scores. A GPT-2
        trunk computes the real tokens alone (:mod:`dpo_engine.trunk`): one pass."""
        if selects_positions(self.trunk):
            return self._scores(input_ids, attention_mask)
        grouped = by_length_groups(attention_mask, lambda rows, lo, hi: (
            self._scores(input_ids[rows, lo:hi], attention_mask[rows, lo:hi]),))
        return self._scores(input_ids, attention_mask) if grouped is None else grouped[0]

    def _scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        index = last_token_index(attention_mask)
        if selects_positions(self.trunk):
            # The trunk's last block at the scored token only (dpo_engine.trunk).
            keep = torch.zeros_like(attention_mask, dtype=torch.bool)
            keep[rows, index] = True
            last = last_hidden_at(self.trunk, input_ids, attention_mask, keep)
        else:
            out = self.trunk(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                output_hidden_states=True, use_cache=False, **self._trunk_kwargs,
            )
            last = out.hidden_states[-1][rows, index]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)

    def set_normaliser(self, normaliser: Normaliser) -> None:
        """Keep ``normaliser`` (fitted on this model's raw scores of SFT samples) for r̂."""
        for name, value in (("score_mean", normaliser.mean), ("score_std", normaliser.std), ("score_count", normaliser.n)):
            getattr(self, name).fill_(float(value))

    @property
    def normaliser(self) -> Normaliser:
        if not torch.isfinite(self.score_std):
            raise RuntimeError("this reward model has no normaliser: fit one on SFT samples' raw scores "
                               "(Normaliser.fit) and call set_normaliser, as the reward-model stage does")
        return Normaliser(self.score_mean.item(), self.score_std.item(), int(self.score_count.item()))

    def normalised_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """r̂ = (r − mean) / std with the SFT samples' mean and std: on the CPU as float32, shape (B,)."""
        normaliser = self.normaliser
        return normaliser(self.score(input_ids, attention_mask, batch_size))

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Raw scores r(x, y) without gradients, chunked; returned on the CPU as float32."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        out = []
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            mask = attention_mask[start:start + batch_size].to(device)
            out.append(self(ids, mask).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)
