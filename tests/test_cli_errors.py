"""Bad input to the dpo-bench command is one line on stderr naming the input, never a traceback (issue 24)."""

from __future__ import annotations

import csv
import json

import pytest

from pipelines.cli import main

ROW = {"prompt": "the film was", "chosen": "great .", "rejected": "dull ."}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `dpo-bench ARGV`; argparse's own exits count as exit codes."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "se.jsonl"
    path.write_text(json.dumps({"question": "the film was", "response_j": "great .", "response_k": "dull ."}) + "\n")
    return path


# --- --column-map ----------------------------------------------------------------------------------


def test_a_column_map_without_equals_names_the_pair(question_file, capsys):
    code, _, err = cli(capsys, "check-data", str(question_file), "--column-map", "question")
    assert code == 2
    assert one_line(err) == "dpo-bench: --column-map 'question': expected SRC=DST, e.g. --column-map question=prompt"
    code, _, err = cli(capsys, "check-data", str(question_file), "--column-map", "=prompt")
    assert code == 2 and "--column-map '=prompt': expected SRC=DST" in one_line(err)


def test_column_map_is_one_pair_per_flag_before_or_after_the_file(question_file, capsys):
    pairs = ["--column-map", "question=prompt", "--column-map", "response_j=chosen", "--column-map", "response_k=rejected"]
    code, out, _ = cli(capsys, "check-data", *pairs, str(question_file))
    assert code == 0 and out.startswith("ok: ")
    code, out, _ = cli(capsys, "check-data", str(question_file), *pairs)
    assert code == 0 and out.startswith("ok: ")


@pytest.mark.parametrize("order", ["pairs_first", "file_first"])
def test_several_pairs_after_one_flag_are_refused_naming_the_stray_pair(order, question_file, capsys):
    pairs = ["--column-map", "question=prompt", "response_j=chosen"]
    argv = [*pairs, str(question_file)] if order == "pairs_first" else [str(question_file), *pairs]
    code, _, err = cli(capsys, "check-data", *argv)
    assert code == 2
    assert one_line(err) == ("dpo-bench: --column-map takes one SRC=DST pair per flag: "
                             "write --column-map response_j=chosen for 'response_j=chosen'")


def test_the_readme_and_the_help_spell_column_map_as_the_parser_reads_it():
    import re
    import shlex
    from pathlib import Path

    from pipelines.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = [line.split("#")[0] for line in readme.splitlines() if line.startswith("dpo-bench check-data") and "--column-map" in line]
    check_data = build_parser()._subparsers._group_actions[0].choices["check-data"]
    helptext = next(a.help for a in check_data._actions if a.dest == "column_map")
    examples.append("dpo-bench check-data prefs.jsonl " + re.search(r"e\.g\. (.*)", helptext).group(1))
    assert len(examples) == 2
    for example in examples:
        args, extra = build_parser().parse_known_args(shlex.split(example)[1:])
        assert extra == [] and args.file == "prefs.jsonl"
        assert args.column_map == ["question=prompt", "response_j=chosen"], example


def test_a_column_pair_in_place_of_the_dataset_is_named(capsys):
    code, _, err = cli(capsys, "check-data", "--column-map", "question=prompt", "response_j=chosen")
    assert code == 2
    assert one_line(err) == ("dpo-bench: check-data: 'response_j=chosen' looks like a --column-map pair, not a dataset; "
                             "name the dataset: dpo-bench check-data FILE --column-map SRC=DST")
    code, _, err = cli(capsys, "check-data", "a.jsonl", "b.jsonl")
    assert code == 2 and one_line(err) == "dpo-bench: check-data checks one dataset, got 2: a.jsonl, b.jsonl"
    code, _, err = cli(capsys, "check-data", "a.jsonl", "--no-such-option")
    assert code == 2 and err.strip().endswith("error: unrecognized arguments: --no-such-option")


def test_a_column_mapped_twice_or_two_columns_onto_one_are_refused(question_file, capsys):
    code, _, err = cli(capsys, "check-data", str(question_file), "--column-map", "question=prompt", "--column-map", "question=x")
    assert code == 2 and one_line(err) == "dpo-bench: --column-map: column 'question' is mapped twice"
    code, _, err = cli(capsys, "check-data", str(question_file), "--column-map", "question=prompt",
                       "--column-map", "response_j=prompt")
    assert code == 2
    assert one_line(err) == "dpo-bench: --column-map: 'question' and 'response_j' are both mapped to 'prompt'"


# --- the hub, offline ----------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE as if set before import (the libraries read it once): no request leaves the machine."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_hub_dataset_offline_is_one_line_saying_what_to_do(offline, capsys):
    code, out, err = cli(capsys, "check-data", "some-owner/no-such-dataset")
    assert code == 2 and out == ""
    assert one_line(err) == (
        "dpo-bench: some-owner/no-such-dataset: could not reach the Hugging Face hub to read this dataset "
        "(HF_HUB_OFFLINE is set and it is not in the cache); give a local file (.jsonl, .json, .parquet, .csv) or "
        "save_to_disk folder, or download the dataset beforehand and run with HF_HUB_OFFLINE=1 to read it from the cache"
    )


def test_a_run_whose_data_is_on_an_unreachable_hub_stops_in_one_line(offline, tmp_path, capsys):
    """The first stage reads the data; a local tokenizer gets it there without any download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "model"
    tokenizer = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(model)
    code, _, err = cli(capsys, "run", "--no-prefect", "--quiet", "--preset", "quick", "--reports-dir", str(tmp_path / "reports"),
                       "--model", str(model), "--data", "some-owner/no-such-dataset")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(
        "dpo-bench: some-owner/no-such-dataset: could not reach the Hugging Face hub to read this dataset")


# --- --device ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["run", "--dry-run"], ["check-config"]])
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:0"])
def test_an_unknown_device_lists_the_valid_ones(command, device, capsys):
    code, out, err = cli(capsys, *command, "--preset", "quick", "--device", device)
    assert code == 2 and out == ""
    assert one_line(err) == (f"dpo-bench: config error: device: unknown device '{device}'; "
                             "use auto, cpu, cuda, cuda:N (N a GPU index) or mps")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_the_documented_devices_are_accepted_and_one_this_machine_lacks_is_refused_before_a_run(device, capsys):
    import torch

    from dpo_engine.distributed import devices_error

    missing = devices_error(torch.device("cpu" if device == "auto" else device))
    code, _, err = cli(capsys, "check-config", "--preset", "quick", "--device", device)
    assert (code, err) == ((0, "") if missing is None else (2, f"dpo-bench: {missing}\n"))
    code, out, _ = cli(capsys, "run", "--dry-run", "--preset", "quick", "--device", device)  # a plan for any machine
    assert code == 0 and (missing is None) == ("not runnable on this machine" not in out)
    if device == "cuda" and missing is not None:
        assert one_line(cli(capsys, "run", "--preset", "quick", "--device", device, "--no-prefect")[2]) == (
            "dpo-bench: device cuda: needs GPU 0, and this machine has 0 CUDA device(s)")


def test_ranks_and_precision_are_shown_by_the_dry_run_and_a_rollout_batch_ranks_cannot_split_is_refused(capsys):
    code, out, _ = cli(capsys, "run", "--dry-run", "--preset", "quick", "--device", "cpu", "--nproc-per-cell", "2",
                       "--precision", "bf16")
    assert code == 0 and "each stage and cell trains on 2 ranks (gloo; cpu, cpu)" in out
    assert "device cpu (here: cpu), precision bf16 (here: bf16)" in out.splitlines()[0]
    code, _, err = cli(capsys, "check-config", "--preset", "quick", "--nproc-per-cell", "3")
    assert code == 2 and one_line(err) == (
        "dpo-bench: config error: grid (ppo kl_coef=0.2 seed=0): rollout_batch = 32 must split into nproc_per_cell = 3 "
        "equal shares of at least n_minibatches = 2 rollouts")
    code, _, err = cli(capsys, "check-config", "--preset", "quick", "--nproc-per-cell", "0")
    assert code == 2 and one_line(err) == "dpo-bench: config error: nproc_per_cell: must be >= 1, got 0"


# --- missing local files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./nope.jsonl", "nope.csv", "data/nope.parquet", "/no/such/dir/prefs.json", "./a=b.jsonl"])
def test_check_data_on_a_missing_local_file_is_file_not_found(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "check-data", path)
    assert code == 2 and out == ""
    assert one_line(err) == f"dpo-bench: file not found: {path}"


def hf_args(command: str, model: str, data: str, tmp_path) -> list[str]:
    """The quick preset on the hf task: flags for `run --dry-run`, a TOML file for check-config (which has no such flags)."""
    if command == "run":
        return ["run", "--dry-run", "--preset", "quick", "--model", model, "--data", data]
    (tmp_path / "hf.toml").write_text(f'task = "hf"\n[hf]\nmodel = "{model}"\ndata = "{data}"\n')
    return ["check-config", "--preset", "quick", "--config", str(tmp_path / "hf.toml")]


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_missing_data_file_or_model_directory_is_not_a_hub_download(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flag = lambda key: f", --{key}" if command == "run" else ""  # noqa: E731
    code, out, err = cli(capsys, *hf_args(command, "gpt2", "./nope.jsonl", tmp_path))
    assert code == 2 and "would download" not in out
    assert one_line(err) == (f"dpo-bench: file not found: ./nope.jsonl (hf.data{flag('data')}); "
                             "give an existing file or directory, or a hub id such as owner/name")
    (tmp_path / "prefs.jsonl").write_text(json.dumps(ROW) + "\n")
    code, _, err = cli(capsys, *hf_args(command, "./models/mine", "prefs.jsonl", tmp_path))
    assert code == 2 and f"file not found: ./models/mine (hf.model{flag('model')})" in one_line(err)
    code, out, _ = cli(capsys, *hf_args(command, "gpt2", "prefs.jsonl", tmp_path))
    assert code == 0
    if command == "run":
        assert "  model: gpt2" in out.splitlines() and "  dataset: prefs.jsonl (splits train)" in out.splitlines()


# --- --version ----------------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys, monkeypatch):
    from importlib import metadata

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out == f"dpo-bench {metadata.version('dpo-bench')}\n"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out == "dpo-bench 0.1.0\n"  # pyproject.toml's, beside the source


# --- CSV fields beyond the csv module's default limit -----------------------------------------------------


def test_a_csv_with_a_200_kb_field_reads_like_the_same_jsonl(tmp_path, capsys):
    row = dict(ROW, chosen="great " * 40_000)  # 240 KB, beyond csv's default 128 KiB field limit
    (tmp_path / "big.jsonl").write_text(json.dumps(row) + "\n")
    with open(tmp_path / "big.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    limit = csv.field_size_limit()
    code, from_csv, _ = cli(capsys, "check-data", str(tmp_path / "big.csv"))
    assert code == 0, from_csv
    code, from_jsonl, _ = cli(capsys, "check-data", str(tmp_path / "big.jsonl"))
    assert code == 0
    fingerprint = [line for line in from_jsonl.splitlines() if "fingerprint:" in line]
    assert fingerprint and fingerprint[0] in from_csv.splitlines()
    assert csv.field_size_limit() == limit  # the module-wide limit is restored


# --- --set and TRL's names --------------------------------------------------------------------


def test_set_overrides_any_section_after_the_flags(capsys):
    code, out, _ = cli(capsys, "check-config", "--preset", "quick", "--device", "cuda", "--show",
                       "--set", "sft.steps=7", "--set", "evaluation.temperatures=[1.0, 0.7]", "--set", "device=cpu",
                       "--set", "preferences.label_temperature=0.5", "--set", 'task="bandit"')
    assert code == 0
    config = json.loads(out[out.index("{"):])
    assert config["sft"]["steps"] == 7 and config["evaluation"]["temperatures"] == [1.0, 0.7]
    assert config["device"] == "cpu" and config["preferences"]["label_temperature"] == 0.5 and config["task"] == "bandit"


@pytest.mark.parametrize("assignment, message", [
    ("sft.stepz=3", "sft.stepz: unknown key; did you mean 'steps'?"),
    ("sft.steps", "--set: expected section.key=value (e.g. sft.steps=400), got 'sft.steps'"),
    ("grid.values=[1]", "--set: grid entries are a list; change them in a --config file"),
    ("sft.steps=many", "sft.steps: expected an integer, got 'many'"),
])
def test_a_bad_set_is_one_line(capsys, assignment, message):
    code, _, err = cli(capsys, "check-config", "--preset", "quick", "--set", assignment)
    assert code == 2 and one_line(err) == f"dpo-bench: config error: {message}"


def test_trl_names_are_read_as_ours_with_a_note(tmp_path, capsys):
    """learning_rate, per_device_train_batch_size, max_steps and DPOConfig's loss_type (sigmoid with
    label smoothing is cDPO) in a config written for TRL; run.json keeps our names."""
    config = tmp_path / "trl.toml"
    config.write_text("""
preset = "quick"
[sft]
learning_rate = 3e-4
per_device_train_batch_size = 16

[[grid]]
method = "dpo"
values = [0.1]
config = { loss_type = "ipo", learning_rate = 1e-4, max_steps = 50 }

[[grid]]
method = "dpo"
name = "cdpo_trl"
values = [0.1]
config = { loss_type = "sigmoid", label_smoothing = 0.2 }
""")
    code, out, err = cli(capsys, "check-config", "--config", str(config), "--show")
    assert code == 0
    resolved = json.loads(out[out.index("{"):])
    assert resolved["sft"]["lr"] == 3e-4 and resolved["sft"]["batch_size"] == 16
    ipo, cdpo = resolved["grid"][-2:]
    assert (ipo["method"], ipo["config"]) == ("ipo", {"lr": 1e-4, "steps": 50})
    assert (cdpo["method"], cdpo["config"]) == ("cdpo", {"epsilon": 0.2})
    notes = [line for line in err.splitlines() if line.startswith("dpo-bench: note: ")]
    assert "dpo-bench: note: sft.learning_rate is TRL's name; read as sft.lr" in notes
    assert "dpo-bench: note: grid entry 'dpo': loss_type = 'sigmoid' is TRL's; read as method = 'cdpo'" in notes
    assert len(notes) == len(set(notes)) == 7


def test_a_loss_type_without_a_method_here_is_one_line(tmp_path, capsys):
    config = tmp_path / "trl.toml"
    config.write_text('preset = "quick"\n[[grid]]\nmethod = "dpo"\nconfig = { loss_type = "exo_pair" }\n')
    code, _, err = cli(capsys, "check-config", "--config", str(config))
    assert code == 2
    assert one_line(err) == (f"dpo-bench: config error: {config}: grid[0]: loss_type 'exo_pair' has no method here; known: "
                             "sigmoid, ipo, hinge, robust, simpo (see `dpo-bench methods`)")


def test_a_hub_model_that_cannot_be_fetched_is_one_line(tmp_path, capsys, monkeypatch):
    """Offline (HF_HUB_OFFLINE, as on this machine without a network), a hub model id the cache does not hold."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps({**ROW, "prompt": f"{ROW['prompt']} {i}"}) for i in range(4)) + "\n")
    code, _, err = cli(capsys, "run", "--task", "hf", "--model", "dpo-bench-tests/no-such-model", "--data", str(data),
                       "--preset", "quick", "--no-prefect", "--quiet", "--reports-dir", str(tmp_path / "reports"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "dpo-bench: dpo-bench-tests/no-such-model: could not reach the Hugging Face hub to load this model (HF_HUB_OFFLINE "
        "is set and it is not in the cache); give a local directory (one written by save_pretrained), or download it "
        "beforehand and run with HF_HUB_OFFLINE=1 to read it from the cache")


def test_a_run_id_in_use_by_a_live_run_is_one_line(tmp_path, capsys):
    import os

    run_dir = tmp_path / "reports" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_text(str(os.getpid()))  # this process is alive: the lock holds
    code, _, err = cli(capsys, "run", "--preset", "quick", "--task", "bandit", "--no-prefect", "--quiet", "--run-id", "busy",
                       "--reports-dir", str(tmp_path / "reports"))
    assert code == 2
    assert "run 'busy' is already running in" in err and "choose another --run-id or wait for it to finish" in err
    assert not (run_dir / "metrics.parquet").exists()


def test_a_reader_that_stops_early_gets_no_traceback():
    """`dpo-bench check-config | head -1`: the pipe closes under the command, which stops quietly."""
    import subprocess
    import sys

    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); from pipelines.cli import main; "
            "sys.exit(main(['check-config', '--preset', 'quick']))")
    done = subprocess.run([sys.executable, "-u", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
