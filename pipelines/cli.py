"""The ``dpo-bench`` command."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import re
import sys
import textwrap
import tomllib
import warnings
from importlib import metadata
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
    # Prefect creates PREFECT_HOME but not its parents; its server then fails with "unable to open
    # database file" after a timeout, which names neither the setting nor the directory.
    home = os.environ.get("PREFECT_HOME")
    if home:
        try:
            Path(home).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"dpo-bench: cannot create PREFECT_HOME={home}: {e.strerror}") from None


def package_version() -> str:
    """The installed distribution's version, else (a source tree never installed) pyproject.toml's."""
    try:
        return metadata.version("dpo-bench")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
    return found.group(1) if found else "unknown"


def _parse_methods(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [m.strip() for m in text.split(",") if m.strip()]


def _parse_seeds(text: str) -> list[int]:
    from dpo_bench.configs import ConfigError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--seeds: expected comma-separated non-negative integers such as 0,1,2, got '{text}'")
    return [int(p) for p in parts]


def resolve_config(args: argparse.Namespace):
    """Preset (or a previous run's config), then the TOML file, then flags; validated."""
    from dpo_bench.bench import from_dict_config, load_config, merge
    from dpo_bench.configs import ConfigError, TRLNameNote
    from dpo_bench.run import read_run

    overrides = {flag: getattr(args, flag) for flag in ("device", "task", "threads", "nproc_per_cell", "precision")
                 if getattr(args, flag, None) is not None}
    if getattr(args, "seed", None) is not None:
        overrides.update(seed=args.seed, seeds=[])
    if getattr(args, "seeds", None):
        overrides["seeds"] = _parse_seeds(args.seeds)
    if getattr(args, "curves_x", None):
        overrides["report"] = {"curves_x": args.curves_x}
    tracking = {key: getattr(args, f"tracking{flag}") for key, flag in (("backend", ""), ("uri", "_uri"))
                if getattr(args, f"tracking{flag}", None) is not None}
    if tracking:
        overrides["tracking"] = tracking
    hf = {key: getattr(args, key) for key in ("model", "data") if getattr(args, key, None)}
    if hf:
        # --model / --data are the hf task's; they select it unless --task names it.
        overrides.setdefault("task", "hf")
        if overrides["task"] != "hf":
            raise ConfigError(f"--model and --data belong to the hf task, not to --task {overrides['task']}")
        overrides["hf"] = hf
    for assignment in getattr(args, "set", None) or []:
        overrides = merge(overrides, _parse_set(assignment))
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", TRLNameNote)
        if getattr(args, "from_run", None):
            config = from_dict_config(merge(read_run(Path(args.from_run))["config"], overrides))
        else:
            preset = args.preset or (None if args.config else "default")
            config = load_config(preset, args.config, overrides)
    for note in dict.fromkeys(str(n.message) for n in notes if issubclass(n.category, TRLNameNote)):
        print(f"dpo-bench: note: {note}", file=sys.stderr)
    for other in (n for n in notes if not issubclass(n.category, TRLNameNote)):  # shown as they would have been
        warnings.showwarning(other.message, other.category, other.filename, other.lineno)
    methods = _parse_methods(getattr(args, "methods", None))
    return config.with_methods(methods) if methods else config


def _parse_set(assignment: str) -> dict:
    """``--set section.key=value`` as nested overrides: the value read as TOML (a number, true,
    a list such as [0, 1], a quoted string), else taken as a bare string."""
    from dpo_bench.configs import ConfigError

    key, sep, text = assignment.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"--set: expected section.key=value (e.g. sft.steps=400), got '{assignment}'")
    if path[0] == "grid":
        raise ConfigError("--set: grid entries are a list; change them in a --config file")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    for part in reversed(path):
        value = {part: value}
    return value


# `run`'s flags for hf fields, named in messages beside the config key.
HF_FLAGS = {"model": "--model", "data": "--data"}


def missing_paths_error(config, flags: dict[str, str] | None = None) -> str | None:
    """"file not found: ..." for the first model, tokenizer, data or judge named by a path that does
    not exist (the hf task), which a dry run would otherwise list as a hub download."""
    missing_paths = getattr(config.task_config, "missing_paths", None)
    for key, name in missing_paths() if missing_paths else []:
        where = ", ".join([f"{config.task}.{key}"] + ([flags[key]] if key in (flags or {}) else []))
        return f"file not found: {name} ({where}); give an existing file or directory, or a hub id such as owner/name"
    return None


def tracking_error_here(config) -> str | None:
    """Why the config's tracking backend cannot log from here (its package missing), or None."""
    from dpo_bench.tracking import tracking_error

    return tracking_error(config.tracking.backend)


def devices_error_here(config) -> str | None:
    """Why the config's device and ranks cannot run on this machine, or None."""
    from dpo_bench.distributed import devices_error
    from dpo_bench.policy import resolve_device

    return devices_error(resolve_device(config.device), config.nproc_per_cell)


def dry_run_plan(config) -> str:
    """What `run` would do: where it runs, what it would download, its stages and cells."""
    from dpo_bench.configs import to_dict
    from dpo_bench.policy import resolve_device
    from dpo_bench.precision import resolve_precision

    seeds = ", ".join(map(str, config.pipeline_seeds))
    device = resolve_device(config.device)
    lines = [f"task {config.task}, preset {config.preset}, pipeline seeds {seeds}, device {config.device} (here: {device}), "
             f"precision {config.precision} (here: {resolve_precision(config.precision, device)})"]
    if config.nproc_per_cell > 1:
        from dpo_bench.distributed import rank_device

        backend = "NCCL" if device.type == "cuda" else "gloo"
        where = ", ".join(str(rank_device(device, r)) for r in range(config.nproc_per_cell))
        lines.append(f"each stage and cell trains on {config.nproc_per_cell} ranks ({backend}; {where})")
    if (unavailable := devices_error_here(config)) is not None:
        lines.append(f"not runnable on this machine: {unavailable}")
    downloads = getattr(config.task_config, "downloads", None)
    items = downloads() if downloads else []
    hub = [(what, name) for what, name, where in items if where == "hub"]
    local = [(what, name) for what, name, where in items if where == "local"]
    if hub:
        lines.append("would download from the hub:")
        lines += [f"  {what}: {name}" for what, name in hub]
    if local:
        lines.append("would read local files:")
        lines += [f"  {what}: {name}" for what, name in local]
    if not items:
        lines.append("downloads nothing: the task is generated offline")
    task_config = to_dict(config.task_config)
    judge = task_config.get("judge")
    if judge == "reward_model":
        lines.append("judge: the learned reward model (a proxy: no gold reward is reported)")
    elif judge:
        name = f"{judge} {task_config.get('judge_model', '')}".strip() if judge == "classifier" else judge
        gold = task_config.get("judge_is_gold")
        lines.append(f"judge: {name} ({'declared the gold reward' if gold else 'not gold: reported as judge_reward'})")
    lines.append("stages of each pipeline seed: reference (SFT), reference evaluation, preferences, reference log-probs, "
                 "reward model (the task's data is shared)")
    cells = config.cells()
    lines.append(f"{len(cells)} cells:")
    lines += [f"  {cell.label}" for cell in cells]
    return "\n".join(lines)


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
                config=config.to_dict(), reports_dir=str(args.reports_dir), run_id=args.run_id,
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


def _add_worker_options(parser: argparse.ArgumentParser, here: str, when: str = "") -> None:
    parser.add_argument("--workers", type=int, help="run grid cells and the checks' PPO runs and reward models on a local Dask "
                        f"cluster of N processes, sharing the cores; 0 runs them one at a time in {here} (default: one worker "
                        f"per CPU core{when} when the device is a CPU with 2 or more cores and the grid has 4 or more cells of "
                        "a model task, else 0)")
    parser.add_argument("--dask-address", help="run grid cells on an existing Dask scheduler, e.g. tcp://host:8786")


def _schedule_parameters(args: argparse.Namespace):
    """(deployment name, flow parameters) from the config options, or an exit code on a config error."""
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
    offline_environment()
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
    offline_environment()
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
    from dpo_bench.data import HubUnreachableError, check_data

    try:
        source = _check_data_source(args, extra or [])
        column_map = _parse_column_map(args.column_map or [])
        lengths = _model_lengths(args.model) if args.model else None
        summary = check_data(source, column_map=column_map or None, lengths=lengths)
    except (UsageError, HubUnreachableError) as e:
        print(f"dpo-bench: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.startswith("ok") else 1


def _add_config_options(p: argparse.ArgumentParser) -> None:
    from dpo_bench.presets import preset_names

    p.add_argument("--preset", choices=preset_names(), default=None,
                   help="a named configuration shipped with dpo-bench (default: 'default' unless --config is given)")
    p.add_argument("--config", metavar="FILE.toml", help="a TOML config; its keys override the preset's (see README, 'Configuration')")
    p.add_argument("--task", choices=["sentiment", "bandit", "hf"],
                   help="benchmark task: sentiment (offline IMDb analogue), bandit (exact, tabular) or hf (your model and data)")
    p.add_argument("--methods", metavar="A,B,...", help="run only these methods (comma-separated; see `dpo-bench methods`)")
    p.add_argument("--seed", type=int, help="run one pipeline with this seed (instead of the preset's seeds)")
    p.add_argument("--seeds", metavar="A,B,...", help="whole-pipeline seeds, e.g. 0,1,2: each seed trains its own SFT model, "
                                                      "preference data, reward model and cells; the report's tests are between seeds")
    p.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, help="torch threads per stage (0 = torch's default)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="mixed precision of training: autocast to bf16 or fp16 with float32 weights and optimiser (fp16 "
                        "with loss scaling), or fp32; auto (the default): bf16 on a CUDA GPU that supports it, else fp32; "
                        "evaluation runs in float32")
    p.add_argument("--nproc-per-cell", type=int, metavar="N",
                   help="train each stage and cell on N processes, data parallel on torch.distributed (gloo on the CPU, "
                        "NCCL with one GPU a rank): each rank its share of every batch, gradients summed before the step; "
                        "the cores (or GPUs) are shared between the ranks and the Dask workers")
    p.add_argument("--from-run", metavar="RUN_DIR", help="repeat a run: take the resolved config from RUN_DIR/run.json")
    p.add_argument("--curves-x", metavar="AXIS", help=CURVES_X_HELP)
    p.add_argument("--tracking", choices=["mlflow", "tensorboard", "wandb"],
                   help="log the finished run to MLflow, TensorBoard or Weights & Biases: a parent run with a child per cell "
                        "(config, data fingerprints, training curves, metrics at each checkpoint, the report; W&B: runs of "
                        "one group, offline unless WANDB_MODE says otherwise); needs the tracking extra; [tracking] backend "
                        "in a config")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow's tracking URI (e.g. sqlite:///mlflow.db; default MLFLOW_TRACKING_URI, else ./mlruns), "
                        "TensorBoard's log directory (default <reports-dir>/tensorboard) or W&B's directory (default "
                        "<reports-dir>/wandb)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value, after the preset, the file and the other flags (repeatable): "
                        "e.g. --set sft.steps=400 --set evaluation.temperatures=[1.0] --set device=cpu; the value "
                        "is read as TOML, else as a string; grid entries only through --config")


CURVES_X_HELP = ("x-axis of the report's training curves: steps (optimiser steps, the default), samples (generated in "
                 "training), tokens (trained on) or seconds (of training); [report] curves_x in a config")


def _add_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-db", metavar="URL",
                   help="results store as a SQLAlchemy URL, e.g. postgresql://host/db (default: <reports-dir>/results.db)")


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
              dpo-bench history --preset quick             # the trend over stored runs
              dpo-bench compare RUN_A RUN_B                # which metrics differ significantly
              dpo-bench serve --cron "0 3 * * *" --preset default   # nightly runs (needs a Prefect server)
        """),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the benchmark and write reports/<run_id>/",
                         description="Run SFT, preference sampling, reward model, every method of the grid, "
                                     "evaluation and the report, as a Prefect flow.")
    _add_config_options(run)
    run.add_argument("--reports-dir", default="reports", help="where runs are written (default: reports)")
    run.add_argument("--run-id", help="name of the run directory (default: <date>-<time>-<preset>)")
    run.add_argument("--cache-dir", help="stage cache (default: <reports-dir>/.cache); shown in run.json")
    run.add_argument("--no-cache", action="store_true", help="recompute every stage, ignoring (and refreshing) the cache")
    _add_worker_options(run, "this process")
    run.add_argument("--no-prefect", action="store_true", help="run the stages in this process without Prefect (debugging)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--model", metavar="ID_OR_DIR", help="hf task: the causal LM, a hub id or a local directory (implies --task hf)")
    run.add_argument("--data", metavar="ID_OR_FILE", help="hf task: preference data, a hub dataset id or a .jsonl/.parquet/.csv file (implies --task hf)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved plan (models and datasets to download, stages, cells) and exit")
    _add_store_option(run)
    run.set_defaults(func=cmd_run)

    for command, helptext, func in (
        ("serve", "register the benchmark as a scheduled Prefect deployment and serve it (needs PREFECT_API_URL)", cmd_serve),
        ("deploy", "register the benchmark as a scheduled deployment on a Prefect work pool (needs PREFECT_API_URL)", cmd_deploy),
    ):
        p = sub.add_parser(command, help=helptext, description=helptext + ". See README, 'Scheduled runs'.")
        _add_config_options(p)
        p.add_argument("--cron", required=True, help='schedule as a cron expression, e.g. "0 3 * * *" (03:00 every day)')
        p.add_argument("--timezone", help="time zone of the cron schedule, e.g. Europe/Berlin (default: UTC)")
        p.add_argument("--name", help="deployment name (default: the preset's name, plus the task unless sentiment)")
        p.add_argument("--reports-dir", default="reports", help="where scheduled runs are written (default: reports)")
        p.add_argument("--cache-dir", help="stage cache (default: <reports-dir>/.cache)")
        p.add_argument("--no-cache", action="store_true", help="every scheduled run recomputes every stage")
        _add_worker_options(p, "the flow's process", when=" of the machine that runs each flow")
        _add_store_option(p)
        p.set_defaults(func=func)
        if command == "serve":
            p.add_argument("--limit", type=int, default=1, help="at most this many runs at once (default: 1)")
        else:
            p.add_argument("--pool", required=True, help="the work pool whose workers run the deployment")
            p.add_argument("--queue", help="the work pool's queue (default: its default queue)")
            p.add_argument("--source", help="where workers find this code: a directory or git URL (default: this project)")

    history = sub.add_parser("history", help="print the trend of each method's final results over stored runs",
                             description="Print each method's final gold reward, KL and win rate over the runs in the "
                                         "results store, oldest first, marking changes beyond their interval.")
    history.add_argument("--preset", help="only runs of this preset")
    history.add_argument("--task", help="only runs of this task")
    history.add_argument("--method", help="only this method")
    history.add_argument("--last", type=int, help="only the last N runs")
    history.add_argument("--reports-dir", default="reports", help="its results.db is the default store (default: reports)")
    _add_store_option(history)
    history.set_defaults(func=cmd_history)

    compare = sub.add_parser("compare", help="print which metrics differ significantly between two runs",
                             description="Compare the final results of two runs policy by policy (Welch tests from "
                                         "value, standard error and n; Holm-corrected p-values beside them).")
    compare.add_argument("run_a", help="a run directory, a run id under --reports-dir, or a run id in the results store")
    compare.add_argument("run_b", help="the same for the other run; differences are B − A")
    compare.add_argument("--reports-dir", default="reports", help="where run ids are looked up (default: reports)")
    _add_store_option(compare)
    compare.set_defaults(func=cmd_compare)

    methods = sub.add_parser("methods", help="list registered methods with their hyper-parameters")
    methods.set_defaults(func=cmd_methods)

    report = sub.add_parser("report", help="rebuild report.md and report.html from a run directory's files")
    report.add_argument("run_dir", help="a directory written by `dpo-bench run`")
    report.add_argument("--curves-x", metavar="AXIS", help=CURVES_X_HELP.replace("; [report] curves_x in a config",
                                                                               " (default: the run's [report] curves_x)"))
    report.set_defaults(func=cmd_report)

    export = sub.add_parser("export", help="write a cell's trained policy as a transformers model directory with a model card",
                            description="Write a cell's trained policy (its last evaluated checkpoint) with the task's tokenizer "
                                        "and a model card (README.md: method, strength, seed, data fingerprints, final metrics "
                                        "with intervals) into a directory that transformers' from_pretrained loads.")
    export.add_argument("run_dir", help="a directory written by `dpo-bench run`")
    export.add_argument("cell", help="the cell, as run.json's `cells` and the report name it, e.g. 'dpo β=0.1 seed=0'")
    export.add_argument("out_dir", help="where to write it (created; must be new or empty)")
    export.set_defaults(func=cmd_export)

    track = sub.add_parser("track", help="log a finished run to MLflow, TensorBoard or W&B",
                           description="Log a run written by `dpo-bench run` (now or before) to an experiment tracker: a parent "
                                       "run (config, data fingerprints, the verdict, the report and figures) with a child per "
                                       "cell (its method config, training curves, metrics at each checkpoint).")
    track.add_argument("run_dir", help="a directory written by `dpo-bench run`")
    track.add_argument("--tracking", required=True, choices=["mlflow", "tensorboard", "wandb"],
                       help="the tracker (W&B: offline unless WANDB_MODE says otherwise)")
    track.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow's tracking URI (default MLFLOW_TRACKING_URI, else ./mlruns), TensorBoard's log "
                            "directory or W&B's directory (default: beside the run, <reports-dir>/tensorboard or "
                            "<reports-dir>/wandb)")
    track.add_argument("--experiment", default="dpo-bench", help="MLflow experiment or W&B project (default: dpo-bench)")
    track.set_defaults(func=cmd_track)

    check = sub.add_parser("check-config", help="validate a config (preset + TOML + flags) without running it")
    _add_config_options(check)
    check.add_argument("--show", action="store_true", help="print the resolved config as JSON")
    check.set_defaults(func=cmd_check_config)

    data = sub.add_parser("check-data", help="validate a preference dataset (jsonl, parquet, csv, a saved dataset or a hub id)")
    data.add_argument("file", help="the dataset: a .jsonl/.json/.parquet/.csv file, a folder of such shards, a save_to_disk directory or a hub id")
    data.add_argument("--model", metavar="MODEL",
                      help="also check every row's prompt + completion against MODEL's tokenizer and positions (a hub id "
                           "or a local directory; conversational rows through its chat template), as --task hf would")
    data.add_argument("--column-map", action="append", metavar="SRC=DST",
                      help="rename a source column before checking, one pair per flag (repeat it), e.g. "
                           "--column-map question=prompt --column-map response_j=chosen")
    data.set_defaults(func=cmd_check_data, takes_extra=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: with two cores shared by a server, Dask workers or
    # other jobs, spinning made a DPO step 3.4x slower than one thread (git show 8338f62:benchmarks/RESULTS.md, "Threads"). Set
    # before torch is imported, which every subcommand does lazily.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    parser = build_parser()
    # check-data is given the words argparse found no place for, to name a column pair left without
    # its flag; unknown options, and extra words elsewhere, are argparse's error as with parse_args.
    args, extra = parser.parse_known_args(argv)
    takes_extra = getattr(args, "takes_extra", False)
    if extra and (not takes_extra or any(word.startswith("-") for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if argv is None and args.command == "run":
        _skip_teardown_at_exit()
    try:
        code = args.func(args, extra) if takes_extra else args.func(args)
    except BrokenPipeError:
        # The reader of stdout went away (`dpo-bench check-config | head`): stop quietly, as Unix
        # tools do; stdout goes to /dev/null so that the interpreter's final flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    _EXIT_CODE[0] = code
    return code


# The exit code for _skip_teardown_at_exit: 1 unless the command returned.
_EXIT_CODE = [1]


def _skip_teardown_at_exit() -> None:
    """End the `dpo-bench run` process right after its exit handlers, skipping interpreter teardown.

    Registered before Prefect's handlers (which stop the temporary server and flush events), so it
    runs after them; tearing down the modules of torch, transformers, pandas and Prefect then took
    about 3 s of a 20 s cached run and wrote nothing. Only for the command line: a caller of
    ``main([...])`` keeps its interpreter.
    """

    def finish() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_CODE[0])

    atexit.register(finish)


if __name__ == "__main__":
    sys.exit(main())
