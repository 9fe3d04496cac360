"""FLOPs per step of each stage, counted from the model's shape and the batch's token counts, and
the FLOP/s achieved against this machine's measured matrix-multiply rate.

Forward FLOPs of a GPT-2 (L blocks, width d, vocabulary V) over a B x T batch, counting each
multiply-add as 2: per token and block 24·d² (the QKV, output and MLP projections) plus 4·T·d
(attention scores and their weighted sum over the T positions the kernel computes), plus 2·d·V
for the LM head. A training step is 3x its forward (backward ≈ 2x). The count follows what the
code computes (``dpo_engine.trunk``): the projections and the MLP at the real tokens only, and a
prefix that several sequences share once (a DPO pair's prompt); attention over the sequences
packed into R rows of W slots, every slot attending over its row's W slots (4·W·d, empty slots
and the copies of shared tokens included); the last block's keys and values (4·d²) at every
computed token, its queries, output projection and MLP (20·d²) only where its output is read, and
the LM head at every position read: where a completion token is predicted, or for the reward
model at one position per row and without the LM head. "useful share" is the part of those FLOPs
a padding-free attention over each computed token's own sequence would need. Sampling with a KV
cache costs one token's forward per step, attending over the cache.

Rates use process CPU time at 1 thread, so other processes on the cores distort them little;
the ceiling is a 2048 x 2048 float32 ``torch.mm`` at the same thread count.

    python -m benchmarks.flops [--repeats 5] [--profile]

``--profile`` also splits a DPO step's CPU time by operator group (matmuls, attention, GELU, layer
norm, log-softmax, the rest) and gives the matmuls' own FLOP/s.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .common import add_threads_argument, fixture, load_average, median, set_threads, table, write_result


def shape(model) -> tuple[int, int, int]:
    c = model.config
    return c.n_layer, c.n_embd, c.vocab_size


def forward_flops(model, rows: int, width: int, lm_head: bool = True) -> float:
    layers, d, vocab = shape(model)
    per_token = layers * (24 * d * d + 4 * width * d) + (2 * d * vocab if lm_head else 0)
    return rows * width * per_token


def useful_fraction(mask: torch.Tensor) -> float:
    return float(mask.float().mean())


def packed_flops(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                 lm_head: bool = True) -> tuple[float, float]:
    """(computed, useful) forward FLOPs of one batch as ``dpo_engine.trunk`` runs it: the tokens it
    computes (each shared prefix once), attention over packed rows, and the last block's queries,
    projection and MLP at the computed tokens whose output is read (``keep``, B x T), and the LM
    head, when ``lm_head``, at every kept position."""
    from dpo_engine.trunk import Packing

    layers, d, vocab = shape(model)
    lengths = attention_mask.sum(-1)
    packing = Packing(attention_mask.bool(), input_ids)
    slots, width = packing.rows * packing.width, packing.width
    own = lengths.repeat_interleave(lengths)[packing.unique]  # each computed token's sequence length
    kept = packing.node[keep.flatten()[packing.tokens].nonzero().squeeze(1)]
    read = kept.unique()  # the computed tokens whose output is read
    computed = len(packing.unique) * ((layers - 1) * 24 * d * d + 4 * d * d) + len(read) * 20 * d * d + layers * slots * 4 * width * d
    useful = (float(((layers - 1) * (24 * d * d + 4 * own * d) + 4 * d * d).sum())
              + float((20 * d * d + 4 * own[read] * d).sum()))
    head = len(kept) * 2 * d * vocab if lm_head else 0
    return computed + head, useful + head


def computed_share(batch) -> str:
    """The share of a batch's real tokens that ``dpo_engine.trunk`` computes (each shared prefix once)."""
    from dpo_engine.trunk import Packing

    packing = Packing(batch.attention_mask.bool(), batch.input_ids)
    return f"computes {len(packing.unique) / len(packing.tokens):.0%} of its real tokens"


def predicts_completion(batch) -> torch.Tensor:
    """(B, T): the positions whose output predicts a completion token (what log-probs read)."""
    return torch.nn.functional.pad(batch.completion_mask[:, 1:].bool(), (0, 1), value=False)


def cpu_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of ``fn`` after one untimed call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return median(cpu), median(wall)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    cpu, _ = cpu_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * n ** 3 / cpu


# Operator groups of a training step's profile (self CPU time of each aten op).
OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    # index_select includes the embeddings' lookups (two calls a step).
    "packing (to attention's rows and back)": ("aten::index_copy", "aten::index_select", "aten::index_add_"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "log-softmax": ("aten::_log_softmax", "aten::_log_softmax_backward_data"),
}


def op_breakdown(step, steps: int = 10) -> tuple[list[dict], float]:
    """Share of a step's self CPU time by operator group, and the matmuls' own rate in FLOP/s
    (their FLOPs as the profiler counts them over their self time)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = []
    groups = {**{group: set(names) for group, names in OP_GROUPS.items()},
              "everything else (autograd, optimiser, copies, indexing)": None}
    grouped = set().union(*OP_GROUPS.values())
    for group, names in groups.items():
        spent = sum(e.self_cpu_time_total for e in events if (e.key in names if names else e.key not in grouped))
        rows.append({"ops": group, "share_of_step": spent / total, "ms_per_step": spent / steps / 1000})
    mm = [e for e in events if e.key in OP_GROUPS["matmul"]]
    mm_rate = sum(e.flops for e in mm) / (sum(e.self_cpu_time_total for e in mm) / 1e6)
    return rows, mm_rate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also split a DPO step's time by operator group (torch.profiler)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    set_threads(args.threads)

    from dpo_bench.generation import sample
    from dpo_bench.logprobs import batched_sequence_logps, collate, concat_batches, sequence_logps
    from dpo_bench.losses import LOSSES
    from dpo_bench.methods.sft import sft_loss
    from reward.bradley_terry import bt_loss
    from reward.model import RewardModel, last_token_index
    from dpo_engine.optim import adamw
    from reward.train import PairTensors, pair_scores

    fx = fixture()
    pad = fx.task.pad_id
    loads = [load_average()[0]]
    peak = matmul_rate(repeats=args.repeats)
    rows = []

    def trainable():
        model = copy.deepcopy(fx.reference).train()
        for q in model.parameters():
            q.requires_grad_(True)
        return model

    def record(stage: str, flops: float, useful: float, fn, note: str = "") -> None:
        """``flops`` computed per call, ``useful`` the share of them on real tokens."""
        cpu, wall = cpu_seconds(fn, args.repeats)
        rows.append({"stage": stage, "GFLOP_per_step": flops / 1e9, "useful_share": useful, "cpu_ms": 1000 * cpu,
                     "wall_ms": 1000 * wall, "GFLOP_per_s": flops / cpu / 1e9, "share_of_matmul_peak": flops / cpu / peak,
                     "note": note})

    def step_flops(batch) -> tuple[float, float]:
        """(computed FLOPs of a training step, useful share) with the LM head at the completion tokens."""
        computed, useful = packed_flops(fx.reference, batch.input_ids, batch.attention_mask, predicts_completion(batch))
        return 3 * computed, useful / computed

    # SFT: 64 corpus sentences after a BOS prompt.
    prompts, completions = fx.task.reference_training_data()
    sft_batch = collate(prompts[:64], completions[:64], pad)
    model = trainable()
    opt = adamw(model.parameters(), lr=1e-6)

    def sft_step():
        loss = sft_loss(model, sft_batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    record("SFT step (64 sequences)", *step_flops(sft_batch), sft_step,
           f"padded T={sft_batch.input_ids.shape[1]}; {computed_share(sft_batch)}")

    # DPO: 64 pairs, chosen and rejected in one forward.
    idx = torch.arange(64)
    pair_batch = concat_batches(fx.prefs.chosen.select(idx), fx.prefs.rejected.select(idx), pad).trim()
    ref_c, ref_r = fx.prefs.ref_chosen_logps[idx], fx.prefs.ref_rejected_logps[idx]
    model = trainable()
    opt = adamw(model.parameters(), lr=1e-6)

    def dpo_step():
        logps = sequence_logps(model, pair_batch)
        loss = LOSSES["dpo"].fn(logps[:64], logps[64:], ref_c, ref_r, beta=0.1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    record("DPO step (64 pairs)", *step_flops(pair_batch), dpo_step,
           f"padded T={pair_batch.input_ids.shape[1]}; {computed_share(pair_batch)}")
    breakdown, mm_rate = op_breakdown(dpo_step) if args.profile else ([], float("nan"))

    # Reward model: the same 64 pairs; the trunk's output at one position per row, no LM head.
    rm = RewardModel(fx.reference)
    for q in rm.parameters():
        q.requires_grad_(True)
    rm_opt = adamw(rm.parameters(), lr=1e-6)
    c, r = fx.prefs.chosen.select(idx), fx.prefs.rejected.select(idx)
    pairs = PairTensors(c.input_ids, c.attention_mask, r.input_ids, r.attention_mask)

    def rm_step():
        r_w, r_l = pair_scores(rm, pairs, pad)
        loss = bt_loss(r_w, r_l).mean()
        rm_opt.zero_grad()
        loss.backward()
        rm_opt.step()

    last = torch.zeros_like(pair_batch.attention_mask, dtype=torch.bool)
    last[torch.arange(len(pair_batch)), last_token_index(pair_batch.attention_mask)] = True
    computed, useful = packed_flops(fx.reference, pair_batch.input_ids, pair_batch.attention_mask, last, lm_head=False)
    record("reward-model step (64 pairs)", 3 * computed, useful / computed, rm_step, "last block at 1 position per row")

    # Reference log-probs of every train pair (forward only, chunks trimmed to their longest row).
    everything = fx.prefs.chosen
    n = len(everything)
    chunks = [packed_flops(fx.reference, c.input_ids, c.attention_mask, predicts_completion(c))
              for c in (everything.select(slice(s, s + 256)) for s in range(0, n, 256))]
    computed, useful = sum(c for c, _ in chunks), sum(u for _, u in chunks)
    record(f"reference log-probs ({n} sequences)", computed, useful / computed,
           lambda: batched_sequence_logps(fx.reference, everything), "no grad")

    # Sampling 512 completions with the KV cache.
    prompt_ids = [fx.task.encode_prompt(t) for t in fx.task.train_prompts[:512]]
    drawn = sample(fx.reference, prompt_ids, max_new_tokens=fx.task.max_new_tokens, eos_id=fx.task.eos_id, pad_id=pad,
                   generator=torch.Generator().manual_seed(0))
    n_prompt = max(len(q) for q in prompt_ids)
    steps = drawn.batch.input_ids.shape[1] - n_prompt
    layers, d, vocab = shape(fx.reference)
    gen_flops = forward_flops(fx.reference, 512, n_prompt) + sum(
        512 * (layers * (24 * d * d + 4 * (n_prompt + s + 1) * d) + 2 * d * vocab) for s in range(steps - 1))
    record("sampling (512 prompts, KV cache)", gen_flops, useful_fraction(drawn.batch.attention_mask),
           lambda: sample(fx.reference, prompt_ids, max_new_tokens=fx.task.max_new_tokens, eos_id=fx.task.eos_id, pad_id=pad,
                          generator=torch.Generator().manual_seed(0)), f"{steps} decoding steps")
    loads.append(load_average()[0])

    print(f"matrix-multiply ceiling: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} thread(s), 2048x2048 float32 torch.mm)")
    print(table(rows, ["stage", "GFLOP_per_step", "useful_share", "cpu_ms", "wall_ms", "GFLOP_per_s", "share_of_matmul_peak", "note"]))
    if breakdown:
        print(f"DPO step by operator group (torch.profiler, self CPU time); its matmuls ran at {mm_rate / 1e9:.1f} GFLOP/s, "
              f"{mm_rate / peak:.0%} of the ceiling")
        print(table(breakdown, ["ops", "share_of_step", "ms_per_step"]))
    print(f"load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result("flops", {"config": vars(args), "matmul_GFLOP_per_s": peak / 1e9, "rows": rows,
                                  "threads": torch.get_num_threads(), "load_average_range": [min(loads), max(loads)],
                                  "dpo_step_ops": breakdown, "dpo_step_matmul_GFLOP_per_s": mm_rate / 1e9 if breakdown else None})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
