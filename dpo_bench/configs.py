"""Typed, frozen, validated configs, read from TOML or dicts.

Every config is a frozen dataclass whose fields carry a one-line doc in ``metadata["doc"]``;
:func:`from_dict` builds one from plain data and names the offending field (``sft.lr``) on an
unknown key or a value of the wrong type, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import MISSING, fields, is_dataclass
from typing import Any


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the field."""


class TRLNameNote(UserWarning):
    """A config key given by TRL's name was read as this benchmark's (the CLI prints it as a note)."""


#: TRL's names (TrainingArguments, DPOConfig, PPOConfig) for fields this benchmark names otherwise.
#: Accepted in any config table whose class has the field, translated with a :class:`TRLNameNote`.
TRL_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "max_steps": "steps",
    "gradient_accumulation_steps": "accumulation_steps",
    "lr_scheduler_type": "lr_schedule",
    "label_smoothing": "epsilon",
    "num_ppo_epochs": "epochs",
    "num_mini_batches": "n_minibatches",
    "cliprange": "clip_range",
    "cliprange_value": "value_clip",
}


def translate_trl_names(data: dict, names: list[str], where: str = "") -> dict:
    """``data`` with every key that is TRL's name for a field in ``names`` renamed to ours (a note
    each); other keys untouched."""
    out = dict(data)
    for key in list(out):
        ours = TRL_NAMES.get(key)
        if key not in names and ours in names and ours not in out:
            out[ours] = out.pop(key)
            warnings.warn(TRLNameNote(f"{_join(where, key)} is TRL's name; read as {_join(where, ours)}"), stacklevel=3)
    return out


def field(default: Any = MISSING, doc: str = "", default_factory: Any = MISSING) -> Any:
    """A dataclass field with a documentation string (shown by ``dpo-bench methods`` and --help)."""
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def field_docs(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, doc) for every field of a config class."""
    out = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        out.append((f.name, default, f.metadata.get("doc", "")))
    return out


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not of type {_type_name(annotation)}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected nothing, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    data = translate_trl_names(data, names, where)
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
        raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    kwargs = {k: _check_type(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # ConfigError included: name where it happened
        message = str(e)
        if not where or message.startswith((f"{where}.", f"{where}:")):
            raise ConfigError(message) from e
        raise ConfigError(f"{where}: {message}") from e


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_dict(config: Any) -> Any:
    """Plain, JSON-ready data for a config (tuples become lists)."""
    if is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def probability(name: str, value: float, upper_open: bool = False) -> None:
    ok = 0 <= value < 1 if upper_open else 0 <= value <= 1
    if not ok:
        raise ConfigError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value}")
