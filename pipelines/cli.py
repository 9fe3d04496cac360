"""The ``dpo-bench`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

OFFLINE_ENV = {
    # Prefect must not phone home: no analytics, no telemetry look-ups; slow machines need time to start its server.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def offline_environment() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def _parse_methods(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [m.strip() for m in text.split(",") if m.strip()]


def resolve_config(args: argparse.Namespace):
    """Preset (or a previous run's config), then the TOML file, then flags; validated."""
    from dpo_bench.bench import from_dict_config, load_config, merge
    from dpo_bench.run import read_run

    overrides = {flag: getattr(args, flag) for flag in ("seed", "device", "task", "threads") if getattr(args, flag, None) is not None}
    if getattr(args, "from_run", None):
        config = from_dict_config(merge(read_run(Path(args.from_run))["config"], overrides))
    else:
        preset = args.preset or (None if args.config else "default")
        config = load_config(preset, args.config, overrides)
    methods = _parse_methods(getattr(args, "methods", None))
    return config.with_methods(methods) if methods else config


def cmd_run(args: argparse.Namespace) -> int:
    from dpo_bench.configs import ConfigError

    try:
        config = resolve_config(args)
    except ConfigError as e:
        print(f"dpo-bench: config error: {e}", file=sys.stderr)
        return 2
    if (args.workers or args.dask_address) and not config.threads:
        from dataclasses import replace

        # N worker processes share the cores: one torch thread pool per worker, no oversubscription.
        config = replace(config, threads=max(1, (os.cpu_count() or 1) // max(1, args.workers or 1)))
    print(f"dpo-bench: {config.task} task, preset {config.preset}, {len(config.cells())} cells", file=sys.stderr)
    if args.no_prefect:
        from dpo_bench.run import run_benchmark

        run_dir = run_benchmark(
            config, Path(args.reports_dir), run_id=args.run_id, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            use_cache=not args.no_cache, progress=not args.quiet,
            on_stage=lambda m: print(f"dpo-bench: {m}", file=sys.stderr),
        )
    else:
        offline_environment()
        from pipelines.benchmark import benchmark_flow, task_runner_for

        runner = task_runner_for(args.workers, args.dask_address)
        flow = benchmark_flow.with_options(task_runner=runner) if runner else benchmark_flow
        run_dir = Path(flow(
            config=config.to_dict(), reports_dir=str(args.reports_dir), run_id=args.run_id,
            cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.quiet, parallel=runner is not None,
        ))
    print(f"dpo-bench: report written to {run_dir / 'report.html'} and {run_dir / 'report.md'}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from dpo_bench.bench import known_methods
    from dpo_bench.configs import field_docs
    from dpo_bench.methods.base import get_method

    for name in known_methods():
        method = get_method(name)
        needs = ", ".join(sorted(method.needs)) or "nothing"
        strength = f"; strength: {method.strength}" if method.strength else ""
        print(f"{name}: {method.description}")
        print(f"    needs: {needs}{strength}")
        for field_name, default, doc in field_docs(method.config_cls):
            print(f"    {field_name} = {default!r}" + (f"  # {doc}" if doc else ""))
        print()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dpo_bench.report import build_report

    run_dir = Path(args.run_dir)
    missing = [f for f in ("metrics.parquet", "run.json") if not (run_dir / f).exists()]
    if missing:
        print(f"dpo-bench: {run_dir} is not a run directory (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    paths = build_report(run_dir)
    print(f"dpo-bench: wrote {paths['markdown']} and {paths['html']}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from dpo_bench.configs import ConfigError

    try:
        config = resolve_config(args)
    except ConfigError as e:
        print(f"dpo-bench: config error: {e}", file=sys.stderr)
        return 2
    print(f"ok: task {config.task}, preset {config.preset}, {len(config.cells())} cells:")
    for cell in config.cells():
        print(f"  {cell.label}")
    if args.show:
        print(json.dumps(config.to_dict(), indent=2))
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from dpo_bench.data import check_data

    column_map = dict(pair.split("=", 1) for pair in args.column_map) if args.column_map else None
    try:
        summary = check_data(args.file, column_map=column_map)
    except FileNotFoundError as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.startswith("ok") else 1


def _add_config_options(p: argparse.ArgumentParser) -> None:
    from dpo_bench.bench import preset_names

    p.add_argument("--preset", choices=preset_names(), default=None,
                   help="a named configuration shipped with dpo-bench (default: 'default' unless --config is given)")
    p.add_argument("--config", metavar="FILE.toml", help="a TOML config; its keys override the preset's (see README, 'Configuration')")
    p.add_argument("--task", choices=["sentiment", "bandit"], help="benchmark task: sentiment (offline IMDb analogue) or bandit (exact, tabular)")
    p.add_argument("--methods", metavar="A,B,...", help="run only these methods (comma-separated; see `dpo-bench methods`)")
    p.add_argument("--seed", type=int, help="run seed; every stage and cell derives its own seed from it")
    p.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, help="torch threads per stage (0 = torch's default)")
    p.add_argument("--from-run", metavar="RUN_DIR", help="repeat a run: take the resolved config from RUN_DIR/run.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-bench",
        description="An offline benchmark that puts RLHF (reward model + PPO) and DPO side by side.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              dpo-bench run --preset quick                 # every stage, small, about a minute
              dpo-bench run --preset default               # the full comparison (make bench)
              dpo-bench run --task bandit --preset quick   # the exact tabular task
              dpo-bench run --methods dpo,ipo,ppo          # a subset of methods
              dpo-bench methods                            # registered methods and their options
              dpo-bench report reports/<run_id>            # rebuild a report from its files
        """),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the benchmark and write reports/<run_id>/",
                         description="Run SFT, preference sampling, reward model, every method of the grid, "
                                     "evaluation and the report, as a Prefect flow.")
    _add_config_options(run)
    run.add_argument("--reports-dir", default="reports", help="where runs are written (default: reports)")
    run.add_argument("--run-id", help="name of the run directory (default: <date>-<time>-<preset>)")
    run.add_argument("--cache-dir", help="stage cache (default: <reports-dir>/.cache); shown in run.json")
    run.add_argument("--no-cache", action="store_true", help="recompute every stage, ignoring (and refreshing) the cache")
    run.add_argument("--workers", type=int, default=0, help="run grid cells on a local Dask cluster of N processes")
    run.add_argument("--dask-address", help="run grid cells on an existing Dask scheduler, e.g. tcp://host:8786")
    run.add_argument("--no-prefect", action="store_true", help="run the stages in this process without Prefect (debugging)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    methods = sub.add_parser("methods", help="list registered methods with their hyper-parameters")
    methods.set_defaults(func=cmd_methods)

    report = sub.add_parser("report", help="rebuild report.md and report.html from a run directory's files")
    report.add_argument("run_dir", help="a directory written by `dpo-bench run`")
    report.set_defaults(func=cmd_report)

    check = sub.add_parser("check-config", help="validate a config (preset + TOML + flags) without running it")
    _add_config_options(check)
    check.add_argument("--show", action="store_true", help="print the resolved config as JSON")
    check.set_defaults(func=cmd_check_config)

    data = sub.add_parser("check-data", help="validate a preference dataset (jsonl, parquet, csv, a saved dataset or a hub id)")
    data.add_argument("file", help="the dataset")
    data.add_argument("--column-map", nargs="*", metavar="SRC=DST", help="rename columns, e.g. question=prompt response_j=chosen")
    data.set_defaults(func=cmd_check_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
