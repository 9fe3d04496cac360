"""Wall time of whole runs: ``dpo-bench run --preset quick|default``, in-process and through Prefect.

Every run starts from an empty cache (its own cache and reports directory), so nothing is reused.
The wall time is the subprocess's, from launch to exit (imports, a Prefect server's start-up and
the report included); ``run.json["timings"]`` gives each stage's seconds, which say what dominates.
User and system CPU seconds cover the whole process tree (the Dask workers and the Prefect server
included), as ``/usr/bin/time`` reports them.

    python -m benchmarks.presets                         # quick and default, each in-process and via Prefect
    python -m benchmarks.presets --variants quick:local,quick:prefect --repeats 2
    python -m benchmarks.presets --variants default:prefect:w2   # Prefect with 2 Dask workers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import load_average, median, table, write_result

GOALS = {"quick": 60.0, "default": 300.0}
DEFAULT_VARIANTS = "quick:local,quick:prefect,default:local,default:prefect"


def command(preset: str, mode: str, workdir: Path, threads: int | None) -> list[str]:
    exe = Path(sys.executable).with_name("dpo-bench")
    cmd = [str(exe), "run", "--preset", preset, "--quiet", "--reports-dir", str(workdir / "reports"),
           "--cache-dir", str(workdir / "cache"), "--run-id", "bench"]
    if mode == "local":
        cmd.append("--no-prefect")
    elif mode.startswith("w"):  # Prefect with a local Dask cluster of N workers
        cmd += ["--workers", mode[1:]]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def run_once(variant: str, threads: int | None, extra_env: dict[str, str] | None = None) -> dict:
    parts = variant.split(":")
    preset, mode = parts[0], parts[1]
    if len(parts) > 2:
        mode = parts[2]  # "prefect:w2" means Prefect with 2 workers
    with tempfile.TemporaryDirectory(prefix="dpo-bench-preset-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, **(extra_env or {}), "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
        env.pop("PREFECT_API_URL", None)
        load_before = load_average()[0]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(command(preset, mode, workdir, threads), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        record = json.loads((workdir / "reports" / "bench" / "run.json").read_text())
    return {"variant": variant, "wall_s": wall, "run_json_wall_s": record["wall_seconds"], "timings": record["timings"],
            "user_cpu_s": cpu.ru_utime - cpu_before.ru_utime, "system_cpu_s": cpu.ru_stime - cpu_before.ru_stime,
            "status": record["status"], "load_before": load_before, "load_after": load_average()[0]}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        preset = variant.split(":")[0]
        wall = median([r["wall_s"] for r in mine])
        stages: dict[str, list[float]] = {}
        for r in mine:
            for k, v in r["timings"].items():
                stages.setdefault(k, []).append(v)
        top = sorted(((median(v), k) for k, v in stages.items()), reverse=True)[:4]
        rows.append({
            "variant": variant, "runs": len(mine), "wall_s": wall, "goal_s": GOALS.get(preset, float("nan")),
            "user_cpu_s": median([r["user_cpu_s"] for r in mine]), "system_cpu_s": median([r["system_cpu_s"] for r in mine]),
            "meets_goal": wall < GOALS.get(preset, float("inf")),
            "stage_sum_s": sum(median(v) for v in stages.values()),
            "largest_stages": ", ".join(f"{k} {s:.0f}s" for s, k in top),
            "load": f"{min(r['load_before'] for r in mine):.1f}-{max(r['load_after'] for r in mine):.1f}",
            "stage_medians": {k: median(v) for k, v in stages.items()},
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated preset:mode, mode = local (--no-prefect), prefect, or prefect:wN (N Dask workers)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="pass --threads to every run")
    p.add_argument("--output", default="presets", help="results file name under benchmarks/results/")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the runs, e.g. OMP_WAIT_POLICY=PASSIVE")
    args = p.parse_args(argv)
    env = dict(e.split("=", 1) for e in args.env)
    variants = args.variants.split(",")
    runs = []
    for r in range(args.repeats):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            print(f"running {variant} (repeat {r + 1}) ...", flush=True)
            runs.append(run_once(variant, args.threads, env))
            print(f"  {runs[-1]['wall_s']:.1f} s; stages {runs[-1]['timings']}", flush=True)
            # Saved after every run: a long series that is stopped early keeps what it measured.
            write_result(args.output, {"runs": runs, "summary": summarise(runs), "threads": args.threads, "env": env})
    rows = summarise(runs)
    print(table(rows, ["variant", "runs", "wall_s", "user_cpu_s", "system_cpu_s", "goal_s", "meets_goal", "stage_sum_s",
                       "largest_stages", "load"]))
    path = write_result(args.output, {"runs": runs, "summary": rows, "threads": args.threads, "env": env})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
