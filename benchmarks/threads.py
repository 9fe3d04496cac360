"""A DPO step with 1 torch thread against 2 (and 2 with OpenMP's passive waiting).

Each setting runs in its own process (OpenMP reads ``OMP_WAIT_POLICY`` once, at start-up),
the settings alternate repeat by repeat, and each process reports the median of its steps.
With other processes on the cores, threads that spin while they wait for each other can make a
2-thread step many times slower than a 1-thread one; passive waiting avoids the spinning.

    python -m benchmarks.threads [--repeats 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .common import interleave, load_average, median, table, write_result

SETTINGS = {
    "1 thread": ({}, 1),
    "2 threads (OpenMP default wait)": ({}, 2),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
}


def worker(threads: int, steps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from .common import fixture
    from .dpo_vs_trl import ours

    fx = fixture()
    clock, _ = ours(fx, steps=steps, batch_size=64, beta=0.1, lr=5e-5, seed=0)
    print(json.dumps({"wall": median(clock.step_times()), "cpu": median(clock.cpu_times()), "threads": torch.get_num_threads()}))


def run_setting(env: dict, threads: int, steps: int, out: dict, name: str) -> float:
    cmd = [sys.executable, "-m", "benchmarks.threads", "--worker", str(threads), "--steps", str(steps)]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out.setdefault(name, []).append(result)
    return result["wall"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps)
        return
    details: dict[str, list[dict]] = {}
    loads = [load_average()[0]]
    walls = interleave({name: (lambda e=env, t=threads, n=name: run_setting(e, t, args.steps, details, n))
                        for name, (env, threads) in SETTINGS.items()}, args.repeats)
    loads.append(load_average()[0])
    base = median(walls["1 thread"])
    rows = [{"setting": name, "median_step_ms": 1000 * median(xs), "median_cpu_ms": 1000 * median([d["cpu"] for d in details[name]]),
             "relative_to_1_thread": median(xs) / base, "repeats": len(xs)} for name, xs in walls.items()]
    print(table(rows, ["setting", "median_step_ms", "median_cpu_ms", "relative_to_1_thread"]))
    print(f"DPO step, 64 pairs; load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result("threads", {"config": vars(args), "rows": rows, "details": details,
                                    "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
