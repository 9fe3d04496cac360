"""The default task: an offline analogue of the DPO paper's IMDb sentiment experiment.

Prompts are neutral review openings ("we saw the new documentary at the cinema on friday ."),
perhaps with the first neutral words of the body, so the completion writes all of the sentiment;
the gold reward is VADER's compound score of prompt and completion read together minus the
prompt's own (`reward.gold.RelativeVaderGold`); the reference is a small GPT-2 trained from
scratch on a seeded corpus of whole reviews; fluency is the share of prompt + completion pairs
that are reviews the corpus grammar could have produced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from reward.gold import RelativeVaderGold

from ..configs import ConfigError, field, positive
from ..files import write_json
from ..policy import GPT2Spec, build_gpt2
from .base import Task, fingerprint_strings, register_task
from .corpus import CorpusConfig, ReviewGrammar, build_tokenizer, generate_corpus, make_prompts


@dataclass(frozen=True)
class SentimentConfig:
    """The sentiment task: corpus, prompts and model size."""

    n_reviews: int = field(32000, "reviews in the generated corpus (the SFT data): a neutral opening and one to three sentences each")
    p_positive: float = field(0.47, "probability a sentiment slot takes a positive word (0.47: corpus mean VADER compound ≈ 0)")
    corpus_seed: int = field(0, "seed of the corpus generator and the prompt split")
    n_train_prompts: int = field(2000, "train prompts (each gets K sampled completions for the preference data)")
    n_val_prompts: int = field(200, "validation prompts, for choosing settings; disjoint from train and test prompts")
    n_eval_prompts: int = field(400, "test prompts, on which every method is reported; disjoint from train and validation prompts")
    max_prompt_body_tokens: int = field(5, "a prompt is a review's opening plus up to this many neutral words of its body")
    max_new_tokens: int = field(32, "completion length cap when sampling, in tokens (a corpus completion is 3-35 tokens, 14.6 on average)")
    model: GPT2Spec = field(default_factory=GPT2Spec, doc="size of the GPT-2 trained from scratch")

    def __post_init__(self) -> None:
        for name in ("n_reviews", "n_train_prompts", "n_val_prompts", "n_eval_prompts", "max_new_tokens"):
            positive(name, getattr(self, name))
        if not 0 < self.p_positive < 1:
            raise ConfigError(f"p_positive must be in (0, 1), got {self.p_positive}")
        if self.max_prompt_body_tokens < 0:
            raise ConfigError(f"max_prompt_body_tokens must be >= 0, got {self.max_prompt_body_tokens}")
        longest_prompt = self.corpus.max_prompt_tokens
        if longest_prompt + self.max_new_tokens + 1 > self.model.n_positions:
            raise ConfigError(
                f"the longest prompt ({longest_prompt} tokens) + max_new_tokens + 1 = "
                f"{longest_prompt + self.max_new_tokens + 1} exceeds model.n_positions = {self.model.n_positions}"
            )
        longest_review = self.corpus.grammar.max_review_tokens
        if longest_review + 2 > self.model.n_positions:
            raise ConfigError(
                f"the longest review ({longest_review} tokens) + BOS + EOS exceeds model.n_positions = {self.model.n_positions}"
            )

    @property
    def corpus(self) -> CorpusConfig:
        return CorpusConfig(
            n_reviews=self.n_reviews,
            p_positive=self.p_positive,
            seed=self.corpus_seed,
            max_prompt_body_tokens=self.max_prompt_body_tokens,
        )


@register_task
class SentimentTask(Task):
    name = "sentiment"
    config_cls = SentimentConfig

    @classmethod
    def prepare(cls, config: SentimentConfig, workdir: Path) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        corpus = config.corpus
        reviews = generate_corpus(corpus)
        train, val, test = make_prompts(
            reviews, config.n_train_prompts, config.n_val_prompts, config.n_eval_prompts,
            max_body_tokens=config.max_prompt_body_tokens, seed=config.corpus_seed,
        )
        tokenizer = build_tokenizer(corpus.grammar.vocabulary)
        tokenizer.save_pretrained(workdir / "tokenizer")
        _write_json(workdir / "corpus.json", {"reviews": reviews})
        _write_json(
            workdir / "prompts.json",
            {
                "train": train,
                "val": val,
                "eval": test,  # the test prompts: what every method is reported on
                "fingerprints": {
                    "corpus": fingerprint_strings(reviews),
                    "train_prompts": fingerprint_strings(train),
                    "val_prompts": fingerprint_strings(val),
                    "eval_prompts": fingerprint_strings(test),
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
        self.train_prompts, self.val_prompts, self.eval_prompts = prompts["train"], prompts["val"], prompts["eval"]
        self.fingerprints = prompts["fingerprints"]
        self.grammar = ReviewGrammar()
        # What the policy wrote: the prompts are neutral, so this is VADER's score of the review.
        self.gold = RelativeVaderGold()
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
        reviews = json.loads((self.workdir / "corpus.json").read_text())["reviews"]
        # Whole reviews after a BOS "prompt": the model learns to continue any prefix.
        prompts = [[self.tokenizer.bos_token_id]] * len(reviews)
        return prompts, [self.encode_completion(r) for r in reviews]

    def initial_model(self, seed: int) -> nn.Module:
        return build_gpt2(self.config.model, self.tokenizer, seed)


def _write_json(path: Path, data: object) -> None:
    write_json(path, data, indent=None)
