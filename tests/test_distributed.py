"""Data parallelism on torch.distributed (gloo, two processes): two ranks train what two shards in
one process do, bit for bit; every rank ends with the same weights; PPO's and the reward model's
statistics are the whole batch's; a failing rank is reported in one line."""

from __future__ import annotations

import math
import threading

import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dpo_bench.methods.ppo import whitened
from dpo_bench.methods.sft import SFTConfig, supervised_finetune
from dpo_bench.training import NonFiniteLossError, TrainLog
from dpo_engine import distributed
from dpo_engine.distributed import RankError, RankJob, Ranks, ranks
from reward.model import RewardModel
from reward.train import PairTensors, RewardTrainConfig, train_reward_model

from .test_training import _max_diff, _model, _sft, _sft_data, torch_threads

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """Rank 0 runs here on one thread, as each rank of a 2-core machine does."""
    yield from torch_threads(1)


def _llama() -> torch.nn.Module:
    """A tiny Llama (RoPE, RMSNorm, SwiGLU), which trains through transformers' own forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=1))


ARCHITECTURES = {"gpt2": _model, "llama": _llama}


def _sft_ranked(out: str | None = None, steps: int = 4,
                arch: str = "gpt2") -> tuple[torch.nn.Module, list[float], list[list[torch.Tensor]]]:
    """test_training's SFT run on this rank, the whole batch in one shard (the model, its logged
    losses, each step's gradient); a rank other than 0 saves its weights to ``out``."""
    model, losses, grads = _sft(ARCHITECTURES[arch](), _sft_data(), shards=1, steps=steps)
    if out is not None:
        torch.save(model.state_dict(), out)
    return model, losses, grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # dpo_engine.trunk's packed forward, and transformers' own
def test_two_ranks_train_what_two_shards_in_one_process_do_bit_for_bit(tmp_path, one_thread, arch):
    """Bit for bit against two shards in one process; against the whole batch in one pass, the same
    gradient up to float rounding."""
    other = tmp_path / "rank1.pt"
    with ranks(2, RankJob(_sft_ranked, (str(other), 4, arch)), CPU) as where:
        assert where == Ranks(0, 2) == Ranks.current()
        elsewhere = []  # another thread of the process (a cell beside this one) trains alone
        thread = threading.Thread(target=lambda: elsewhere.append(Ranks.current()))
        thread.start()
        thread.join()
        assert elsewhere == [Ranks()]
        ranked, ranked_losses, ranked_grads = _sft_ranked(arch=arch)
    assert Ranks.current() == Ranks()  # the group is gone
    in_one, losses, _ = _sft(ARCHITECTURES[arch](), _sft_data(), threads=1, shards=2, steps=4)
    assert _max_diff(ranked, in_one) == 0.0
    assert ranked_losses == pytest.approx(losses, rel=1e-6)  # summed in float64 across ranks, in float32 in one process
    rank1 = ARCHITECTURES[arch]()
    rank1.load_state_dict(torch.load(other))
    assert _max_diff(ranked, rank1) == 0.0  # every rank took the same steps
    _, _, whole_grads = _sft_ranked(steps=1, arch=arch)
    for a, b in zip(ranked_grads[0], whole_grads[0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _whitened_on_rank(x: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    rank = Ranks.current()
    half = slice(rank.rank * len(x) // 2, (rank.rank + 1) * len(x) // 2)
    torch.save(whitened(x[half], mask[half], ranks=rank), out)


def test_ranked_whitening_uses_the_mean_and_spread_of_every_ranks_tokens(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    with ranks(2, RankJob(_whitened_on_rank, (x, mask, str(tmp_path / "r1.pt"))), CPU):
        _whitened_on_rank(x, mask, str(tmp_path / "r0.pt"))
    (w0, scale0), (w1, scale1) = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    whole, scale = whitened(x, mask)
    assert torch.allclose(torch.cat([w0, w1]), whole, atol=1e-6)
    assert scale0.item() == pytest.approx(scale.item(), rel=1e-6) and scale1.item() == pytest.approx(scale.item(), rel=1e-6)


def _pairs(n: int = 10) -> PairTensors:
    g = torch.Generator().manual_seed(1)
    ids = lambda: torch.randint(2, 20, (n, 7), generator=g)  # noqa: E731
    mask = torch.ones(n, 7, dtype=torch.long)
    return PairTensors(ids(), mask, ids(), mask.clone())


def _reward_model_ranked(batch_size: int, out: str | None = None) -> tuple[RewardModel, list[float], list[torch.Tensor]]:
    """A reward model fitted on this rank (its logged losses, its first step's gradient); a rank
    other than 0 saves its weights to ``out``."""
    torch.manual_seed(0)  # the head's initial weights
    model = RewardModel(_model())
    losses, first = [], []

    def record(optimizer, args, kwargs) -> None:
        if not first:
            first.extend(p.grad.clone() for p in model.parameters())

    handle = register_optimizer_step_pre_hook(record)
    try:
        train_reward_model(model, _pairs(), RewardTrainConfig(steps=4, batch_size=batch_size, lr=1e-2, group_by_length=False),
                           pad_id=0, generator=torch.Generator().manual_seed(0), progress=False, ranks=Ranks.current(),
                           log=lambda step, n, **m: losses.append(m["train/loss"]))
    finally:
        handle.remove()
    if out is not None:
        torch.save(model.state_dict(), out)
    return model, losses, first


def test_a_reward_model_on_two_ranks_takes_the_whole_batchs_step(tmp_path, one_thread):
    """10 pairs in batches of 3: the fourth batch (one pair) leaves rank 1 without any."""
    with ranks(2, RankJob(_reward_model_ranked, (3, str(tmp_path / "r1.pt"))), CPU):
        ranked, ranked_losses, ranked_grads = _reward_model_ranked(3)
    _, losses, grads = _reward_model_ranked(3)
    for a, b in zip(ranked_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Logged at the last step (the pair alone on rank 0), the whole batch's loss, after three steps
    # whose float sums differed in their last bits.
    assert ranked_losses == pytest.approx(losses, rel=1e-3)
    rank1 = RewardModel(_model())
    rank1.load_state_dict(torch.load(tmp_path / "r1.pt"))
    assert _max_diff(ranked, rank1) == 0.0


def _fail() -> None:
    raise ValueError("the data of rank 1 is broken")


def test_a_rank_that_fails_is_reported_in_one_line_naming_it(one_thread):
    with pytest.raises(RankError, match=r"^rank 1 exited with code 1: ValueError: the data of rank 1 is broken$"):
        with ranks(2, RankJob(_fail), CPU) as where:
            where.sum(torch.ones(1))  # the collective rank 1 never joins
    assert Ranks.current() == Ranks()


def _sum_then_abort_at_teardown() -> None:
    """Joins the body's one collective, then aborts in the process group's teardown: the C++ abort
    ("terminate called without an active exception") a rank's gloo threads can raise at exit."""
    import os

    Ranks.current().sum(torch.ones(1))
    torch.distributed.destroy_process_group = os.abort


def test_a_rank_that_aborts_after_its_work_is_done_leaves_the_result_standing(one_thread, caplog):
    with caplog.at_level("WARNING", logger="dpo_engine.distributed"):
        with ranks(2, RankJob(_sum_then_abort_at_teardown), CPU) as where:
            total = where.sum(torch.ones(1))
    assert total.item() == 2.0
    assert "rank 1 exited with code -6" in caplog.text and "after its training had finished" in caplog.text
    assert Ranks.current() == Ranks()


def _abort() -> None:
    import os

    os.abort()


def test_a_rank_that_aborts_before_its_work_is_done_fails_the_stage(one_thread):
    with pytest.raises(RankError, match=r"^rank 1 exited with code -6"):
        with ranks(2, RankJob(_abort), CPU) as where:
            where.sum(torch.ones(1))  # the collective rank 1 never joins
    assert Ranks.current() == Ranks()


def _refuse_to_load():
    raise ValueError("this job cannot be read here")


class _Unreadable:
    """Pickles, but raises when a rank's process unpickles it: a rank that dies before it joins."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def test_a_rank_that_dies_before_joining_is_reported_at_once(one_thread):
    with pytest.raises(RankError, match=r"^rank 1 exited with code 1: ValueError: this job cannot be read here$"):
        with ranks(2, RankJob(_fail, (_Unreadable(),)), CPU):
            pytest.fail("the body runs only once every rank has joined")
    assert Ranks.current() == Ranks()


def _nan_sft() -> None:
    model = _model()
    with torch.no_grad():
        model.transformer.wte.weight.fill_(math.nan)
    supervised_finetune(model, *_sft_data(), SFTConfig(steps=2, batch_size=12, shards=1), pad_id=0,
                        generator=torch.Generator().manual_seed(0), log=TrainLog(), progress=False)


def test_a_non_finite_loss_stops_every_rank_with_the_runs_own_error(one_thread):
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 1"):
        with ranks(2, RankJob(_nan_sft), CPU):
            _nan_sft()


def test_one_rank_starts_nothing():
    with ranks(1, RankJob(_fail), CPU) as where:
        assert where == Ranks() and not where.distributed
        x = torch.arange(4)
        assert where.part(x) is x and where.sum(x) is x


def test_ranks_on_a_device_this_machine_lacks_are_refused_before_anything_starts():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert distributed.devices_error(torch.device("cuda"), 2) == (
        "device cuda: needs GPUs 0..1 (nproc_per_cell = 2), and this machine has 0 CUDA device(s)")
    assert distributed.devices_error(torch.device("cuda:1")) == "device cuda:1: needs GPU 1, and this machine has 0 CUDA device(s)"
    assert distributed.devices_error(CPU, 2) is None
    with pytest.raises(ValueError, match="needs GPUs 0..1"):
        with ranks(2, RankJob(_fail), torch.device("cuda")):
            pass


def test_each_rank_trains_on_its_own_gpu_of_a_cuda_device():
    assert distributed.rank_device(torch.device("cuda"), 1) == torch.device("cuda", 1)
    assert distributed.rank_device(torch.device("cuda:2"), 1) == torch.device("cuda", 3)
    assert distributed.rank_device(CPU, 1) == CPU


# Every stage, tiny, with both kinds of trainer: the DPO family's (optimise) and PPO's.
SMALL = """
task = "sentiment"
seed = 3

[sentiment]
n_reviews = 2000
n_train_prompts = 300
n_val_prompts = 24
n_eval_prompts = 48

[sft]
steps = 20
warmup_steps = 5
shards = {shards}

[reward_model]
steps = 10

[evaluation]
n_checkpoints = 1

[[grid]]
method = "dpo"
values = [0.5]
config = {{ steps = 10, lr = 1e-4 }}

[[grid]]
method = "ppo"
values = [0.2]
config = {{ iterations = 3, rollout_batch = 8 }}
"""


def test_a_run_trains_every_stage_and_cell_on_two_ranks(tmp_path, one_thread):
    """A run with ``nproc_per_cell = 2`` and ``precision = "bf16"``: every stage and cell (SFT,
    reward model, DPO, PPO, each evaluation) finishes, the run records its ranks and precision, and
    the SFT model is the one two shards train in one process under the same autocast, bit for bit."""
    import json

    from dpo_bench.bench import load_config
    from dpo_bench.policy import load_policy
    from dpo_bench.run import run_benchmark
    from dpo_bench.stages import Bench, prepare_task, train_sft

    config_file = tmp_path / "small.toml"
    config_file.write_text(SMALL.format(shards=1))
    config = load_config(None, config_file, overrides={"nproc_per_cell": 2, "precision": "bf16"})
    run_dir = run_benchmark(config, tmp_path / "reports", run_id="ranked", cache_dir=tmp_path / "cache", progress=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["nproc_per_cell"] == 2 and record["config"]["precision"] == "bf16"
    assert {c["status"] for c in record["cells"].values()} == {"ok"}

    config_file.write_text(SMALL.format(shards=2))
    bench = Bench(load_config(None, config_file, overrides={"precision": "bf16"}), tmp_path / "one-process", progress=False)
    alone = load_policy(train_sft(bench, prepare_task(bench)).path / "model")
    (ranked_dir,) = [p for p in (tmp_path / "cache" / "sft").iterdir() if p.is_dir()]
    assert _max_diff(alone, load_policy(ranked_dir / "model")) == 0.0


def _evaluate_on_rank(workdir: str, temperature: float) -> tuple[list[dict], pd.DataFrame]:
    """The bandit's reference evaluated on its test prompts, on this rank (its share when ranked)."""
    from pathlib import Path

    from dpo_bench.methods.base import ModelPolicy
    from dpo_bench.policy_eval import evaluate_policy, reference_samples
    from dpo_bench.tasks.bandit import BanditConfig, BanditTask

    task = BanditTask(BanditConfig(eval_repeats=7), Path(workdir))
    reference = task.initial_model(0)
    where = Ranks.current()
    return evaluate_policy(ModelPolicy(reference, task), task=task, reference=reference, reward_model=None,
                           reference_samples=reference_samples(task, reference, 1.0, 0),
                           generator=torch.Generator().manual_seed(where.rank), temperature=temperature, ranks=where)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_evaluation_on_two_ranks_gathers_every_prompt_in_order(tmp_path, one_thread, temperature):
    """Each rank samples its run of the prompts; rank 0 gets all of them in the prompts' order. Greedy
    sampling draws nothing, so its results are the one process's exactly."""
    with ranks(2, RankJob(_evaluate_on_rank, (str(tmp_path), temperature)), CPU):
        rows, frame = _evaluate_on_rank(str(tmp_path), temperature)
    alone_rows, alone = _evaluate_on_rank(str(tmp_path), temperature)
    assert list(frame["prompt"]) == list(alone["prompt"]) and len(frame) == 4 * 7
    if temperature == 0.0:
        pd.testing.assert_frame_equal(frame, alone)
        assert rows == alone_rows
    else:  # other draws, the same columns
        assert list(frame.columns) == list(alone.columns) and frame["completion"].notna().all()
