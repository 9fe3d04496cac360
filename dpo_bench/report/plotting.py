"""What every figure of the report shares: its size, the Okabe-Ito palette (colour-blind safe)
with one colour per method family and shades for strengths, a marker shape per method (the figures
survive greyscale printing), labels, legends and rendering to PNG bytes."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .load import REFERENCE_METHOD, RunData, policy_rows  # noqa: E402

DPI = 110
# Okabe & Ito (2008); black is kept for the SFT model and the exact optimum.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
PASS_COLOUR, FAIL_COLOUR = "#009E73", "#D55E00"
MAX_LABEL = 40


def label(text: object, limit: int = MAX_LABEL) -> str:
    """Data text made safe for matplotlib: one line, bounded length (a 5,000-character name
    would otherwise blow up a legend and the PNG), and '$' escaped so it is not mathtext."""
    s = " ".join(str(text).split())
    if len(s) > limit:
        # cut the middle: labels differ at their ends ("…(β=0.1), seed 2"), keep both ends
        head = (limit - 1) // 2
        s = s[:head] + "…" + s[len(s) - (limit - 1 - head):]
    return s.replace("$", r"\$")


class Palette:
    """A stable colour, marker and per-strength line style for every method and config."""

    def __init__(self, metrics: pd.DataFrame):
        rows = policy_rows(metrics)
        methods = sorted(set(rows["method"]) - {REFERENCE_METHOD})
        self._style = {m: (OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)])
                       for i, m in enumerate(methods)}
        self._style[REFERENCE_METHOD] = ("#000000", "*")
        self._betas = {m: sorted(set(g["beta"].dropna()))
                       for m, g in rows.groupby("method")}

    def colour(self, method: str) -> str:
        return self._style.get(method, ("#777777", "o"))[0]

    def marker(self, method: str) -> str:
        return self._style.get(method, ("#777777", "o"))[1]

    def linestyle(self, method: str, beta: float):
        betas = self._betas.get(method, [])
        if isinstance(beta, float) and math.isnan(beta) or beta not in betas:
            return "-"
        return LINESTYLES[betas.index(beta) % len(LINESTYLES)]


def render_png(draw: Callable[[], plt.Figure | None]) -> bytes | None:
    # Non-ASCII method names may lack glyphs in the default font; that is cosmetic, not an error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig = draw()
        if fig is None:
            return None
        try:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight",
                        metadata={"Software": None})
            return buf.getvalue()
        finally:
            plt.close(fig)


def add_legend(ax, n_entries: int) -> None:
    if n_entries == 0:
        return
    ncol = 1 + (n_entries - 1) // 18
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=ncol,
              frameon=False, borderaxespad=0.0)


def asymmetric_errors(centre: pd.Series, lo: pd.Series, hi: pd.Series) -> np.ndarray:
    c = centre.to_numpy(dtype=float)
    low = np.nan_to_num(c - lo.to_numpy(dtype=float), nan=0.0).clip(min=0)
    high = np.nan_to_num(hi.to_numpy(dtype=float) - c, nan=0.0).clip(min=0)
    return np.vstack([low, high])


def column_or_nan(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame.columns else pd.Series(np.nan, index=frame.index)


FAMILY_COLOURS = {"rlhf": "#D55E00", "direct": "#0072B2", "oracle": "#555555", "inference": "#CC79A7", "baseline": "#009E73"}
FAMILY_NAMES = {"rlhf": "RLHF", "direct": "DPO family", "oracle": "oracle", "inference": "inference-time", "baseline": "baseline"}


def role_of(data: RunData, method: str) -> str:
    info = (data.run.get("methods") or {}).get(method)
    return str(info.get("role", "direct")) if isinstance(info, dict) else "direct"


def shaded(colour: str, fraction: float) -> tuple[float, float, float]:
    """``colour`` mixed with white: fraction 0 is the colour, 1 is white."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    return tuple(rgb + (1.0 - rgb) * fraction)
