"""The results store on synthetic run directories: round trips, idempotent appends, hostile names
stored as text, previous runs by preset and time, the report's History section, and the
`history` / `compare` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from scipy import stats

from dpo_bench import store
from dpo_bench.report import SECTION_TITLES, build_report
from dpo_bench.report.history import compare_summaries, final_summary, history_comparison, holm
from pipelines.cli import main

HOSTILE = "dpo'); DROP TABLE runs; -- \"x\""


def make_run(reports: Path, run_id: str, started_at: str, gold: dict[str, float], *, preset: str = "quick",
             task: str = "sentiment", gold_stderr: float = 0.01, seed: int = 0) -> Path:
    """A run directory with metrics.parquet and run.json: sft plus one cell per entry of ``gold``.

    Each cell has two checkpoints; the report's final value is the second (``gold[method]``).
    """
    run_dir = reports / run_id
    run_dir.mkdir(parents=True)
    rows = []

    def row(method, beta, step, metric, value, stderr=np.nan, lo=np.nan, hi=np.nan, n=200, temperature=1.0):
        rows.append(dict(run_id=run_id, task=task, method=method, beta=beta, seed=0, step=step, temperature=temperature,
                         metric=metric, value=value, stderr=stderr, ci_low=lo, ci_high=hi, n=n))

    for method, value in {"sft": 0.0, **gold}.items():
        beta = np.nan if method == "sft" else 0.5
        for step, frac in ((0, 0.5), (60, 1.0)):
            g = value * frac
            kl = 0.0 if method == "sft" else 1.5 * frac
            wr = 0.5 + g / 2
            row(method, beta, step, "gold_reward", g, gold_stderr)
            row(method, beta, step, "kl", kl, 0.0 if method == "sft" else 0.05)
            row(method, beta, step, "win_rate", wr, math.sqrt(wr * (1 - wr) / 200), wr - 0.07, wr + 0.07)
            row(method, beta, step, "fluency", 0.95, 0.01)
        row(method, beta, 60, "train/loss", 0.5, temperature=np.nan, n=64)
    row("reward_model", np.nan, 0, "rm_accuracy", 0.8, 0.02, n=300, temperature=np.nan)
    pd.DataFrame(rows).to_parquet(run_dir / "metrics.parquet")
    record = {"run_id": run_id, "task": task, "preset": preset, "seed": seed, "status": "completed",
              "started_at": started_at, "finished_at": started_at, "wall_seconds": 12.5,
              "config": {"preset": preset, "task": task, "seed": seed, "threads": 1}, "fingerprints": {"corpus": "abc"},
              "versions": {"torch": "2"}, "code_version": "feedbeef", "host": "here", "orchestrator": "prefect"}
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def record(run_dir: Path, url: str) -> None:
    """What finish_run does after writing run.json: compare, append, then the report."""
    data = json.loads((run_dir / "run.json").read_text())
    data["results_db"] = store.display_url(url)
    (run_dir / "run.json").write_text(json.dumps(data))
    assert store.record_run(run_dir, url) is None
    build_report(run_dir)


@pytest.fixture
def url(tmp_path):
    return store.default_url(tmp_path / "reports")


def test_a_run_round_trips_through_the_store(tmp_path, url):
    run_dir = make_run(tmp_path / "reports", "r1", "2026-11-24T03:00:00+00:00", {"dpo": 0.3})
    n = store.append_run(run_dir, url)
    original = pd.read_parquet(run_dir / "metrics.parquet")
    assert n == len(original)
    back = store.run_metrics(url, ["r1"])
    pd.testing.assert_frame_equal(back.reset_index(drop=True), original[back.columns].reset_index(drop=True),
                                  check_dtype=False)
    assert back["beta"].isna().sum() == original["beta"].isna().sum()  # NaN comes back as NaN
    runs = store.runs(url)
    assert runs.loc[0, "run_id"] == "r1" and runs.loc[0, "preset"] == "quick" and runs.loc[0, "status"] == "completed"
    assert runs.loc[0, "run_dir"] == str(run_dir.resolve())
    assert store.run_config(url, "r1") == {"preset": "quick", "task": "sentiment", "seed": 0, "threads": 1}
    assert (tmp_path / "reports" / "results.db").is_file()


def test_appending_the_same_run_twice_does_not_duplicate_rows(tmp_path, url):
    run_dir = make_run(tmp_path / "reports", "r1", "2026-11-24T03:00:00+00:00", {"dpo": 0.3})
    n = store.append_run(run_dir, url)
    store.append_run(run_dir, url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.runs_table)).scalar() == 1
        assert conn.execute(sa.select(sa.func.count()).select_from(store.metrics_table)).scalar() == n
    engine.dispose()


def test_names_holding_quotes_and_sql_are_stored_as_text(tmp_path, url):
    run_id = "run 'quoted\"; DELETE FROM metrics; --"
    run_dir = make_run(tmp_path / "reports", run_id, "2026-11-24T03:00:00+00:00", {HOSTILE: 0.3, "dpo": 0.2},
                       preset="p'; DROP TABLE metrics; --")
    store.append_run(run_dir, url)
    assert store.runs(url)["run_id"].tolist() == [run_id]
    assert set(store.run_metrics(url, [run_id])["method"]) >= {HOSTILE, "dpo"}
    hist = store.history(url, preset="p'; DROP TABLE metrics; --", method=HOSTILE)
    assert set(hist["method"]) == {HOSTILE} and set(hist["run_id"]) == {run_id}
    # Tables are intact: a second run appends beside the first.
    store.append_run(make_run(tmp_path / "reports", "r2", "2026-11-25T03:00:00+00:00", {"dpo": 0.2}), url)
    assert len(store.runs(url)) == 2


def test_previous_runs_are_earlier_completed_runs_of_the_same_preset_and_task(tmp_path, url):
    reports = tmp_path / "reports"
    specs = [("a", "2026-11-20T03:00:00+00:00", "quick", "sentiment"), ("b", "2026-11-21T03:00:00+00:00", "quick", "bandit"),
             ("c", "2026-11-22T03:00:00+00:00", "default", "sentiment"), ("d", "2026-11-23T03:00:00+00:00", "quick", "sentiment"),
             ("e", "2026-11-24T03:00:00+00:00", "quick", "sentiment")]
    for run_id, started, preset, task in specs:
        store.append_run(make_run(reports, run_id, started, {"dpo": 0.3}, preset=preset, task=task), url)
    previous = store.previous_runs(url, "quick", task="sentiment", before="2026-11-24T03:00:00+00:00", exclude="e")
    assert previous["run_id"].tolist() == ["a", "d"]
    assert store.previous_runs(url, "quick", task="sentiment", limit=1)["run_id"].tolist() == ["e"]
    hist = store.history(url, preset="quick", method="dpo")
    assert hist["run_id"].drop_duplicates().tolist() == ["a", "b", "d", "e"]
    assert set(hist["metric"]) == {"gold_reward", "kl", "win_rate"}
    final = hist[(hist["run_id"] == "a") & (hist["metric"] == "gold_reward")].iloc[0]
    assert final["value"] == pytest.approx(0.3) and final["stderr"] == pytest.approx(0.01) and final["n"] == 200


def test_the_report_flags_a_change_beyond_its_interval(tmp_path, url):
    reports = tmp_path / "reports"
    first = make_run(reports, "r1", "2026-11-22T03:00:00+00:00", {"dpo": 0.30, "ipo": 0.20})
    record(first, url)
    md = (first / "report.md").read_text()
    assert "## History" in md and "No earlier completed run of preset quick" in md
    record(make_run(reports, "r2", "2026-11-23T03:00:00+00:00", {"dpo": 0.31, "ipo": 0.20}), url)
    third = make_run(reports, "r3", "2026-11-24T03:00:00+00:00", {"dpo": 0.10, "ipo": 0.205})
    record(third, url)

    comparison = history_comparison(pd.read_parquet(third / "history.parquet"))
    gold = comparison[comparison["metric"] == "gold_reward"].set_index("method")
    assert gold.loc["dpo", "previous_run_id"] == "r2" and gold.loc["dpo", "previous_runs"] == 2
    assert gold.loc["dpo", "changed"] and gold.loc["dpo", "diff"] == pytest.approx(-0.21)
    assert not gold.loc["ipo", "changed"]  # 0.005 with s.e. 0.014: inside the interval
    assert list(gold.loc["dpo", "trend"]) == pytest.approx([0.30, 0.31])
    assert not comparison.loc[comparison["method"] == "sft", "changed"].any()

    md = (third / "report.md").read_text()
    html = (third / "report.html").read_text()
    assert "Compared with 2 earlier runs of preset quick" in md
    assert "dpo (β=0.5) gold reward -0.210" in md and "changed ↓" in md
    assert "<h2>History</h2>" in html and "changed ↓" in html
    assert len(store.runs(url)) == 3


def test_a_run_directory_without_history_still_builds(tmp_path):
    run_dir = make_run(tmp_path, "old", "2026-11-24T03:00:00+00:00", {"dpo": 0.3})
    md = build_report(run_dir)["markdown"].read_text()
    for title in SECTION_TITLES:
        assert f"\n## {title}\n" in md
    assert "it has no history.parquet" in md


def test_an_unreachable_store_is_noted_not_fatal(tmp_path):
    run_dir = make_run(tmp_path, "r1", "2026-11-24T03:00:00+00:00", {"dpo": 0.3})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for bad in ("nosuchdialect://host/db", store.default_url(blocker)):
        error = store.record_run(run_dir, bad)
        assert error and "results store" in error
    assert store.display_url("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"


def test_welch_comparison_matches_scipy_and_holm_adjusts():
    a = pd.DataFrame([{"method": "dpo", "beta": 0.5, "metric": "gold_reward", "value": 0.30, "stderr": 0.02, "n": 100,
                       "seeds": 1, "ci_low": np.nan, "ci_high": np.nan},
                      {"method": "sft", "beta": np.nan, "metric": "gold_reward", "value": 0.0, "stderr": 0.02, "n": 100,
                       "seeds": 1, "ci_low": np.nan, "ci_high": np.nan}])
    b = a.assign(value=[0.20, 0.01], stderr=[0.03, 0.02], n=[150, 100])
    out = compare_summaries(a, b).set_index("method")
    ref = stats.ttest_ind_from_stats(0.20, 0.03 * math.sqrt(150), 150, 0.30, 0.02 * math.sqrt(100), 100, equal_var=False)
    assert out.loc["dpo", "p"] == pytest.approx(ref.pvalue) and out.loc["dpo", "diff"] == pytest.approx(-0.10)
    assert out.loc["dpo", "significant"] and not out.loc["sft", "significant"]  # NaN beta matched itself
    assert holm(np.array([0.01, 0.04, 0.03])) == pytest.approx([0.03, 0.06, 0.06])


def test_final_summary_reads_the_last_checkpoint(tmp_path):
    run_dir = make_run(tmp_path, "r1", "2026-11-24T03:00:00+00:00", {"dpo": 0.3})
    summary = final_summary(pd.read_parquet(run_dir / "metrics.parquet"))
    dpo = summary[(summary["method"] == "dpo")].set_index("metric")
    assert dpo.loc["gold_reward", "value"] == pytest.approx(0.3) and dpo.loc["kl", "value"] == pytest.approx(1.5)
    assert "train/loss" not in set(summary["metric"]) and "reward_model" not in set(summary["method"])


def test_history_and_compare_commands(tmp_path, url, capsys):
    reports = tmp_path / "reports"
    record(make_run(reports, "r1", "2026-11-22T03:00:00+00:00", {"dpo": 0.30}), url)
    record(make_run(reports, "r2", "2026-11-23T03:00:00+00:00", {"dpo": 0.10}), url)
    record(make_run(reports, "r3", "2026-11-24T03:00:00+00:00", {"dpo": 0.10}, preset="default"), url)

    assert main(["history", "--reports-dir", str(reports), "--preset", "quick", "--method", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "preset quick · task sentiment · dpo (β=0.5)" in out
    lines = [line for line in out.splitlines() if line.strip().startswith(("r1", "r2"))]
    assert len(lines) == 2 and "0.300 ± 0.010" in lines[0] and "0.100 ± 0.010 ↓" in lines[1]
    assert "r3" not in out

    # A run directory, a run id under --reports-dir, and a run id only in the store.
    (reports / "r1" / "metrics.parquet").rename(reports / "r1" / "moved.parquet")
    assert main(["compare", "r1", str(reports / "r2"), "--reports-dir", str(reports), "--results-db", url]) == 0
    out = capsys.readouterr().out
    assert "A = r1 (results store)" in out and f"B = {reports / 'r2'}" in out
    assert "differ significantly (Welch, p < 0.05): dpo (β=0.5) gold reward" in out

    assert main(["compare", "r1", "nowhere", "--reports-dir", str(reports)]) == 2
    assert "'nowhere' is neither a run directory" in capsys.readouterr().err
