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

from .config import PREFERENCE_FORMATS, HFConfig
from .prepare import (
    DEFAULT_MAX_LENGTH, default_max_length, fitted_max_length, model_positions, positions_of, source_fingerprint, split_prompts,
)
from .task import HFTask

__all__ = [
    "DEFAULT_MAX_LENGTH", "PREFERENCE_FORMATS", "HFConfig", "HFTask", "default_max_length", "fitted_max_length", "model_positions",
    "positions_of", "source_fingerprint", "split_prompts",
]
