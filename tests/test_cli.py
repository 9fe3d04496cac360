"""The dpo-bench command: help, methods, config and data checks, clear errors."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import build_parser, main


def test_run_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for action in build_parser()._subparsers._group_actions[0].choices["run"]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
            assert action.option_strings[-1] in out


def test_methods_lists_every_registered_method_with_its_options(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("sft", "preferred_ft", "unlikelihood", "best_of_n", "ppo", "ppo_gt", "dpo", "cdpo", "robust",
                 "ipo", "hinge", "dpo_pl", "simpo"):
        assert f"\n{name}: " in f"\n{out}"
    assert "beta = 0.1  # β" in out and "kl_coef = 0.1" in out


def test_check_config_reports_cells_and_errors(tmp_path, capsys):
    assert main(["check-config", "--preset", "quick"]) == 0
    assert "dpo β=0.1 seed=0" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[grid]]\nmethod = "dpo"\nvalues = [-1.0]\n')
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "beta must be > 0" in capsys.readouterr().err


def test_run_refuses_a_bad_config_before_running(tmp_path, capsys):
    assert main(["run", "--preset", "quick", "--methods", "dpo,nope", "--reports-dir", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_check_data(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "the film was", "chosen": "great .", "rejected": "dull ."}) + "\n")
    assert main(["check-data", str(good)]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "the film was", "chosen": "", "rejected": "dull ."}) + "\n")
    assert main(["check-data", str(bad)]) == 1
    assert "row 0, field 'chosen'" in capsys.readouterr().out


def test_report_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_prefect_home_is_created_with_its_parents_or_refused_clearly(tmp_path, monkeypatch):
    from pipelines.cli import offline_environment

    nested = tmp_path / "a" / "b" / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(nested))
    offline_environment()
    assert nested.is_dir()

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PREFECT_HOME", str(blocker / "home"))
    with pytest.raises(SystemExit, match="cannot create PREFECT_HOME="):
        offline_environment()


def test_default_workers_follow_the_grid_the_task_and_the_machine(monkeypatch):
    import importlib.util

    from dpo_bench.bench import load_config
    from pipelines.workers import resolve_workers, worker_threads

    default, quick = load_config("default"), load_config("quick", overrides={"seed": 0})
    bandit = load_config("default", overrides={"task": "bandit"})
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_workers(None, default) == 2 and worker_threads(2, default) == 1
    assert len(quick.cells()) == 4 and resolve_workers(None, quick) == 2
    assert resolve_workers(None, quick.with_methods(["sft", "dpo"])) == 0  # 2 cells: starting workers does not pay
    assert resolve_workers(None, bandit) == 0  # table policies
    assert resolve_workers(3, quick) == 3 and worker_threads(0, quick) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert resolve_workers(None, default) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prefect_dask" else real(name, *a))
    assert resolve_workers(None, default) == 0  # without the dask extra, in-process
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        resolve_workers(-1, default)


@pytest.mark.parametrize("command", [["run"], ["serve", "--cron", "0 3 * * *"]])
def test_negative_workers_are_refused_before_anything_starts(command, capsys):
    assert main([*command, "--preset", "quick", "--workers", "-1"]) == 2
    assert "dpo-bench: --workers must be >= 0, got -1" in capsys.readouterr().err


def test_seeds_on_the_command_line_are_whole_pipelines(capsys):
    assert main(["check-config", "--preset", "quick", "--seeds", "3,4"]) == 0
    out = capsys.readouterr().out
    assert "dpo β=0.1 seed=3" in out and "ppo kl_coef=0.5 seed=4" in out and "seed=0" not in out
    assert main(["check-config", "--preset", "quick", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "dpo β=0.1 seed=7" in out and "seed=1" not in out
    assert main(["check-config", "--preset", "quick", "--seeds", "0,one"]) == 2
    assert "--seeds: expected comma-separated non-negative integers such as 0,1,2, got '0,one'" in capsys.readouterr().err


def test_a_machine_with_several_gpus_gets_one_worker_per_gpu(monkeypatch):
    from dpo_bench.bench import load_config
    from pipelines.workers import local_gpus, resolve_workers

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    default = load_config("default")  # device auto: CUDA here
    assert local_gpus(default) == 4 and resolve_workers(None, default) == 4
    quick = load_config("quick", overrides={"seed": 0}).with_methods(["sft", "ppo"])  # 3 cells: 3 of the 4 GPUs
    assert len(quick.cells()) == 3 and resolve_workers(None, quick) == 3
    # a device the config names runs in-process on it; so does one GPU
    assert local_gpus(load_config("default", overrides={"device": "cuda:1"})) == 0
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert local_gpus(default) == 0 and resolve_workers(None, default) == 0
