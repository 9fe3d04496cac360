"""The default task: an offline analogue of the DPO paper's IMDb sentiment experiment.

Prompts are review prefixes of 2-8 tokens; the gold reward is VADER's compound score of prompt
and completion read together; the reference is a small GPT-2 trained from scratch on a seeded
corpus of review-like sentences; fluency is the share of completions the corpus grammar could
have produced.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from reward.gold import VaderGold

from ..configs import ConfigError, field, positive
from ..policy import GPT2Spec, build_gpt2
from .base import Task, fingerprint_strings, register_task
from .corpus import CorpusConfig, ReviewGrammar, build_tokenizer, generate_corpus, make_prompts


@dataclass(frozen=True)
class SentimentConfig:
    """The sentiment task: corpus, prompts and model size."""

    n_sentences: int = field(32000, "sentences in the generated review corpus (the SFT data)")
    p_positive: float = field(0.47, "probability a sentiment slot takes a positive word")
    corpus_seed: int = field(0, "seed of the corpus generator and the prompt split")
    n_train_prompts: int = field(2000, "train prompts (each gets K sampled completions for the preference data)")
    n_eval_prompts: int = field(400, "held-out eval prompts, disjoint from the train prompts")
    min_prompt_tokens: int = field(2, "shortest review prefix used as a prompt, in words")
    max_prompt_tokens: int = field(8, "longest review prefix used as a prompt, in words")
    max_new_tokens: int = field(24, "completion length cap when sampling, in tokens")
    model: GPT2Spec = field(default_factory=GPT2Spec, doc="size of the GPT-2 trained from scratch")

    def __post_init__(self) -> None:
        for name in ("n_sentences", "n_train_prompts", "n_eval_prompts", "max_new_tokens"):
            positive(name, getattr(self, name))
        if not 0 < self.p_positive < 1:
            raise ConfigError(f"p_positive must be in (0, 1), got {self.p_positive}")
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise ConfigError(
                f"need 1 <= min_prompt_tokens <= max_prompt_tokens, got {self.min_prompt_tokens}, {self.max_prompt_tokens}"
            )
        if self.max_prompt_tokens + self.max_new_tokens + 1 > self.model.n_positions:
            raise ConfigError(
                f"max_prompt_tokens + max_new_tokens + 1 = {self.max_prompt_tokens + self.max_new_tokens + 1} "
                f"exceeds model.n_positions = {self.model.n_positions}"
            )

    @property
    def corpus(self) -> CorpusConfig:
        return CorpusConfig(
            n_sentences=self.n_sentences,
            p_positive=self.p_positive,
            seed=self.corpus_seed,
            min_prompt_tokens=self.min_prompt_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
        )


@register_task
class SentimentTask(Task):
    name = "sentiment"
    config_cls = SentimentConfig

    @classmethod
    def prepare(cls, config: SentimentConfig, workdir: Path) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        sentences = generate_corpus(config.corpus)
        train, evaluation = make_prompts(
            sentences, config.n_train_prompts, config.n_eval_prompts,
            min_tokens=config.min_prompt_tokens, max_tokens=config.max_prompt_tokens, seed=config.corpus_seed,
        )
        grammar = ReviewGrammar()
        tokenizer = build_tokenizer(grammar.vocabulary)
        tokenizer.save_pretrained(workdir / "tokenizer")
        _write_json(workdir / "corpus.json", {"sentences": sentences})
        _write_json(
            workdir / "prompts.json",
            {
                "train": train,
                "eval": evaluation,
                "fingerprints": {
                    "corpus": fingerprint_strings(sentences),
                    "train_prompts": fingerprint_strings(train),
                    "eval_prompts": fingerprint_strings(evaluation),
                },
            },
        )

    @classmethod
    def summary(cls, config: SentimentConfig, workdir: Path) -> dict:
        return {"fingerprints": json.loads((Path(workdir) / "prompts.json").read_text())["fingerprints"], "has_gold": True}

    def __init__(self, config: SentimentConfig, workdir: Path):
        super().__init__(config, workdir)
        from transformers import PreTrainedTokenizerFast

        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(self.workdir / "tokenizer")
        prompts = json.loads((self.workdir / "prompts.json").read_text())
        self.train_prompts, self.eval_prompts = prompts["train"], prompts["eval"]
        self.fingerprints = prompts["fingerprints"]
        self.grammar = ReviewGrammar()
        self.gold = VaderGold()
        self.max_new_tokens = config.max_new_tokens

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_token_id] + self._encode(prompt)

    def encode_completion(self, completion: str) -> list[int]:
        return self._encode(completion) + [self.tokenizer.eos_token_id]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_completion(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def fluency(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([self.grammar.is_sentence(f"{p} {c}".split()) for p, c in zip(prompts, completions)], dtype=bool)

    def reference_training_data(self) -> tuple[list[list[int]], list[list[int]]]:
        sentences = json.loads((self.workdir / "corpus.json").read_text())["sentences"]
        # Whole sentences after a BOS "prompt": the model learns to continue any prefix.
        prompts = [[self.tokenizer.bos_token_id]] * len(sentences)
        return prompts, [self.encode_completion(s) for s in sentences]

    def initial_model(self, seed: int) -> nn.Module:
        return build_gpt2(self.config.model, self.tokenizer, seed)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
