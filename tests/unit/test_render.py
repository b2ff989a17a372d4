"""`moeray cluster render`: `terraform output -json` + cluster/launch/aws-gpu.yaml -> a ready `ray up` file."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from moeray.cluster.cli import main
from moeray.cluster.launch_config import check_cluster_config
from moeray.cluster.render import REQUIRED_OUTPUTS, RenderError, read_tf_outputs, render_cluster

LAUNCH = Path(__file__).resolve().parents[2] / "cluster" / "launch"
TEMPLATE = LAUNCH / "aws-gpu.yaml"


def tf_output(**values) -> dict:
    """What `terraform output -json` prints for terraform/examples/basic (checkpoint bucket off: null, omitted)."""
    return {name: {"sensitive": False, "type": "string", "value": value} for name, value in values.items()}


SAMPLE = tf_output(
    cluster_name="moeray-prod", region="us-east-2", availability_zone="us-east-2b", image_id="ami-0a1b2c3d4e5f60718",
    vpc_id="vpc-0123456789abcdef0", subnet_id="subnet-0fedcba9876543210", security_group_id="sg-0a0b0c0d0e0f01234",
    head_instance_profile_arn="arn:aws:iam::123456789012:instance-profile/moeray-prod-ray-head",
    worker_instance_profile_arn="arn:aws:iam::123456789012:instance-profile/moeray-prod-ray-worker",
    placement_group_name="moeray-prod-gpu")


def test_render_fills_in_every_id_and_keeps_the_rest_of_the_template():
    template = yaml.safe_load(TEMPLATE.read_text())
    config = render_cluster(template, read_tf_outputs(json.dumps(SAMPLE)))
    assert config["cluster_name"] == "moeray-prod"
    assert config["provider"] == {**template["provider"], "region": "us-east-2", "availability_zone": "us-east-2b"}
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["ImageId"] == "ami-0a1b2c3d4e5f60718"
        assert node_config["SubnetIds"] == ["subnet-0fedcba9876543210"]
        assert node_config["SecurityGroupIds"] == ["sg-0a0b0c0d0e0f01234"]
        role = "head" if name == config["head_node_type"] else "worker"
        assert node_config["IamInstanceProfile"] == {"Arn": f"arn:aws:iam::123456789012:instance-profile/moeray-prod-ray-{role}"}
        assert node_config.get("Placement") == (None if role == "head" else {"GroupName": "moeray-prod-gpu"})
        original = template["available_node_types"][name]
        assert node_type["resources"] == original["resources"]
        assert node_config["InstanceType"] == original["node_config"]["InstanceType"]
    unchanged = ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "max_workers", "auth")
    assert {k: config[k] for k in unchanged} == {k: template[k] for k in unchanged}
    assert check_cluster_config(config, rendered=True) == []
    assert template == yaml.safe_load(TEMPLATE.read_text())  # pure: the template is not touched


def test_moeray_cluster_render_round_trips_a_terraform_output(tmp_path, capsys):
    tf_json, out = tmp_path / "tf.json", tmp_path / "cluster.yaml"
    tf_json.write_text(json.dumps(SAMPLE))
    assert main(["cluster", "render", "--tf-output", str(tf_json), "--template", str(TEMPLATE), "--out", str(out)]) == 0
    assert f"ray up {out}" in capsys.readouterr().out
    written = yaml.safe_load(out.read_text())
    assert written == render_cluster(yaml.safe_load(TEMPLATE.read_text()), read_tf_outputs(json.dumps(SAMPLE)))
    assert out.read_text().startswith("# Written by `moeray cluster render`")
    assert main(["cluster", "check", "--rendered", str(out)]) == 0


def test_a_terraform_output_missing_a_field_is_rejected_by_name(tmp_path, capsys):
    partial = {k: v for k, v in SAMPLE.items() if k != "subnet_id"}
    with pytest.raises(RenderError, match="missing terraform output\\(s\\) subnet_id "):
        read_tf_outputs(json.dumps(partial))
    tf_json = tmp_path / "tf.json"
    tf_json.write_text(json.dumps({**partial, "placement_group_name": {"value": None}}))
    code = main(["cluster", "render", "--tf-output", str(tf_json), "--template", str(TEMPLATE),
                 "--out", str(tmp_path / "cluster.yaml")])
    assert code == 2
    assert f"{tf_json}: missing terraform output(s) subnet_id, placement_group_name" in capsys.readouterr().err
    assert not (tmp_path / "cluster.yaml").exists()


def test_every_required_output_is_checked():
    for name in REQUIRED_OUTPUTS:
        with pytest.raises(RenderError, match=name):
            read_tf_outputs(json.dumps({k: v for k, v in SAMPLE.items() if k != name}))


def test_render_rejects_what_is_not_terraform_json_or_not_an_aws_template():
    with pytest.raises(RenderError, match="not JSON"):
        read_tf_outputs("subnet_id = subnet-0123")
    with pytest.raises(RenderError, match="expected an object of outputs"):
        read_tf_outputs("[]")
    local = yaml.safe_load((LAUNCH / "local.yaml").read_text())
    with pytest.raises(RenderError, match="provider.type: 'local'; only an aws template"):
        render_cluster(local, read_tf_outputs(json.dumps(SAMPLE)))


def test_a_template_with_a_typo_is_rejected_before_anything_is_written(tmp_path, capsys):
    template = tmp_path / "template.yaml"
    config = copy.deepcopy(yaml.safe_load(TEMPLATE.read_text()))
    config["available_node_types"]["ray.worker.l40s"]["node_config"]["Placment"] = {"Tenancy": "default"}
    template.write_text(yaml.safe_dump(config))
    tf_json = tmp_path / "tf.json"
    tf_json.write_text(json.dumps(SAMPLE))
    assert main(["cluster", "render", "--tf-output", str(tf_json), "--template", str(template),
                 "--out", str(tmp_path / "cluster.yaml")]) == 2
    assert "node_config.Placment: not an EC2 RunInstances parameter (did you mean 'Placement'?)" in capsys.readouterr().err
    assert not (tmp_path / "cluster.yaml").exists()
