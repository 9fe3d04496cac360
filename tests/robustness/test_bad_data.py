"""Broken preference data: one fixture per kind of bad row, each with one specific message.

Every fixture in tests/data/corrupt/ is listed in CASES with the row, the field and the words
its error must contain; a fixture not listed fails `test_every_fixture_is_covered`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpo_bench.data import (
    DataValidationError,
    DataValidationErrors,
    check_data,
    check_lengths,
    load_preferences,
)

CORRUPT = Path(__file__).parent.parent / "data" / "corrupt"


@dataclass(frozen=True)
class Case:
    file: str
    row: int | None  # the bad row, or None for a file- or column-level problem
    field: str | None
    message: str  # words the problem must contain
    n_rows: int = 0  # rows in the file (bad one included), for the skip check
    max_length: int | None = None  # run check_lengths with this context size


CASES = [
    Case("missing_column.jsonl", None, "rejected", "is missing (standard format)"),
    Case("misspelled_column.jsonl", None, "chosen", "found 'choosen' — did you mean it? use column_map"),
    Case("empty_string.jsonl", 1, "chosen", "empty string", 4),
    Case("whitespace_only.jsonl", 2, "rejected", "whitespace-only string", 4),
    Case("null_value.jsonl", 1, "prompt", "missing value (null)", 4),
    Case("nan_value.jsonl", 1, "chosen", "missing value (NaN)", 3),
    Case("number_value.jsonl", 1, "chosen", "expected a string, got a number (42)", 4),
    Case("list_value.jsonl", 2, "rejected", "expected a string, got a list of 2 item(s)", 4),
    Case("chosen_equals_rejected.jsonl", 1, "rejected", "identical to 'chosen'", 4),
    Case("duplicate_row.jsonl", 2, None, "duplicate of row 0", 4),
    Case("missing_key_in_row.jsonl", 1, "rejected", "missing from this row", 4),
    Case("not_an_object.jsonl", 1, None, "expected a JSON object, got a list of 3 item(s)", 4),
    Case("invalid_utf8.jsonl", 1, None, "invalid UTF-8 (byte 0xff on line 2)", 3),
    Case("truncated_json.jsonl", 2, None, "not valid JSON (line 3, column 33: Unterminated string", 3),
    Case("empty_file.jsonl", None, None, "file is empty"),
    Case("ranking_one_completion.jsonl", 1, "ranking", "a ranking needs at least 2 completions, got 1", 4),
    Case("ranking_repeated_completion.jsonl", 2, "ranking[2]", "repeats ranking[0]", 4),
    Case("unknown_role.jsonl", 1, "chosen[0].role", "unknown role 'bot'; expected one of assistant, system, tool, user", 4),
    Case("message_missing_content.jsonl", 1, "prompt[0]", "message is missing 'content'", 4),
    Case("implicit_no_common_prefix.jsonl", 1, "chosen", "shares no common prefix with 'rejected'", 3),
    Case("prompt_too_long.jsonl", 1, "prompt", "the prompt alone is 20 tokens, more than max_length 16", 4, 16),
    Case("completion_too_long.jsonl", 2, "rejected", "prompt + completion is 22 tokens, more than max_length 16", 4, 16),
    Case("csv_missing_field.csv", 1, None, "has 2 field(s) but the header has 3 (line 3)", 3),
    Case("csv_invalid_utf8.csv", 1, "rejected", "invalid UTF-8 (line 3)", 3),
    Case("csv_header_only.csv", None, None, "no rows: the file has a header but no data rows"),
    Case("not_parquet.parquet", None, None, "not a readable parquet file"),
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word (unknown words -> [UNK]), no special tokens."""
    vocab = {"[UNK]": 0, "a": 1, "story": 2, "lovely": 3, "boring": 4, "word": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def load(case: Case, on_bad_rows: str):
    data = load_preferences(CORRUPT / case.file, on_bad_rows=on_bad_rows)
    if case.max_length is not None:
        data = check_lengths(data, word_tokenizer(), case.max_length, on_bad_rows=on_bad_rows)
    return data


def test_every_fixture_is_covered():
    assert sorted(p.name for p in CORRUPT.iterdir()) == sorted(c.file for c in CASES)


def test_messages_are_distinct():
    assert len({c.message for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_error_names_file_row_and_field(case: Case):
    with pytest.raises(DataValidationError) as info:
        load(case, "error")
    error = info.value
    assert not isinstance(error, DataValidationErrors)
    assert (error.row, error.field) == (case.row, case.field)
    assert case.message in error.problem
    text = str(error)
    assert case.file in text
    if case.row is not None:
        assert f"row {case.row}" in text
    if case.field is not None:
        assert f"'{case.field}'" in text


@pytest.mark.parametrize("case", [c for c in CASES if c.row is not None], ids=lambda c: c.file)
def test_skip_drops_exactly_the_bad_row(case: Case):
    data = load(case, "skip")
    assert data.n_dropped == 1
    assert len(data) == case.n_rows - 1
    assert [(p.row, p.field) for p in data.problems] == [(case.row, case.field)]
    assert case.message in data.problems[0].problem
    assert case.row not in data.frame.index
    assert sorted(data.frame.index) == [r for r in range(case.n_rows) if r != case.row]


@pytest.mark.parametrize("case", [c for c in CASES if c.row is None], ids=lambda c: c.file)
def test_skip_cannot_rescue_a_file_level_problem(case: Case):
    with pytest.raises(DataValidationError) as info:
        load(case, "skip")
    assert case.message in info.value.problem


def test_check_data_lists_the_bad_row():
    report = check_data(CORRUPT / "empty_string.jsonl")
    assert report.splitlines()[0] == f"problems: {CORRUPT / 'empty_string.jsonl'}"
    assert "rows: 3 valid, 1 bad, 4 read" in report
    assert "row 1, field 'chosen': empty string" in report
    assert check_data(CORRUPT / "empty_file.jsonl").startswith("unusable:")


@pytest.mark.parametrize("rows, says", [
    ([{"prompt": "a", "completion": " b", "label": True}, {"prompt": "c", "completion": " d", "label": False}],
     "unpaired preference data (TRL's prompt/completion/label, as KTO trains on)"),
    ([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}], "label": True}],
     "unpaired preference data"),
    ([{"prompt": "a"}, {"prompt": "b"}], "prompt-only data (TRL's prompt column alone"),
])
def test_a_format_the_benchmark_does_not_use_is_named_as_such(tmp_path, rows, says):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_data(path)
    assert report.splitlines()[0] == f"unusable: {path}"
    assert f"error: {path}: {says}" in report and "is missing" not in report


def test_all_rows_bad_with_skip_lists_every_problem(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "", "rejected": "b"}\n{"prompt": "a", "chosen": 1, "rejected": "b"}\n')
    with pytest.raises(DataValidationErrors) as info:
        load_preferences(path, on_bad_rows="skip")
    assert [(e.row, e.field) for e in info.value.errors] == [(0, "chosen"), (1, "chosen")]


def test_first_bad_row_wins_in_row_order(tmp_path):
    # A parse error late in the file must not hide an earlier bad value.
    path = tmp_path / "two_bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "a", "chosen": "", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(DataValidationError) as info:
        load_preferences(path)
    assert (info.value.row, info.value.field) == (1, "chosen")


# ------------------------------------------------------------------------ property-based


CELLS = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["", " ", "\t\n", "a", "b", "é", "日本", "🙂", "\u2028"]),
    st.none(),
    st.integers(-3, 3),
)
ROWS = st.lists(st.fixed_dictionaries({"prompt": CELLS, "chosen": CELLS, "rejected": CELLS}), max_size=7)


def bad_rows(rows: list[dict]) -> list[int]:
    """The oracle: which rows the loader must reject."""
    bad, seen = [], set()
    for i, row in enumerate(rows):
        values = (row["prompt"], row["chosen"], row["rejected"])
        ok = all(isinstance(v, str) and v.strip() for v in values) and row["chosen"] != row["rejected"]
        if ok and values not in seen:
            seen.add(values)
        else:
            bad.append(i)
    return bad


def load_generated(rows: list[dict], kind: str, on_bad_rows: str, directory: Path):
    if kind == "frame":
        columns = {c: pd.Series([r[c] for r in rows], dtype=object) for c in ("prompt", "chosen", "rejected")}
        return load_preferences(pd.DataFrame(columns), on_bad_rows=on_bad_rows)
    path = directory / "generated.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return load_preferences(path, on_bad_rows=on_bad_rows)


@pytest.mark.parametrize("kind", ["jsonl", "frame"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=ROWS, on_bad_rows=st.sampled_from(["error", "skip"]))
def test_loader_returns_valid_rows_or_names_a_bad_one(kind, rows, on_bad_rows):
    bad = bad_rows(rows)
    good = [i for i in range(len(rows)) if i not in bad]
    with tempfile.TemporaryDirectory() as directory:
        try:
            data = load_generated(rows, kind, on_bad_rows, Path(directory))
        except DataValidationErrors as e:
            assert on_bad_rows == "skip" and not good
            assert [err.row for err in e.errors] == bad
            return
        except DataValidationError as e:
            if e.row is None:
                assert not rows and e.problem in ("no rows", "file is empty")
            else:
                assert on_bad_rows == "error" and e.row == bad[0]
            return
    assert on_bad_rows == "skip" or not bad
    assert list(data.frame.index) == good
    assert data.n_dropped == len(bad) and [p.row for p in data.problems] == bad
    expected = [[rows[i][c] for c in ("prompt", "chosen", "rejected")] for i in good]
    assert data.frame.values.tolist() == expected
