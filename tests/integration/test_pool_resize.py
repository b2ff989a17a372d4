"""Growing and shrinking the expert pool while it serves: 2 -> 4 -> 2 groups under streaming load.

Greedy outputs must equal the in-process engine's (the built-in model: batch-invariant enough
for greedy tokens, see README's note on determinism), no request may fail, and the plan in force
must have the new group count with every expert kept.
"""

import pytest
import ray

from moeray.actors.engine import Engine
from moeray.actors.sequence import SamplingParams
from moeray.cluster.deploy import ClusterConfig, DeploymentError, deploy
from moeray.models import DEFAULT_MODEL_DIR, load_model
from moeray.models.tokenizer import Tokenizer
from load import StreamingLoad
from test_autoscaler import hogging_memory

PROMPTS = ["The for statement", "A list comprehension", "def main():", "Exceptions are", "import os",
           "The while loop", "Dictionaries map", "class Point:"]


def test_scale_out_and_in_under_load_keeps_every_request_and_output(ray_cluster):
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    engine = Engine(load_model(DEFAULT_MODEL_DIR), tokenizer)
    params = SamplingParams(max_tokens=24)
    expected = {p: engine.generate([tokenizer.encode(p)], params)[0].token_ids for p in PROMPTS}
    deployment = deploy(ClusterConfig(str(DEFAULT_MODEL_DIR), num_groups=2, redundant_slots=1))
    log: list[str] = []
    try:
        with StreamingLoad(deployment, tokenizer, PROMPTS, params) as load:
            grown = deployment.scale_to(4, log=log.append)
            assert grown.num_groups == 4 and len(deployment.groups) == 4
            assert (grown.physical_to_logical[:, 2:] >= 0).any(2).all()  # each new group serves experts in every layer
            assert deployment.plan().num_groups == 4
            served_by_4 = len(load.results)
            shrunk = deployment.scale_to(2, log=log.append)
            assert shrunk.num_groups == 2 and len(deployment.groups) == 2 and deployment.plan() == shrunk
        stats = ray.get(deployment.router.stats.remote())
        assert stats["error"] is None and stats["running"] == 0
    finally:
        deployment.shutdown()
    results, failures = load.results, load.failures
    assert failures == []
    assert len(results) > served_by_4 > 0
    wrong = [(p, ids) for p, ids in results if ids != expected[p]]
    assert wrong == []
    assert any(line.startswith("scaled out to 4") for line in log) and any(line.startswith("scaled in to 2") for line in log)


def test_scale_bounds_are_named(ray_cluster):
    deployment = deploy(ClusterConfig(str(DEFAULT_MODEL_DIR), num_groups=1))
    try:
        with pytest.raises(ValueError, match="expert_groups=0 must be at least 1"):
            deployment.scale_to(0)
        with pytest.raises(ValueError, match="expert_groups=9 is more than the 8 experts"):
            deployment.scale_to(9)
        assert deployment.scale_to(1).num_groups == 1  # already there: nothing to do
        with hogging_memory(), pytest.raises(DeploymentError, match=r"cannot scale to 2 expert groups: 1 more expert "
                                                                     r"group\(s\) need .* of resource 'memory'"):
            deployment.scale_to(2)  # refused at once, not after start_timeout_s
        assert len(deployment.groups) == 1 and deployment.plan().num_groups == 1
    finally:
        deployment.shutdown()
