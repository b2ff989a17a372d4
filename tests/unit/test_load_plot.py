"""`moeray load plot`: a PNG from a synthetic `load dump` file and from a (stdlib, fake) live server;
every kind of bad input names the file, the line and the field."""

import json
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from moeray.cluster import load_plot
from moeray.cluster.cli import main
from test_top import TOKEN, FakeAdmin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _snapshot(step: int, num_layers: int = 3, num_experts: int = 16, num_groups: int = 4) -> dict:
    """A `load dump` line: expert 0 hot at first, evened out after the plan changes at step 3."""
    hot = 4.0 if step < 3 else 1.2
    window = [[int(10 * (hot if e == 0 else 1.0)) + layer for e in range(num_experts)] for layer in range(num_layers)]
    per_group = num_experts // num_groups
    group_load = [[float(sum(row[g * per_group:(g + 1) * per_group])) for g in range(num_groups)] for row in window]
    imbalance = [max(row) / (sum(row) / len(row)) for row in group_load]
    return {"window": window, "ema": window, "total": window, "window_s": 10.0, "steps": 100 * step,
            "window_steps": 100, "plan_version": 1 if step < 3 else 2, "group_load": group_load,
            "imbalance": imbalance, "time": 1700000000.0 + 10 * step}


def _dump(tmp_path, snapshots, name="load.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(s) + "\n" for s in snapshots))
    return path


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)  # decodes, or raises
    height, width = image.shape[:2]
    assert (height, width) == (1000, 1200) and image.shape[2] in (3, 4)
    assert np.ptp(image[..., :3]) > 0.5  # not a blank canvas


def test_plot_from_a_dump_file_writes_a_png(tmp_path, capsys):
    dump, out = _dump(tmp_path, [_snapshot(i) for i in range(6)]), tmp_path / "load.png"
    assert main(["load", "plot", "--from", str(dump), "--out", str(out)]) == 0
    _check_png(out)
    assert f"wrote {out} (6 snapshot(s))" in capsys.readouterr().err


def test_plot_of_one_snapshot_without_time(tmp_path):
    snapshot = _snapshot(0, num_layers=58, num_experts=256, num_groups=32)
    del snapshot["time"]
    out = tmp_path / "one.png"
    assert main(["load", "plot", "--from", str(_dump(tmp_path, [snapshot])), "--out", str(out)]) == 0
    _check_png(out)


def test_plot_from_a_live_server(tmp_path):
    server, out = FakeAdmin(), tmp_path / "live.png"
    try:
        assert main(["load", "plot", "--url", server.url, "--token", TOKEN, "--window-s", "30", "--out", str(out)]) == 0
    finally:
        server.close()
    _check_png(out)
    assert "/admin/load?window_s=30.0" in server.paths


def test_series_and_version_changes():
    data = load_plot.series([_snapshot(i) for i in range(5)])
    assert data["x"].tolist() == [0, 10, 20, 30, 40] and data["x_label"] == "seconds since the first snapshot"
    assert data["group_max"][0] > data["group_max"][4] and data["imbalance_worst"][0] > data["imbalance_mean"][4]
    assert data["group_mean"][0] == pytest.approx(sum(map(sum, _snapshot(0)["group_load"])) / 4)
    assert load_plot.version_changes(data["plan_version"]) == [(3, 2)]


@pytest.mark.parametrize("lines, message", [
    (["{not json"], "load.jsonl:2: not JSON"),
    (["[1, 2]"], "load.jsonl:2: not a load snapshot: expected a JSON object"),
    (['{"window": [[1]], "group_load": [[1]]}'], "load.jsonl:2: not a load snapshot: no 'imbalance' field"),
    (['{"window": [[1, 2], [3]], "group_load": [[1], [1]], "imbalance": [1, 1]}'],
     "load.jsonl:2: window must be [layers][experts] numbers with equal-length rows"),
    (['{"window": [[1, -2]], "group_load": [[1]], "imbalance": [1]}'], "load.jsonl:2: window must hold finite numbers"),
    (['{"window": [[1, 2]], "group_load": [[1], [1]], "imbalance": [1]}'],
     "load.jsonl:2: window has 1 layers but group_load has 2"),
    ([json.dumps(_snapshot(1, num_experts=8))],
     "load.jsonl:2: shape [layers=3, experts=8, groups=4] differs from line 1's [layers=3, experts=16, groups=4]"),
])
def test_bad_lines_are_named(tmp_path, capsys, lines, message):
    path = tmp_path / "load.jsonl"
    path.write_text(json.dumps(_snapshot(0)) + "\n" + "\n".join(lines) + "\n")
    assert main(["load", "plot", "--from", str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "x.png").exists()


def test_bad_files_and_outputs(tmp_path, capsys):
    dump = _dump(tmp_path, [_snapshot(0)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for argv, message in [
        (["--from", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.png")], "nope.jsonl: no such file"),
        (["--from", str(empty), "--out", str(tmp_path / "x.png")], "empty.jsonl: no snapshots in the file"),
        (["--from", str(dump), "--out", str(tmp_path / "x.svg")], "name the file *.png"),
        (["--from", str(dump), "--out", str(tmp_path / "no" / "x.png")], "no such folder"),
    ]:
        assert main(["load", "plot", *argv]) == 2
        assert message in capsys.readouterr().err, message


def test_missing_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    dump = _dump(tmp_path, [_snapshot(0)])
    assert main(["load", "plot", "--from", str(dump), "--out", str(tmp_path / "x.png")]) == 2
    assert "pip install 'moeray[plot]'" in capsys.readouterr().err
