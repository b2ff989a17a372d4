"""Train moeray's built-in default model: a tiny Mixtral-style Mixture-of-Experts LM.

Makes a Hugging Face checkpoint folder (config.json, model.safetensors in bfloat16,
tokenizer.json, generation_config.json; about 8 MB) for `MixtralForCausalLM`: 4 layers,
hidden 128, 8 experts per layer with top-2 routing, and a 2048-token byte-level BPE
tokenizer. The training text ships with Python (the `pydoc_data` documentation topics
plus a few stdlib module docstrings), so nothing is downloaded. The router is trained
with a light load-balancing loss only, so expert load stays real and uneven.

Takes 15-20 minutes on one CPU thread with the default `--steps` (800). Re-run with:

    python -m moeray.models.train_default --out models/default

This is the only moeray module that imports transformers, which comes with the test extra
(`pip install -e '.[test]'`); tests/unit/test_train_default.py runs it for two steps.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import pydoc_data.topics
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

SEED = 0
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mixtral
DOC_MODULES = ["itertools", "collections", "json", "re", "os", "typing", "subprocess", "argparse", "heapq", "string"]
KEEP = {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}
PROMPTS = ["def fibonacci(n):", "The ", "The for statement"]


def corpus() -> list[str]:
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    return docs + [__import__(m).__doc__ for m in DOC_MODULES if __import__(m).__doc__]


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def make_config(vocab_size: int, intermediate: int, output_router_logits: bool) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, sliding_window=None,
        output_router_logits=output_router_logits, router_aux_loss_coef=0.01)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int) -> tuple[float, torch.Tensor]:
    """Mean next-token loss over non-overlapping windows, and top-k counts per layer [L, E]."""
    model.eval()
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    total, n = 0.0, 0
    for i in range(0, len(data) - 1, seq):
        x = data[i:i + seq + 1].unsqueeze(0)
        if x.shape[1] < 2:
            break
        out = model(x[:, :-1], output_router_logits=True)
        loss = torch.nn.functional.cross_entropy(out.logits[0].float(), x[0, 1:], reduction="sum")
        total, n = total + loss.item(), n + x.shape[1] - 1
        for layer, logits in enumerate(out.router_logits):  # [T, E] per layer
            top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(top.flatten(), minlength=cfg.num_local_experts)
    model.train()
    return total / n, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/default")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    random.seed(SEED)
    torch.manual_seed(SEED)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = corpus()
    tok = train_tokenizer(docs, 2048)
    sample = "def f(x):\n    if x:\n\treturn [x, 'é']  # ok\n\n\nprint(f(1))\n"
    assert tok.decode(tok.encode(sample).ids) == sample, "tokenizer does not round-trip"
    random.Random(SEED).shuffle(docs)  # held-out = a random mix of topics, not the alphabetical tail
    ids = []
    for d in docs:  # one stream: <s> doc </s> <s> doc </s> ...
        ids += tok.encode(d).ids + [2]
    data = torch.tensor(ids, dtype=torch.long)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    print(f"corpus: {sum(map(len, docs))} chars, {len(docs)} docs, {len(data)} tokens "
          f"({len(train)} train / {len(held)} held-out)")

    model = MixtralForCausalLM(make_config(tok.get_vocab_size(), args.intermediate, True))
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup))))))

    model.train()
    start, coef = time.time(), model.config.router_aux_loss_coef
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,))
        x = torch.stack([train[s:s + args.seq + 1] for s in starts.tolist()])
        outp = model(x[:, :-1], labels=x[:, :-1])  # labels are shifted inside the model
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            lm = outp.loss.item() - coef * outp.aux_loss.item()
            print(f"step {step:5d}  loss {lm:.3f}  aux {outp.aux_loss.item():.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  elapsed {time.time() - start:6.0f}s", flush=True)
        if step % args.eval_every == 0:
            print(f"step {step:5d}  held-out loss {evaluate(model, held, args.seq)[0]:.3f}", flush=True)
    train_loss, _ = evaluate(model, train[-len(held):], args.seq)
    held_loss, _ = evaluate(model, held, args.seq)
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s; "
          f"train loss {train_loss:.3f}, held-out loss {held_loss:.3f} (fp32)")

    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    for f in out.iterdir():
        if f.name not in KEEP:
            f.unlink()

    # Verify the folder as a user would load it.
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.decode(tok.encode(sample).ids) == sample
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved {out}: {sorted(f.name for f in out.iterdir())}, {size / 1e6:.2f} MB")
    held_loss, counts = evaluate(model, held, args.seq)
    print(f"held-out loss after bf16 round-trip: {held_loss:.3f}")
    for p in PROMPTS:
        x = torch.tensor([tok.encode(p).ids])
        y = model.generate(x, max_new_tokens=40, do_sample=False)
        print(f"--- {p!r}\n{tok.decode(y[0].tolist())}")
    print("per-expert token share on held-out text (top-2 selections / total):")
    for layer, c in enumerate(counts):
        share = c / c.sum()
        print(f"  layer {layer}: " + " ".join(f"{s:.3f}" for s in share.tolist())
              + f"   max/mean {share.max().item() * len(share):.2f}")


if __name__ == "__main__":
    main()
