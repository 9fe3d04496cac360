"""What the three TRL comparisons share: TRL's trainers set up to do the same work as ours.

Same model weights, same batches in the same order (TRL reads a dataset laid out in the order our
trainer draws its minibatches, with ``train_sampling_strategy="sequential"``), float32 (TRL's
default on CPU is bf16 autocast, ours is float32), no gradient checkpointing (TRL turns it on by
default; ours has none at this size), the same AdamW betas, learning rate and clipping, and a
constant learning rate so that the first steps' losses can be compared too.

TRL is an optional dependency: ``pip install 'dpo-bench[bench]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .common import StepClock, add_threads_argument, quiet_transformers


def require_trl():
    try:
        import trl  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("TRL is not installed: pip install 'dpo-bench[bench]'") from e
    quiet_transformers()
    import trl

    return trl


def step_comparison_parser(doc: str, lr: float) -> argparse.ArgumentParser:
    """The options every ours-against-TRL step comparison takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per repeat (the first 2 are warm-up)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)
    return p


@contextlib.contextmanager
def ticking_optimiser_steps(clock: StepClock):
    """Tick ``clock`` now and after every optimiser step taken inside the block: the gaps are whole
    steps, however many forward passes a step makes (ours splits a batch by length)."""
    clock.tick()
    handle = register_optimizer_step_post_hook(lambda *_: clock.tick())
    try:
        yield clock
    finally:
        handle.remove()


def timed_trainer(trainer_cls, clock: StepClock, tokenizer, **kwargs):
    """``trainer_cls`` recording its losses, its optimiser steps ticking ``clock``, on a copy of ``tokenizer``."""
    trainer = recording(trainer_cls)(processing_class=copy.deepcopy(tokenizer), callbacks=[step_timer(clock)], **kwargs)
    trainer.losses = []
    return trainer


def common_args(output_dir: str, *, steps: int, batch_size: int, lr: float, beta2: float, max_grad_norm: float) -> dict[str, Any]:
    """TrainingArguments that match our optimiser loop (AdamW, constant lr, clipping, no extras)."""
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=beta2, adam_epsilon=1e-8,
        weight_decay=0.0, max_grad_norm=max_grad_norm, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10,
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0, data_seed=0,
    )


def step_timer(clock: StepClock):
    """A TrainerCallback that ticks ``clock`` at the end of every optimiser step."""
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_train_begin(self, args, state, control, **kwargs):
            clock.tick()

    return _Timer()


def recording(trainer_cls):
    """``trainer_cls`` whose ``compute_loss`` also keeps every training loss (as floats) in ``.losses``."""

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if model.training:
                self.losses.append(float(loss.detach()))
            return out

    Recording.__name__ = f"Recording{trainer_cls.__name__}"
    return Recording


def run_trl(trainer, clock: StepClock) -> list[float]:
    """Train and return the per-step times (first ticks are warm-up, dropped by the caller)."""
    trainer.losses = getattr(trainer, "losses", [])
    start = time.perf_counter()
    trainer.train()
    trainer.total_seconds = time.perf_counter() - start
    return clock.step_times()


def order_like_ours(n: int, batch_size: int, steps: int, seed: int) -> list[int]:
    """The row indices our trainers' ``minibatches`` (without length groups) yield for ``steps``
    steps, concatenated: TRL reads them in order."""
    from dpo_engine.optim import minibatches

    batches = minibatches(n, batch_size, torch.Generator().manual_seed(seed))
    return [i for _ in range(steps) for i in next(batches).tolist()]
