"""The ``hf`` task: the same comparison on your own model and data.

The policy and the reference come from any ``transformers`` causal LM (a hub id or a local
directory, loaded through the same code path), the data from a hub dataset or a local
jsonl / json / parquet / csv file or folder of such shards in TRL's preference formats (standard,
implicit prompt, conversational with an explicit or implicit prompt, rankings; ``column_map``
renames columns) or, for the DPO paper's IMDb set-up,
plain texts whose token prefixes become prompts (``data_format = "text"``).

Prompts are split into train and eval prompts, disjoint: methods train on the train prompts'
pairs; the eval prompts' pairs are held out (the reward model's accuracy is measured on them) and
policies are evaluated by sampling completions for the eval prompts.

There is no gold reward unless one is configured: completions are judged by the learned reward
model (a proxy, the default), a sequence-classification model, or a registered Python scorer
(see :mod:`dpo_bench.judges`), and evaluation reports ``judge_reward`` unless the judge is
declared the ground truth (``judge_is_gold``, e.g. the paper's sentiment classifier).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
from torch import nn

from ..configs import ConfigError, field, positive
from ..files import write_json
from ..data import (
    CHAT_FORMATS, DataValidationError, HubUnreachableError, check_lengths, hub_offline, load_preferences, looks_like_path,
    read_table, render_conversational, unreachable,
)
from ..judges import ClassifierJudge, RewardModelJudge, judge_entry_points, known_judges, registered_judge
from ..policy import (
    LoRASpec, apply_lora, disable_dropout, enable_gradient_checkpointing, load_causal_lm, load_policy, load_tokenizer,
    resolve_dtype,
)
from .base import Task, fingerprint_strings, register_task

PREFERENCE_FORMATS = ("auto", "standard", "implicit", "conversational", "implicit_conversational", "rankings")


@dataclass(frozen=True)
class HFConfig:
    """Your own model and data: any transformers causal LM, any TRL-format preference dataset."""

    model: str = field("", "policy and reference: a hub id (gpt2-large) or a local model directory")
    revision: str = field("", "hub revision (branch, tag or commit) of model, tokenizer and judge; empty: the default branch")
    tokenizer: str = field("", "tokenizer hub id or directory; empty: the model's own")
    trust_remote_code: bool = field(False, "run custom code shipped with the model, tokenizer, judge or dataset (trusted repositories only)")
    safetensors_only: bool = field(True, "load weights from safetensors only; false also accepts pickled .bin weights (unpickling can run code)")
    data: str = field("", "the data: a hub dataset id, a save_to_disk directory, a local .jsonl/.json/.parquet/.csv file or a folder of such shards")
    data_split: str = field("train", "split of a hub or saved dataset to read")
    eval_split: str = field("", "split whose prompts are the eval prompts (e.g. test); empty: hold out eval_fraction of the prompts")
    data_format: Literal["auto", "standard", "implicit", "conversational", "implicit_conversational", "rankings", "text"] = field(
        "auto", "TRL format of the preference data (auto detects it), or text: plain texts whose token prefixes are the "
                "prompts, preferences then sampled from the reference and labelled by the judge (the DPO paper's IMDb set-up)")
    column_map: dict[str, str] = field(default_factory=dict, doc="rename source columns to the schema, e.g. "
                                       "{question = \"prompt\", response_j = \"chosen\", response_k = \"rejected\"}")
    max_rows: int = field(0, "read only the first rows of the data (0 = all)")
    on_bad_rows: Literal["error", "skip"] = field("error", "a malformed or too long row stops the run naming it (error) or is dropped and counted (skip)")
    eval_fraction: float = field(0.1, "share of the distinct prompts held out as eval prompts (without eval_split)")
    max_eval_prompts: int = field(200, "at most this many eval prompts (each is sampled at every checkpoint)")
    max_train_prompts: int = field(0, "at most this many train prompts (0 = all)")
    split_seed: int = field(0, "seed of the train/eval prompt split and of the text prefixes' lengths")
    min_prompt_tokens: int = field(2, "text data: shortest prefix taken as a prompt, in tokens")
    max_prompt_tokens: int = field(8, "text data: longest prefix taken as a prompt, in tokens")
    max_new_tokens: int = field(64, "completion length cap when sampling, in tokens")
    max_length: int = field(0, "prompt + completion cap in tokens: longer preference rows follow on_bad_rows; texts are cut; "
                               "0: what the model takes, its positions less one for EOS, at most 512")
    reference: Literal["preferred_ft", "text_ft", "model"] = field(
        "preferred_ft", "the reference: the model fine-tuned by maximum likelihood on the chosen completions (preferred_ft, "
                        "as the DPO paper without an SFT model), on the texts (text_ft, text data), or the model as is (model)")
    judge: str = field("reward_model", "what judges completions: reward_model (the learned RM, a proxy), classifier "
                                       "(judge_model), or a scorer registered in the entry-point group dpo_bench.judges")
    judge_model: str = field("", "judge = classifier: a sequence-classification model, hub id or directory (a reward model or a classifier)")
    judge_label: str = field("", "judge = classifier: the output whose logit is the reward (label name or index); empty: its only output")
    judge_is_gold: bool = field(False, "the judge is this task's ground truth (as the paper's sentiment classifier): report its scores as gold_reward")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "float32", "the weights' own precision: float32 (mixed precision comes from `precision`, with float32 weights); "
                   "bfloat16 or float16 store the weights and the optimiser's updates in that precision (less memory, and "
                   "updates below its resolution round away); auto: bfloat16 on a CUDA GPU that supports it, else float32")
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass: less memory, about 30% more compute")
    disable_dropout: bool = field(True, "zero the model's dropout (PPO's ratios and DPO's reference comparison assume a deterministic policy)")
    lora: LoRASpec = field(default_factory=LoRASpec, doc="LoRA adapters (needs the optional peft package) for the reference's fine-tuning and every method's policy; r = 0: full fine-tuning")

    def __post_init__(self) -> None:
        for name in ("max_eval_prompts", "max_new_tokens", "min_prompt_tokens"):
            positive(name, getattr(self, name))
        for name in ("max_rows", "max_train_prompts", "max_length"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.min_prompt_tokens > self.max_prompt_tokens:
            raise ConfigError(f"need min_prompt_tokens <= max_prompt_tokens, got {self.min_prompt_tokens}, {self.max_prompt_tokens}")
        if len(set(self.column_map.values())) != len(self.column_map):
            raise ConfigError(f"column_map maps two columns to the same name: {self.column_map}")
        text = self.data_format == "text"
        if text and self.reference == "preferred_ft":
            raise ConfigError("reference: text data has no chosen completions; use text_ft (fine-tune on the texts) or model")
        if not text and self.reference == "text_ft":
            raise ConfigError("reference: text_ft needs data_format = \"text\"; preference data uses preferred_ft or model")
        if self.judge == "reward_model":
            if self.judge_is_gold:
                raise ConfigError("judge_is_gold: the learned reward model is a proxy, never the gold reward")
            if text:
                raise ConfigError("judge: text data is labelled by the judge before any reward model exists; "
                                  "use a classifier or a registered judge")
        elif self.judge == "classifier":
            if not self.judge_model:
                raise ConfigError("judge_model: judge = \"classifier\" needs a sequence-classification model (hub id or directory)")
        elif self.judge not in judge_entry_points():
            raise ConfigError(f"judge: unknown judge '{self.judge}'; known judges: {', '.join(known_judges())}")

    def check_runnable(self, needs: set[str]) -> None:
        """What a run on this task needs beyond valid fields: a model, data, a judge for PPO-GT."""
        if not self.model:
            raise ConfigError("hf.model: name the model (a hub id or a directory), e.g. --model DIR")
        if not self.data:
            raise ConfigError("hf.data: name the data (a hub id or a file), e.g. --data FILE.jsonl")
        if "gold" in needs and self.judge == "reward_model":
            raise ConfigError("grid: a method that optimises the gold reward (ppo_gt) needs a judge other than the "
                              "learned reward model; set hf.judge or drop the method")

    @property
    def revision_or_none(self) -> str | None:
        return self.revision or None

    def downloads(self) -> list[tuple[str, str, str]]:
        """(what, name, where) for every model and dataset a run reads: ``hub`` or ``local``."""
        items = [("model", self.model, _where(self.model))]
        if self.tokenizer and self.tokenizer != self.model:
            items.append(("tokenizer", self.tokenizer, _where(self.tokenizer)))
        split = f" (splits {self.data_split}" + (f", {self.eval_split})" if self.eval_split else ")")
        items.append(("dataset", self.data + split, _where(self.data)))
        if self.judge == "classifier":
            items.append(("judge", self.judge_model, _where(self.judge_model)))
        return items

    def missing_paths(self) -> list[tuple[str, str]]:
        """(field, name) of each model, tokenizer, data or judge named by a path that does not exist:
        a path-shaped name is never a hub id, so it is a missing file, not a download."""
        names = {"model": self.model, "tokenizer": self.tokenizer, "data": self.data, "judge_model": self.judge_model}
        return [(key, name) for key, name in names.items()
                if name and looks_like_path(name) and not Path(name).expanduser().exists()]


def _where(name: str) -> str:
    return "local" if name and Path(name).expanduser().exists() else "hub"


@register_task
class HFTask(Task):
    name = "hf"
    config_cls = HFConfig

    # --- preparing: tokenizer, data, prompt split --------------------------------------------------

    @classmethod
    def prepare(cls, config: HFConfig, workdir: Path) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            tokenizer = load_tokenizer(config.tokenizer or config.model, revision=config.revision_or_none,
                                       trust_remote_code=config.trust_remote_code)
            positions = model_positions(config)
        except OSError as e:  # transformers' "couldn't connect" is an OSError; so is ConnectionError
            if unreachable(e):
                raise HubUnreachableError(config.tokenizer or config.model, offline=hub_offline(), kind="model") from None
            raise
        tokenizer.save_pretrained(workdir / "tokenizer")
        config = replace(config, max_length=fitted_max_length(config, positions))
        if config.data_format == "text":
            info = _prepare_texts(config, tokenizer, workdir)
        else:
            info = _prepare_preferences(config, tokenizer, workdir)
        _check_positions(config, info, positions)
        info["max_length"] = config.max_length
        _write_json(workdir / "prompts.json", info)

    @classmethod
    def source_fingerprint(cls, config: HFConfig) -> dict[str, str]:
        names = {"model": config.model, "tokenizer": config.tokenizer, "data": config.data, "judge_model": config.judge_model}
        return {k: path_fingerprint(Path(v).expanduser()) for k, v in names.items() if v and Path(v).expanduser().exists()}

    @classmethod
    def summary(cls, config: HFConfig, workdir: Path) -> dict:
        info = json.loads((Path(workdir) / "prompts.json").read_text())
        return {"fingerprints": info["fingerprints"], "has_gold": config.judge_is_gold}

    def __init__(self, config: HFConfig, workdir: Path):
        super().__init__(config, workdir)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.workdir / "tokenizer", trust_remote_code=config.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        info = json.loads((self.workdir / "prompts.json").read_text())
        self.info = info
        self.train_prompts, self.eval_prompts = info["train"], info["eval"]
        self.fingerprints = info["fingerprints"]
        self.format = info["format"]
        self.max_new_tokens = config.max_new_tokens
        self.has_gold = config.judge_is_gold

    # --- text <-> tokens --------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        # A chat template writes its own special tokens into the rendered prompt.
        ids = self.tokenizer(prompt, add_special_tokens=self.format not in CHAT_FORMATS)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        return ids

    def encode_completion(self, completion: str) -> list[int]:
        ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]

    def decode_completion(self, ids: Sequence[int]) -> str:
        # Not stripped: the judge reads prompt + completion, and the leading space is part of the text.
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # --- scoring ---------------------------------------------------------------------------------

    @cached_property
    def gold(self) -> Any:
        """The external judge (classifier or registered), loaded once; None for the learned RM."""
        config = self.config
        if config.judge == "reward_model":
            return None
        if config.judge == "classifier":
            return ClassifierJudge(
                config.judge_model, config.judge_label, is_gold=config.judge_is_gold, revision=config.revision_or_none,
                trust_remote_code=config.trust_remote_code, safetensors_only=config.safetensors_only, device=self.device,
            )
        return registered_judge(config.judge, is_gold=config.judge_is_gold)

    def judge(self, reward_model: Any = None) -> Any:
        if self.config.judge == "reward_model":
            return RewardModelJudge(reward_model, self) if reward_model is not None else None
        return self.gold

    def fluency(self, prompts: Sequence[str], completions: Sequence[str]) -> None:
        return None  # no grammar to check against: report no fluency rather than a made-up one

    # --- preference data ---------------------------------------------------------------------------

    @classmethod
    def samples_preferences(cls, config: HFConfig) -> bool:
        return config.data_format == "text"  # sampled, labelled by the judge; else the data's own labels

    def preference_frames(self, reference: nn.Module, config: Any, seed: int, candidates: Any = None) -> Any:
        if self.format == "text":
            return super().preference_frames(reference, config, seed, candidates)
        from ..preferences import PreferenceFrames, pairs_from_rankings

        frame = pd.read_parquet(self.workdir / "data.parquet")
        n_prompts = len(self.train_prompts) + len(self.eval_prompts)
        if self.format == "rankings":
            rankings = pd.DataFrame({
                "prompt": frame["prompt"], "ranking": [list(r) for r in frame["ranking"]],
                "gold": [[float("nan")] * len(r) for r in frame["ranking"]], "split": frame["split"],
            })
            return PreferenceFrames(pairs_from_rankings(rankings, config.pairs_from_rankings), rankings, n_prompts, 0, 0)
        # External labels carry no gold reward (and so no Bayes ceiling).
        pairs = frame[["prompt", "chosen", "rejected"]].assign(gold_chosen=float("nan"), gold_rejected=float("nan"),
                                                               split=frame["split"])
        return PreferenceFrames(pairs.reset_index(drop=True), None, n_prompts, 0, 0)

    # --- the reference -----------------------------------------------------------------------------

    def reference_training_data(self) -> tuple[list[list[int]], list[list[int]]] | None:
        if self.config.reference == "model":
            return None
        if self.config.reference == "text_ft":
            prompts, completions = [], []
            eos = [] if self.eos_id is None else [self.eos_id]
            # The cap the task stage fitted to the model (hf.max_length 0), or the config's.
            cap = self.info.get("max_length") or self.config.max_length or DEFAULT_MAX_LENGTH
            for text in pd.read_parquet(self.workdir / "texts.parquet")["text"]:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:cap]
                if len(ids) >= 2:
                    # The first token is the "prompt": the model learns to continue any prefix.
                    prompts.append(ids[:1])
                    completions.append(ids[1:] + eos)
            return prompts, completions
        frame = pd.read_parquet(self.workdir / "data.parquet")
        frame = frame[frame["split"] == "train"]
        if self.format == "rankings":
            pairs = zip(frame["prompt"], (r[0] for r in frame["ranking"]))
        else:
            pairs = zip(frame["prompt"], frame["chosen"])
        unique = list(dict.fromkeys(pairs))  # one example per (prompt, chosen), in data order
        return [self.encode_prompt(p) for p, _ in unique], [self.encode_completion(c) for _, c in unique]

    def initial_model(self, seed: int) -> nn.Module:
        config = self.config
        model = load_causal_lm(
            config.model, revision=config.revision_or_none, trust_remote_code=config.trust_remote_code,
            dtype=resolve_dtype(config.dtype, self.device), safetensors_only=config.safetensors_only,
        )
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tokenizer))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if config.disable_dropout:
            disable_dropout(model)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if config.lora.r and config.reference != "model":
            model = apply_lora(model, config.lora)
        return model.to(self.device)

    @classmethod
    def load_model(cls, config: HFConfig, directory: Path, device: Any) -> nn.Module:
        model = load_policy(directory, device, trust_remote_code=config.trust_remote_code)
        if config.gradient_checkpointing:
            # Not saved with the weights; every trainable copy of the reference inherits it.
            enable_gradient_checkpointing(model)
        return model


# --- preparing the data ---------------------------------------------------------------------------


def _prepare_preferences(config: HFConfig, tokenizer: Any, workdir: Path) -> dict:
    fmt = config.data_format

    def load(split: str):
        data = load_preferences(
            config.data, split=split, column_map=config.column_map or None, on_bad_rows=config.on_bad_rows,
            format=fmt, max_rows=config.max_rows or None, trust_remote_code=config.trust_remote_code,
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
        if Path(config.data).expanduser().is_file():
            raise ValueError(f"eval_split: {config.data} is a single file with no splits; use eval_fraction instead")
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


def _prepare_texts(config: HFConfig, tokenizer: Any, workdir: Path) -> dict:
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
                                       config.column_map or None)
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


def _check_positions(config: HFConfig, info: dict, limit: int | None) -> None:
    """Fail before training when sequences would not fit the model's position embeddings."""
    if not limit:
        return
    if config.max_length + 1 > limit:
        raise ConfigError(f"hf.max_length: {config.max_length} tokens (+ EOS) exceed the model's {limit} positions")
    need = info["longest_prompt_tokens"] + config.max_new_tokens
    if need > limit:
        raise ConfigError(f"hf.max_new_tokens: the longest prompt ({info['longest_prompt_tokens']} tokens) + "
                          f"max_new_tokens ({config.max_new_tokens}) exceed the model's {limit} positions")


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


def _write_json(path: Path, data: object) -> None:
    write_json(path, data, indent=None)


__all__ = ["HFConfig", "HFTask", "split_prompts", "path_fingerprint"]
