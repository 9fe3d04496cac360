"""A frame of rows validated into the standard columns, every problem named by source, row and field."""

from __future__ import annotations

import bisect
import difflib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .errors import DataValidationError, DataValidationErrors, _ABSENT, _Bad
from .rows import FORMATS, _missing_column_error, detect_format

BAD_ROW_POLICIES = ("error", "skip")


def _row_numbers(frame: pd.DataFrame) -> list[int]:
    if pd.api.types.is_integer_dtype(frame.index.dtype):
        return [int(i) for i in frame.index]
    return list(range(len(frame)))


def _dedup_key(values: Mapping[str, Any]) -> str:
    return json.dumps(values, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _build_frame(columns: dict[str, list], index: list[int]) -> pd.DataFrame:
    data = {}
    for name, values in columns.items():
        series = pd.Series(values, dtype=object, index=index)
        if all(isinstance(v, str) for v in values):
            series = series.astype(str)  # the default string dtype (pandas 3: "str")
        data[name] = series
    return pd.DataFrame(data, index=pd.Index(index, dtype="int64"))


# A folder of shards: (shard name, index of its first row in the whole dataset), in row order.
_Shards = Sequence[tuple[str, int]]


def _locate(shards: _Shards, source: str, index: int) -> tuple[str, int]:
    """(file, row in that file) of the whole dataset's row ``index``."""
    if not shards:
        return source, index
    name, start = shards[bisect.bisect_right([s for _, s in shards], index) - 1]
    return name, index - start


def _row_error(shards: _Shards, source: str, index: int, field: str | None, problem: str) -> DataValidationError:
    name, row = _locate(shards, source, index)
    return DataValidationError(name, row, field, problem, index=index)


def _validate(
    frame: pd.DataFrame,
    source: str,
    on_bad_rows: str,
    format: str,
    parse_problems: Sequence[DataValidationError] = (),
    shards: _Shards = (),
) -> tuple[pd.DataFrame, tuple[DataValidationError, ...], str]:
    if on_bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_rows must be one of {BAD_ROW_POLICIES}, got {on_bad_rows!r}")
    if len(frame) == 0 and not parse_problems:
        raise DataValidationError(source, None, None, "no rows")
    if len(frame) == 0:
        fmt = format if format != "auto" else "standard"
    elif format == "auto":
        fmt = detect_format(frame, source)
    elif format in FORMATS:
        fmt = format
        if any(c not in frame.columns for c in FORMATS[fmt].columns):
            raise _missing_column_error(source, fmt, list(frame.columns))
    else:
        raise ValueError(f"format must be 'auto' or one of {sorted(FORMATS)}, got {format!r}")

    spec = FORMATS[fmt]
    problems: dict[int, DataValidationError] = {p.index: p for p in parse_problems if p.row is not None}
    kept_rows: list[int] = []
    kept: dict[str, list] = {c: [] for c in spec.outputs}
    first_seen: dict[str, int] = {}
    # A frame left empty by unparseable lines has no columns to check.
    source_rows = frame[list(spec.columns)].itertuples(index=False, name=None) if len(frame) else ()
    rows = zip(_row_numbers(frame), source_rows)
    extra_columns = [c for c in frame.columns if c not in spec.columns]
    extra_values = frame[extra_columns].itertuples(index=False, name=None) if len(frame) else ()
    for (row_number, values), extras in zip(rows, extra_values):
        try:
            clean = spec.check_row(dict(zip(spec.columns, values)))
            key = _dedup_key(clean)
            if key in first_seen:
                first_source, first_row = _locate(shards, source, first_seen[key])
                if first_source == _locate(shards, source, row_number)[0]:
                    raise _Bad(None, f"duplicate of row {first_row}")
                raise _Bad(None, f"duplicate of {first_source} row {first_row}")
        except _Bad as bad:
            problem = bad.problem
            if problem == "missing from this row":
                present = [c for c, v in zip(extra_columns, extras) if v is not _ABSENT]
                close = difflib.get_close_matches(bad.field, present, n=1, cutoff=0.6)
                if close:
                    problem += f"; it has '{close[0]}' — misspelled?"
            problems[row_number] = _row_error(shards, source, row_number, bad.field, problem)
            continue
        first_seen[key] = row_number
        kept_rows.append(row_number)
        for c in spec.outputs:
            kept[c].append(clean[c])

    ordered = tuple(problems[r] for r in sorted(problems))
    if ordered and on_bad_rows == "error":
        raise ordered[0]
    if not kept_rows:
        raise DataValidationErrors(source, ordered)
    return _build_frame(kept, kept_rows), ordered, fmt


def validate_frame(
    frame: pd.DataFrame, source: str = "<frame>", *, on_bad_rows: str = "error", format: str = "auto"
) -> tuple[pd.DataFrame, tuple[DataValidationError, ...]]:
    """Validate a frame in one of the formats of FORMATS (columns already named as the schema).

    Returns the clean frame (schema columns only, implicit rows split into prompt/chosen/rejected,
    index = source row numbers) and the problems of the rows dropped (empty unless skipping).
    With ``on_bad_rows="error"`` the first bad row raises; a frame with no rows always raises.
    """
    clean, problems, _ = _validate(frame, source, on_bad_rows, format)
    return clean, problems


