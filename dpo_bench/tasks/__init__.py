"""Benchmark tasks: ``sentiment`` (default, offline), ``bandit`` (exact, tabular), ``hf`` (your model and data)."""

from .bandit import BanditConfig, BanditTask
from .base import TASKS, Task, get_task_class, register_task
from .hf import HFConfig, HFTask
from .sentiment import SentimentConfig, SentimentTask

TASK_CONFIGS = {name: cls.config_cls for name, cls in TASKS.items()}

__all__ = ["TASKS", "TASK_CONFIGS", "Task", "get_task_class", "register_task", "BanditConfig", "BanditTask",
           "HFConfig", "HFTask", "SentimentConfig", "SentimentTask"]
