"""A row's values checked and read in each of TRL's preference formats."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataValidationError, _ABSENT, _Bad

ROLES = frozenset({"system", "user", "assistant", "tool"})
# Optional message keys passed on to the chat template, beside role and content.
_MESSAGE_EXTRAS = ("tool_calls", "name", "tool_call_id")


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


