"""Reports: markdown + self-contained HTML + figures, built from a run directory's files only,
so ``dpo-bench report RUN_DIR`` can rebuild a report without retraining.

    from dpo_bench.report import build_report
    paths = build_report("reports/<run_id>")   # {"markdown": ..., "html": ..., "frontier": ...}
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from . import html as html_writer
from . import markdown as md_writer
from .document import SECTION_TITLES, build_document
from .figures import FIGURE_NAMES, all_figures, cached_figures
from ..files import atomic_write
from .load import RunData, load_run
from .results import checkpoint_results, config_results, final_results

__all__ = ["build_report", "load_run", "RunData", "SECTION_TITLES", "FIGURE_NAMES"]


def build_report(run_dir: str | os.PathLike[str], curves_x: str | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``run_dir``.

    ``curves_x``: the training curves' x-axis ("steps", "samples", "tokens" or "seconds"; default:
    the run's ``[report] curves_x``).

    Returns the written paths: ``"markdown"``, ``"html"`` and one entry per figure, keyed by its
    file stem (``"frontier"``, ``"win_rates"``, ...). Figures whose data is absent are skipped,
    and a stale figure of that name from an earlier build is removed so the directory matches
    the report.
    """
    data = replace(load_run(run_dir), curves_x_override=curves_x)
    final = final_results(data)
    configs = config_results(final) if not final.empty else final
    figures = cached_figures(data, lambda: all_figures(data, final, checkpoint_results(data)))
    doc = build_document(data, final, configs, figures)

    fig_dir = data.run_dir / "figures"
    paths: dict[str, Path] = {}
    for name, png in figures.items():
        paths[name] = atomic_write(fig_dir / f"{name}.png", png)
    for name in FIGURE_NAMES:
        stale = fig_dir / f"{name}.png"
        if name not in figures and stale.is_file():
            stale.unlink()
    paths["markdown"] = atomic_write(data.run_dir / "report.md", md_writer.render(doc))
    paths["html"] = atomic_write(data.run_dir / "report.html", html_writer.render(doc, figures))
    return paths
