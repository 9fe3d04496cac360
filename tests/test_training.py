"""The shared training loop: shards and micro-batches give the whole batch's gradient, shards run
at once on CPU threads with the same result as in turn, and bad settings are refused."""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_bench.methods import sft
from dpo_bench.methods.sft import SFTConfig, supervised_finetune
from dpo_bench.policy import GPT2Spec, build_gpt2
from dpo_bench.training import NonFiniteLossError, OptimConfig, ShardRunner, TrainLog, optimise, shard_indices
from dpo_engine.batching import GROUP_OVERHEAD_TOKENS


class _Tok:
    bos_token_id = eos_token_id = 1
    pad_token_id = 0

    def __len__(self):
        return 20


def _model(seed=0, **spec):
    return build_gpt2(GPT2Spec(**{"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32, **spec}), _Tok(), seed)


def _sft_data(n=24, seed=0):
    """Completions of very different lengths (so a token mean differs from a mean of row means),
    some after an empty prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for i in range(n):
        prompts.append([] if i % 5 == 0 else [1] + torch.randint(2, 20, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g).tolist())
        completions.append(torch.randint(2, 20, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist())
    return prompts, completions


def _sft(model, data, threads=None, **config):
    """Trains a copy of ``model``; returns it, the logged losses and the gradient of each step
    (as the optimiser received it, after clipping)."""
    model = copy.deepcopy(model)
    before = torch.get_num_threads()
    grads: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(record)
    if threads:
        torch.set_num_threads(threads)
    try:
        log = TrainLog()
        cfg = SFTConfig(**{"steps": 3, "batch_size": 12, "lr": 1e-2, "warmup_steps": 0, **config})
        supervised_finetune(model, *data, cfg, pad_id=0, generator=torch.Generator().manual_seed(0), log=log, progress=False)
    finally:
        torch.set_num_threads(before)
        handle.remove()
    return model, [v for _, name, v, _ in log.records if name == "train/loss"], grads


def torch_threads(n: int):
    """``n`` torch threads for a test, the suite's count restored after it (a fixture's body)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Two torch threads for the test (shards run at once)."""
    yield from torch_threads(2)


def _max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _cost(part, lengths) -> int:
    return len(part) * max(1, int(lengths[part].max())) + GROUP_OVERHEAD_TOKENS


def _least_costliest_part(sizes: list[int], shards: int) -> int:
    """Brute force over every cut of the length-sorted items into at most ``shards`` runs."""
    best = None
    for k in range(min(shards, len(sizes))):
        for cuts in itertools.combinations(range(1, len(sizes)), k):
            bounds = [0, *cuts, len(sizes)]
            worst = max((b - a) * max(1, sizes[b - 1]) + GROUP_OVERHEAD_TOKENS for a, b in zip(bounds, bounds[1:]))
            best = worst if best is None else min(best, worst)
    return best


@given(n=st.integers(1, 12), shards=st.integers(1, 4), seed=st.integers(0, 1000), top=st.sampled_from([3, 30, 300]))
@settings(max_examples=80, deadline=None)
def test_shards_are_length_runs_whose_costliest_is_as_cheap_as_any_cut_makes_it(n, shards, seed, top):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(50, generator=g)[:n]
    lengths = torch.randint(0, top, (50,), generator=g)
    parts = shard_indices(idx, shards, lengths)
    assert sorted(torch.cat(parts).tolist()) == sorted(idx.tolist())
    assert 1 <= len(parts) <= shards
    for shorter, longer in zip(parts, parts[1:]):  # runs of the length order: each part padded little
        assert lengths[shorter].max() <= lengths[longer].min()
    if shards > 1:
        sizes = sorted(lengths[idx].tolist())
        assert max(_cost(p, lengths) for p in parts) == _least_costliest_part(sizes, shards)


@given(n=st.integers(1, 40), shards=st.integers(1, 6))
def test_shards_without_lengths_are_equal_runs(n, shards):
    parts = shard_indices(torch.arange(n), shards)
    assert torch.cat(parts).tolist() == list(range(n))
    assert len(parts) == min(n, shards) and max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("split", [dict(shards=2), dict(shards=3), dict(accumulation_steps=2), dict(accumulation_steps=2, shards=2)])
def test_shards_and_micro_batches_give_the_whole_batchs_sft_step(split):
    """SFT's loss is a mean over completion tokens: parts weighted by their tokens, not their rows,
    give the whole batch's gradient (rows of 1-11 tokens make the two weightings differ)."""
    model, data = _model(), _sft_data()
    _, whole_losses, whole_grads = _sft(model, data, steps=1, shards=1)
    _, parted_losses, parted_grads = _sft(model, data, steps=1, **split)
    for whole, parted in zip(whole_grads[0], parted_grads[0]):
        torch.testing.assert_close(parted, whole, atol=1e-6, rtol=1e-5)
    assert parted_losses == pytest.approx(whole_losses, abs=1e-6)


def test_concurrent_shards_give_the_same_bits_as_shards_in_turn(monkeypatch):
    """The result depends on the shards, not on the threads: with 2 torch threads the shards run at
    once on two threads; with 1 they run in turn; the trained weights are identical."""
    model, data = _model(), _sft_data()
    threads_seen: list[str] = []

    def recording(m, batch, loss=sft.sft_loss):
        threads_seen.append(threading.current_thread().name)
        return loss(m, batch)

    monkeypatch.setattr(sft, "sft_loss", recording)
    together, losses_together, _ = _sft(model, data, threads=2, shards=2)
    at_once, threads_seen[:] = set(threads_seen), []
    in_turn, losses_in_turn, _ = _sft(model, data, threads=1, shards=2)
    assert len(at_once) == 2 and all(name.startswith("shard") for name in at_once)
    assert set(threads_seen) == {threading.current_thread().name}
    assert _max_diff(together, in_turn) == 0.0
    assert losses_together == losses_in_turn


def test_shard_threads_leave_torchs_thread_count_as_it_was(two_threads):
    _sft(_model(), _sft_data(), shards=2)
    assert torch.get_num_threads() == 2
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2]  # threads started later get the process's count, not the shards' 1


def test_shards_share_the_processs_torch_threads():
    """On more cores than shards, each shard (and the loop's own work) gets its share of them."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        runner = ShardRunner.for_model(_model().train(), 2, torch.device("cpu"))
        assert (runner.threads, runner.threads_each) == (2, 2)
        seen = runner.map(lambda _: torch.get_num_threads(), [0, 1])
        with runner.step():
            inside = torch.get_num_threads()
        runner.close()
        assert seen == [2, 2] and inside == 2 and torch.get_num_threads() == 4
        assert ShardRunner.for_model(_model().train(), 8, torch.device("cpu")).threads_each == 1  # 4 shards at once
    finally:
        torch.set_num_threads(before)


def test_models_that_draw_random_numbers_run_their_shards_in_turn(two_threads):
    """Dropout draws from one random stream: shards at once would draw in a racing order."""
    assert ShardRunner.for_model(_model().train(), 2, torch.device("cpu")).threads == 2
    dropout = _model().train()
    dropout.transformer.drop.p = 0.1  # embedding dropout
    assert ShardRunner.for_model(dropout, 2, torch.device("cpu")).threads == 1
    assert ShardRunner.for_model(dropout.eval(), 2, torch.device("cpu")).threads == 2
    attention_dropout = _model().train()
    attention_dropout.config.attn_pdrop = 0.1  # applied as a float inside attention, not by a module
    assert ShardRunner.for_model(attention_dropout, 2, torch.device("cpu")).threads == 1
    assert ShardRunner.for_model(_model().train(), 2, torch.device("meta")).threads == 1
    assert ShardRunner.for_model(_model().train(), 1, torch.device("cpu")).threads == 1


def test_a_non_finite_loss_in_a_shard_names_the_run_and_step(two_threads):
    model = _model()
    calls = []

    def loss_fn(idx):
        calls.append(len(idx))
        out = model(input_ids=torch.ones(len(idx), 3, dtype=torch.long)).logits.mean()
        return (out * float("nan") if len(calls) > 2 else out), {}

    with pytest.raises(NonFiniteLossError, match=r"my-run: loss is nan at step 2"):
        optimise(model, OptimConfig(steps=3, batch_size=4, shards=2), loss_fn, n_items=8,
                 generator=torch.Generator().manual_seed(0), log=TrainLog(), label="my-run", progress=False)


def test_bad_shard_settings_are_refused():
    with pytest.raises(ValueError, match="shards"):
        OptimConfig(shards=0)
    with pytest.raises(ValueError, match=r"accumulation_steps x shards \(4 x 2\) must be <= batch_size \(6\)"):
        OptimConfig(batch_size=6, accumulation_steps=4, shards=2)
