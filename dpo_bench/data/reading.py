"""Reading a file, a folder of shards, a save_to_disk directory or a hub dataset as rows."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import LOCAL_SUFFIXES, DataValidationError, HubUnreachableError, _ABSENT
from .rows import _describe


_Rows = list[tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class HubOptions:
    """Which data of a hub dataset to read: ``datasets.load_dataset``'s ``name`` (the dataset's
    configuration), ``revision`` (branch, tag or commit) and ``data_files`` (files or globs within the
    repository). Empty: the dataset's defaults. Local sources ignore them."""

    name: str = ""
    revision: str = ""
    data_files: tuple[str, ...] = ()

    def load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"name": self.name, "revision": self.revision, "data_files": list(self.data_files)}
        return {k: v for k, v in kwargs.items() if v}

    def describe(self) -> str:
        """' (configuration x, revision y, files z)', or '' for the defaults."""
        parts = [f"{what} {value}" for what, value in (("configuration", self.name), ("revision", self.revision),
                                                      ("files", ", ".join(self.data_files))) if value]
        return f" ({'; '.join(parts)})" if parts else ""


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
    """Hub ids are 'name' or 'owner/name'; anything else path-shaped (./x, /x, ~/x, a/b/c, x.jsonl,
    a glob such as data/*.jsonl) is a local path, which when missing is a missing file, never a hub
    lookup."""
    return (
        source.startswith(("/", "~", "."))
        or "\\" in source
        or source.count("/") > 1
        or source.lower().endswith(LOCAL_SUFFIXES)
        or glob.has_magic(source)
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
    _one_type(shards, name, "folder")

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


def _one_type(shards: Sequence[Path], name: str, what: str) -> None:
    types = sorted({p.suffix.lower() for p in shards})
    if len(types) > 1:
        raise DataValidationError(
            name, None, None, f"{what} mixes shard types ({', '.join(types)}); keep one type per dataset, or name a file"
        )


def glob_matches(pattern: str) -> list[Path]:
    """The files a glob names (``**`` spans folders), in name order; [] for a name that is no glob."""
    if not glob.has_magic(pattern):
        return []
    return sorted(p for p in map(Path, glob.glob(os.path.expanduser(pattern), recursive=True))
                  if p.is_file() and not p.name.startswith("."))


def local_source_exists(name: str) -> bool:
    """Whether a data name is a local file, folder, or a glob that matches a file."""
    return bool(name) and (Path(name).expanduser().exists() or bool(glob_matches(name)))


def _glob_files(pattern: str) -> list[Path]:
    """The files a glob names (``**`` spans folders), in name order: one type of data file."""
    files = glob_matches(pattern)
    if not files:
        raise FileNotFoundError(f"preference data not found: no file matches {pattern}")
    others = [p.name for p in files if p.suffix.lower() not in LOCAL_SUFFIXES]
    if others:
        raise DataValidationError(
            pattern, None, None, f"the pattern also matches {', '.join(others[:5])}; match only {', '.join(LOCAL_SUFFIXES)} files"
        )
    _one_type(files, pattern, "the pattern")
    return files


def _read_shards(
    files: Sequence[Path], name: str, max_rows: int | None, in_folder: bool = True
) -> tuple[_Rows, list[DataValidationError], list[tuple[str, int]]]:
    """Files read as one dataset in the given order; a shard's errors name it (``name``/file in a
    folder, the file's own path for a glob) and its own row."""
    rows: _Rows = []
    problems: list[DataValidationError] = []
    shards: list[tuple[str, int]] = []
    start = 0
    for file in files:
        if max_rows is not None and start >= max_rows:
            break
        shard = os.path.join(name, file.name) if in_folder else str(file)
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
    source: str | os.PathLike, split: str, max_rows: int | None, trust_remote_code: bool, hub: HubOptions | None = None,
) -> tuple[str, _Rows, list[DataValidationError], list[tuple[str, int]]]:
    """(name, rows, problems of rows that could not be parsed, shards): ``shards`` is empty
    unless ``source`` is a folder of shards or a glob (see :data:`_Shards`)."""
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return name, _read_saved_dataset(path, name, split, max_rows), [], []
        return name, *_read_shards(_shard_files(path, name, split), name, max_rows)
    if path.is_file():
        return name, *_read_file(path, name, max_rows), []
    if not isinstance(source, os.PathLike) and glob.has_magic(name):
        return name, *_read_shards(_glob_files(name), name, max_rows, in_folder=False)
    if isinstance(source, os.PathLike) or looks_like_path(name):
        raise FileNotFoundError(f"preference data not found: {name}")
    return name, _read_hub(name, split, max_rows, trust_remote_code, hub or HubOptions()), [], []


def _read_hub(name: str, split: str, max_rows: int | None, trust_remote_code: bool, hub: HubOptions) -> _Rows:
    """A hub dataset's rows through ``datasets.load_dataset``; with ``max_rows``, streamed, so that
    only the first rows are downloaded."""
    import datasets

    # Hub datasets are data only unless the caller explicitly trusts the repository's code.
    kwargs = {**hub.load_kwargs(), **({"trust_remote_code": True} if trust_remote_code else {})}
    try:
        if max_rows is None:
            return _dataset_rows(datasets.load_dataset(name, split=split, **kwargs), None)
        stream = datasets.load_dataset(name, split=split, streaming=True, **kwargs)
        records = list(stream.take(max_rows))
        columns = list(stream.column_names or (records[0] if records else []))
        return _table_rows(columns, records)
    except ConnectionError:
        raise HubUnreachableError(name, offline=bool(datasets.config.HF_HUB_OFFLINE)) from None
    except (ValueError, FileNotFoundError) as e:
        # datasets' words for a configuration, split, revision or file the dataset does not have
        # (DatasetNotFoundError is a FileNotFoundError), one line.
        raise DataValidationError(name + hub.describe(), None, None, _first_line(e)) from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_table(
    source: str | os.PathLike, split: str = "train", max_rows: int | None = None, trust_remote_code: bool = False,
    column_map: Mapping[str, str] | None = None, hub: HubOptions | None = None,
) -> tuple[str, pd.DataFrame, list[DataValidationError]]:
    """(name, frame, problems of rows that could not be parsed): any source the preference loader
    reads (a file, a folder of shards, a glob, a saved dataset, a hub id with ``hub``'s options), its
    columns renamed by ``column_map``, not validated as preferences: for data of another kind (the hf
    task's texts)."""
    name, rows, problems, _ = _read_source(source, split, max_rows, trust_remote_code, hub)
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


