"""The distributed data plane on a real local Ray cluster with real gloo process groups.

Reference: the in-process engine on the same checkpoint. Greedy tokens must be identical and
each sampled token's logprob close (the experts' matmuls see other row batches on the groups,
so fp32 results may differ in the last bits, never in the tokens).
"""

import threading
import time

import pytest
import torch
from checkpoints import CONFIGS

from moeray.actors.engine import Engine
from moeray.actors.placement import PlacementPlan
from moeray.actors.sequence import SamplingParams
from moeray.cluster.deploy import ClusterConfig, DeploymentError, deploy
from moeray.models import DEFAULT_MODEL_DIR, load_config, load_model

FAMILIES = list(CONFIGS)  # every tiny checkpoint: every family, every feature
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def prompts(n: int = 3, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (length,), generator=gen).tolist() for length in (5, 19, 1, 33, 8, 2, 27, 12)[:n]]  # ids < 200 fit every test vocab


def local_run(path, prompt_list, params=GREEDY) -> list[tuple[list[int], list[float]]]:
    engine = Engine(load_model(path))
    return [(c.token_ids, c.logprobs) for c in engine.generate(prompt_list, params)]


def local_tokens(path, prompt_list, params=GREEDY) -> list[list[int]]:
    return [tokens for tokens, _ in local_run(path, prompt_list, params)]


def cluster_run(deployment, prompt, params=GREEDY) -> tuple[list[int], list[float]]:
    items = list(deployment.generate(prompt, params))
    return [t for item in items for t in item["token_ids"]], [lp for item in items for lp in item["logprobs"]]


def cluster_tokens(deployment, prompt, params=GREEDY) -> list[int]:
    return cluster_run(deployment, prompt, params)[0]


def uneven_plan(path, num_groups: int, seed: int) -> PlacementPlan:
    """A random valid plan: experts shuffled over groups of different sizes, plus one replica."""
    config, _ = load_config(path)
    layers, experts = len(config.moe_layer_ids), config.num_experts
    gen = torch.Generator().manual_seed(seed)
    slots = experts  # room for everything in one group
    p2l = torch.full((layers, num_groups, slots), -1, dtype=torch.long)
    for layer in range(layers):
        order = torch.randperm(experts, generator=gen).tolist()
        sizes = [1] * num_groups  # every group gets at least one expert; the rest go to group 0
        sizes[0] += experts - num_groups
        start = 0
        for g, size in enumerate(sizes):
            p2l[layer, g, :size] = torch.tensor(order[start:start + size])
            start += size
        hot = order[0]  # in group 0; replicate it into the last group
        p2l[layer, num_groups - 1, sizes[-1]] = hot
    return PlacementPlan(p2l, experts)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_local_engine_for_any_placement(ray_cluster, make_checkpoint, family):
    path = make_checkpoint(family)
    prompt_list = prompts(3)
    expected = local_run(path, prompt_list)
    placements = [ClusterConfig(str(path), num_groups=1),
                  ClusterConfig(str(path), num_groups=2, redundant_slots=1),
                  ClusterConfig(str(path), num_groups=3, plan=uneven_plan(path, 3, seed=len(family)))]
    for config in placements:
        deployment = deploy(config)
        try:
            results = {}
            threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(i, cluster_run(deployment, p)))
                       for i, p in enumerate(prompt_list)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            for i, (tokens, logprobs) in enumerate(expected):
                assert results[i][0] == tokens, f"G={config.num_groups} prompt {i}"
                # log p of each chosen token: the logits agree, not only their argmax
                torch.testing.assert_close(torch.tensor(results[i][1]), torch.tensor(logprobs), atol=1e-4, rtol=0)
            groups = deployment.stats()["groups"]
            assert all(sum(map(sum, g["tokens_per_slot"])) > 0 for g in groups), "every group must compute"
        finally:
            deployment.shutdown()


def test_eight_requests_arriving_at_different_times(ray_cluster):
    # The trained built-in model, not a random one: arrival times change which rows share an
    # expert matmul, and fp32 matmuls on CPU round differently for fewer than 4 rows. The
    # scaled-up random checkpoints are chaotic enough to turn that last bit into another
    # routing decision; a trained model's margins are not (see the note in the README).
    path = DEFAULT_MODEL_DIR
    prompt_list = prompts(8, seed=1)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [local_tokens(path, [p], params)[0] for p in prompt_list]  # each alone
    deployment = deploy(ClusterConfig(str(path), num_groups=2, redundant_slots=1))
    try:
        results = {}

        def run(i):
            time.sleep(0.15 * i)
            results[i] = cluster_tokens(deployment, prompt_list[i], params)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[i] for i in range(8)] == expected
    finally:
        deployment.shutdown()


def shifted_plans(path, num_groups: int, count: int) -> list[PlacementPlan]:
    """Plans v1..v`count`: experts rotate between groups and replicas come and go."""
    config, _ = load_config(path)
    layers, experts = len(config.moe_layer_ids), config.num_experts
    plans = []
    for v in range(1, count + 1):
        base = PlacementPlan.default(layers, experts, num_groups, redundant_slots=1)
        p2l = base.physical_to_logical.clone()
        p2l = torch.roll(p2l, shifts=v, dims=1)  # every expert moves to another group
        if v % 2:
            p2l[:, :, -1] = -1  # drop the replicas on odd versions
        plans.append(PlacementPlan(p2l, experts, version=v))
    return plans


def test_plan_changes_every_few_steps_keep_tokens(ray_cluster, make_checkpoint):
    path = make_checkpoint("mixtral_swa")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompt = prompts(1, seed=2)[0]
    expected = local_tokens(path, [prompt], params)[0]
    plan0 = PlacementPlan.default(2, 6, 3, redundant_slots=1)
    deployment = deploy(ClusterConfig(str(path), num_groups=3, plan=plan0))
    try:
        tokens, plans, due = [], shifted_plans(path, 3, 4), 8
        for item in deployment.generate(prompt, params):
            tokens += item["token_ids"]
            if len(tokens) >= due and plans:  # a new plan every 8 tokens, once the last one has staged
                try:
                    deployment.set_plan(plans[0])
                except RuntimeError as err:  # staging takes longer than 8 steps on a busy machine
                    assert "is still staging" in str(err)
                    continue
                plans.pop(0)
                due = len(tokens) + 8
        assert tokens == expected
        assert deployment.plan().version >= 3, "plans must actually have been activated mid-generation"
        stats = deployment.stats()
        assert {g["plan_version"] for g in stats["groups"]} == {stats["router"]["plan_version"]}
    finally:
        deployment.shutdown()


def test_group_that_cannot_load_its_weights_fails_the_deployment(ray_cluster, make_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    src = make_checkpoint("mixtral_swa")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    start = time.monotonic()
    lines = []
    with pytest.raises(DeploymentError, match=r"expert group 1 failed to start: .*experts\.5\.w2\.weight"):
        deploy(ClusterConfig(str(broken), num_groups=2, start_timeout_s=120), log=lines.append)
    assert time.monotonic() - start < 120
    assert lines[0] == "loading weights: router, expert group 0, expert group 1"
    assert all(line.startswith("loading weights: router") and "expert group 1" in line for line in lines)


def test_more_memory_than_the_cluster_has_is_named(ray_cluster, tmp_path):
    import json

    config = {"architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 8192,
              "intermediate_size": 65536, "num_hidden_layers": 64, "num_attention_heads": 64,
              "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
              "max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeploymentError, match="resource 'memory'"):
        deploy(ClusterConfig(str(tmp_path), num_groups=2))


def test_plan_that_misses_an_expert_is_rejected(ray_cluster, make_checkpoint):
    from moeray.actors.placement import PlanError

    path = make_checkpoint("mixtral_swa")
    with pytest.raises(PlanError, match="logical expert 5 has no replica"):
        bad = torch.tensor([[[0, 1, 2], [3, 4, -1]]] * 2)
        deploy(ClusterConfig(str(path), num_groups=2, plan=PlacementPlan(bad, 6)))


def test_world_reforms_mid_generation_without_changing_tokens(ray_cluster, make_checkpoint):
    path = make_checkpoint("olmoe_clip")
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = prompts(1, seed=3)[0]
    expected = local_tokens(path, [prompt], params)[0]
    deployment = deploy(ClusterConfig(str(path), num_groups=2, redundant_slots=1))
    try:
        tokens = []
        for item in deployment.generate(prompt, params):
            tokens += item["token_ids"]
            if len(tokens) in (5, 15):
                deployment.reform()
        assert tokens == expected
        assert deployment.spec.generation == 2
        assert all(g["serving"] for g in deployment.stats()["groups"])
    finally:
        deployment.shutdown()


def test_bfloat16_cluster_matches_bfloat16_local_engine(ray_cluster):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompt_list = prompts(3, seed=4)
    engine = Engine(load_model(DEFAULT_MODEL_DIR, torch.bfloat16))
    expected = [c.token_ids for c in engine.generate(prompt_list, params)]
    deployment = deploy(ClusterConfig(str(DEFAULT_MODEL_DIR), num_groups=2, redundant_slots=1, dtype="bfloat16"))
    try:
        assert [cluster_tokens(deployment, p, params) for p in prompt_list] == expected
    finally:
        deployment.shutdown()
