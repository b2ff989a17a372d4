"""The distributed step vs the in-process engine: decode tokens/s, and one MoE layer's exchange vs the floor.

    python bench/cluster_step.py                      # the built-in model (models/default), both tables, < 5 min
    python bench/cluster_step.py --quick              # smoke run, < 1 min of measuring
    python bench/cluster_step.py --synthetic          # a bigger random Mixtral (H=512, E=8, K=2, I=1024, 4 layers)
    python bench/cluster_step.py --model DIR --batch 1 64 --table decode
    python bench/cluster_step.py --table exchange --tokens 1 256

Table 1, decode throughput. A real local Ray cluster (`ray.init(num_cpus=2)` in a private temp dir,
token auth off) runs `deploy(ClusterConfig(model, num_groups=2))`: a router and two expert groups,
one torch thread each (what `deploy` gives them on this machine). B requests with equal-length
random prompts (greedy, `max_tokens` tokens, `ignore_eos`) go in at once from B client threads
through `Deployment.generate`. The in-process `Engine` on the same checkpoint (with its tokenizer, so that
both sides make the same text) runs the same prompts (`add_request` x B, then `step()` until done) with `--engine-threads` torch threads (default 1:
the per-process share the actors get; on a shared 2-core machine a 2-thread OpenMP pool collapses
under load and would flatter the cluster). Every token is time-stamped where it lands (client
thread / after `step()`). *Decode tok/s* counts the tokens that land between the moment the last
request got its first token (every prefill done) and the moment the first request finished (all
B still decoding), divided by that time. *End-to-end tok/s* is B * max_tokens / (first submit ->
last token), prefill and Ray start-up of the calls included. Ratios are medians of per-repetition
ratios; the two sides alternate within each repetition. *Greedy ids identical* counts the requests
whose generated ids are the same on both sides (worst repetition; fp32 should give B/B).

Table 2, one MoE layer's exchange vs the floor, without Ray: three processes (torch.multiprocessing
spawn, one torch thread each) form a `moeray.actors.comm.World` over gloo; the rendezvous store is
hosted by this process on a port the OS picks. Rank 0 plays the router, ranks 1-2 the expert groups
of `PlacementPlan.default(1, E, 2)`. Per repetition (all ranks first meet in an all_reduce that
carries which variant runs) the router times one of:
  dispatch+combine  the router's real path: `actors.dispatch.route` + `kernels.moe.sort_pairs` (dispatch math) ->
                    `ExpertLink.send` (posts the receive of each group's results, then gathers each
                    group's message, per-slot counts + rows, and sends it point to point) ->
                    `ExpertLink.receive` (waits for all of it) -> `unpermute`,
                    while the groups run the real `ExpertGroup.run_layer` with its expert FFN swapped
                    for a pass-through (rows go back as they came), so only communication and
                    bookkeeping are timed;
  floor             two raw `all_to_all_single` calls on the same group moving the same bytes
                    (rows out with the same uneven splits, rows back), buffers allocated up front;
  3 x a2a           the floor plus a raw [W, S] int64 counts all_to_all_single first (what the
                    earlier all-to-all exchange, with its separate counts round, could at best cost).
Routing is uniform random top-K (distinct experts per token). The groups then time the real
`kernels.moe.expert_ffn` over the rows they received (random weights of their S slots, both groups
at once); the table shows the slower group. Shapes: the benchmarked model's (H, K, E, I) and an
OLMoE-like one (H=1024, K=8, E=64, I=512, as in bench/moe_layer.py). Medians over repetitions; the
parts of dispatch+combine (dispatch math, send, receive, unpermute) are each part's own median, so
they need not add up to the median of the whole.

Targets: cluster decode >= 0.5x in-process at batch 64; dispatch+combine <= 1.5x the floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "default"
PROMPT_LEN = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DECODE_TARGET, EXCHANGE_TARGET = 0.5, 1.5


@dataclass(frozen=True)
class MixtralShape:
    """A random Mixtral checkpoint transformers can build (nothing downloaded)."""

    hidden: int
    inter: int
    num_experts: int
    top_k: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab: int = 2048


DEFAULT_SHAPE = MixtralShape(hidden=128, inter=256, num_experts=8, top_k=2, num_layers=4, num_heads=4, num_kv_heads=2)
SYNTHETIC_SHAPE = MixtralShape(hidden=512, inter=1024, num_experts=8, top_k=2, num_layers=4, num_heads=8, num_kv_heads=4)


@dataclass(frozen=True)
class ExchangeShape:
    name: str
    hidden: int  # H
    top_k: int  # K
    num_experts: int  # E
    inter: int  # I (for the groups' real FFN time only)


OLMOE_LIKE = ExchangeShape("olmoe-like", hidden=1024, top_k=8, num_experts=64, inter=512)


# ---------------------------------------------------------------------------------------------
# the checkpoint


def build_mixtral(folder: Path, shape: MixtralShape) -> Path:
    """Save a random `MixtralForCausalLM` of `shape` (float32 safetensors) into folder."""
    from transformers import MixtralConfig, MixtralForCausalLM  # slow import: only when asked

    config = MixtralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
                           num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                           num_key_value_heads=shape.num_kv_heads, num_local_experts=shape.num_experts,
                           num_experts_per_tok=shape.top_k, max_position_embeddings=1024, rope_theta=10000.0,
                           bos_token_id=1, eos_token_id=2, pad_token_id=None, sliding_window=None)
    torch.manual_seed(0)
    MixtralForCausalLM(config).eval().save_pretrained(folder)
    return folder


def resolve_model(args, scratch: Path) -> tuple[Path, str]:
    """--model DIR > --synthetic > models/default (when trained) > a random model of the default's shape."""
    if args.model:
        return Path(args.model), f"--model {args.model}"
    if args.synthetic:
        return build_mixtral(scratch / "synthetic", SYNTHETIC_SHAPE), f"synthetic random Mixtral {SYNTHETIC_SHAPE}"
    if (DEFAULT_MODEL / "model.safetensors").is_file():
        return DEFAULT_MODEL, "built-in default model (models/default)"
    return (build_mixtral(scratch / "default-shape", DEFAULT_SHAPE),
            "random stand-in of the default model's shape (models/default has no model.safetensors yet)")


# ---------------------------------------------------------------------------------------------
# table 1: decode throughput, cluster vs in-process

Stamps = list[list[tuple[float, list[int]]]]  # per request: (arrival time, token ids that arrived)


def make_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, PROMPT_LEN), generator=gen).tolist()


def run_engine(engine, prompts: list[list[int]], params) -> tuple[Stamps, float]:
    """-> per-request token stamps, submit time."""
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    index = {seq_id: i for i, seq_id in enumerate(ids)}
    stamps: Stamps = [[] for _ in prompts]
    while engine.has_unfinished:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            stamps[index[out.seq_id]].append((now, out.new_token_ids))
    return stamps, start


def run_cluster(deployment, prompts: list[list[int]], params) -> tuple[Stamps, float]:
    """B client threads, one streaming `Deployment.generate` each. -> per-request token stamps, submit time."""
    stamps: Stamps = [[] for _ in prompts]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            for item in deployment.generate(prompts[i], params):
                stamps[i].append((time.perf_counter(), item["token_ids"]))
        except BaseException as err:  # surfaced below, after every thread is joined
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} cluster requests failed") from errors[0]
    return stamps, start


def token_ids(stamps: Stamps) -> list[list[int]]:
    return [[t for _, ids in s for t in ids] for s in stamps]


def rates(stamps: Stamps, start: float, max_tokens: int) -> tuple[float, float]:
    """-> (decode tok/s while all B decode, end-to-end tok/s)."""
    total = sum(len(ids) for s in stamps for _, ids in s)
    if total != len(stamps) * max_tokens:
        raise AssertionError(f"expected {len(stamps)} x {max_tokens} tokens, got {total}")
    end_to_end = total / (max(s[-1][0] for s in stamps) - start)
    window_start = max(s[0][0] for s in stamps)  # every prefill done
    window_end = min(s[-1][0] for s in stamps)  # the first request finished
    if window_end <= window_start:
        raise AssertionError("no step where all requests decode together: raise --max-tokens")
    decoded = sum(len(ids) for s in stamps for t, ids in s if window_start < t <= window_end)
    return decoded / (window_end - window_start), end_to_end


def decode_table(path: Path, args) -> list[dict]:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # before ray is imported
    import ray

    from moeray.actors.engine import Engine, EngineConfig
    from moeray.actors.sequence import SamplingParams
    from moeray.cluster.deploy import ClusterConfig, deploy
    from moeray.models import load_config, load_model
    from moeray.models.tokenizer import Tokenizer

    config, _ = load_config(path)
    dtype = DTYPES[args.dtype]
    max_seqs = max(args.batch)
    engine_config = EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max(2048, max_seqs * PROMPT_LEN))
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    torch.set_num_threads(args.engine_threads)
    tokenizer = Tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None  # text on both sides, as the router makes it
    engine = Engine(load_model(path, dtype), tokenizer, config=engine_config)

    temp_dir = tempfile.mkdtemp(prefix="mrb-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="ERROR", log_to_driver=False)
    deployment = None
    try:
        deployment = deploy(ClusterConfig(str(path), num_groups=2, dtype=args.dtype, engine=engine_config))
        warm = make_prompts(max_seqs, config.vocab_size, seed=999)
        warm_params = SamplingParams(max_tokens=4, ignore_eos=True)
        run_engine(engine, warm, warm_params)
        run_cluster(deployment, warm, warm_params)

        samples = {b: {"engine": [], "cluster": [], "engine_e2e": [], "cluster_e2e": [], "same": []} for b in args.batch}
        for rep in range(args.decode_reps):
            for batch in args.batch:
                prompts = make_prompts(batch, config.vocab_size, seed=rep * 1000 + batch)
                sides = [("engine", lambda: run_engine(engine, prompts, params)),
                         ("cluster", lambda: run_cluster(deployment, prompts, params))]
                generated = {}
                for name, fn in sides if rep % 2 == 0 else sides[::-1]:
                    stamps, start = fn()
                    decode, e2e = rates(stamps, start, args.max_tokens)
                    samples[batch][name].append(decode)
                    samples[batch][f"{name}_e2e"].append(e2e)
                    generated[name] = token_ids(stamps)
                samples[batch]["same"].append(sum(a == b for a, b in zip(generated["engine"], generated["cluster"])))
            print(f"  decode repetition {rep + 1}/{args.decode_reps} done", flush=True)
    finally:
        if deployment is not None:
            deployment.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    rows = []
    for batch, s in samples.items():
        rows.append(dict(
            batch=batch, engine=statistics.median(s["engine"]), cluster=statistics.median(s["cluster"]),
            ratio=statistics.median(c / e for c, e in zip(s["cluster"], s["engine"])),
            engine_e2e=statistics.median(s["engine_e2e"]), cluster_e2e=statistics.median(s["cluster_e2e"]),
            ratio_e2e=statistics.median(c / e for c, e in zip(s["cluster_e2e"], s["engine_e2e"])),
            same=min(s["same"]),
        ))
    return rows


def print_decode_table(rows: list[dict], args) -> None:
    print(f"\n### Decode throughput: router + 2 expert groups (Ray) vs in-process Engine "
          f"(max_tokens={args.max_tokens}, prompt {PROMPT_LEN} tokens, greedy, {args.dtype}, "
          f"engine {args.engine_threads} torch thread(s), median of {args.decode_reps})\n")
    print("| B | in-process decode tok/s | cluster decode tok/s | cluster / in-process | "
          "in-process end-to-end tok/s | cluster end-to-end tok/s | end-to-end ratio | greedy ids identical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ms = {side: 1e3 * r["batch"] / r[side] for side in ("engine", "cluster")}
        print(f"| {r['batch']} | {r['engine']:,.0f} ({ms['engine']:.1f} ms/step) | "
              f"{r['cluster']:,.0f} ({ms['cluster']:.1f} ms/step) | **{r['ratio']:.2f}x** | "
              f"{r['engine_e2e']:,.0f} | {r['cluster_e2e']:,.0f} | {r['ratio_e2e']:.2f}x | {r['same']}/{r['batch']} |")
    at = [r for r in rows if r["batch"] == 64]
    if at:
        met = "met" if at[0]["ratio"] >= DECODE_TARGET else "MISSED"
        print(f"\ntarget (cluster >= {DECODE_TARGET}x in-process decode at B=64): {met}")


# ---------------------------------------------------------------------------------------------
# table 2: one MoE layer's exchange vs the floor (three processes, no Ray)

STOP, DISPATCH_COMBINE, FLOOR, FLOOR_COUNTS = 0, 1, 2, 3
VARIANTS = (DISPATCH_COMBINE, FLOOR, FLOOR_COUNTS)


def routing(shape: ExchangeShape, tokens: int, dtype: torch.dtype):
    """The same step on every rank: x [T, H], topk_weights [T, K], topk_ids [T, K] (distinct, uniform)."""
    gen = torch.Generator().manual_seed(tokens * 7919 + shape.hidden)
    x = torch.randn(tokens, shape.hidden, generator=gen).to(dtype)
    topk_ids = torch.rand(tokens, shape.num_experts, generator=gen).topk(shape.top_k).indices  # [T, K]
    topk_weights = torch.softmax(torch.randn(tokens, shape.top_k, generator=gen), -1)  # [T, K]
    return x, topk_weights, topk_ids


def passthrough_ffn(rows, counts, w13, w2, biases=None, activation=None):
    """The no-op expert: results are the rows as received."""
    return rows


def bare_group(plan, group: int, hidden: int, top_k: int, dtype: torch.dtype):
    """An `ExpertGroup` holding no weights, for `run_layer` with a pass-through FFN.

    `ExpertGroup.__init__` reads a checkpoint; this sets only the attributes `run_layer` reads."""
    from moeray.actors.expert_group import ExpertGroup

    g = ExpertGroup.__new__(ExpertGroup)
    g.config = SimpleNamespace(hidden_size=hidden, top_k=top_k, expert_activation=None)
    g.group, g.dtype, g.plan = group, dtype, plan
    g.w13 = g.w2 = g.biases = [None] * plan.num_layers
    g.tokens_per_slot = torch.zeros(plan.num_layers, plan.slots_per_group, dtype=torch.long)
    g._inbox = torch.empty(0, dtype=torch.uint8)
    return g


class Meeting:
    """All ranks meet in an all_reduce before each timed run; rank 0's value says what runs next."""

    def __init__(self, rank: int):
        self.rank, self.flag = rank, torch.zeros(1, dtype=torch.long)

    def __call__(self, value: int = 0) -> int:
        self.flag.fill_(value if self.rank == 0 else 0)
        dist.all_reduce(self.flag)
        return int(self.flag)


def exchange_worker(rank: int, port: int, cases: list[tuple[ExchangeShape, int]], budget: tuple, dtype_name: str,
                    results) -> None:
    """One rank of the 3-rank world; rank 0 decides the schedule and times, ranks 1-2 follow."""
    torch.set_num_threads(1)
    from moeray.actors import expert_group as expert_group_module
    from moeray.actors.comm import World, WorldSpec
    from moeray.actors.dispatch import dispatch
    from moeray.actors.placement import PlacementPlan

    dtype = DTYPES[dtype_name]
    world = World(WorldSpec("127.0.0.1", port, 3, timeout_s=120.0), rank)
    meet = Meeting(rank)
    with mock.patch.object(expert_group_module, "expert_ffn", passthrough_ffn):
        for shape, tokens in cases:
            plan = PlacementPlan.default(1, shape.num_experts, 2)
            x, topk_weights, topk_ids = routing(shape, tokens, dtype)
            rows, counts, _ = dispatch(x, topk_ids, plan, 0)  # [T*K, H], [G, S]: known to every rank up front
            if rank == 0:
                data = time_router(world, meet, plan, x, topk_weights, topk_ids, rows, counts, budget)
                results.put(("router", shape.name, tokens, data))
            else:
                ffn = follow_router(world, meet, plan, shape, rank, rows, counts, budget)
                results.put(("group", shape.name, tokens, {"ffn": ffn}))
    world.destroy()


def time_router(world, meet: Meeting, plan, x, topk_weights, topk_ids, rows, counts, budget: tuple) -> dict:
    """Rank 0: time dispatch+combine (the router's real path) against the raw floors, interleaved."""
    from moeray.actors.dispatch import route
    from moeray.kernels.moe import sort_pairs
    from moeray.actors.router import ExpertLink
    from moeray.kernels.moe import unpermute

    min_reps, max_reps, budget_s, _ = budget
    link = ExpertLink(plan)
    link.world, link.num_tokens = world, x.shape[0]
    num_physical = plan.num_groups * plan.slots_per_group
    row_splits = [0] + counts.sum(1).tolist()  # rows per rank
    to_ranks = torch.cat([torch.zeros(1, counts.shape[1], dtype=torch.long), counts])  # [W, S]
    wire_out, wire_back = rows.clone(), torch.empty_like(rows)
    nothing, counts_back = rows.new_empty(0, rows.shape[1]), torch.empty_like(to_ranks)
    parts = {"dispatch": [], "send": [], "receive": [], "unpermute": []}

    def dispatch_combine() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        handle = sort_pairs(route(topk_ids, plan, 0), num_physical)
        t1 = time.perf_counter()
        pending = link.send(x, handle, handle.counts.view(plan.num_groups, plan.slots_per_group))
        t2 = time.perf_counter()
        results = link.receive(pending)
        t3 = time.perf_counter()
        out = unpermute(results, handle, topk_weights)
        t4 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name].append(dt)
        return out, t4 - t0

    def floor(with_counts: bool) -> float:
        t0 = time.perf_counter()
        if with_counts:
            dist.all_to_all_single(counts_back, to_ranks)
        dist.all_to_all_single(nothing, wire_out, [0, 0, 0], row_splits)
        dist.all_to_all_single(wire_back, nothing, row_splits, [0, 0, 0])
        return time.perf_counter() - t0

    def run(variant: int) -> float:
        meet(variant)
        return dispatch_combine()[1] if variant == DISPATCH_COMBINE else floor(variant == FLOOR_COUNTS)

    meet(DISPATCH_COMBINE)  # check once: pass-through experts give x * sum_k w_k
    out, _ = dispatch_combine()
    torch.testing.assert_close(out, (x.float() * topk_weights.float().sum(1, keepdim=True)).to(x.dtype))
    for variant in VARIANTS:  # warm-up, not kept
        run(variant)
    for samples in parts.values():
        samples.clear()
    times = {variant: [] for variant in VARIANTS}
    start = time.perf_counter()
    for rep in range(max_reps):
        for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            times[variant].append(run(variant))
        if rep + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    meet(STOP)
    meet()  # the groups have timed their FFN
    med = {variant: statistics.median(t) for variant, t in times.items()}
    return dict(reps=len(times[FLOOR]), rows=rows.shape[0], bytes=rows.numel() * rows.element_size(),
                total=med[DISPATCH_COMBINE], floor=med[FLOOR], floor_counts=med[FLOOR_COUNTS],
                **{name: statistics.median(t) for name, t in parts.items()})


def follow_router(world, meet: Meeting, plan, shape: ExchangeShape, rank: int, rows, counts, budget: tuple) -> float:
    """Ranks 1-2: run what rank 0 says until STOP, then time the real expert FFN. -> its median seconds."""
    from moeray.kernels.moe import expert_ffn

    _, max_reps, _, ffn_budget_s = budget
    group = bare_group(plan, rank - 1, shape.hidden, shape.top_k, rows.dtype)
    inbox = group.inbox(rows.shape[0] // shape.top_k)
    row_splits = [0] + counts.sum(1).tolist()
    mine = rows[sum(row_splits[:rank]):sum(row_splits[:rank + 1])]  # [n, H] what this group receives
    recv, nothing = torch.empty_like(mine), rows.new_empty(0, rows.shape[1])
    counts_in = torch.empty(3, counts.shape[1], dtype=torch.long)
    zeros = torch.zeros_like(counts_in)
    recv_splits = [len(mine), 0, 0]
    while (variant := meet()) != STOP:
        if variant == DISPATCH_COMBINE:
            group.run_layer(world, 0, inbox)
            continue
        if variant == FLOOR_COUNTS:
            dist.all_to_all_single(counts_in, zeros)
        dist.all_to_all_single(recv, nothing, recv_splits, [0, 0, 0])
        dist.all_to_all_single(nothing, recv, [0, 0, 0], recv_splits)

    # the real expert FFN over the same rows: S slots of random weights, both groups at once
    gen = torch.Generator().manual_seed(rank)
    slots, slot_counts = plan.slots_per_group, counts[rank - 1].tolist()
    w13 = (torch.randn(slots, 2 * shape.inter, shape.hidden, generator=gen) * shape.hidden**-0.5).to(rows.dtype)
    w2 = (torch.randn(slots, shape.hidden, shape.inter, generator=gen) * shape.inter**-0.5).to(rows.dtype)
    expert_ffn(mine, slot_counts, w13, w2)  # warm-up
    ffn, start = [], time.perf_counter()
    while len(ffn) < 3 or (time.perf_counter() - start < ffn_budget_s and len(ffn) < max_reps):
        t0 = time.perf_counter()
        expert_ffn(mine, slot_counts, w13, w2)
        ffn.append(time.perf_counter() - t0)
    meet()
    return statistics.median(ffn)


def exchange_table(shapes: list[ExchangeShape], args) -> list[dict]:
    import torch.multiprocessing as mp

    from moeray.actors.comm import host_store

    store, port = host_store()  # this process keeps the store alive; ranks connect as clients
    cases = [(shape, t) for shape in shapes for t in args.tokens]
    budget = (5, 40, 0.4, 0.3) if args.quick else (20, 400, 3.0, 1.5)
    results = mp.get_context("spawn").SimpleQueue()
    workers = mp.start_processes(exchange_worker, args=(port, cases, budget, args.dtype, results), nprocs=3,
                                 join=False, start_method="spawn")
    received = []
    while not workers.join(timeout=0.2):  # drain as we go: a full pipe would block the workers
        while not results.empty():
            received.append(results.get())
    while not results.empty():
        received.append(results.get())
    del store
    router, ffn = {}, {}
    for who, name, tokens, data in received:  # the slower group's FFN
        if who == "router":
            router[name, tokens] = data
        else:
            ffn[name, tokens] = max(ffn.get((name, tokens), 0.0), data["ffn"])
    return [dict(shape=shape, tokens=t, ffn=ffn[shape.name, t], **router[shape.name, t]) for shape, t in cases]


def print_exchange_table(rows: list[dict], args) -> None:
    print(f"\n### One MoE layer's dispatch+combine vs the floor: router + 2 groups, gloo, 3 processes, "
          f"{args.dtype}, times in microseconds (median)\n")
    print("| shape (H, K, E) | T | rows out | MB each way | floor: 2 x a2a | 3 x a2a (+counts) | "
          "dispatch+combine | **/ floor** | dispatch math | send (gather + post) | receive | unpermute | "
          "groups' real FFN | reps |")
    print("|" + " --- |" * 14)
    us = 1e6
    for r in rows:
        s = r["shape"]
        print(f"| {s.name} ({s.hidden}, {s.top_k}, {s.num_experts}) | {r['tokens']} | {r['rows']} | "
              f"{r['bytes'] / 2**20:.2f} | {r['floor'] * us:,.0f} | {r['floor_counts'] * us:,.0f} | "
              f"{r['total'] * us:,.0f} | **{r['total'] / r['floor']:.2f}x** | {r['dispatch'] * us:,.0f} | "
              f"{r['send'] * us:,.0f} | {r['receive'] * us:,.0f} | {r['unpermute'] * us:,.0f} | "
              f"{r['ffn'] * us:,.0f} | {r['reps']} |")
    met = sum(r["total"] / r["floor"] <= EXCHANGE_TARGET for r in rows)
    print(f"\ntarget (dispatch+combine <= {EXCHANGE_TARGET}x the floor): {met}/{len(rows)} rows met")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few repetitions (< 1 minute of measuring)")
    parser.add_argument("--model", help="checkpoint folder (default: models/default)")
    parser.add_argument("--synthetic", action="store_true",
                        help=f"build a random Mixtral instead: {SYNTHETIC_SHAPE}")
    parser.add_argument("--table", choices=["decode", "exchange", "both"], default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="concurrent requests B")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256], help="tokens per step T (table 2)")
    parser.add_argument("--engine-threads", type=int, default=1, help="torch threads of the in-process engine")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--reps", type=int, help="decode repetitions (default 5, --quick 1)")
    args = parser.parse_args()
    if args.model and args.synthetic:
        parser.error("--model and --synthetic exclude each other")
    args.decode_reps = args.reps or (1 if args.quick else 5)

    scratch = Path(tempfile.mkdtemp(prefix="moeray-bench-"))
    try:
        path, what = resolve_model(args, scratch)
        from moeray.models import load_config

        config, _ = load_config(path)
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; model: {what}")
        print(f"  {config.family}: H={config.hidden_size} I={config.moe_intermediate_size} E={config.num_experts} "
              f"K={config.top_k} layers={config.num_layers} (MoE {len(config.moe_layer_ids)}) vocab={config.vocab_size}",
              flush=True)
        if args.table in ("decode", "both"):
            print_decode_table(decode_table(path, args), args)
        if args.table in ("exchange", "both"):
            model_shape = ExchangeShape("model", config.hidden_size, config.top_k, config.num_experts,
                                        config.moe_intermediate_size)
            print_exchange_table(exchange_table([model_shape, OLMOE_LIKE], args), args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
