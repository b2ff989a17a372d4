"""An expert group lost mid-stream — SIGKILLed, or hung (SIGSTOP: the step's collective times out and
the group answers no Ray call): the world re-forms, the failed step is replayed, every request
completes with the same greedy output, and the pool is back to its size.

Two ways back: when the survivors have free or surplus slots for the lost group's sole experts they
take them over (load them from the checkpoint) and the pool then heals by scaling out; when they do
not, a replacement group is started in the dead one's place.
"""

import os
import signal
import time

import pytest
import ray

from moeray.actors.engine import Engine
from moeray.actors.sequence import SamplingParams
from moeray.cluster.deploy import ClusterConfig, deploy
from moeray.models import DEFAULT_MODEL_DIR, load_model
from moeray.models.tokenizer import Tokenizer
from load import StreamingLoad

PROMPTS = ["The for statement", "A list comprehension", "def main():", "Exceptions are", "import os",
           "The while loop", "Dictionaries map", "class Point:"]


@pytest.mark.parametrize("num_groups, redundant_slots, victim, how, sig", [
    (2, 1, 1, "replaced group(s) [1]", signal.SIGKILL),  # group 0's 5 slots: no room for group 1's 3 sole experts
    (3, 2, 2, "survivors took over", signal.SIGKILL),  # 2 surplus replicas per survivor: room for group 2's
    (2, 1, 1, "replaced group(s) [1]", signal.SIGSTOP),  # hung: the step times out, the group answers nothing
])
def test_a_lost_group_is_recovered_mid_stream_with_unchanged_outputs(ray_cluster, num_groups, redundant_slots,
                                                                     victim, how, sig):
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    engine = Engine(load_model(DEFAULT_MODEL_DIR), tokenizer)
    params = SamplingParams(max_tokens=32)
    expected = {p: engine.generate([tokenizer.encode(p)], params)[0].token_ids for p in PROMPTS}
    deployment = deploy(ClusterConfig(str(DEFAULT_MODEL_DIR), num_groups=num_groups, redundant_slots=redundant_slots,
                                      world_timeout_s=5))
    log: list[str] = []
    watching = deployment.watch(log=log.append, interval_s=0.2)
    try:
        with StreamingLoad(deployment, tokenizer, PROMPTS, params) as load:
            while len(load.results) < 4:
                time.sleep(0.1)
            os.kill(ray.get(deployment.groups[victim].pid.remote()), sig)
            killed_at = len(load.results)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # recovered, back to its size, and serving on
                stats = ray.get(deployment.router.stats.remote())
                healed = stats["recoveries"] == 1 and len(deployment.groups) == num_groups
                if healed and len(load.results) > killed_at + 8:
                    break
                time.sleep(0.2)
        stats = ray.get(deployment.router.stats.remote())
    finally:
        watching.set()
        deployment.shutdown()
    results, failures = load.results, load.failures
    assert stats["recoveries"] == 1 and stats["error"] is None and stats["broken"] is None, (stats, log)
    assert stats["last_recovery_s"] < 30
    assert any(f"recovered from the loss of expert group(s) [{victim}]" in line and how in line for line in log), log
    if how == "survivors took over":
        assert any(line.startswith(f"scaled out to {num_groups}") for line in log), log  # healed
    assert failures == []
    wrong = [(p, ids) for p, ids in results if ids != expected[p]]
    assert wrong == []
    assert len(results) > killed_at + 8
