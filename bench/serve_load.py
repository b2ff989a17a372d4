"""Streaming load on `moeray serve` (HTTP + gRPC) vs the in-process engine: the serving overhead.

    python bench/serve_load.py                  # N = 1, 8, 32 concurrent clients, < 5 min
    python bench/serve_load.py --quick          # N = 1, 8, fewer requests, < 1 min
    python bench/serve_load.py --model DIR --clients 1 4 16 --requests 3

A real server (local Ray, a router + `--expert-groups` expert groups, the Serve HTTP and gRPC
proxies) is started in this process on free ports. For each N, N client threads each send
`--requests` requests one after another (a closed loop), prompts taken in turn from PROMPTS,
greedy, exactly `--max-tokens` tokens (eos ignored):

- http: the `openai` SDK, `completions.create(stream=True, logprobs=0, ignore_eos=True)`;
  `logprobs=0` is asked for only so that each chunk says how many tokens it carries
  (`len(chunk.choices[0].logprobs.tokens)`), since a slow reader gets several steps merged.
- grpc: `tritonclient.grpc`, one client and one `start_stream` per thread, `async_stream_infer`
  with `stream=true`, `return_num_output_tokens=true` (tokens per response) and
  `sampling_parameters={"max_tokens": M, "temperature": 0, "ignore_eos": true}`; timestamps are
  taken in the stream callback.
- ray: the data plane without the front door: `Deployment.generate(prompt_ids, params)` (the router's subscription stream)
  (the Ray streaming generator the Serve ingress reads) iterated from a driver thread, the
  prompt tokenized client-side. http/grpc minus ray = Serve proxy + ingress cost.
- local: the reference. `Engine` in this process on the same checkpoint and engine settings,
  the same closed loop of N in flight (a finished request is replaced by the next one before
  the next `step()`), a timestamp per `RequestOutput`.

Per request: TTFT = first chunk with tokens - the moment the request was sent (added, for
local). ITL: for each later chunk, the gap since the previous chunk divided by the tokens it
carries, counted once per token (a chunk of k tokens gives k samples of gap/k). tok/s = all
output tokens of the run / its wall time (first send to last token). The table gives p50/p99
over all requests (TTFT) or all tokens (ITL) of one row; ratio = tok/s / local tok/s at that N.
Transports take turns at each N (local, http, grpc, ray), after one warm-up request each.
tokens/step and wall ms/step: output tokens and wall time over the engine steps taken during the
run (the router's step counter for the server rows): they split the overhead into "each step is
slower" (the distributed step: per-layer all-to-all to the expert groups) and "fewer tokens per
step" (requests not in the batch while their client is still reading / sending).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported (by moeray.cluster.server too)

import numpy as np  # noqa: E402
import openai  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import tritonclient.grpc as triton  # noqa: E402

from moeray.actors.engine import Engine, EngineConfig  # noqa: E402
from moeray.actors.sequence import SamplingParams  # noqa: E402
from moeray.cluster.server import Server, start  # noqa: E402
from moeray.cluster.serving import ServingSpec  # noqa: E402
from moeray.models import DEFAULT_MODEL_DIR, load_model  # noqa: E402
from moeray.models.tokenizer import Tokenizer  # noqa: E402

PROMPTS = [
    "The for statement", "def fibonacci(n):", "A list comprehension", "The with statement",
    "Exceptions are raised", "import os", "class Point:", "The while loop",
]


@dataclass
class Trace:
    """One request as its client saw it: when it was sent, and (time, tokens) per chunk with tokens."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    num_uncounted: int = 0  # tokens known to have streamed but in no chunk's count (grpc, see _check)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks) + self.num_uncounted

    def ttft(self) -> float:
        return self.chunks[0][0] - self.sent

    def itls(self) -> list[float]:
        out = []
        for (t0, _), (t1, n) in zip(self.chunks, self.chunks[1:]):
            out += [(t1 - t0) / n] * n
        return out


@dataclass
class Run:
    traces: list[Trace]
    wall: float
    num_steps: int | None = None  # router steps during the run (server transports)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- clients -------------------------------------------------------------------------------


def closed_loop(num_clients: int, num_requests: int, client_factory) -> Run:
    """N threads, each `client_factory()` -> a callable(prompt) -> Trace, called num_requests times."""
    traces: list[list[Trace]] = [[] for _ in range(num_clients)]
    errors: list[BaseException] = []
    ready = threading.Barrier(num_clients + 1)

    def worker(i: int) -> None:
        try:
            send, close = client_factory()
        except BaseException as err:
            errors.append(err)
            ready.abort()
            return
        try:
            ready.wait()
            for r in range(num_requests):
                traces[i].append(send(PROMPTS[(i * num_requests + r) % len(PROMPTS)]))
        except BaseException as err:
            errors.append(err)
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(num_clients)]
    for t in threads:
        t.start()
    ready.wait()
    begin = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    flat = [t for per in traces for t in per]
    return Run(flat, max(t.chunks[-1][0] for t in flat) - begin)


def http_client(server: Server, model: str, max_tokens: int):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=600)

    def send(prompt: str) -> Trace:
        trace = Trace(time.perf_counter())
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           logprobs=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.tokens:
                trace.chunks.append((now, len(chunk.choices[0].logprobs.tokens)))
        _check(trace, max_tokens, "http")
        return trace

    return send, client.close


def grpc_client(server: Server, model: str, max_tokens: int):
    client = triton.InferenceServerClient(server.grpc_target)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))
    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    counter = iter(range(1 << 30))

    def send(prompt: str) -> Trace:
        inputs = [_input("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
                  _input("stream", "BOOL", np.array([True])),
                  _input("return_num_output_tokens", "BOOL", np.array([True])),
                  _input("sampling_parameters", "BYTES", np.array([sampling], dtype=np.object_))]
        trace = Trace(time.perf_counter())
        client.async_stream_infer(model, inputs, request_id=f"r{next(counter)}")
        while True:
            now, result, error = responses.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"grpc stream error: {error}")
            n = int(result.as_numpy("num_output_tokens")[0])
            if n:
                trace.chunks.append((now, n))
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        _check(trace, max_tokens, "grpc")
        return trace

    def close() -> None:
        client.stop_stream()
        client.close()

    return send, close


def ray_client(server: Server, tokenizer: Tokenizer, max_tokens: int):
    deployment = server.deployment
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def send(prompt: str) -> Trace:
        trace = Trace(time.perf_counter())
        for item in deployment.generate(tokenizer.encode(prompt), params):
            if item["token_ids"]:
                trace.chunks.append((time.perf_counter(), len(item["token_ids"])))
        _check(trace, max_tokens, "ray")
        return trace

    return send, lambda: None


def _input(name: str, datatype: str, value: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def _check(trace: Trace, max_tokens: int, transport: str) -> None:
    """Every request must stream exactly max_tokens tokens (eos is ignored). gRPC's per-response
    `num_output_tokens` counts only the tokens of the router item that released the text, so a
    token whose text was held back (part of a character) and came out with the next one is in no
    response's count: those are added to the request's total (tok/s) but to no ITL sample."""
    if transport == "grpc" and trace.num_tokens < max_tokens:
        trace.num_uncounted = max_tokens - trace.num_tokens
    if trace.num_tokens != max_tokens:
        raise RuntimeError(f"{transport}: a request streamed {trace.num_tokens} tokens, expected {max_tokens}")


# ---- in-process reference -------------------------------------------------------------------


def local_run(engine: Engine, tokenizer: Tokenizer, num_clients: int, num_requests: int, max_tokens: int) -> Run:
    """The same closed loop on the in-process engine: N in flight, each slot refilled as it finishes."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    todo = {i: [PROMPTS[(i * num_requests + r) % len(PROMPTS)] for r in range(num_requests)] for i in range(num_clients)}
    traces, slot_of, live = [], {}, {}
    begin = time.perf_counter()

    def submit(slot: int) -> None:
        if todo[slot]:
            trace = Trace(time.perf_counter())
            seq_id = engine.add_request(tokenizer.encode(todo[slot].pop(0)), params)
            slot_of[seq_id], live[seq_id] = slot, trace
            traces.append(trace)

    for slot in range(num_clients):
        submit(slot)
    num_steps = 0
    while engine.has_unfinished:
        outputs = engine.step()
        now = time.perf_counter()
        num_steps += 1
        for out in outputs:
            live[out.seq_id].chunks.append((now, len(out.new_token_ids)))
            if out.finished:
                live.pop(out.seq_id)
                submit(slot_of.pop(out.seq_id))
    for trace in traces:
        _check(trace, max_tokens, "local")
    return Run(traces, max(t.chunks[-1][0] for t in traces) - begin, num_steps)


# ---- report ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(np.ceil(q / 100 * len(ordered))) - 1))]


def row(transport: str, n: int, run: Run, local_tok_s: float) -> str:
    ttft = [t.ttft() * 1e3 for t in run.traces]
    itl = [x * 1e3 for t in run.traces for x in t.itls()]
    num_tokens = sum(t.num_tokens for t in run.traces)
    tok_s = num_tokens / run.wall
    steps = run.num_steps
    return (f"| {transport} | {n} | {len(run.traces)} | {percentile(ttft, 50):.1f} | {percentile(ttft, 99):.1f} | "
            f"{percentile(itl, 50):.1f} | {percentile(itl, 99):.1f} | {tok_s:.0f} | {tok_s / local_tok_s:.2f} | "
            f"{num_tokens / steps:.1f} | {run.wall * 1e3 / steps:.1f} |")


def counting_steps(server: Server, run_fn) -> Run:
    """run_fn() with the router's step counter read before and after."""
    def step_id() -> int:
        return ray.get(server.deployment.router.stats.remote())["step"]

    before = step_id()
    run = run_fn()
    run.num_steps = step_id() - before
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder; default: the built-in model")
    ap.add_argument("--clients", type=int, nargs="+", default=None, help="concurrent clients N (default 1 8 32)")
    ap.add_argument("--requests", type=int, default=None, help="requests per client, in sequence (default 4)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--expert-groups", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the in-process engine (the server's actors get cpu_count // (groups + 1))")
    ap.add_argument("--quick", action="store_true", help="N = 1 8, 2 requests per client")
    args = ap.parse_args()
    clients = args.clients or ([1, 8] if args.quick else [1, 8, 32])
    num_requests = args.requests or (2 if args.quick else 4)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    torch.set_num_threads(args.threads)

    spec = ServingSpec(model=args.model, expert_groups=args.expert_groups, http_port=free_port(), grpc_port=free_port())
    engine_config = EngineConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
                                 kv_cache_bytes=spec.kv_cache_bytes, max_model_len=spec.max_model_len)
    tokenizer = Tokenizer(model_dir)
    engine = Engine(load_model(model_dir), tokenizer, engine_config)

    temp_dir = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="ERROR", log_to_driver=False)
    server = None
    try:
        t0 = time.perf_counter()
        server = start(spec, log=lambda message: None)
        print(f"server up in {time.perf_counter() - t0:.1f}s: {server.http_url}, grpc {server.grpc_target}, "
              f"model {server.model_name}, {spec.expert_groups} expert groups", flush=True)
        transports = {"http": lambda: http_client(server, server.model_name, args.max_tokens),
                      "grpc": lambda: grpc_client(server, server.model_name, args.max_tokens),
                      "ray": lambda: ray_client(server, tokenizer, args.max_tokens)}
        local_run(engine, tokenizer, 1, 1, args.max_tokens)  # warm-up
        for factory in transports.values():
            closed_loop(1, 1, factory)
        rows, all_grpc = [], []
        for n in clients:
            t0 = time.perf_counter()
            local = local_run(engine, tokenizer, n, num_requests, args.max_tokens)
            local_tok_s = sum(t.num_tokens for t in local.traces) / local.wall
            rows.append(row("in-process", n, local, local_tok_s))
            for name, factory in transports.items():
                run = counting_steps(server, lambda: closed_loop(n, num_requests, factory))
                rows.append(row(name, n, run, local_tok_s))
                all_grpc += run.traces if name == "grpc" else []
            print(f"N={n} done in {time.perf_counter() - t0:.1f}s", flush=True)
    finally:
        if server is not None:
            server.stop()  # serve, the data plane, then Ray (it does not own Ray here)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    print(f"\n{args.max_tokens} tokens per request, {num_requests} requests per client, greedy, eos ignored; "
          f"in-process engine on {args.threads} torch thread(s)\n")
    print("| transport | N | requests | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | output tok/s | vs in-process "
          "| tokens/step | wall ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if uncounted := sum(t.num_uncounted for t in all_grpc):
        print(f"\ngrpc: {uncounted} of {len(all_grpc) * args.max_tokens} tokens were in no response's "
              "num_output_tokens (held-back text); counted in tok/s, not in ITL")


if __name__ == "__main__":
    main()
