"""`moeray top` and `moeray load plot`: the thin shells that fetch from the admin API, loop and write.

What a snapshot holds and how it is drawn is cluster/top.py (pure); reading `load dump` files and
drawing the PNG is cluster/load_plot.py. Here: arguments, HTTP calls, the refresh loop, output.
A server that cannot be reached exits 1 (RuntimeError), a refused token 2 (ValueError).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

from moeray.cluster.admin_client import AdminClient, server_flags

THROUGHPUT_WINDOW_S = 10.0
NUM_DECISIONS = 20


def register(sub) -> None:
    """Add `moeray top` to `moeray`'s subparsers."""
    top = sub.add_parser("top", help="live view of a running server: expert load, groups, throughput, autoscaler",
                         description="A live terminal view of a running server: a layers x experts load heatmap, "
                                     "load per group, imbalance, placement version, throughput and the autoscaler's "
                                     "recent decisions. Ctrl-C exits.")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true",
                     help="print snapshots as JSON (one line each; fields in `moeray.cluster.top`'s docstring)")
    top.add_argument("--interval-s", type=_positive_float, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--window-s", type=_positive_float, default=60.0,
                     help="seconds of expert load the heatmap sums (default 60)")
    server_flags(top)
    top.set_defaults(func=run_top)


def register_load_plot(load_sub) -> None:
    """Add `plot` to `moeray load`'s subparsers."""
    plot = load_sub.add_parser("plot", help="PNG: layers x experts heatmap, group load and imbalance over time",
                               description="Draw the expert load of a running server (one snapshot) or of a "
                                           "`moeray load dump` file (--from: every line, the heatmap of the last).")
    plot.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    plot.add_argument("--from", dest="source", type=Path, default=None, metavar="FILE.jsonl",
                      help="a `moeray load dump` file instead of a live server")
    plot.add_argument("--window-s", type=_positive_float, default=None,
                      help="seconds of load a live snapshot sums (default: all kept, 300)")
    server_flags(plot)
    plot.set_defaults(func=run_load_plot)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds > 0")
    return value


def fetch_snapshot(client, window_s: float | None, num_decisions: int = NUM_DECISIONS) -> dict:
    """One `top` snapshot from the four admin routes; an autoscaler that is off is reported, not raised."""
    from moeray.cluster.top import build_snapshot

    query = f"?window_s={window_s}" if window_s else ""
    load = client.get("/admin/load" + query)
    stats = client.get(f"/admin/stats?window_s={THROUGHPUT_WINDOW_S}")
    placement = client.get("/admin/placement")
    try:  # the token was good for the routes above, so a refusal here means: no autoscaler (409)
        autoscaler, off = client.get(f"/admin/autoscaler?limit={num_decisions}"), None
    except ValueError as err:
        autoscaler, off = None, str(err)
    return build_snapshot(client.url, time.time(), load, stats, placement, autoscaler, off)


def run_top(args) -> int:
    client = AdminClient(args.url, args.token, timeout_s=max(10.0, 5 * args.interval_s))
    snapshot = fetch_snapshot(client, args.window_s)  # the first failure is the command's
    if args.json:
        return _json_loop(client, args, snapshot)
    from rich.console import Console

    from moeray.cluster.top import render

    console = Console()
    if args.once:
        console.print(render(snapshot, console.width))
        return 0
    from rich.live import Live

    try:
        view = render(snapshot, console.width, console.height)
        with Live(view, console=console, auto_refresh=False, screen=True) as live:
            while True:
                time.sleep(args.interval_s)
                error = None
                try:
                    snapshot = fetch_snapshot(client, args.window_s)
                except (RuntimeError, ValueError) as err:  # keep watching a server that restarts
                    error = str(err)
                live.update(render(snapshot, console.width, console.height, error=error), refresh=True)
    except KeyboardInterrupt:
        return 0


def _json_loop(client, args, snapshot: dict) -> int:
    """--json: one line per snapshot (just one with --once), for scripts and `jq`."""
    try:
        while True:
            print(json.dumps(snapshot), flush=True)
            if args.once:
                return 0
            time.sleep(args.interval_s)
            snapshot = fetch_snapshot(client, args.window_s)
    except KeyboardInterrupt:
        return 0


def run_load_plot(args) -> int:
    from moeray.cluster import load_plot

    if args.source is not None:
        snapshots = load_plot.read_dump(args.source)
        title = str(args.source)
    else:
        query = f"?window_s={args.window_s}" if args.window_s else ""
        snapshot = AdminClient(args.url, args.token).get("/admin/load" + query)
        snapshot["time"] = time.time()
        load_plot.check_snapshot(snapshot, f"{args.url}/admin/load")
        snapshots, title = [snapshot], args.url
    load_plot.write_png(snapshots, args.out, title)
    print(f"wrote {args.out} ({len(snapshots)} snapshot(s))", file=sys.stderr)
    return 0
