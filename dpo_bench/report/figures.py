"""Figures as PNG bytes. Each function returns None when its data is absent, so the report
skips that figure cleanly.

Readable in print: axes name their units, the palette is Okabe-Ito (colour-blind safe) and each
method also has its own marker shape, so the figures survive greyscale printing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..files import atomic_path  # noqa: E402
from .load import CURVES_X, GOLD, REFERENCE_METHOD, RewardScale, RunData, policy_rows  # noqa: E402
from .plotting import (  # noqa: E402
    FAIL_COLOUR, FAMILY_COLOURS, FAMILY_NAMES, LINESTYLES, OKABE_ITO, PASS_COLOUR, Palette, add_legend, asymmetric_errors, label,
    render_png, role_of, shaded,
)
from .results import CELL  # noqa: E402

def frontier(data: RunData, checkpoints: pd.DataFrame, palette: Palette) -> bytes | None:
    """Reward against KL (DPO paper, Figure 2 left): each method's frontier at the KL budgets, with
    its interval, over the seed-mean checkpoints of each strength.

    One colour per method family (RLHF, DPO family, oracle, inference-time, baseline); within a
    family the methods differ by marker and line style; a method's strengths are shades of its
    colour (darker: stronger regularisation toward the reference); checkpoints of one strength are
    joined by a thin line; the budgets are vertical guides.
    """
    m = data.reward.metric
    opt = data.metrics[data.metrics["method"] == "optimum"]
    has_points = not checkpoints.empty and m in checkpoints and "kl" in checkpoints
    envelope = data.frontier if data.frontier is not None and not data.frontier.empty else None
    if not has_points and opt.empty and envelope is None:
        return None

    def draw():
        fig, ax = plt.subplots(figsize=(8.4, 5.4))
        entries = 0
        x_max = math.inf
        if has_points:
            pts = checkpoints.dropna(subset=[m, "kl"])
            means = pts.groupby(["method", "beta", "step"], dropna=False)[[m, "kl"]].mean().reset_index()
            if len(means):
                x_max = 1.15 * float(np.nanmax(means["kl"])) or math.inf
            for method, g in means.groupby("method", sort=True):
                if method == REFERENCE_METHOD:
                    ax.plot(g["kl"], g[m], ls="none", marker="*", ms=13, color="#000000", zorder=4, label="SFT (reference)")
                    entries += 1
                    continue
                colour = FAMILY_COLOURS.get(role_of(data, method), "#777777")
                betas = sorted(set(g["beta"].dropna())) or [float("nan")]
                stronger_high = (data.run.get("methods") or {}).get(method, {}).get("strength") not in ("n", "alpha")
                for i, (beta, b) in enumerate(g.groupby("beta", dropna=False, sort=True)):
                    rank = i / max(len(betas) - 1, 1)
                    shade = shaded(colour, 0.6 * (1 - rank if stronger_high else rank))
                    b = b.sort_values("step")
                    ax.plot(b["kl"], b[m], color=shade, lw=0.8, marker=palette.marker(method), ms=3.5, alpha=0.8, zorder=2)
        if not opt.empty:
            o = opt.pivot_table(index="beta", columns="metric", values="value", aggfunc="mean")
            if {m, "kl"} <= set(o.columns):
                o = o.dropna(subset=[m, "kl"]).sort_values("kl")
                if math.isfinite(x_max):
                    o = o[o["kl"] <= x_max]
                ax.plot(o["kl"], o[m], color="#000000", lw=1.6, zorder=1, label="exact optimum π* (reward–KL frontier)")
                entries += 1
        if envelope is not None:
            for k in sorted(set(envelope["kl_budget"])):
                ax.axvline(k, color="#999999", lw=0.7, ls=":", zorder=0)
            families: dict[str, list[str]] = {}
            for method in sorted(set(envelope["method"])):
                families.setdefault(role_of(data, method), []).append(method)
            for method, g in envelope.groupby("method", sort=True):
                # budgets below a method's policies (the chord from the reference alone) are not its frontier
                g = g[g["covered"].astype(bool)] if "covered" in g else g
                if g.empty:
                    continue
                g = g.sort_values("kl_budget")
                role = role_of(data, method)
                colour = FAMILY_COLOURS.get(role, "#777777")
                style = LINESTYLES[families[role].index(method) % len(LINESTYLES)]
                ax.plot(g["kl_budget"], g["gold_reward"], color=colour, lw=2.2, ls=style, marker=palette.marker(method), ms=7,
                        mec="#000000", mew=0.6, zorder=3, label=label(f"{method} ({FAMILY_NAMES.get(role, role)})"))
                ax.fill_between(g["kl_budget"], g["ci_low"], g["ci_high"], color=colour, alpha=0.12, lw=0, zorder=1)
                entries += 1
            x_max = max(x_max if math.isfinite(x_max) else 0.0, 1.05 * float(envelope["kl_budget"].max()))
        if math.isfinite(x_max) and x_max > 0:
            ax.set_xlim(-0.02 * x_max, x_max)
        ax.set_xlabel("KL(π ‖ π_ref) [nats per sequence]; dotted: the KL budgets")
        ax.set_ylabel(f"{data.reward.name} (test prompts)")
        ax.set_title("Reward–KL frontier: thick lines read each method's frontier at the budgets (band: 95% interval);\n"
                     "thin lines join a strength's checkpoints (seed means; lighter: weaker regularisation)", fontsize=9)
        ax.grid(alpha=0.3)
        add_legend(ax, entries)
        return fig

    return render_png(draw)


def win_rates(final: pd.DataFrame, palette: Palette, reward: RewardScale = GOLD) -> bytes | None:
    """Final win rate of every cell against the SFT model's completions, with 95% CIs."""
    if final.empty or final["win_rate"].isna().all():
        return None
    f = final.dropna(subset=["win_rate"]).reset_index(drop=True)

    def draw():
        fig, ax = plt.subplots(figsize=(7.5, min(0.3 * len(f) + 1.4, 16)))
        y = np.arange(len(f))
        for method, g in f.groupby("method", sort=False):
            ax.errorbar(g["win_rate"], y[g.index],
                        xerr=asymmetric_errors(g["win_rate"], g["win_rate_ci_low"], g["win_rate_ci_high"]),
                        ls="none", marker=palette.marker(method), color=palette.colour(method),
                        ms=6, capsize=3, label=label(method))
        ax.axvline(0.5, color="#555555", ls="--", lw=1, label="0.5 (no better than SFT)")
        ax.set_yticks(y, [label(s, 48) for s in f["label"]], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        judge = "gold-reward judge" if reward.is_gold else f"judge: {reward.judge}"
        ax.set_xlabel(f"win rate against the SFT completion ({judge}, ties ½), 95% CI")
        ax.grid(axis="x", alpha=0.3)
        add_legend(ax, f["method"].nunique() + 1)
        return fig

    return render_png(draw)


_UNITS = {"train/kl": "nats", "train/loss": "loss", "train/accuracy": "share",
          "train/reward": "reward", "train/proxy_reward": "proxy reward",
          "train/gold_reward": "gold reward", "train/judge_reward": "judge reward"}


def curve_x(data: RunData, rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``rows`` (train/ metrics) with an ``x`` column on the run's curves axis (:data:`CURVES_X`): the
    cell's compute/ metric logged at the same step; and the axis label. A run that recorded no
    compute (an older run) is drawn against the trainers' own steps, and the label says so."""
    metric, name = CURVES_X[data.curves_x]
    compute = policy_rows(data.metrics)
    compute = compute.loc[compute["metric"] == metric, CELL + ["step", "value"]].rename(columns={"value": "x"})
    if compute.empty:
        return rows.assign(x=rows["step"]), f"training step (this run recorded no compute: no {name})"
    compute = compute.drop_duplicates(subset=CELL + ["step"], keep="last")
    merged = rows.merge(compute, on=CELL + ["step"], how="inner")
    return merged, name


def training_curves(data: RunData, palette: Palette) -> bytes | None:
    """One panel per train/ metric, one line per cell, against the run's curves axis
    (``[report] curves_x``: optimiser steps, samples generated, tokens trained on or wall seconds)."""
    rows = policy_rows(data.metrics)
    rows = rows[rows["metric"].str.startswith("train/")]
    if rows.empty:
        return None
    rows, x_label = curve_x(data, rows)
    if rows.empty:
        return None
    names = sorted(rows["metric"].unique())

    def draw():
        ncols = min(3, len(names))
        nrows = math.ceil(len(names) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows + 0.4),
                                 squeeze=False)
        handles: dict[str, object] = {}
        for ax, name in zip(axes.flat, names):
            sub = rows[rows["metric"] == name]
            for (method, beta, _seed), g in sub.groupby(CELL, dropna=False, sort=True):
                g = g.sort_values("step")
                # seeds of one setting share a style, so the legend names settings
                key = label(data.config_label(method, beta))
                (line,) = ax.plot(g["x"], g["value"], color=palette.colour(method),
                                  ls=palette.linestyle(method, beta), lw=1.2,
                                  marker=palette.marker(method), markevery=max(1, len(g) // 6),
                                  ms=4)
                handles.setdefault(key, line)
            ax.set_title(label(name), fontsize=9)
            ax.set_xlabel(x_label)
            ax.set_ylabel(_UNITS.get(name, label(name.removeprefix("train/"))))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper left",
                   bbox_to_anchor=(1.0, 0.98), fontsize=8, frameon=False,
                   ncol=1 + (len(handles) - 1) // 24)
        fig.tight_layout()
        return fig

    return render_png(draw)


def win_rate_temperature(data: RunData, palette: Palette) -> bytes | None:
    """Final win rate against sampling temperature, when the run swept temperatures."""
    rows = policy_rows(data.metrics)
    rows = rows[(rows["metric"] == "win_rate") & rows["temperature"].notna()]
    if rows.empty or np.isclose(rows["temperature"], 1.0).all():
        return None
    last = rows.groupby(CELL, dropna=False)["step"].transform("max")
    rows = rows[rows["step"] == last]

    def draw():
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        labelled: set[str] = set()
        for (method, beta, _seed), g in rows.groupby(CELL, dropna=False, sort=True):
            g = g.sort_values("temperature")
            key = label(data.config_label(method, beta))
            ax.errorbar(g["temperature"], g["value"],
                        yerr=asymmetric_errors(g["value"], g["ci_low"], g["ci_high"]),
                        color=palette.colour(method), marker=palette.marker(method),
                        ls=palette.linestyle(method, beta), ms=5, capsize=2, lw=1.1,
                        label=None if key in labelled else key)
            labelled.add(key)
        n = len(labelled)
        ax.axhline(0.5, color="#555555", ls="--", lw=1)
        ax.set_xlabel("sampling temperature")
        ax.set_ylabel("win rate against SFT (95% CI)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        add_legend(ax, n)
        return fig

    return render_png(draw)


def head_to_head(data: RunData) -> bytes | None:
    """Heatmap of final head-to-head win rates: row policy against column policy."""
    rows = policy_rows(data.metrics)
    rows = rows[rows["metric"].str.startswith("h2h/")]
    if rows.empty:
        return None
    last = rows.groupby(CELL, dropna=False)["step"].transform("max")
    rows = rows[rows["step"] == last]
    multi = data.multi_seed
    rows = rows.assign(
        row=[data.cell_label(m, b, s, multi)
             for m, b, s in zip(rows["method"], rows["beta"], rows["seed"])],
        col=rows["metric"].str.slice(4))
    mat = rows.pivot_table(index="row", columns="col", values="value", aggfunc="first")

    def draw():
        nr, nc = mat.shape
        fig, ax = plt.subplots(figsize=(min(3.0 + 0.6 * nc, 16), min(1.8 + 0.45 * nr, 16)))
        im = ax.imshow(mat.to_numpy(dtype=float), cmap="cividis", vmin=0, vmax=1,
                       aspect="auto")
        ax.set_xticks(range(nc), [label(c, 30) for c in mat.columns], rotation=45, ha="right",
                      fontsize=8)
        ax.set_yticks(range(nr), [label(r, 30) for r in mat.index], fontsize=8)
        if nr * nc <= 225:
            for i in range(nr):
                for j in range(nc):
                    v = mat.iat[i, j]
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="#000000" if v > 0.55 else "#FFFFFF")
        ax.set_xlabel("opponent")
        ax.set_ylabel("policy")
        fig.colorbar(im, ax=ax, label="win rate of row against column")
        return fig

    return render_png(draw)


def rm_calibration(data: RunData) -> bytes | None:
    """Reliability diagram of the reward model's preference probabilities."""
    rows = data.metrics[(data.metrics["method"] == "reward_model")
                        & (data.metrics["metric"] == "rm_calibration")]
    rows = rows.dropna(subset=["value", "temperature"]).sort_values("temperature")
    if rows.empty:
        return None

    def draw():
        fig, ax = plt.subplots(figsize=(5.0, 5.0))
        ax.plot([0, 1], [0, 1], color="#555555", ls="--", lw=1, label="perfect calibration")
        ax.errorbar(rows["temperature"], rows["value"],
                    yerr=asymmetric_errors(rows["value"], rows["ci_low"], rows["ci_high"]),
                    color=OKABE_ITO[3], marker="o", capsize=3, lw=1.2, label="reward model")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("mean predicted P(chosen wins) in bin")
        ax.set_ylabel("empirical P(chosen wins), 95% CI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        return fig

    return render_png(draw)


def invariance(data: RunData) -> bytes | None:
    """Each check's |value| / tolerance on a log scale: left of 1 passes. Marker shape says
    whether the negative control was detected. Checks only: findings have no tolerance."""
    inv = data.checks
    if inv is None or inv.empty:
        return None
    inv = inv.reset_index(drop=True)

    def draw():
        fig, ax = plt.subplots(figsize=(7.5, min(0.32 * len(inv) + 1.4, 16)))
        value = pd.to_numeric(inv.get("value"), errors="coerce").to_numpy(dtype=float)
        tol = pd.to_numeric(inv.get("tolerance"), errors="coerce").to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.abs(value) / tol
        ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.nan)
        floor = np.nanmin(ratio) / 10 if np.isfinite(ratio).any() else 1e-3
        ratio = np.where(np.isnan(ratio), max(min(floor, 1e-3), 1e-300), ratio)
        passed = inv.get("passed", pd.Series(False, index=inv.index)).fillna(False).astype(bool)
        detected = inv.get("negative_control_detected",
                           pd.Series(False, index=inv.index)).fillna(False).astype(bool)
        y = np.arange(len(inv))
        for ok in (True, False):
            for det in (True, False):
                m = ((passed == ok) & (detected == det)).to_numpy()
                if m.any():
                    ax.scatter(ratio[m], y[m], color=PASS_COLOUR if ok else FAIL_COLOUR,
                               marker="o" if det else "X", s=55, zorder=3,
                               label=f"{'pass' if ok else 'fail'}, negative control "
                                     f"{'detected' if det else 'NOT detected'}")
        ax.axvline(1.0, color="#555555", ls="--", lw=1, label="tolerance")
        names = [label(f"{c}: {q}", 48) for c, q in zip(inv.get("check", [""] * len(inv)),
                                                        inv.get("quantity", [""] * len(inv)))]
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("|value| / tolerance (log scale; below 1 passes)")
        ax.grid(axis="x", alpha=0.3)
        add_legend(ax, 5)
        return fig

    return render_png(draw)


def overoptimisation(data: RunData, palette: Palette) -> bytes | None:
    """Gao et al. 2022: along each PPO run against the learned reward, the proxy reward it climbs
    and the gold reward it earns. Where the curves part, it over-optimises."""
    rows = policy_rows(data.metrics)
    rows = rows[rows["metric"].isin(["train/reward", "train/gold_reward"])]
    if rows.empty:
        return None
    runs = []
    for (method, beta, seed), g in rows.groupby(CELL, dropna=False, sort=True):
        wide = g.pivot_table(index="step", columns="metric", values="value")
        if {"train/reward", "train/gold_reward"} <= set(wide.columns) and method != "ppo_gt":
            runs.append((method, beta, wide.sort_index()))
    if not runs:
        return None

    def draw():
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
        for method, beta, wide in runs:
            name = label(data.config_label(method, beta))
            # Rollout batches are small: a running mean shows the trend, change since the start shares an axis.
            window = max(1, len(wide) // 8)
            for ax, metric in zip(axes, ("train/reward", "train/gold_reward")):
                y = wide[metric].rolling(window, min_periods=1).mean().to_numpy()
                ax.plot(wide.index, y - y[0], color=palette.colour(method), ls=palette.linestyle(method, beta),
                        marker=palette.marker(method), markevery=max(1, len(y) // 6), ms=4, lw=1.2, label=name)
        axes[0].set_title("learned (proxy) reward of the rollouts")
        axes[1].set_title("gold reward of the same rollouts")
        for ax in axes:
            ax.set_xlabel("PPO iteration")
            ax.set_ylabel("change since the first iteration (running mean)")
            ax.grid(alpha=0.3)
        add_legend(axes[1], len(runs))
        return fig

    return render_png(draw)


def reward_against_sqrt_kl(data: RunData, checkpoints: pd.DataFrame, palette: Palette) -> bytes | None:
    """Gao et al. 2022's over-optimisation picture: the gold reward (left) and the proxy reward r̂ the
    policies optimise (right, the learned reward model normalised on SFT samples) against √KL, for
    best-of-N over its N and for PPO against the learned reward over its checkpoints (a line per
    kl_coef). Seed means; every line starts at the SFT model (KL 0). Where the gold reward turns
    down while the proxy still climbs, the policy is over-optimising the reward model."""
    m = data.reward.metric
    if checkpoints.empty or not {m, "proxy_reward", "kl"} <= set(checkpoints.columns):
        return None
    roles = checkpoints["method"].map(lambda method: role_of(data, method))
    picked = checkpoints[roles.isin(["inference", "rlhf"])].dropna(subset=[m, "proxy_reward", "kl"])
    reference = checkpoints[checkpoints["method"] == REFERENCE_METHOD][[m, "proxy_reward"]].mean()
    if picked.empty or reference.isna().any():
        return None
    means = picked.groupby(["method", "beta", "step"])[[m, "proxy_reward", "kl"]].mean().reset_index()
    means["sqrt_kl"] = np.sqrt(means["kl"].clip(lower=0.0))

    def draw():
        fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), sharex=True)
        entries = 0
        for method, g in means.groupby("method", sort=True):
            role = role_of(data, method)
            colour = FAMILY_COLOURS.get(role, "#777777")
            if role == "inference":  # one line over N: best-of-1 is the SFT model
                lines = [(label(method), g.sort_values("beta"), colour, "--")]
            else:  # one line per kl_coef over its checkpoints; darker: a larger kl_coef
                betas = sorted(set(g["beta"]))
                lines = [(label(data.config_label(method, beta)), b.sort_values("step"),
                          shaded(colour, 0.6 * (1 - i / (len(betas) - 1) if len(betas) > 1 else 0.0)), "-")
                         for i, (beta, b) in enumerate(g.groupby("beta", sort=True))]
            for name, line, shade, style in lines:
                for ax, metric in zip(axes, (m, "proxy_reward")):
                    x = np.concatenate([[0.0], line["sqrt_kl"].to_numpy()])
                    y = np.concatenate([[reference[metric]], line[metric].to_numpy()])
                    ax.plot(x, y, color=shade, ls=style, lw=1.6, marker=palette.marker(method), ms=5,
                            label=name if ax is axes[1] else None)
                if role == "inference":
                    for _, r in line.iterrows():
                        axes[0].annotate(f"N={r['beta']:g}", (r["sqrt_kl"], r[m]), textcoords="offset points",
                                         xytext=(4, -10), fontsize=7, color=shade)
                entries += 1
        for ax, metric in zip(axes, (m, "proxy_reward")):
            ax.plot([0.0], [reference[metric]], ls="none", marker="*", ms=13, color="#000000", zorder=4,
                    label="SFT (reference)" if ax is axes[1] else None)
            ax.set_xlabel("√KL(π ‖ π_ref) [√nats]")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"{data.reward.name} (test prompts)")
        axes[0].set_title(f"{data.reward.name[:1].upper()}{data.reward.name[1:]}: what the policy earns", fontsize=9)
        axes[1].set_ylabel("proxy reward r̂ (normalised on SFT samples)")
        axes[1].set_title("Proxy reward: what best-of-N ranks by and PPO optimises", fontsize=9)
        add_legend(axes[1], entries + 1)
        return fig

    return render_png(draw)


def all_figures(data: RunData, final: pd.DataFrame,
                checkpoints: pd.DataFrame) -> dict[str, bytes]:
    """Render every figure whose data exists: name (file stem) -> PNG bytes."""
    palette = Palette(data.metrics)
    rendered = {
        "frontier": frontier(data, checkpoints, palette),
        "reward_vs_sqrt_kl": reward_against_sqrt_kl(data, checkpoints, palette),
        "win_rates": win_rates(final, palette, data.reward),
        "training_curves": training_curves(data, palette),
        "win_rate_temperature": win_rate_temperature(data, palette),
        "h2h": head_to_head(data),
        "rm_calibration": rm_calibration(data),
        "overoptimisation": overoptimisation(data, palette),
        "invariance": invariance(data),
    }
    return {k: v for k, v in rendered.items() if v is not None}


def figures_key(data: RunData) -> str:
    """Hash of everything the figures are drawn from: the metrics (not the run id), the invariance
    checks, the run's methods and config, this package's source and matplotlib's version."""
    h = hashlib.sha256(matplotlib.__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    for frame in (data.metrics.drop(columns=["run_id"], errors="ignore"), data.invariance, data.frontier):
        if frame is not None:
            h.update(",".join(map(str, frame.columns)).encode())
            h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    h.update(json.dumps([data.run.get("methods"), data.run.get("config"), data.curves_x], sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cached_figures(data: RunData, render: Callable[[], dict[str, bytes]]) -> dict[str, bytes]:
    """``render()``, or the same PNGs from the run's stage cache (``run.json``'s ``cache_dir``) when a
    run drew them from identical data before: a cached re-run then skips matplotlib (3-4 s)."""
    cache = data.run.get("cache_dir")
    if not cache:
        return render()
    folder = Path(cache) / "figures" / figures_key(data)
    if (folder / "_complete.json").is_file():
        return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.png"))}
    figures = render()
    try:
        with atomic_path(folder, directory=True) as tmp:
            for name, png in figures.items():
                (tmp / f"{name}.png").write_bytes(png)
            (tmp / "_complete.json").write_text(json.dumps(sorted(figures)))
    except OSError:  # an unwritable or shared cache only costs the next run the drawing
        pass
    return figures


FIGURE_NAMES = ("frontier", "reward_vs_sqrt_kl", "win_rates", "training_curves", "win_rate_temperature", "h2h",
                "rm_calibration", "overoptimisation", "invariance")
