"""Tables as plain data, rendered by both the markdown and the HTML writer.

Cells hold unescaped text; each renderer escapes for its own format. ``best`` marks the best
value of a column (bold in markdown, a CSS class in HTML); ``sort`` is the numeric key the HTML
table sorter uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import fmt
from .load import GOLD, REFERENCE_METHOD, RewardScale, RunData
from .results import COMPUTE

# Enough prompts to see reward hacking at a glance; the rest are in samples.parquet.
MAX_SAMPLE_PROMPTS = 5


@dataclass(frozen=True)
class Cell:
    text: str
    best: bool = False
    sort: float | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    caption: str = ""


def _best_index(values: pd.Series, larger_is_better: bool = True) -> set[int]:
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(v).any():
        return set()
    target = np.nanmax(v) if larger_is_better else np.nanmin(v)
    return {int(i) for i in np.flatnonzero(np.isclose(v, target, rtol=0, atol=1e-12))}


def _num_cell(x: Any, text: str, best: bool = False) -> Cell:
    return Cell(text, best, float(x) if fmt.finite(x) else None)


def _results_rows(frame: pd.DataFrame, seed_text, reward: RewardScale = GOLD) -> list[list[Cell]]:
    frame = frame.reset_index(drop=True)
    m = reward.metric
    best = {k: _best_index(frame[k]) for k in (m, "win_rate", "fluency")}
    rows = []
    for i, r in frame.iterrows():
        rows.append([
            Cell(str(r["config"])),
            Cell(seed_text(r)),
            _num_cell(r[m], fmt.pm(r[m], r[f"{m}_stderr"]), i in best[m]),
            _num_cell(r["kl"], fmt.pm(r["kl"], r["kl_stderr"])),
            _num_cell(r["win_rate"], fmt.ci(r["win_rate"], r["win_rate_ci_low"], r["win_rate_ci_high"]),
                      i in best["win_rate"]),
            _num_cell(r["fluency"], fmt.pm(r["fluency"], r["fluency_stderr"]), i in best["fluency"]),
            _num_cell(r["proxy_reward"], fmt.pm(r["proxy_reward"], r["proxy_reward_stderr"])),
            _num_cell(r["length"], fmt.num(r["length"], 1)),
            *_compute_cells(r),
        ])
    return rows


def _compute_cells(r: pd.Series) -> list[Cell]:
    """A cell's training cost (columns ``compute_<name>``, see ``results.COMPUTE``): steps, samples
    (with best-of-N's N per prompt at inference), tokens and seconds."""
    steps, samples, tokens, seconds, per_prompt = (r.get(f"compute_{k}", np.nan) for k in COMPUTE)
    samples_text = fmt.count(samples)
    if fmt.finite(per_prompt) and per_prompt > 1:
        samples_text += f" (+ {per_prompt:g} per prompt at inference)"
    return [_num_cell(steps, fmt.count(steps)), _num_cell(samples, samples_text), _num_cell(tokens, fmt.count(tokens)),
            _num_cell(seconds, fmt.seconds(seconds))]


_RESULT_HEADERS = ["policy", "seed", "gold reward ± s.e.", "KL [nats] ± s.e.",
                   "win rate vs SFT [95% CI]", "fluency ± s.e.", "proxy reward ± s.e.",
                   "length [tokens]", "optimiser steps", "samples generated", "tokens trained on", "training time"]


def compute_caption(data: RunData) -> str:
    """What the compute columns count, and the costs every cell shares (which they leave out)."""
    config = data.run.get("config") or {}
    k = (config.get("preferences") or {}).get("k")
    prompts = (data.run.get("preferences") or {}).get("n_prompts")
    if k and prompts:
        data_cost = (f"the preference data ({k} completions sampled from the SFT model for each of {prompts:,} train "
                     "prompts, per seed)")
    else:
        data_cost = "the preference data (sampled from the SFT model, or given)"
    return ("Compute up to each cell's final checkpoint: optimiser steps (PPO: iterations × epochs × minibatches); samples "
            "generated during training (PPO's rollouts; none for the offline methods, which train on the fixed preference "
            "data; best-of-N trains nothing and draws N per prompt at inference); tokens through the forward and backward "
            "passes of the updates (not padding); wall seconds of training, checkpoint evaluations left out (cells that ran "
            f"at once shared the machine). Not counted, because every cell shares them: the SFT model, {data_cost}, and "
            "the reward model that PPO and best-of-N read.")


def _result_headers(reward: RewardScale) -> list[str]:
    headers = list(_RESULT_HEADERS)
    if not reward.is_gold:
        headers[2] = f"{reward.name} ± s.e."
        headers[4] = "win rate vs SFT by the judge [95% CI]"
    return headers


def results_table(final: pd.DataFrame, reward: RewardScale = GOLD, compute: str = "") -> Table:
    """The cells at their final checkpoints; ``compute``: what the compute columns count (:func:`compute_caption`)."""
    rows = _results_rows(final, lambda r: f"{int(r['seed'])} (step {int(r['step'])})", reward)
    caption = ("Each cell at its final checkpoint, temperature 1.0. Best gold reward, win rate "
               "and fluency in bold.")
    if not reward.is_gold:
        caption = (f"Each cell at its final checkpoint, temperature 1.0. No gold reward: the reward and the win "
                   f"rates are judged by {reward.judge}. Best {reward.name}, win rate and fluency in bold.")
    return Table(_result_headers(reward), rows, f"{caption} {compute}".strip())


def seed_table(configs: pd.DataFrame, reward: RewardScale = GOLD) -> Table | None:
    multi = configs[configs["seeds"] > 1]
    if multi.empty:
        return None
    rows = _results_rows(multi, lambda r: f"mean of {int(r['seeds'])}", reward)
    return Table(_result_headers(reward), rows,
                 "Mean over seeds; ± is the between-seed standard error, the interval a t interval "
                 "over seeds; the compute columns are the seeds' mean.")


def reward_model_table(data: RunData) -> Table | None:
    rm = data.metrics[data.metrics["method"] == "reward_model"]
    # Its training curve belongs in the training-curves figure, its calibration in its own figure.
    rm = rm[(rm["metric"] != "rm_calibration") & ~rm["metric"].str.startswith("train/")]
    if rm.empty:
        return None
    names = {"rm_accuracy": "held-out pairwise accuracy", "rm_bayes_ceiling": "Bayes ceiling",
             "rm_train_accuracy": "train accuracy"}
    rows = []
    several = rm["temperature"].nunique() > 1
    for _, r in rm.sort_values(["temperature", "metric"]).iterrows():
        name = names.get(r["metric"], r["metric"])
        if several:
            name = f"{name} (labels at T={r['temperature']:g})"
        rows.append([Cell(name),
                     _num_cell(r["value"], fmt.pm(r["value"], r["stderr"])),
                     _num_cell(r["n"], str(int(r["n"])))])
    return Table(["quantity", "value ± s.e.", "n"], rows)


def invariance_table(data: RunData) -> Table | None:
    inv = data.checks
    if inv is None or inv.empty:
        return None
    rows = []
    for _, r in inv.iterrows():
        passed = bool(r.get("passed", False))
        detected = r.get("negative_control_detected", np.nan)
        control = "n/a" if fmt.is_nan(detected) or detected is None else (
            "detected" if bool(detected) else "NOT detected")
        rows.append([Cell(str(r.get("check", ""))), Cell(str(r.get("quantity", ""))),
                     _num_cell(r.get("value"), fmt.num(r.get("value"), 4)),
                     _num_cell(r.get("tolerance"), fmt.num(r.get("tolerance"), 4)),
                     Cell("pass" if passed else "FAIL", best=not passed),
                     _num_cell(r.get("control_value"), fmt.num(r.get("control_value"), 4)),
                     Cell(control, best=control == "NOT detected")])
    return Table(["check", "quantity", "value", "tolerance", "result", "control value", "negative control"], rows,
                 "A negative control is the same check on an independent perturbation (other labels, another reward); "
                 "it must fail, and 'detected' means it did. Problems in bold.")


def invariance_findings_tables(data: RunData) -> list[tuple[str, Table]]:
    """The findings, one table per finding: a row per step (where they have one), a column per quantity."""
    found = data.findings
    if found is None:
        return []
    out = []
    for name, group in found.groupby("check", sort=False):
        quantities = list(dict.fromkeys(group["quantity"]))
        group = group.assign(step=pd.to_numeric(group["step"], errors="coerce") if "step" in group else np.nan)
        stepped = bool(group["step"].notna().any())
        rows = []
        for step, at in group.groupby("step", sort=False, dropna=False):
            values = [at.loc[at["quantity"] == q, "value"] for q in quantities]
            rows.append([Cell("" if fmt.is_nan(step) else f"{float(step):g}")] * stepped
                        + [_num_cell(v.iloc[0], fmt.num(v.iloc[0], 4)) if len(v) else Cell(fmt.MISSING) for v in values])
        out.append((str(name), Table(["step"] * stepped + quantities, rows)))
    return out


def _final_samples(samples: pd.DataFrame) -> pd.DataFrame:
    s = samples.copy()
    for col, default in (("method", ""), ("beta", np.nan), ("seed", 0), ("prompt", ""),
                         ("completion", ""), ("gold_reward", np.nan), ("proxy_reward", np.nan),
                         ("fluent", np.nan)):
        if col not in s.columns:
            s[col] = default
    if "step" in s.columns:  # a samples file with checkpoints: keep each cell's last one
        last = s.groupby(["method", "beta", "seed"], dropna=False)["step"].transform("max")
        s = s[s["step"] == last]
    return s


def sample_tables(data: RunData) -> list[tuple[str, Table]]:
    """Up to five eval prompts: the SFT completion and each policy's final completion."""
    if data.samples is None:
        return []
    s = _final_samples(data.samples)
    reward = data.reward
    if reward.metric not in s.columns:
        s[reward.metric] = np.nan
    ref = s[s["method"] == REFERENCE_METHOD]
    prompts = list(dict.fromkeys((ref if not ref.empty else s)["prompt"].astype(str)))
    prompts = prompts[:MAX_SAMPLE_PROMPTS]
    s = s.assign(_prompt=s["prompt"].astype(str), _ref=s["method"] != REFERENCE_METHOD)
    s = s.sort_values(["_ref", "method", "beta", "seed"], na_position="first", kind="stable")
    multi = data.multi_seed
    out = []
    for prompt in prompts:
        rows = []
        per_cell = s[s["_prompt"] == prompt].drop_duplicates(["method", "beta", "seed"])
        for _, r in per_cell.iterrows():
            fluent = r["fluent"]
            fluent_text = "—" if fmt.is_nan(fluent) or fluent is None else (
                "yes" if bool(fluent) else "NO")
            rows.append([
                Cell(data.cell_label(str(r["method"]), float(r["beta"]), int(r["seed"]), multi)),
                Cell(str(r["completion"])),
                _num_cell(r[reward.metric], fmt.num(r[reward.metric])),
                _num_cell(r["proxy_reward"], fmt.num(r["proxy_reward"])),
                Cell(fluent_text, best=fluent_text == "NO"),
            ])
        out.append((prompt, Table(["policy", "completion", reward.name, "proxy reward", "fluent"],
                                  rows)))
    return out


def _kv(items: list[tuple[str, Any]]) -> Table:
    return Table(["key", "value"], [[Cell(str(k)), Cell(str(v))] for k, v in items])


def provenance_tables(data: RunData) -> dict[str, Table]:
    run = data.run
    out: dict[str, Table] = {}
    out["Run"] = _kv([
        ("run id", data.run_id), ("task", data.task), ("preset", run.get("preset", "—")),
        ("seed", run.get("seed", "—")), ("status", run.get("status", "—")),
        ("device", run.get("device", "—")), ("started at", run.get("started_at", "—")),
        ("finished at", run.get("finished_at", "—")), ("run directory", str(data.run_dir)),
    ])
    methods = run.get("methods")
    if isinstance(methods, dict) and methods:
        out["Methods"] = Table(["method", "strength", "description"], [
            [Cell(str(m)), Cell(str(info.get("strength", "—")) if isinstance(info, dict) else "—"),
             Cell(str(info.get("description", "")) if isinstance(info, dict) else str(info))]
            for m, info in methods.items()])
    for key, title in (("versions", "Versions"), ("fingerprints", "Data fingerprints")):
        value = run.get(key)
        if isinstance(value, dict) and value:
            out[title] = _kv(list(value.items()))
    timings = run.get("timings")
    if isinstance(timings, dict) and timings:
        rows = [[Cell(str(k)), _num_cell(v, fmt.seconds(v))] for k, v in timings.items()]
        total = sum(float(v) for v in timings.values() if fmt.finite(v))
        rows.append([Cell("total"), _num_cell(total, fmt.seconds(total))])
        out["Timings per stage"] = Table(["stage", "time"], rows)
    return out


def config_text(data: RunData) -> str:
    config = data.run.get("config")
    if not config:
        return ""
    return json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def notes(data: RunData) -> list[str]:
    value = data.run.get("notes") or []
    return [str(n) for n in value] if isinstance(value, list) else [str(value)]
