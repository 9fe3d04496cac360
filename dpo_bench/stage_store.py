"""The content-addressed stage store: no ML imports, so an orchestrator can read it.

Every expensive stage (task data, SFT, preference candidates and labels, reference log-probs,
reward model, reference evaluation, each grid cell, what cells share such as best-of-N's draws)
writes its outputs to ``<cache>/<stage>/<key>/``. The key hashes the stage's resolved config, the
keys of its upstream stages and the library's code version, so a second run recomputes nothing,
changing one method's β retrains only that cell, and changing the SFT config retrains everything
downstream. Outputs are built in a temporary directory and renamed into place, so a run killed at
any point leaves nothing half-written that a later run would trust; a build holds a lock, so two
processes that ask for one stage build it once. Stages pass :class:`Stage` handles (a key and a
path), never tensors, so they cross process boundaries (Dask workers) and hash the same everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import pandas as pd

from .files import atomic_path, write_json


def code_version() -> str:
    """Hash of the library's source: a code change invalidates every cached stage. The report
    package is left out: no stage reads it (its figures are cached on a hash of their own)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for base in (root, root.parent / "reward", root.parent / "dpo_engine"):
        for path in sorted(p for p in base.rglob("*.py") if (root / "report") not in p.parents):
            h.update(str(path.relative_to(base.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Stage:
    """A finished stage: its cache key and the directory holding its outputs."""

    name: str
    key: str
    path: Path
    cached: bool = False
    seconds: float = 0.0


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


_HOST = socket.gethostname().replace("-", "_")


def _remove_stale_builds(path: Path) -> None:
    """Delete the temporary build directories of ``path``'s stage left by killed processes of this host."""
    for tmp in path.parent.glob(f".{path.name}.tmp-{_HOST}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


# The stage locks' directory in the cache (beside the stages' directories, not inside them).
LOCKS = ".locks"


@contextlib.contextmanager
def build_lock(lock_file: Path):
    """An exclusive lock while a stage is built: ``flock`` on ``lock_file`` (released by the OS if the
    holder dies). The lock files stay: removing one while another process waits on it would let a
    third lock a new file at once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        if fcntl is None:  # no flock on this platform: builds may repeat, the rename keeps one
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def process_alive(pid: int) -> bool:
    """Whether a process of this host has ``pid`` (one we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PROCESS_MEMO: dict[str, dict] = {}


def _process_memo(scope: str) -> dict:
    if scope not in _PROCESS_MEMO:
        _PROCESS_MEMO.clear()  # a worker holds one run's models at a time
    return _PROCESS_MEMO.setdefault(scope, {})


def built_threads(stage: Stage) -> int | None:
    """The thread count (torch's) the stage was built with. Its numbers depend on it at float level
    (the order of parallel sums), so a run records it; the cache key leaves it out."""
    try:
        return json.loads((stage.path / "_complete.json").read_text()).get("torch_threads")
    except (OSError, ValueError):
        return None


class StageStore:
    """What makes a run's context a stage store: building a stage once under its key, reading it
    back, and a per-process memo of what its stages load. A subclass (a dataclass) holds the fields
    ``cache_dir``, ``use_cache``, ``version`` (the code version every key hashes: :func:`code_version`
    when empty), ``started`` (the run's start, wall clock) and ``_memo``, and may override the hooks
    :meth:`setup_threads`, :meth:`build_record` and :meth:`memo_scope`."""

    cache_dir: Path
    use_cache: bool
    version: str
    started: float
    _memo: dict

    def setup_threads(self) -> None:
        """Called before a stage is built (the run's thread count, for one)."""

    def build_record(self) -> dict:
        """What ``_complete.json`` records of the process that built a stage, besides its pid."""
        return {}

    def memo_scope(self) -> str:
        """The scope of the process memo a worker's unpickled copy shares (see ``__setstate__``)."""
        return str(Path(self.cache_dir).resolve())

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_memo"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # A Dask worker unpickles a run's context for every cell it runs: one memo per process and
        # scope lets the task, reference and reward model load once per worker, not once per cell.
        # Memo keys are content-addressed stage keys, so sharing them across cells is safe.
        self._memo = _process_memo(self.memo_scope())

    def run_stage(self, name: str, key_data: dict, build: Callable[[Path], None]) -> Stage:
        """The stage ``name`` keyed on ``key_data``: read from the store if it is there, else built
        by ``build(directory)`` and renamed into place."""
        key = stable_hash({"stage": name, "code": self.version, **key_data})[:24]
        path = Path(self.cache_dir) / name / key
        if (done := self._finished(name, key, path)) is not None:
            return done
        # One build at a time per stage across the processes of this machine (and of others, where the
        # shared filesystem honours flock): a Dask worker, a second run on the same cache or the flow
        # that asks for a stage another is building waits for it and reads it, instead of building
        # it again.
        with build_lock(Path(self.cache_dir) / LOCKS / name / f"{key}.lock"):
            if (done := self._finished(name, key, path)) is not None:
                return done
            return self._build(name, key, key_data, path, build)

    def _finished(self, name: str, key: str, path: Path) -> Stage | None:
        """The stage at ``path`` if it is complete and this run may read it, else None."""
        if (path / "_complete.json").exists():
            if self.use_cache:
                return Stage(name, key, path, cached=True)
            if self.built_this_run(path):
                return Stage(name, key, path, cached=False, seconds=0.0)
        return None

    def _build(self, name: str, key: str, key_data: dict, path: Path, build: Callable[[Path], None]) -> Stage:
        self.setup_threads()
        start = time.perf_counter()
        _remove_stale_builds(path)
        tmp = path.with_name(f".{key}.tmp-{_HOST}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        seconds = time.perf_counter() - start
        # pid (and, from the hook, torch's threads): where the stage ran (a Dask worker?) and how.
        write_json(tmp / "_complete.json", {"stage": name, "key": key, "seconds": seconds, "key_data": key_data,
                                            "pid": os.getpid(), **self.build_record()})
        if path.exists():
            if (path / "_complete.json").exists() and (self.use_cache or self.built_this_run(path)):
                # Another process built the same stage meanwhile (same key, same content): keep
                # theirs, which a third process may be reading.
                shutil.rmtree(tmp, ignore_errors=True)
                return Stage(name, key, path, cached=False, seconds=seconds)
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process built the same stage meanwhile (same key, same content): keep theirs.
            if not (path / "_complete.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return Stage(name, key, path, cached=False, seconds=seconds)

    def built_this_run(self, path: Path) -> bool:
        try:
            return (path / "_complete.json").stat().st_mtime >= self.started
        except FileNotFoundError:
            return False

    def memo(self, key: Any, load: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = load()
        return self._memo[key]
