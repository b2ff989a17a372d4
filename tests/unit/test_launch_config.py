"""cluster/launch/*.yaml checked offline: Ray's own schema, plus what moeray relies on inside them."""

import copy
from pathlib import Path

import pytest
import yaml

from moeray.cluster.cli import main
from moeray.cluster.launch_config import GROUP_RESOURCE, check_cluster_config

LAUNCH = Path(__file__).resolve().parents[2] / "cluster" / "launch"
CLUSTER_FILES = sorted(LAUNCH.glob("*.yaml"))


def read(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_cluster_file_passes_rays_schema_and_moerays_checks(path):
    assert check_cluster_config(yaml.safe_load(path.read_text())) == []


def test_the_launch_files_are_the_three_providers():
    assert {read(p.name)["provider"]["type"] for p in CLUSTER_FILES} == {"aws", "local", "fake_multinode"}


def test_aws_workers_are_gpu_types_that_start_at_zero_and_carry_one_group_resource_per_gpu():
    config = read("aws-gpu.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert GROUP_RESOURCE not in head["resources"] and not head["node_config"]["InstanceType"].startswith(("p", "g"))
    workers = {t["node_config"]["InstanceType"]: t for n, t in config["available_node_types"].items()
               if n != config["head_node_type"]}
    assert workers["p5.48xlarge"]["resources"][GROUP_RESOURCE] == 8  # 8 x H100
    assert any(t["resources"][GROUP_RESOURCE] == 1 for t in workers.values())  # a single-GPU type too
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())


def test_aws_nodes_install_moeray_with_its_gpu_extra_from_a_variable_at_the_top():
    text = (LAUNCH / "aws-gpu.yaml").read_text()
    assert text.index("MOERAY_PACKAGE=") < text.index("available_node_types:")
    install = [c for c in read("aws-gpu.yaml")["setup_commands"] if "MOERAY_PACKAGE=" in c]
    assert len(install) == 1 and '"moeray[gpu] @ git+https://' in install[0] and 'pip install' in install[0]
    head_start = " ".join(read("aws-gpu.yaml")["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_local_workers_announce_the_group_resource_and_fake_workers_carry_it():
    assert GROUP_RESOURCE in read("local.yaml")["worker_start_ray_commands"][-1]
    fake = read("fake-multinode.yaml")
    workers = [t for n, t in fake["available_node_types"].items() if n != fake["head_node_type"]]
    assert workers and all(t["resources"][GROUP_RESOURCE] >= 1 and t["min_workers"] == 0 for t in workers)


def mutated(name: str, change) -> list[str]:
    config = copy.deepcopy(read(name))
    change(config)
    return check_cluster_config(config)


def test_a_typod_top_level_key_is_named_with_a_suggestion():
    assert mutated("aws-gpu.yaml", lambda c: c.update(max_worker=4)) == \
        ["max_worker: unknown key (did you mean 'max_workers'?)"]


def test_a_typod_key_inside_node_config_is_named_though_ray_never_looks_there():
    problems = mutated("aws-gpu.yaml", lambda c: c["available_node_types"]["ray.worker.h100x8"]["node_config"]
                       .update(InstanceTyp="p5.48xlarge"))
    assert problems == ["available_node_types.ray.worker.h100x8.node_config.InstanceTyp: not an EC2 RunInstances "
                        "parameter (did you mean 'InstanceType'?)"]


def test_a_typod_provider_key_and_a_typod_node_type_key_are_named():
    assert mutated("aws-gpu.yaml", lambda c: c["provider"].update(availabilty_zone="us-east-1a")) == \
        ["provider.availabilty_zone: not a key Ray's AWS provider reads (did you mean 'availability_zone'?)"]
    assert mutated("fake-multinode.yaml", lambda c: c["available_node_types"]["ray.worker.expert_group"]
                   .update(max_worker=2)) == \
        ["available_node_types.ray.worker.expert_group.max_worker: unknown key (did you mean 'max_workers'?)"]


def test_group_resource_must_be_on_every_worker_type_and_not_on_the_head():
    problems = mutated("aws-gpu.yaml", lambda c: c["available_node_types"]["ray.worker.l40s"]["resources"].clear())
    assert problems == [f"available_node_types.ray.worker.l40s.resources.{GROUP_RESOURCE}: missing; expert groups "
                        "ask for it, so the autoscaler adds only node types that carry it"]
    problems = mutated("fake-multinode.yaml",
                       lambda c: c["available_node_types"]["ray.head.default"]["resources"].update({GROUP_RESOURCE: 1}))
    assert problems and problems[0].startswith(f"available_node_types.ray.head.default.resources.{GROUP_RESOURCE}: "
                                               "the head must not carry it")


def test_the_template_is_not_ready_for_ray_up_until_terraform_fills_it_in():
    problems = check_cluster_config(read("aws-gpu.yaml"), rendered=True)
    assert "available_node_types.ray.worker.h100x8.node_config.SubnetIds: missing" in problems
    assert "available_node_types.ray.worker.h100x8.node_config.Placement.GroupName: missing " \
           "(GPU workers share one cluster placement group)" in problems
    assert "provider.availability_zone: missing (the placement group and subnet live in one zone)" in problems


def test_moeray_cluster_check_exits_2_naming_the_typo(tmp_path, capsys):
    bad = tmp_path / "cluster.yaml"
    bad.write_text((LAUNCH / "aws-gpu.yaml").read_text().replace("idle_timeout_minutes:", "idle_timout_minutes:"))
    assert main(["cluster", "check", str(LAUNCH / "local.yaml"), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert "local.yaml: ok" in out
    assert f"{bad}: idle_timout_minutes: unknown key (did you mean 'idle_timeout_minutes'?)" in err
