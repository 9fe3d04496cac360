"""Reward-model step throughput: our ``train_reward_model`` against TRL's ``RewardTrainer``.

Both train the SFT trunk plus a scalar head at the last real token with the Bradley-Terry loss
−log σ(r(x, y_w) − r(x, y_l)), chosen and rejected in one forward. The models differ in form:
ours is the causal LM (``GPT2LMHeadModel``, asked for its hidden states) plus ``nn.Linear(d, 1)``
with a bias; TRL's is ``GPT2ForSequenceClassification`` (the same trunk, a head without bias, no
LM logits). The trunk weights are the SFT model's on both sides and the head is the same random
vector (not zero, so the first loss is not trivially log 2); the bias adds the same constant to
both rewards of a pair and cancels, so the objectives match and the first loss must agree
within 1e-5. Batches are the pairs our trainer draws, in its order.

    python -m benchmarks.reward_vs_trl [--steps 12] [--repeats 5]
"""

from __future__ import annotations

import copy
import tempfile

import torch

from .common import StepClock, fixture, interleave, load_average, median, set_threads, table, write_result
from .trl_support import (
    common_args, order_like_ours, require_trl, run_trl, step_comparison_parser, ticking_optimiser_steps, timed_trainer,
)

TOLERANCE = 1e-5


def pairs_of(fx):
    from reward.train import PairTensors

    c, r = fx.prefs.chosen, fx.prefs.rejected
    return PairTensors(c.input_ids, c.attention_mask, r.input_ids, r.attention_mask)


def build_ours(fx, head_seed: int):
    from reward.model import RewardModel

    model = RewardModel(fx.reference)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(head_seed)) * 0.1)
    return model


def build_trl(fx, ours_model):
    """GPT2ForSequenceClassification with our trunk's weights and our head's weight vector."""
    from transformers import GPT2ForSequenceClassification

    config = copy.deepcopy(fx.reference.config)
    config.num_labels = 1
    config.pad_token_id = fx.task.pad_id
    model = GPT2ForSequenceClassification(config)
    model.transformer.load_state_dict(ours_model.trunk.transformer.state_dict(), strict=True)
    with torch.no_grad():
        model.score.weight.copy_(ours_model.head.weight)
    return model.train()


def first_batch_loss(model, pairs, order, batch_size, pad_id) -> float:
    from reward.bradley_terry import bt_loss
    from reward.train import pair_scores

    with torch.no_grad():
        r_w, r_l = pair_scores(model, pairs.select(torch.tensor(order[:batch_size])), pad_id)
        return float(bt_loss(r_w, r_l).mean())


def ours(fx, model, pairs, *, steps, batch_size, lr, seed) -> StepClock:
    from reward.train import RewardTrainConfig, train_reward_model

    clock = StepClock()
    with ticking_optimiser_steps(clock):
        config = RewardTrainConfig(steps=steps, batch_size=batch_size, lr=lr, group_by_length=False)
        train_reward_model(model, pairs, config, pad_id=fx.task.pad_id, generator=torch.Generator().manual_seed(seed),
                           progress=False)
    return clock


def trl(fx, model, pairs, order, *, steps, batch_size, lr, workdir) -> tuple[StepClock, list[float]]:
    require_trl()
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    ids = lambda t, m, i: t[i][m[i].bool()].tolist()  # noqa: E731
    data = Dataset.from_dict({  # TRL's processed format: full prompt+response ids per side
        "chosen_ids": [ids(pairs.chosen_ids, pairs.chosen_mask, i) for i in order],
        "rejected_ids": [ids(pairs.rejected_ids, pairs.rejected_mask, i) for i in order],
    })
    # Our reward trainer uses torch's AdamW betas (0.9, 0.999) and clips at 1.0.
    args = RewardConfig(**common_args(workdir, steps=steps, batch_size=batch_size, lr=lr, beta2=0.999, max_grad_norm=1.0),
                        max_length=None, center_rewards_coefficient=None, pad_to_multiple_of=None)
    clock = StepClock()
    trainer = timed_trainer(RewardTrainer, clock, fx.task.tokenizer, model=model, args=args, train_dataset=data)
    run_trl(trainer, clock)
    return clock, trainer.losses


def main(argv: list[str] | None = None) -> None:
    args = step_comparison_parser(__doc__, lr=1e-4).parse_args(argv)
    set_threads(args.threads)
    require_trl()
    fx = fixture()
    pairs = pairs_of(fx)
    order = order_like_ours(len(pairs), args.batch_size, args.steps, args.seed)
    init = build_ours(fx, head_seed=args.seed + 1)
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    step0 = {"ours": first_batch_loss(init, pairs, order, args.batch_size, fx.task.pad_id)}
    cpu: dict[str, list[float]] = {}
    loads = [load_average()[0]]

    def run_ours() -> float:
        clock = ours(fx, copy.deepcopy(init), pairs, seed=args.seed, **kw)
        cpu.setdefault("ours", []).append(median(clock.cpu_times()))
        loads.append(load_average()[0])
        return median(clock.step_times())

    def run_trl() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            clock, losses = trl(fx, build_trl(fx, init), pairs, order, workdir=tmp, **kw)
        step0.setdefault("trl", losses[0])
        cpu.setdefault("trl", []).append(median(clock.cpu_times()))
        loads.append(load_average()[0])
        return median(clock.step_times())

    step_s = interleave({"ours": run_ours, "trl": run_trl}, args.repeats)
    diff0 = abs(step0["trl"] - step0["ours"])
    if diff0 > TOLERANCE:
        raise AssertionError(f"reward-model step-0 loss: TRL {step0['trl']:.8f}, ours {step0['ours']:.8f}")
    rows = [{
        "implementation": name, "median_step_ms": 1000 * median(xs), "median_cpu_ms": 1000 * median(cpu[name]),
        "pairs_per_s": args.batch_size / median(xs), "speedup_of_ours": median(xs) / median(step_s["ours"]),
        "loss_step0": step0[name], "repeats": len(xs),
    } for name, xs in step_s.items()]
    print(table(rows, ["implementation", "median_step_ms", "median_cpu_ms", "pairs_per_s", "speedup_of_ours", "loss_step0"]))
    print(f"step-0 |Δloss| = {diff0:.3g} (tolerance {TOLERANCE:g}); load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result("reward_vs_trl", {"config": vars(args), "rows": rows, "step_seconds": step_s, "cpu_seconds": cpu,
                                          "abs_diff_step0": diff0, "threads": torch.get_num_threads(),
                                          "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
