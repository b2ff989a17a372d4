"""`moeray cluster render`: terraform's outputs + a `ray up` template -> a ready `ray up` file.

`terraform output -json` prints `{name: {"value": ..., "type": ..., "sensitive": ...}}`. The module
in `terraform/` (and `terraform/examples/basic`) outputs every id the template needs; rendering
writes them where Ray and EC2 read them:

    provider.region / availability_zone     <- region, availability_zone
    cluster_name                            <- cluster_name (the head's IAM policy only lets it touch
                                               instances tagged ray-cluster-name=<cluster_name>)
    every node type's node_config:
        ImageId, SubnetIds, SecurityGroupIds <- image_id, subnet_id, security_group_id
        IamInstanceProfile.Arn              <- head_instance_profile_arn (head), worker_instance_profile_arn
        Placement.GroupName (workers)       <- placement_group_name

Everything else in the template (instance types, resources, commands) is kept as written.
"""

import copy
import json

REQUIRED_OUTPUTS = ("cluster_name", "region", "availability_zone", "image_id", "subnet_id", "security_group_id",
                    "head_instance_profile_arn", "worker_instance_profile_arn", "placement_group_name")


class RenderError(ValueError):
    """Terraform outputs or a template that cannot make a cluster file; the message names the field."""


def read_tf_outputs(text: str, source: str = "terraform output") -> dict[str, str]:
    """The values of `terraform output -json`, checked for every output rendering needs."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise RenderError(f"{source}: not JSON ({err}); pass what `terraform output -json` prints") from None
    if not isinstance(raw, dict):
        raise RenderError(f"{source}: expected an object of outputs, as `terraform output -json` prints")
    values = {name: out.get("value") if isinstance(out, dict) else None for name, out in raw.items()}
    missing = [name for name in REQUIRED_OUTPUTS if not isinstance(values.get(name), str) or not values[name]]
    if missing:
        raise RenderError(f"{source}: missing terraform output(s) {', '.join(missing)} "
                          "(apply terraform/ or terraform/examples/basic, whose outputs name them)")
    return values


def render_cluster(template: dict, outputs: dict[str, str]) -> dict:
    """A copy of `template` with terraform's ids written in (see the module doc); pure."""
    config = copy.deepcopy(template)
    provider = config.get("provider") or {}
    if provider.get("type") != "aws":
        raise RenderError(f"provider.type: {provider.get('type')!r}; only an aws template takes terraform outputs")
    if not isinstance(config.get("available_node_types"), dict) or config.get("head_node_type") not in \
            config["available_node_types"]:
        raise RenderError("available_node_types / head_node_type: the template must name its node types and its head")
    config["cluster_name"] = outputs["cluster_name"]
    provider.update(region=outputs["region"], availability_zone=outputs["availability_zone"])
    for name, node_type in config["available_node_types"].items():
        is_head = name == config["head_node_type"]
        node_config = node_type.setdefault("node_config", {})
        node_config.update(
            ImageId=outputs["image_id"], SubnetIds=[outputs["subnet_id"]], SecurityGroupIds=[outputs["security_group_id"]],
            IamInstanceProfile={"Arn": outputs["head_instance_profile_arn" if is_head else "worker_instance_profile_arn"]})
        if not is_head:
            node_config["Placement"] = {**(node_config.get("Placement") or {}),
                                        "GroupName": outputs["placement_group_name"]}
    return config
