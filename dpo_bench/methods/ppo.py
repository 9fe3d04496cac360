"""PPO with a KL penalty against a reward (RLHF), written as small named steps.

One iteration: sample completions for a batch of train prompts; score them (the learned reward
model for ``ppo``, the gold reward for ``ppo_gt``), each score normalised on SFT samples and less a
penalty where a completion was cut off without EOS; per-token reward −kl_coef·(log π − log π_ref)
with the score added at the last token; GAE (γ, λ) with the value head; whitened advantages;
several epochs of the clipped surrogate and clipped value loss over minibatches; optionally,
kl_coef adapted toward a target KL.

The details follow Huang et al. 2024, "The N+ implementation details of RLHF with PPO": the
reward normalised to mean 0, std 1 on SFT samples (so kl_coef, the value clip and the EOS penalty
are in the same units for ``ppo`` and ``ppo_gt``); a fixed penalty for a completion without EOS;
the value function optionally a network of its own, initialised from the reward model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dpo_engine.distributed import Ranks
from reward.normalise import Normaliser, normalised_head

from ..configs import ConfigError, field, non_negative, positive, probability
from ..logprobs import (
    SequenceBatch, by_length_groups, token_kl_terms, token_log_distributions, token_logps, token_logps_and_hidden,
)
from ..policy import freeze_first_blocks
from ..training import EMA_DOC, LR_SCHEDULE_DOC, WeightAverage, check_ema, check_finite, checkpoint_steps, lr_factor, make_optimizer
from .base import MethodContext, ModelPolicy, register_method
from .sft import trainable_copy


@dataclass(frozen=True)
class PPOConfig:
    """PPO with a KL penalty (Ziegler et al. 2019; Stiennon et al. 2020)."""

    kl_coef: float = field(0.1, "β of the KL penalty −kl_coef·(log π − log π_ref) per token")
    iterations: int = field(60, "rollout/update iterations")
    rollout_batch: int = field(64, "prompts sampled per iteration")
    epochs: int = field(4, "passes over each rollout batch")
    n_minibatches: int = field(2, "minibatches per epoch")
    lr: float = field(1e-4, "learning rate (AdamW) of policy and value head")
    clip_range: float = field(0.2, "ε of the clipped surrogate objective")
    value_clip: float = field(0.2, "clip range of the value update, in the score's units: with normalise_reward, "
                                   "0.2 standard deviations of the SFT samples' scores, for ppo and ppo_gt alike")
    vf_coef: float = field(0.1, "weight of the value loss")
    gamma: float = field(1.0, "discount γ of GAE")
    lam: float = field(0.95, "λ of GAE")
    whiten_advantages: bool = field(True, "normalise advantages to mean 0, std 1 per rollout batch")
    normalise_reward: bool = field(True, "score against the reward standardised on SFT samples (mean 0, std 1; the reward "
                                         "model's for ppo, the gold reward's for ppo_gt; Huang et al. 2024), so that a kl_coef "
                                         "is the same price against either; false reads raw scores")
    missing_eos_penalty: float = field(1.0, "subtracted from the score of a completion cut at the length cap without EOS, "
                                            "in the score's units (with normalise_reward: standard deviations); 0 turns it off")
    value_init: Literal["zero", "reward_model"] = field("zero", "the value function's start: a zero head, or the reward "
                                                                "model's head, normalised with the reward (with critic = "
                                                                "'separate', its trunk too; ppo only)")
    critic: Literal["shared", "separate"] = field(
        "shared", "the value function: a head on the policy's trunk ('shared'), or a network of its own, a trunk and a head "
                  "('separate': Huang et al. 2024's, started from the reward model with value_init = 'reward_model', else "
                  "from the SFT model; a second trunk's forward and backward per minibatch)")
    target_kl: float = field(0.0, "if > 0, adapt kl_coef so the rollout KL tracks this target (Ziegler et al.); 0 keeps it fixed")
    kl_horizon: float = field(10.0, "horizon of the adaptive KL controller, in iterations: kl_coef moves by a factor of at "
                                    "most 1 ± 0.2/kl_horizon an iteration (Ziegler et al.'s K_β = 0.1)")
    lr_schedule: Literal["constant", "linear"] = field("constant", LR_SCHEDULE_DOC + "; by iteration")
    warmup_iterations: int = field(0, "linear warm-up of the learning rate over this many iterations (0: none); the "
                                      "schedule's decay runs over the whole run")
    kl_estimator: Literal["sampled", "exact"] = field(
        "sampled", "the per-token KL the penalty reads: 'sampled', log π − log π_ref of the drawn token (Ziegler et al.; "
                   "TRL's); 'exact', the KL of the whole next-token distribution at each visited position, in the rewards "
                   "and, through its gradient, in the loss (Rao-Blackwellised: the same expected penalty and gradient, with "
                   "less noise; holds B·T·V log-probs, for small vocabularies)")
    ema: float = field(0.0, EMA_DOC + " (the rollouts come from the trained weights)")

    def __post_init__(self) -> None:
        non_negative("kl_coef", self.kl_coef)
        for name in ("iterations", "rollout_batch", "epochs", "n_minibatches", "lr", "clip_range", "value_clip", "kl_horizon"):
            positive(name, getattr(self, name))
        non_negative("vf_coef", self.vf_coef)
        probability("gamma", self.gamma)
        probability("lam", self.lam)
        non_negative("missing_eos_penalty", self.missing_eos_penalty)
        non_negative("target_kl", self.target_kl)
        check_ema(self.ema)
        non_negative("warmup_iterations", self.warmup_iterations)
        if self.rollout_batch < self.n_minibatches:
            raise ConfigError(f"rollout_batch ({self.rollout_batch}) must be >= n_minibatches ({self.n_minibatches})")


# --- the named steps ---------------------------------------------------------------------------


def eos_penalised_scores(scores: torch.Tensor, truncated: torch.Tensor, penalty: float) -> torch.Tensor:
    """The sequence scores (B,) less ``penalty`` where ``truncated`` (B,) bool: the completion was cut
    at the length cap before it emitted EOS (Huang et al. 2024: without it the policy is not told
    that an unfinished text is worse than a finished one)."""
    return scores - penalty * truncated.to(scores.dtype)


def kl_penalised_rewards(token_kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards −kl_coef·KL_t, plus the sequence score at the last token.

    ``token_kl`` (B, T): each position's KL term, the drawn token's log π − log π_ref (sampled) or
    the next-token distribution's exact KL (:func:`~dpo_bench.logprobs.token_kl_terms`); either
    sums in expectation to the sequence KL. ``scores`` (B,); ``mask`` (B, T) marks completion
    tokens (contiguous per row).
    """
    rewards = -kl_coef * token_kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * (positions + 1)).argmax(-1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked tokens; returns (advantages, returns), each (B, T).

    δ_t = r_t + γ V_{t+1} − V_t with V = 0 after the last token; A_t = δ_t + γλ A_{t+1}.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # Outside the completion the recursion carries through unchanged (padding is skipped).
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_advantage = torch.where(m.bool(), advantage, next_advantage)
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries to mean 0 and standard deviation 1."""
    return whitened(x, mask, eps)[0]


def whitened(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`whiten`'s result, the scale it divided by: √(var + eps) of the masked entries);
    under ``ranks``, the mean and variance of every rank's entries together."""
    if not ranks.distributed:
        mean = masked_mean(x, mask)
        inverse = torch.rsqrt(masked_mean((x - mean) ** 2, mask) + eps)
        return (x - mean) * inverse * mask, 1 / inverse
    total, count = ranks.sum(torch.stack([(x * mask).sum(), mask.sum()])).unbind()
    mean = total / count.clamp(min=1)
    squares, _ = ranks.sum(torch.stack([((x - mean) ** 2 * mask).sum(), count])).unbind()
    inverse = torch.rsqrt(squares / count.clamp(min=1) + eps)
    return (x - mean) * inverse * mask, 1 / inverse


def clipped_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """PPO's clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """½·mean of max((V − R)², (clip(V, V_old ± ε) − R)²)."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: kl_coef ← kl_coef·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

    ``n`` and ``horizon`` in the same unit. Ziegler et al.'s code counts episodes with a horizon of
    10,000, 1% or less of runs of 1-2M episodes; this benchmark's runs are 2,500-4,000 episodes
    (40-60 iterations of 64), where that horizon lets kl_coef move by 8% at most. PPO counts
    iterations instead, with a horizon of 10 (their paper's K_β = 0.1 per update), whatever the
    rollout batch.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: float = 1) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon


# --- the model with a value head ------------------------------------------------------------------


class PolicyWithValueHead(nn.Module):
    """The policy plus a scalar value head on a last hidden state: the policy's own (a shared trunk),
    or that of a separate critic trunk."""

    def __init__(self, policy: nn.Module, head: tuple[torch.Tensor, torch.Tensor] | None = None,
                 critic: nn.Module | None = None):
        """``head``: the value head's initial (weight (1, D), bias (1,)); zero when None. ``critic``:
        a trunk of the value function's own (a causal LM whose last hidden state the head reads);
        None shares the policy's."""
        super().__init__()
        self.policy = policy
        self.critic = critic
        trunk = critic if critic is not None else policy
        hidden = getattr(trunk.config, "hidden_size", None) or trunk.config.n_embd
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if head is not None:
            with torch.no_grad():
                self.value_head.weight.copy_(head[0])
                self.value_head.bias.copy_(head[1])

    def logps_and_values(self, batch: SequenceBatch, full: bool = False) -> tuple[torch.Tensor, ...]:
        """Per-token log-probs and values aligned with input_ids[:, 1:], shape (B, T-1) each; with
        ``full``, a third: the next-token log-distributions (B, T-1, V)."""
        def both(b: SequenceBatch) -> tuple[torch.Tensor, ...]:
            # Values only where a completion token is predicted: the losses and GAE read no others.
            logps, hidden, *dists = token_logps_and_hidden(self.policy, b, hidden=self.critic is None, full=full)
            if self.critic is not None:
                hidden = token_logps_and_hidden(self.critic, b, hidden=True)[1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
            return logps, values.new_zeros(logps.shape).masked_scatter(b.completion_mask[:, 1:].bool(), values), *dists

        # Rollouts stop at eos: their lengths vary, so rows of similar length share a forward pass.
        return by_length_groups(batch, both, model=self.policy)


def reward_normaliser(ctx: MethodContext, config: PPOConfig, score_source: str) -> Normaliser | None:
    """What maps ``score_source``'s raw scores to the ones PPO optimises: its normaliser on SFT
    samples, or None (raw scores) without ``normalise_reward``."""
    if not config.normalise_reward:
        return None
    if score_source == "reward_model":
        return ctx.reward_model.normaliser
    if ctx.gold_normaliser is None:
        raise ConfigError(f"{ctx.label or 'ppo_gt'}: normalise_reward needs the gold reward's mean and std on SFT samples "
                          "(MethodContext.gold_normaliser, fitted by the reward-model stage); set normalise_reward = false "
                          "to optimise the raw scores")
    return ctx.gold_normaliser


def initial_value_head(ctx: MethodContext, config: PPOConfig, score_source: str,
                       normaliser: Normaliser | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The value head's (weight, bias) at the start: None (zero), or the reward model's head,
    normalised as the reward is (w/std, (b − mean)/std), so that it predicts r̂ from the trunk's state.

    On a shared trunk (the SFT model) this carries little: the reward model's trunk is fine-tuned
    away from it, and on the default task the reward model's head on the SFT trunk hardly correlates
    with r̂ (docs/ppo.md, value_init). With ``critic = "separate"`` the head reads the reward model's
    own trunk (:func:`initial_critic`), as Huang et al. initialise their value network."""
    if config.value_init == "zero":
        return None
    if score_source != "reward_model":
        raise ConfigError(f"{ctx.label or 'ppo_gt'}: value_init = 'reward_model' needs PPO against the reward model; "
                          "against the gold reward use value_init = 'zero'")
    head = ctx.reward_model.head
    weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
    return normalised_head(weight, bias, normaliser) if normaliser is not None else (weight, bias)


def initial_critic(ctx: MethodContext, config: PPOConfig) -> nn.Module | None:
    """The separate critic's trunk at the start (trainable, the context's frozen blocks fixed): the
    reward model's trunk with ``value_init = "reward_model"``, else the SFT model's; None for a
    shared trunk."""
    if config.critic == "shared":
        return None
    trunk = copy.deepcopy(ctx.reward_model.trunk if config.value_init == "reward_model" else ctx.reference)
    for p in trunk.parameters():
        p.requires_grad_(True)
    if ctx.freeze_blocks or ctx.freeze_embeddings:
        freeze_first_blocks(trunk, ctx.freeze_blocks, ctx.freeze_embeddings)
    return trunk.train()


# --- the loop -------------------------------------------------------------------------------------


def train_ppo(ctx: MethodContext, config: PPOConfig, score_source: str) -> ModelPolicy:
    """PPO against ``score_source``: "reward_model" (RLHF) or "gold" (PPO-GT)."""
    device = ctx.device
    # Under a process group each rank draws its share of the rollouts from a stream of its own, and
    # the updates sum the ranks' gradients of the whole minibatch's token-mean losses.
    ranks = Ranks.current()
    if ranks.distributed:
        ctx = replace(ctx, generator=ranks.generator(ctx.generator, ctx.seed))
    n_rollouts = config.rollout_batch // ranks.size
    normaliser = reward_normaliser(ctx, config, score_source)
    head = initial_value_head(ctx, config, score_source, normaliser)
    model = PolicyWithValueHead(trainable_copy(ctx), head, initial_critic(ctx, config)).to(device)
    ranks.broadcast_parameters(model)
    optimizer = make_optimizer(model, config.lr)
    average = WeightAverage(model.policy, config.ema)
    # Mixed precision: the forward passes (rollouts, scores, log-probs) under autocast, fp16's loss scaled.
    autocast, scaler = ctx.precision.autocast, ctx.precision.scaler()
    controller = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon) if config.target_kl > 0 else None
    prompt_ids = ctx.train_prompt_ids()
    evals = set(checkpoint_steps(config.iterations, ctx.n_checkpoints))
    task = ctx.task
    exact = config.kl_estimator == "exact"
    bar = tqdm(range(1, config.iterations + 1), desc=ctx.label, disable=not ctx.progress, leave=False)
    for iteration in bar:
        kl_coef = controller.value if controller else config.kl_coef
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(iteration - 1, config.iterations, config.warmup_iterations, config.lr_schedule)
        # 1. rollouts
        pick = torch.randint(len(prompt_ids), (n_rollouts,), generator=ctx.generator).tolist()
        with autocast():
            samples = ctx.sample(model.policy, [prompt_ids[i] for i in pick])
        ctx.log.compute.add(samples=len(pick) * ranks.size)
        batch = samples.batch.trim().to(device)
        mask = batch.completion_mask[:, 1:].float()
        # 2. scores: normalised on SFT samples, less the penalty where EOS is missing
        prompts = [task.train_prompts[i] for i in pick]
        completions = [task.decode_completion(c) for c in samples.completion_ids]
        gold = torch.tensor(ctx.gold_scores(prompts, completions), dtype=torch.float32)
        if score_source == "gold":
            raw = gold
        else:
            with autocast():
                raw = ctx.reward_model.score(batch.input_ids, batch.attention_mask).float()
        reward = normaliser(raw) if normaliser else raw
        truncated = torch.from_numpy(task.truncated(samples.completion_ids))
        scores = eos_penalised_scores(reward, truncated, config.missing_eos_penalty).to(device)
        # 3. old log-probs, reference log-probs, values; rewards; advantages
        with torch.no_grad():
            with autocast():
                old_logps, old_values, *old_dists = model.logps_and_values(batch, full=exact)
                ref = token_log_distributions(ctx.reference, batch) if exact else token_logps(ctx.reference, batch)
            if exact:
                ref_dists = ref
                token_kl = token_kl_terms(old_dists[0], ref_dists, mask)
            else:
                token_kl = (old_logps - ref) * mask
            rewards = kl_penalised_rewards(token_kl, scores, mask, kl_coef)
            advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
            # The exact KL's own gradient enters the loss in the advantages' units.
            scale = torch.ones(())
            if config.whiten_advantages:
                advantages, scale = whitened(advantages, mask, ranks=ranks)
        kl = token_kl.sum(-1).mean().item()
        # 4. updates
        n = len(batch)
        size = math.ceil(n / config.n_minibatches)
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=ctx.generator)
            for start in range(0, n, size):
                idx = order[start:start + size].to(device)
                mb = batch.select(idx)
                with autocast():
                    logps, values, *dists = model.logps_and_values(mb, full=exact)
                pg = clipped_policy_loss(logps, old_logps[idx], advantages[idx], mask[idx], config.clip_range)
                if exact:
                    # ∇ Σ_t KL_t at the visited positions; the rewards above carry its effect on later positions.
                    pg = pg + kl_coef / scale * masked_mean(token_kl_terms(dists[0], ref_dists[idx], mask[idx]), mask[idx])
                vf = clipped_value_loss(values, old_values[idx], returns[idx], mask[idx], config.value_clip)
                loss = pg + config.vf_coef * vf
                tokens = int(mb.attention_mask.sum())
                if ranks.distributed:
                    # The losses are token means over the rank's part: weighted by its share of the
                    # minibatch's completion tokens, the ranks' gradients sum to the whole minibatch's.
                    mine = float(mask[idx].sum())
                    every, tokens = ranks.sum(torch.tensor([mine, float(tokens)], dtype=torch.float64)).tolist()
                    share = mine / max(every, 1.0)
                    loss = loss * share
                else:
                    share = 1.0
                    check_finite(loss, ctx.label, iteration, ctx.log)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                ranks.sum_gradients(list(model.parameters()))
                scaler.unscale(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                if ranks.distributed and not torch.isfinite(norm) and scaler.scaler is None:
                    # The same on every rank: they stop together (under fp16 the scaler skips the step instead).
                    check_finite(torch.tensor(ranks.sum_scalars({"loss": loss.item()})["loss"]), ctx.label, iteration, ctx.log)
                scaler.step(optimizer)
                average.update()
                ctx.log.compute.add(steps=1, tokens=int(tokens))
        # The iteration's means over every rank's rollouts (equal shares), the last minibatch's losses.
        means = ranks.mean_scalars({"kl": kl, "reward": reward.mean().item(), "gold_reward": gold.mean().item(),
                                    "truncated": truncated.float().mean().item()})
        losses = ranks.sum_scalars({"loss": loss.item(), "policy_loss": pg.item() * share, "value_loss": vf.item() * share})
        kl = means["kl"]
        if controller:
            controller.update(kl)
        ctx.log.log(
            iteration, n * ranks.size,
            **{f"train/{k}": v for k, v in losses.items()},
            # the (normalised) reward before the EOS penalty: the proxy curve of the over-optimisation figure
            **{f"train/{k}": v for k, v in means.items()}, **{"train/kl_coef": kl_coef},
        )
        bar.set_postfix(reward=f"{means['reward']:.3g}", kl=f"{kl:.3g}", refresh=False)
        if iteration in evals:
            evaluated = average.current()
            evaluated.eval()
            ctx.checkpoint(iteration, evaluated)
            model.policy.train()
    return ModelPolicy(average.finish().eval(), task)


@register_method(
    "ppo",
    description="RLHF: PPO with a KL penalty against the learned Bradley-Terry reward model",
    config=PPOConfig,
    needs=("reward_model",),
    strength="kl_coef",
    role="rlhf",
    data_parallel=True,
)
def train_ppo_rm(ctx: MethodContext, config: PPOConfig) -> ModelPolicy:
    return train_ppo(ctx, config, "reward_model")


@register_method(
    "ppo_gt",
    description="PPO with a KL penalty against the gold reward itself (the DPO paper's PPO-GT oracle)",
    config=PPOConfig,
    needs=("gold",),
    strength="kl_coef",
    role="oracle",
    data_parallel=True,
)
def train_ppo_gold(ctx: MethodContext, config: PPOConfig) -> ModelPolicy:
    return train_ppo(ctx, config, "gold")
