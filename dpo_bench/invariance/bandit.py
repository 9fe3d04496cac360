"""On the bandit tables: DPO and sampled PPO reach the optimum of the pairs' maximum-likelihood
reward, and move where the reward moves (Theorem 1, Lemma 2 in practice).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from reward.bradley_terry import bt_loss, sample_bt_labels

from ..losses import get_loss
from ..methods.ppo import PPOConfig, clipped_policy_loss, gae, kl_penalised_rewards
from ..tasks.bandit import exact_kl_rows, optimal_policy

from .results import CheckResult, ChecksConfig


@dataclass(frozen=True)
class BanditPairs:
    """Bradley-Terry preference pairs on the bandit: context, chosen and rejected response, each (n,) int."""

    context: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray

    def shuffled(self, rng: np.random.Generator) -> "BanditPairs":
        """The same pairs with their labels shuffled: each pair's order decided by a fair coin, so
        the labels carry no information about the rewards."""
        flip = rng.random(len(self.context)) < 0.5
        return BanditPairs(self.context, np.where(flip, self.rejected, self.chosen), np.where(flip, self.chosen, self.rejected))


def sample_responses(probs: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One response y ~ probs[x] for each context x of ``rows`` (n,), by the inverse CDF of one
    uniform draw each: (n,) int. ``probs`` (X, Y)."""
    cumulative = np.cumsum(probs[rows], axis=1)
    return np.minimum((rng.random(len(rows))[:, None] > cumulative).sum(1), probs.shape[1] - 1)


def reference_pairs(ref_probs: np.ndarray, rewards: np.ndarray, per_context: int, rng: np.random.Generator) -> BanditPairs:
    """``per_context`` pairs per context x: two distinct responses drawn from π_ref(·|x), labelled by
    Bradley-Terry on the gold reward at temperature 1 (the DPO paper's data model, Eq. 1)."""
    context = np.repeat(np.arange(ref_probs.shape[0]), per_context)
    a, b = sample_responses(ref_probs, context, rng), sample_responses(ref_probs, context, rng)
    while (same := a == b).any():  # a pair of one response twice is no comparison
        b[same] = sample_responses(ref_probs, context[same], rng)
    a_wins, _ = sample_bt_labels(rng, rewards[context, a], rewards[context, b], 1.0)
    return BanditPairs(context, np.where(a_wins, a, b), np.where(a_wins, b, a))


class UnidentifiedReward(ValueError):
    """The pairs leave the tabular maximum-likelihood reward infinite or undetermined."""


def fit_tabular_reward(pairs: BanditPairs, shape: tuple[int, int]) -> np.ndarray:
    """The maximum-likelihood Bradley-Terry reward r̂ (X, Y), one parameter per (x, y): logistic
    regression of the labels on r̂(x, y_w) − r̂(x, y_l) (DPO paper Eq. 2), centred per context.

    Only differences within a context are identified (r̂ + f(x) fits as well: Lemma 1), hence the
    centring, which changes no π*. The maximum exists only if, in every context, each response
    beat and was beaten by a chain of others (the win graph is strongly connected, Zermelo 1929);
    otherwise r̂ runs to ±∞ and a ValueError says which context and how to fix it.
    """
    n_x, n_y = shape
    for x in range(n_x):
        rows = pairs.context == x
        wins = coo_matrix((np.ones(int(rows.sum())), (pairs.chosen[rows], pairs.rejected[rows])), shape=(n_y, n_y))
        if connected_components(wins, directed=True, connection="strong")[0] != 1:
            raise UnidentifiedReward(f"context {x}: the preference pairs do not compare every response both ways (the win graph is "
                             "not strongly connected), so the maximum-likelihood reward is infinite; draw more pairs "
                             "(checks.convergence_pairs) or use a less peaked reference")
    reward = torch.zeros(n_x, n_y, dtype=torch.float64, requires_grad=True)
    x, w, l = (torch.as_tensor(a) for a in (pairs.context, pairs.chosen, pairs.rejected))
    optimiser = torch.optim.LBFGS([reward], max_iter=1000, tolerance_grad=1e-10, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = bt_loss(reward[x, w], reward[x, l]).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    fitted = reward.detach().numpy()
    return fitted - fitted.mean(1, keepdims=True)


def dpo_objective(pairs: BanditPairs, ref_probs: np.ndarray, beta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """DPO's loss (``losses.LOSSES["dpo"]``) on ``pairs``, averaged, as a function of the table log π (X, Y)."""
    spec = get_loss("dpo")
    ref = torch.as_tensor(np.log(ref_probs))
    x, w, l = (torch.as_tensor(a) for a in (pairs.context, pairs.chosen, pairs.rejected))

    def loss(logp: torch.Tensor) -> torch.Tensor:
        return spec.fn(logp[x, w], logp[x, l], ref[x, w], ref[x, l], beta=beta, params=spec.params()).mean()

    return loss


def train_table(objective: Callable[[torch.Tensor], torch.Tensor], ref_probs: np.ndarray, lr: float,
                steps: list[int]) -> dict[int, np.ndarray]:
    """A tabular softmax policy from π_ref, trained by full-batch Adam on ``objective(log π)``:
    π(y|x) (X, Y) after each of ``steps``. Full batches: no minibatch noise floor, so the distance
    to the optimum can shrink with the budget."""
    logits = torch.as_tensor(np.log(ref_probs)).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    out = {}
    for step in range(1, max(steps) + 1):
        optimiser.zero_grad()
        objective(torch.log_softmax(logits, dim=1)).backward()
        optimiser.step()
        if step in steps:
            out[step] = torch.softmax(logits.detach(), dim=1).numpy()
    return out


def context_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """b(x): the mean KL-penalised reward of context x's responses in the batch; (X, B) -> (X, B).
    At π* that reward is β·log Z(x) for every y, so the advantages vanish there: no noise floor."""
    return rewards.mean(1, keepdim=True).expand_as(rewards)


def global_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """b: one number per batch, the mean KL-penalised reward over all contexts; (X, B) -> (X, B).
    A reward that differs between contexts (β·log Z(x) at π*, or a prompt-only f(x)) stays in the
    advantages as noise whose mean over y is zero: it moves no optimum but slows the learner."""
    return rewards.mean().expand_as(rewards)


# PPO's own update: its epochs over each batch and its clip range (the grid's defaults).
PPO_EPOCHS, PPO_CLIP = PPOConfig().epochs, PPOConfig().clip_range


def ppo_table(reward: np.ndarray, ref_probs: np.ndarray, kl_coef: float, iterations: int, rng: np.random.Generator,
              baseline: Callable[[torch.Tensor], torch.Tensor] = context_baseline, per_context: int = 64,
              decay: float = 50.0) -> np.ndarray:
    """Sampled PPO on a tabular softmax policy from π_ref against ``reward`` (X, Y): π (iterations + 1, X, Y)
    along training, π_ref first.

    Each iteration: ``per_context`` responses y ~ π(·|x) for every context x; PPO's KL-penalised reward
    R = reward(x, y) − kl_coef·(log π − log π_ref) (``kl_penalised_rewards``, sequences of one token);
    advantages by ``gae`` with γ = λ = 1 and the ``baseline`` as the value (one token: A = R − b); then
    PPO_EPOCHS plain gradient steps on the clipped surrogate (``clipped_policy_loss``, ε = PPO_CLIP) with
    the step lr_t = lr0/(1 + t/decay) (Robbins-Monro: Σ lr_t = ∞, Σ lr_t² < ∞, so a noise floor shrinks).

    lr0 = 1/(PPO_EPOCHS·kl_coef): a context's objective E_π[r] − kl_coef·KL(π‖π_ref) equals
    −kl_coef·KL(π‖π*) + const, whose curvature in the logits is at most kl_coef·max_y π(y|x) ≤ kl_coef
    (the Fisher matrix diag π − ππᵀ), so an iteration's steps add up to at most one Newton step on any
    direction: stable (< 2/L) by construction, not by tuning. Advantages are not whitened: with the
    per-context baseline their spread vanishes at π*, and dividing by it would put the noise back.
    """
    n_x, n_y = ref_probs.shape
    ref = torch.as_tensor(np.log(ref_probs))
    scores = torch.as_tensor(reward, dtype=torch.float64)
    logits = ref.clone().requires_grad_(True)
    rows = np.repeat(np.arange(n_x), per_context)
    x, mask = torch.as_tensor(rows), torch.ones(len(rows), 1, dtype=torch.float64)
    lr0 = 1.0 / (PPO_EPOCHS * kl_coef)
    path = [ref_probs]
    for t in range(iterations):
        with torch.no_grad():
            old_table = torch.log_softmax(logits, dim=1)
        y = torch.as_tensor(sample_responses(old_table.exp().numpy(), rows, rng))
        old_logps = old_table[x, y].unsqueeze(1)
        rewards = kl_penalised_rewards(old_logps - ref[x, y].unsqueeze(1), scores[x, y], mask, kl_coef)
        advantages, _ = gae(rewards, baseline(rewards.reshape(n_x, per_context)).reshape(-1, 1), mask, 1.0, 1.0)
        lr = lr0 / (1 + t / decay)
        for _ in range(PPO_EPOCHS):
            logps = torch.log_softmax(logits, dim=1)[x, y].unsqueeze(1)
            # × n_x: the loss is a mean over all contexts' samples; each context's logits should
            # follow the gradient of its own objective, whose curvature sets lr0.
            (grad,) = torch.autograd.grad(n_x * clipped_policy_loss(logps, old_logps, advantages, mask, PPO_CLIP), logits)
            with torch.no_grad():
                logits -= lr * grad
        path.append(torch.softmax(logits.detach(), dim=1).numpy())
    return np.stack(path)


Learner = Callable[[np.ndarray, list[int]], dict[int, np.ndarray]]
"""A learner on the table: given an offset (X, Y) added to the reward it learns from, and budgets,
π (X, Y) after each budget."""


def dpo_learner(pairs: BanditPairs, ref_probs: np.ndarray, beta: float, lr: float) -> Learner:
    """Full-batch DPO on ``pairs`` from π_ref. The offset enters as DPO's reference π_ref·exp(offset/β)/Z:
    the implicit reward β·log π/π_ref less the offset, i.e. each pair's Bradley-Terry logit moved by
    offset(x, y_w) − offset(x, y_l). Its optimum is then π*(r̂ + offset), r̂ the pairs' ML reward."""
    def learn(offset: np.ndarray, steps: list[int]) -> dict[int, np.ndarray]:
        return train_table(dpo_objective(pairs, optimal_policy(ref_probs, offset, beta), beta), ref_probs, lr, steps)

    return learn


def ppo_learner(reward: np.ndarray, ref_probs: np.ndarray, kl_coef: float, seed: int, per_context: int, decay: float,
                baseline: Callable[[torch.Tensor], torch.Tensor] = context_baseline) -> Learner:
    """``ppo_table`` against ``reward`` + offset. Every run draws from the same seed: a run and its
    control see the same uniforms, so their difference is the offset's, not the sampler's."""
    def learn(offset: np.ndarray, steps: list[int]) -> dict[int, np.ndarray]:
        path = ppo_table(reward + offset, ref_probs, kl_coef, max(steps), np.random.default_rng(seed), baseline, per_context, decay)
        return {step: path[step] for step in steps}

    return learn


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over contexts of ½·Σ_y |p − q|."""
    return float(0.5 * np.abs(p - q).sum(1).mean())


def predicted_shift(reward: np.ndarray, ref_probs: np.ndarray, beta: float, offset: np.ndarray) -> float:
    """TV(π*(reward), π*(reward + offset)): how far the offset moves the optimum, exactly."""
    return total_variation(optimal_policy(ref_probs, reward, beta), optimal_policy(ref_probs, reward + offset, beta))


def control_offset(reward: np.ndarray, ref_probs: np.ndarray, beta: float, direction: np.ndarray, shift: float) -> np.ndarray:
    """δ·direction with δ > 0 chosen so that the optimum moves by exactly ``shift`` in total variation
    (``predicted_shift``), by root finding on δ."""
    def excess(delta: float) -> float:
        return predicted_shift(reward, ref_probs, beta, delta * direction) - shift

    high = 1.0
    while excess(high) < 0:
        high *= 2
        if high > 1e6:
            raise ValueError(f"no multiple of the control's direction moves π* by {shift:g} in total variation; "
                             "lower checks.convergence_control_shift")
    return brentq(excess, 0.0, high, xtol=1e-12) * direction


def convergence_tolerance(config: ChecksConfig, steps: int) -> float:
    """Full-batch DPO's total-variation tolerance after ``steps``: ``convergence_tolerance`` at N, ∝ 1/T
    beyond (the O(1/T) rate of gradient methods on smooth problems)."""
    return config.convergence_tolerance * config.convergence_steps / steps


def sampled_convergence_tolerance(config: ChecksConfig, iterations: int) -> float:
    """Sampled PPO's tolerance after ``iterations``: ``convergence_tolerance`` at N, ∝ 1/√T beyond. With a
    step ∝ 1/t, stochastic approximation's mean squared error in the parameters is O(1/t) (Robbins-Monro;
    Bottou, Curtis & Nocedal 2018, Thm 4.7), and TV is Lipschitz in the logits: O(1/√t), the slowest
    rate a correct sampled learner may have."""
    return config.convergence_tolerance * math.sqrt(config.convergence_steps / iterations)


def convergence_checks(name: str, learner: Learner, reward: np.ndarray, ref_probs: np.ndarray, beta: float, budgets: list[int],
                       tolerance: Callable[[int], float], direction: np.ndarray, control_shift: float, unit: str) -> list[CheckResult]:
    """``learner`` reaches π*(reward) within ``tolerance(T)`` at each of ``budgets`` T, closer at each
    budget than at the first. Control, per budget: the same learner with ``reward`` + δ·``direction``,
    δ chosen so that π* moves by ``control_shift`` tolerances (``control_offset``); detected if it ends
    beyond the tolerance from π*(reward) and within it of π*(reward + δ·direction): it moved where the
    perturbation predicts. Findings: total variation and KL(π‖π*) along training, and the controls'
    predicted and measured shifts."""
    target = optimal_policy(ref_probs, reward, beta)
    first = budgets[0]
    steps = sorted({max(1, first // 2), *budgets, 2 * first})
    run = learner(np.zeros_like(reward), steps)
    results, findings = [], []
    for budget in budgets:
        tv, limit = total_variation(run[budget], target), tolerance(budget)
        offset = control_offset(reward, ref_probs, beta, direction, control_shift * limit)
        moved = optimal_policy(ref_probs, reward + offset, beta)
        control = learner(offset, [budget])[budget]
        control_tv, control_to_moved = total_variation(control, target), total_variation(control, moved)
        closer = budget == first or tv < total_variation(run[first], target)
        results.append(CheckResult(
            f"bandit_convergence[{name}, {budget} {unit}]",
            f"TV(π, π*(r̂)) at β={beta:g} after {budget} {unit} (tolerance {tolerance(first):g} at {first}"
            + (f"; must also be below the {first}-{unit[:-1]} TV" if budget != first else "")
            + f"); control: r̂ + δ·g(x, y), π* moved by {control_shift:g} tolerances, must end beyond the tolerance from "
            f"π*(r̂) (control value) and within it of π*(r̂ + δg) (measured {control_to_moved:.3g})",
            tv, limit, control_tv, bool(tv <= limit and closer), bool(control_tv > limit and control_to_moved <= limit)))
        for quantity, value in (("predicted shift TV(π*(r̂), π*(r̂ + δg))", total_variation(moved, target)),
                                ("TV(π_control, π*(r̂))", control_tv), ("TV(π_control, π*(r̂ + δg))", control_to_moved)):
            findings.append(CheckResult.finding(f"bandit_convergence_control[{name}]", quantity, value, budget))
    for step in steps:
        findings.append(CheckResult.finding(f"bandit_convergence_curve[{name}]", "TV(π, π*(r̂))",
                                            total_variation(run[step], target), step))
        findings.append(CheckResult.finding(f"bandit_convergence_curve[{name}]", "KL(π‖π*(r̂))",
                                            float(exact_kl_rows(run[step], target).mean()), step))
    return results + findings


def iterations_to_stay_within(path: np.ndarray, target: np.ndarray, limit: float) -> float:
    """The first iteration from which the total variation to ``target`` stays ≤ ``limit`` to the end
    of ``path`` (T + 1, X, Y); NaN if the last iterate is beyond it. Robust to a noisy path that dips
    below the limit once."""
    beyond = np.flatnonzero([total_variation(p, target) > limit for p in path])
    if len(beyond) and beyond[-1] == len(path) - 1:
        return math.nan
    return float(beyond[-1] + 1) if len(beyond) else 0.0


def global_noise_ratio(reward: np.ndarray, shift: np.ndarray, ref_probs: np.ndarray) -> float:
    """How much a prompt-only ``shift`` f(x) (X, 1) adds to the noise of PPO's gradient with a global
    baseline, at the start (π = π_ref, where the KL penalty is zero): Var(r + f − b) / Var(r − b), b the
    mean over contexts (uniform) and y ~ π_ref. Known before training, from the tables alone."""
    def variance(r: np.ndarray) -> float:
        return float((ref_probs * (r - (ref_probs * r).sum(1).mean()) ** 2).sum(1).mean())

    return variance(reward + shift) / variance(reward)


# The largest factor by which the Lemma 2 check enlarges the r̂ + f(x) run's batch (its cost).
MAX_NOISE_MATCH = 8.0


def lemma2_bandit(reward: np.ndarray, shift: np.ndarray, ref_probs: np.ndarray, beta: float, seed: int, per_context: int,
                  decay: float, budgets: list[int], tolerance: Callable[[int], float], control: np.ndarray) -> list[CheckResult]:
    """Lemma 2 at the optimum with a sampled learner: PPO with a *global* baseline (one number per batch,
    which cannot absorb a prompt-only f(x)) against r̂ and against r̂ + f(x) (``shift`` (X, 1)) both end
    within ``tolerance`` of the same π*(r̂) after the last of ``budgets`` (iterations).

    Lemma 2 is about the optimum, not the speed: f(x) stays in the advantages as zero-mean noise that
    slows the learner without moving its optimum. So the r̂ + f run of the check draws a batch larger by
    ``global_noise_ratio`` (at most MAX_NOISE_MATCH), which makes its gradient noise at the start equal
    to the r̂ run's; the r̂ + f run at the r̂ run's batch is a finding, the cost of the shift in speed.
    Control, for each check: the same run with a y-dependent ``control`` offset added, whose optimum is
    elsewhere: detected if it ends beyond the tolerance from π*(r̂) and within it of π*(r̂ + control).

    Findings: TV to π*(r̂) along the runs (``lemma2_bandit_ppo_speed``), and the iterations after which
    each stays within the tolerance of the first budget and of the last (``lemma2_bandit_ppo_reach``)."""
    target, moved = optimal_policy(ref_probs, reward, beta), optimal_policy(ref_probs, reward + control, beta)
    first, iterations = budgets[0], budgets[-1]
    limit = tolerance(iterations)
    offset = np.broadcast_to(shift, reward.shape)
    ratio = global_noise_ratio(reward, shift, ref_probs)
    matched = int(round(per_context * min(max(ratio, 1.0), MAX_NOISE_MATCH)))
    described = f" (f(x) ~ N(0, σ²) per context, here of std {float(np.std(shift)):.3g})"

    def run(extra: np.ndarray | float, batch: int) -> np.ndarray:
        return ppo_table(reward + extra, ref_probs, beta, iterations, np.random.default_rng(seed), global_baseline, batch, decay)

    results, findings = [], []
    paths = {}
    for variant, (base, batch, note) in {
        "r̂": (0.0, per_context, f"{per_context} samples a context"),
        "r̂+f": (offset, matched, f"{matched} samples a context: f raises the start's gradient noise {ratio:.3g}-fold"
                                 + (f" (capped at {MAX_NOISE_MATCH:g})" if ratio > MAX_NOISE_MATCH else "")
                                 + f", so its batch is {per_context}·{min(max(ratio, 1.0), MAX_NOISE_MATCH):.3g}"),
    }.items():
        path, control_path = run(base, batch), run(base + control, batch)
        paths[variant] = path
        tv, control_tv, control_to_moved = (total_variation(path[-1], target), total_variation(control_path[-1], target),
                                            total_variation(control_path[-1], moved))
        results.append(CheckResult(
            f"lemma2_bandit_ppo[{variant}]",
            f"TV(π, π*(r̂)) after {iterations} iterations of sampled PPO with a global baseline against {variant}"
            f"{described if variant != 'r̂' else ''}, {note}; control: {variant} + δ·g(x, y), π* moved by "
            f"{total_variation(moved, target):.3g}, must end beyond the tolerance from π*(r̂) and within it of "
            f"π*(r̂ + δg) (measured {control_to_moved:.3g})",
            tv, limit, control_tv, bool(tv <= limit), bool(control_tv > limit and control_to_moved <= limit)))
    paths[f"r̂+f, {per_context} a context"] = run(offset, per_context)
    findings.append(CheckResult.finding("lemma2_bandit_ppo_noise", "Var(r̂ + f − b) / Var(r̂ − b) at π_ref (global baseline b)", ratio))
    for variant, path in paths.items():
        for step in sorted({max(1, first // 2), first, 2 * first, iterations}):
            findings.append(CheckResult.finding(f"lemma2_bandit_ppo_speed[{variant}]", "TV(π, π*(r̂))",
                                                total_variation(path[step], target), step))
        for budget in budgets:
            findings.append(CheckResult.finding(
                "lemma2_bandit_ppo_reach", f"iterations until TV stays ≤ {tolerance(budget):.3g} under {variant}",
                iterations_to_stay_within(path, target, tolerance(budget))))
    return results + findings


def bandit_convergence(ref_probs: np.ndarray, rewards: np.ndarray, config: ChecksConfig, rng: np.random.Generator) -> list[CheckResult]:
    """Theorem 1 and Lemma 2 in practice, on a table, against the maximum-likelihood reward r̂ of
    Bradley-Terry pairs drawn from π_ref: full-batch DPO on the pairs reaches π* = π_ref·exp(r̂/β)/Z
    within a tolerance ∝ 1/T, sampled PPO against r̂ within one ∝ 1/√T, each at N and 4N and closer at
    4N (``convergence_checks``); PPO with a global baseline against r̂ and r̂ + f(x) both reach that
    π* (``lemma2_bandit``). Every control is the same learner with a y-dependent term δ·g(x, y) added
    to what it learns from, δ set so that π* moves by a stated multiple of the tolerance: it must move
    by that much."""
    beta, n = config.convergence_beta, config.convergence_steps
    budgets = [n, 4 * n]
    pairs = reference_pairs(ref_probs, rewards, config.convergence_pairs, rng)
    reward_hat = fit_tabular_reward(pairs, rewards.shape)
    direction = rng.standard_normal(rewards.shape)
    direction -= direction.mean(1, keepdims=True)  # y-dependent only: a prompt-only part would move no π*
    shift = rng.normal(0.0, config.lemma2_bandit_shift, size=(rewards.shape[0], 1))
    seed = int(rng.integers(2**32))
    dpo_tolerance = functools.partial(convergence_tolerance, config)
    ppo_tolerance = functools.partial(sampled_convergence_tolerance, config)
    # PPO's step halves by the first budget (decay = N) and is a fifth of lr0 at the second.
    per_context, decay = config.convergence_ppo_batch, float(n)
    common = dict(reward=reward_hat, ref_probs=ref_probs, beta=beta, budgets=budgets, direction=direction,
                  control_shift=config.convergence_control_shift)
    results = convergence_checks("dpo", dpo_learner(pairs, ref_probs, beta, config.convergence_lr), tolerance=dpo_tolerance,
                                 unit="steps", **common)
    results += convergence_checks("ppo", ppo_learner(reward_hat, ref_probs, beta, seed, per_context, decay),
                                  tolerance=ppo_tolerance, unit="iterations", **common)
    control = control_offset(reward_hat, ref_probs, beta, direction, config.convergence_control_shift * ppo_tolerance(budgets[-1]))
    results += lemma2_bandit(reward_hat, shift, ref_probs, beta, seed, per_context, decay, budgets, ppo_tolerance, control)
    return sorted(results, key=lambda r: r.kind)  # checks first, then findings

_BANDIT_CHECKS: dict[tuple, tuple[CheckResult, ...]] = {}


def bandit_checks(ref_probs: np.ndarray, rewards: np.ndarray, config: ChecksConfig, seed: int) -> tuple[CheckResult, ...]:
    """``bandit_convergence`` on these tables with ``default_rng(seed)``, once per process for the same
    inputs (the bandit tables rarely depend on the preset: every run of a process, a test suite's
    included, would compute the same rows)."""
    key = (ref_probs.tobytes(), ref_probs.shape, rewards.tobytes(), rewards.shape, repr(config), seed)
    if key not in _BANDIT_CHECKS:
        threads = torch.get_num_threads()
        # Tables of a few hundred numbers: more threads only add overhead (benchmarks/RESULTS.md, "Speed
        # on the review task", the bandit checks).
        torch.set_num_threads(1)
        try:
            results = bandit_convergence(ref_probs, rewards, config, np.random.default_rng(seed))
        except UnidentifiedReward as e:  # pairs that leave the maximum-likelihood reward infinite: a failed check, not a failed run
            results = [CheckResult("bandit_convergence", f"not computed: {e}", math.nan, config.convergence_tolerance,
                                   math.nan, False, False)]
        finally:
            torch.set_num_threads(threads)
        _BANDIT_CHECKS[key] = tuple(results)
    return _BANDIT_CHECKS[key]
