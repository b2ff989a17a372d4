"""`moeray load plot`: expert load snapshots -> one PNG, so a trace can be studied offline.

Input is what `moeray load dump` writes (one `/admin/load` answer per line, `LoadSnapshot.to_dict()`
plus `"time"`) or a single live snapshot. The picture has three panels:
- the last snapshot's window as a heatmap, MoE layers (rows) x logical experts (columns);
- load per group over time: the busiest group's and the mean group's tokens, summed over layers;
- imbalance over time: the worst layer's and the mean over layers (1.0 = balanced).
Plan version changes are marked on the time axes, since a migration is what moves those lines.
One snapshot has no time axis, so its two lower panels show tokens per group and imbalance per layer.

Reading and validating are pure; only `write_png` touches matplotlib (the object API on the Agg
canvas, no pyplot state, no display needed). matplotlib is the `plot` extra.
"""

import json
from pathlib import Path

import numpy as np

REQUIRED = ("window", "group_load", "imbalance")


def read_dump(path: Path) -> list[dict]:
    """Every snapshot of a `moeray load dump` file, checked line by line and against the first line's shapes."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    snapshots, first_shape, first_line = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err}); expected one `moeray load dump` snapshot per line") from None
        shape = check_snapshot(data, where)
        if first_shape is None:
            first_shape, first_line = shape, number
        elif shape != first_shape:
            raise ValueError(f"{where}: shape [layers={shape[0]}, experts={shape[1]}, groups={shape[2]}] differs from "
                             f"line {first_line}'s [layers={first_shape[0]}, experts={first_shape[1]}, "
                             f"groups={first_shape[2]}]; plot one server's dump per file")
        snapshots.append(data)
    if not snapshots:
        raise ValueError(f"{path}: no snapshots in the file (write one with `moeray load dump --out {path}`)")
    return snapshots


def check_snapshot(data, where: str) -> tuple[int, int, int]:
    """A load snapshot's (L, E, G), or ValueError naming `where` and the field that is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a load snapshot: expected a JSON object with {', '.join(REQUIRED)}, "
                         f"got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{where}: not a load snapshot: no {missing[0]!r} field")
    window = _matrix(data["window"], where, "window", "[layers][experts]")
    group_load = _matrix(data["group_load"], where, "group_load", "[layers][groups]")
    imbalance = _array(data["imbalance"], where, "imbalance", 1, "[layers]")
    num_layers = window.shape[0]
    if group_load.shape[0] != num_layers or imbalance.shape[0] != num_layers:
        raise ValueError(f"{where}: window has {num_layers} layers but group_load has {group_load.shape[0]} "
                         f"and imbalance {imbalance.shape[0]}")
    if "time" in data and not isinstance(data["time"], (int, float)):
        raise ValueError(f"{where}: time must be unix seconds, got {data['time']!r}")
    return num_layers, window.shape[1], group_load.shape[1]


def _matrix(value, where: str, name: str, shape: str) -> np.ndarray:
    array = _array(value, where, name, 2, shape)
    if array.shape[1] == 0:
        raise ValueError(f"{where}: {name} must be {shape} with at least one column, got shape {list(array.shape)}")
    return array


def _array(value, where: str, name: str, dims: int, shape: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: {name} must be {shape} numbers with equal-length rows") from None
    if array.ndim != dims or array.shape[0] == 0:
        raise ValueError(f"{where}: {name} must be {shape}, got shape {list(array.shape)}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{where}: {name} must hold finite numbers >= 0")
    return array


def series(snapshots: list[dict]) -> dict:
    """Per snapshot [R]: x (seconds since the first, or its index without times), the busiest and the mean
    group's tokens summed over layers, worst and mean layer imbalance, plan version."""
    timed = all("time" in s for s in snapshots)
    x = np.array([s["time"] - snapshots[0]["time"] for s in snapshots] if timed else range(len(snapshots)), float)
    per_group = np.array([np.asarray(s["group_load"], np.float64).sum(0) for s in snapshots])  # [R, G]
    imbalance = np.array([np.asarray(s["imbalance"], np.float64) for s in snapshots])  # [R, L]
    return {"x": x, "x_label": "seconds since the first snapshot" if timed else "snapshot",
            "group_max": per_group.max(1), "group_mean": per_group.mean(1),
            "imbalance_worst": imbalance.max(1), "imbalance_mean": imbalance.mean(1),
            "plan_version": [s.get("plan_version") for s in snapshots]}


def version_changes(versions: list) -> list[tuple[int, object]]:
    """(index, new version) wherever the plan version differs from the snapshot before."""
    return [(i, v) for i, v in enumerate(versions) if i and v != versions[i - 1]]


def write_png(snapshots: list[dict], out: Path, title: str) -> None:
    """Draw the heatmap of the last snapshot and the time series of all of them into `out` (PNG)."""
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {str(out)!r}: the plot is a PNG, name the file *.png")
    if not out.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: no such folder {str(out.parent)!r}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ValueError("moeray load plot needs matplotlib: pip install 'moeray[plot]'") from None
    last = snapshots[-1]
    figure = Figure(figsize=(12, 10), layout="constrained")
    FigureCanvasAgg(figure)
    heat, groups, balance = figure.subplots(3, 1, gridspec_kw={"height_ratios": [2, 1, 1]})
    window = np.asarray(last["window"], np.float64)  # [L, E]
    image = heat.imshow(window, aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=heat, label="tokens in the window")
    heat.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    heat.set(xlabel="logical expert", ylabel="MoE layer",
             title=f"expert load, plan v{last.get('plan_version', '?')}, last {last.get('window_s', 0):.0f} s "
                   f"({last.get('window_steps', '?')} steps)")
    if len(snapshots) == 1:
        _draw_snapshot(groups, balance, last)
    else:
        _draw_series(groups, balance, series(snapshots))
    figure.suptitle(f"moeray load: {title}")
    figure.savefig(out, format="png", dpi=100)


def _draw_series(groups, balance, data: dict) -> None:
    """Busiest and mean group, worst and mean layer imbalance, over time; plan changes marked."""
    marker = "o" if len(data["x"]) < 50 else None
    groups.plot(data["x"], data["group_max"], marker=marker, label="busiest group")
    groups.plot(data["x"], data["group_mean"], marker=marker, label="mean group")
    groups.set(ylabel="tokens (all layers)", title="load per group over time")
    balance.plot(data["x"], data["imbalance_worst"], marker=marker, label="worst layer")
    balance.plot(data["x"], data["imbalance_mean"], marker=marker, label="mean over layers")
    balance.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    balance.set(xlabel=data["x_label"], ylabel="busiest / mean group", title="imbalance over time")
    for axes in (groups, balance):
        for index, version in version_changes(data["plan_version"]):
            axes.axvline(data["x"][index], color="grey", linestyle="--", linewidth=0.8)
            axes.annotate(f"v{version}", (data["x"][index], 1), xycoords=("data", "axes fraction"),
                          xytext=(3, -3), textcoords="offset points", va="top", fontsize=8)
        axes.legend(fontsize=8)


def _draw_snapshot(groups, balance, snapshot: dict) -> None:
    """One snapshot has no time axis: each group's tokens (all layers) and each layer's imbalance."""
    per_group = np.asarray(snapshot["group_load"], np.float64).sum(0)  # [G]
    groups.bar(range(len(per_group)), per_group)
    groups.axhline(per_group.mean(), color="grey", linewidth=0.8, linestyle=":", label="mean group")
    groups.set(xlabel="expert group", ylabel="tokens (all layers)", title="load per group")
    imbalance = np.asarray(snapshot["imbalance"], np.float64)  # [L]
    balance.bar(range(len(imbalance)), imbalance)
    balance.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    balance.set(xlabel="MoE layer", ylabel="busiest / mean group", title="imbalance per layer",
                ylim=(min(0.9, float(imbalance.min()) - 0.05), float(imbalance.max()) * 1.05 + 0.01))
    groups.legend(fontsize=8)
