"""Known results from the literature, reproduced on the exact bandit task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reward.bradley_terry import sample_bt_labels
from reward.gold import TableGold

from dpo_bench.logprobs import batched_sequence_logps, collate
from dpo_bench.methods.base import MethodContext, PreferenceTensors, get_method
from dpo_bench.tasks.bandit import BanditConfig, BanditTask, optimal_policy


def make_bandit(tmp_path, rewards, ref_logits) -> BanditTask:
    rewards, ref_logits = np.asarray(rewards, float), np.asarray(ref_logits, float)
    task = BanditTask(BanditConfig(n_contexts=rewards.shape[0], n_responses=rewards.shape[1]), tmp_path)
    task.rewards, task.ref_logits = rewards, ref_logits
    task.gold = TableGold(rewards, task.contexts, task.responses)
    return task


def context(task, pairs: list[tuple[str, str, str]], seed=0) -> MethodContext:
    """A method context over explicit (prompt, chosen, rejected) pairs."""
    reference = task.initial_model(seed)
    for p in reference.parameters():
        p.requires_grad_(False)
    prompts = [task.encode_prompt(x) for x, _, _ in pairs]
    chosen = collate(prompts, [task.encode_completion(w) for _, w, _ in pairs], task.pad_id)
    rejected = collate(prompts, [task.encode_completion(loser) for _, _, loser in pairs], task.pad_id)
    prefs = PreferenceTensors(
        prompts=[x for x, _, _ in pairs], chosen=chosen, rejected=rejected,
        ref_chosen_logps=batched_sequence_logps(reference, chosen),
        ref_rejected_logps=batched_sequence_logps(reference, rejected),
    )
    return MethodContext(
        task=task, reference=reference, device=torch.device("cpu"), seed=seed,
        generator=torch.Generator().manual_seed(seed), checkpoint=lambda step, policy: None, n_checkpoints=1,
        preferences=prefs, gold_scores=task.gold.score, progress=False,
    )


def train(method: str, ctx: MethodContext, **config) -> np.ndarray:
    policy = get_method(method).train(ctx, get_method(method).make_config(config))
    return ctx.task.response_probs(policy)


def test_dpo_recovers_the_kl_constrained_optimum_from_bradley_terry_data(tmp_path):
    """Lemma 2 in practice: with enough BT-labelled pairs, DPO's policy approaches π_β."""
    rewards = [[1.0, 0.2, -0.5, 0.0], [-1.0, 0.5, 0.8, 0.1]]
    ref_logits = [[0.3, -0.2, 0.1, 0.0], [0.0, 0.4, -0.3, 0.2]]
    task = make_bandit(tmp_path, rewards, ref_logits)
    rng = np.random.default_rng(0)
    ref_probs = task.response_probs(task.initial_model(0))
    pairs = []
    for x in range(2):
        a = rng.choice(4, size=6000, p=ref_probs[x])
        b = rng.choice(4, size=6000, p=ref_probs[x])
        keep = a != b
        a, b = a[keep], b[keep]
        a_wins, _ = sample_bt_labels(rng, task.rewards[x, a], task.rewards[x, b], 1.0)
        for i, j, win in zip(a, b, a_wins):
            w, loser = (i, j) if win else (j, i)
            pairs.append((f"x{x}", f"y{w}", f"y{loser}"))
    beta = 0.5
    probs = train("dpo", context(task, pairs), beta=beta, steps=600, batch_size=512, lr=0.05)
    target = optimal_policy(ref_probs, task.rewards, beta)
    assert np.abs(probs - target).max() < 0.05


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_dpo_drives_the_loser_to_zero_under_deterministic_preferences(tmp_path, beta):
    """Azar et al. 2023, section 5: with y1 ≻ y2 always, DPO sends π(y2) → 0 whatever β."""
    task = make_bandit(tmp_path, [[1.0, 0.0]], [[0.0, 0.0]])
    probs = train("dpo", context(task, [("x0", "y0", "y1")] * 64), beta=beta, steps=1500, batch_size=64, lr=0.1)
    assert probs[0, 1] < 0.01


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_ipo_keeps_the_closed_form_margin(tmp_path, beta):
    """IPO minimises (h − 1/(2β))²: with a uniform reference, π(y1) = σ(1/(2β)) (Azar et al. 2023)."""
    task = make_bandit(tmp_path, [[1.0, 0.0]], [[0.0, 0.0]])
    probs = train("ipo", context(task, [("x0", "y0", "y1")] * 64), beta=beta, steps=1500, batch_size=64, lr=0.05)
    assert probs[0, 0] == pytest.approx(1 / (1 + math.exp(-1 / (2 * beta))), abs=1e-3)


def test_dpo_moves_mass_to_a_response_never_compared(tmp_path):
    """Xu et al. 2024: DPO's solution need not stay where the data is.

    Only (y0, y1) is ever compared, with Bradley-Terry labels (P(y0 ≻ y1) = σ(1)). DPO fixes the
    ratio π(y0)/π(y1) and leaves the rest free: from π_ref = (0.1, 0.8, 0.1) the symmetric logit
    updates alone give π(y2) ≈ 0.133 > π_ref(y2), and once the loss is at its minimum nothing holds
    π(y2) in place (Adam drifts it further along this flat direction), although y2 has the worst
    gold reward. The KL-regularised optimum, what PPO targets, lowers it to ≈ 0.033.
    """
    rewards, ref = np.array([[1.0, 0.0, -1.0]]), np.log([[0.1, 0.8, 0.1]])
    task = make_bandit(tmp_path, rewards, ref)
    n_win = round(1000 / (1 + math.exp(-1.0)))
    pairs = [("x0", "y0", "y1")] * n_win + [("x0", "y1", "y0")] * (1000 - n_win)
    probs = train("dpo", context(task, pairs), beta=1.0, steps=800, batch_size=1000, lr=0.05)
    # DPO's loss is at its minimum: β·h = logit P(y0 ≻ y1) = 1.
    h = math.log(probs[0, 0] / probs[0, 1]) - math.log(0.1 / 0.8)
    assert h == pytest.approx(1.0, abs=0.02)
    assert probs[0, 2] > 0.12
    assert optimal_policy(np.exp(ref), rewards, 1.0)[0, 2] < 0.05


def test_ppo_cannot_go_where_the_reference_has_no_mass(tmp_path):
    """With a KL penalty, PPO stays on the reference's support even when the best response is off it."""
    task = make_bandit(tmp_path, [[0.0, 0.5, 1.0]], [[0.0, 0.0, -math.inf]])
    ctx = context(task, [("x0", "y0", "y1")])
    ctx.train_prompt_ids()  # the bandit's train prompts come from its config
    # The table's rewards as they are: this context has no SFT samples to normalise them on.
    probs = train("ppo_gt", ctx, kl_coef=0.1, iterations=40, lr=0.05, normalise_reward=False)
    assert probs[0, 2] == 0.0
    assert probs[0, 1] > 0.6  # it did optimise, on the support


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """TRL's invariant: batch 8 × 1 step equals batch 8 as 8 accumulated micro-batches of 1."""
    task = make_bandit(tmp_path, [[1.0, 0.2, -0.5]], [[0.1, -0.3, 0.0]])
    pairs = [("x0", "y0", "y1"), ("x0", "y2", "y1"), ("x0", "y0", "y2"), ("x0", "y1", "y2")] * 2
    ctx_one, ctx_acc = context(task, pairs), context(task, pairs)
    one = train("dpo", ctx_one, beta=0.5, steps=3, batch_size=8, lr=0.05)
    accumulated = train("dpo", ctx_acc, beta=0.5, steps=3, batch_size=8, lr=0.05, accumulation_steps=8)
    assert np.abs(one - accumulated).max() < 1e-6
    # Adam hides a mis-scaled gradient; the logged batch loss and metrics do not.
    logged = [(s, m, v) for s, m, v, _ in ctx_one.log.records]
    for (s1, m1, v1), (s2, m2, v2, _) in zip(logged, ctx_acc.log.records):
        assert (s1, m1) == (s2, m2) and v1 == pytest.approx(v2, abs=1e-6)
