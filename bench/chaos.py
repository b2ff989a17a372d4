"""Chaos under load: kill a random expert group every few seconds, and the router now and then,
while streaming clients keep asking; count what failed or came out different.

    python bench/chaos.py                          # ~4 min: 180 s of chaos
    python bench/chaos.py --duration 30 --kill-every 4 --router-every 3    # the suite's short run

The whole server (`moeray serve`'s `cluster.server.start`: router, `--groups` expert groups with
one redundant slot each, the placement autoscaler, HTTP front door) on a local Ray cluster and the
built-in model. `--clients` closed-loop streaming clients (the `openai` package over HTTP, greedy,
`--max-tokens`) run throughout. Every `--kill-every` seconds one process gets SIGKILL: the router
on every `--router-every`-th kill, else a random expert group. The next kill waits until the pool
has recovered and healed (router serving, `--groups` groups again), so every kill is measured alone.

Reported:
- requests completed / failed, and completed outputs that differ from the fault-free output (the
  in-process engine on the same prompt: greedy output is the same on any placement);
- per kill: seconds from the kill to recovered (the world re-formed without the group, or the
  restarted router serving), to the first streamed token after the kill, and to healed;
- memory over time: resident set of this process and every process under it (Ray's head node,
  the router, the groups, the Serve replicas), sampled every 2 s.
Exit status 1 if any request failed or differed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import openai  # noqa: E402
import ray  # noqa: E402

from moeray.actors.engine import Engine  # noqa: E402
from moeray.actors.sequence import SamplingParams  # noqa: E402
from moeray.cluster.server import DEFAULT_MODEL_NAME, start  # noqa: E402
from moeray.cluster.serving import ServingSpec  # noqa: E402
from moeray.models import DEFAULT_MODEL_DIR, load_model  # noqa: E402
from moeray.models.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["The for statement", "A list comprehension", "def main():", "Exceptions are", "import os",
           "The while loop", "Dictionaries map", "class Point:"]
HEAL_TIMEOUT_S = 180.0


@dataclass
class Kill:
    at: float  # monotonic time of the SIGKILL
    victim: str  # "router" or "group N"
    recovered_s: float | None = None
    healed_s: float | None = None
    first_token_s: float | None = None


@dataclass
class Traffic:
    """What the clients saw: finished requests, failures, and when tokens arrived."""

    results: list[tuple[str, str]] = field(default_factory=list)  # (prompt, text)
    failures: list[str] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="moeray-ray-", dir="/tmp"))
    try:
        outcome = chaos(args)
    finally:
        if owns_ray:
            ray.shutdown()
    report(args, outcome)
    if args.verbose:
        print("\nserver log:", *outcome.log, sep="\n  ")
    if outcome.traffic.failures or outcome.wrong:
        print("\nfailures:", *outcome.traffic.failures[:10], sep="\n  ")
        print("differing:", *[f"{p!r}: {t!r}" for p, t in outcome.wrong[:5]], sep="\n  ")
        print("server log:", *outcome.log[-40:], sep="\n  ")
    return 1 if outcome.traffic.failures or outcome.wrong else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of chaos (default 180)")
    parser.add_argument("--kill-every", type=float, default=6.0, help="seconds between kills (default 6)")
    parser.add_argument("--router-every", type=int, default=4, help="every N-th kill is the router's (default 4)")
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kills", type=int, default=None, help="stop after this many kills (default: as many as fit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print the server's log (recoveries, healing) at the end")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.kill_every <= 0 or args.router_every < 1 or args.groups < 2 or args.clients < 1:
        parser.error("--duration and --kill-every must be > 0, --router-every >= 1, --groups >= 2, --clients >= 1")

    return args


@dataclass
class Outcome:
    traffic: Traffic
    wrong: list[tuple[str, str]]  # completed requests whose text differs from the fault-free one
    kills: list[Kill]
    memory: list[tuple[float, float]]  # (monotonic time, MiB)
    began: float
    log: list[str]


def chaos(args) -> Outcome:
    """Serve on the Ray cluster this process is connected to, under load and kills (see the module doc)."""
    expected = reference(args.max_tokens)
    log: list[str] = []
    server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                               expert_groups=args.groups, redundant_slots=1, kv_cache_bytes=32 << 20),
                   log=lambda line: log.append(f"{time.monotonic():.1f} {line}"))
    traffic, memory, kills = Traffic(), [], []
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(server.http_url, k, args.max_tokens, traffic, stop), daemon=True)
               for k in range(args.clients)]
    threads.append(threading.Thread(target=sample_memory, args=(memory, stop), daemon=True))
    try:
        for thread in threads:
            thread.start()
        began, rng = time.monotonic(), random.Random(args.seed)
        while time.monotonic() - began + args.kill_every < args.duration and len(kills) < (args.kills or 10**9):
            time.sleep(args.kill_every)
            victim = "router" if len(kills) % args.router_every == args.router_every - 1 \
                else f"group {rng.randrange(len(server.deployment.groups))}"
            kills.append(kill(server.deployment, victim, args.groups))
        time.sleep(min(args.kill_every, 5.0))  # serving on after the last recovery
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
        server.stop()
    for k in kills:
        k.first_token_s = next((t - k.at for t in sorted(traffic.token_times) if t > k.at), None)
    wrong = [(p, text) for p, text in traffic.results if text != expected[p]]
    return Outcome(traffic, wrong, kills, memory, began, log)


def kill(deployment, victim: str, num_groups: int) -> Kill:
    """SIGKILL the victim, then wait until it is recovered and the pool healed."""
    kind = "router" if victim == "router" else "expert_group"
    before = deployment.recoveries[kind]["count"]
    actor = deployment.router if victim == "router" else deployment.groups[int(victim.split()[1])]
    pid = ray.get(actor.pid.remote(), timeout=30)
    event = Kill(time.monotonic(), victim)
    os.kill(pid, signal.SIGKILL)
    while time.monotonic() - event.at < HEAL_TIMEOUT_S:
        now = time.monotonic() - event.at
        if event.recovered_s is None and deployment.recoveries[kind]["count"] > before:
            event.recovered_s = now
        if event.recovered_s is not None and len(deployment.groups) == num_groups:
            event.healed_s = now
            return event
        time.sleep(0.05)
    return event


def client(url: str, k: int, max_tokens: int, traffic: Traffic, stop: threading.Event) -> None:
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    i = k
    while not stop.is_set():
        prompt, pieces = PROMPTS[i % len(PROMPTS)], []
        try:
            for chunk in api.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                                temperature=0, stream=True):
                traffic.token_times.append(time.monotonic())
                pieces.append(chunk.choices[0].text)
            traffic.results.append((prompt, "".join(pieces)))
        except Exception as err:  # counted and reported
            traffic.failures.append(f"{prompt!r}: {type(err).__name__}: {err}")
        i += 1


def sample_memory(samples: list[tuple[float, float]], stop: threading.Event, every_s: float = 2.0) -> None:
    while not stop.wait(every_s):
        samples.append((time.monotonic(), tree_rss_bytes(os.getpid()) / 2**20))


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of `root` and every process under it (from /proc: Linux only)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(pid, 0) for pid in tree)


def reference(max_tokens: int) -> dict[str, str]:
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    engine = Engine(load_model(DEFAULT_MODEL_DIR), tokenizer)
    params = SamplingParams(max_tokens=max_tokens)
    return {p: engine.generate([tokenizer.encode(p)], params)[0].text for p in PROMPTS}


def report(args, outcome: Outcome) -> None:
    traffic, wrong, kills, memory, began = outcome.traffic, outcome.wrong, outcome.kills, outcome.memory, outcome.began
    print(f"\n{args.duration:.0f} s of chaos: {args.groups} expert groups, {args.clients} streaming clients, "
          f"a kill every {args.kill_every:g} s (every {args.router_every}. one the router's)\n")
    print("| requests completed | failed | outputs differing from fault-free | tokens streamed | kills (router) |")
    print("| --- | --- | --- | --- | --- |")
    routers = sum(k.victim == "router" for k in kills)
    print(f"| {len(traffic.results)} | {len(traffic.failures)} | {len(wrong)} | {len(traffic.token_times)} | "
          f"{len(kills)} ({routers}) |\n")
    print("| # | at s | victim | recovered s | first token after s | healed s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, k in enumerate(kills, 1):
        print(f"| {i} | {k.at - began:.1f} | {k.victim} | {_s(k.recovered_s)} | {_s(k.first_token_s)} | {_s(k.healed_s)} |")
    for kind in ("group", "router"):
        times = [k.recovered_s for k in kills if k.victim.startswith(kind) and k.recovered_s is not None]
        if times:
            print(f"\n{kind} recovery: median {statistics.median(times):.2f} s, max {max(times):.2f} s "
                  f"over {len(times)} kills")
    if memory:
        print("\n| t s | RSS of all processes MiB |")
        print("| --- | --- |")
        step = max(1, len(memory) // 10)
        for t, mib in memory[::step] + ([memory[-1]] if (len(memory) - 1) % step else []):
            print(f"| {t - began:.0f} | {mib:,.0f} |")


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
