"""PPO's adaptive KL controller on the exact bandit: with ``target_kl`` the policy's KL reaches the
target from either side, where the coefficient it starts from would settle far from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.bench import Cell, load_config
from dpo_bench.run import Timings, plan_stages, upstream_for
from dpo_bench.stages import Bench, run_cell
from dpo_bench.tasks.bandit import exact_kl_rows, optimal_policy

TARGET = 0.3
ITERATIONS = 250
ROLLOUT_BATCH = 64  # PPOConfig's default


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    config = load_config("quick", overrides={
        "task": "bandit", "preferences": {"label_temperature": 0.5},
        "evaluation": {"n_checkpoints": 5}, "bandit": {"train_repeats": 400, "eval_repeats": 10},
    })
    bench = Bench(config, tmp_path_factory.mktemp("cache"), progress=False)
    stages = plan_stages(bench, Timings())
    task = bench.task(stages["task"])
    rm = bench.reward_model(stages["reward_model"], stages["sft"])
    # r̂ of every (x, y): the reward PPO optimises, so the optimum at kl_coef c is π_ref·exp(r̂/c)/Z.
    pairs = torch.cartesian_prod(task.context_ids, task.response_ids)
    r_hat = rm.normalised_score(pairs, torch.ones_like(pairs)).double().numpy().reshape(len(task.context_ids), -1)
    ref = task.response_probs(bench.reference(stages["sft"]))
    return bench, stages, ref, r_hat


def optimum_kl(ref: np.ndarray, r_hat: np.ndarray, kl_coef: float) -> float:
    return float(exact_kl_rows(optimal_policy(ref, r_hat, kl_coef), ref).mean())


@pytest.mark.parametrize("start", [0.1, 3.0])
def test_ppo_with_target_kl_reaches_its_target(bandit, start):
    """From kl_coef 0.1 (whose optimum has KL ≈ 1.9, far above the target) and 3.0 (KL ≈ 0.04, far
    below), the controller brings the KL to 0.3 nats.

    Tolerance, 20% both ways. The controller reads the KL only through 64-rollout estimates, whose
    relative sd at the target is about 26% here (0.072-0.098 nats at 0.3), and its error is clipped
    at ±0.2, so the KL wanders around the target and settles slightly below it (the estimates are
    skewed to the right). Over 4 seeds × these 2 starts the mean of the last 100 rollout KLs came
    within 14% of the target (0.258-0.303) and the exact KL of the last three checkpoints within 9%
    (0.274-0.313). Where the starting coefficient settles, and the farthest the earlier horizon of
    10,000 episodes could take it (×1.0013 an iteration, ×1.38 in 250: KL 1.7 and 0.07), lie far
    outside the band.
    """
    bench, stages, ref, r_hat = bandit
    start_kl, old_horizon_reach = optimum_kl(ref, r_hat, start), (1 + 0.2 * ROLLOUT_BATCH / 10_000) ** ITERATIONS
    # a KL above the target raises kl_coef, one below lowers it
    old_kl = optimum_kl(ref, r_hat, start * old_horizon_reach if start_kl > TARGET else start / old_horizon_reach)
    for kl in (start_kl, old_kl):
        assert abs(kl / TARGET - 1) > 0.5, "the starting coefficient alone would pass: the test would show nothing"

    cell = Cell("ppo", start, 0, (("iterations", ITERATIONS), ("lr", 0.05), ("target_kl", TARGET)))
    stage = run_cell(bench, cell, upstream_for(cell, stages))
    assert '"ok"' in (stage.path / "status.json").read_text()
    metrics = pd.read_parquet(stage.path / "metrics.parquet")
    rollout_kl = metrics[metrics["metric"] == "train/kl"].sort_values("step")["value"].to_numpy()
    exact = metrics[(metrics["metric"] == "kl") & (metrics["temperature"] == 1.0)].sort_values("step")["value"].to_numpy()
    assert len(rollout_kl) == ITERATIONS and len(exact) == 5
    assert rollout_kl[-100:].mean() == pytest.approx(TARGET, rel=0.2)
    assert exact[-3:].mean() == pytest.approx(TARGET, rel=0.2)


def test_ppo_with_the_exact_kl_settles_at_the_optimums_kl(bandit):
    """At kl_coef 1 the optimum π_ref·exp(r̂)/Z has KL 0.24 here; with the exact per-token KL
    (whose penalty reaches the policy through the loss's KL term: without it the policy follows r̂
    alone and ends at KL 2.1) PPO's exact KL over its last three checkpoints comes within 20% of
    it. Over 2 seeds: 0.216-0.229 (the sampled log-ratio: 0.236-0.271)."""
    estimator = "exact"
    bench, stages, ref, r_hat = bandit
    target = optimum_kl(ref, r_hat, 1.0)
    assert optimum_kl(ref, r_hat, 0.2) > 2 * target  # a weaker penalty would fail the test
    cell = Cell("ppo", 1.0, 0, (("iterations", ITERATIONS), ("lr", 0.05), ("kl_estimator", estimator)))
    stage = run_cell(bench, cell, upstream_for(cell, stages))
    metrics = pd.read_parquet(stage.path / "metrics.parquet")
    exact = metrics[(metrics["metric"] == "kl") & (metrics["temperature"] == 1.0)].sort_values("step")["value"].to_numpy()
    assert exact[-3:].mean() == pytest.approx(target, rel=0.2)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, [1.0] * 8),
    ("linear", 0, [1 - i / 8 for i in range(8)]),
    ("constant", 4, [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]),
    ("linear", 4, [(min(i + 1, 4) / 4) * (1 - i / 8) for i in range(8)]),
])
def test_ppo_learning_rate_schedule(bandit, monkeypatch, schedule, warmup, expected):
    """``lr_schedule`` and ``warmup_iterations``: the rate of each of 8 iterations, constant or decaying
    linearly to 1/8 of the peak, after a linear warm-up over 4 iterations or none."""
    import dpo_bench.methods.ppo as ppo

    optimisers, rates = [], []
    make = ppo.make_optimizer
    monkeypatch.setattr(ppo, "make_optimizer", lambda model, lr: optimisers.append(make(model, lr)) or optimisers[-1])

    bench, stages, _, _ = bandit
    cell = Cell("ppo", 0.5, 0, (("iterations", 8), ("lr", 0.05), ("epochs", 1), ("n_minibatches", 1), ("lr_schedule", schedule),
                                ("warmup_iterations", warmup)))
    with monkeypatch.context() as m:
        m.setattr(ppo.torch.nn.utils, "clip_grad_norm_", lambda params, norm: rates.append(optimisers[0].param_groups[0]["lr"]))
        stage = run_cell(bench, cell, upstream_for(cell, stages))
    assert '"ok"' in (stage.path / "status.json").read_text()
    assert rates == pytest.approx([0.05 * f for f in expected])


def test_lr_factor_and_the_schedule_field():
    """The DPO family and SFT step through ``warmup_schedule``; PPO sets ``lr_factor`` each iteration."""
    from dpo_bench.configs import ConfigError
    from dpo_bench.methods.base import get_method
    from dpo_bench.training import lr_factor, warmup_schedule

    assert [lr_factor(s, 10, 4) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert [lr_factor(s, 10, 0, "linear") for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    assert lr_factor(1, 10, 4, "linear") == pytest.approx(0.5 * 0.9)  # warm-up times decay
    optimiser = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    schedule, seen = warmup_schedule(optimiser, 2, 4, "linear"), []
    for _ in range(4):
        seen.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    assert seen == pytest.approx([2.0 * 0.5 * 1.0, 2.0 * 0.75, 2.0 * 0.5, 2.0 * 0.25])
    for method in ("dpo", "ppo", "sft"):
        with pytest.raises(ConfigError, match="lr_schedule"):
            get_method(method).make_config({"lr_schedule": "cosine"}, None)
    with pytest.raises(ConfigError, match="warmup_iterations must be >= 0, got -1"):
        get_method("ppo").make_config({"warmup_iterations": -1}, None)
