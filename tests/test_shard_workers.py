"""Shards in worker processes: the same bits as shards in turn, errors that reach the training
process, and threads wherever workers cannot serve."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import SimpleNamespace

import pytest
import torch

from dpo_bench import shard_workers, training
from dpo_bench.methods.sft import SFTBatchLoss
from dpo_bench.shard_workers import ShardWorkers, part_gradient
from dpo_bench.training import Job, ShardRunner
from .test_training import _max_diff, _model, _sft, _sft_data, two_threads  # noqa: F401 - a fixture


@pytest.fixture
def workers_from_the_first_step(monkeypatch):
    """Workers start before the first step, and the steps wait for them: every step is theirs."""
    monkeypatch.setattr(training, "SHARD_WORKERS_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(training, "WAIT_FOR_SHARD_WORKERS", True)


def test_shards_in_worker_processes_give_the_same_bits_as_shards_in_turn(two_threads, workers_from_the_first_step, monkeypatch, caplog):
    served, pids = [], []
    run = ShardWorkers.run

    def counting(self, own, parts):
        served.append(len(parts))
        pids[:] = self.pids
        return run(self, own, parts)

    monkeypatch.setattr(ShardWorkers, "run", counting)
    model, data = _model(), _sft_data()
    with caplog.at_level(logging.INFO, logger="dpo_bench.training"):
        in_workers, losses_in_workers, grads_in_workers = _sft(model, data, threads=2, shards=2, steps=4)
    assert served == [1, 1, 1, 1]  # every step's second shard went to the worker
    assert "sft: 4 steps with shard workers (median" in caplog.text
    in_turn, losses_in_turn, grads_in_turn = _sft(model, data, threads=1, shards=2, steps=4)
    assert _max_diff(in_workers, in_turn) == 0.0
    assert losses_in_workers == losses_in_turn
    for step_a, step_b in zip(grads_in_workers, grads_in_turn):
        assert all(torch.equal(a, b) for a, b in zip(step_a, step_b))
    assert len(pids) == 1 and pids[0] != os.getpid()
    with pytest.raises(ProcessLookupError):  # stopped and reaped when training ended
        os.kill(pids[0], 0)


def test_a_worker_computes_the_parts_gradient_and_reports_its_errors_and_its_death():
    model = _model().train()
    prompts, completions = _sft_data()
    loss = SFTBatchLoss(model, prompts, completions, 0, torch.device("cpu"))
    params = list(model.parameters())
    workers = ShardWorkers(loss, params, 1, 1)
    try:
        assert workers.ready(wait=True)
        own = lambda: part_gradient(loss, params, torch.tensor([0, 1]), 0.25)  # noqa: E731
        first, (remote_loss, metrics, grads) = workers.run(own, [(torch.tensor([2, 3, 4]), 0.75)])
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # the worker's count: the same kernels
        try:
            here_loss, _, here_grads = part_gradient(loss, params, torch.tensor([2, 3, 4]), 0.75)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(remote_loss, here_loss) and metrics == {}
        assert all(torch.equal(a, b) for a, b in zip(grads, here_grads))
        with pytest.raises(RuntimeError, match=r"shard worker \d+ failed:\n(.|\n)*IndexError"):
            workers.run(own, [(torch.tensor([len(prompts)]), 1.0)])
        workers.run(own, [(torch.tensor([5]), 1.0)])  # it carries on after a failed part
        os.kill(workers.pids[0], signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"shard worker \d+ exited \(exit code -9\)"):
            workers.run(own, [(torch.tensor([5]), 1.0)])
    finally:
        workers.close()


def _refuse():
    raise RuntimeError("this loss cannot be loaded in another process")


class _Unloadable:
    """Pickles here; unpickling it in a worker fails."""

    def __reduce__(self):
        return _refuse, ()


def test_a_worker_that_cannot_start_leaves_the_shards_to_threads(workers_from_the_first_step, caplog):
    params = list(_model().parameters())
    runner = ShardRunner(2)
    try:
        runner.start_workers(_Unloadable(), params)
        assert runner.workers is not None
        jobs = [Job(1, torch.tensor([0]), 0.5, False), Job(1, torch.tensor([1]), 0.5, False)]
        with caplog.at_level(logging.WARNING, logger="dpo_bench.training"):
            threads = runner.gradients(lambda job: f"thread for {job.part.tolist()}", jobs)
        assert threads == ["thread for [0]", "thread for [1]"]
        assert runner.workers is None
        assert "a shard worker failed to start; the shards run in threads" in caplog.text
        assert "exited (exit code 1)" in caplog.text
    finally:
        runner.close()


def test_where_workers_cannot_serve_the_shards_run_in_threads(monkeypatch, caplog):
    params = list(_model().parameters())
    caplog.set_level(logging.INFO, logger="dpo_bench.shard_workers")
    model = _model()
    assert ShardWorkers.start(lambda idx: model(idx), params, 1, 1) is None
    assert "the loss does not pickle" in caplog.text and "module-level class" in caplog.text

    monkeypatch.setattr(shard_workers.multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    assert shard_workers._cannot_start(params, 1) == "this process is daemonic (a Dask worker's, say) and may not start processes"
    monkeypatch.undo()

    monkeypatch.setattr(shard_workers.os, "statvfs", lambda path: SimpleNamespace(f_bavail=10, f_frsize=4096))
    assert shard_workers._cannot_start(params, 1).startswith("/dev/shm has 0 MiB free, too little for")
    monkeypatch.undo()

    monkeypatch.setattr(shard_workers, "USE_PROCESSES", False)
    assert "switched off" in shard_workers._cannot_start(params, 1)
    monkeypatch.undo()
    assert shard_workers._cannot_start(params, 1) is None


def test_workers_start_only_when_the_steps_left_would_take_long_in_threads(two_threads, monkeypatch):
    started = []
    monkeypatch.setattr(ShardWorkers, "start", classmethod(lambda cls, *args: started.append(args[2:]) or None))
    model, data = _model(), _sft_data()
    _sft(model, data, shards=2, steps=3 + training.SHARD_PROBE_STEPS)  # well under SHARD_WORKERS_AFTER_SECONDS
    assert started == []
    monkeypatch.setattr(training, "SHARD_WORKERS_AFTER_SECONDS", 1e-6)
    _sft(model, data, shards=2, steps=1 + training.SHARD_PROBE_STEPS)  # the probe ends with the last step: none left
    assert started == []
    _sft(model, data, shards=2, steps=2 + training.SHARD_PROBE_STEPS)
    assert started == [(1, 1)]  # one worker, one torch thread
    _sft(model, data, threads=1, shards=2, steps=2 + training.SHARD_PROBE_STEPS)  # shards in turn: no workers
    assert started == [(1, 1)]


def test_while_workers_start_the_shards_run_in_turn_in_this_thread(two_threads):
    """A starting worker takes a core: the threads would only contend with it."""
    runner = ShardRunner(2)
    runner.workers = SimpleNamespace(count=1, all_up=False, ready=lambda wait: False, close=lambda: None)
    jobs = [Job(1, torch.tensor([0]), 0.5, False), Job(1, torch.tensor([1]), 0.5, False)]
    try:
        assert runner.gradients(lambda job: threading.current_thread().name, jobs) == [threading.current_thread().name] * 2
        runner.workers = None
        assert all(name.startswith("shard") for name in runner.gradients(lambda job: threading.current_thread().name, jobs))
    finally:
        runner.close()


class _NanOnItem:
    """A loss that pickles, and is NaN on the batches that hold item ``bad``."""

    def __init__(self, model, bad: int):
        self.model, self.bad = model, bad

    def __call__(self, idx):
        out = self.model(input_ids=torch.ones(len(idx), 3, dtype=torch.long)).logits.mean()
        return (out * float("nan") if self.bad in idx.tolist() else out), {}


def test_a_non_finite_loss_in_a_workers_part_names_the_run_and_step(two_threads, workers_from_the_first_step, monkeypatch):
    from reward.train import minibatches

    from dpo_bench.training import NonFiniteLossError, OptimConfig, TrainLog, optimise

    second = int(next(minibatches(2, 2, torch.Generator().manual_seed(0), None))[1])  # the worker's item at step 1
    served = []
    run = ShardWorkers.run
    monkeypatch.setattr(ShardWorkers, "run", lambda self, own, parts: served.append(parts[0][0].tolist()) or run(self, own, parts))
    model = _model().train()
    with pytest.raises(NonFiniteLossError, match=r"my-run: loss is nan at step 1"):
        optimise(model, OptimConfig(steps=2, batch_size=2, shards=2, group_by_length=False), _NanOnItem(model, second),
                 n_items=2, generator=torch.Generator().manual_seed(0), log=TrainLog(), label="my-run", progress=False)
    assert served == [[second]]
