"""Building policies and references: devices, seeds, the GPT-2 policy, the tabular policy, checkpoints.

A policy is any causal language model whose ``forward(input_ids, attention_mask, position_ids,
cache, use_cache, output_hidden_states)`` returns an object with ``logits`` (B, T, V), ``cache``
and, when asked, ``hidden_states``; or, as in transformers before 5.24, with ``past_key_values``
in place of ``cache``, both in and out (``dpo_bench.generation.cache_keyword``). GPT-2 from
transformers is one; the :class:`TabularLM` of the exact bandit task is another, so every method
runs unchanged on both.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .files import atomic_path


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class GPT2Spec:
    """Size of the small GPT-2 trained from scratch on the default task."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")


def build_gpt2(spec: GPT2Spec, tokenizer, seed: int) -> nn.Module:
    """A freshly initialised GPT-2 sized by ``spec`` for ``tokenizer``'s vocabulary.

    Dropout is off: the corpus is large relative to the model, and dropout would make the
    policy stochastic during PPO's log-prob recomputation.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        # GPT-2's tanh-approximate GELU as one fused kernel: the same function as "gelu_new" (to
        # float rounding), which runs as four element-wise kernels (~14% of a DPO step on a CPU).
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


class TabularLM(nn.Module):
    """A degenerate language model whose next-token logits depend only on the current token.

    On the bandit task a sequence is ``[x, y]``: the logits at position 0 are the policy's
    table row π(·|x). ``allowed`` masks the tokens that may follow (the responses), so sampling
    and log-probs never see anything else. ``hidden_states`` are the one-hot of the pair
    (previous token, current token), so a linear head on them (a reward model, a value head) is
    an arbitrary table over (x, y).
    """

    def __init__(self, vocab_size: int, allowed: torch.Tensor, init_logits: torch.Tensor | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("allowed", allowed.bool().clone())
        logits = torch.zeros(vocab_size, vocab_size) if init_logits is None else init_logits.clone().float()
        self.table = nn.Parameter(logits)
        self.config = SimpleNamespace(
            hidden_size=vocab_size * vocab_size, n_positions=2, vocab_size=vocab_size, model_type="tabular"
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        **_: object,
    ) -> SimpleNamespace:
        # index_select: its backward adds repeated tokens' gradients in order, reproducibly (a tensor
        # index's does not on the CPU: dpo_engine/trunk.py, last_hidden_at).
        rows = self.table.index_select(0, input_ids.flatten()).view(*input_ids.shape, -1)
        logits = rows.masked_fill(~self.allowed, float("-inf"))
        hidden = None
        if output_hidden_states:
            previous = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
            pair = previous * self.vocab_size + input_ids
            hidden = (nn.functional.one_hot(pair, self.vocab_size * self.vocab_size).to(self.table.dtype),)
        # A table needs no cache; an empty tuple tells the sampler to feed only the new token.
        return SimpleNamespace(logits=logits, cache=(), hidden_states=hidden)

    def probabilities(self, context_ids: torch.Tensor) -> torch.Tensor:
        """π(·|x) for each context token id, shape (n_contexts, vocab), in float64 for exact quantities."""
        return torch.softmax(self.table[context_ids].double().masked_fill(~self.allowed, float("-inf")), dim=-1)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def freeze(model: nn.Module) -> nn.Module:
    """An evaluation-only copy: no gradients, no dropout."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def freeze_first_blocks(model: nn.Module, n_blocks: int, embeddings: bool = False) -> None:
    """Fix the first ``n_blocks`` transformer blocks (and optionally the embeddings) of a causal LM.

    GPT-2 keeps its blocks in ``transformer.h``; other architectures are found by
    :func:`transformer_blocks`.
    """
    if n_blocks <= 0 and not embeddings:
        return
    trunk = getattr(model, "transformer", None)
    if trunk is not None and hasattr(trunk, "h"):
        blocks = trunk.h
        embedding_modules = [trunk.wte, trunk.wpe]
    else:
        blocks = transformer_blocks(model)
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embedding_modules = [get_embeddings()] if get_embeddings else []
    for block in blocks[:n_blocks]:
        for p in block.parameters():
            p.requires_grad_(False)
    if embeddings:
        for p in (p for m in embedding_modules for p in m.parameters()):
            p.requires_grad_(False)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM: the first ModuleList as long as the
    config's layer count (``model.layers`` of Llama-likes, ``gpt_neox.layers``, ``transformer.h``)."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and n_layers and len(module) == n_layers:
            return module
    raise ValueError(f"freezing blocks needs a transformer with a list of {n_layers or '?'} blocks; "
                     f"none found in {type(model).__name__}")


# --- pretrained models: loading, precision, memory savers ------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that supports it; float32 on the CPU and on MPS, where
    bf16 kernels are slow or incomplete. Anything else names a dtype in :data:`DTYPES`."""
    if dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A tokenizer from a hub id or a local directory; a missing pad token becomes the EOS token
    (GPT-2 has none), since batches are padded."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name} has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    safetensors_only: bool = True,
) -> nn.Module:
    """A causal LM from a hub id or a local directory, the same code path for both.

    Weights load from safetensors; with ``safetensors_only=False`` a model that has only
    pickled ``.bin`` weights may load too (unpickling can run code: only for trusted models).
    Custom model code runs only with ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(
        name, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
        use_safetensors=True if safetensors_only else None,
    )


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout probability, in the modules and in the saved config.

    A policy with dropout is stochastic in train mode, which corrupts PPO's log-prob ratios
    and DPO's reference comparison; the config is edited too so a reloaded checkpoint agrees.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if isinstance(value, float) and (key.endswith("dropout") or key.endswith("pdrop")):
                setattr(config, key, 0.0)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute activations in the backward pass instead of storing them (less memory, ~30%
    more compute). Active only in train mode; copies made with ``copy.deepcopy`` keep it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    # Non-reentrant checkpointing also works when the first blocks or the embeddings are frozen.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def is_gradient_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) or getattr(model, "is_gradient_checkpointing", False))


@dataclass(frozen=True)
class LoRASpec:
    """Low-rank adapters (Hu et al. 2021) through ``peft``; ``r = 0`` trains all weights."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def apply_lora(model: nn.Module, spec: LoRASpec) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (only they train); :func:`save_policy` merges them back.

    Needs the optional ``peft`` package (``pip install 'dpo-bench[lora]'``).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(
            "LoRA needs the optional package 'peft', which is not installed: pip install 'dpo-bench[lora]' "
            "(or set lora.r = 0 to train every weight)"
        ) from None
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules) or None, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_adapters(model: nn.Module) -> nn.Module:
    """The plain transformers model behind LoRA adapters, with them merged into its weights."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- checkpoints: safetensors only, written atomically --------------------------------------



def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars on a one-shard model are noise


def save_policy(model: nn.Module, directory: Path) -> Path:
    """Save a policy as safetensors plus a small JSON description, atomically."""
    _quiet_transformers()
    directory = Path(directory)
    with atomic_path(directory, directory=True) as tmp:
        if isinstance(model, TabularLM):
            save_file({"table": model.table.detach().cpu().contiguous(), "allowed": model.allowed.cpu()}, tmp / "model.safetensors")
            (tmp / "policy.json").write_text(json.dumps({"kind": "tabular", "vocab_size": model.vocab_size}))
        else:
            # A checkpoint is always a plain transformers model: LoRA adapters are merged in.
            merge_adapters(model).save_pretrained(tmp, safe_serialization=True)
            (tmp / "policy.json").write_text(json.dumps({"kind": "hf"}))
    return directory


def load_policy(directory: Path, device: torch.device | str = "cpu", trust_remote_code: bool = False) -> nn.Module:
    """Load a policy written by :func:`save_policy` (or any transformers model directory)."""
    _quiet_transformers()
    directory = Path(directory)
    meta_path = directory / "policy.json"
    kind = json.loads(meta_path.read_text())["kind"] if meta_path.exists() else "hf"
    if kind == "tabular":
        tensors = load_file(directory / "model.safetensors")
        model = TabularLM(tensors["table"].shape[0], tensors["allowed"], tensors["table"])
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust_remote_code, use_safetensors=True)
    return model.to(device)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a dict of tensors as safetensors atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path))


def save_module(model: nn.Module, path: Path) -> None:
    """A module's weights as safetensors, atomically; tied weights (GPT-2's lm_head) are stored once."""
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def load_module(model: nn.Module, path: Path) -> nn.Module:
    load_model(model, str(path))
    return model
