"""What the Prefect flow adds around the stages: retries of the stages that download, only on
failures another attempt may not meet; report artifacts whose figures show in Prefect's UI and
whose keys tell tasks and presets apart."""

from __future__ import annotations

import base64

import pandas as pd
import pytest
from prefect.states import Failed

from dpo_bench.configs import ConfigError
from dpo_bench.data import DataValidationError, HubUnreachableError
from pipelines.benchmark import (
    DOWNLOAD_RETRY_DELAYS, STEP_TASKS, _artifact_key, embedded_figures, transient_failure,
)


class ReadTimeout(OSError):
    """Named as httpx's: the HTTP stack's errors are recognised by name."""


@pytest.mark.parametrize("error, retried", [
    (HubUnreachableError("org/data"), True),  # the network: it may come back
    (HubUnreachableError("org/data", offline=True), False),  # HF_HUB_OFFLINE: it will not
    (ConnectionError("reset by peer"), True),
    (TimeoutError(), True),
    (ReadTimeout(), True),
    (OSError("We couldn't connect to 'https://huggingface.co' to load the files"), True),  # transformers' words
    (OSError("gpt2 does not appear to have a file named config.json"), False),
    (DataValidationError("data.jsonl", 3, "chosen", "expected a string"), False),
    (ConfigError("hf.max_length: 600 tokens (+ EOS) exceed the model's 512 positions"), False),
    (ValueError("need at least 2 distinct prompts"), False),
])
def test_only_failures_of_the_network_are_retried(error, retried):
    assert transient_failure(None, None, Failed(data=error)) is retried


def test_the_stages_that_download_retry_with_growing_delays():
    for name in ("task", "sft"):
        task = STEP_TASKS[name]
        assert task.retries == len(DOWNLOAD_RETRY_DELAYS) == 2
        assert task.retry_delay_seconds == DOWNLOAD_RETRY_DELAYS == sorted(DOWNLOAD_RETRY_DELAYS)
        assert task.retry_condition_fn is transient_failure
    assert all(STEP_TASKS[name].retries == 0 for name in STEP_TASKS if name not in ("task", "sft"))


def test_every_step_of_a_pipeline_is_a_prefect_task_of_its_own():
    from dpo_bench.stages.pipeline import PIPELINE

    assert list(STEP_TASKS) == [step.name for step in PIPELINE]
    assert [t.name for t in STEP_TASKS.values()] == [step.title for step in PIPELINE]
    assert len({t.task_key for t in STEP_TASKS.values()}) == len(PIPELINE)


def test_a_retried_task_succeeds_on_its_next_attempt_and_a_bad_input_fails_at_once(prefect_harness):
    from prefect import flow, task

    attempts = {"network": 0, "input": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient_failure)
    def flaky(kind: str) -> int:
        attempts[kind] += 1
        if attempts[kind] == 1:
            raise ConnectionError("reset by peer") if kind == "network" else ValueError("bad row")
        return attempts[kind]

    @flow
    def run(kind: str):
        return flaky(kind, return_state=True)

    assert run("network").result() == 2 and attempts["network"] == 2
    assert run("input", return_state=True).is_failed() and attempts["input"] == 1


def test_report_figures_are_inlined_for_the_ui(tmp_path):
    png = b"\x89PNG\r\n\x1a\n fake image bytes"
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "frontier.png").write_bytes(png)
    markdown = "# Report\n![frontier](figures/frontier.png)\ntext\n![gone](figures/missing.png)\n"
    out = embedded_figures(markdown, tmp_path)
    encoded = base64.b64encode(png).decode()
    assert out == f"# Report\n![frontier](data:image/png;base64,{encoded})\ntext\n![gone](figures/missing.png)\n"


def test_artifact_keys_name_the_task_and_the_preset():
    assert _artifact_key("sentiment", "quick", "report") == "dpo-bench-sentiment-quick-report"
    assert _artifact_key("bandit", "quick", "report") != _artifact_key("sentiment", "quick", "report")
    assert _artifact_key("hf", "My Preset!", "results") == "dpo-bench-hf-my-preset-results"


def test_a_second_flow_run_shows_its_stages_and_cells_as_cached(prefect_harness, tmp_path):
    """Prefect's UI tells a stage read from the store from one built: the second run of the same
    config on the same cache ends every stage and cell task in a Completed state named Cached,
    while its report is the first run's."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from dpo_bench.bench import load_config
    from pipelines.benchmark import benchmark_flow

    config = load_config("quick", overrides={"task": "bandit"}).with_methods(["sft", "dpo"]).to_dict()
    runs = {}
    for name in ("first", "second"):
        state = benchmark_flow(config=config, reports_dir=str(tmp_path / "reports"), run_id=name, cache_dir=str(tmp_path / "cache"),
                               progress=False, workers=0, return_state=True)
        runs[name] = state.state_details.flow_run_id

    async def task_states(flow_run_id):
        async with get_client() as client:
            task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name.rsplit("-", 1)[0]: run.state.name for run in task_runs}

    first, second = asyncio.run(task_states(runs["first"])), asyncio.run(task_states(runs["second"]))
    stage_tasks = {name for name in second if name != "report"}  # the report is written by every run
    assert {"prepare task", "train SFT", "train reward model", "pipeline[seed=1]"} <= stage_tasks
    assert any(n.startswith("train[") for n in stage_tasks)
    assert {name: second[name] for name in stage_tasks if second[name] != "Cached"} == {}
    assert {first[name] for name in stage_tasks} == {"Completed"}
    assert second["report"] == "Completed"
    from dpo_bench.training import WALL_CLOCK_METRICS

    first_metrics, second_metrics = (pd.read_parquet(tmp_path / "reports" / name / "metrics.parquet").drop(columns="run_id")
                                     for name in ("first", "second"))
    pd.testing.assert_frame_equal(first_metrics[~first_metrics["metric"].isin(WALL_CLOCK_METRICS)].reset_index(drop=True),
                                  second_metrics[~second_metrics["metric"].isin(WALL_CLOCK_METRICS)].reset_index(drop=True))


def test_the_flow_takes_a_typed_config_and_its_plain_data():
    """The flow's body gets a BenchConfig whether it is called with one (the CLI) or with its plain
    data (a deployment's parameters, the UI); bad data fails the parameter validation with the config's
    own error, before the flow runs; the API sees the parameter as a JSON object."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from dpo_bench.bench import BenchConfig, load_config
    from pipelines.benchmark import benchmark_flow

    config = load_config("quick", overrides={"task": "bandit"})
    for given in (config, config.to_dict()):
        validated = benchmark_flow.validate_parameters({"config": given, "reports_dir": "r"})["config"]
        assert isinstance(validated, BenchConfig) and validated == config
    bad = dict(config.to_dict(), seeds=[0, 0])
    with pytest.raises(ParameterTypeError, match="seeds"):
        benchmark_flow.validate_parameters({"config": bad})
    assert parameter_schema(benchmark_flow).properties["config"]["type"] == "object"
    assert benchmark_flow.serialize_parameters({"config": config})["config"] == config.to_dict()
