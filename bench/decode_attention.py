"""One decode step's attention over the paged KV cache: the native kernel vs the torch path (gather the
context, then SDPA), and the native kernel on 1 thread vs all of them, at DeepSeek's MLA shapes.

    python bench/decode_attention.py              # batch 1 and 8, contexts 1024 and 4096
    python bench/decode_attention.py --quick

MLA caches one kv head per token (the latent, 512 numbers, then the rotated key, 64) and reads the
value as the latent's first 512 numbers, so every query head (16 in DeepSeek-V2-Lite, 128 in V3)
shares the one kv head. The kernel splits work by (sequence, kv head); with fewer of those than
threads it splits each kv head's query heads into parts, one per thread (same bits: a head's result
does not depend on which heads share its part). At batch 1 "native 1 thread" is what the sequence got before that split; at batch
8 (sequences >= threads, no split) it is plain thread scaling. Columns: milliseconds a call (median
of interleaved repetitions; each call sets its thread count), torch / native and 1 thread / native. The torch path is what GPUs run,
and CPUs where the kernel cannot be built.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moeray.kernels import native
from moeray.kernels.attention import build_metadata, paged_attention

LATENT, ROPE = 512, 64  # DeepSeek-V2/V3: kv_lora_rank, qk_rope_head_dim
BLOCK = 16


def case(batch: int, heads: int, context: int, threads: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    blocks = batch * -(-context // BLOCK)
    keys = torch.randn(blocks * BLOCK, 1, LATENT + ROPE, generator=gen)  # [slots, 1, r + dr]
    values = keys[..., :LATENT]  # a view: MLA's values live in its keys
    order = torch.randperm(blocks, generator=gen).tolist()
    tables = [order[b * (blocks // batch):(b + 1) * (blocks // batch)] for b in range(batch)]
    meta = build_metadata(tables, [context - 1] * batch, [1] * batch, BLOCK)
    q = torch.randn(batch, heads, LATENT + ROPE, generator=gen)
    k = torch.randn(batch, 1, LATENT + ROPE, generator=gen)
    v = k[..., :LATENT]
    scale = (LATENT + ROPE) ** -0.5

    def run(use_native: bool, num_threads: int):
        torch.set_num_threads(num_threads)
        native.ENABLED = use_native
        return paged_attention(q, k, v, keys, values, meta, scale, None)

    fns = {"torch": lambda: run(False, threads), "native 1": lambda: run(True, 1), "native": lambda: run(True, threads)}
    torch.testing.assert_close(fns["native"](), fns["torch"](), rtol=1e-4, atol=1e-5)
    assert torch.equal(fns["native"](), fns["native 1"]())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:
                samples[name].append(time.perf_counter() - start)
    native.ENABLED = True
    torch.set_num_threads(threads)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the native CPU kernels are not available here: nothing to compare")
    shapes = [(1, 16, 1024)] if args.quick else [(1, 16, 1024), (1, 16, 4096), (1, 128, 1024), (8, 16, 1024)]
    print(f"torch {torch.__version__}, {args.threads} threads; MLA cache: 1 kv head of {LATENT + ROPE}, values "
          f"its first {LATENT}\n")
    print("| batch | query heads | context | torch (gather + SDPA) ms | native 1 thread ms | native ms "
          "| torch / native | 1 thread / native |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, heads, context in shapes:
        ms = case(batch, heads, context, args.threads, 3 if args.quick else 9)
        print(f"| {batch} | {heads} | {context} | {ms['torch']:.2f} | {ms['native 1']:.2f} | {ms['native']:.2f} "
              f"| **{ms['torch'] / ms['native']:.2f}x** | {ms['native 1'] / ms['native']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
