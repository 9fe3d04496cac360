"""Prefect flows and the ``dpo-bench`` command: the only layer that imports prefect."""
