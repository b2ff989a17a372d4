"""Greedy generation, moeray's in-process engine vs transformers' `generate`, on one checkpoint.

    python bench/generate.py                   # models/default if it is there, else a tiny random Mixtral
    python bench/generate.py --quick           # smoke run: fewer new tokens and repetitions
    python bench/generate.py --model DIR --batch-sizes 1 16 --max-new-tokens 64

Both sides get the same prompts (random token ids of one length, so transformers' batch needs
no padding), decode greedily for exactly `--max-new-tokens` tokens (eos ignored: transformers
with `eos_token_id=None`, ours with `ignore_eos=True`) and are timed end to end, prefill
included. tokens/s = batch * new tokens / seconds. transformers runs once per experts
implementation (`--hf-experts`) and the ratio is taken against the fastest. The batch-1 token
ids of both sides must be identical; batches > 1 report how many sequences match.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from moeray.actors.engine import Engine, EngineConfig
from moeray.actors.sequence import SamplingParams
from moeray.models import DEFAULT_MODEL_DIR, load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny_random_mixtral(folder: Path) -> Path:
    """A Mixtral shaped like the built-in model (4 layers, H=128, 8 experts, top-2), random weights."""
    config = MixtralConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=1024, initializer_range=0.1,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()  # 0..2: unk, bos, eos


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def ours_generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    done = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, ignore_eos=True))
    return [c.token_ids for c in done]


def time_interleaved(fns: dict, reps: int) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Median seconds per call over `reps` round-robin rounds after one warm-up round; and each output."""
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}, outputs


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: models/default, else a tiny random Mixtral)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, 1 repetition")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--hf-experts", nargs="+", default=["grouped_mm", "eager"],
                        help="transformers experts implementations to time (the fastest is the baseline)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args()
    if args.quick:
        args.max_new_tokens, args.reps = 16, 1
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else tiny_random_mixtral(Path(tmp))
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None
        model = load_model(folder, dtype)
        engine = Engine(model, config=EngineConfig(max_num_seqs=max(args.batch_sizes), kv_cache_bytes=64 << 20))
        c = model.config
        print(f"model {folder}: {c.family}, {c.num_layers} layers, H={c.hidden_size}, E={c.num_experts}, "
              f"K={c.routing.top_k}, I={c.moe_intermediate_size}, V={c.vocab_size}; {args.dtype}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
        print(f"prompts: {args.prompt_len} random token ids each, {args.max_new_tokens} new tokens, greedy, eos ignored, "
              f"median of {args.reps} (after a warm-up)\n")
        print("| batch | " + " | ".join(f"HF {i} tok/s" for i in args.hf_experts)
              + " | moeray tok/s | moeray / best HF | token ids identical |")
        print("|" + " --- |" * (len(args.hf_experts) + 4))
        missed = []
        for batch in args.batch_sizes:
            prompts = make_prompts(batch, args.prompt_len, c.vocab_size)
            fns = {}
            for impl in args.hf_experts:
                def run_hf(impl=impl):
                    hf.set_experts_implementation(impl)
                    return hf_generate(hf, prompts, args.max_new_tokens)
                fns[f"hf:{impl}"] = run_hf
            fns["ours"] = lambda: ours_generate(engine, prompts, args.max_new_tokens)
            secs, outputs = time_interleaved(fns, args.reps)
            num_tokens = batch * args.max_new_tokens
            hf_rates = {name[3:]: num_tokens / s for name, s in secs.items() if name.startswith("hf:")}
            best = max(hf_rates, key=hf_rates.get)
            ours_rate = num_tokens / secs["ours"]
            same = sum(a == b for a, b in zip(outputs["ours"], outputs[f"hf:{best}"]))
            print(f"| {batch} | " + " | ".join(f"{hf_rates[i]:,.0f}" for i in args.hf_experts)
                  + f" | {ours_rate:,.0f} | **{ours_rate / hf_rates[best]:.2f}x** ({best}) | {same}/{batch} |", flush=True)
            if batch == 1 and same != 1:
                raise AssertionError(f"batch-1 greedy ids differ:\n  moeray {outputs['ours'][0]}\n"
                                     f"  HF     {outputs[f'hf:{best}'][0]}")
            if ours_rate / hf_rates[best] < 2:
                missed.append(batch)
        print(f"\ntarget (moeray >= 2x best HF): {'met' if not missed else f'missed at batch {missed}'}")


if __name__ == "__main__":
    main()
