"""The hf task's config: your model, your data and how they are read, judged and trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...configs import ConfigError, field, positive
from ...data import HubOptions, local_source_exists, looks_like_path
from ...judges import judge_entry_points, known_judges
from ...policy import LoRASpec

PREFERENCE_FORMATS = ("auto", "standard", "implicit", "conversational", "implicit_conversational", "rankings")


@dataclass(frozen=True)
class HFConfig:
    """Your own model and data: any transformers causal LM, any TRL-format preference dataset."""

    model: str = field("", "policy and reference: a hub id (gpt2-large) or a local model directory")
    revision: str = field("", "hub revision (branch, tag or commit) of model, tokenizer and judge; empty: the default branch")
    tokenizer: str = field("", "tokenizer hub id or directory; empty: the model's own")
    trust_remote_code: bool = field(False, "run custom code shipped with the model, tokenizer, judge or dataset (trusted repositories only)")
    safetensors_only: bool = field(True, "load weights from safetensors only; false also accepts pickled .bin weights (unpickling can run code)")
    data: str = field("", "the data: a hub dataset id, a save_to_disk directory, a local .jsonl/.json/.parquet/.csv file, a "
                          "folder of such shards or a glob of them (data/train-*.jsonl; ** spans folders)")
    data_split: str = field("train", "split of a hub or saved dataset to read")
    data_config: str = field("", "hub dataset: its configuration (load_dataset's name, e.g. 'en'); empty: its default")
    data_revision: str = field("", "hub dataset: the branch, tag or commit to read; empty: the default branch")
    data_files: tuple[str, ...] = field((), "hub dataset: read only these files or globs of the repository (load_dataset's "
                                            "data_files); empty: what its configuration names")
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

    @property
    def hub_options(self) -> HubOptions:
        """What ``datasets.load_dataset`` reads of a hub dataset."""
        return HubOptions(self.data_config, self.data_revision, tuple(self.data_files))

    def downloads(self) -> list[tuple[str, str, str]]:
        """(what, name, where) for every model and dataset a run reads: ``hub`` or ``local``."""
        items = [("model", self.model, _where(self.model))]
        if self.tokenizer and self.tokenizer != self.model:
            items.append(("tokenizer", self.tokenizer, _where(self.tokenizer)))
        split = f" (splits {self.data_split}" + (f", {self.eval_split})" if self.eval_split else ")")
        hub = self.hub_options.describe() if _where(self.data) == "hub" else ""
        items.append(("dataset", self.data + hub + split, _where(self.data)))
        if self.judge == "classifier":
            items.append(("judge", self.judge_model, _where(self.judge_model)))
        return items

    def missing_paths(self) -> list[tuple[str, str]]:
        """(field, name) of each model, tokenizer, data or judge named by a path that does not exist:
        a path-shaped name is never a hub id, so it is a missing file, not a download."""
        names = {"model": self.model, "tokenizer": self.tokenizer, "data": self.data, "judge_model": self.judge_model}
        return [(key, name) for key, name in names.items()
                if name and looks_like_path(name) and not local_source_exists(name)]


def _where(name: str) -> str:
    return "local" if local_source_exists(name) else "hub"


