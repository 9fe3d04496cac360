"""Mixed precision: the forward passes run under autocast in the chosen precision while the
weights, their gradients and the optimiser stay float32; fp16's scaled loss gives the unscaled
gradient; and a precision this machine resolves is recorded in every trained stage's key."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dpo_bench.bench import load_config
from dpo_bench.configs import ConfigError
from dpo_bench.logprobs import collate, token_logps
from dpo_bench.precision import FP32, Precision, resolve_precision
from dpo_bench.training import OptimConfig, TrainLog, optimise
from reward.model import RewardModel
from reward.train import RewardTrainConfig, train_reward_model

from .test_distributed import _pairs
from .test_training import _model, _sft_data

CPU = torch.device("cpu")


def test_auto_is_fp32_on_the_cpu_and_a_named_precision_is_kept():
    assert resolve_precision("auto", CPU) == "fp32"
    assert [resolve_precision(p, CPU) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ConfigError, match="precision: unknown precision 'half'; use auto, fp32, bf16, fp16"):
        load_config("quick", overrides={"precision": "half"})


def _train(precision: Precision, steps: int = 3, max_grad_norm: float = 1e9):
    """SFT's loss on a tiny GPT-2 through ``optimise``: the model, its losses, each step's
    gradient as the optimiser receives it, and the dtypes the LM head's matmul produced."""
    model = _model()
    prompts, completions = _sft_data()
    seen, grads = set(), []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.add(out.dtype))

    def loss_fn(idx):
        batch = collate([prompts[i] for i in idx], [completions[i] for i in idx], 0)
        logps = token_logps(model, batch)
        return -logps.sum() / batch.completion_mask[:, 1:].sum(), {}

    def record(optimizer, args, kwargs):
        grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(record)
    log = TrainLog()
    try:
        optimise(model, OptimConfig(steps=steps, batch_size=12, lr=1e-3, warmup_steps=0), loss_fn, n_items=len(prompts),
                 generator=torch.Generator().manual_seed(0), log=log, label="sft", progress=False,
                 max_grad_norm=max_grad_norm, precision=precision)
    finally:
        handle.remove()
    return model, [v for _, name, v, _ in log.records if name == "train/loss"], grads, seen


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_autocast_trains_float32_weights_on_the_whole_gradient(name):
    model, losses, grads, seen = _train(Precision(name, "cpu"))
    _, fp32_losses, fp32_grads, fp32_seen = _train(FP32)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert seen == {low} and fp32_seen == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads[0])
    # fp16's loss is scaled (by 65536 at first) for the backward pass and unscaled before the step:
    # the optimiser receives the gradient itself, within the precision's rounding.
    for g, g32 in zip(grads[0], fp32_grads[0]):
        torch.testing.assert_close(g, g32, atol=2e-3, rtol=5e-2)
    assert losses == pytest.approx(fp32_losses, rel=2e-2)


def test_a_reward_model_trains_under_autocast_with_float32_weights():
    def fit(precision):
        torch.manual_seed(0)
        model = RewardModel(_model())
        losses = []
        train_reward_model(model, _pairs(), RewardTrainConfig(steps=3, batch_size=4, lr=1e-3, group_by_length=False), pad_id=0,
                           generator=torch.Generator().manual_seed(0), progress=False, precision=precision,
                           log=lambda step, n, **m: losses.append(m["train/loss"]))
        return model, losses

    model, losses = fit(Precision("bf16", "cpu"))
    _, fp32_losses = fit(FP32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses == pytest.approx(fp32_losses, rel=2e-2)


def test_every_trained_stage_is_keyed_by_its_precision(tmp_path, monkeypatch):
    from dpo_bench.bench import Cell
    from dpo_bench.stages import Bench, Stage, Upstream, run_cell, train_rm, train_sft

    keys = []
    monkeypatch.setattr(Bench, "run_stage", lambda self, name, key, build: keys.append((name, key["precision"])))
    stage = Stage("stage", "k", tmp_path)
    for precision in ("auto", "bf16"):
        bench = Bench(load_config("quick", overrides={"precision": precision}), tmp_path)
        train_sft(bench, stage)
        train_rm(bench, stage, stage, stage)
        run_cell(bench, Cell("dpo", 0.1, 0), Upstream(task=stage, sft=stage, ref_eval=stage))
    assert keys == [(name, p) for p in ("fp32", "bf16") for name in ("sft", "reward_model", "cell")]  # auto is fp32 on this CPU
