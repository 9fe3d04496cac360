"""Atomic writes: the one way this library writes an output a reader may open at any moment.

Each write goes to a temporary name beside its target (so the rename stays on one filesystem) and
is renamed onto the target only when it finished: a reader, a later run or another process sees
the old file or the new one, never half of one, and a process killed mid-write leaves only a
temporary it can be told by (``.<name>.tmp-<pid>``). No torch here: the report and the results
store use it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path | str, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (an empty directory with ``directory``),
    renamed onto ``path`` when the block ends, replacing what was there; removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def atomic_write(path: Path | str, data: bytes | str) -> Path:
    """``data`` (text as UTF-8) into ``path``, atomically, with the usual permissions."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)
    return path


def write_json(path: Path | str, data: Any, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(data, indent=indent, default=str))
