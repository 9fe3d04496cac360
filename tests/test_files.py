"""The one atomic writer: a target is replaced whole when its block finishes, and left as it was
(with no temporary beside it) when the block raises; directories alike."""

from __future__ import annotations

import os

import pytest

from dpo_bench.files import atomic_path, atomic_write, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "a": 1\n}'
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "policy"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "old.bin").write_bytes(b"0")
    with atomic_path(target, directory=True) as tmp:
        assert not any(tmp.iterdir())  # an empty directory to fill
        (tmp / "new.bin").write_bytes(b"1")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    with pytest.raises(ValueError):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "partial.bin").write_bytes(b"2")
            raise ValueError
    assert [p.name for p in target.iterdir()] == ["new.bin"] and [p.name for p in tmp_path.iterdir()] == ["policy"]


def test_text_is_written_as_utf8_with_the_usual_permissions(tmp_path):
    path = atomic_write(tmp_path / "report.md", "β = 0.1")
    assert path.read_bytes() == "β = 0.1".encode("utf-8")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() would give, not a private temporary's
