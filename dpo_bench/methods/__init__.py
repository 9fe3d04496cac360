"""Methods: one file each, registered by import. See ``base.py`` for the registry."""

from . import best_of_n, dpo_family, ppo, sft, unlikelihood  # noqa: F401  (registration)
from .base import METHODS, Method, MethodContext, ModelPolicy, get_method, register_method

__all__ = ["METHODS", "Method", "MethodContext", "ModelPolicy", "get_method", "register_method"]
