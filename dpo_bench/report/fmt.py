"""Number formatting shared by the markdown and HTML renderers (plain text, unescaped)."""

from __future__ import annotations

import math

import numpy as np

MISSING = "—"


def _finite(x: object) -> bool:
    try:
        return bool(np.isfinite(float(x)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def num(x: object, digits: int = 3) -> str:
    if not _finite(x):
        return MISSING
    v = float(x)  # type: ignore[arg-type]
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def pm(x: object, se: object, digits: int = 3) -> str:
    if not _finite(x):
        return MISSING
    return f"{num(x, digits)} ± {num(se, digits)}" if _finite(se) else num(x, digits)


def ci(x: object, lo: object, hi: object, digits: int = 3) -> str:
    if not _finite(x):
        return MISSING
    if _finite(lo) and _finite(hi):
        return f"{num(x, digits)} [{num(lo, digits)}, {num(hi, digits)}]"
    return num(x, digits)


def signed(x: float, digits: int = 3) -> str:
    return f"+{num(x, digits)}" if _finite(x) and x > 0 else num(x, digits)


def pvalue(p: float) -> str:
    if not _finite(p):
        return "p = n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}"


def count(x: object) -> str:
    """A whole number with thousands separators: 1,234,567."""
    return f"{float(x):,.0f}" if _finite(x) else MISSING  # type: ignore[arg-type]


def seconds(s: object) -> str:
    if not _finite(s):
        return MISSING
    v = float(s)  # type: ignore[arg-type]
    if v < 60:
        return f"{v:.1f} s"
    minutes, sec = divmod(v, 60)
    if minutes < 60:
        return f"{int(minutes)} min {sec:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def finite(x: object) -> bool:
    return _finite(x)


def is_nan(x: object) -> bool:
    return isinstance(x, float) and math.isnan(x)
