"""What the Prefect flow adds around the stages: retries of the stages that download, only on
failures another attempt may not meet; report artifacts whose figures show in Prefect's UI and
whose keys tell tasks and presets apart."""

from __future__ import annotations

import base64

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
