"""The suite's short chaos run (`bench/chaos.py` is the long one): under streaming HTTP load, an
expert group, then the router, then another group are SIGKILLed, each after the last recovered;
no request fails, none differs from the fault-free output, and every kill is recovered and healed."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_chaos():
    spec = importlib.util.spec_from_file_location("bench_chaos", BENCH / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_kills_under_load_lose_nothing(ray_cluster):
    chaos = load_chaos()
    outcome = chaos.chaos(chaos.parse(["--duration", "120", "--kills", "3", "--kill-every", "3", "--router-every", "2",
                                       "--groups", "3", "--clients", "4", "--max-tokens", "24"]))
    victims = [k.victim.split()[0] for k in outcome.kills]
    assert victims == ["group", "router", "group"], outcome.log
    assert outcome.traffic.failures == [], outcome.log
    assert outcome.wrong == []
    assert all(k.recovered_s is not None and k.healed_s is not None for k in outcome.kills), (outcome.kills, outcome.log)
    assert len(outcome.traffic.results) > 20
    assert any(first is not None for first in (k.first_token_s for k in outcome.kills))
