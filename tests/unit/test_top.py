"""`moeray top`: the snapshot built from canned admin answers, its rendering, and the command's shell
against a stdlib HTTP server that answers like the admin API (no Ray)."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from moeray.cluster import top
from moeray.cluster.cli import main

TOKEN = "unit-token"
# L=2 MoE layers, E=8 experts, G=2 groups x S=5 slots; expert 0 has a replica in group 1.
PLAN = {"version": 3, "num_groups": 2, "slots_per_group": 5,
        "physical_to_logical": [[[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]]}
LOAD = {"window": [[40, 20, 10, 10, 0, 10, 5, 5], [13, 12, 12, 13, 12, 13, 12, 13]],
        "ema": [[0.0] * 8] * 2, "total": [[400, 200, 100, 100, 0, 100, 50, 50]] * 2,
        "window_s": 60.0, "steps": 1234, "window_steps": 50, "plan_version": 3,
        "group_load": [[80.0, 40.0], [56.5, 43.5]], "imbalance": [1.3333, 1.13]}
STATS = {"router": {"plan_version": 3, "step": 1234, "running": 2, "waiting": 1, "streams": 3, "free_kv_blocks": 90,
                    "kv_blocks": 128, "staging_version": None, "error": None, "staging_error": None},
         "throughput": {"window_s": 10.0, "steps_per_s": 12.5, "tokens_per_s": 345.6, "step_ms_p50": 41.0,
                        "step_ms_p99": 77.5}}
DECISION = {"time": 1700000000.0, "action": "migrate", "reason": "layer 0 at 1.33 above 1.25 for 5 s",
            "plan_version": 2, "imbalance": 1.33, "new_version": 3, "imbalance_after": 1.05,
            "moves": [{"layer": 0, "group": 1, "slot": 4, "old_expert": -1, "new_expert": 0, "kind": "replicate"}],
            "bytes": 4096}
AUTOSCALER = {"status": {"phase": "cooldown", "dry_run": False, "pending_version": None, "last_decision": DECISION,
                         "migrations": {"success": 1, "failed": 0, "last_duration_s": 0.4, "moved_experts": 1},
                         "reloads": {"success": 0, "rejected": 0, "last_success_time": 0.0, "last_error": None}},
              "history": [DECISION]}
FIELDS = {"time", "url", "plan_version", "staging_version", "num_layers", "num_experts", "num_groups",
          "slots_per_group", "window_s", "window_steps", "steps", "load", "tokens_per_layer", "replica_count",
          "group_load", "group_share", "imbalance", "top_experts", "throughput", "router", "autoscaler"}
OFF = "the placement autoscaler is off on this server (serve with autoscaler: true)"


def _snapshot(autoscaler=AUTOSCALER, **overrides) -> dict:
    load = {**LOAD, **overrides}
    return top.build_snapshot("http://h:8000", 1700000100.0, load, STATS, {"plan": PLAN, "router": STATS["router"]},
                              autoscaler, None if autoscaler else OFF)


def _text(renderable, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_snapshot_has_the_documented_fields_and_values():
    snap = _snapshot()
    assert set(snap) == FIELDS
    assert json.loads(json.dumps(snap)) == snap  # JSON-ready as it is
    assert (snap["num_layers"], snap["num_experts"], snap["num_groups"], snap["slots_per_group"]) == (2, 8, 2, 5)
    assert snap["plan_version"] == 3 and snap["tokens_per_layer"] == [100, 100]
    assert snap["replica_count"][0] == [2, 1, 1, 1, 2, 1, 1, 1]
    assert snap["imbalance"] == {"per_layer": [1.3333, 1.13], "worst": 1.3333, "worst_layer": 0,
                                 "mean": pytest.approx(1.23165)}
    assert snap["group_share"] == pytest.approx([136.5 / 110, 83.5 / 110])
    assert snap["top_experts"][0] == [{"expert": 0, "tokens": 40, "share": 0.4},
                                      {"expert": 1, "tokens": 20, "share": 0.2},
                                      {"expert": 2, "tokens": 10, "share": 0.1}]
    assert snap["throughput"]["tokens_per_s"] == 345.6 and snap["router"]["waiting"] == 1
    assert snap["autoscaler"]["enabled"] and snap["autoscaler"]["phase"] == "cooldown"
    assert snap["autoscaler"]["decisions"] == [DECISION]


def test_autoscaler_off_is_reported_not_raised():
    snap = _snapshot(autoscaler=None)
    assert snap["autoscaler"] == {"enabled": False, "reason": OFF}
    text = _text(top.render(snap))
    assert "autoscaler off" in text


def test_shades_bins_and_top_experts():
    assert [top.shade_level(r) for r in (0, 0.1, 0.5, 1.0, 1.5, 3, 10)] == [0, 1, 2, 3, 4, 5, 6]
    assert top.bin_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5, 5.0]
    assert top.columns_per_cell(256, 80) == 4 and top.columns_per_cell(8, 80) == 1
    rows, per_cell, per_row = top.heatmap_rows([[0] * 256, list(range(256))], 100)
    assert per_cell == 3 and per_row == 1 and len(rows[0]) == 86 and set(rows[0]) == {0} and rows[1][-1] == 5
    assert top.top_experts([0, 5, 5, 1], 3) == [{"expert": 1, "tokens": 5, "share": 5 / 11},
                                                {"expert": 2, "tokens": 5, "share": 5 / 11},
                                                {"expert": 3, "tokens": 1, "share": 1 / 11}]
    assert top.top_experts([0, 0], 3) == [] and top.group_share([[0.0, 0.0]]) == [1.0, 1.0]


def test_render_shows_the_key_numbers():
    text = _text(top.render(_snapshot()))
    for expected in ("plan v3", "345.6 tok/s", "12.5 steps/s", "p50 41.0 ms", "p99 77.5 ms", "worst 1.33 (layer 0)",
                     "1.24x", "1.13x", "cooldown", "v2 -> v3", "1.33 -> 1.05", "layer 0 at 1.33 above 1.25",
                     "KV 90/128", "http://h:8000"):
        assert expected in text, expected
    assert "refresh failed: gone" in _text(top.render(_snapshot(), error="gone"))


@pytest.mark.parametrize("width", [60, 100, 200])
def test_a_256_expert_heatmap_fits_the_terminal(width):
    window = [[(e * 7 + layer) % 50 for e in range(256)] for layer in range(58)]
    snap = _snapshot(window=window, group_load=[[10.0] * 32] * 58, imbalance=[1.0] * 58)
    text = _text(top.heatmap(snap, width), width)
    lines = text.splitlines()
    assert len(lines) >= 58 and max(len(line) for line in lines) <= width
    assert "experts per cell" in text


class FakeAdmin:
    """A stdlib HTTP server answering the admin routes `moeray top` and `moeray load plot` read."""

    def __init__(self, autoscaler: bool = True):
        answers = {"/admin/load": LOAD, "/admin/stats": STATS, "/admin/autoscaler": AUTOSCALER,
                   "/admin/placement": {"plan": PLAN, "router": STATS["router"]}}
        self.paths = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):
                path = handler.path.partition("?")[0]
                self.paths.append(handler.path)
                if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return _reply(handler, 401, {"error": {"message": "the admin API needs 'Authorization: Bearer'"}})
                if path == "/admin/autoscaler" and not autoscaler:
                    return _reply(handler, 409, {"error": {"message": OFF}})
                _reply(handler, 200, answers[path])

            def log_message(handler, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(handler, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def fake_admin():
    server = FakeAdmin()
    yield server
    server.close()


def test_top_once_json_prints_one_snapshot(fake_admin, capsys):
    code = main(["top", "--once", "--json", "--url", fake_admin.url, "--token", TOKEN, "--window-s", "30"])
    out = capsys.readouterr().out
    snap = json.loads(out)
    assert code == 0 and len(out.splitlines()) == 1 and set(snap) == FIELDS
    assert snap["url"] == fake_admin.url and snap["imbalance"]["worst"] == 1.3333
    assert "/admin/load?window_s=30.0" in fake_admin.paths and "/admin/stats?window_s=10.0" in fake_admin.paths


def test_top_once_draws_the_view(fake_admin, capsys):
    assert main(["top", "--once", "--url", fake_admin.url, "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    assert "plan v3" in out and "345.6 tok/s" in out and "recent autoscaler decisions" in out


def test_top_without_autoscaler_says_so(capsys):
    server = FakeAdmin(autoscaler=False)
    try:
        assert main(["top", "--once", "--json", "--url", server.url, "--token", TOKEN]) == 0
        assert json.loads(capsys.readouterr().out)["autoscaler"] == {"enabled": False, "reason": OFF}
        assert main(["top", "--once", "--url", server.url, "--token", TOKEN]) == 0
        assert "autoscaler off" in capsys.readouterr().out
    finally:
        server.close()


def test_top_bad_token_exits_2_and_no_server_exits_1(fake_admin, capsys):
    assert main(["top", "--once", "--url", fake_admin.url, "--token", "wrong"]) == 2
    assert "Bearer" in capsys.readouterr().err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
        assert main(["top", "--once", "--url", closed, "--token", TOKEN]) == 1
    assert f"cannot reach the moeray server at {closed}" in capsys.readouterr().err


def test_top_rejects_a_bad_interval(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["top", "--interval-s", "0"])
    assert exit_info.value.code == 2 and "'0' must be a number of seconds > 0" in capsys.readouterr().err


def test_live_view_refreshes_until_ctrl_c_then_exits_0(fake_admin):
    process = subprocess.Popen([sys.executable, "-m", "moeray.cluster.cli", "top", "--url", fake_admin.url,
                                "--token", TOKEN, "--interval-s", "0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sum(p.startswith("/admin/load") for p in fake_admin.paths) < 3:  # the loop is refreshing
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
