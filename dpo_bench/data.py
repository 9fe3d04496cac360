"""Preference data: schema, loading, validation and fingerprints.

Every method in the benchmark consumes one preference dataset; this module turns a file, a
``save_to_disk`` directory or a hub id into a validated :class:`PreferenceData` whose fingerprint
goes into every report. Five row formats are understood (the ones TRL defines):

=================  ==========================================================================
``standard``       ``prompt``, ``chosen``, ``rejected`` strings; completions exclude the prompt
``implicit``       only ``chosen`` / ``rejected`` full texts; the prompt is their common prefix,
                   cut at a word boundary (stored split into the three standard columns)
``conversational`` ``prompt`` / ``chosen`` / ``rejected`` are lists of ``{"role", "content"}``
                   messages; :func:`render_conversational` turns them into strings
``implicit_conversational``
                   only ``chosen`` / ``rejected`` message lists holding the whole conversation;
                   the prompt is their shared leading messages, the completions the differing
                   tails (stored split into the three conversational columns)
``rankings``       ``prompt`` and ``ranking``: K >= 2 completions, best first;
                   :func:`rankings_to_pairs` turns them into standard pairs
=================  ==========================================================================

Every problem is a :class:`DataValidationError` naming the source, the 0-based row and the field,
e.g. ``prefs.jsonl: row 12, field 'chosen': empty string``. With ``on_bad_rows="error"`` the
first bad row (in row order) is raised before anything else happens; with ``"skip"`` bad rows
are dropped, counted and kept as ``PreferenceData.problems``.

Messages have the roles system, user, assistant and tool; an assistant message may carry
``tool_calls`` (``[{"type": "function", "function": {"name", "arguments"}}]``, as transformers'
chat templates read them) instead of content, and a tool message a ``name`` or ``tool_call_id``.

A folder is a ``save_to_disk`` directory when it holds ``dataset_info.json``, ``state.json`` or
``dataset_dict.json``; otherwise its ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` shards (one
type) are read in name order as one dataset, and errors name the shard and its own row.

Nothing in a dataset is ever executed: local files are parsed here (json, csv, parquet, arrow),
never unpickled, and ``trust_remote_code`` reaches ``datasets.load_dataset`` only when the caller
passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import bisect
import csv
import difflib
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files import atomic_path

__all__ = [
    "DataValidationError",
    "DataValidationErrors",
    "FORMATS",
    "HubUnreachableError",
    "PAIR_MODES",
    "PreferenceData",
    "CHAT_FORMATS",
    "ROLES",
    "check_data",
    "check_lengths",
    "detect_format",
    "fingerprint_frame",
    "load_preferences",
    "looks_like_path",
    "rankings_to_pairs",
    "read_table",
    "render_conversational",
    "validate_frame",
    "write_preferences",
]

ROLES = frozenset({"system", "user", "assistant", "tool"})
# Optional message keys passed on to the chat template, beside role and content.
_MESSAGE_EXTRAS = ("tool_calls", "name", "tool_call_id")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BAD_ROW_POLICIES = ("error", "skip")
# Bump when the canonical serialisation changes, so old and new fingerprints never collide.
_FINGERPRINT_VERSION = "dpo-bench-preferences-v1"


# --------------------------------------------------------------------------------------- errors


class DataValidationError(ValueError):
    """One problem in a preference dataset.

    Attributes: ``source`` (file, shard, directory or hub id), ``row`` (0-based row in the
    source, or None for a file- or column-level problem), ``field`` (column or message path such
    as ``chosen[1].role``, or None) and ``problem`` (what is wrong, in words). ``index`` is the
    row's label in the loaded frame: ``row`` itself, except in a folder of shards, where ``row``
    counts within the shard and ``index`` across all of them.
    """

    def __init__(
        self, source: str, row: int | None, field: str | None, problem: str, index: int | None = None
    ):
        # args mirror __init__ so the error survives pickling across worker processes.
        super().__init__(source, row, field, problem, index)
        self.source = source
        self.row = row
        self.field = field
        self.problem = problem
        self.index = row if index is None else index

    def __str__(self) -> str:
        if self.row is not None:
            where = f"row {self.row}" + (f", field '{self.field}'" if self.field else "")
        elif self.field:  # column-level problems read as a sentence: "column 'x' is missing"
            return f"{self.source}: column '{self.field}' {self.problem}"
        else:
            return f"{self.source}: {self.problem}"
        return f"{self.source}: {where}: {self.problem}"


class DataValidationErrors(DataValidationError):
    """Several problems at once (``errors``), e.g. when skipping bad rows left no row at all."""

    def __init__(self, source: str, errors: Sequence[DataValidationError]):
        errors = tuple(errors)
        problem = f"{len(errors)} problem(s), no valid rows left"
        super().__init__(source, None, None, problem)
        self.args = (source, errors)
        self.errors = errors

    def __str__(self) -> str:
        lines = [super().__str__()]
        lines += [f"  {e}" for e in self.errors[:10]]
        if len(self.errors) > 10:
            lines.append(f"  ... and {len(self.errors) - 10} more")
        return "\n".join(lines)


class HubUnreachableError(ConnectionError):
    """A hub id (a dataset, or a model, tokenizer or judge: ``kind``) that could not be fetched: no
    network, or HF_HUB_OFFLINE with a cold cache."""

    def __init__(self, source: str, offline: bool = False, kind: str = "dataset"):
        super().__init__(source, offline, kind)  # args mirror __init__, as DataValidationError's
        self.source = source
        self.offline = offline
        self.kind = kind

    def __str__(self) -> str:
        why = " (HF_HUB_OFFLINE is set and it is not in the cache)" if self.offline else ""
        if self.kind == "dataset":
            return (
                f"{self.source}: could not reach the Hugging Face hub to read this dataset{why}; give a local file "
                f"({', '.join(LOCAL_SUFFIXES)}) or save_to_disk folder, or download the dataset beforehand and run "
                "with HF_HUB_OFFLINE=1 to read it from the cache"
            )
        return (
            f"{self.source}: could not reach the Hugging Face hub to load this {self.kind}{why}; give a local directory "
            "(one written by save_pretrained), or download it beforehand and run with HF_HUB_OFFLINE=1 to read it from the cache"
        )


def hub_offline() -> bool:
    """Whether huggingface_hub is told to stay offline (HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def unreachable(error: BaseException) -> bool:
    """Whether a transformers or huggingface_hub error while loading a hub id means the hub could not be
    reached (rather than, say, a repository without the file asked for)."""
    if isinstance(error, ConnectionError) or type(error).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return True
    text = str(error)
    return isinstance(error, OSError) and ("couldn't connect" in text or "offline mode" in text.lower())


class _Bad(Exception):
    """A row-level problem before the source and row are attached."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


class _Absent:
    """Marks a key a JSON row does not have, as distinct from an explicit null."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


# ------------------------------------------------------------------------------- value checks


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float, np.number)):
        return f"a number ({value!r})"
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _check_present(value: Any, field: str) -> Any:
    if value is _ABSENT:
        raise _Bad(field, "missing from this row")
    if value is None or value is pd.NA:
        raise _Bad(field, "missing value (null)")
    if isinstance(value, float) and math.isnan(value):
        raise _Bad(field, "missing value (NaN)")
    return value


def _text(value: Any, field: str) -> str:
    value = _check_present(value, field)
    if not isinstance(value, str):
        raise _Bad(field, f"expected a string, got {_describe(value)}")
    if value == "":
        raise _Bad(field, "empty string")
    if not value.strip():
        raise _Bad(field, "whitespace-only string")
    return value


def _as_list(value: Any, field: str, what: str) -> list:
    value = _check_present(value, field)
    if isinstance(value, np.ndarray):  # parquet / arrow list cells arrive as arrays
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _Bad(field, f"expected a list of {what}, got {_describe(value)}")
    return list(value)


def _without_nulls(value: Any) -> Any:
    """``value`` as plain data with null-valued keys dropped at every depth: parquet structs give
    every message (and every tool call's arguments) the keys of all the others, set to null, so
    an argument that is explicitly null in a jsonl file is dropped as well."""
    value = _plain(value)
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _tool_calls(value: Any, where: str) -> list:
    calls = _as_list(value, where, "tool calls")
    if not calls:
        raise _Bad(where, "empty list of tool calls")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise _Bad(f"{where}[{j}]", 'expected {"type": "function", "function": {"name", "arguments"}}')
        _text(function.get("name"), f"{where}[{j}].function.name")
    return _without_nulls(calls)


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    items = _as_list(value, field, "messages")
    if not items:
        raise _Bad(field, "empty list of messages")
    out = []
    for i, message in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise _Bad(where, f"expected a message with 'role' and 'content', got {_describe(message)}")
        role = message.get("role")
        if role is None:
            raise _Bad(where, "message is missing 'role'")
        if not isinstance(role, str) or role not in ROLES:
            raise _Bad(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(sorted(ROLES))}")
        # Keep role, content and the tool keys a chat template reads, never null ones, so the same
        # conversation fingerprints the same whether it came from jsonl or from parquet (whose
        # structs add null keys); a message without tool keys stays {"role", "content"}.
        clean: dict[str, Any] = {"role": role}
        calls = message.get("tool_calls")
        if isinstance(calls, np.ndarray):
            calls = calls.tolist()
        if calls is not None and role != "assistant":
            raise _Bad(f"{where}.tool_calls", f"only an assistant message calls tools, not a {role} message")
        content = message.get("content")
        if calls is not None and (content is None or content == ""):
            pass  # a pure tool call has no text
        elif content is None:
            raise _Bad(where, "message is missing 'content'")
        else:
            clean["content"] = _text(content, f"{where}.content")
        if calls is not None:
            clean["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                clean[key] = _text(message[key], f"{where}.{key}")
        out.append(clean)
    return out


def _split_conversation(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Split two whole conversations into (prompt, chosen completion, rejected completion): the
    prompt is their shared leading messages, and each completion the messages after it.

    The prompt must hold a user turn and each completion must start with an assistant turn, as
    the prompt is rendered with the generation prompt that opens the assistant's reply.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prompt = chosen[:n]
    if not any(m["role"] == "user" for m in prompt):
        differ = "" if n == 0 else f" (only {', '.join(m['role'] for m in prompt)})"
        raise _Bad(
            "chosen",
            f"shares no leading user turn with 'rejected'{differ}, so no prompt can be extracted; "
            "the two conversations must start with the same user (and system) messages",
        )
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == n:
            raise _Bad(field, "has no message after the prompt it shares with the other conversation")
        if messages[n]["role"] != "assistant":
            raise _Bad(
                f"{field}[{n}].role",
                f"the conversations differ at a {messages[n]['role']} turn; after the shared prompt "
                "each must continue with an assistant turn",
            )
    return prompt, chosen[n:], rejected[n:]


def _split_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two full texts into (prompt, chosen completion, rejected completion).

    The prompt is the longest common prefix cut at a whitespace boundary both texts share, and
    the whitespace goes to the completions ("The film was" + " great"), which is where GPT-2-style
    tokenizers put it. Returns None when no non-empty prompt leaves both completions non-empty.
    """
    n = min(len(chosen), len(rejected))
    lcp = 0
    while lcp < n and chosen[lcp] == rejected[lcp]:
        lcp += 1
    for cut in range(min(lcp, n - 1), 0, -1):
        if chosen[cut].isspace() and rejected[cut].isspace():
            while cut > 0 and chosen[cut - 1].isspace():
                cut -= 1
            return (chosen[:cut], chosen[cut:], rejected[cut:]) if cut else None
    return None


# ---------------------------------------------------------------------------------- formats


def _row_standard(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {f: _text(row[f], f) for f in ("prompt", "chosen", "rejected")}
    if out["chosen"] == out["rejected"]:
        raise _Bad("rejected", "identical to 'chosen'")
    return out


def _row_implicit(row: Mapping[str, Any]) -> dict[str, Any]:
    chosen, rejected = _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")
    if chosen == rejected:
        raise _Bad("rejected", "identical to 'chosen'")
    split = _split_prompt(chosen, rejected)
    if split is None:
        raise _Bad(
            "chosen",
            "shares no common prefix with 'rejected' ending at a word boundary, so no prompt "
            "can be extracted; add a 'prompt' column",
        )
    prompt, chosen_completion, rejected_completion = split
    return {
        "prompt": prompt,
        "chosen": _text(chosen_completion, "chosen"),
        "rejected": _text(rejected_completion, "rejected"),
    }


def _row_conversational(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {f: _messages(row[f], f) for f in ("prompt", "chosen", "rejected")}
    if out["chosen"] == out["rejected"]:
        raise _Bad("rejected", "identical to 'chosen'")
    return out


def _row_implicit_conversational(row: Mapping[str, Any]) -> dict[str, Any]:
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    if chosen == rejected:
        raise _Bad("rejected", "identical to 'chosen'")
    prompt, chosen_completion, rejected_completion = _split_conversation(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen_completion, "rejected": rejected_completion}


def _row_rankings(row: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _text(row["prompt"], "prompt")
    ranking = _as_list(row["ranking"], "ranking", "completions")
    if len(ranking) < 2:
        raise _Bad("ranking", f"a ranking needs at least 2 completions, got {len(ranking)}")
    texts: list[str] = []
    for i, completion in enumerate(ranking):
        text = _text(completion, f"ranking[{i}]")
        if text in texts:
            raise _Bad(f"ranking[{i}]", f"repeats ranking[{texts.index(text)}]")
        texts.append(text)
    return {"prompt": prompt, "ranking": texts}


@dataclass(frozen=True)
class _Format:
    columns: tuple[str, ...]  # required source columns
    outputs: tuple[str, ...]  # columns of the validated frame
    check_row: Callable[[Mapping[str, Any]], dict[str, Any]]
    chat: bool = False  # rows are message lists, rendered with the chat template


FORMATS: dict[str, _Format] = {
    "standard": _Format(("prompt", "chosen", "rejected"), ("prompt", "chosen", "rejected"), _row_standard),
    "implicit": _Format(("chosen", "rejected"), ("prompt", "chosen", "rejected"), _row_implicit),
    "conversational": _Format(
        ("prompt", "chosen", "rejected"), ("prompt", "chosen", "rejected"), _row_conversational, chat=True
    ),
    "implicit_conversational": _Format(
        ("chosen", "rejected"), ("prompt", "chosen", "rejected"), _row_implicit_conversational, chat=True
    ),
    "rankings": _Format(("prompt", "ranking"), ("prompt", "ranking"), _row_rankings),
}
CHAT_FORMATS = frozenset(name for name, spec in FORMATS.items() if spec.chat)


def _missing_column_error(source: str, fmt: str, columns: Sequence[str]) -> DataValidationError:
    required = FORMATS[fmt].columns
    missing = next(c for c in required if c not in columns)
    unused = [c for c in columns if c not in required]
    close = difflib.get_close_matches(missing, unused, n=1, cutoff=0.6)
    if close:
        hint = f"found '{close[0]}' — did you mean it? use column_map={{'{close[0]}': '{missing}'}}"
    else:
        found = ", ".join(f"'{c}'" for c in columns) or "none"
        hint = f"found columns {found}; use column_map to name the source column for '{missing}'"
    return DataValidationError(source, None, missing, f"is missing ({fmt} format); {hint}")


def detect_format(frame: pd.DataFrame, source: str = "<frame>") -> str:
    """Name the format of ``frame`` from its columns (and, for prompt/chosen/rejected, from
    whether ``chosen`` mostly holds strings or message lists). Raises a DataValidationError for
    a missing column, suggesting the closest existing name."""
    columns = list(frame.columns)
    has = set(columns)
    # Majority vote, so one row holding a list in a string file is reported as that row's
    # problem instead of flipping the whole file to conversational.
    values = [v for v in frame["chosen"] if v is not _ABSENT] if "chosen" in has else []
    lists = sum(isinstance(v, (list, tuple, np.ndarray)) for v in values)
    messages = lists > sum(isinstance(v, str) for v in values)
    if {"prompt", "chosen", "rejected"} <= has:
        return "conversational" if messages else "standard"
    if {"prompt", "ranking"} <= has:
        return "rankings"
    if {"chosen", "rejected"} <= has:
        others = [c for c in columns if c not in ("chosen", "rejected")]
        near_prompt = difflib.get_close_matches("prompt", others, n=1, cutoff=0.7)
        if near_prompt:
            # A misspelled prompt column would otherwise be silently replaced by a guessed prompt.
            raise _missing_column_error(source, "standard", columns)
        return "implicit_conversational" if messages else "implicit"

    def score(fmt: str) -> float:
        required = FORMATS[fmt].columns
        unused = [c for c in columns if c not in required]
        present = sum(c in has for c in required)
        near = sum(bool(difflib.get_close_matches(c, unused, n=1, cutoff=0.6)) for c in required if c not in has)
        return present + 0.5 * near

    unused = _unused_format(has)
    if unused:
        raise DataValidationError(source, None, None, unused)
    best = max(("standard", "rankings", "implicit"), key=score)  # max keeps the first on ties
    raise _missing_column_error(source, best, columns)


def _unused_format(columns: set[str]) -> str | None:
    """What to say of a file in one of TRL's formats that carries no preference between two
    completions (the benchmark's methods all compare a chosen with a rejected one), or None."""
    if {"prompt", "completion", "label"} <= columns:
        return ("unpaired preference data (TRL's prompt/completion/label, as KTO trains on): this benchmark's methods "
                "compare a chosen with a rejected completion of the same prompt; pair them first (prompt/chosen/rejected)")
    if columns <= {"prompt", "images", "id"} and "prompt" in columns:
        return ("prompt-only data (TRL's prompt column alone, as online methods sample from), not preference data; for "
                "preferences sampled from your model and judged, give plain text (a 'text' column: its prefixes become the "
                "prompts; README, 'Your own model and data')")
    return None


# ------------------------------------------------------------------------------- validation


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


# ---------------------------------------------------------------------------------- reading


_Rows = list[tuple[int, dict[str, Any]]]


def _bad_utf8(source: str, row: int, line: int, error: UnicodeDecodeError) -> DataValidationError:
    byte = error.object[error.start : error.start + 1].hex()
    return DataValidationError(
        source, row, None, f"invalid UTF-8 (byte 0x{byte} on line {line}); re-save the file as UTF-8"
    )


def _read_jsonl_lines(data: bytes, source: str, max_rows: int | None) -> tuple[_Rows, list]:
    rows: _Rows = []
    problems: list[DataValidationError] = []
    row = 0
    # Split on the byte b"\n" only: str.splitlines would also split on U+2028 inside strings.
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        if max_rows is not None and row >= max_rows:
            break
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(_bad_utf8(source, row, line_number, e))
            row += 1
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            truncated = " — the line ends early (truncated?)" if e.pos >= len(text.rstrip()) else ""
            problems.append(
                DataValidationError(
                    source, row, None, f"not valid JSON (line {line_number}, column {e.colno}: {e.msg}){truncated}"
                )
            )
        else:
            if isinstance(record, dict):
                rows.append((row, record))
            else:
                problems.append(
                    DataValidationError(source, row, None, f"expected a JSON object, got {_describe(record)}")
                )
        row += 1
    return rows, problems


def _decode_whole(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        byte = data[e.start : e.start + 1].hex()
        raise DataValidationError(
            source, None, None, f"invalid UTF-8 (byte 0x{byte} on line {line}); re-save the file as UTF-8"
        ) from None


def _read_json(data: bytes, source: str, max_rows: int | None) -> tuple[_Rows, list]:
    head = data.lstrip()[:1]
    if head == b"[":
        text = _decode_whole(data, source)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataValidationError(
                source, None, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None
        rows, problems = [], []
        for i, record in enumerate(records[:max_rows] if max_rows is not None else records):
            if isinstance(record, dict):
                rows.append((i, record))
            else:
                problems.append(DataValidationError(source, i, None, f"expected a JSON object, got {_describe(record)}"))
        return rows, problems
    if head == b"{":
        try:
            whole = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = None  # several objects: JSON lines in a .json file, as `datasets` accepts
        if isinstance(whole, dict):
            values = list(whole.values())
            if values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
                records = [dict(zip(whole, items)) for items in zip(*values)]  # column-oriented
            else:
                records = [whole]
            return list(enumerate(records[:max_rows] if max_rows is not None else records)), []
    return _read_jsonl_lines(data, source, max_rows)


def _read_csv(data: bytes, source: str, max_rows: int | None) -> tuple[_Rows, list]:
    # surrogateescape keeps reading past bad bytes so the bad row, not the file, is reported.
    text = data.decode("utf-8", errors="surrogateescape")
    # csv refuses fields over 128 KiB by default, which JSONL never does; no field is longer than
    # the file. The limit is module-wide, so it is restored; 2**31 - 1 fits a C long everywhere.
    limit = csv.field_size_limit(max(csv.field_size_limit(), min(len(text), 2**31 - 1)))
    try:
        return _read_csv_text(text, source, max_rows)
    finally:
        csv.field_size_limit(limit)


def _read_csv_text(text: str, source: str, max_rows: int | None) -> tuple[_Rows, list]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: _Rows = []
    problems: list[DataValidationError] = []
    try:
        header = next(reader, None)
        while header is not None and not header:
            header = next(reader, None)
        if header is None:
            raise DataValidationError(source, None, None, "file is empty")
        for position, name in enumerate(header):
            if _has_escaped_bytes(name):
                raise DataValidationError(source, None, None, f"invalid UTF-8 in the header (column {position})")
        if len(set(header)) != len(header):
            dupes = sorted({c for c in header if header.count(c) > 1})
            raise DataValidationError(source, None, dupes[0], "appears more than once in the header")
        row = 0
        for fields in reader:
            if max_rows is not None and row >= max_rows:
                break
            if not fields:
                continue  # blank line
            line = reader.line_num
            if len(fields) != len(header):
                problems.append(
                    DataValidationError(
                        source, row, None,
                        f"has {len(fields)} field(s) but the header has {len(header)} (line {line}); "
                        "a missing field or an unquoted comma?",
                    )
                )
            else:
                bad = next((name for name, v in zip(header, fields) if _has_escaped_bytes(v)), None)
                if bad is None:
                    rows.append((row, dict(zip(header, fields))))
                else:
                    problems.append(
                        DataValidationError(source, row, bad, f"invalid UTF-8 (line {line}); re-save the file as UTF-8")
                    )
            row += 1
    except csv.Error as e:
        raise DataValidationError(source, None, None, f"not valid CSV (line {reader.line_num}: {e})") from None
    if not rows and not problems:
        raise DataValidationError(source, None, None, "no rows: the file has a header but no data rows")
    return rows, problems


def _has_escaped_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_parquet(path: Path, source: str, max_rows: int | None) -> tuple[_Rows, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataValidationError(source, None, None, f"not a readable parquet file ({e})") from None
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return _table_rows(table.column_names, table.to_pylist()), []


def _table_rows(columns: Sequence[str], records: list[dict[str, Any]]) -> _Rows:
    # Keep the column names even when there are no records, so errors can list them.
    return [(i, r) for i, r in enumerate(records)] if records else [(-1, {c: _ABSENT for c in columns})]


def _dataset_rows(dataset: Any, max_rows: int | None) -> _Rows:
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return _table_rows(dataset.column_names, dataset.to_list())


def _read_saved_dataset(path: Path, source: str, split: str, max_rows: int | None) -> _Rows:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataValidationError(
            source, None, None, "directory is not a dataset saved with Dataset.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataValidationError(
                source, None, None, f"split '{split}' not found; available: {', '.join(loaded)}"
            )
        loaded = loaded[split]
    return _dataset_rows(loaded, max_rows)


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else path-shaped (./x, /x, ~/x, a/b/c, x.jsonl)
    is a local path, which when missing is a missing file, never a hub lookup."""
    return (
        source.startswith(("/", "~", "."))
        or "\\" in source
        or source.count("/") > 1
        or source.lower().endswith(LOCAL_SUFFIXES)
    )


def _read_file(path: Path, name: str, max_rows: int | None) -> tuple[_Rows, list[DataValidationError]]:
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl_lines, ".json": _read_json, ".csv": _read_csv}
    if suffix not in readers and suffix != ".parquet":
        raise DataValidationError(
            name, None, None,
            f"unsupported file type '{suffix}'; use .jsonl, .json, .parquet, .csv or a save_to_disk directory",
        )
    if path.stat().st_size == 0:
        raise DataValidationError(name, None, None, "file is empty")
    if suffix == ".parquet":
        return _read_parquet(path, name, max_rows)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark, as some editors write
    if not data.strip():
        raise DataValidationError(name, None, None, "file is empty")
    return readers[suffix](data, name, max_rows)


# Files a save_to_disk directory holds at its top (a Dataset's, or a DatasetDict's).
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Shard names that start with one of these and "-" / "_" / "." belong to that split.
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")


def _shard_files(path: Path, name: str, split: str) -> list[Path]:
    """The data files of a folder of shards, in name order: one file type, one split."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in LOCAL_SUFFIXES and not p.name.lower().startswith("readme")]
    shards = [p for p in files if p.suffix.lower() in LOCAL_SUFFIXES]
    if not shards:
        folders = sorted(p.name + "/" for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        inside = f"; it holds the folders {', '.join(folders[:5])}: name the one with the data" if folders else ""
        raise DataValidationError(
            name, None, None,
            f"folder is neither a save_to_disk directory (no {' or '.join(_SAVED_DATASET_MARKERS)}) nor a folder of "
            f"{', '.join(LOCAL_SUFFIXES)} shards{inside}",
        )
    if others:
        raise DataValidationError(
            name, None, None,
            f"folder of shards also holds {', '.join(others[:5])}; keep only {', '.join(LOCAL_SUFFIXES)} shards "
            "(one type) in it, or name a file",
        )
    types = sorted({p.suffix.lower() for p in shards})
    if len(types) > 1:
        raise DataValidationError(
            name, None, None, f"folder mixes shard types ({', '.join(types)}); keep one type per folder, or name a file"
        )

    def split_of(file: Path) -> str | None:
        return next((s for s in _SPLIT_NAMES if file.name.lower().startswith((f"{s}-", f"{s}_", f"{s}."))), None)

    # train-*.jsonl beside test-*.jsonl are two splits, never one dataset: read the split asked for.
    splits = {split_of(p) for p in shards}
    if len(splits) > 1:
        chosen = [p for p in shards if split_of(p) == split]
        if not chosen:
            found = ", ".join(sorted(s or "(no split prefix)" for s in splits))
            raise DataValidationError(name, None, None, f"no shards of split '{split}'; the shards' splits: {found}")
        return chosen
    return shards


def _read_shards(
    path: Path, name: str, split: str, max_rows: int | None
) -> tuple[_Rows, list[DataValidationError], list[tuple[str, int]]]:
    rows: _Rows = []
    problems: list[DataValidationError] = []
    shards: list[tuple[str, int]] = []
    start = 0
    for file in _shard_files(path, name, split):
        if max_rows is not None and start >= max_rows:
            break
        shard = os.path.join(name, file.name)
        shard_rows, shard_problems = _read_file(file, shard, None if max_rows is None else max_rows - start)
        shards.append((shard, start))
        # Rows are numbered across the shards; the errors keep the shard's own row numbers.
        rows += [(i if i < 0 else start + i, record) for i, record in shard_rows]
        problems += [
            DataValidationError(p.source, p.row, p.field, p.problem, index=None if p.row is None else start + p.row)
            for p in shard_problems
        ]
        rows_read = [i for i, _ in shard_rows if i >= 0] + [p.row for p in shard_problems if p.row is not None]
        start += max(rows_read, default=-1) + 1
    return rows, problems, shards


def _read_source(
    source: str | os.PathLike, split: str, max_rows: int | None, trust_remote_code: bool
) -> tuple[str, _Rows, list[DataValidationError], list[tuple[str, int]]]:
    """(name, rows, problems of rows that could not be parsed, shards): ``shards`` is empty
    unless ``source`` is a folder of shards (see :data:`_Shards`)."""
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return name, _read_saved_dataset(path, name, split, max_rows), [], []
        return name, *_read_shards(path, name, split, max_rows)
    if path.is_file():
        return name, *_read_file(path, name, max_rows), []
    if isinstance(source, os.PathLike) or looks_like_path(name):
        raise FileNotFoundError(f"preference data not found: {name}")
    import datasets

    # Hub datasets are data only unless the caller explicitly trusts the repository's code.
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        dataset = datasets.load_dataset(name, split=split, **extra)
    except ConnectionError:
        raise HubUnreachableError(name, offline=bool(datasets.config.HF_HUB_OFFLINE)) from None
    return name, _dataset_rows(dataset, max_rows), [], []


def read_table(
    source: str | os.PathLike, split: str = "train", max_rows: int | None = None, trust_remote_code: bool = False,
    column_map: Mapping[str, str] | None = None,
) -> tuple[str, pd.DataFrame, list[DataValidationError]]:
    """(name, frame, problems of rows that could not be parsed): any source the preference loader
    reads (a file, a folder of shards, a saved dataset, a hub id), its columns renamed by
    ``column_map``, not validated as preferences: for data of another kind (the hf task's texts)."""
    name, rows, problems, _ = _read_source(source, split, max_rows, trust_remote_code)
    return name, _apply_column_map(_rows_to_frame(rows), column_map, name), problems


def _rows_to_frame(rows: _Rows) -> pd.DataFrame:
    columns: list[str] = []
    seen: set[str] = set()
    for _, record in rows:
        for key in record:
            if key not in seen:
                seen.add(key)
                columns.append(str(key))
    real = [(i, r) for i, r in rows if i >= 0]
    index = pd.Index([i for i, _ in real], dtype="int64")
    data = {c: pd.Series([r.get(c, _ABSENT) for _, r in real], dtype=object, index=index) for c in columns}
    return pd.DataFrame(data, index=index, columns=columns)


def _apply_column_map(frame: pd.DataFrame, column_map: Mapping[str, str] | None, source: str) -> pd.DataFrame:
    if not column_map:
        return frame
    for old, new in column_map.items():
        if old not in frame.columns:
            found = ", ".join(f"'{c}'" for c in frame.columns)
            raise DataValidationError(source, None, old, f"is named in column_map but is not in the data (found {found})")
        if new in frame.columns and new not in column_map:
            raise DataValidationError(
                source, None, new, f"is already in the data, so column_map cannot map '{old}' onto it"
            )
    targets = list(column_map.values())
    if len(set(targets)) != len(targets):
        raise ValueError(f"column_map maps two columns to the same name: {dict(column_map)}")
    return frame.rename(columns=dict(column_map))


# ----------------------------------------------------------------------------- the dataset


def _plain(value: Any) -> Any:
    """A JSON-able Python value: arrays -> lists, numpy scalars -> Python, NaN/NA -> None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def fingerprint_frame(frame: pd.DataFrame) -> str:
    """sha256 hex of a frame's content: column names and values, in order; not its index or
    dtypes, so the same rows read from jsonl, parquet or csv give the same fingerprint."""
    digest = hashlib.sha256(_FINGERPRINT_VERSION.encode())
    dump = lambda obj: json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))  # noqa: E731
    digest.update(b"\n" + dump([str(c) for c in frame.columns]).encode())
    for values in frame.itertuples(index=False, name=None):
        digest.update(b"\n" + dump([_plain(v) for v in values]).encode())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class PreferenceData:
    """A validated preference dataset.

    ``frame`` holds the schema columns of ``format`` (implicit data already split into
    prompt/chosen/rejected); its index is each row's 0-based row number in the source, so later
    errors can still name the source row. ``fingerprint`` is :func:`fingerprint_frame` of it.
    ``n_dropped`` rows were dropped for the ``problems`` listed (one per dropped row). For a
    folder of shards, the index counts rows across the shards and ``shards`` holds each shard's
    name and first index, so :meth:`error` can name the shard and its own row.
    """

    frame: pd.DataFrame
    source: str
    fingerprint: str
    n_dropped: int = 0
    problems: tuple[DataValidationError, ...] = ()
    format: str = "standard"
    shards: tuple[tuple[str, int], ...] = ()

    def error(self, index: int, field: str | None, problem: str) -> DataValidationError:
        """The error for the row labelled ``index`` in ``frame``, naming its file and row."""
        return _row_error(self.shards, self.source, index, field, problem)

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        return (
            f"PreferenceData(source={self.source!r}, format={self.format!r}, rows={len(self)}, "
            f"n_dropped={self.n_dropped}, fingerprint={self.fingerprint[:12]}...)"
        )

    def pairs(self, mode: str = "all_pairs") -> pd.DataFrame:
        """prompt/chosen/rejected pairs: rankings expanded with :func:`rankings_to_pairs`
        (``mode``); conversational pairs stay message lists (see :func:`render_conversational`)."""
        if self.format == "rankings":
            return rankings_to_pairs(self.frame, mode)
        return self.frame[["prompt", "chosen", "rejected"]].copy()


def load_preferences(
    source: str | os.PathLike | pd.DataFrame,
    *,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    on_bad_rows: str = "error",
    format: str = "auto",
    max_rows: int | None = None,
    trust_remote_code: bool = False,
) -> PreferenceData:
    """Load and validate preference data.

    ``source``: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, a directory
    written by ``datasets.Dataset.save_to_disk`` (``split`` picks from a DatasetDict), a folder
    of such files read as one dataset in name order (``split`` picks ``train-*`` from beside
    ``test-*``), a DataFrame, or else a hub id passed to ``datasets.load_dataset(source, split=split)``.
    ``column_map`` renames source columns to the schema before the ``format`` is detected
    ("auto") or checked. ``max_rows`` reads only the first rows. See the module docstring for
    ``on_bad_rows``. A missing path raises FileNotFoundError naming it (a path-shaped name, see
    :func:`looks_like_path`, is never looked up on the hub); a hub id the hub cannot serve, for want
    of a network or of a cached copy under HF_HUB_OFFLINE, raises :class:`HubUnreachableError`.
    """
    if on_bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_rows must be one of {BAD_ROW_POLICIES}, got {on_bad_rows!r}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    if isinstance(source, pd.DataFrame):
        name = str(source.attrs.get("source", "<DataFrame>"))
        frame, parse_problems, shards = source.head(max_rows) if max_rows else source, [], []
    else:
        name, rows, parse_problems, shards = _read_source(source, split, max_rows, trust_remote_code)
        frame = _rows_to_frame(rows)
    frame = _apply_column_map(frame, column_map, name)
    clean, problems, fmt = _validate(frame, name, on_bad_rows, format, parse_problems, shards)
    return PreferenceData(
        frame=clean,
        source=name,
        fingerprint=fingerprint_frame(clean),
        n_dropped=len(problems),
        problems=problems,
        format=fmt,
        shards=tuple(shards),
    )


def _with_dropped(data: PreferenceData, problems: Sequence[DataValidationError], on_bad_rows: str) -> PreferenceData:
    if not problems:
        return data
    if on_bad_rows == "error":
        raise problems[0]
    frame = data.frame.drop(index=[p.index for p in problems])
    if len(frame) == 0:
        raise DataValidationErrors(data.source, tuple(data.problems) + tuple(problems))
    return PreferenceData(
        frame=frame,
        source=data.source,
        fingerprint=fingerprint_frame(frame),
        n_dropped=data.n_dropped + len(problems),
        problems=tuple(sorted((*data.problems, *problems), key=lambda p: p.index)),
        format=data.format,
        shards=data.shards,
    )


# ------------------------------------------------------------------------------ conversions


def _pairs_all(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _pairs_best_vs_worst(k: int) -> list[tuple[int, int]]:
    return [(0, k - 1)]


def _pairs_adjacent(k: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(k - 1)]


# mode -> (K -> list of (chosen position, rejected position)) in a best-first ranking
PAIR_MODES: dict[str, Callable[[int], list[tuple[int, int]]]] = {
    "all_pairs": _pairs_all,
    "best_vs_worst": _pairs_best_vs_worst,
    "adjacent": _pairs_adjacent,
}


def rankings_to_pairs(frame: pd.DataFrame, mode: str = "all_pairs") -> pd.DataFrame:
    """Expand rankings (``prompt``, ``ranking`` best first) into prompt/chosen/rejected pairs.

    ``all_pairs``: every (i, j) with i ranked above j, K(K-1)/2 per row; ``best_vs_worst``: one
    pair per row; ``adjacent``: (i, i+1), K-1 per row. Pairs keep row order, then (i, j) order;
    the index repeats each pair's source row number.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {sorted(PAIR_MODES)}, got {mode!r}")
    prompts, chosen, rejected, index = [], [], [], []
    for row, prompt, ranking in zip(_row_numbers(frame), frame["prompt"], frame["ranking"]):
        ranking = list(ranking)
        for i, j in PAIR_MODES[mode](len(ranking)):
            prompts.append(prompt)
            chosen.append(ranking[i])
            rejected.append(ranking[j])
            index.append(row)
    return _build_frame({"prompt": prompts, "chosen": chosen, "rejected": rejected}, index)


def render_conversational(
    data: PreferenceData | pd.DataFrame, tokenizer: Any, *, source: str | None = None
) -> pd.DataFrame:
    """Render conversational rows to prompt/chosen/rejected strings with the chat template.

    prompt = template(prompt, add_generation_prompt=True); a completion is
    template(prompt + completion) with that prompt text removed from its front. A template that
    does not render the prompt as a prefix of the whole conversation is an error for that row.
    """
    frame = data.frame if isinstance(data, PreferenceData) else data
    if isinstance(data, PreferenceData) and source is None:
        error = data.error
    else:
        error = lambda index, field, problem: DataValidationError(source or "<frame>", index, field, problem)  # noqa: E731

    def render(messages: list, **kwargs: Any) -> str:
        return tokenizer.apply_chat_template(_plain(messages), tokenize=False, **kwargs)

    out: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    rows = _row_numbers(frame)
    for row, prompt, *completions in zip(rows, frame["prompt"], frame["chosen"], frame["rejected"]):
        prompt = _plain(prompt)
        prompt_text = render(prompt, add_generation_prompt=True)
        out["prompt"].append(prompt_text)
        for field, completion in zip(("chosen", "rejected"), completions):
            full = render(prompt + _plain(completion))
            if not full.startswith(prompt_text):
                raise error(
                    row, field,
                    "the chat template does not render the prompt (with the generation prompt) "
                    "as a prefix of prompt + completion, so the completion cannot be cut out",
                )
            out[field].append(full[len(prompt_text):])
    return _build_frame(out, rows)


def check_lengths(
    data: PreferenceData, tokenizer: Any, max_length: int, *, on_bad_rows: str = "error"
) -> PreferenceData:
    """Rows whose prompt + completion exceed ``max_length`` tokens: raise naming row and field,
    or (``on_bad_rows="skip"``) return the data without them, counted in ``n_dropped``.

    The prompt is tokenized with special tokens and each completion without, as trainers
    tokenize them; conversational data (both layouts) is rendered with the chat template first. For rankings
    every completion ``ranking[i]`` is checked.
    """
    if on_bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_rows must be one of {BAD_ROW_POLICIES}, got {on_bad_rows!r}")
    frame = render_conversational(data, tokenizer) if data.format in CHAT_FORMATS else data.frame
    rows = _row_numbers(frame)
    prompts = list(frame["prompt"])
    if data.format == "rankings":
        completions = [[(f"ranking[{i}]", c) for i, c in enumerate(r)] for r in frame["ranking"]]
    else:
        completions = [[("chosen", c), ("rejected", r)] for c, r in zip(frame["chosen"], frame["rejected"])]

    def count(texts: list[str], **kwargs: Any) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, **kwargs)["input_ids"]] if texts else []

    prompt_lengths = count(prompts)
    flat = [text for row in completions for _, text in row]
    flat_lengths = iter(count(flat, add_special_tokens=False))
    problems = []
    for row, n_prompt, row_completions in zip(rows, prompt_lengths, completions):
        lengths = [(field, next(flat_lengths)) for field, _ in row_completions]
        if n_prompt > max_length:
            problems.append(data.error(
                row, "prompt", f"the prompt alone is {n_prompt} tokens, more than max_length {max_length}"
            ))
            continue
        for field, n in lengths:
            if n_prompt + n > max_length:
                problems.append(data.error(
                    row, field,
                    f"prompt + completion is {n_prompt + n} tokens, more than max_length {max_length}",
                ))
                break
    return _with_dropped(data, problems, on_bad_rows)


# ---------------------------------------------------------------------------------- writing


def write_preferences(frame: pd.DataFrame | PreferenceData, path: str | os.PathLike) -> str:
    """Write ``frame`` as ``.jsonl`` or ``.parquet`` (by suffix) atomically and return its
    fingerprint. The file appears complete or not at all: a temporary file in the same
    directory is written, fsynced and renamed over ``path``."""
    if isinstance(frame, PreferenceData):
        frame = frame.frame
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"write_preferences writes .jsonl or .parquet, not '{suffix}' ({path})")
    columns = [str(c) for c in frame.columns]
    records = [dict(zip(columns, (_plain(v) for v in values))) for values in frame.itertuples(index=False, name=None)]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if suffix == ".jsonl":
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pydict({c: [r[c] for r in records] for c in columns})
            pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    return fingerprint_frame(frame)


# ------------------------------------------------------------------------------- check-data


def check_data(source: str | os.PathLike, *, max_problems: int = 20, lengths: tuple[Any, int, str] | None = None,
               **kwargs: Any) -> str:
    """A human-readable report on a preference file for ``dpo-bench check-data FILE``.

    The first word is the verdict, for the command's exit status: ``ok`` (no problems),
    ``problems`` (bad rows that ``on_bad_rows="skip"`` would drop) or ``unusable`` (the file
    cannot be used at all). ``kwargs`` go to :func:`load_preferences`; bad rows are collected,
    not raised, unless ``on_bad_rows="error"`` is passed. ``lengths`` = (tokenizer, max_length,
    what they are) also checks every row's prompt + completion against ``max_length`` tokens of
    that tokenizer (:func:`check_lengths`; conversational rows rendered with its chat template).
    """
    kwargs.setdefault("on_bad_rows", "skip")
    name = os.fspath(source)
    try:
        data = load_preferences(source, **kwargs)
    except (DataValidationError, FileNotFoundError) as e:
        errors = e.errors if isinstance(e, DataValidationErrors) else ()
        lines = [f"unusable: {name}", f"  error: {DataValidationError.__str__(e) if errors else e}"]
        lines += [f"    {err}" for err in errors[:max_problems]]
        if len(errors) > max_problems:
            lines.append(f"    ... and {len(errors) - max_problems} more")
        return "\n".join(lines)
    length_line = None
    if lengths is not None:
        tokenizer, max_length, what = lengths
        try:
            before = data.n_dropped
            data = check_lengths(data, tokenizer, max_length, on_bad_rows="skip")
            length_line = f"  lengths: {what}; {data.n_dropped - before} rows longer"
        except DataValidationError as e:  # every row too long, or a chat template that cannot cut completions out
            return "\n".join([f"unusable: {name}", f"  lengths: {what}", f"  error: {e}"])
    verdict = "problems" if data.n_dropped else "ok"
    lines = [
        f"{verdict}: {name}",
        f"  format: {data.format}",
        f"  rows: {len(data)} valid, {data.n_dropped} bad, {len(data) + data.n_dropped} read",
        f"  columns: {', '.join(map(str, data.frame.columns))}",
        f"  fingerprint: {data.fingerprint}",
    ]
    if data.format == "rankings":
        sizes = data.frame["ranking"].map(len)
        lines.append(f"  completions per ranking: {sizes.min()}-{sizes.max()}")
    if length_line:
        lines.append(length_line)
    if data.problems:
        lines.append("  problems (rows dropped with on_bad_rows='skip'):")
        lines += [f"    {p}" for p in data.problems[:max_problems]]
        if len(data.problems) > max_problems:
            lines.append(f"    ... and {len(data.problems) - max_problems} more")
    return "\n".join(lines)
