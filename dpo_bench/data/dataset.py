"""The validated preference dataset: loading, fingerprints, conversions, writing and check-data."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..files import atomic_path

from .errors import DataValidationError, DataValidationErrors
from .reading import HubOptions, _apply_column_map, _read_source, _rows_to_frame
from .rows import CHAT_FORMATS, _plain
from .validation import BAD_ROW_POLICIES, _build_frame, _row_error, _row_numbers, _validate

# Bump when the canonical serialisation changes, so old and new fingerprints never collide.
_FINGERPRINT_VERSION = "dpo-bench-preferences-v1"


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
    hub: HubOptions | None = None,
) -> PreferenceData:
    """Load and validate preference data.

    ``source``: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, a directory
    written by ``datasets.Dataset.save_to_disk`` (``split`` picks from a DatasetDict), a folder
    of such files read as one dataset in name order (``split`` picks ``train-*`` from beside
    ``test-*``), a glob of such files (``data/train-*.jsonl``, ``**`` across folders) read the same
    way, a DataFrame, or else a hub id passed to ``datasets.load_dataset(source, split=split)`` with
    ``hub``'s configuration name, revision and data files (streamed when ``max_rows`` is set).
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
        name, rows, parse_problems, shards = _read_source(source, split, max_rows, trust_remote_code, hub)
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
