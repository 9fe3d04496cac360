"""The verdict the project exists for, from ``frontier.parquet`` and ``comparisons.parquet``: RLHF
against the DPO family at fixed KL budgets, each method's frontier at those budgets, and what the
numbers rest on (seeds, prompts, correction, dropped pairs, truncation).

Sentences are unescaped text; the markdown and HTML renderers escape them.
"""

from __future__ import annotations

import pandas as pd

from . import fmt
from .headline import Finding
from .load import REFERENCE_METHOD, RunData
from .tables import Cell, Table

ALPHA = 0.05
ROLE_NAMES = {"rlhf": "RLHF", "direct": "DPO family", "oracle": "oracle", "inference": "inference-time baseline",
              "baseline": "supervised baseline", "reference": "reference"}
CORRECTIONS = {"holm": "Holm", "bh": "Benjamini-Hochberg"}


def _budget(k: float) -> str:
    return f"{k:g} nat" + ("" if k == 1 else "s")


def _role(data: RunData, method: str) -> str:
    info = (data.run.get("methods") or {}).get(method)
    return str(info.get("role", "direct")) if isinstance(info, dict) else "direct"


def _display(data: RunData, method: str) -> str:
    role = _role(data, method)
    return f"{method} ({ROLE_NAMES[role]})" if role in ("oracle", "inference", "rlhf") else method


def verdict_findings(data: RunData) -> list[Finding]:
    """The headline's opening: RLHF against each DPO-family method at every budget both cover."""
    comparisons, frontier = data.comparisons, data.frontier
    if frontier is None or frontier.empty:
        return []
    frontier = _with_coverage(frontier)
    config = (data.run.get("config") or {}).get("verdict") or {}
    rlhf = str(config.get("rlhf", "ppo"))
    findings: list[Finding] = []
    if comparisons is None or comparisons.empty:
        reached = set(frontier["method"])
        why = (f"the grid has no '{rlhf}' entry" if rlhf not in reached
               else "no method of the DPO family shares a KL budget with it that both cover (reach with their own policies) in every seed")
        findings.append(Finding(f"No verdict on RLHF against the DPO family: {why}.", warning=True))
    else:
        correction = CORRECTIONS.get(str(comparisons["correction"].iloc[0]), str(comparisons["correction"].iloc[0]))
        for other, g in comparisons.groupby("method_b", sort=True):
            parts, better, worse = [], [], []
            for _, r in g.sort_values("kl_budget").iterrows():
                significant = fmt.finite(r["p_adjusted"]) and r["p_adjusted"] < ALPHA
                if significant:
                    (better if r["diff"] > 0 else worse).append(_budget(r["kl_budget"]))
                levels = (f" ({fmt.num(r['gold_a'])} against {fmt.num(r['gold_b'])})"
                          if fmt.finite(r.get("gold_a")) and fmt.finite(r.get("gold_b")) else "")
                parts.append(f"at {_budget(r['kl_budget'])} {fmt.signed(r['diff'])} "
                             f"[{fmt.num(r['ci_low'])}, {fmt.num(r['ci_high'])}]{levels}, {correction} {fmt.pvalue(r['p_adjusted'])}")
            if better or worse:
                claim = "; ".join(s for s in (f"RLHF ({rlhf}) is ahead of {other} at {', '.join(better)}" if better else "",
                                              f"{other} is ahead of RLHF ({rlhf}) at {', '.join(worse)}" if worse else "") if s)
            else:
                claim = f"The evidence does not separate RLHF ({rlhf}) from {other} at any budget both cover"
            findings.append(Finding(f"{claim}. Gold reward difference {rlhf} − {other} on the test prompts: {'; '.join(parts)}."
                                    + _uncovered(frontier, rlhf, str(other))))
        for other in sorted(set(frontier.loc[frontier["role"] == "direct", "method"]) - set(comparisons["method_b"])
                            if "role" in frontier else []):
            findings.append(Finding(f"RLHF ({rlhf}) and {other} cover no KL budget together, so they are not compared: "
                                    f"{rlhf}'s policies cover {_covered_budgets(frontier, rlhf)}, {other}'s {_covered_budgets(frontier, str(other))}."))
    findings += _baselines(data, frontier)
    findings += objective_findings(data)
    findings += _evidence(data, comparisons)
    return findings


OBJECTIVE = "E[r̂ − p·truncated] − c·KL"


def _objective_terms(g: pd.DataFrame) -> str:
    """'c = 0.1, p = 1' from a cell's objective parameter rows; says when c is the adaptive controller's."""
    def value(metric: str) -> float | None:
        row = g[g["metric"] == metric]
        return float(row["value"].iloc[0]) if len(row) else None

    adaptive, fixed, penalty = (value(m) for m in ("objective_kl_coef_adaptive", "objective_kl_coef", "objective_eos_penalty"))
    parts = []
    if adaptive is not None:
        parts.append(f"c = {fmt.num(adaptive)}, the adaptive KL controller's final kl_coef")
    elif fixed is not None:
        parts.append(f"c = {fmt.num(fixed)}")
    if penalty is not None:
        parts.append(f"p = {fmt.num(penalty)}")
    return "; ".join(parts)


def _best_of_n_size(metric: str) -> float:
    """N of an ``objective/best_of_n (N=…)`` metric."""
    return float(metric.rsplit("N=", 1)[-1].rstrip(")"))


def objective_findings(data: RunData) -> list[Finding]:
    """Each KL-regularised cell on its objective E[r̂ − p·truncated] − c·KL (PPO: c its kl_coef, p its
    EOS penalty; DPO: c = β/σ, p = 0). A PPO cell below a best-of-N from the reference on it has not
    converged; a DPO cell below one is only said to be (the reward model stands in for DPO's reward)."""
    rows = data.metrics[data.metrics["metric"].str.startswith("objective")]
    if rows.empty:
        return []
    out, converged, flagged, adaptive = [], {}, set(), 0
    for (method, c), cell in rows.groupby(["method", "beta"], sort=True):
        family = "RLHF" if _role(data, method) == "rlhf" else "DPO"
        beaten_in = []  # (seed, own row, the best best-of-N above it)
        above_smallest = 0  # seeds in which the cell beats the best-of-N of the smallest N
        held = 0  # seeds with a best-of-N to hold the cell against
        terms = []  # each held seed's c and p (c differs between seeds for DPO, and for an adaptive controller)
        for seed, g in cell.groupby("seed", sort=True):
            own = g[g["metric"] == "objective"]
            baselines = g[g["metric"].str.startswith("objective/best_of_n")]
            if own.empty or baselines.empty:  # no best-of-N in the grid: nothing to hold the cell against
                continue
            held += 1
            terms.append(_objective_terms(g))
            smallest = baselines.loc[baselines["metric"].map(_best_of_n_size).idxmin()]
            above_smallest += bool(float(own["value"].iloc[0]) >= smallest["value"])
            beaten = baselines[baselines["value"] > float(own["value"].iloc[0])]
            if beaten.empty:
                converged[family] = converged.get(family, 0) + 1
                adaptive += bool((g["metric"] == "objective_kl_coef_adaptive").any())
            else:
                beaten_in.append((int(seed), own.iloc[0], beaten.loc[beaten["value"].idxmax()]))
        if not beaten_in:
            continue
        flagged.add(family)
        parts = [f"seed {seed}: {fmt.pm(own['value'], own['stderr'])} against {top['metric'].removeprefix('objective/')}'s "
                 f"{fmt.pm(top['value'], top['stderr'])}" for seed, own, top in beaten_in]
        said = " / ".join(dict.fromkeys(t for t in terms if t))  # per seed where they differ
        smallest_name = min(cell.loc[cell["metric"].str.startswith("objective/best_of_n"), "metric"], key=_best_of_n_size)
        where = (f"It is at or above {smallest_name.removeprefix('objective/')} in {above_smallest} of {held} seeds.")
        where += _optimum_shares(cell, family)
        if family == "RLHF":
            out.append(Finding(
                f"NOT CONVERGED: {data.config_label(method, c)} in {len(beaten_in)} of {held} seeds scores below a best-of-N "
                f"on its own objective {OBJECTIVE}{f' ({said})' if said else ''}: {'; '.join(parts)}. {where} "
                "Its gold reward says little about RLHF yet.", warning=True))
        else:
            # DPO's problem is max E[r] − β·KL for the Bradley-Terry reward it fits itself; the reward
            # model stands in for that r, and with deterministic labels its scale (σ) is set by how long
            # it trained. So this is a comparison on the reward model's objective, not a convergence test.
            out.append(Finding(
                f"BELOW BEST-OF-N: {data.config_label(method, c)} in {len(beaten_in)} of {held} seeds scores below a best-of-N "
                f"on the reward model's version of its objective {OBJECTIVE}{f' ({said})' if said else ''}: {'; '.join(parts)}. "
                f"{where} The reward model stands in for the reward DPO fits, so this suggests, not shows, that DPO has not "
                "reached its optimum.", warning=True))
    for family, n in sorted(converged.items()):
        if family in flagged:
            continue
        if family == "RLHF":
            how = (f"; for {adaptive} cell{'s' if adaptive != 1 else ''} with an adaptive KL controller, c is its final kl_coef"
                   if adaptive else "")
            terms = f"p PPO's missing_eos_penalty on a completion cut off without EOS; c its kl_coef{how}"
        else:
            terms = "p = 0; c = β/σ, σ the reward model's standard deviation on SFT samples"
        out.append(Finding(f"Every {family} cell ({n}) scores above every best-of-N on its own objective {OBJECTIVE} "
                           f"(r̂ the learned reward model, normalised on SFT samples; {terms})."))
    return out


def _optimum_shares(cell: pd.DataFrame, family: str) -> str:
    """' Of the way from the SFT model to the optimum …, it covers …' for a cell's objective rows
    (every seed's, where the optimum was estimated from a pool of reference draws); '' without.
    For the DPO family the optimum is the reward model's, at c = β/σ."""
    shares, pools, over = [], set(), False
    for seed, g in cell.groupby("seed", sort=True):
        value = dict(zip(g["metric"], g["value"].astype(float)))
        optimum = next((m for m in value if m.startswith("objective/optimum")), None)
        if optimum is None or "objective" not in value or "objective/sft" not in value:
            continue
        gap = value[optimum] - value["objective/sft"]
        if not gap > 0:
            continue
        best = max((v for m, v in value.items() if m.startswith("objective/best_of_n")), default=float("nan"))
        own = (value["objective"] - value["objective/sft"]) / gap
        share = f"seed {seed}: {100 * own:.0f}%"
        over |= own > 1
        if fmt.finite(best):
            share += f" (the best best-of-N {100 * (best - value['objective/sft']) / gap:.0f}%)"
            over |= (best - value["objective/sft"]) / gap > 1
        shares.append(share)
        pools.add(optimum.removeprefix("objective/optimum (pool of ").rstrip(")"))
    if not shares:
        return ""
    whose = "the reward model's optimum at c = β/σ" if family != "RLHF" else "the optimum"
    pool = " or ".join(sorted(pools, key=float))
    return (f" Of the way from the SFT model to {whose} (its objective estimated from {pool} reference draws a prompt, "
            f"low on average, so the shares are high{'; over 100% where the estimate falls below a policy' if over else ''}), "
            f"it covers about {'; '.join(shares)}.")


def _with_coverage(frontier: pd.DataFrame) -> pd.DataFrame:
    """The frontier with its ``covered`` column (runs written before it had none: every row covered)."""
    return frontier if "covered" in frontier else frontier.assign(covered=True, kl_min=float("nan"))


def _uncovered(frontier: pd.DataFrame, a: str, b: str) -> str:
    """' Not compared at …: below …'s policies (…).' for budgets both reach where one of the two is read
    only on the chord from the reference; '' when there are none."""
    rows = {m: frontier[frontier["method"] == m].set_index("kl_budget") for m in (a, b)}
    shared = sorted(set(rows[a].index) & set(rows[b].index))
    below = [k for k in shared if not (rows[a].loc[k, "covered"] and rows[b].loc[k, "covered"])]
    if not below:
        return ""
    why = [f"{m}'s smallest KL is {fmt.num(rows[m]['kl_min'].iloc[0])} nats" for m in (a, b)
           if not rows[m].loc[below, "covered"].all()]
    return (f" Not compared at {', '.join(_budget(k) for k in below)}: below the policies of the grid ({'; '.join(why)}), where "
            "a frontier is only the chord from the SFT model, a mixture every method gets for free.")


def _covered_budgets(frontier: pd.DataFrame, method: str) -> str:
    """'1 nat and 2 nats': the budgets a method covers with its own policies ('none of the budgets')."""
    budgets = [_budget(k) for k in sorted(frontier.loc[(frontier["method"] == method) & frontier["covered"].astype(bool), "kl_budget"])]
    return " and ".join([", ".join(budgets[:-1]), budgets[-1]] if len(budgets) > 1 else budgets) or "none of the budgets"


def _baselines(data: RunData, frontier: pd.DataFrame) -> list[Finding]:
    """Where the oracle and the inference-time baseline stand: shown, not competing."""
    out = []
    for method, g in frontier.groupby("method", sort=True):
        role = _role(data, method)
        if role not in ("oracle", "inference"):
            continue
        top = g.sort_values("kl_budget").iloc[-1]
        if "covered" in g and not bool(top["covered"]):
            continue
        out.append(Finding(
            f"{method} is {'an oracle (it optimises the gold reward itself)' if role == 'oracle' else 'an inference-time baseline (no training)'}, "
            f"shown for scale, not as a competitor: at {_budget(top['kl_budget'])} it reaches {fmt.num(top['gold_reward'])} "
            f"[{fmt.num(top['ci_low'])}, {fmt.num(top['ci_high'])}]."))
    return out


def _evidence(data: RunData, comparisons: pd.DataFrame | None) -> list[Finding]:
    """What the verdict rests on: seeds, prompts, the test, the correction; dropped pairs; truncation."""
    run = data.run
    seeds = run.get("seeds") or sorted(set(data.metrics["seed"]))
    config = run.get("config") or {}
    task = config.get(run.get("task", ""), {}) or {}
    text = (f"{len(seeds)} whole-pipeline seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}): each trains its own "
            "SFT model, preference data, reward model and policies (the task's prompts are shared). Each method's frontier "
            "is the upper envelope of its strengths and checkpoints, with the SFT model at KL 0, chosen on "
            f"{task.get('n_val_prompts', 'the validation')} validation prompts and read on {task.get('n_eval_prompts', 'the')} "
            "test prompts; intervals are a bootstrap over seeds, then prompts")
    if comparisons is not None and not comparisons.empty:
        test = str(comparisons["test"].iloc[0])
        correction = CORRECTIONS.get(str(comparisons["correction"].iloc[0]), "")
        text += f"; differences are paired on prompts within a seed and tested between seeds ({test}), {correction}-corrected over {len(comparisons)} claims"
    out = [Finding(text + ".", warning=len(seeds) < 2)]
    pipelines = run.get("pipelines") or {}
    drops = []
    for seed, info in pipelines.items():
        prefs = (info or {}).get("preferences") or {}
        if prefs:
            drops.append((seed, prefs.get("n_pairs", 0), prefs.get("n_prompts", 0), prefs.get("n_dropped_ties", 0),
                          prefs.get("n_dropped_repeats", 0)))
    if drops:
        out.append(Finding("Preference data per seed (pairs kept from prompts; pairs dropped as tied / identical): "
                           + "; ".join(f"seed {s}: {n:,} from {p:,}; {t:,} / {r:,}" for s, n, p, t, r in drops) + "."))
    trunc = data.metrics[(data.metrics["metric"] == "truncated") & (data.metrics["temperature"] == 1.0)]
    if not trunc.empty:
        last = trunc[trunc["step"] == trunc.groupby(["method", "beta", "seed"], dropna=False)["step"].transform("max")]
        ref = last[last["method"] == REFERENCE_METHOD]["value"]
        worst = last.loc[last["value"].idxmax()]
        out.append(Finding(
            f"Completions cut at the length limit without EOS: SFT {fmt.num(100 * ref.mean(), 2)}%"
            f"; at most {fmt.num(100 * worst['value'], 2)}% for a final policy ({data.config_label(worst['method'], worst['beta'])}, "
            f"seed {int(worst['seed'])}).", warning=bool(worst["value"] > 0.05)))
    length = data.metrics[(data.metrics["metric"] == "length") & (data.metrics["method"] == REFERENCE_METHOD)]
    if not length.empty:
        out.append(Finding(f"The SFT model's completions average {fmt.num(length['value'].mean(), 3)} tokens on the test prompts."))
    return out


def frontier_table(data: RunData) -> Table | None:
    """Gold reward at each KL budget, per method (rows) and budget (columns), with its interval."""
    frontier = data.frontier
    if frontier is None or frontier.empty:
        return None
    frontier = _with_coverage(frontier)
    budgets = sorted(set(frontier["kl_budget"]))
    order = {"rlhf": 0, "direct": 1, "baseline": 2, "inference": 3, "oracle": 4}
    methods = sorted(set(frontier["method"]), key=lambda m: (order.get(_role(data, m), 1), m))
    rows = []
    for method in methods:
        g = frontier[frontier["method"] == method].set_index("kl_budget")
        row = [Cell(_display(data, method))]
        for k in budgets:
            if k in g.index and bool(g.loc[k, "covered"]):
                r = g.loc[k]
                row.append(Cell(f"{fmt.num(r['gold_reward'])} [{fmt.num(r['ci_low'])}, {fmt.num(r['ci_high'])}]",
                                sort=float(r["gold_reward"])))
            elif k in g.index:
                row.append(Cell(f"below its policies ({fmt.num(g.loc[k, 'gold_reward'])} on the chord)"))
            else:
                row.append(Cell("not reached"))
        rows.append(row)
    return Table(["method"] + [f"KL ≤ {k:g}" for k in budgets], rows,
                 "Gold reward on the test prompts at each KL budget (nats), read on each method's frontier: the mean over "
                 "seeds, with a 95% bootstrap interval over seeds and prompts. 'not reached': some seed's policies never "
                 "reach that KL, and a frontier is never extrapolated. 'below its policies': in some seed every policy of "
                 "the method lies above that KL, so its frontier there is only the chord from the SFT model (a mixture "
                 "every method gets for free); the verdict compares no method there.")


def comparisons_table(data: RunData) -> Table | None:
    comparisons = data.comparisons
    if comparisons is None or comparisons.empty:
        return None
    correction = CORRECTIONS.get(str(comparisons["correction"].iloc[0]), "")
    rows = []
    for _, r in comparisons.sort_values(["method_b", "kl_budget"]).iterrows():
        significant = fmt.finite(r["p_adjusted"]) and r["p_adjusted"] < ALPHA
        rows.append([Cell(f"{r['method_a']} − {r['method_b']}"), Cell(f"{r['kl_budget']:g}", sort=float(r["kl_budget"])),
                     Cell(fmt.signed(r["diff"]), significant, float(r["diff"])),
                     Cell(f"[{fmt.num(r['ci_low'])}, {fmt.num(r['ci_high'])}]"),
                     Cell(fmt.pvalue(r["p"]), sort=float(r["p"])), Cell(fmt.pvalue(r["p_adjusted"]), significant, float(r["p_adjusted"])),
                     Cell(str(int(r["n_seeds"])))])
    return Table(["comparison", "KL budget", "difference", "95% interval", "p", f"p ({correction})", "seeds"], rows,
                 f"Paired differences of test gold reward at each budget; p adjusted by {correction} across every row; "
                 f"bold: adjusted p < {ALPHA}.")
