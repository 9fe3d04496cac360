"""The report section "Questions from the reading notes": each open question of the DPO reading
notes answered with this run's numbers (nothing here is prose written in advance)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import fmt
from .load import RunData
from .results import welch
from .tables import Cell, Table


def _rm_temperature_table(data: RunData) -> tuple[Table | None, list[str]]:
    rm = data.metrics[(data.metrics["method"] == "reward_model") & data.metrics["metric"].isin(["rm_accuracy", "rm_bayes_ceiling"])]
    if rm.empty or rm["temperature"].isna().all():
        return None, []
    rows, text = [], []
    for t, g in rm.groupby("temperature", sort=True):
        acc = g[g["metric"] == "rm_accuracy"]
        ceiling = g[g["metric"] == "rm_bayes_ceiling"]
        if acc.empty or ceiling.empty:
            continue
        a, c = acc.iloc[0], float(ceiling["value"].iloc[0])
        rows.append([Cell(fmt.num(t, 2)), Cell(fmt.pm(a["value"], a["stderr"])),
                     Cell(fmt.ci(a["value"], a["ci_low"], a["ci_high"])), Cell(fmt.num(c)),
                     Cell(fmt.num(a["value"] / c if c else math.nan))])
        text.append(f"at label temperature {t:g} the reward model reaches {fmt.pm(a['value'], a['stderr'])} "
                    f"against a ceiling of {fmt.num(c)}")
    if not rows:
        return None, []
    table = Table(["label temperature", "held-out accuracy ± s.e.", "95% CI", "Bayes ceiling", "share of ceiling"], rows)
    return table, text


def _best_within(points: pd.DataFrame, name: str, budget: float) -> pd.Series | None:
    rows = points[(points["method"] == name) & (points["kl"] <= budget + 1e-12)]
    if rows.empty:
        return None
    return rows.loc[rows["gold_reward"].idxmax()]


def _matched_kl(data: RunData, points: pd.DataFrame, a: str, b: str) -> str | None:
    """Best gold reward of ``a`` and of ``b`` over all their checkpoints within the KL both reach
    (the smaller of their largest KLs), compared by Welch."""
    points = points.dropna(subset=["kl", "gold_reward"])
    ka, kb = points.loc[points["method"] == a, "kl"], points.loc[points["method"] == b, "kl"]
    if ka.empty or kb.empty:
        return None
    budget = float(min(ka.max(), kb.max()))
    points = points.assign(label=[f"{data.config_label(m, beta)} at step {int(step)}"
                                  for m, beta, step in zip(points["method"], points["beta"], points["step"])])
    ra, rb = _best_within(points, a, budget), _best_within(points, b, budget)
    scope = f"within a KL budget of {fmt.num(budget)} nats (the largest both reach), the best {{}} checkpoint is"
    if ra is None or rb is None:
        # No shared KL range: compare the two checkpoints closest in KL instead, and say so.
        pa, pb = points[points["method"] == a], points[points["method"] == b]
        gaps = np.abs(pa["kl"].to_numpy()[:, None] - pb["kl"].to_numpy()[None, :])
        i, j = np.unravel_index(np.argmin(gaps), gaps.shape)
        ra, rb = pa.iloc[i], pb.iloc[j]
        scope = "the two reach no common KL; of their checkpoints closest in KL, the {} one is"
    c = welch(ra["gold_reward"], ra["gold_reward_stderr"], ra["gold_reward_n"],
              rb["gold_reward"], rb["gold_reward_stderr"], rb["gold_reward_n"])
    verdict = "a significant difference" if c.significant else "no significant difference"
    return (scope.format(a) + f" {ra['label']}, with gold reward {fmt.pm(ra['gold_reward'], ra['gold_reward_stderr'])} at KL "
            f"{fmt.num(ra['kl'])}; the {b} one is {rb['label']}, {fmt.pm(rb['gold_reward'], rb['gold_reward_stderr'])} "
            f"at KL {fmt.num(rb['kl'])}: difference {fmt.signed(c.diff)} ± {fmt.num(c.stderr)}, {verdict} ({fmt.pvalue(c.p)}).")


def questions_blocks(data: RunData, checkpoints: pd.DataFrame, paragraph, table_block, bullets) -> list:
    """Blocks for the section; ``paragraph``, ``table_block``, ``bullets`` build document blocks."""
    blocks = []
    table, text = _rm_temperature_table(data)
    blocks.append(paragraph("Why is reward-model accuracy as low as 64%? Labels drawn from the Bradley-Terry "
                            "model are noisy, and no model can predict noise: the Bayes ceiling E[σ(|Δr*|/T)] "
                            "caps accuracy at each label temperature T."))
    if table is None:
        blocks.append(paragraph("This run trained no reward model on held-out data."))
    else:
        blocks.append(table_block(table))
        blocks.append(paragraph("Measured: " + "; ".join(text) + "."))

    questions = data.run.get("questions") or {}
    for title, a, b, missing in (
        ("Is it more efficient to train with y1..yK under the Plackett-Luce model? dpo_pl on K-wise "
         "rankings against pairwise DPO at an equal number of labelled completions:",
         questions.get("pl_listwise"), questions.get("pl_pairwise"),
         "This run did not train the pair of grid entries that answers it (see [questions] in the config)."),
        ("Fine-tuning with the parameters of certain layers fixed? The same method with and without its "
         "first blocks frozen:", questions.get("freeze_frozen"), questions.get("freeze_base"),
         "This run did not train a frozen variant (see [questions] and freeze_blocks in the config)."),
    ):
        blocks.append(paragraph(title))
        answer = _matched_kl(data, checkpoints, a, b) if a and b and not checkpoints.empty else None
        blocks.append(paragraph(answer[0].upper() + answer[1:] if answer else missing))

    links = data.run.get("code_links") or {}
    if links:
        blocks.append(paragraph("Why the log-sigmoid, and why is the KL-penalised reward differentiable? No "
                                "experiment needed; the computations are here:"))
        # Report text is escaped as data in both renderers: backticks would print, not format.
        blocks.append(bullets([f"{name}: {where}" for name, where in links.items()]))
    return blocks

