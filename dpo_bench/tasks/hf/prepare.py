"""Preparing the hf task's data: preference pairs or texts read, split into train and eval prompts, and
checked against the model's positions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ...configs import ConfigError
from ...data import (
    CHAT_FORMATS, DataValidationError, check_lengths, glob_matches, load_preferences, read_table, render_conversational,
    unreachable,
)
from ...files import write_json
from ..base import fingerprint_strings
from .config import HFConfig


def prepare_preferences(config: HFConfig, tokenizer: Any, workdir: Path) -> dict:
    fmt = config.data_format

    def load(split: str):
        data = load_preferences(
            config.data, split=split, column_map=config.column_map or None, on_bad_rows=config.on_bad_rows,
            format=fmt, max_rows=config.max_rows or None, trust_remote_code=config.trust_remote_code,
            hub=config.hub_options,
        )
        data = check_lengths(data, tokenizer, config.max_length, on_bad_rows=config.on_bad_rows)
        frame = render_conversational(data, tokenizer) if data.format in CHAT_FORMATS else data.frame
        return data, frame.reset_index(drop=True)

    data, frame = load(config.data_split)
    if data.format == "rankings":
        sizes = frame["ranking"].map(len)
        if sizes.nunique() > 1:
            raise ValueError(f"{data.source}: rankings hold {sizes.min()} to {sizes.max()} completions; "
                             "every ranking needs the same number K")
    problems = [str(p) for p in data.problems]
    fingerprints = {"data": data.fingerprint}
    if config.eval_split:
        if Path(config.data).expanduser().is_file() or glob_matches(config.data):
            what = "a single file" if Path(config.data).expanduser().is_file() else "a glob of files"
            raise ValueError(f"eval_split: {config.data} is {what} with no splits; use eval_fraction instead")
        eval_data, eval_frame = load(config.eval_split)
        fingerprints["eval_data"] = eval_data.fingerprint
        problems += [str(p) for p in eval_data.problems]
        eval_prompts = _ordered_by_hash(list(dict.fromkeys(eval_frame["prompt"])), config.split_seed)[: config.max_eval_prompts]
        heldout = eval_frame[eval_frame["prompt"].isin(set(eval_prompts))]
        train = frame[~frame["prompt"].isin(set(eval_prompts))]
        frame = pd.concat([train.assign(split="train"), heldout.assign(split="heldout")], ignore_index=True)
        train_prompts = list(dict.fromkeys(train["prompt"]))
    else:
        train_prompts, eval_prompts = _split_or_explain(data.source, list(dict.fromkeys(frame["prompt"])), config.eval_fraction,
                                                        config.max_eval_prompts, config.split_seed)
        frame = frame.assign(split=np.where(frame["prompt"].isin(set(eval_prompts)), "heldout", "train"))
    if config.max_train_prompts:
        train_prompts = train_prompts[: config.max_train_prompts]
        frame = frame[(frame["split"] == "heldout") | frame["prompt"].isin(set(train_prompts))]
    if not train_prompts:
        raise DataValidationError(data.source, None, None, "no train prompts are left once the eval prompts are held out "
                                  "(hf.eval_split holds every prompt of the data?)")
    frame.reset_index(drop=True).to_parquet(workdir / "data.parquet", index=False)
    fingerprints.update(train_prompts=fingerprint_strings(train_prompts), eval_prompts=fingerprint_strings(eval_prompts))
    return {
        "format": data.format, "source": data.source, "train": train_prompts, "eval": eval_prompts,
        "fingerprints": fingerprints, "n_rows": int(len(frame)), "n_dropped": len(problems), "problems": problems[:20],
        "longest_prompt_tokens": _longest(tokenizer, eval_prompts + train_prompts, data.format in CHAT_FORMATS),
    }


def prepare_texts(config: HFConfig, tokenizer: Any, workdir: Path) -> dict:
    texts = _read_texts(config, config.data_split)
    if config.eval_split:
        eval_texts = _read_texts(config, config.eval_split)
        held = set(eval_texts)
        train_texts = [t for t in texts if t not in held]
    else:
        train_texts, eval_texts = _split_or_explain(config.data, texts, config.eval_fraction, len(texts), config.split_seed)
    rng = np.random.default_rng(config.split_seed)
    train_prompts = _prefixes(train_texts, tokenizer, config, rng)
    eval_prompts = _prefixes(_ordered_by_hash(eval_texts, config.split_seed), tokenizer, config, rng)
    seen = set(train_prompts)
    eval_prompts = [p for p in eval_prompts if p not in seen][: config.max_eval_prompts]
    if config.max_train_prompts:
        train_prompts = train_prompts[: config.max_train_prompts]
    if not train_prompts or not eval_prompts:
        raise ValueError(f"{config.data}: the texts give {len(train_prompts)} train and {len(eval_prompts)} eval prompts; need both")
    pd.DataFrame({"text": train_texts}).to_parquet(workdir / "texts.parquet", index=False)
    return {
        "format": "text", "source": config.data, "train": train_prompts, "eval": eval_prompts,
        "fingerprints": {"texts": fingerprint_strings(texts), "train_prompts": fingerprint_strings(train_prompts),
                         "eval_prompts": fingerprint_strings(eval_prompts)},
        "n_rows": len(texts), "n_dropped": 0, "problems": [],
        "longest_prompt_tokens": _longest(tokenizer, eval_prompts + train_prompts, False),
    }


def _read_texts(config: HFConfig, split: str) -> list[str]:
    """The distinct non-empty strings of the data's ``text`` column (after column_map)."""
    # The preference loader's readers: the same file types, hub access and error messages.
    name, frame, problems = read_table(config.data, split, config.max_rows or None, config.trust_remote_code,
                                       config.column_map or None, config.hub_options)
    if problems and config.on_bad_rows == "error":
        raise problems[0]
    if "text" not in frame.columns:
        found = ", ".join(f"'{c}'" for c in frame.columns) or "none"
        raise ValueError(f"{name}: text data needs a 'text' column (found {found}); map one with column_map")
    texts = [t.strip() for t in frame["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{name}: no non-empty text in column 'text'")
    return list(dict.fromkeys(texts))


def _prefixes(texts: Sequence[str], tokenizer: Any, config: HFConfig, rng: np.random.Generator) -> list[str]:
    """A prefix of each text, ``min_prompt_tokens``..``max_prompt_tokens`` tokens long (the DPO
    paper's IMDb prompts), decoded back to text; texts too short for theirs are skipped."""
    out = []
    for text in texts:
        n = int(rng.integers(config.min_prompt_tokens, config.max_prompt_tokens + 1))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > n:
            prefix = tokenizer.decode(ids[:n])
            if prefix.strip():
                out.append(prefix)
    return list(dict.fromkeys(out))


def _hash_unit(text: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{text}".encode()).digest()[:8], "little") / 2**64


def _ordered_by_hash(items: Sequence[str], seed: int) -> list[str]:
    return sorted(items, key=lambda t: _hash_unit(t, seed))


def _split_or_explain(source: str, prompts: Sequence[str], fraction: float, max_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """:func:`split_prompts`, its refusal as a data error naming the source (one line at the CLI)."""
    try:
        return split_prompts(prompts, fraction, max_eval, seed)
    except ValueError as e:
        raise DataValidationError(source, None, None, f"{e}; give more prompts, or hf.eval_split for separate eval data") from None


def split_prompts(prompts: Sequence[str], fraction: float, max_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, eval): a stable, hash-chosen ``fraction`` of the distinct prompts (at least one, at
    most ``max_eval``) is held out; both keep the data's order. Which prompts are held out depends
    on the prompt texts and ``seed`` only, not on the order of the rows."""
    prompts = list(dict.fromkeys(prompts))
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 distinct prompts to split into train and eval, got {len(prompts)}")
    n_eval = min(max(1, round(fraction * len(prompts))), max_eval, len(prompts) - 1)
    held = set(_ordered_by_hash(prompts, seed)[:n_eval])
    return [p for p in prompts if p not in held], [p for p in prompts if p in held]


def _longest(tokenizer: Any, prompts: Sequence[str], chat: bool) -> int:
    if not prompts:
        return 0
    return max(len(ids) for ids in tokenizer(list(prompts), add_special_tokens=not chat)["input_ids"])


#: hf.max_length when the model's positions allow it and the config leaves it at 0.
DEFAULT_MAX_LENGTH = 512


def model_positions(config: HFConfig) -> int | None:
    """The configured model's position limit: :func:`positions_of`."""
    return positions_of(config.model, config.revision_or_none, config.trust_remote_code)


def positions_of(model: str, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The model's position limit (``max_position_embeddings`` or ``n_positions``), None if its
    config states none or cannot be read here (the SFT stage, which loads the model, then says why;
    a hub that cannot be reached is the caller's error)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and unreachable(e):
            raise
        return None
    return getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None) or None


def default_max_length(positions: int | None) -> int:
    """What a model takes when ``hf.max_length`` is 0: its positions less one (EOS), at most
    :data:`DEFAULT_MAX_LENGTH`."""
    return min(DEFAULT_MAX_LENGTH, positions - 1) if positions else DEFAULT_MAX_LENGTH


def fitted_max_length(config: HFConfig, positions: int | None) -> int:
    """``hf.max_length``, or when it is 0 :func:`default_max_length`."""
    return config.max_length or default_max_length(positions)


def check_positions(config: HFConfig, info: dict, limit: int | None) -> None:
    """Fail before training when sequences would not fit the model's position embeddings."""
    if not limit:
        return
    if config.max_length + 1 > limit:
        raise ConfigError(f"hf.max_length: {config.max_length} tokens (+ EOS) exceed the model's {limit} positions")
    need = info["longest_prompt_tokens"] + config.max_new_tokens
    if need > limit:
        raise ConfigError(f"hf.max_new_tokens: the longest prompt ({info['longest_prompt_tokens']} tokens) + "
                          f"max_new_tokens ({config.max_new_tokens}) exceed the model's {limit} positions")


def source_fingerprint(name: str) -> str | None:
    """:func:`path_fingerprint` of a local file or folder; of a glob, its matches' paths and contents;
    None for a name that is neither (a hub id)."""
    path = Path(name).expanduser()
    if path.exists():
        return path_fingerprint(path)
    files = glob_matches(name)
    if not files:
        return None
    h = hashlib.sha256()
    for file in files:
        h.update(f"{file}\x00{path_fingerprint(file)}\n".encode())
    return h.hexdigest()


def path_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's file names, sizes and modification times
    (hashing gigabytes of weights on every run would cost more than it protects)."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        h.update(f"{file.relative_to(path)}\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def write_compact_json(path: Path, data: object) -> None:
    write_json(path, data, indent=None)


