"""Seeds for named units of work, stable across processes."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *names: object) -> int:
    """A seed for one named unit of work (a grid cell, a stage, a rank), stable across processes.

    Derived by hashing, so adding a method to the grid never changes another method's seed.
    """
    text = "/".join([str(seed), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
