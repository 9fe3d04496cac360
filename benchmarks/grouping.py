"""How many forward passes a batch should be split into: DPO step time against the per-pass
overhead that :func:`dpo_engine.batching.length_groups` charges (``GROUP_OVERHEAD_TOKENS``), and
against GPT-2's packed forward (``dpo_engine.trunk``), which computes no padding in one pass, and
a pair's shared prompt once.

A DPO step on the train pairs in plain (not length-grouped) order, 64 pairs per step, the
``quick`` fixture's SFT model, 1 thread; each setting runs the same batches, interleaved, and
reports the median step and the tokens computed. The overheads run transformers' own forward,
as every model but GPT-2 does; ``inf`` is one padded pass per batch (no grouping); ``packed`` is
what GPT-2 runs; ``unshared`` is the same with every shared prefix computed once per sequence.
The completion-only logits are on in every setting. ``computed_per_real`` counts the tokens
computed per real token (padding raises it; shared prefixes lower it).

    python -m benchmarks.grouping [--overheads packed unshared 0 64 128 256 512 inf] [--steps 20] [--repeats 3]
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

PACKED = ("packed", "unshared")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overheads", nargs="+", default=["packed", "unshared", "0", "64", "128", "256", "512", "inf"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    add_threads_argument(p)
    args = p.parse_args(argv)
    set_threads(args.threads)

    import dpo_engine.batching as batching
    from dpo_bench.logprobs import concat_batches, sequence_logps
    from dpo_bench.losses import LOSSES

    fx = fixture()
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
            with prefixes_unshared() if overhead == "unshared" else models_own_forward():
                return steps()

        def steps() -> float:
            model = copy.deepcopy(fx.reference).train()
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
                    logps = sequence_logps(model, pair)
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
    path = write_result("grouping", {"threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats,
                                     "batch_pairs": n, "load": loads, "rows": rows, "raw": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
