"""The ``dpo-bench`` command."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import signal
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from pipelines.commands import (
    cmd_check_config, cmd_check_data, cmd_compare, cmd_deploy, cmd_export, cmd_history, cmd_methods, cmd_report, cmd_run, cmd_serve,
    cmd_track,
)
from pipelines.config_args import offline_environment, resolve_config

__all__ = ["build_parser", "main", "offline_environment", "package_version", "resolve_config"]


def package_version() -> str:
    """The installed distribution's version, else (a source tree never installed) pyproject.toml's."""
    try:
        return metadata.version("dpo-bench")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
    return found.group(1) if found else "unknown"


def _add_worker_options(parser: argparse.ArgumentParser, here: str, when: str = "") -> None:
    parser.add_argument("--workers", type=int, help="run grid cells and the checks' PPO runs and reward models on a local Dask "
                        f"cluster of N processes, sharing the cores; 0 runs them one at a time in {here} (default: one worker "
                        f"per CPU core{when} when the device is a CPU with 2 or more cores and the grid has 4 or more cells of "
                        "a model task, else 0)")
    parser.add_argument("--dask-address", help="run grid cells on an existing Dask scheduler, e.g. tcp://host:8786")


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
    data.add_argument("file", help="the dataset: a .jsonl/.json/.parquet/.csv file, a folder of such shards, a glob of them "
                                   "(quote it: 'data/train-*.jsonl'), a save_to_disk directory or a hub id")
    data.add_argument("--split", default="train", help="split of a hub or saved dataset, or of a folder's shards (default: train)")
    data.add_argument("--data-config", metavar="NAME", default="", help="hub dataset: its configuration (load_dataset's name)")
    data.add_argument("--data-revision", metavar="REV", default="", help="hub dataset: the branch, tag or commit to read")
    data.add_argument("--data-files", action="append", metavar="GLOB", default=[],
                      help="hub dataset: read only these files of the repository (repeat the flag for several)")
    data.add_argument("--max-rows", type=int, metavar="N", help="check only the first N rows (a hub dataset is then streamed)")
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
        _stop_on_sigterm()
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


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's, ``kill``'s) ends ``dpo-bench run`` as Ctrl-C does: the run unwinds, so
    its Dask workers, its ranks and Prefect's temporary server (a process of its own, which the
    default action left running) stop with it; the exit status is 128 + 15."""

    def stop(signum: int, frame: object) -> None:
        _EXIT_CODE[0] = 128 + signum
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


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
