"""Best-of-N's shared pool of draws: every N of a run chooses among prefixes of the same draws, which
the largest N builds once, and another replicate seed gets another pool."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.bench import Cell, load_config
from dpo_bench.evaluate import exact_kl
from dpo_bench.methods.base import best_of_n_kl
from dpo_bench.methods.best_of_n import BestOfNPolicy, pack, unpack
from dpo_bench.run import Timings, plan_stages, upstream_for
from dpo_bench.stages import Bench, StoreShared, run_cell


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    config = load_config("quick", overrides={"task": "bandit", "evaluation": {"n_checkpoints": 1, "temperatures": [1.0]}})
    cache = tmp_path_factory.mktemp("cache")
    bench = Bench(config, cache, progress=False)
    return bench, plan_stages(bench, Timings()), cache


def _proxy(stage) -> pd.Series:
    return pd.read_parquet(stage.path / "samples.parquet")["proxy_reward"]


def test_every_n_chooses_among_prefixes_of_one_pool(bandit):
    bench, stages, cache = bandit
    cells = {n: Cell("best_of_n", n, 0, overrides=(("kl_pool", 8),)) for n in (8, 2, 1)}
    built = {n: run_cell(bench, cell, upstream_for(cell, stages)) for n, cell in cells.items()}
    # N = 8 drew rounds 0-7 at the one eval temperature (its KL pool of 8 too); N = 2 and N = 1 drew nothing more.
    assert len([p for p in (cache / "shared").iterdir() if not p.name.startswith(".")]) == 8
    # More draws of the same pool can only find a better-scored completion for every prompt, and
    # N = 1 is the pool's first draw: with independent draws per N neither would hold row by row.
    p1, p2, p8 = _proxy(built[1]), _proxy(built[2]), _proxy(built[8])
    assert (p2 >= p1 - 1e-6).all() and (p8 >= p2 - 1e-6).all()
    assert (p8 > p1 + 1e-6).any()


def test_another_replicate_seed_draws_another_pool(bandit):
    bench, stages, _ = bandit
    up = upstream_for(Cell("best_of_n", 2, 0), stages)
    assert StoreShared(bench, up, 0).seed != StoreShared(bench, up, 1).seed
    task = bench.task(stages["task"])
    reference, rm = bench.reference(stages["sft"]), bench.reward_model(stages["reward_model"], stages["sft"])
    prompts = [task.encode_prompt(p) for p in task.eval_prompts]
    draws = [BestOfNPolicy(reference, rm, 1, task, StoreShared(bench, up, s)).sample(prompts, generator=None, temperature=1.0)
             for s in (0, 1, 0)]
    assert draws[0].completion_ids == draws[2].completion_ids != draws[1].completion_ids


def test_without_a_shared_store_each_call_draws_afresh(bandit):
    bench, stages, _ = bandit
    task = bench.task(stages["task"])
    policy = BestOfNPolicy(bench.reference(stages["sft"]), bench.reward_model(stages["reward_model"], stages["sft"]), 4, task)
    prompts = [task.encode_prompt(p) for p in task.eval_prompts]
    a, b = (policy.sample(prompts, generator=torch.Generator().manual_seed(s), temperature=1.0) for s in (0, 1))
    assert a.completion_ids != b.completion_ids
    assert a.batch.completion_mask.sum().item() == sum(len(c) for c in a.completion_ids)


def test_the_kl_estimated_from_a_large_pool_is_the_exact_best_of_n_kl(bandit):
    """On the bandit best-of-N's distribution is known exactly (order statistics of the reward
    model's scores), so its KL is too; the estimate from a pool of draws must find it, and stay
    below log N − (N−1)/N."""
    bench, stages, _ = bandit
    task = bench.task(stages["task"])
    reference, rm = bench.reference(stages["sft"]), bench.reward_model(stages["reward_model"], stages["sft"])
    contexts = task.context_ids
    for n in (2, 4):
        policy = BestOfNPolicy(reference, rm, n, task, pool=4000)
        samples = policy.sample([[int(x)] for x in contexts], generator=torch.Generator().manual_seed(n), temperature=1.0)
        estimate = policy.kl_estimate(samples)
        exact = exact_kl(policy.distribution(contexts).numpy(), reference.probabilities(contexts).double().numpy())
        np.testing.assert_allclose(estimate, exact, atol=0.03)
        assert (estimate <= best_of_n_kl(n) + 1e-9).all() and exact.max() > 0.05


def test_the_optimum_estimated_from_a_large_pool_is_the_exact_optimum(bandit):
    """The regularised optimum's objective is c·log E_{y~π_ref} exp(s(x, y)/c), exactly known on the
    bandit; its estimate from a pool of reference draws finds it, and a cell writes its pool."""
    from dpo_bench.stages import pool_frame
    from dpo_bench.verdict import Objective

    bench, stages, _ = bandit
    task = bench.task(stages["task"])
    reference, rm = bench.reference(stages["sft"]), bench.reward_model(stages["reward_model"], stages["sft"])
    contexts = task.context_ids
    policy = BestOfNPolicy(reference, rm, 1, task, pool=4000)
    samples = policy.sample([[int(x)] for x in contexts], generator=torch.Generator().manual_seed(3), temperature=1.0)
    frame = pd.DataFrame({"split": "test", "prompt_index": np.arange(len(contexts))})
    pool = pool_frame(frame, *policy.pool_draws())
    assert len(pool) == 4000 * len(contexts) and not pool["truncated"].any()
    probs = reference.probabilities(contexts).double().numpy()
    with torch.no_grad():
        exact = []
        for row, x in enumerate(contexts.tolist()):
            ys = torch.arange(probs.shape[1])
            scores = rm.normalised_score(torch.stack([torch.full_like(ys, x), ys], 1), torch.ones(len(ys), 2, dtype=torch.long))
            exact.append(scores.double().numpy())
    for c in (0.3, 1.0):
        truth = [c * np.log((p * np.exp(s / c)).sum()) for p, s in zip(probs, exact)]
        np.testing.assert_allclose(Objective(c).optimum(pool), truth, atol=0.02)
    # A best-of-N cell keeps its pool of the eval prompts for the report's optimum.
    built = run_cell(bench, Cell("best_of_n", 2, 0, overrides=(("kl_pool", 8),)), upstream_for(Cell("best_of_n", 2, 0), stages))
    written = pd.read_parquet(built.path / "pool.parquet")
    assert set(written.columns) >= {"split", "prompt_index", "draw", "proxy_reward", "truncated", "seed", "step"}
    assert written.groupby(["split", "prompt_index"]).size().eq(8).all()


def test_packed_rows_unpack_to_themselves():
    rows = [[3, 1, 4], [], [1, 5, 9, 2, 6], [0]]
    assert unpack(pack(rows)) == rows
