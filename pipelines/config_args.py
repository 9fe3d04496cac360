"""A run's config from the command line (preset, TOML file, flags, --set), checked before anything runs,
and the environment a run starts in."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
import warnings
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
    from dpo_bench.bench import from_dict_config, load_config, merge, select_methods
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
        methods = _parse_methods(getattr(args, "methods", None))
        if getattr(args, "from_run", None):
            data = merge(read_run(Path(args.from_run))["config"], overrides)
            config = from_dict_config(select_methods(data, methods) if methods else data)
        else:
            preset = args.preset or (None if args.config else "default")
            config = load_config(preset, args.config, overrides, methods)
    for note in dict.fromkeys(str(n.message) for n in notes if issubclass(n.category, TRLNameNote)):
        print(f"dpo-bench: note: {note}", file=sys.stderr)
    for other in (n for n in notes if not issubclass(n.category, TRLNameNote)):  # shown as they would have been
        warnings.showwarning(other.message, other.category, other.filename, other.lineno)
    return config


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
    from dpo_engine.distributed import devices_error
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
        from dpo_engine.distributed import rank_device

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


