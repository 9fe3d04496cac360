"""What every benchmark shares: the fixture (a real SFT model and preference data from the
``quick`` preset), interleaved A/B timing, the machine's description, and the results file.

Other processes may share the cores: every A/B comparison alternates its two sides repeat by
repeat, so contention hits both equally, and every result records the load average.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, ContextManager, Iterator
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"
DEFAULT_CACHE = Path(os.environ.get("DPO_BENCH_BENCH_CACHE", "/tmp/bench-cache"))


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict:
    """CPU, core count, versions, date and load: printed beside every number."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "trl", "accelerate", "prefect", "prefect-dask", "dask"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average": load_average(),
        "versions": versions,
    }


def set_threads(n: int) -> int:
    """Fix torch's intra-op threads (0 = leave torch's default); returns the count in use.

    With other processes on the cores, OpenMP threads that spin while waiting for each other make
    a 2-thread step many times slower than a 1-thread one (see ``benchmarks.threads``), so A/B
    comparisons default to 1 thread: they then measure the code, not the contention.
    """
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default; 1 by default, see common.set_threads)")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleave(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each side once per repeat, alternating the order (ABBA...), and collect what each returns."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(sides[name]())
    return out


class StepClock:
    """Times between consecutive calls of :meth:`tick`: each is one full training step."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.cpu_ticks: list[float] = []

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())
        self.cpu_ticks.append(time.process_time())

    def step_times(self, skip: int = 2) -> list[float]:
        """Wall durations of the steps after the first ``skip`` (warm-up: allocator, lazy initialisation)."""
        gaps = [b - a for a, b in zip(self.ticks, self.ticks[1:])]
        return gaps[skip:]

    def cpu_times(self, skip: int = 2) -> list[float]:
        """CPU seconds (all threads of this process) of the same steps: less sensitive to other processes."""
        gaps = [b - a for a, b in zip(self.cpu_ticks, self.cpu_ticks[1:])]
        return gaps[skip:]


@dataclass
class Fixture:
    """The SFT model, task and preference data of a cached ``quick`` run (built on first use)."""

    bench: object
    stages: dict
    task: object
    reference: torch.nn.Module
    prefs: object  # PreferenceTensors of the train split
    pairs_path: Path


def fixture(cache_dir: Path = DEFAULT_CACHE, preset: str = "quick") -> Fixture:
    from dpo_bench.bench import load_config
    from dpo_bench.run import Timings, plan_stages
    from dpo_bench.stages import Bench, preference_tensors

    bench = Bench(load_config(preset), Path(cache_dir), progress=False)
    stages = plan_stages(bench, Timings())
    task = bench.task(stages["task"])
    reference = bench.reference(stages["sft"])
    prefs = preference_tensors(bench, stages["task"], stages["preferences"], stages["ref_logps"])
    return Fixture(bench, stages, task, reference, prefs, stages["preferences"].path / "preferences.parquet")


def write_result(name: str, result: dict) -> Path:
    """Save ``result`` (with the machine's description) as ``benchmarks/results/<name>.json``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2, default=float))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``; floats to 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def quiet_transformers() -> None:
    """Silence HF progress bars and info logs so they do not distort timings or the output."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def prefixes_unshared() -> ContextManager:
    """``dpo_engine.trunk`` computing every real token, a prefix shared by several sequences once for
    each (``SHARE_PREFIXES`` off): the ablation of the shared prefixes in ``benchmarks.cell`` and
    ``benchmarks.grouping``."""
    import dpo_engine.trunk as trunk

    return mock.patch.object(trunk, "SHARE_PREFIXES", False)


@contextmanager
def models_own_forward() -> Iterator[None]:
    """GPT-2 through transformers' own forward, as every other model runs (a batch's rows in length
    groups, completion-only logits), instead of ``dpo_engine.trunk``'s packed real tokens: the ablation
    of the trunk in ``benchmarks.cell`` and ``benchmarks.grouping``."""
    import dpo_bench.logprobs as logprobs
    import reward.model as reward_model

    never = lambda model: False  # noqa: E731
    with mock.patch.object(logprobs, "selects_positions", never), mock.patch.object(reward_model, "selects_positions", never):
        yield
