"""Export a cell's trained policy as a transformers model directory with a model card.

``dpo-bench export RUN_DIR CELL OUT_DIR`` writes what ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: the policy of the cell's last evaluated checkpoint (the
one its final metrics describe), the task's tokenizer, and a README.md that says what the policy
is (method, strength, pipeline seed, the run's config and data fingerprints) and how it scored
(the cell's final metrics with their intervals).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd

from .configs import ConfigError

#: The metrics a model card reports, in its order, when the run has them.
CARD_METRICS = ("gold_reward", "win_rate", "kl", "proxy_reward", "fluency", "length", "truncated", "objective")


def cell_record(run: dict, run_dir: Path, label: str) -> dict:
    """The run.json entry of the cell ``label``, with a policy to export; a clear error otherwise."""
    cells = run.get("cells") or {}
    if label not in cells:
        known = ", ".join(f"'{c}'" for c in cells) or "none"
        raise ConfigError(f"{run_dir}: no cell '{label}'; its cells: {known}")
    record = cells[label]
    if record.get("policy") is None:
        if "policy" not in record:
            raise ConfigError(f"{run_dir}: run.json records no policy directories (a run written before `export` existed); "
                              "run it again with the same config to export from it")
        raise ConfigError(f"{run_dir}: cell '{label}' kept no trained policy ({record['method']}: nothing to export)")
    if not Path(record["policy"]).is_dir():
        raise ConfigError(f"{run_dir}: cell '{label}': its policy directory {record['policy']} is gone (the stage cache was cleared?)")
    return record


def export_cell(run_dir: Path | str, label: str, out_dir: Path | str) -> Path:
    """Write the cell ``label`` of the run in ``run_dir`` to ``out_dir`` (created; must not hold files)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = json.loads((run_dir / "run.json").read_text())
    record = cell_record(run, run_dir, label)
    policy = Path(record["policy"])
    meta = policy / "policy.json"
    if meta.exists() and json.loads(meta.read_text()).get("kind") == "tabular":
        raise ConfigError(f"cell '{label}' is a table policy of the bandit task, not a transformers model: nothing to export")
    tokenizer = Path(run["cache_dir"]) / "task" / run["pipelines"][str(record["seed"])]["stage_keys"]["task"] / "tokenizer"
    if not tokenizer.is_dir():
        raise ConfigError(f"{run_dir}: the task's tokenizer {tokenizer} is gone (the stage cache was cleared?)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: exists and is not empty; export writes into a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for source in (policy, tokenizer):
        for path in source.iterdir():
            if path.is_file() and path.name != "policy.json":
                shutil.copy2(path, out_dir / path.name)
    (out_dir / "README.md").write_text(model_card(run, record, label, final_metrics(run_dir, record)))
    return out_dir


def final_metrics(run_dir: Path, record: dict) -> pd.DataFrame:
    """The cell's metrics at its last evaluated step, temperature 1 (``metrics.parquet``)."""
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    mine = metrics[(metrics["method"] == record["name"]) & (metrics["seed"] == record["seed"]) & (metrics["temperature"] == 1.0)]
    strength = record["strength"]
    mine = mine[mine["beta"].isna()] if strength is None else mine[(mine["beta"] - strength).abs() < 1e-12]
    mine = mine[mine["metric"].isin(CARD_METRICS)]
    return mine[mine["step"] == mine["step"].max()] if len(mine) else mine


def model_card(run: dict, record: dict, label: str, metrics: pd.DataFrame) -> str:
    config = run["config"]
    strength = "" if record["strength"] is None else f" at {record['strength']:g}"
    lines = [
        "---", "library_name: transformers", "tags: [dpo-bench, " + record["method"] + "]", "---", "",
        f"# {record['name']}{strength} (pipeline seed {record['seed']}), from dpo-bench run `{run['run_id']}`", "",
        f"A policy trained by dpo-bench's `{record['method']}` on the `{run['task']}` task, starting from the run's SFT model "
        f"of pipeline seed {record['seed']}: the checkpoint its final metrics below describe.", "",
        "| | |", "| --- | --- |",
        f"| cell | `{label}` |", f"| method | `{record['method']}` |",
        f"| strength | {'—' if record['strength'] is None else format(record['strength'], 'g')} |",
        f"| pipeline seed | {record['seed']} |", f"| status | {record.get('status', 'ok')} |",
        f"| run | `{run['run_id']}` (preset `{run.get('preset')}`, started {run.get('started_at')}) |",
        f"| code version | `{run.get('code_version')}` |",
    ]
    lines += [f"| data fingerprint: {name} | `{value}` |" for name, value in sorted((run.get("fingerprints") or {}).items())]
    lines += ["", "## Metrics", ""]
    if metrics.empty:
        lines.append("The run holds no metrics for this cell.")
    else:
        step = int(metrics["step"].iloc[0])
        lines += [f"On the run's test prompts at step {step}, temperature 1: mean ± standard error over prompts, with the "
                  "95% interval.", "", "| metric | value | 95% interval | n |", "| --- | --- | --- | --- |"]
        order = {m: i for i, m in enumerate(CARD_METRICS)}
        for row in sorted(metrics.itertuples(), key=lambda r: order[r.metric]):
            interval = "" if any(map(_missing, (row.ci_low, row.ci_high))) else f"[{row.ci_low:.4g}, {row.ci_high:.4g}]"
            error = "" if _missing(row.stderr) else f" ± {row.stderr:.3g}"
            lines.append(f"| {row.metric} | {row.value:.4g}{error} | {interval} | {int(row.n)} |")
    lines += ["", "## Config", "", "The cell's method config, as the run resolved it:", "", "```json",
              json.dumps(_entry_config(config, record), indent=2), "```", ""]
    return "\n".join(lines)


def _entry_config(config: dict, record: dict) -> dict:
    for entry in config.get("grid", []):
        if (entry.get("name") or entry["method"]) == record["name"]:
            return {"method": entry["method"], "config": entry.get("config", {}), "preferences": entry.get("preferences", {})}
    return {"method": record["method"]}


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
