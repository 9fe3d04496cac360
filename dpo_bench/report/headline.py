"""The headline: one plain-text sentence per finding, generated from the numbers.

Sentences are unescaped text; the markdown and HTML renderers escape them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import fmt
from .load import GOLD, REFERENCE_METHOD, RewardScale, RunData
from .results import Comparison, welch

# Fluency drop (absolute share) below the SFT model that raises the reward-hacking alarm.
FLUENCY_ALARM_DROP = 0.10


@dataclass(frozen=True)
class Finding:
    text: str
    warning: bool = False


def _cmp(a: pd.Series, b: pd.Series, metric: str = "gold_reward") -> Comparison:
    return welch(a[metric], a[f"{metric}_stderr"], a[f"{metric}_n"],
                 b[metric], b[f"{metric}_stderr"], b[f"{metric}_n"])


def _verdict(c: Comparison) -> str:
    if c.significant:
        return f"significant ({fmt.pvalue(c.p)}, Welch)"
    return f"not significant ({fmt.pvalue(c.p)}, Welch)"


def _best_per_method(configs: pd.DataFrame, reward: RewardScale = GOLD) -> pd.DataFrame:
    """Each trained method's best configuration by final reward, best method first."""
    m = reward.metric
    trained = configs[(configs["method"] != REFERENCE_METHOD) & configs[m].notna()]
    if trained.empty:
        return trained
    best = trained.loc[trained.groupby("method")[m].idxmax()]
    return best.sort_values(m, ascending=False).reset_index(drop=True)


def best_overall(configs: pd.DataFrame, reward: RewardScale = GOLD) -> list[Finding]:
    m = reward.metric
    best = _best_per_method(configs, reward)
    if best.empty:
        return []
    top = best.iloc[0]
    text = (f"{top['config']} reaches the highest {reward.name}, {fmt.pm(top[m], top[f'{m}_stderr'])}, "
            f"at KL {fmt.pm(top['kl'], top['kl_stderr'])} nats")
    if len(best) > 1:
        runner = best.iloc[1]
        c = _cmp(top, runner, m)
        text += (f"; its lead over the runner-up {runner['config']} "
                 f"({fmt.pm(runner[m], runner[f'{m}_stderr'])}) is "
                 f"{fmt.signed(c.diff)} ± {fmt.num(c.stderr)}, {_verdict(c)}.")
    else:
        text += "; no other trained method to compare with."
    return [Finding(text)]


def versus_sft(configs: pd.DataFrame, reward: RewardScale = GOLD) -> list[Finding]:
    m = reward.metric
    ref = configs[configs["method"] == REFERENCE_METHOD]
    best = _best_per_method(configs, reward)
    if ref.empty or best.empty or not fmt.finite(ref[m].iloc[0]):
        return []
    sft = ref.iloc[0]
    out = []
    for _, row in best.iterrows():
        c = _cmp(row, sft, m)
        if c.significant and c.diff > 0:
            verb = "beats"
        elif c.significant:
            verb = "falls below"
        else:
            verb = "does not significantly differ from"
        out.append(Finding(
            f"{row['method']} {verb} the SFT model: its best setting {row['config']} changes "
            f"{reward.name} by {fmt.signed(c.diff)} ± {fmt.num(c.stderr)} "
            f"({fmt.num(row[m])} vs {fmt.num(sft[m])}, {fmt.pvalue(c.p)})."))
    return out


def matched_kl(configs: pd.DataFrame, reward: RewardScale = GOLD) -> list[Finding]:
    m = reward.metric
    trained = configs[(configs["method"] != REFERENCE_METHOD)
                      & configs[m].notna() & configs["kl"].notna()]
    if trained["method"].nunique() < 2:
        return []
    median = float(np.median(trained["kl"]))
    low = trained[trained["kl"] <= median]
    top = low.loc[low[m].idxmax()]
    return [Finding(
        f"At matched KL (final KL at or below the median of {fmt.num(median)} nats), the best is "
        f"{top['config']}: {reward.name} {fmt.pm(top[m], top[f'{m}_stderr'])} "
        f"at KL {fmt.pm(top['kl'], top['kl_stderr'])} nats.")]


def seed_note(configs: pd.DataFrame, reward: RewardScale = GOLD) -> list[Finding]:
    """Say when a setting's ± is one training run's evaluation error: seeds move results more."""
    m = reward.metric
    trained = configs[(configs["method"] != REFERENCE_METHOD) & configs[m].notna()]
    single = trained[trained["seeds"] <= 1]
    if single.empty:
        return []
    scope = "Every setting was" if len(single) == len(trained) else f"{len(single)} of {len(trained)} settings were"
    return [Finding(
        f"{scope} trained with one seed: their ± and p-values are the evaluation-sample error of one "
        f"training run and leave out the variation between training seeds, which can be larger; give a "
        f"grid entry seeds = [0, 1, 2] to report the between-seed error instead.")]


def reward_model(data: RunData) -> list[Finding]:
    rm = data.metrics[data.metrics["method"] == "reward_model"]
    # Reward models at other label temperatures answer a reading-notes question; the headline is
    # about the one the methods used (labels at the run's own temperature, rows first in the file).
    label_t = ((data.run.get("config") or {}).get("preferences") or {}).get("label_temperature")
    if label_t is not None and (rm["temperature"] == label_t).any():
        rm = rm[(rm["temperature"] == label_t) | (rm["metric"] == "rm_calibration")]
    acc = rm[rm["metric"] == "rm_accuracy"]
    if acc.empty:
        return []
    a = acc.iloc[0]
    text = f"The reward model's held-out pairwise accuracy is {fmt.pm(a['value'], a['stderr'])}"
    ceiling = rm[rm["metric"] == "rm_bayes_ceiling"]
    if not ceiling.empty and fmt.finite(ceiling["value"].iloc[0]):
        ceil = float(ceiling["value"].iloc[0])
        text += (f" against a Bayes ceiling of {fmt.num(ceil)} "
                 f"(gap {fmt.num(ceil - float(a['value']))})")
    train = rm[rm["metric"] == "rm_train_accuracy"]
    if not train.empty and fmt.finite(train["value"].iloc[0]):
        text += f"; train accuracy {fmt.num(train['value'].iloc[0])}"
    return [Finding(text + ".")]


def invariance(data: RunData) -> list[Finding]:
    inv = data.checks
    if inv is None or inv.empty:
        return []
    passed = inv["passed"].fillna(False).astype(bool) if "passed" in inv else pd.Series(dtype=bool)
    text = f"{int(passed.sum())} of {len(inv)} invariance checks passed"
    if "negative_control_detected" in inv:
        detected = inv["negative_control_detected"].fillna(False).astype(bool)
        if detected.all():
            text += "; every negative control was detected."
        else:
            missed = inv.loc[~detected, "check"].astype(str).unique()
            text += (f"; {int((~detected).sum())} negative control(s) were NOT detected "
                     f"({', '.join(missed)}).")
    else:
        text += "; no negative controls were recorded."
    return [Finding(text, warning=not bool(passed.all()))]


def fluency_alarm(final: pd.DataFrame) -> list[Finding]:
    ref = final[final["method"] == REFERENCE_METHOD]["fluency"].dropna()
    if ref.empty:
        return []
    sft = float(ref.mean())
    low = final[(final["method"] != REFERENCE_METHOD)
                & (final["fluency"] < sft - FLUENCY_ALARM_DROP)]
    if low.empty:
        return []
    cells = ", ".join(f"{r['label']} {fmt.num(r['fluency'])}" for _, r in low.iterrows())
    return [Finding(
        f"Reward-hacking alarm: fluency fell more than {FLUENCY_ALARM_DROP:.2f} below the SFT "
        f"model's {fmt.num(sft)} for {cells}; check the samples.", warning=True)]


def failed_cells(data: RunData) -> list[Finding]:
    """Cells whose training failed are reported, never silently dropped."""
    cells = data.run.get("cells") or {}
    failed = [(label, c) for label, c in cells.items() if isinstance(c, dict) and c.get("status") not in (None, "ok")]
    findings = []
    for label, c in failed:
        step = c.get("last_good_checkpoint")
        kept = f"; its results are those of its last good checkpoint (step {step})" if step is not None else "; it has no results"
        findings.append(Finding(f"Cell {label} FAILED: {c.get('error', 'unknown error')}{kept}.", warning=True))
    return findings


def headline(data: RunData, final: pd.DataFrame, configs: pd.DataFrame, verdict: list[Finding] | None = None) -> list[Finding]:
    """The headline, opening with the ``verdict`` (``report.verdict``). With a verdict, the comparisons
    of final checkpoints below are left out: the verdict draws them on the frontier, between seeds,
    with the best settings chosen on validation prompts. Runs without one (older run directories)
    get them."""
    reward = data.reward
    # Without a gold reward the reader must know it before reading any number.
    findings: list[Finding] = [Finding(reward.note, warning=True)] if reward.note else []
    findings += verdict or []
    findings += failed_cells(data)
    if not configs.empty and not verdict:
        findings += best_overall(configs, reward)
        findings += versus_sft(configs, reward)
        findings += matched_kl(configs, reward)
        findings += seed_note(configs, reward)
    findings += reward_model(data)
    findings += invariance(data)
    if not final.empty:
        findings += fluency_alarm(final)
    if not findings:
        findings.append(Finding("This run recorded no evaluation results."))
    return findings
