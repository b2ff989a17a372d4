"""`group_resources`: expert groups ask for a resource that an autoscaler's worker nodes carry."""

import pytest
from pydantic import ValidationError

from moeray.cluster.cli import build_parser
from moeray.cluster.deploy import _missing_resources, _requested_resources
from moeray.cluster.serving import ServingSpec, load_spec


def test_requested_resources_map_to_rays_actor_options():
    assert _requested_resources({"moeray_expert_group": 1}) == \
        {"num_cpus": 0, "num_gpus": 0, "resources": {"moeray_expert_group": 1}}
    assert _requested_resources({"GPU": 1, "CPU": 2, "memory": 2**30, "moeray_expert_group": 1}) == \
        {"num_cpus": 2, "num_gpus": 1, "memory": 2**30, "resources": {"moeray_expert_group": 1}}
    assert _requested_resources({"GPU": 1}) == {"num_cpus": 0, "num_gpus": 1}


def test_missing_resources_is_what_the_autoscaler_still_has_to_add():
    assert _missing_resources({"moeray_expert_group": 1}, 3, {"CPU": 4}) == {"moeray_expert_group": 3}
    assert _missing_resources({"moeray_expert_group": 1, "GPU": 1}, 3, {"moeray_expert_group": 1, "GPU": 8}) == \
        {"moeray_expert_group": 2}
    assert _missing_resources({"moeray_expert_group": 1}, 2, {"moeray_expert_group": 2}) == {}


def test_serving_spec_takes_group_resources_from_yaml_and_rejects_non_positive_amounts(tmp_path):
    path = tmp_path / "serving.yaml"
    path.write_text("expert_groups: 4\ngroup_resources: {moeray_expert_group: 1, GPU: 1}\n")
    assert load_spec(path).group_resources == {"moeray_expert_group": 1.0, "GPU": 1.0}
    assert ServingSpec().group_resources == {}
    with pytest.raises(ValidationError, match="group_resources.moeray_expert_group"):
        ServingSpec(group_resources={"moeray_expert_group": 0})


def test_serve_takes_repeatable_group_resource_flags():
    args = build_parser().parse_args(["serve", "--group-resource", "moeray_expert_group=1", "--group-resource", "GPU=0.5"])
    assert args.group_resource == [("moeray_expert_group", 1.0), ("GPU", 0.5)]


@pytest.mark.parametrize("bad", ["moeray_expert_group", "=1", "moeray_expert_group=0", "moeray_expert_group=lots"])
def test_a_bad_group_resource_flag_exits_2_naming_it(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--group-resource", bad])
    assert exit_.value.code == 2
    assert f"{bad!r} must be NAME=AMOUNT with AMOUNT > 0" in capsys.readouterr().err
