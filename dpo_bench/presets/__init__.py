"""The configurations shipped with dpo-bench: one TOML file per preset (read by ``dpo_bench.bench``)."""

from importlib import resources


def preset_names() -> list[str]:
    """Names of the shipped presets. Lists files only, so `dpo-bench --help` need not load torch."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))
