"""The report as a format-neutral document: sections of blocks that the markdown and HTML
writers render. Keeping one document guarantees both files say the same thing."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from . import tables
from .headline import Finding, headline
from .history import history_section
from .load import CURVES_X, RunData
from .questions import questions_blocks
from .results import checkpoint_results
from .tables import Table
from .verdict import comparisons_table, frontier_table, verdict_findings

SECTION_TITLES = ("Headline", "Results", "History", "Frontier", "Win rates", "Training curves",
                  "Reward model", "Invariance checks", "Questions from the reading notes", "Samples", "Provenance")


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Findings:
    items: list[Finding]


@dataclass(frozen=True)
class TableBlock:
    table: Table
    title: str = ""


@dataclass(frozen=True)
class Figure:
    name: str  # file stem under figures/
    caption: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return self.title.lower().replace(" ", "-")


@dataclass
class Document:
    title: str
    sections: list[Section]


def _figure_or_note(figures: dict[str, bytes], name: str, caption: str, absent: str) -> list:
    return [Figure(name, caption)] if name in figures else [Paragraph(absent)]


def build_document(data: RunData, final: pd.DataFrame, configs: pd.DataFrame,
                   figures: dict[str, bytes]) -> Document:
    s = {t: Section(t) for t in SECTION_TITLES}

    s["Headline"].blocks.append(Findings(headline(data, final, configs, verdict_findings(data))))
    reward = data.reward

    if final.empty:
        s["Results"].blocks.append(Paragraph("No evaluation results at temperature 1.0."))
    else:
        s["Results"].blocks.append(TableBlock(tables.results_table(final, reward, tables.compute_caption(data))))
        seeds = tables.seed_table(configs, reward)
        if seeds is not None:
            s["Results"].blocks.append(TableBlock(seeds, "Seed-aggregated"))

    summary, history_table = history_section(data)
    s["History"].blocks.append(Paragraph(summary))
    if history_table is not None:
        s["History"].blocks.append(TableBlock(history_table))

    for table in (frontier_table(data), comparisons_table(data)):
        if table is not None:
            s["Frontier"].blocks.append(TableBlock(table))
    has_opt = (data.metrics["method"] == "optimum").any()
    s["Frontier"].blocks += _figure_or_note(
        figures, "frontier",
        f"{reward.name[:1].upper()}{reward.name[1:]} against sequence-level KL to the reference for every checkpoint of every "
        "cell; error bars are standard errors, a line joins each setting's checkpoints and the "
        "large marker is its final checkpoint."
        + (" The black line is the exact reward–KL frontier of the optimal policy π*."
           if has_opt else ""),
        f"No checkpoint has both {reward.name} and KL.")
    if "reward_vs_sqrt_kl" in figures:
        s["Frontier"].blocks.append(Figure(
            "reward_vs_sqrt_kl", f"Over-optimisation (Gao et al. 2022): {reward.name} (left) and the proxy reward r̂ (right: "
            "the learned reward model normalised on SFT samples, what best-of-N ranks by and PPO optimises) against √KL to the "
            "reference, on the test prompts, seed means. Best-of-N (dashed) over its N, with its estimated KL; PPO against "
            "the learned reward (solid) over its checkpoints, a line per kl_coef; every line starts at the SFT model. Where "
            f"the {reward.name} turns down while the proxy still climbs, the policy is exploiting the reward model."))

    s["Win rates"].blocks += _figure_or_note(
        figures, "win_rates",
        "Final win rate of each cell against the SFT model's completion for the same prompt, "
        f"judged by {reward.judge} (ties count ½), with 95% intervals.",
        "No win rates were recorded.")
    if "win_rate_temperature" in figures:
        s["Win rates"].blocks.append(Figure(
            "win_rate_temperature", "Final win rate against the sampling temperature."))
    if "h2h" in figures:
        s["Win rates"].blocks.append(Figure(
            "h2h", "Head-to-head: win rate of the row's final policy against the column's."))

    s["Training curves"].blocks += _figure_or_note(
        figures, "training_curves", f"One panel per training metric, one line per cell, against {CURVES_X[data.curves_x][1]} "
        "(chosen by [report] curves_x, or by dpo-bench report RUN_DIR --curves-x steps, samples, tokens or seconds).",
        "No training curves were recorded.")

    rm = tables.reward_model_table(data)
    if rm is None:
        s["Reward model"].blocks.append(Paragraph("This run trained no reward model."))
    else:
        s["Reward model"].blocks.append(TableBlock(rm))
    if "overoptimisation" in figures:
        s["Reward model"].blocks.append(Figure(
            "overoptimisation", "Over-optimisation (Gao et al. 2022): along each PPO run against the learned "
            "reward, the proxy reward of its rollouts (left) and their gold reward (right) per iteration; where the "
            "right curve flattens or falls while the left one rises, PPO is exploiting the reward model."))
    if "rm_calibration" in figures:
        s["Reward model"].blocks.append(Figure(
            "rm_calibration", "Calibration: predicted against empirical probability that the "
            "chosen response wins, per bin, with 95% intervals."))

    inv = tables.invariance_table(data)
    if inv is None:
        s["Invariance checks"].blocks.append(Paragraph("This run recorded no invariance checks."))
    else:
        s["Invariance checks"].blocks.append(Paragraph(
            "Every check here concerns a trained model or a measured quantity (the algebraic identities of the "
            "reward-equivalence results are unit tests), and each has a negative control that must fail it."))
        s["Invariance checks"].blocks.append(TableBlock(inv))
        if "invariance" in figures:
            s["Invariance checks"].blocks.append(Figure(
                "invariance", "Each check's |value| relative to its tolerance."))
    findings = tables.invariance_findings_tables(data)
    if findings:
        s["Invariance checks"].blocks.append(Paragraph(
            "Findings: numbers measured beside the checks, with no pass or fail (distances to π* along training "
            "on the bandit, PPO's gold reward and KL along its runs against r and r + f(x), the reward model's "
            "accuracy on the implicit-reward check's pairs)."))
        for name, table in findings:
            s["Invariance checks"].blocks.append(TableBlock(table, name))

    s["Questions from the reading notes"].blocks += questions_blocks(data, checkpoint_results(data), Paragraph, TableBlock, Bullets)

    samples = tables.sample_tables(data)
    if not samples:
        s["Samples"].blocks.append(Paragraph("This run saved no samples."))
    else:
        s["Samples"].blocks.append(Paragraph(
            "For each prompt, the SFT model's completion and each policy's final completion: "
            f"high {'gold' if reward.is_gold else 'judge'} or proxy reward with fluent = NO is the signature of reward hacking."))
        for prompt, table in samples:
            s["Samples"].blocks.append(TableBlock(table, f"Prompt: {prompt}"))

    prov = s["Provenance"].blocks
    for title, table in tables.provenance_tables(data).items():
        prov.append(TableBlock(table, title))
    config = tables.config_text(data)
    if config:
        prov.append(Paragraph("Resolved configuration:"))
        prov.append(Code(config))
    notes = tables.notes(data)
    if notes:
        prov.append(Paragraph("Notes:"))
        prov.append(Bullets(notes))

    return Document(f"dpo-bench report: {data.run_id}", [s[t] for t in SECTION_TITLES])

