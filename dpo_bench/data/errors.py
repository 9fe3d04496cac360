"""Data errors: one line naming the source, row and field; the hub out of reach."""

from __future__ import annotations

from collections.abc import Sequence


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


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


