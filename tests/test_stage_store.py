"""The stage store's mechanics: stale temporary builds of killed processes are removed, two
processes finishing the same stage keep one, Dask workers share loaded models across cells, and
length-grouped batches still visit every item once per epoch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_bench.bench import load_config
from dpo_bench.stage_store import _HOST
from dpo_bench.stages import Bench
from dpo_engine.optim import minibatches


def _bench(tmp_path) -> Bench:
    return Bench(load_config("quick", overrides={"task": "bandit"}), tmp_path, progress=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_build_is_cleaned_up_and_a_live_one_is_not(tmp_path):
    bench = _bench(tmp_path)
    first = bench.run_stage("probe", {"x": 1}, lambda out: (out / "a.txt").write_text("1"))
    stage_dir = first.path.parent
    dead = stage_dir / f".{first.key}.tmp-{_HOST}-{_dead_pid()}"
    alive = stage_dir / f".{first.key}.tmp-{_HOST}-{os.getppid()}"
    other_host = stage_dir / f".{first.key}.tmp-otherhost-{_dead_pid()}"
    for d in (dead, alive, other_host):
        d.mkdir()
        (d / "partial.bin").write_bytes(b"half")
    rerun = Bench(bench.config, tmp_path, use_cache=False, progress=False)  # a later run with --no-cache
    again = rerun.run_stage("probe", {"x": 1}, lambda out: (out / "a.txt").write_text("1"))
    assert (again.path / "a.txt").read_text() == "1"
    assert not dead.exists()
    # A build still running here, or on another machine sharing the cache, is left alone.
    assert alive.exists() and other_host.exists()


def test_a_stage_finished_meanwhile_by_another_process_is_kept(tmp_path):
    bench = _bench(tmp_path)

    def build(out):
        (out / "value.txt").write_text("ours")
        # Another process completes the same stage while this one is still building.
        target = out.parent / out.name.split(".tmp-")[0].lstrip(".")
        target.mkdir()
        (target / "value.txt").write_text("theirs")
        (target / "sub").mkdir()
        (target / "_complete.json").write_text("{}")

    # ``run_stage`` removes an existing directory before its rename, as --no-cache does; a
    # directory that reappears in between makes the rename fail, which must not fail the run.
    import dpo_bench.stage_store as store

    real_rmtree = store.shutil.rmtree
    store.shutil.rmtree = lambda path, ignore_errors=False: real_rmtree(path, ignore_errors) if ".tmp-" in path.name else None
    try:
        stage = bench.run_stage("race", {"x": 2}, build)
    finally:
        store.shutil.rmtree = real_rmtree
    assert (stage.path / "value.txt").read_text() == "theirs"
    assert not list(stage.path.parent.glob(".*tmp-*"))


def test_a_stage_asked_for_at_once_is_built_once_and_read_by_both(tmp_path):
    """Two runs (or a worker and the flow) on one cache that ask for the same stage together: the
    second waits for the first's build and reads it (the lock), instead of building it again."""
    builds = []

    def build(out):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other thread to ask while this one builds
        (out / "value.txt").write_text("built once")

    benches = [_bench(tmp_path), _bench(tmp_path)]
    stages = [None, None]

    def ask(i):
        stages[i] = benches[i].run_stage("shared", {"x": 3}, build)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert stages[0].path == stages[1].path and (stages[0].path / "value.txt").read_text() == "built once"
    assert sorted(s.cached for s in stages) == [False, True]  # the waiter read the builder's stage


def test_unpickled_benches_of_one_run_share_their_loaded_models(tmp_path):
    bench = _bench(tmp_path)
    a, b = pickle.loads(pickle.dumps(bench)), pickle.loads(pickle.dumps(bench))
    loads = []
    a.memo(("model", "k"), lambda: loads.append(1) or "loaded")
    assert b.memo(("model", "k"), lambda: loads.append(1) or "again") == "loaded" and loads == [1]
    # Another cache directory (another run's stages) does not see them.
    other = pickle.loads(pickle.dumps(_bench(tmp_path / "other")))
    assert other.memo(("model", "k"), lambda: "fresh") == "fresh"


def test_without_the_cache_a_run_builds_each_stage_once(tmp_path):
    config = load_config("quick", overrides={"task": "bandit"})
    Bench(config, tmp_path, use_cache=False).run_stage("probe", {"x": 1}, lambda out: (out / "v.txt").write_text("earlier run"))
    run = Bench(config, tmp_path, use_cache=False)  # --no-cache: what an earlier run built is built again...
    built = run.run_stage("probe", {"x": 1}, lambda out: (out / "v.txt").write_text("this run"))
    assert (built.path / "v.txt").read_text() == "this run"
    # ...once: another cell or worker of the same run that asks for it gets this run's build.
    worker = pickle.loads(pickle.dumps(run))
    again = worker.run_stage("probe", {"x": 1}, lambda out: pytest.fail("built twice in one run"))
    assert again.path == built.path and (again.path / "v.txt").read_text() == "this run"


def test_a_run_keys_every_stage_on_the_code_version_it_started_with(tmp_path, monkeypatch):
    import dataclasses

    import dpo_bench.stages.context as context

    bench = _bench(tmp_path)
    started = bench.version
    key = bench.run_stage("probe", {"x": 1}, lambda out: None).key
    monkeypatch.setattr(context, "code_version", lambda: "edited meanwhile")
    # Its workers (a pickled Bench) and its variants (another label temperature) keep the version,
    # so they find the stages this process built; a new run takes the source as it is now.
    worker = pickle.loads(pickle.dumps(bench))
    variant = dataclasses.replace(bench, config=dataclasses.replace(bench.config, seed=1))
    assert worker.version == variant.version == started
    assert worker.run_stage("probe", {"x": 1}, lambda out: pytest.fail("rebuilt")).key == key
    assert _bench(tmp_path).version == "edited meanwhile"


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 400), batch_size=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_length_grouped_batches_visit_every_item_once_per_epoch(n, batch_size, seed):
    lengths = torch.randint(1, 40, (n,), generator=torch.Generator().manual_seed(seed))
    size = min(batch_size, n)
    per_epoch = n // size
    batches = minibatches(n, batch_size, torch.Generator().manual_seed(seed), lengths, window=4)
    epoch = [next(batches) for _ in range(per_epoch)]
    seen = torch.cat(epoch)
    assert all(len(b) == size for b in epoch)
    assert len(seen) == per_epoch * size and len(set(seen.tolist())) == len(seen)


def test_length_grouping_cuts_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 33, (6400,), generator=generator)

    def padded_tokens(batches) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in (next(batches) for _ in range(100)))

    plain = padded_tokens(minibatches(6400, 64, torch.Generator().manual_seed(1)))
    grouped = padded_tokens(minibatches(6400, 64, torch.Generator().manual_seed(1), lengths))
    assert grouped < 0.7 * plain
    assert grouped >= int(lengths.sum())  # never fewer tokens than the data has


@pytest.mark.parametrize("task", ["sentiment", "bandit"])
def test_task_summary_without_loading_equals_the_loaded_tasks(tmp_path, task):
    from dpo_bench.stages import prepare_task

    bench = Bench(load_config("quick", overrides={"task": task}), tmp_path, progress=False)
    stage = prepare_task(bench)
    unloaded = bench.task_summary(stage)
    loaded_task = bench.task(stage)
    assert bench.task_summary(stage) == unloaded
    assert unloaded["fingerprints"] == dict(getattr(loaded_task, "fingerprints", {}))
    assert unloaded["reward_metric"] == loaded_task.reward_metric and unloaded["exact"] == loaded_task.exact
