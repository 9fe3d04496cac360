"""How a batch of rows of different lengths should go through the model: DPO step time with
GPT-2's own trunk (``dpo_engine.trunk``: no padding, a pair's shared prompt once, the last block
at the read positions alone), with transformers' own padding-free forward (``hf-packed``: the
sequences packed several to a row, ``position_ids`` restarting at each and no attention mask,
which ``masking_utils.create_causal_mask`` reads as a block-diagonal causal mask, for any
architecture), and with a padded forward split into length groups at the per-pass overheads that
:func:`dpo_engine.batching.length_groups` charges (``GROUP_OVERHEAD_TOKENS``; ``inf`` is one
padded pass per batch: what every model but GPT-2 runs).

A DPO step on the train pairs in plain (not length-grouped) order, 64 pairs per step, the
``quick`` fixture's SFT model and pairs (``--preset``; ``--arch llama``: a Llama of the same
width, depth, heads and vocabulary with random weights, where ``packed`` and ``unshared`` do not
apply), 1 thread; each setting runs the same batches, interleaved, and reports the median step and
the tokens computed.
``packed`` is what GPT-2 runs; ``unshared`` the same with every shared prefix computed once per
sequence; ``hf-packed`` transformers' forward on packed rows of at least ``--row-width`` slots
(checked against the padded forward's log-probs before timing). The completion-only logits are
on in every setting. ``computed_per_real`` counts the tokens computed per real token (padding and
empty slots raise it; shared prefixes lower it).

    python -m benchmarks.grouping [--preset default] [--arch gpt2|llama] [--overheads packed unshared hf-packed 0 128 inf] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .common import (
    add_threads_argument, fixture, interleave, load_average, median, models_own_forward, prefixes_unshared, set_threads, table,
    write_result,
)

PACKED = ("packed", "unshared", "hf-packed")


def hf_packed_sequence_logps(model, batch, row_width: int):
    """log π(y|x) (B,) through transformers' own padding-free forward: the real tokens packed into
    rows of ``max(row_width, longest)`` slots (:func:`dpo_engine.trunk.pack_rows`), positions
    restarting at each sequence, no attention mask; the LM head at the completion positions only."""
    from dpo_engine.trunk import pack_rows, position_ids

    real = batch.attention_mask.bool()
    lengths = real.sum(1)
    width = max(row_width, int(lengths.max()))
    start, rows = pack_rows(lengths.tolist(), width)
    tokens = real.flatten().nonzero().squeeze(1)
    positions = position_ids(real).flatten()[tokens]
    sequence_of = torch.arange(len(lengths)).repeat_interleave(lengths)
    slots = torch.tensor(start)[sequence_of] + positions
    ids = torch.zeros(rows * width, dtype=torch.long)
    ids[slots] = batch.input_ids.flatten()[tokens]
    packed_positions = torch.zeros(rows * width, dtype=torch.long)  # an empty slot: a sequence of its own
    packed_positions[slots] = positions
    # Position t predicts token t+1: read where the next token is a completion token of the same sequence.
    predicts = torch.nn.functional.pad(batch.completion_mask[:, 1:].bool(), (0, 1), value=False).flatten()[tokens]
    read = slots[predicts]
    order = read.sort().values
    keep = torch.zeros(rows * width, dtype=torch.bool)
    keep[read] = True
    logits = model(input_ids=ids.view(rows, width), position_ids=packed_positions.view(rows, width), attention_mask=None,
                   use_cache=False, logits_to_keep=keep.view(rows, width)).logits
    logits = logits.index_select(0, torch.searchsorted(order, read))  # back to row-major order
    targets = batch.input_ids.flatten()[tokens][predicts.nonzero().squeeze(1) + 1]
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    return torch.zeros(len(lengths)).index_add(0, sequence_of[predicts], picked)


def llama_like(gpt2):
    """A Llama with the GPT-2's width, depth, heads, positions and vocabulary, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = gpt2.config
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=4 * c.n_embd, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_head, max_position_embeddings=c.n_positions,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=True))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overheads", nargs="+", default=["packed", "unshared", "hf-packed", "0", "64", "128", "256", "512", "inf"])
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--preset", default="quick", help="whose SFT model and preference pairs (built in the benchmark cache on first use)")
    p.add_argument("--row-width", type=int, default=128, help="hf-packed: the least width of a packed row")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    add_threads_argument(p)
    args = p.parse_args(argv)
    set_threads(args.threads)

    import dpo_engine.batching as batching
    from dpo_bench.logprobs import concat_batches, sequence_logps
    from dpo_bench.losses import LOSSES

    fx = fixture(preset=args.preset)
    base_model = fx.reference if args.arch == "gpt2" else llama_like(fx.reference)
    if args.arch != "gpt2":
        args.overheads = [o for o in args.overheads if o not in ("packed", "unshared")]
    pad = fx.task.pad_id
    n = args.batch_size
    batches = []
    for step in range(args.steps):
        idx = torch.arange(step * n, (step + 1) * n) % len(fx.prefs.chosen)
        pair = concat_batches(fx.prefs.chosen.select(idx), fx.prefs.rejected.select(idx), pad).trim()
        batches.append((pair, fx.prefs.ref_chosen_logps[idx], fx.prefs.ref_rejected_logps[idx]))

    def computed_per_real(overhead: float | str) -> float:
        """Tokens computed per real token: padding included, shared prefixes once when packed."""
        from dpo_engine.trunk import Packing

        computed = real = 0
        for pair, _, _ in batches:
            lengths = pair.attention_mask.sum(-1)
            real += int(lengths.sum())
            if overhead == "packed":
                computed += len(Packing(pair.attention_mask.bool(), pair.input_ids).unique)
            elif overhead == "hf-packed":  # every slot of a packed row runs, an empty one too
                from dpo_engine.trunk import pack_rows

                computed += pack_rows(lengths.tolist(), max(args.row_width, int(lengths.max())))[1] * max(args.row_width, int(lengths.max()))
            elif overhead == "unshared":
                computed += int(lengths.sum())
            else:
                groups = [list(range(len(pair)))] if overhead == float("inf") else batching.length_groups(lengths, int(overhead))
                computed += sum(len(g) * int(lengths[g].max()) for g in groups)
        return computed / real

    def side(overhead: float | str):
        def run() -> float:
            if overhead == "packed":
                return steps()
            if overhead == "unshared":
                with prefixes_unshared():
                    return steps()
            with models_own_forward():
                return steps()

        def steps() -> float:
            model = copy.deepcopy(base_model).train()
            for q in model.parameters():
                q.requires_grad_(True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
            saved = batching.GROUP_OVERHEAD_TOKENS
            if overhead not in PACKED:
                batching.GROUP_OVERHEAD_TOKENS = 10**9 if overhead == float("inf") else int(overhead)
            times = []
            try:
                for pair, ref_c, ref_r in batches:
                    start = time.perf_counter()
                    logps = (hf_packed_sequence_logps(model, pair, args.row_width) if overhead == "hf-packed"
                             else sequence_logps(model, pair))
                    loss = LOSSES["dpo"].fn(logps[:n], logps[n:], ref_c, ref_r, beta=0.1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    times.append(time.perf_counter() - start)
            finally:
                batching.GROUP_OVERHEAD_TOKENS = saved
            return median(times[2:])
        return run

    overheads = [o if o in PACKED else float(o) for o in args.overheads]
    if "hf-packed" in overheads:
        with torch.no_grad(), models_own_forward():
            pair = batches[0][0]
            gap = (hf_packed_sequence_logps(base_model, pair, args.row_width) - sequence_logps(base_model, pair)).abs().max()
        if gap > 1e-3:
            raise SystemExit(f"hf-packed: log-probs differ from the padded forward's by {float(gap):.3g}")
    loads = [load_average()[0]]
    results = interleave({str(o): side(o) for o in overheads}, args.repeats)
    loads.append(load_average()[0])
    base = median(results[str(float("inf"))]) if float("inf") in overheads else None
    rows = []
    for o in overheads:
        ms = 1000 * median(results[str(o)])
        label = o if o in PACKED else "inf (one pass)" if o == float("inf") else int(o)
        rows.append({"overhead_tokens": label, "step_ms": ms,
                     "computed_per_real": computed_per_real(o), "speedup_vs_one_pass": (1000 * base / ms) if base else float("nan")})
    print(table(rows, ["overhead_tokens", "step_ms", "computed_per_real", "speedup_vs_one_pass"]))
    path = write_result("grouping" if args.arch == "gpt2" else f"grouping_{args.arch}", {"arch": args.arch, "row_width": args.row_width, "threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats,
                                     "batch_pairs": n, "load": loads, "rows": rows, "raw": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
