"""The method contract, on the exact bandit task, for every registered method.

Parametrised over the registry (including a method a test package registers through the
``dpo_bench.methods`` entry point), so a new method is held to the contract the moment it exists:
it trains, stays finite, raises the gold reward over the reference, moves less under stronger
KL regularisation, and never ends above the exact reward-KL frontier.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dpo_bench.bench import Cell, load_config
from dpo_bench.methods.base import METHODS, get_method, load_plugins
from dpo_bench.run import Timings, plan_stages, upstream_for
from dpo_bench.stages import Bench, run_cell
from dpo_bench.tasks.bandit import exact_metrics, optimal_policy

from .plugin_support import install_readme_plugin

install_readme_plugin()
load_plugins()

# A moderate and a stronger (closer to the reference) value of each strength parameter.
STRENGTHS = {"beta": (0.3, 3.0), "kl_coef": (0.1, 1.0), "n": (8, 2), "alpha": (1.0, 0.1)}
TABLE_SETTINGS = {"lr": 0.05, "steps": 150, "iterations": 50}


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    config = load_config("quick", overrides={
        "task": "bandit",
        "preferences": {"label_temperature": 0.5},
        "evaluation": {"n_checkpoints": 1},
        "bandit": {"train_repeats": 400, "eval_repeats": 10},
    })
    bench = Bench(config, tmp_path_factory.mktemp("cache"), progress=False)
    stages = plan_stages(bench, Timings())
    task = bench.task(stages["task"])
    ref = task.response_probs(bench.reference(stages["sft"]))
    return bench, stages, task, ref


def _train(bandit, method: str, value) -> dict[str, float]:
    bench, stages, _, _ = bandit
    spec = get_method(method)
    fields = spec.config_cls.__dataclass_fields__
    overrides = tuple(sorted((k, v) for k, v in TABLE_SETTINGS.items() if k in fields))
    cell = Cell(method, value, 0, overrides)
    stage = run_cell(bench, cell, upstream_for(cell, stages))
    status = (stage.path / "status.json").read_text()
    assert '"ok"' in status, status
    m = pd.read_parquet(stage.path / "metrics.parquet")
    m = m[(m["temperature"] == 1.0)]
    final = m[m["step"] == m["step"].max()]
    return dict(zip(final["metric"], final["value"])) | {"_all": m["value"].to_numpy()}


def frontier_bound(task, ref: np.ndarray, kl: float) -> float:
    """max E[r] over policies with KL ≤ kl: E_π r ≤ R(β) + β·(kl − K(β)) for every β (π_β is optimal)."""
    best = math.inf
    for beta in np.geomspace(1e-3, 1e3, 400):
        m = exact_metrics(optimal_policy(ref, task.rewards, beta), ref, task.rewards)
        best = min(best, m["gold_reward"] + beta * (kl - m["kl"]))
    return best


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_contract(bandit, method):
    _, _, task, ref = bandit
    spec = get_method(method)
    moderate, strong = STRENGTHS.get(spec.strength, (None, None))
    result = _train(bandit, method, moderate)
    assert np.all(np.isfinite(result["_all"].astype(float))), f"{method}: non-finite metric"
    reference = exact_metrics(ref, ref, task.rewards)["gold_reward"]
    assert result["gold_reward"] <= frontier_bound(task, ref, result["kl"]) + 1e-6, f"{method} lies above the exact frontier"
    if method == "sft":
        assert result["kl"] == 0 and result["gold_reward"] == pytest.approx(reference)
        return
    assert result["gold_reward"] > reference + 0.02, f"{method} did not raise the gold reward ({result['gold_reward']:.3f} vs {reference:.3f})"
    if spec.strength is not None and spec.stronger_when is not None:
        stronger = _train(bandit, method, strong)
        assert stronger["kl"] < result["kl"], f"{method}: KL {stronger['kl']:.3f} at {strong} is not below {result['kl']:.3f} at {moderate}"


def test_the_readme_plugin_is_registered_through_the_entry_point():
    assert "dpop" in METHODS
    assert METHODS["dpop"].strength == "beta"
