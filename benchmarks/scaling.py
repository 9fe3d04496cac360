"""How stage time and peak memory grow with the dataset, and grid time with Dask workers.

Dataset size: the ``quick`` preset's corpus, train prompts and eval prompts times 1, 2 and 4
(training steps fixed, so the trainers' CPU time should stay flat and the data-bound stages, corpus,
preference sampling, reference log-probs and reference evaluation, should grow linearly). Each
stage runs in its own process (its upstream stages come from that scale's cache), so the peak
resident memory it reports is that stage's own.

Workers: a small grid (DPO at two β, PPO) run through Prefect with ``--workers 1`` and
``--workers 2`` (one torch thread per worker), on a copy of a warmed stage cache without the
cells, so only the grid is computed; the wall time of the whole command is compared.

    python -m benchmarks.scaling [--scales 1,2,4] [--workers 1,2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import interleave, load_average, median, table, write_result

STAGES = ("task", "sft", "reference_eval", "preferences", "ref_logps", "reward_model")
ROOT = Path(__file__).resolve().parent.parent

GRID_TOML = """
preset = "quick"
[sft]
steps = 100
[reward_model]
steps = 30
[evaluation]
n_checkpoints = 1
[[grid]]
method = "dpo"
values = [0.1, 0.5]
config = { steps = 40, lr = 1e-4 }
[[grid]]
method = "ppo"
values = [0.1]
config = { iterations = 8 }
"""


def scaled_overrides(scale: int) -> dict:
    return {"sentiment": {"n_reviews": 8000 * scale, "n_train_prompts": 800 * scale, "n_val_prompts": 100 * scale, "n_eval_prompts": 200 * scale},
            "sft": {"steps": 100}, "reward_model": {"steps": 30}}


def stage_worker(scale: int, stage: str, cache: str) -> None:
    """Build ``stage`` (upstream from the cache); print its seconds and this process's peak RSS."""
    import torch

    from dpo_bench import stages as st
    from dpo_bench.bench import load_config

    torch.set_num_threads(1)
    bench = st.Bench(load_config("quick", overrides=scaled_overrides(scale)), Path(cache), progress=False)
    done: dict = {}
    builders = {
        "task": lambda: st.prepare_task(bench),
        "sft": lambda: st.train_sft(bench, done["task"]),
        "reference_eval": lambda: st.reference_eval(bench, done["task"], done["sft"]),
        "preferences": lambda: st.build_preferences(bench, done["task"], done["sft"]),
        "ref_logps": lambda: st.reference_logps(bench, done["task"], done["sft"], done["preferences"]),
        "reward_model": lambda: st.train_rm(bench, done["task"], done["sft"], done["preferences"]),
    }
    for name in STAGES:
        if name == stage:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            result = builders[name]()
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
            print(json.dumps({"seconds": result.seconds, "cpu_seconds": cpu, "cached": result.cached,
                              "peak_rss_mb": after.ru_maxrss / 1024, "rss_growth_mb": (after.ru_maxrss - usage.ru_maxrss) / 1024}))
            return
        done[name] = builders[name]()


def dataset_scaling(scales: list[int]) -> list[dict]:
    rows = []
    for scale in scales:
        with tempfile.TemporaryDirectory(prefix="dpo-bench-scale-") as cache:
            for stage in STAGES:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--stage-worker", f"{scale}:{stage}:{cache}"],
                                      capture_output=True, text=True, check=True, cwd=ROOT)
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({"scale": scale, "stage": stage, **result, "load": load_average()[0]})
                print(f"  x{scale} {stage}: {result['seconds']:.2f} s ({result['cpu_seconds']:.2f} s CPU), peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def grid_run(workers: int, warm: Path, config: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="dpo-bench-workers-") as tmp:
        cache = Path(tmp) / "cache"
        shutil.copytree(warm, cache, ignore=lambda d, names: ["cell"] if Path(d) == warm else [])
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
        env.pop("PREFECT_API_URL", None)
        cmd = [str(Path(sys.executable).with_name("dpo-bench")), "run", "--config", str(config), "--quiet", "--workers", str(workers),
               "--reports-dir", str(Path(tmp) / "reports"), "--cache-dir", str(cache), "--run-id", "w"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"--workers {workers} failed:\n{proc.stderr[-3000:]}")
        return time.perf_counter() - start


def worker_scaling(workers: list[int], repeats: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="dpo-bench-warm-") as tmp:
        config = Path(tmp) / "grid.toml"
        config.write_text(GRID_TOML)
        warm = Path(tmp) / "cache"
        subprocess.run([str(Path(sys.executable).with_name("dpo-bench")), "run", "--config", str(config), "--quiet", "--no-prefect",
                        "--threads", "1", "--reports-dir", str(Path(tmp) / "reports"), "--cache-dir", str(warm)],
                       check=True, capture_output=True, text=True)
        return interleave({f"{w} worker(s)": (lambda w=w: grid_run(w, warm, config)) for w in workers}, repeats)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--workers", default="1,2", help="Dask worker counts to compare ('' to skip)")
    p.add_argument("--repeats", type=int, default=2, help="repeats of each worker count")
    p.add_argument("--output", default="scaling", help="results file name under benchmarks/results/")
    p.add_argument("--stage-worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage_worker:
        scale, stage, cache = args.stage_worker.split(":", 2)
        stage_worker(int(scale), stage, cache)
        return
    loads = [load_average()[0]]
    rows = dataset_scaling([int(s) for s in args.scales.split(",")])
    base = {r["stage"]: r for r in rows if r["scale"] == rows[0]["scale"]}
    for r in rows:
        # CPU seconds (1 torch thread): wall time follows whatever else the cores run.
        r["cpu_vs_1x"] = r["cpu_seconds"] / base[r["stage"]]["cpu_seconds"] if base[r["stage"]]["cpu_seconds"] else float("nan")
    print(table(rows, ["scale", "stage", "seconds", "cpu_seconds", "cpu_vs_1x", "peak_rss_mb", "rss_growth_mb", "load"]))
    result: dict = {"config": vars(args), "dataset_rows": rows}
    if args.workers:
        walls = worker_scaling([int(w) for w in args.workers.split(",")], args.repeats)
        first = median(next(iter(walls.values())))
        worker_rows = [{"workers": name, "median_wall_s": median(xs), "speedup": first / median(xs), "repeats": len(xs)}
                       for name, xs in walls.items()]
        print(table(worker_rows, ["workers", "median_wall_s", "speedup", "repeats"]))
        result.update(worker_rows=worker_rows, worker_seconds=walls)
    loads.append(load_average()[0])
    print(f"load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result(args.output, {**result, "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
