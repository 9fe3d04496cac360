"""Sampling throughput: our batched KV-cached sampler against ``model.generate``.

The same SFT model, the same train prompts (left-padded batches of ``--batch-size``), the same
temperature 1 and completion cap, eos stopping; sequences per second, sides alternated. Also our
sampler one prompt at a time, to show what batching buys.

    python -m benchmarks.generation [--prompts 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from .common import add_threads_argument, fixture, interleave, load_average, median, set_threads, table, write_result


def ours(fx, prompts, batch_size: int, seed: int) -> float:
    from dpo_bench.generation import sample

    start = time.perf_counter()
    sample(fx.reference, prompts, max_new_tokens=fx.task.max_new_tokens, eos_id=fx.task.eos_id, pad_id=fx.task.pad_id,
           generator=torch.Generator().manual_seed(seed), batch_size=batch_size)
    return time.perf_counter() - start


@torch.no_grad()
def hf_generate(fx, prompts, batch_size: int, seed: int) -> float:
    from dpo_bench.generation import left_pad

    torch.manual_seed(seed)
    start = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s:s + batch_size], fx.task.pad_id)
        fx.reference.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=fx.task.max_new_tokens, eos_token_id=fx.task.eos_id, pad_token_id=fx.task.pad_id,
                              use_cache=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--unbatched-prompts", type=int, default=32, help="prompts for the one-at-a-time run")
    p.add_argument("--repeats", type=int, default=5)
    add_threads_argument(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    fx = fixture()
    prompts = [fx.task.encode_prompt(t) for t in fx.task.train_prompts[: args.prompts]]
    few = prompts[: args.unbatched_prompts]
    loads = [load_average()[0]]
    for fn in (ours, hf_generate):  # warm-up, untimed
        fn(fx, prompts[:8], 8, 0)
    seconds = interleave({
        "ours (KV cache, batched)": lambda: ours(fx, prompts, args.batch_size, 0),
        "model.generate (batched)": lambda: hf_generate(fx, prompts, args.batch_size, 0),
        "ours, one prompt at a time": lambda: ours(fx, few, 1, 0) * len(prompts) / len(few),
    }, args.repeats)
    loads.append(load_average()[0])
    base = median(seconds["ours (KV cache, batched)"])
    rows = [{"sampler": name, "median_s_per_512": median(xs) * 512 / len(prompts), "sequences_per_s": len(prompts) / median(xs),
             "speedup_of_ours": median(xs) / base, "repeats": len(xs)} for name, xs in seconds.items()]
    print(table(rows, ["sampler", "median_s_per_512", "sequences_per_s", "speedup_of_ours"]))
    print(f"{len(prompts)} prompts, max_new_tokens {fx.task.max_new_tokens}, {torch.get_num_threads()} threads; "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    path = write_result("generation", {"config": vars(args), "rows": rows, "seconds": seconds, "threads": torch.get_num_threads(),
                                       "load_average_range": [min(loads), max(loads)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
