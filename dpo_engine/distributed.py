"""Data parallelism inside a stage on torch.distributed: one training on N processes (ranks).

Every rank holds the whole model and takes its share of every global batch; the ranks' weighted
gradients are summed by one all-reduce before the optimiser's step, which every rank then takes
alike, so the weights stay the same on all of them. The training is the one process's with the
same global batch, up to the order of a float sum (bit for bit with two ranks, whose all-reduce
adds two numbers, against ``shards = 2`` in one process).

Rank 0 is the process that builds the stage (the run's own process, a Dask worker, a Prefect
task): :func:`ranks` starts ranks 1..N-1 as child processes (``python -m dpo_engine.distributed``,
with torchrun's environment: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), which
rebuild the same training from the stage store and run it without evaluating or writing
anything. The process group (gloo on the CPU, NCCL on CUDA) lives while the training runs.

A trainer asks :meth:`Ranks.current` where it stands; with one process every method below is
the identity, so a trainer written for ranks runs unchanged without them.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .seeds import derive_seed

logger = logging.getLogger(__name__)

# How long a rank waits for the others at a collective: rank 0 evaluates its checkpoints while
# the others wait at the next step's all-reduce.
TIMEOUT = datetime.timedelta(minutes=30)
# One process group per process: stages that run in threads of one process take turns, and only
# the thread that opened the group trains on it (another thread's training runs alone).
_GROUP_LOCK = threading.Lock()
_group_thread: int | None = None


class RankError(RuntimeError):
    """A rank other than 0 failed: its exit code and the end of its error output."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the training's process group: rank ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """This thread's place: in the process group if this thread opened it (or joined it as a
        rank's process), else alone."""
        if _group_thread == threading.get_ident() and dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def part(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch ``idx``: its run of the ``size`` nearly equal runs."""
        return idx.tensor_split(self.size)[self.rank] if self.distributed else idx

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks (a new tensor; ``x`` itself without ranks)."""
        if not self.distributed:
            return x
        out = x.detach().to(self.device_of_group(), copy=True)  # NCCL reduces on the GPU alone
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(x.device)

    def sum_scalars(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks, in one all-reduce (every rank passes the same keys)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        summed = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, summed.tolist()))

    def mean_scalars(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (for ranks of equal shares, the global batch's mean)."""
        return {k: v / self.size for k, v in self.sum_scalars(values).items()}

    def sum_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Every parameter's ``.grad`` replaced by its sum over the ranks, in one all-reduce of a
        flat buffer (a missing gradient counts as zero)."""
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(summed)

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank: the same start."""
        if not self.distributed:
            return
        for t in module.state_dict().values():
            if torch.is_tensor(t):
                dist.broadcast(t, src=0)

    def generator(self, generator: torch.Generator, seed: int) -> torch.Generator:
        """A random stream of this rank's own for what each rank draws differently (PPO's
        rollouts); ``generator`` itself without ranks."""
        if not self.distributed:
            return generator
        return torch.Generator().manual_seed(derive_seed(seed, "rank", self.rank))

    @staticmethod
    def device_of_group() -> torch.device:
        """Where the group's collectives take their tensors: the GPU under NCCL, else the CPU."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device rank ``rank`` trains on: GPU ``index + rank`` of a CUDA device, else ``device``."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def devices_error(device: torch.device, nproc: int = 1) -> str | None:
    """Why ``device`` (and ``nproc`` ranks on it, one GPU each on CUDA) cannot run here, or None."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        first = device.index or 0
        if first + nproc > count:
            wanted = f"GPU {first}" if nproc == 1 else f"GPUs {first}..{first + nproc - 1} (nproc_per_cell = {nproc})"
            return f"device {device}: needs {wanted}, and this machine has {count} CUDA device(s)"
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        return f"device {device}: Apple's MPS is not available here"
    if nproc > 1:
        if not dist.is_available():
            return "nproc_per_cell > 1 needs torch.distributed, which this build of torch does not have"
        if device.type not in ("cpu", "cuda"):
            return f"nproc_per_cell > 1 runs on the CPU (gloo) or CUDA GPUs (NCCL), not on {device.type}"
    return None


def check_ranks(nproc: int, device: torch.device) -> None:
    """That ``nproc`` ranks can run on ``device``; :func:`devices_error` as a ValueError."""
    if nproc < 1:
        raise ValueError(f"nproc_per_cell must be >= 1, got {nproc}")
    if (error := devices_error(device, nproc)) is not None:
        raise ValueError(error)


@dataclass(frozen=True)
class RankJob:
    """What ranks 1..N-1 run: ``fn(*args)``, a module-level function and picklable arguments."""

    fn: Callable[..., Any]
    args: tuple = ()


@contextmanager
def ranks(nproc: int, job: RankJob, device: torch.device) -> Iterator[Ranks]:
    """The body runs as rank 0 of ``nproc`` while ranks 1..N-1 run ``job`` in child processes.

    Leaving the body waits for the children; a child that fails raises :class:`RankError` here, and
    an error in the body stops them. With ``nproc`` = 1: nothing starts, and the body runs alone.
    """
    if nproc <= 1:
        yield Ranks()
        return
    check_ranks(nproc, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    with _GROUP_LOCK:
        if dist.is_initialized():
            raise RuntimeError("a process group is already running in this process")
        folder = Path(tempfile.mkdtemp(prefix="dpo-bench-ranks-"))
        own_threads = torch.get_num_threads()
        threads = max(1, own_threads // nproc)  # the process's cores shared between its ranks
        store = dist.TCPStore("127.0.0.1", 0, nproc, True, timeout=TIMEOUT, wait_for_workers=False)
        spec = folder / "job.pkl"
        spec.write_bytes(pickle.dumps({"job": job, "backend": backend, "threads": threads,
                                       "first_gpu": (device.index or 0) if device.type == "cuda" else None}))
        children: list[tuple[int, subprocess.Popen, Path]] = []
        try:
            for rank in range(1, nproc):
                env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                       "OMP_NUM_THREADS": str(threads)}
                log = folder / f"rank{rank}.log"
                with log.open("wb") as err:
                    children.append((rank, subprocess.Popen([sys.executable, "-m", "dpo_engine.distributed", str(spec)],
                                                            env=env, stdout=subprocess.DEVNULL, stderr=err), log))
            _wait_for_children(store, children)
            if device.type == "cuda":
                torch.cuda.set_device(rank_device(device, 0))
            dist.init_process_group(backend, store=store, rank=0, world_size=nproc, timeout=TIMEOUT)
            _own_group()
            torch.set_num_threads(threads)
            try:
                yield Ranks(0, nproc)
            except Exception as e:
                # A collective whose peer went away (gloo and NCCL raise a bare RuntimeError): that
                # rank's own error says why. The body's own errors pass as they are.
                failed = _failed_child(children) if type(e) is RuntimeError or isinstance(e, dist.DistError) else None
                if failed is not None:
                    raise failed from e
                raise
            for rank, child, log in children:
                if child.wait() != 0:
                    if not _finished(log):
                        raise _rank_error(rank, child.returncode, log)
                    # Its share of every collective is behind it, so the training is whole: what
                    # failed is the process's teardown (see main).
                    logger.warning("%s (after its training had finished; the result stands)",
                                   _rank_error(rank, child.returncode, log))
        finally:
            torch.set_num_threads(own_threads)
            _own_group(False)
            if dist.is_initialized():
                dist.destroy_process_group()
            for _, child, _ in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            shutil.rmtree(folder, ignore_errors=True)


def _wait_for_children(store: dist.TCPStore, children: list[tuple[int, subprocess.Popen, Path]]) -> None:
    """Until every child has reached the store (it started, imported torch and read its job), or
    one of them has exited: then its error, rather than a wait for the group until the timeout."""
    keys = [f"started/{rank}" for rank, _, _ in children]
    while not store.check(keys):
        for rank, child, log in children:
            if child.poll() is not None:
                raise _rank_error(rank, child.returncode, log)
        time.sleep(0.02)


def _own_group(owned: bool = True) -> None:
    global _group_thread
    _group_thread = threading.get_ident() if owned else None


def _failed_child(children: list[tuple[int, subprocess.Popen, Path]]) -> RankError | None:
    for rank, child, log in children:
        try:
            code = child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
        if code != 0:
            return _rank_error(rank, code, log)
    return None


def _finished(log: Path) -> bool:
    """Whether the rank writing ``log`` had finished its job (:func:`main` marks it)."""
    return log.with_suffix(".done").exists()


def _rank_error(rank: int, code: int, log: Path) -> RankError:
    """The rank's error in one line: the one its process wrote (:func:`main`), else the last line
    of its error output (a crash before the job started)."""
    summary = log.with_suffix(".error")
    if summary.exists():
        last = summary.read_text(errors="replace").strip()
    else:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "no error output"
    return RankError(f"rank {rank} exited with code {code}: {last}")


def main(argv: list[str] | None = None) -> None:
    """A rank's process: join the group that rank 0 opened (torchrun's environment) and run the job."""
    argv = sys.argv[1:] if argv is None else argv
    spec = pickle.loads(Path(argv[0]).read_bytes())
    torch.set_num_threads(spec["threads"])
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if spec["backend"] == "nccl":
        torch.cuda.set_device(spec["first_gpu"] + int(os.environ["LOCAL_RANK"]))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, False, timeout=TIMEOUT)
    store.set(f"started/{rank}", "1")
    dist.init_process_group(spec["backend"], store=store, rank=rank, world_size=size, timeout=TIMEOUT)
    _own_group()
    try:
        spec["job"].fn(*spec["job"].args)
    except BaseException as e:
        # One line for rank 0's error (the whole traceback stays in the rank's log).
        message = str(e).strip().splitlines()
        summary = f"{type(e).__name__}: {message[0] if message else ''}".rstrip(": ")
        (Path(argv[0]).parent / f"rank{rank}.error").write_text(summary)
        dist.destroy_process_group()
        raise
    (Path(argv[0]).parent / f"rank{rank}.done").touch()
    dist.destroy_process_group()


if __name__ == "__main__":
    # The module itself, not this __main__ copy of it: the group's owner is its state.
    from dpo_engine.distributed import main as rank_main

    rank_main()
    # A rank writes nothing but its logs, so it ends here rather than in the interpreter's
    # teardown, where gloo's threads could abort the process ("terminate called without an active
    # exception", seen under load) after the work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
