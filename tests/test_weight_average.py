"""The `ema` option (Polyak averaging of the policy's weights) of PPO and the DPO family, through
real cells on the exact bandit: the policy a cell evaluates and returns is the exponential moving
average of the weights after every optimiser step, computed here by hand from those weights; the
training itself (rollouts, losses) is the same as without it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dpo_bench.bench import Cell, load_config
from dpo_bench.configs import ConfigError
from dpo_bench.methods.ppo import PPOConfig
from dpo_bench.run import Timings, plan_stages, upstream_for
from dpo_bench.stages import Bench, run_cell
from dpo_bench.training import OptimConfig, WeightAverage

DECAY = 0.8


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    bench = Bench(load_config("quick", overrides={"task": "bandit"}), tmp_path_factory.mktemp("cache"), progress=False)
    return bench, plan_stages(bench, Timings())


def _spied_cell(bench, stages, cell, monkeypatch):
    """Run ``cell`` recording the trained weights after every optimiser step, the weights each
    checkpoint evaluated and the weights the method returned."""
    iterates, evaluated, returned = [], [], []
    update, current, finish = WeightAverage.update, WeightAverage.current, WeightAverage.finish

    def params(model):
        return [p.detach().clone() for p in model.parameters()]

    def spy_update(self):
        iterates.append(params(self.model))
        update(self)

    def spy_current(self):
        model = current(self)
        evaluated.append(params(model))
        return model

    def spy_finish(self):
        model = finish(self)
        returned.append(params(model))
        return model

    monkeypatch.setattr(WeightAverage, "update", spy_update)
    monkeypatch.setattr(WeightAverage, "current", spy_current)
    monkeypatch.setattr(WeightAverage, "finish", spy_finish)
    stage = run_cell(bench, cell, upstream_for(cell, stages))
    monkeypatch.undo()
    assert '"ok"' in (stage.path / "status.json").read_text()
    return iterates, evaluated, returned, pd.read_parquet(stage.path / "metrics.parquet")


def _ema(iterates, decay):
    average = [p.clone() for p in iterates[0]]
    for weights in iterates[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights)]
    return average


@pytest.mark.parametrize("method, settings", [
    ("dpo", (("steps", 30), ("lr", 0.05))),
    ("ppo", (("iterations", 6), ("lr", 0.05))),
])
def test_a_cell_evaluates_and_returns_the_moving_average_of_its_weights(bandit, monkeypatch, method, settings):
    bench, stages = bandit
    plain = _spied_cell(bench, stages, Cell(method, 0.5, 0, settings), monkeypatch)
    averaged = _spied_cell(bench, stages, Cell(method, 0.5, 0, settings + (("ema", DECAY),), name=method), monkeypatch)
    iterates, evaluated, returned, metrics = averaged
    # The name gives both cells the same seed: the same training, step for step.
    assert len(iterates) == len(plain[0]) > 1
    for ours, theirs in zip(iterates, plain[0]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # Without ema the cell evaluates and returns its last weights; with it, their average.
    assert all(torch.equal(a, b) for a, b in zip(plain[2][0], plain[0][-1]))
    expected = _ema(iterates, DECAY)
    for got in (evaluated[-1], returned[0]):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(returned[0], iterates[-1]))
    # ... and it is what was evaluated: another policy, other numbers
    kl = metrics[metrics["metric"] == "kl"]["value"].iloc[-1]
    assert kl != plain[3][plain[3]["metric"] == "kl"]["value"].iloc[-1]


def test_an_ema_decay_outside_zero_to_one_is_refused():
    for config in (OptimConfig, PPOConfig):
        with pytest.raises(ConfigError, match=r"ema must be in \[0, 1\), got 1"):
            config(ema=1.0)
        with pytest.raises(ConfigError, match="got -0.1"):
            config(ema=-0.1)


def test_the_first_update_copies_the_weights_and_finish_writes_the_average_into_the_model():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, 0.5)
    assert average.current() is not model
    with torch.no_grad():
        model.weight.fill_(2.0)
    average.update()
    with torch.no_grad():
        model.weight.fill_(4.0)
    average.update()
    assert torch.equal(average.current().weight, torch.full((1, 2), 3.0))
    assert average.finish() is model and torch.equal(model.weight, torch.full((1, 2), 3.0))
    assert WeightAverage(model, 0.0).current() is model
