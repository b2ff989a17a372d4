"""`moeray top`'s snapshot and view: pure functions from admin API answers to a dict and to a rich renderable.

One snapshot joins four admin answers (`GET /admin/load`, `/admin/stats`, `/admin/placement`,
`/admin/autoscaler`, see cluster/admin.py) taken a moment apart. `build_snapshot` turns them into
the JSON that `moeray top --json` prints; `render` draws the same dict, so what a script reads and
what a person sees never disagree. Both are pure (no I/O, no clock): `observe_cli.py` fetches,
loops and prints.

The snapshot's fields (L MoE layers, E logical experts, G expert groups, S slots per group):

    time             float    unix seconds when the answers were read
    url              str      the server's HTTP address
    plan_version     int      the active placement's version (from /admin/placement)
    staging_version  int|null a plan being loaded into the groups, not yet active
    num_layers, num_experts, num_groups, slots_per_group    int   L, E, G, S
    window_s         float    seconds the load window covers (younger servers: their age)
    window_steps     int      steps inside the window
    steps            int      steps since the server started
    load             [L][E]   tokens routed to each logical expert in the window
    tokens_per_layer [L]      sum of each layer's load row: routed (token, expert) pairs = top_k x tokens
    replica_count    [L][E]   physical copies of each logical expert in the active plan
    group_load       [L][G]   window tokens per group through the plan the load was counted under
    group_share      [G]      each group's tokens over all layers / the mean group's (1.0 = even)
    imbalance        {"per_layer": [L], "worst": float, "worst_layer": int, "mean": float}
                              busiest group over the mean group (1.0 = balanced)
    top_experts      [L] of [{"expert", "tokens", "share"}]   each layer's 3 busiest experts (idle
                              ones left out), share = fraction of the layer's tokens
    throughput       {"window_s", "steps_per_s", "tokens_per_s", "step_ms_p50", "step_ms_p99"}
                              (the step times are null when no step ran in the window)
    router           {"step", "running", "waiting", "streams", "free_kv_blocks", "kv_blocks", "error"}
    autoscaler       {"enabled": true, "phase", "dry_run", "pending_version", "migrations", "reloads",
                      "decisions": [the controller's Decision dicts, oldest first]}
                     or {"enabled": false, "reason": why} (served with --no-autoscaler)

The heatmap shades each cell by its experts' load over the layer's mean expert load, on a
doubling scale, so a hot expert stands out whatever the traffic volume; with more experts than
the terminal has columns, neighbouring experts share a cell (their mean).
"""

import math
import time

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

NUM_TOP_EXPERTS = 3
ROUTER_FIELDS = ("step", "running", "waiting", "streams", "free_kv_blocks", "kv_blocks", "error")
STATUS_FIELDS = ("phase", "dry_run", "pending_version", "migrations", "reloads")
# (upper bound of load / layer's mean expert load, glyph, colour); an idle cell is level 0.
SHADES = ((0.0, "·", "grey42"), (0.5, "░", "blue"), (0.8, "▒", "cyan"), (1.25, "▓", "green"),
          (2.0, "█", "yellow"), (4.0, "█", "dark_orange"), (math.inf, "█", "red"))
LEGEND = ("0", "<0.5", "<0.8", "<1.25", "<2", "<4", ">=4")
ROW_LABEL_WIDTH, ROW_VALUE_WIDTH = 7, 9  # "L  57 │" and "│ 12.34x" around a heatmap row


def build_snapshot(url: str, now: float, load: dict, stats: dict, placement: dict,
                   autoscaler: dict | None, autoscaler_off: str | None = None,
                   num_top: int = NUM_TOP_EXPERTS) -> dict:
    """The four admin answers -> the documented snapshot (see the module docstring).

    `autoscaler` is `GET /admin/autoscaler`'s answer, or None with `autoscaler_off` saying why
    (the server refused: it runs without the autoscaler)."""
    window, plan = load["window"], placement["plan"]
    imbalance = [float(x) for x in load["imbalance"]]
    group_load = load["group_load"]
    return {
        "time": now, "url": url, "plan_version": plan["version"],
        "staging_version": placement["router"].get("staging_version"),
        "num_layers": len(window), "num_experts": len(window[0]) if window else 0,
        "num_groups": plan["num_groups"], "slots_per_group": plan["slots_per_group"],
        "window_s": load["window_s"], "window_steps": load["window_steps"], "steps": load["steps"],
        "load": window, "tokens_per_layer": [sum(row) for row in window],
        "replica_count": replica_count(plan["physical_to_logical"], len(window[0]) if window else 0),
        "group_load": group_load, "group_share": group_share(group_load),
        "imbalance": {"per_layer": imbalance, "worst": max(imbalance, default=1.0),
                      "worst_layer": imbalance.index(max(imbalance)) if imbalance else None,
                      "mean": sum(imbalance) / len(imbalance) if imbalance else 1.0},
        "top_experts": [top_experts(row, num_top) for row in window],
        "throughput": stats["throughput"],
        "router": {k: stats["router"].get(k) for k in ROUTER_FIELDS},
        "autoscaler": _autoscaler(autoscaler, autoscaler_off),
    }


def _autoscaler(answer: dict | None, off_reason: str | None) -> dict:
    if answer is None:
        return {"enabled": False, "reason": off_reason or "the placement autoscaler is off on this server"}
    return {"enabled": True, **{k: answer["status"].get(k) for k in STATUS_FIELDS}, "decisions": answer["history"]}


def replica_count(physical_to_logical: list, num_experts: int) -> list[list[int]]:
    """physical_to_logical [L][G][S] (-1 = empty) -> [L][E] copies of each logical expert."""
    counts = []
    for groups in physical_to_logical:
        row = [0] * num_experts
        for slots in groups:
            for expert in slots:
                if 0 <= expert < num_experts:
                    row[expert] += 1
        counts.append(row)
    return counts


def group_share(group_load: list) -> list[float]:
    """group_load [L][G] -> [G] each group's tokens summed over layers / the mean group's (1.0 when idle)."""
    if not group_load:
        return []
    totals = [sum(column) for column in zip(*group_load)]
    mean = sum(totals) / len(totals)
    return [t / mean if mean > 0 else 1.0 for t in totals]


def top_experts(row: list, k: int) -> list[dict]:
    """One layer's load [E] -> its k busiest experts (ties: the lower id), with their share of the layer."""
    total = sum(row)
    ranked = sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]
    return [{"expert": e, "tokens": row[e], "share": row[e] / total if total else 0.0} for e in ranked if row[e] > 0]


def bin_means(row: list, size: int) -> list[float]:
    """[E] -> [ceil(E / size)] means of `size` neighbouring experts (the last bin may be shorter)."""
    return [sum(row[i:i + size]) / len(row[i:i + size]) for i in range(0, len(row), size)]


def columns_per_cell(num_experts: int, max_columns: int) -> int:
    """Experts that share one heatmap cell so that a row fits in `max_columns` terminal columns."""
    return max(1, -(-num_experts // max(1, max_columns)))


def shade_level(ratio: float) -> int:
    """load / the layer's mean expert load -> an index into SHADES (0: idle)."""
    if ratio <= 0:
        return 0
    return next(i for i, (bound, _, _) in enumerate(SHADES) if i > 0 and ratio < bound)


def heatmap_rows(load: list, max_columns: int, max_rows: int | None = None) -> tuple[list[list[int]], int, int]:
    """load [L][E] -> (shade levels [ceil(L / m)][ceil(E / n)], n experts per cell, m layers per row).

    Neighbouring layers that share a row add their loads (then shade against their mean expert)."""
    num_experts = len(load[0]) if load else 0
    per_cell = columns_per_cell(num_experts, max_columns)
    per_row = columns_per_cell(len(load), max_rows) if max_rows else 1
    rows = []
    for start in range(0, len(load), per_row):
        row = [sum(column) for column in zip(*load[start:start + per_row])]
        mean = sum(row) / len(row) if row else 0.0
        rows.append([shade_level(v / mean) if mean > 0 else 0 for v in bin_means(row, per_cell)])
    return rows, per_cell, per_row


def render(snapshot: dict, width: int = 120, height: int | None = None, num_decisions: int = 5,
           error: str | None = None) -> Group:
    """The view for a console `width` columns wide: header, heatmap with per-layer imbalance, group
    bars, recent decisions. With a `height` (the live view) neighbouring layers share heatmap rows so
    that everything fits. `error` (a failed refresh) is shown above the last good snapshot."""
    shown = min(num_decisions, len(snapshot["autoscaler"].get("decisions", [])))
    others = 6 + (snapshot["num_groups"] + 2) + (shown + 3 if shown else 3) + 3 + (1 if error else 0)
    parts = [header(snapshot)]
    if error:
        parts.insert(0, Text(f"refresh failed: {error} (showing the last snapshot)", style="bold red"))
    max_rows = max(4, height - others) if height else None
    parts += [heatmap(snapshot, width, max_rows), group_bars(snapshot, width), decisions(snapshot, num_decisions)]
    return Group(*parts)


def header(snapshot: dict) -> Text:
    router, speed, auto = snapshot["router"], snapshot["throughput"], snapshot["autoscaler"]
    staging = f" (staging v{snapshot['staging_version']})" if snapshot["staging_version"] is not None else ""
    imbalance = snapshot["imbalance"]
    text = Text()
    text.append(f"moeray top  {snapshot['url']}  {time.strftime('%H:%M:%S', time.localtime(snapshot['time']))}\n",
                style="bold")
    text.append(f"plan v{snapshot['plan_version']}{staging}  {snapshot['num_layers']} MoE layers x "
                f"{snapshot['num_experts']} experts on {snapshot['num_groups']} groups x "
                f"{snapshot['slots_per_group']} slots\n")
    text.append(f"throughput {speed['tokens_per_s']:.1f} tok/s  {speed['steps_per_s']:.1f} steps/s  "
                f"step p50 {_ms(speed['step_ms_p50'])}  p99 {_ms(speed['step_ms_p99'])}  "
                f"(last {speed['window_s']:g} s)\n")
    text.append(f"step {router['step']}  running {router['running']}  waiting {router['waiting']}  "
                f"KV {router['free_kv_blocks']}/{router['kv_blocks']} blocks free\n")
    text.append(f"imbalance worst {imbalance['worst']:.2f} (layer {imbalance['worst_layer']})  "
                f"mean {imbalance['mean']:.2f}  over the last {snapshot['window_s']:.0f} s "
                f"({snapshot['window_steps']} steps)\nautoscaler ")
    if auto["enabled"]:
        dry = " (dry run)" if auto["dry_run"] else ""
        text.append(f"{auto['phase']}{dry}  migrations {auto['migrations']['success']} ok "
                    f"{auto['migrations']['failed']} failed", style="green")
    else:
        text.append("off", style="yellow")
    if router.get("error"):
        text.append(f"\nrouter error: {router['error']}", style="bold red")
    return text


def heatmap(snapshot: dict, width: int, max_rows: int | None = None) -> Panel:
    """Layers x experts, shaded by load over the layer's mean; imbalance (the worst of the row's
    layers) at the end of each row."""
    inner = max(8, width - 4 - ROW_LABEL_WIDTH - ROW_VALUE_WIDTH)
    rows, per_cell, per_row = heatmap_rows(snapshot["load"], inner, max_rows)
    cell_width = max(1, min(3, inner // max(1, len(rows[0]) if rows else 1)))
    per_layer = snapshot["imbalance"]["per_layer"]
    lines = []
    for index, levels in enumerate(rows):
        first = index * per_row
        layers = range(first, min(first + per_row, len(per_layer)))
        line = Text(f"L{first:>4} │" if per_row == 1 else f"L{first:>4}+│")
        for level in levels:
            _, glyph, colour = SHADES[level]
            line.append(glyph * cell_width, style=colour)
        worst = snapshot["imbalance"]["worst_layer"] in layers
        line.append(f"│ {max(per_layer[i] for i in layers):5.2f}x", style="bold red" if worst else "")
        lines.append(line)
    legend = Text("load / layer mean: ")
    for (_, glyph, colour), label in zip(SHADES, LEGEND):
        legend.append(glyph, style=colour)
        legend.append(f" {label}  ")
    lines.append(legend)
    notes = [f"{per_cell} experts per cell"] if per_cell > 1 else []
    notes += [f"{per_row} layers per row, the worst one's imbalance at the right"] if per_row > 1 else \
        ["imbalance per layer at the right"]
    return Panel(Text("\n").join(lines), title=f"expert load ({', '.join(notes)})", expand=False)


def group_bars(snapshot: dict, width: int) -> Panel:
    """Each group's tokens over all layers as a bar; 1.00x is the mean group."""
    shares = snapshot["group_share"]
    totals = [sum(column) for column in zip(*snapshot["group_load"])] if snapshot["group_load"] else []
    bar_width = max(10, min(50, width - 40))
    peak = max(shares, default=0.0) or 1.0
    lines = []
    for group, (share, total) in enumerate(zip(shares, totals)):
        filled = round(bar_width * share / peak)
        line = Text(f"g{group:<3} ")
        line.append("█" * filled, style="red" if share >= 1.25 else "green")
        line.append("░" * (bar_width - filled), style="grey42")
        line.append(f" {share:5.2f}x  {total:,.0f} tok")
        lines.append(line)
    return Panel(Text("\n").join(lines), title="load per group (all layers, x mean group)", expand=False)


def decisions(snapshot: dict, limit: int) -> Panel:
    auto = snapshot["autoscaler"]
    if not auto["enabled"]:
        return Panel(Text(f"autoscaler off: {auto['reason']}", style="yellow"), title="autoscaler", expand=False)
    table = Table(box=None, pad_edge=False)
    for name in ("time", "action", "plan", "imbalance", "moves", "reason"):
        table.add_column(name, overflow="ellipsis", no_wrap=name != "reason")
    for d in auto["decisions"][-limit:]:
        after = f" -> {d['imbalance_after']:.2f}" if d.get("imbalance_after") is not None else ""
        new = f" -> v{d['new_version']}" if d.get("new_version") is not None else ""
        table.add_row(time.strftime("%H:%M:%S", time.localtime(d["time"])), d["action"], f"v{d['plan_version']}{new}",
                      f"{d['imbalance']:.2f}{after}", str(len(d.get("moves") or [])), d["reason"])
    pending = f", staging v{auto['pending_version']}" if auto["pending_version"] is not None else ""
    body = table if auto["decisions"] else Text("no decisions yet")
    return Panel(body, title=f"recent autoscaler decisions ({auto['phase']}{pending})", expand=False)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
