"""The hf task: your causal LM as the policy and reference, your data's prompts and pairs, and its
judge.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from torch import nn

from ...data import CHAT_FORMATS, HubUnreachableError, hub_offline, unreachable
from ...judges import ClassifierJudge, RewardModelJudge, registered_judge
from ...policy import (
    apply_lora, disable_dropout, enable_gradient_checkpointing, load_causal_lm, load_policy, load_tokenizer,
    resolve_dtype,
)
from ..base import Task, register_task
from .config import HFConfig
from .prepare import (
    DEFAULT_MAX_LENGTH, check_positions, fitted_max_length, model_positions, prepare_preferences,
    prepare_texts, source_fingerprint, write_compact_json,
)


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
            info = prepare_texts(config, tokenizer, workdir)
        else:
            info = prepare_preferences(config, tokenizer, workdir)
        check_positions(config, info, positions)
        info["max_length"] = config.max_length
        write_compact_json(workdir / "prompts.json", info)

    @classmethod
    def source_fingerprint(cls, config: HFConfig) -> dict[str, str]:
        names = {"model": config.model, "tokenizer": config.tokenizer, "data": config.data, "judge_model": config.judge_model}
        fingerprints = {k: source_fingerprint(v) for k, v in names.items() if v}
        return {k: v for k, v in fingerprints.items() if v is not None}

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
        from ...preferences import PreferenceFrames, pairs_from_rankings

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


