"""A live skewed cluster with the placement autoscaler off vs on: balance, throughput, step latency.

    python bench/skew.py                 # 2 x 60 s runs, ~2.5 min
    python bench/skew.py --quick         # 2 x 25 s runs, ~1 min
    python bench/skew.py --duration 120 --clients 16 --groups 2

The checkpoint is the built-in model with its gates pushed towards experts 0 and 1
(tests/skewed.py), which the default plan puts in the same group. Each run deploys a router and
`--groups` expert groups on a local Ray cluster (default plan, one redundant slot per group) and
drives `--clients` closed-loop streaming clients (`Deployment.generate`, greedy, `--max-tokens` each)
for `--duration` seconds. The "on" run also starts the `AutoscalerController` with POLICY below.

Sampled once a second from the router (`load_snapshot(window_s=1)` under the plan in force):
- imbalance: busiest group / mean group, mean over MoE layers;
- busiest group tok/step: tokens the busiest group computed per step, mean over layers — the
  number that sets the step time when one group is the straggler.
From the router's step log: tok/s (tokens computed by all steps / wall time), step latency
p50/p99 over all steps, and, for the "on" run, p99 over the steps that ran while a plan was
staging (the groups loading new experts beside serving) vs those that did not; target <= 1.5x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the skewed checkpoint builder

from skewed import PROMPTS, write_skewed_default  # noqa: E402

from moeray.actors.sequence import SamplingParams  # noqa: E402
from moeray.autoscaler.controller_actor import AutoscalerController  # noqa: E402
from moeray.cluster.deploy import ClusterConfig, deploy, expert_bytes  # noqa: E402
from moeray.models import load_config  # noqa: E402
from moeray.models.tokenizer import Tokenizer  # noqa: E402

POLICY = """\
interval_s: 1
load: {window_s: 5, min_tokens_per_layer: 256}
trigger: {imbalance: 1.25, stabilization_s: 3, cooldown_s: 30}
target: {imbalance: 1.1}
replication: {redundant_slots_per_group: 1, max_replicas_per_expert: 4}
budget: {max_experts_per_round: 4, round_spacing_s: 1}
"""


def run(model: Path, autoscale: bool, args) -> dict:
    config, _ = load_config(model)
    deployment = deploy(ClusterConfig(str(model), num_groups=args.groups, redundant_slots=1))
    router = deployment.router
    controller = None
    if autoscale:
        controller = AutoscalerController.remote(router, POLICY, "bench policy", config.num_experts,
                                                 expert_bytes(config, "float32"), deployment.group_nodes())
    tokenizer = Tokenizer(model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    stop = threading.Event()
    failures: list[str] = []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
            try:
                for _ in deployment.generate(prompts[i % len(prompts)], params):
                    pass
            except Exception as err:
                failures.append(f"{type(err).__name__}: {err}")
            i += 1

    samples = []  # (t, imbalance mean over layers, busiest group tokens per step, plan version)
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    start = time.time()
    for t in threads:
        t.start()
    while time.time() - start < args.duration:
        time.sleep(1.0)
        snap = ray.get(router.load_snapshot.remote(1.0))
        steps = max(1, snap["window_steps"])
        group_load = np.array(snap["group_load"])  # [L, G]
        samples.append((time.time() - start, float(np.mean(snap["imbalance"])),
                        float(group_load.max(1).mean()) / steps, snap["plan_version"]))
    stop.set()
    for t in threads:
        t.join(timeout=120)
    steps = ray.get(router.step_log.remote(start))
    history = ray.get(controller.history.remote(256)) if controller else []
    if controller:
        ray.get(controller.stop.remote())
        ray.kill(controller)
    deployment.shutdown()
    seconds = np.array([s[1] for s in steps]) * 1000
    staging = np.array([s[3] for s in steps], dtype=bool)
    wall = steps[-1][0] - start if steps else 1.0
    return {"samples": samples, "failures": failures, "tok_s": sum(s[2] for s in steps) / wall,
            "p50": float(np.percentile(seconds, 50)), "p99": float(np.percentile(seconds, 99)),
            "p99_staging": float(np.percentile(seconds[staging], 99)) if staging.any() else None,
            "p99_quiet": float(np.percentile(seconds[~staging], 99)) if (~staging).any() else None,
            "staging_steps": int(staging.sum()), "steps": len(steps),
            "rounds": [d for d in history if d["action"] == "migrate"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="25 s runs")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per run (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    parser.add_argument("--groups", type=int, default=2, help="expert groups (default 2)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 25.0
    with tempfile.TemporaryDirectory(prefix="moeray-skew-") as tmp:
        model = write_skewed_default(Path(tmp) / "skewed")
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="moeray-ray-", dir="/tmp"))
        try:
            off = run(model, False, args)
            on = run(model, True, args)
        finally:
            ray.shutdown()
    report(off, on, args)
    return 1 if off["failures"] or on["failures"] else 0


def report(off: dict, on: dict, args) -> None:
    print(f"\n## bench/skew.py — {args.groups} groups, {args.clients} clients, {args.duration:.0f} s per run\n")
    print("| t (s) | imbalance off | imbalance on | busiest group tok/step off | on | plan version on |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    every = max(1, len(on["samples"]) // 12)
    for a, b in list(zip(off["samples"], on["samples"]))[::every]:
        print(f"| {b[0]:.0f} | {a[1]:.3f} | {b[1]:.3f} | {a[2]:.1f} | {b[2]:.1f} | v{b[3]} |")
    tail = slice(len(on["samples"]) // 2, None)  # the second half: after the autoscaler had its chance

    def mean(run, i):
        return float(np.mean([s[i] for s in run["samples"][tail]]))

    print("\n| | autoscaler off | autoscaler on | on / off |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| imbalance (second half, mean) | {mean(off, 1):.3f} | {mean(on, 1):.3f} | {mean(on, 1) / mean(off, 1):.2f} |")
    print(f"| busiest group tok/step (second half) | {mean(off, 2):.1f} | {mean(on, 2):.1f} | "
          f"{mean(on, 2) / mean(off, 2):.2f} |")
    print(f"| throughput tok/s (whole run) | {off['tok_s']:.0f} | {on['tok_s']:.0f} | {on['tok_s'] / off['tok_s']:.2f} |")
    print(f"| step p50 ms | {off['p50']:.1f} | {on['p50']:.1f} | {on['p50'] / off['p50']:.2f} |")
    print(f"| step p99 ms | {off['p99']:.1f} | {on['p99']:.1f} | {on['p99'] / off['p99']:.2f} |")
    print(f"| failed requests | {len(off['failures'])} | {len(on['failures'])} | |")
    if on["p99_staging"] is not None and on["p99_quiet"] is not None:
        print(f"\nautoscaler on: {len(on['rounds'])} migration round(s); step p99 while a plan was staging "
              f"{on['p99_staging']:.1f} ms ({on['staging_steps']} of {on['steps']} steps) vs without "
              f"{on['p99_quiet']:.1f} ms: {on['p99_staging'] / on['p99_quiet']:.2f}x (target <= 1.5x)")
    else:
        print(f"\nautoscaler on: {len(on['rounds'])} migration round(s); no step ran while a plan was staging")
    for failure in (off["failures"] + on["failures"])[:5]:
        print("failure:", failure)


if __name__ == "__main__":
    sys.exit(main())
