"""What each ``dpo-bench`` subcommand does (``pipelines/cli.py`` builds the parser)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.config_args import (
    HF_FLAGS, devices_error_here, dry_run_plan, missing_paths_error, offline_environment, resolve_config, tracking_error_here,
)


def _refuse_bad_workers(args: argparse.Namespace) -> bool:
    """True (after saying why) when --workers is negative: checked before any server starts."""
    if args.workers is not None and args.workers < 0:
        print(f"dpo-bench: --workers must be >= 0, got {args.workers}", file=sys.stderr)
        return True
    return False


def cmd_run(args: argparse.Namespace) -> int:
    if _refuse_bad_workers(args):
        return 2
    api = None
    if not args.no_prefect and not args.dry_run:
        offline_environment()
        from pipelines.local_api import start_temporary_api

        api = start_temporary_api()  # starts while torch, the config and the flow's modules load
    from dpo_bench.configs import ConfigError

    try:
        config = resolve_config(args)
        error = missing_paths_error(config, HF_FLAGS)
    except ConfigError as e:
        error = f"config error: {e}"
    if args.dry_run and not error:  # the plan is shown for any machine; what this one lacks is said in it
        print(dry_run_plan(config))
        return 0
    error = error or devices_error_here(config) or tracking_error_here(config)
    if error:
        if api is not None:
            api.stop()
        print(f"dpo-bench: {error}", file=sys.stderr)
        return 2
    from pipelines.workers import resolve_workers, worker_threads

    workers = 0 if args.no_prefect or args.dask_address else resolve_workers(args.workers, config)
    threads = worker_threads(workers, config)
    where = f", on {workers} Dask workers x {threads} torch threads" if workers else ""
    print(f"dpo-bench: {config.task} task, preset {config.preset}, {len(config.cells())} cells{where}", file=sys.stderr)
    from dpo_bench.data import DataValidationError, HubUnreachableError
    from dpo_bench.run import RunExistsError

    try:
        run_dir = _run(args, config, api, workers)
    except (DataValidationError, HubUnreachableError, RunExistsError) as e:  # the task's data, read by its first stage; a live run's id
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(f"dpo-bench: report written to {run_dir / 'report.html'} and {run_dir / 'report.md'}")
    return 0


def _run(args: argparse.Namespace, config, api, workers: int) -> Path:
    if args.no_prefect:
        from dpo_bench.run import run_benchmark

        run_dir = run_benchmark(
            config, Path(args.reports_dir), run_id=args.run_id, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            use_cache=not args.no_cache, progress=not args.quiet,
            on_stage=lambda m: print(f"dpo-bench: {m}", file=sys.stderr), results_db=args.results_db,
        )
    else:
        from pipelines.benchmark import benchmark_flow
        from pipelines.local_api import flow_settings

        with flow_settings(api):
            run_dir = Path(benchmark_flow(
                config=config, reports_dir=str(args.reports_dir), run_id=args.run_id,
                cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.quiet,
                results_db=args.results_db, workers=workers, dask_address=args.dask_address,
            ))
    return run_dir


def _store_url(args: argparse.Namespace) -> str:
    from dpo_bench.store import default_url

    return args.results_db or default_url(args.reports_dir)


def cmd_history(args: argparse.Namespace) -> int:
    from dpo_bench import store
    from dpo_bench.report.history import format_history

    url = _store_url(args)
    try:
        frame = store.history(url, preset=args.preset, method=args.method, task=args.task)
    except store.StoreError as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    if args.last and not frame.empty:
        keep = frame.drop_duplicates("run_id").sort_values("started_at")["run_id"].tail(args.last)
        frame = frame[frame["run_id"].isin(keep)]
    print(f"results store: {store.display_url(url)}")
    print(format_history(frame))
    return 0


def _run_metrics(ref: str, args: argparse.Namespace, url: str):
    """A run's metrics from a run directory, a run id under --reports-dir, or a run id in the store."""
    import pandas as pd

    from dpo_bench import store

    for candidate in (Path(ref), Path(args.reports_dir) / ref):
        if (candidate / "metrics.parquet").is_file():
            return str(candidate), pd.read_parquet(candidate / "metrics.parquet")
    metrics = store.run_metrics(url, [ref], final_only=True)
    if metrics.empty:
        raise LookupError(f"{ref!r} is neither a run directory, nor a run in {args.reports_dir}, "
                          f"nor a run id in the results store {store.display_url(url)}")
    return f"{ref} (results store)", metrics


def cmd_compare(args: argparse.Namespace) -> int:
    from dpo_bench import store
    from dpo_bench.report.history import COMPARE_METRICS, compare_summaries, final_summary, format_comparison

    url = _store_url(args)
    try:
        (name_a, a), (name_b, b) = _run_metrics(args.run_a, args, url), _run_metrics(args.run_b, args, url)
    except (LookupError, store.StoreError) as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    comparison = compare_summaries(final_summary(a, COMPARE_METRICS), final_summary(b, COMPARE_METRICS))
    print(format_comparison(comparison, name_a, name_b))
    return 0


def _schedule_parameters(args: argparse.Namespace):
    """(deployment name, flow parameters) from the config options, in the offline environment a
    scheduled run gets, or None after saying what is wrong with them."""
    offline_environment()
    from dpo_bench.configs import ConfigError

    try:
        config = resolve_config(args)
    except ConfigError as e:
        print(f"dpo-bench: config error: {e}", file=sys.stderr)
        return None
    from pipelines.deploy import flow_parameters

    if _refuse_bad_workers(args):
        return None
    name = args.name or (config.preset if config.task == "sentiment" else f"{config.preset}-{config.task}")
    return name, flow_parameters(config.to_dict(), args.reports_dir, args.cache_dir, args.results_db, use_cache=not args.no_cache,
                                 workers=args.workers, dask_address=args.dask_address)


def cmd_serve(args: argparse.Namespace) -> int:
    made = _schedule_parameters(args)
    if made is None:
        return 2
    name, parameters = made
    from pipelines.deploy import DeployError, api_url, build_deployment, serve_benchmark

    try:
        url = api_url()
        deployment = build_deployment(name, args.cron, parameters, timezone=args.timezone)
    except DeployError as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(f"dpo-bench: serving deployment '{deployment.flow_name}/{name}' on {url}, schedule '{args.cron}'"
          f"{f' ({args.timezone})' if args.timezone else ' (UTC)'}; reports in {parameters['reports_dir']}", file=sys.stderr)
    serve_benchmark(deployment, limit=args.limit)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    made = _schedule_parameters(args)
    if made is None:
        return 2
    name, parameters = made
    from pipelines.deploy import FLOW_NAME, DeployError, deploy_benchmark

    try:
        deployment_id = deploy_benchmark(name, args.cron, parameters, work_pool=args.pool, timezone=args.timezone,
                                         source=args.source, work_queue=args.queue)
    except DeployError as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(f"dpo-bench: deployment '{FLOW_NAME}/{name}' ({deployment_id}) on work pool '{args.pool}', schedule '{args.cron}'; "
          f"start a worker with `prefect worker start --pool {args.pool}`")
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


def cmd_export(args: argparse.Namespace) -> int:
    from dpo_bench.configs import ConfigError
    from dpo_bench.export import export_cell

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").exists():
        print(f"dpo-bench: {run_dir} is not a run directory (missing run.json)", file=sys.stderr)
        return 2
    try:
        out = export_cell(run_dir, args.cell, args.out_dir)
    except ConfigError as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(f"dpo-bench: wrote {out} (AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load it; "
          "README.md is its model card)")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from dpo_bench.tracking import log_run, tracking_error

    run_dir = Path(args.run_dir)
    error = tracking_error(args.tracking) or (None if (run_dir / "run.json").is_file() else
                                              f"{run_dir}: no run.json (not a directory written by `dpo-bench run`)")
    if error:
        print(f"dpo-bench: {error}", file=sys.stderr)
        return 2
    try:
        where = log_run(run_dir, args.tracking, args.tracking_uri or "", args.experiment)
    except Exception as e:  # noqa: BLE001 - the tracker's own errors (a store it cannot open), in one line
        print(f"dpo-bench: not logged to {args.tracking}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"dpo-bench: logged to {where}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dpo_bench.report import build_report

    run_dir = Path(args.run_dir)
    missing = [f for f in ("metrics.parquet", "run.json") if not (run_dir / f).exists()]
    if missing:
        print(f"dpo-bench: {run_dir} is not a run directory (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    try:
        paths = build_report(run_dir, curves_x=args.curves_x)
    except ValueError as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(f"dpo-bench: wrote {paths['markdown']} and {paths['html']}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from dpo_bench.configs import ConfigError

    try:
        config = resolve_config(args)
        error = missing_paths_error(config) or devices_error_here(config) or tracking_error_here(config)
    except ConfigError as e:
        error = f"config error: {e}"
    if error:
        print(f"dpo-bench: {error}", file=sys.stderr)
        return 2
    print(f"ok: task {config.task}, preset {config.preset}, {len(config.cells())} cells:")
    for cell in config.cells():
        print(f"  {cell.label}")
    if args.show:
        print(json.dumps(config.to_dict(), indent=2))
    return 0


class UsageError(Exception):
    """A command line that cannot mean what it says; printed as one line, exit status 2."""


def _parse_column_map(pairs: list[str]) -> dict[str, str]:
    """--column-map SRC=DST flags as a dict: every pair split at '=', no source named twice, no two onto one."""
    column_map: dict[str, str] = {}
    for pair in pairs:
        source, equals, target = pair.partition("=")
        if not (source and equals and target):
            example = f"{source or 'question'}=prompt"
            raise UsageError(f"--column-map '{pair}': expected SRC=DST, e.g. --column-map {example}")
        if source in column_map:
            raise UsageError(f"--column-map: column '{source}' is mapped twice")
        onto = next((s for s, t in column_map.items() if t == target), None)
        if onto is not None:
            raise UsageError(f"--column-map: '{onto}' and '{source}' are both mapped to '{target}'")
        column_map[source] = target
    return column_map


def _check_data_source(args: argparse.Namespace, extra: list[str]) -> str:
    """The one dataset of `check-data`, refusing words that are column pairs without their flag."""
    from dpo_bench.data import looks_like_path

    words = [args.file, *extra]
    stray = [w for w in words if "=" in w and not looks_like_path(w) and not Path(w).expanduser().exists()]
    if stray and len(words) > 1:
        raise UsageError(f"--column-map takes one SRC=DST pair per flag: write --column-map {stray[0]} for '{stray[0]}'")
    if stray:
        raise UsageError(f"check-data: '{stray[0]}' looks like a --column-map pair, not a dataset; "
                         "name the dataset: dpo-bench check-data FILE --column-map SRC=DST")
    if extra:
        raise UsageError(f"check-data checks one dataset, got {len(words)}: {', '.join(words)}")
    if looks_like_path(args.file) and not Path(args.file).expanduser().exists():
        raise UsageError(f"file not found: {args.file}")
    return args.file


def _model_lengths(model: str) -> tuple:
    """(tokenizer, max_length, what they are) for `check-data --model`: the model's tokenizer and the
    max_length a run of the hf task takes for it by default (its positions less EOS, at most 512)."""
    from dpo_bench.data import HubUnreachableError, hub_offline, looks_like_path, unreachable
    from dpo_bench.policy import load_tokenizer
    from dpo_bench.tasks.hf import default_max_length, positions_of

    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise UsageError(f"--model: file not found: {model}")
    try:
        tokenizer = load_tokenizer(model)
        positions = positions_of(model)
    except (OSError, ValueError) as e:  # not a model (no tokenizer), a tokenizer that cannot pad, the hub
        if isinstance(e, OSError) and unreachable(e):
            raise HubUnreachableError(model, offline=hub_offline(), kind="model") from None
        raise UsageError(f"--model {model}: {e}".splitlines()[0]) from None
    max_length = default_max_length(positions)
    where = f"its {positions} positions less EOS" if positions else "no position limit stated"
    return tokenizer, max_length, f"prompt + completion within {max_length} tokens of {model}'s tokenizer (hf.max_length's default: {where})"


def cmd_check_data(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from dpo_bench.data import HubOptions, HubUnreachableError, check_data

    try:
        source = _check_data_source(args, extra or [])
        column_map = _parse_column_map(args.column_map or [])
        if args.max_rows is not None and args.max_rows < 1:
            raise UsageError(f"--max-rows must be positive, got {args.max_rows}")
        lengths = _model_lengths(args.model) if args.model else None
        hub = HubOptions(args.data_config, args.data_revision, tuple(args.data_files))
        summary = check_data(source, column_map=column_map or None, lengths=lengths, split=args.split, max_rows=args.max_rows,
                             hub=hub)
    except (UsageError, HubUnreachableError) as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.startswith("ok") else 1


