"""A training step's shards in worker processes: data parallelism on the CPU without the GIL.

Threads (:class:`~dpo_bench.training.ShardRunner`) run a step's shards at once, but a small
model's forward is a few hundred calls into torch from Python, and each call hands the GIL back
and forth between the cores: the ``default`` SFT step in two shards took 17.7 ms in two threads
and 14.5 ms with the second in a worker process (``python -m benchmarks.shards``;
``benchmarks/RESULTS.md``, "Trainers against TRL"). So the shards after the first go to
worker processes, one each, and the first runs in the training process:

- The weights are shared, not copied: the model's tensors are moved into shared memory, and each
  worker unpickles the loss with the model in it onto the same memory. The optimiser updates them
  in place between steps, when no worker is computing.
- A step sends each worker its part (item indices and weight) through a pipe; the worker computes
  the part's loss and ``torch.autograd.grad`` on as many torch threads as a thread would, writes
  the gradients into shared buffers, and answers with the loss and metrics. The same operations on
  the same threads as a shard thread: the weights are bit-identical to the shards run in turn
  (``tests/test_shard_workers.py``).
- A worker takes a few seconds to start (it imports torch and the model's library), on a core the
  shards would use: until every worker is up, the steps run their shards in turn.

The loss must pickle: a module-level class such as SFT's :class:`~dpo_bench.methods.sft.SFTBatchLoss`,
not a closure. A loss that does not, a process that may not have children (a daemonic one, such
as a Dask worker's), shared memory too small for the model, or a worker that fails to start: the
shards run in threads, and the log says why.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Sequence

import torch
import torch.multiprocessing as mp

log = logging.getLogger(__name__)

# Off, the shards run in threads (benchmarks.common.shards_in).
USE_PROCESSES = True

Part = tuple[torch.Tensor, dict[str, float], tuple[torch.Tensor | None, ...]]


def part_gradient(loss_fn: Callable, params: Sequence[torch.Tensor], part: torch.Tensor, weight: float) -> Part:
    """One part's loss and metrics, and the gradient of its ``weight``-weighted loss."""
    loss, metrics = loss_fn(part)
    grads = torch.autograd.grad(loss * weight, params, allow_unused=True)
    return loss.detach().cpu(), metrics, grads


def _serve(conn, threads: int) -> None:
    """A worker: the loss, the parameters in it and the gradient buffers in; then its loop, a part in,
    its gradient into the buffers and its loss out, until None or EOF."""
    torch.set_num_threads(threads)
    loss_fn, params, buffers = conn.recv()
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the training process is gone
            return
        if job is None:
            return
        part, weight = job
        try:
            loss, metrics, grads = part_gradient(loss_fn, params, torch.tensor(part, dtype=torch.long), weight)
            for buffer, grad in zip(buffers, grads):
                if grad is not None:
                    buffer.copy_(grad)
            conn.send(("done", (loss.item(), loss.dtype, metrics, [g is not None for g in grads])))
        except Exception:  # noqa: BLE001 - sent to the training process, which raises it
            conn.send(("error", traceback.format_exc()))


def _send(conn, payload: bytes) -> None:
    try:
        conn.send_bytes(payload)
    except OSError:  # the worker died or was stopped while starting: ready() or close() tells
        pass


class WorkerStartError(RuntimeError):
    """A shard worker died before it was ready (it could not unpickle the loss, say)."""


class ShardWorkers:
    """``count`` worker processes, each computing one part of every step with ``threads`` torch threads."""

    def __init__(self, loss_fn: Callable, params: Sequence[torch.Tensor], count: int, threads: int):
        self.params = list(params)
        self.count = count
        self._ready = [False] * count
        self._started = time.perf_counter()
        context = mp.get_context("spawn")  # fork copies the threads' locks in whatever state they are
        for p in self.params:
            p.share_memory_()
        self._buffers = [[torch.empty_like(p).share_memory_() for p in self.params] for _ in range(count)]
        # Pickled here, between steps (a loss that does not pickle fails now, before any process
        # starts), and sent from a thread: a worker reads it only once it has imported torch and
        # the rest, seconds during which this process trains on.
        payloads = [ForkingPickler.dumps((loss_fn, self.params, buffers)) for buffers in self._buffers]
        self._conns, self._procs = [], []
        try:
            for payload in payloads:
                ours, theirs = context.Pipe()
                proc = context.Process(target=_serve, args=(theirs, threads), name="shard-worker", daemon=True)
                proc.start()
                theirs.close()
                self._conns.append(ours)
                self._procs.append(proc)
                threading.Thread(target=_send, args=(ours, payload), name="shard-worker-start", daemon=True).start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def start(cls, loss_fn: Callable, params: Sequence[torch.Tensor], count: int, threads: int) -> "ShardWorkers | None":
        """The workers, or None (and the reason, logged) where the shards must run in threads."""
        why = _cannot_start(params, count)
        if why is None:
            try:
                return cls(loss_fn, params, count, threads)
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                why = f"the loss does not pickle ({type(e).__name__}: {e}); make it a module-level class"
            except (RuntimeError, OSError) as e:  # shared memory refused, or no process could start
                why = f"no worker could start ({type(e).__name__}: {e})"
        log.info("shards run in threads: %s", why)
        return None

    def ready(self, wait: bool = False) -> bool:
        """Whether every worker is up to take parts, without waiting unless ``wait``. A worker that
        died starting (its traceback is on stderr) raises :class:`WorkerStartError`."""
        for i, conn in enumerate(self._conns):
            if not self._ready[i] and (wait or conn.poll()):
                try:
                    self._receive(i)
                except RuntimeError as e:
                    raise WorkerStartError(str(e)) from e
                if all(self._ready):
                    log.info("%d shard worker process%s up after %.1f s", self.count, "es" * (self.count > 1),
                             time.perf_counter() - self._started)
        return self.all_up

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    @property
    def all_up(self) -> bool:
        """Whether every worker was ready when last asked (:meth:`ready` asks)."""
        return all(self._ready)

    def run(self, own: Callable[[], Part], parts: Sequence[tuple[torch.Tensor, float]]) -> list[Part]:
        """``parts[i]`` on worker i while ``own()`` computes this process's part; all results in part order."""
        for conn, (part, weight) in zip(self._conns, parts):
            conn.send((part.tolist(), weight))
        first = own()
        return [first] + [self._receive(i) for i in range(len(parts))]

    def _receive(self, i: int):
        try:
            kind, payload = self._conns[i].recv()
        except (EOFError, ConnectionError) as e:
            proc = self._procs[i]
            proc.join(timeout=5)
            raise RuntimeError(f"shard worker {proc.pid} exited (exit code {proc.exitcode})") from e
        if kind == "ready":
            self._ready[i] = True
            return None
        if kind == "error":
            raise RuntimeError(f"shard worker {self._procs[i].pid} failed:\n{payload}")
        value, dtype, metrics, has_grad = payload
        grads = tuple(b if used else None for b, used in zip(self._buffers[i], has_grad))
        return torch.tensor(value, dtype=dtype), metrics, grads

    def close(self) -> None:
        """Stops the workers: those still starting at once (the thread sending them the loss may
        still be writing to their pipe), the others once their part is done."""
        for conn, ready in zip(self._conns, self._ready):
            try:
                if ready:
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc, ready in zip(self._procs, self._ready):
            if ready:
                proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


def _cannot_start(params: Sequence[torch.Tensor], count: int) -> str | None:
    """Why worker processes cannot serve these parameters here, or None."""
    if not USE_PROCESSES:
        return "worker processes are switched off (dpo_bench.shard_workers.USE_PROCESSES)"
    if multiprocessing.current_process().daemon:
        return "this process is daemonic (a Dask worker's, say) and may not start processes"
    if any(p.device.type != "cpu" for p in params):
        return "the parameters are not on the CPU"
    needed = (1 + count) * sum(p.numel() * p.element_size() for p in params)  # the weights, and a gradient per worker
    try:
        stat = os.statvfs("/dev/shm")
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        return None  # no /dev/shm to check (not Linux): torch finds its own shared memory
    if needed > free // 2:
        return f"/dev/shm has {free / 2**20:.0f} MiB free, too little for {needed / 2**20:.0f} MiB of weights and gradients"
    return None
