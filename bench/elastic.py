"""Elasticity under load: scale out, scale in, and recovery from a killed group — how long, and the dip.

    python bench/elastic.py              # ~1.5 min
    python bench/elastic.py --clients 16 --groups 2

The built-in model on a local Ray cluster: a router and `--groups` expert groups (one redundant
slot each), `--clients` closed-loop streaming clients (greedy, 32 tokens). In turn, with
`--settle-s` of steady serving before each event:
- scale out to groups + 1 (`Deployment.scale_to`): start a group, load its experts, re-form;
- scale in back to groups: drain a group through a staged migration, re-form without it;
- SIGKILL one group; `Deployment.watch` re-forms (survivors or a replacement) and the step replays.

Per event: seconds from the request (or the kill) to the first step that ends on the new world;
throughput dip = the lowest 1-second tokens/s during the event / the median 1-second tokens/s of
the steady period before it (1.00 = no dip); failed requests. Tokens/s counts tokens the router's
steps computed (its step log), so clients' own pauses do not count.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from moeray.actors.sequence import SamplingParams  # noqa: E402
from moeray.cluster.deploy import ClusterConfig, deploy  # noqa: E402
from moeray.models import DEFAULT_MODEL_DIR  # noqa: E402
from moeray.models.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["The for statement", "A list comprehension", "def main():", "Exceptions are", "import os",
           "The while loop", "Dictionaries map", "class Point:"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--settle-s", type=float, default=8.0, help="steady serving before each event (default 8)")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="moeray-ray-", dir="/tmp"))
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    deployment = deploy(ClusterConfig(str(DEFAULT_MODEL_DIR), num_groups=args.groups, redundant_slots=1,
                                      world_timeout_s=20))
    watching = deployment.watch(interval_s=0.1)
    stop, failures = threading.Event(), []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                for _ in deployment.generate(tokenizer.encode(PROMPTS[i % len(PROMPTS)]), SamplingParams(max_tokens=32)):
                    pass
            except Exception as err:
                failures.append(f"{type(err).__name__}: {err}")
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    for t in threads:
        t.start()
    rows = []
    try:
        rows.append(event(deployment, "scale out", args, lambda: deployment.scale_to(args.groups + 1), failures))
        rows.append(event(deployment, "scale in", args, lambda: deployment.scale_to(args.groups), failures))
        rows.append(event(deployment, "kill a group (SIGKILL)", args, lambda: kill(deployment), failures))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        watching.set()
        deployment.shutdown()
        ray.shutdown()
    print(f"\n## bench/elastic.py — built-in model, {args.groups} expert groups, {args.clients} streaming clients\n")
    print("| event | seconds to first step on the new world | throughput dip (min 1 s / steady median) | failed requests |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds, dip, failed in rows:
        print(f"| {name} | {seconds:.2f} | {dip:.2f} | {failed} |")
    print(f"\nfailed requests in all: {len(failures)}")
    for failure in failures[:5]:
        print("failure:", failure)
    return 1 if failures else 0


def kill(deployment) -> None:
    recoveries = ray.get(deployment.router.stats.remote())["recoveries"]
    os.kill(ray.get(deployment.groups[-1].pid.remote()), signal.SIGKILL)
    deadline = time.time() + 120
    while ray.get(deployment.router.stats.remote())["recoveries"] == recoveries and time.time() < deadline:
        time.sleep(0.05)


def event(deployment, name: str, args, action, failures: list) -> tuple[str, float, float, int]:
    time.sleep(args.settle_s)
    steady_from = time.time() - args.settle_s
    failed_before = len(failures)
    start = time.time()
    action()
    done = time.time()
    time.sleep(2.0)  # let the new world take a few steps
    steps = ray.get(deployment.router.step_log.remote(steady_from))
    first_after = min((s[0] for s in steps if s[0] > done), default=float("nan"))
    steady = _per_second([s for s in steps if s[0] < start], steady_from, start)
    during = _per_second([s for s in steps if start <= s[0] <= first_after + 1.0], start, first_after + 1.0)
    dip = (min(during) if during else 0.0) / max(1e-9, float(np.median(steady)))
    return name, first_after - start, dip, len(failures) - failed_before


def _per_second(steps: list, start: float, end: float) -> list[float]:
    """Tokens computed in each whole second of [start, end)."""
    seconds = max(1, int(end - start))
    counts = [0.0] * seconds
    for end_time, _seconds, tokens, *_ in steps:
        index = int(end_time - start)
        if 0 <= index < seconds:
            counts[index] += tokens
    return counts


if __name__ == "__main__":
    sys.exit(main())
