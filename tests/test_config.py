"""Configs: every bad value is a clear error naming its field, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_bench.bench import BenchConfig, load_config, preset_names
from dpo_bench.configs import ConfigError
from dpo_bench.methods import get_method


def test_presets_load_and_validate():
    assert {"quick", "default"} <= set(preset_names())
    for name in preset_names():
        config = load_config(name)
        assert config.preset == name and config.cells()


def test_default_preset_sweeps_three_strengths_per_competing_method():
    """The verdict's competitors (RLHF and the DPO family) each draw a frontier from three strengths;
    the oracle, shown for scale, may run one (its checkpoints still draw a curve)."""
    from dpo_bench.methods.base import get_method

    config = load_config("default")
    values: dict[str, set] = {}
    for entry in config.grid:
        if entry.values:
            values.setdefault(entry.method, set()).update(entry.values)
    competing = {m: v for m, v in values.items() if get_method(m).role in ("rlhf", "direct")}
    assert {"ppo", "dpo", "ipo"} <= set(competing), values
    assert all(len(v) >= 3 for v in competing.values()), values


def test_full_preset_compares_its_questions_at_equal_training_budgets():
    """The reading notes' questions hold everything but the one factor fixed: PL ranks the same four
    completions a prompt that pairwise DPO reads as six pairs, and sees as many completions per
    step; the frozen variant differs from its base only in the frozen block."""
    config = load_config("full")
    entries = {e.name or e.method: e for e in config.grid}
    q = config.questions

    def optim(name: str):
        entry = entries[name]
        c = get_method(entry.method).make_config(entry.config, entry.values[0] if entry.values else None)
        k = entry.preferences.get("k", config.preferences.k)
        prompts = entry.preferences.get("n_prompts") or config.sentiment.n_train_prompts
        return entry, c, k, prompts

    (_, pl, k_pl, n_pl), (_, pw, k_pw, n_pw) = optim(q.pl_listwise), optim(q.pl_pairwise)
    assert (pl.lr, pl.steps, pl.warmup_steps) == (pw.lr, pw.steps, pw.warmup_steps)
    assert pl.batch_size * k_pl == pw.batch_size * 2  # completions per step: rankings of K, pairs of 2
    assert (n_pl, k_pl) == (n_pw, k_pw)  # the same sampled completions, ranked or paired
    assert entries[q.pl_listwise].preferences == {"labels": "plackett_luce"}
    (frozen, fc, *_), (base, bc, *_) = optim(q.freeze_frozen), optim(q.freeze_base)
    assert fc == bc and frozen.freeze_blocks and not base.freeze_blocks
    assert set(frozen.values) <= set(base.values)
    # Preferred-FT is the DPO family's supervised baseline: the same optimiser budget.
    _, ft, *_ = optim("preferred_ft")
    assert (ft.lr, ft.steps, ft.batch_size) == (pw.lr, pw.steps, pw.batch_size)


@pytest.mark.parametrize("overrides,message", [
    ({"sft": {"lr": -1.0}}, "sft: lr must be > 0, got -1.0"),
    ({"sft": {"stpes": 3}}, "sft.stpes: unknown key; did you mean 'steps'?"),
    ({"sft": {"steps": "many"}}, "sft.steps: expected an integer, got 'many'"),
    ({"task": "imdb"}, "task: unknown task 'imdb'"),
    ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
    ({"grid": []}, "grid: the grid is empty"),
    ({"grid": [{"method": "dpoo"}]}, "unknown method 'dpoo'; known methods:"),
    ({"grid": [{"method": "dpo", "values": [0.0]}]}, "beta must be > 0, got 0.0"),
    ({"grid": [{"method": "dpo", "values": [-0.1]}]}, "beta must be > 0"),
    ({"grid": [{"method": "sft", "values": [1.0]}]}, "values: method 'sft' has no strength parameter"),
    ({"grid": [{"method": "ppo", "config": {"lr": -1e-5}}]}, "methods.ppo: lr must be > 0"),
    ({"grid": [{"method": "dpo", "config": {"epsilon": 0.1}}]}, "methods.dpo.epsilon: unknown key"),
    ({"grid": [{"method": "cdpo", "config": {"epsilon": 0.7}}]}, "epsilon must be in [0, 0.5]"),
    ({"preferences": {"k": 1}}, "preferences: k must be >= 2, got 1"),
    ({"evaluation": {"temperatures": [0.7]}}, "temperatures must include 1.0"),
    ({"sentiment": {"max_new_tokens": 100}}, "exceeds model.n_positions"),
    ({"sentiment": {"model": {"n_embd": 100, "n_head": 3}}}, "must be divisible by model.n_head"),
    ({"grid": [{"method": "dpo", "values": [0.1, 0.1]}]}, "cells appear twice: dpo β=0.1 seed=0"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("quick", overrides=overrides)
    assert message in str(err.value)


def test_toml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[sft]\nlr = -3\n')
    with pytest.raises(ConfigError, match=r"bad.toml: sft: lr must be > 0"):
        load_config(None, path)
    path.write_text("[sft\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(None, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, tmp_path / "missing.toml")


def test_toml_file_overrides_its_preset_and_replaces_the_grid(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('preset = "quick"\nseed = 7\n[sft]\nsteps = 5\n[[grid]]\nmethod = "ipo"\nvalues = [0.2, 0.4]\n')
    config = load_config(None, path)
    assert config.preset == "quick" and config.seed == 7 and config.sft.steps == 5
    assert config.sentiment.n_reviews == 4000  # from the preset
    assert [c.label for c in config.cells()] == ["ipo β=0.2 seed=7", "ipo β=0.4 seed=7"]


def test_task_overrides_apply_only_to_their_task():
    sentiment = load_config("quick")
    bandit = load_config("quick", overrides={"task": "bandit"})
    assert sentiment.reward_model.lr != bandit.reward_model.lr == 0.05
    assert {c.method for c in bandit.cells()} >= {"dpo", "ppo", "best_of_n"}


def test_a_files_keys_override_its_presets_task_overrides(tmp_path):
    # quick's [task_overrides.bandit] brings its own grid and reward-model lr; a file that names
    # the preset and the task keeps that lr but its own grid, and its own task overrides win.
    path = tmp_path / "mine.toml"
    path.write_text('preset = "quick"\ntask = "bandit"\n\n[[grid]]\nmethod = "dpo"\nvalues = [0.3]\n\n'
                    '[task_overrides.bandit.evaluation]\nn_checkpoints = 1\n')
    config = load_config(path=path)
    assert [c.label for c in config.cells()] == ["dpo β=0.3 seed=0", "dpo β=0.3 seed=1"]
    assert config.reward_model.lr == 0.05 and config.evaluation.n_checkpoints == 1
    # On another task neither table applies.
    assert load_config(path=path, overrides={"task": "sentiment"}).evaluation.n_checkpoints == load_config("quick").evaluation.n_checkpoints


def test_with_methods_keeps_the_grid_entries_and_rejects_unknown_names():
    config = load_config("full").with_methods(["dpo", "simpo"])
    # The reference stays: it is every frontier's anchor.
    one_seed = [c.display_name for c in config.cells() if c.seed == 0]
    assert one_seed == ["sft"] + ["dpo"] * 3 + ["simpo"] * 2 + ["dpo_frozen"] * 2
    assert config.questions.freeze_frozen == "dpo_frozen" and config.questions.pl_listwise == ""
    with pytest.raises(ConfigError, match="unknown method 'dpx'"):
        load_config("default").with_methods(["dpx"])


def test_config_round_trips_through_its_dict():
    from dpo_bench.bench import from_dict_config

    config = load_config("default")
    assert from_dict_config(config.to_dict()) == config
    assert isinstance(config, BenchConfig)


def test_the_readmes_seed_spread_config_runs_three_whole_pipelines(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- seeds-config -->", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "seeds.toml"
    path.write_text(block)
    config = load_config(path=path)
    assert config.pipeline_seeds == (0, 1, 2, 3, 4)
    seeds = {}
    for cell in config.cells():
        seeds.setdefault(cell.display_name, set()).add(cell.seed)
    assert all(s == {0, 1, 2, 3, 4} for s in seeds.values())
    # everything else is the default preset's, so seeds 0-2 reuse the default run's cached stages and cells
    default = load_config("default")
    assert config.sft == default.sft and config.preferences == default.preferences and config.evaluation == default.evaluation
    assert {c for c in config.cells() if c.seed in default.pipeline_seeds} <= set(default.cells())


def test_seeds_are_whole_pipelines_and_each_pipeline_has_its_own_cells():
    config = load_config("quick", overrides={"seeds": [3, 5]})
    assert config.pipeline_seeds == (3, 5)
    assert [c.seed for c in config.cells()] == [3] * (len(config.cells()) // 2) + [5] * (len(config.cells()) // 2)
    one = config.for_seed(5)
    assert one.pipeline_seeds == (5,) and {c.seed for c in one.cells()} == {5}
    # A layer that names one seed runs that one pipeline, whatever seeds the preset runs.
    assert load_config("quick", overrides={"seeds": [1, 2]}).pipeline_seeds == (1, 2)
    assert load_config("default", overrides={"seed": 7}).pipeline_seeds == (7,)
    with pytest.raises(ConfigError, match="seeds: each seed may appear once"):
        load_config("quick", overrides={"seeds": [1, 1]})


def test_a_grid_entry_with_seeds_names_the_new_setting(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('[[grid]]\nmethod = "dpo"\nseeds = [0, 1]\n')
    with pytest.raises(ConfigError, match=r"grid\[0\]\.seeds: a seed is now a whole pipeline .*top-level seeds"):
        load_config(path=path)


def test_a_cell_builds_its_method_config_once_and_crosses_to_a_worker_without_it():
    import pickle

    cell = next(c for c in load_config("quick").cells() if c.method == "dpo")
    assert cell.config() is cell.config()
    worker = pickle.loads(pickle.dumps(cell))  # the DPO family's config class is made at run time
    assert worker == cell and worker.config() == cell.config() and worker.config() is not cell.config()
