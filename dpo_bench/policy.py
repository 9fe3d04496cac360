"""Building policies and references: devices, seeds, the GPT-2 policy, the tabular policy, checkpoints.

A policy is any causal language model whose ``forward(input_ids, attention_mask, position_ids,
past_key_values, use_cache, output_hidden_states)`` returns an object with ``logits`` (B, T, V),
``past_key_values`` and, when asked, ``hidden_states``. GPT-2 from transformers is one; the
:class:`TabularLM` of the exact bandit task is another, so every method runs unchanged on both.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def derive_seed(seed: int, *names: object) -> int:
    """A seed for one named unit of work (a grid cell, a stage), stable across processes.

    Derived by hashing, so adding a method to the grid never changes another method's seed.
    """
    text = "/".join([str(seed), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


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
        past_key_values=None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        **_: object,
    ) -> SimpleNamespace:
        logits = self.table[input_ids].masked_fill(~self.allowed, float("-inf"))
        hidden = None
        if output_hidden_states:
            previous = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
            pair = previous * self.vocab_size + input_ids
            hidden = (nn.functional.one_hot(pair, self.vocab_size * self.vocab_size).to(self.table.dtype),)
        # A table needs no cache; an empty tuple tells the sampler to feed only the new token.
        return SimpleNamespace(logits=logits, past_key_values=(), hidden_states=hidden)

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
    """Fix the first ``n_blocks`` transformer blocks (and optionally the embeddings) of a GPT-2."""
    if n_blocks <= 0 and not embeddings:
        return
    trunk = getattr(model, "transformer", None)
    if trunk is None:
        raise ValueError(f"freezing blocks needs a GPT-2-like model with .transformer, got {type(model).__name__}")
    for block in trunk.h[:n_blocks]:
        for p in block.parameters():
            p.requires_grad_(False)
    if embeddings:
        for p in list(trunk.wte.parameters()) + list(trunk.wpe.parameters()):
            p.requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- checkpoints: safetensors only, written atomically --------------------------------------


def _atomic_dir(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars on a one-shard model are noise


def save_policy(model: nn.Module, directory: Path) -> Path:
    """Save a policy as safetensors plus a small JSON description, atomically."""
    _quiet_transformers()
    directory = Path(directory)
    tmp = _atomic_dir(directory)
    if isinstance(model, TabularLM):
        save_file({"table": model.table.detach().cpu().contiguous(), "allowed": model.allowed.cpu()}, tmp / "model.safetensors")
        (tmp / "policy.json").write_text(json.dumps({"kind": "tabular", "vocab_size": model.vocab_size}))
    else:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "policy.json").write_text(json.dumps({"kind": "hf"}))
    _commit_dir(tmp, directory)
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path))


def save_module(model: nn.Module, path: Path) -> None:
    """A module's weights as safetensors, atomically; tied weights (GPT-2's lm_head) are stored once."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def load_module(model: nn.Module, path: Path) -> nn.Module:
    load_model(model, str(path))
    return model
