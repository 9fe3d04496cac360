"""Report tests on synthetic run directories: files, sections, self-contained and well-formed
HTML, escaping of hostile strings, the headline's numbers, optional inputs, size."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dpo_bench.report import SECTION_TITLES, build_report
from dpo_bench.files import atomic_write
from dpo_bench.report.results import welch

# markup, quotes, entities, non-ASCII, mathtext ($) for matplotlib, a table pipe and a newline
HOSTILE = "<script>alert(1)</script> \"double\" 'single' & naïve — 日本語 $\\frac$ | pipe\nsecond line"
LONG = "w" * 5000
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
BASE_METHODS = {"dpo": (0.9, 2.0), "ipo": (0.7, 1.5), "ppo": (0.8, 3.0)}
STEPS = (100, 200, 300)


def _row(run_id, method, beta, seed, step, temperature, metric, value, stderr=np.nan,
         lo=np.nan, hi=np.nan, n=256):
    return dict(run_id=run_id, task="sentiment", method=method, beta=beta, seed=seed, step=step,
                temperature=temperature, metric=metric, value=value, stderr=stderr, ci_low=lo,
                ci_high=hi, n=n)


def _eval_rows(run_id, method, beta, seed, step, gold, kl, fluency, rng):
    wr = float(np.clip(0.5 + gold / 2, 0.01, 0.99))
    half = 1.96 * math.sqrt(wr * (1 - wr) / 256)
    return [
        _row(run_id, method, beta, seed, step, 1.0, "gold_reward", gold, 0.02),
        _row(run_id, method, beta, seed, step, 1.0, "kl", kl, 0.05 * kl if kl else 0.0),
        _row(run_id, method, beta, seed, step, 1.0, "win_rate", wr, np.nan, wr - half, wr + half),
        _row(run_id, method, beta, seed, step, 1.0, "fluency", fluency, 0.015),
        _row(run_id, method, beta, seed, step, 1.0, "proxy_reward", gold + rng.normal(0, 0.1), 0.03),
        _row(run_id, method, beta, seed, step, 1.0, "length", 12 + rng.normal(0, 1)),
    ]


def make_run(root: Path, *, hostile: bool = False, samples: bool = True,
             invariance: bool = True, seeds=(0,), methods=None, rng_seed: int = 0) -> Path:
    """A plausible run directory: sft + methods x 2 betas x 3 checkpoints and the rest."""
    rng = np.random.default_rng(rng_seed)
    run_id = f"run-{HOSTILE}-{LONG}" if hostile else "run-2026-11-24"
    methods = dict(methods or BASE_METHODS)
    if hostile:
        methods[f"ipo{HOSTILE}"] = methods.pop("ipo")
    run_dir = root / "run"
    run_dir.mkdir()
    rows = _eval_rows(run_id, "sft", np.nan, 0, 0, 0.0, 0.0, 0.96, rng)
    finals = []
    for method, (scale, kl_scale) in methods.items():
        for beta in (0.1, 0.5):
            for seed in seeds:
                for step in STEPS:
                    frac = step / STEPS[-1]
                    kl = kl_scale * frac / beta ** 0.5
                    gold = scale * (1 - math.exp(-kl / 3)) + rng.normal(0, 0.05)
                    fluency = 0.95 - (0.5 if beta == 0.1 and method == "dpo" else 0.02) * frac
                    rows += _eval_rows(run_id, method, beta, seed, step, gold, kl, fluency, rng)
                finals.append((method, beta, seed))
                for step in range(0, STEPS[-1] + 1, 20):
                    for metric, value in (("train/loss", 0.69 * math.exp(-step / 150)),
                                          ("train/kl", kl_scale * step / 300),
                                          ("train/reward", scale * step / 300)):
                        rows.append(_row(run_id, method, beta, seed, step, np.nan, metric,
                                         value + rng.normal(0, 0.01), n=64))
                for t in (0.7, 1.3):
                    wr = float(np.clip(0.6 - 0.1 * (t - 1) + rng.normal(0, 0.02), 0, 1))
                    rows.append(_row(run_id, method, beta, seed, STEPS[-1], t, "win_rate", wr,
                                     np.nan, wr - 0.05, wr + 0.05))
    for method, beta, seed in finals:
        for other, obeta, oseed in finals[:4]:
            rows.append(_row(run_id, method, beta, seed, STEPS[-1], 1.0,
                             f"h2h/{other} (β={obeta:g})", rng.uniform(0.3, 0.7), np.nan,
                             0.25, 0.75))
    rows += [_row(run_id, "reward_model", np.nan, 0, 300, np.nan, "rm_accuracy", 0.84, 0.01, n=800),
             _row(run_id, "reward_model", np.nan, 0, 300, np.nan, "rm_bayes_ceiling", 0.88, n=800),
             _row(run_id, "reward_model", np.nan, 0, 300, np.nan, "rm_train_accuracy", 0.91, n=3000)]
    for b in range(10):
        p = (b + 0.5) / 10
        rows.append(_row(run_id, "reward_model", np.nan, 0, b, p, "rm_calibration",
                         p + rng.normal(0, 0.03), np.nan, p - 0.08, p + 0.08, n=80))
    for beta in np.geomspace(0.05, 5, 15):
        kl = 3 / beta
        rows += [_row(run_id, "optimum", beta, 0, 0, 1.0, "gold_reward", 1 - math.exp(-kl / 2), 0.0),
                 _row(run_id, "optimum", beta, 0, 0, 1.0, "kl", kl, 0.0)]
    pd.DataFrame(rows).to_parquet(run_dir / "metrics.parquet")

    if samples:
        srows = []
        prompts = [f"{HOSTILE} prompt {i} {LONG if i == 0 else ''}" if hostile
                   else f"the movie was {i}" for i in range(7)]
        cells = [("sft", np.nan, 0)] + finals
        for method, beta, seed in cells:
            for prompt in prompts:
                completion = f"{'great ' * 3}!!! {HOSTILE if hostile else ''}"
                srows.append(dict(method=method, beta=beta, seed=seed, prompt=prompt,
                                  completion=completion, gold_reward=rng.uniform(-1, 1),
                                  proxy_reward=np.nan if method == "sft" else rng.normal(),
                                  policy_logp=-10.0, ref_logp=-12.0,
                                  fluent=bool(rng.uniform() > 0.3)))
        pd.DataFrame(srows).to_parquet(run_dir / "samples.parquet")

    if invariance:
        pd.DataFrame([
            dict(check="reward_shift_fx", quantity="max |Δ loss|", value=1e-9, tolerance=1e-6,
                 passed=True, negative_control_detected=True),
            dict(check="optimal_policy_class", quantity="max |Δ π*|", value=2e-8, tolerance=1e-6,
                 passed=True, negative_control_detected=True),
            dict(check=f"plackett_luce_k2{HOSTILE if hostile else ''}", quantity="|PL − BT|",
                 value=3e-3, tolerance=1e-6, passed=False, negative_control_detected=False),
        ]).assign(kind="check", step=np.nan, control_value=1.0).pipe(lambda checks: pd.concat([checks, pd.DataFrame([
            dict(kind="finding", check="bandit_convergence_curve[dpo]", quantity=q, step=step, value=v)
            for step in (25, 50) for q, v in (("TV(π, π*(r̂))", 0.1 / step), ("KL(π‖π*(r̂))", 0.01 / step))
        ])], ignore_index=True)).to_parquet(run_dir / "invariance.parquet")

    run = {
        "run_id": run_id, "task": "sentiment", "preset": "quick", "seed": 0, "status": "ok",
        "started_at": "2026-11-24T00:00:00Z", "finished_at": "2026-11-24T00:02:00Z",
        "config": {"dpo": {"beta": [0.1, 0.5], "lr": 5e-5},
                   "data": {"note": HOSTILE if hostile else "plain", "long": LONG if hostile else ""}},
        "fingerprints": {"preferences": "ab" * 32},
        "versions": {"python": "3.11", "torch": "2.4"},
        "device": "cpu",
        "timings": {"sft": 55.0, "dpo": 70.2, "ppo": 61.0},
        "methods": {"dpo": {"description": "direct preference optimisation", "strength": "beta"},
                    "ppo": {"description": "PPO against the reward model", "strength": "kl_coef"}},
        "notes": ["quick preset", HOSTILE if hostile else "no note"],
    }
    (run_dir / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return run_dir


class BalanceChecker(HTMLParser):
    """Fails on a close tag that does not match the innermost open non-void element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.img_src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.img_src.append(dict(attrs).get("src") or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _sections(md: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _md_tables(md: str) -> list[list[str]]:
    tables, current = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("hostile"), hostile=True)
    paths = build_report(run_dir)
    return run_dir, paths


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("plain"))
    paths = build_report(run_dir)
    return run_dir, paths


def test_every_file_is_written(plain_run):
    run_dir, paths = plain_run
    expected = {"markdown", "html", "frontier", "win_rates", "training_curves",
                "win_rate_temperature", "h2h", "rm_calibration", "invariance"}
    assert set(paths) == expected
    assert paths["markdown"] == run_dir / "report.md"
    assert paths["html"] == run_dir / "report.html"
    for name in expected - {"markdown", "html"}:
        png = run_dir / "figures" / f"{name}.png"
        assert paths[name] == png
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"


def test_sections_in_markdown_and_html(plain_run):
    run_dir, _ = plain_run
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for title in SECTION_TITLES:
        assert f"\n## {title}\n" in md
        assert f"<h2>{title}</h2>" in page


def test_html_is_self_contained_and_well_formed(hostile_run):
    run_dir, _ = hostile_run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in page
    assert 'src="http' not in page and "<link" not in page and "@import" not in page
    assert "url(" not in page
    checker = BalanceChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.stack == []
    assert len(checker.img_src) >= 7
    assert all(s.startswith("data:image/png;base64,") for s in checker.img_src)
    assert "overflow-wrap: anywhere" in page


def test_hostile_strings_are_escaped(hostile_run):
    run_dir, _ = hostile_run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "<script>alert" not in page
    assert page.count("<script") == 1  # only the inline table sorter
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;double&quot;" in page and "&#x27;single&#x27;" in page
    assert "naïve — 日本語" in page and "naïve — 日本語" in md
    assert LONG in page  # the long line is shown, and wraps through CSS
    # fenced code (the config block) is shown verbatim by every markdown renderer; outside it,
    # nothing may reach a renderer as raw HTML
    fenced = re.findall(r"^(`{3,})json\n(.*?)\n\1$", md, flags=re.M | re.S)
    assert fenced and "<script>alert(1)</script>" in fenced[0][1]
    outside = re.sub(r"^(`{3,})json\n.*?\n\1$", "", md, flags=re.M | re.S)
    assert "<script>alert" not in outside
    for table in _md_tables(md):
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
        assert len(counts) == 1, f"a markdown table changed its column count: {table[0][:80]}"
    # the hostile method name and prompt reach the tables escaped, not dropped
    assert "ipo&lt;script&gt;" in page
    assert r"\| pipe<br>second line" in md


def test_headline_names_the_best_method(plain_run):
    run_dir, _ = plain_run
    m = pd.read_parquet(run_dir / "metrics.parquet")
    gold = m[(m["metric"] == "gold_reward") & (m["temperature"] == 1.0)
             & ~m["method"].isin(["sft", "reward_model", "optimum"])]
    last = gold.loc[gold.groupby(["method", "beta", "seed"])["step"].idxmax()]
    best = last.loc[last["value"].idxmax()]
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    lines = [ln for ln in _sections(md)["Headline"].splitlines() if ln.startswith("- ")]
    first = lines[0]
    assert first.startswith(f"- {best['method']} (")
    assert f"={best['beta']:g})" in first.split("reaches")[0]
    assert "reaches the highest gold reward" in first
    assert f"{best['value']:.3f}" in first
    text = "\n".join(lines)
    assert "beats the SFT model" in text
    assert "At matched KL" in text
    assert "Bayes ceiling of 0.880" in text
    assert "2 of 3 invariance checks passed" in text
    assert "NOT detected" in text
    # dpo at β=0.1 loses fluency in the synthetic run: the alarm must name it
    alarm = [ln for ln in lines if "Reward-hacking alarm" in ln]
    assert alarm and "dpo (β=0.1)" in alarm[0]
    # one seed per setting: the reader is told the ± leave out seed variation
    assert "Every setting was trained with one seed" in text


def _with_verdict(run_dir: Path, ppo_objective: float) -> Path:
    """The synthetic run with a frontier, the verdict's comparisons (PPO behind DPO at 0.5 nats,
    not separated at 1 nat) and PPO's objective beside best-of-4's (1.0)."""
    pd.DataFrame([
        dict(method=m, kl_budget=k, gold_reward=g, ci_low=g - 0.05, ci_high=g + 0.05, n_seeds=3, kl=k, stderr=0.02, role=r)
        for m, r, points in (("ppo", "rlhf", ((0.5, 0.2), (1.0, 0.4), (2.0, 0.6))), ("dpo", "direct", ((0.5, 0.35), (1.0, 0.45))))
        for k, g in points]).to_parquet(run_dir / "frontier.parquet")
    pd.DataFrame([
        dict(method_a="ppo", method_b="dpo", kl_budget=0.5, diff=-0.15, ci_low=-0.2, ci_high=-0.1, p=0.002, p_adjusted=0.004,
             correction="holm", test="paired t over 3 seeds", n_seeds=3, gold_a=0.2, gold_b=0.35),
        dict(method_a="ppo", method_b="dpo", kl_budget=1.0, diff=-0.05, ci_low=-0.2, ci_high=0.1, p=0.3, p_adjusted=0.3,
             correction="holm", test="paired t over 3 seeds", n_seeds=3),
    ]).to_parquet(run_dir / "comparisons.parquet")
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    extra = [_row(metrics["run_id"].iloc[0], "ppo", 0.1, 0, 300, 1.0, metric, value, 0.01)
             for metric, value in (("objective", ppo_objective), ("objective/sft", 0.2), ("objective/best_of_n (N=4)", 1.0),
                                   ("objective/optimum (pool of 32)", 1.2))]
    pd.concat([metrics, pd.DataFrame(extra)], ignore_index=True).to_parquet(run_dir / "metrics.parquet")
    record = json.loads((run_dir / "run.json").read_text())
    record["seeds"] = [0, 1, 2]
    record["methods"]["ppo"]["role"] = "rlhf"
    (run_dir / "run.json").write_text(json.dumps(record))
    build_report(run_dir)
    return run_dir


@pytest.mark.parametrize("ppo_objective, converged", [(0.8, False), (1.2, True)])
def test_the_headline_opens_with_the_verdict_and_flags_an_unconverged_ppo(tmp_path, ppo_objective, converged):
    run_dir = _with_verdict(make_run(tmp_path), ppo_objective)
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    lines = [ln for ln in _sections(md)["Headline"].splitlines() if ln.startswith("- ")]
    assert lines[0].startswith("- dpo is ahead of RLHF (ppo) at 0.5 nats")
    assert "at 1 nat -0.050 [-0.200, 0.100], Holm p = 0.300" in lines[0]
    assert "at 0.5 nats -0.150 [-0.200, -0.100] (0.200 against 0.350), Holm p = 0.004" in lines[0]
    text = "\n".join(lines)
    assert ("NOT CONVERGED: ppo (kl\\_coef=0.1) in 1 of 1 seeds" in text) is not converged
    assert ("It is at or above best\\_of\\_n (N=4) in 0 of 1 seeds" in text) is not converged
    # how far it got: (0.8 − 0.2)/(1.2 − 0.2) of the way from SFT to the optimum, best-of-4 (1.0 − 0.2)/(1.2 − 0.2)
    assert ("to the optimum (its objective estimated from 32 reference draws a prompt, low on average, so the shares are high), "
            "it covers about seed 0: 60% (the best best-of-N 80%)" in text) is not converged
    assert ("Every RLHF cell (1) scores above every best-of-N" in text) is converged
    # With a verdict the comparisons of final checkpoints (Welch, best on the test prompts) are gone.
    assert "reaches the highest gold reward" not in text and "At matched KL" not in text
    frontier = _sections(md)["Frontier"]
    assert "KL ≤ 2" in frontier and "not reached" in frontier and "p (Holm)" in frontier


def test_budgets_below_a_methods_policies_are_shown_as_the_chord_and_their_absence_explained(tmp_path):
    run_dir = _with_verdict(make_run(tmp_path), 1.2)
    frontier = pd.read_parquet(run_dir / "frontier.parquet")
    # ppo's policies start at 0.8 nats: at 0.5 its frontier is the chord from the SFT model
    frontier["covered"] = ~((frontier["method"] == "ppo") & (frontier["kl_budget"] == 0.5))
    frontier["kl_min"] = np.where(frontier["method"] == "ppo", 0.8, 0.1)
    ipo = dict(method="ipo", kl_budget=0.5, gold_reward=0.3, ci_low=0.25, ci_high=0.35, n_seeds=3, kl=0.5, stderr=0.02,
               role="direct", covered=True, kl_min=0.1)  # reaches 0.5 nats only, where ppo has no policy
    pd.concat([frontier, pd.DataFrame([ipo])], ignore_index=True).to_parquet(run_dir / "frontier.parquet")
    comparisons = pd.read_parquet(run_dir / "comparisons.parquet")
    comparisons[comparisons["kl_budget"] != 0.5].to_parquet(run_dir / "comparisons.parquet")
    build_report(run_dir)
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    first = [ln for ln in _sections(md)["Headline"].splitlines() if ln.startswith("- ")][0]
    assert first.startswith("- The evidence does not separate RLHF (ppo) from dpo")
    assert "Not compared at 0.5 nats: below the policies of the grid (ppo's smallest KL is 0.800 nats)" in first
    assert "below its policies (0.200 on the chord)" in _sections(md)["Frontier"]
    assert "RLHF (ppo) and ipo cover no KL budget together, so they are not compared: ppo's policies cover 1 nat and 2 nats, ipo's 0.5 nats" in md


def test_results_table_marks_the_best(plain_run):
    run_dir, _ = plain_run
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    results = _sections(md)["Results"]
    assert results.count("**") >= 6  # best gold, win rate, fluency
    assert "sft" in results and r"ppo (kl\_coef=0.1)" in results
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert 'class="num best"' in page


def test_samples_show_at_most_five_prompts(plain_run):
    run_dir, _ = plain_run
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    samples = _sections(md)["Samples"]
    assert samples.count("#### Prompt:") == 5
    assert "the movie was 5" not in samples


def test_builds_without_samples_and_invariance(tmp_path):
    run_dir = make_run(tmp_path, samples=False, invariance=False)
    paths = build_report(run_dir)
    assert "invariance" not in paths
    md = paths["markdown"].read_text(encoding="utf-8")
    page = paths["html"].read_text(encoding="utf-8")
    for title in SECTION_TITLES:
        assert f"\n## {title}\n" in md and f"<h2>{title}</h2>" in page
    assert "This run saved no samples." in md
    assert "This run recorded no invariance checks." in md


def test_builds_from_metrics_alone_and_removes_stale_figures(tmp_path):
    run_dir = make_run(tmp_path)
    build_report(run_dir)
    assert (run_dir / "figures" / "invariance.png").exists()
    (run_dir / "samples.parquet").unlink()
    (run_dir / "invariance.parquet").unlink()
    (run_dir / "run.json").unlink()
    paths = build_report(run_dir)
    assert not (run_dir / "figures" / "invariance.png").exists()
    assert "frontier" in paths
    assert "run-2026-11-24" in paths["markdown"].read_text(encoding="utf-8")


def test_forty_cells_with_seeds_stay_small(tmp_path):
    methods = {"dpo": (0.9, 2.0), "ipo": (0.7, 1.5), "ppo": (0.8, 3.0),
               "cdpo": (0.85, 1.8), "slic": (0.6, 1.2), "kto": (0.75, 2.2)}
    run_dir = make_run(tmp_path, seeds=(0, 1, 2), methods=methods)  # 1 + 6*2*3 = 37 cells
    paths = build_report(run_dir)
    size = paths["html"].stat().st_size
    assert size < 5 * 1024 * 1024, f"report.html is {size / 1e6:.1f} MB"
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "#### Seed-aggregated" in md and "mean of 3" in md
    assert "trained with one seed" not in md  # every setting has three: the ± are between-seed errors


def test_welch_matches_scipy():
    m1, s1, n1, m2, s2, n2 = 0.52, 0.03, 200, 0.45, 0.04, 150
    c = welch(m1, s1 / math.sqrt(n1), n1, m2, s2 / math.sqrt(n2), n2)
    ref = stats.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False)
    assert c.t == pytest.approx(ref.statistic)
    assert c.p == pytest.approx(ref.pvalue)
    assert welch(1.0, 0.0, 10, 1.0, 0.0, 10).p == 1.0
    assert welch(1.0, 0.0, 10, 0.9, 0.0, 10).p == 0.0


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "a" / "report.md"
    atomic_write(target, "first")
    atomic_write(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_builds_an_empty_run_directory(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "empty", "status": "failed"}))
    paths = build_report(tmp_path)
    assert set(paths) == {"markdown", "html"}
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "This run recorded no evaluation results." in md
    for title in SECTION_TITLES:
        assert f"\n## {title}\n" in md


def test_figures_come_from_the_stage_cache_when_their_data_is_unchanged(tmp_path, monkeypatch):
    import json as _json

    import dpo_bench.report as report_package

    run_dir = make_run(tmp_path)
    record = _json.loads((run_dir / "run.json").read_text())
    record["cache_dir"] = str(tmp_path / "cache")
    (run_dir / "run.json").write_text(_json.dumps(record))
    first = {k: p.read_bytes() for k, p in build_report(run_dir).items() if k not in ("markdown", "html")}
    assert len(list((tmp_path / "cache" / "figures").glob("*/_complete.json"))) == 1

    # The same data again (another run id, as a cached re-run has): nothing is drawn.
    metrics = pd.read_parquet(run_dir / "metrics.parquet").assign(run_id="another-run")
    metrics.to_parquet(run_dir / "metrics.parquet", index=False)
    monkeypatch.setattr(report_package, "all_figures", lambda *a, **k: pytest.fail("figures were drawn again"))
    again = {k: p.read_bytes() for k, p in build_report(run_dir).items() if k not in ("markdown", "html")}
    assert again == first

    # Different numbers: drawn afresh, under a new key.
    monkeypatch.undo()
    metrics.loc[metrics["metric"] == "gold_reward", "value"] += 0.01
    metrics.to_parquet(run_dir / "metrics.parquet", index=False)
    build_report(run_dir)
    assert len(list((tmp_path / "cache" / "figures").glob("*/_complete.json"))) == 2


def test_the_questions_section_prints_no_markup_characters(tmp_path):
    """Every string is escaped as data, so the section's own prose must carry no markdown: a
    backtick would print as a backtick in both renderers."""
    run_dir = make_run(tmp_path)
    record = json.loads((run_dir / "run.json").read_text())
    record["questions"] = {"pl_listwise": "dpo", "pl_pairwise": "ipo", "freeze_frozen": "dpo", "freeze_base": "ipo"}
    record["code_links"] = {"log-sigmoid DPO loss": "dpo_bench/losses.py:242"}
    (run_dir / "run.json").write_text(json.dumps(record))
    build_report(run_dir)
    section = _sections((run_dir / "report.md").read_text(encoding="utf-8"))["Questions from the reading notes"]
    assert "Plackett-Luce" in section and "dpo\\_bench/losses.py:242" in section
    assert "`" not in section
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    questions = page[page.index("<h2>Questions from the reading notes</h2>"):]
    assert "`" not in questions[:questions.index("<h2>", 10)]


def test_without_best_of_n_no_cell_is_called_converged(tmp_path):
    run_dir = make_run(tmp_path)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    extra = [_row(metrics["run_id"].iloc[0], "ppo", 0.1, 0, 300, 1.0, m, v, 0.01) for m, v in (("objective", 1.0), ("objective/sft", 0.2))]
    pd.concat([metrics, pd.DataFrame(extra)], ignore_index=True).to_parquet(run_dir / "metrics.parquet")
    from dpo_bench.report.load import load_run
    from dpo_bench.report.verdict import objective_findings

    assert objective_findings(load_run(run_dir)) == []


def test_invariance_section_splits_checks_from_findings(plain_run):
    run_dir, _ = plain_run
    section = _sections((run_dir / "report.md").read_text(encoding="utf-8"))["Invariance checks"].replace("\\", "")
    assert "concerns a trained model or a measured quantity" in section
    assert "bandit_convergence_curve[dpo]" in section and "TV(π, π*(r̂))" in section
    # The headline counts checks only: the findings have no verdict.
    assert "2 of 3 invariance checks passed" in (run_dir / "report.md").read_text(encoding="utf-8")


def test_a_dpo_cell_below_best_of_n_is_said_to_be_below_not_unconverged(tmp_path):
    """DPO is held to the reward model's version of its objective: below a best-of-N it is flagged as
    such, with the seeds' count against best-of-4, never as NOT CONVERGED (that is PPO's verdict)."""
    run_dir = make_run(tmp_path)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    run_id = metrics["run_id"].iloc[0]
    extra = [_row(run_id, "dpo", 0.1, 0, 300, 1.0, m, v, 0.01) for m, v in (
        ("objective", 1.0), ("objective/best_of_n (N=4)", 0.9), ("objective/best_of_n (N=16)", 1.2), ("objective_kl_coef", 0.05))]
    pd.concat([metrics, pd.DataFrame(extra)], ignore_index=True).to_parquet(run_dir / "metrics.parquet")
    from dpo_bench.report.load import load_run
    from dpo_bench.report.verdict import objective_findings

    texts = [f.text for f in objective_findings(load_run(run_dir))]
    assert len(texts) == 1 and texts[0].startswith("BELOW BEST-OF-N: dpo"), texts
    assert "best_of_n (N=16)'s 1.200" in texts[0] and "best_of_n (N=4) in 1 of 1 seeds" in texts[0], texts
