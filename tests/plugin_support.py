"""Install the README's "Add a method" example as a real package with an entry point.

The README's code block is the plugin, word for word: a test that runs it proves the section is
complete. The package is written to a temporary directory with a ``.dist-info`` whose
``entry_points.txt`` names it in the ``dpo_bench.methods`` group, exactly as ``pip install``
of a third-party package would.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MODULE = "dpo_bench_dpop"


def readme_plugin_source() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example-plugin -->\s*```python\n(.*?)```", text, re.S)
    if not match:
        raise AssertionError("README.md has no code block after <!-- example-plugin -->")
    return match.group(1)


def install_readme_plugin() -> Path:
    if MODULE in sys.modules:
        return Path(sys.modules[MODULE].__file__).parent
    root = Path(tempfile.mkdtemp(prefix="dpo-bench-plugin-"))
    (root / f"{MODULE}.py").write_text(readme_plugin_source())
    info = root / f"{MODULE}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {MODULE}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dpo_bench.methods]\ndpop = {MODULE}\n")
    sys.path.insert(0, str(root))
    return root
