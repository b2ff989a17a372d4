"""Check a `ray up` cluster YAML offline: Ray's own schema first, then what moeray relies on.

Ray's `prepare_config` + `validate_config` (no cloud credentials needed) catch a typo'd top-level
or node-type key, but they never look inside a node type's `node_config`, which Ray hands to EC2's
RunInstances as it is: a typo there (`InstanceTyp`) or a missing subnet surfaces only as a failed
launch, minutes and dollars later. So for AWS we also check every `node_config` key against
RunInstances' parameters, and that a rendered file (`moeray cluster render`) names the network,
the instance profiles and the placement group that `terraform/` made.

Expert groups find worker nodes by a custom resource, `GROUP_RESOURCE`: `moeray serve
--group-resource moeray_expert_group=1` makes each group ask for one unit, and the autoscaler adds
a worker node that carries it. Every worker node type must carry it, and the head must not (the
groups would land there instead of on GPUs).

    problems = check_cluster_config(config, rendered=True)   # pure: [] when fine
    config = load_cluster_file("cluster.yaml", rendered=True) # raises ClusterConfigError
"""

import copy
import difflib
import logging
from pathlib import Path

import yaml

GROUP_RESOURCE = "moeray_expert_group"  # the custom resource expert groups ask for and worker nodes carry

# EC2 RunInstances request parameters (botocore's model of the EC2 API), plus `SubnetIds`, which
# Ray reads itself (it launches into one of them).
RUN_INSTANCES_KEYS = frozenset({
    "AdditionalInfo", "BlockDeviceMappings", "CapacityReservationSpecification", "ClientToken", "CpuOptions",
    "CreditSpecification", "DisableApiStop", "DisableApiTermination", "DryRun", "EbsOptimized",
    "ElasticGpuSpecification", "ElasticInferenceAccelerators", "EnablePrimaryIpv6", "EnclaveOptions",
    "HibernationOptions", "IamInstanceProfile", "ImageId", "InstanceInitiatedShutdownBehavior",
    "InstanceMarketOptions", "InstanceType", "Ipv6AddressCount", "Ipv6Addresses", "KernelId", "KeyName",
    "LaunchTemplate", "LicenseSpecifications", "MaintenanceOptions", "MaxCount", "MetadataOptions", "MinCount",
    "Monitoring", "NetworkInterfaces", "NetworkPerformanceOptions", "Operator", "Placement",
    "PrivateDnsNameOptions", "PrivateIpAddress", "RamdiskId", "SecondaryInterfaces", "SecurityGroupIds",
    "SecurityGroups", "SubnetId", "SubnetIds", "TagSpecifications", "UserData",
})

# What Ray's AWS provider and autoscaler read from `provider:` (Ray's schema lets anything through).
AWS_PROVIDER_KEYS = frozenset({
    "type", "region", "availability_zone", "cache_stopped_nodes", "use_internal_ips", "security_group", "key_pair",
    "aws_credentials", "cloudwatch", "disable_node_updaters", "disable_launch_config_check",
    "foreground_node_launch",
})


class ClusterConfigError(ValueError):
    """A cluster YAML that Ray or moeray would reject; one `FILE: field.path: message` line per problem."""


def load_cluster_file(path: str | Path, rendered: bool = False) -> dict:
    """The YAML in `path`, checked; `rendered`: it must be ready for `ray up` on AWS (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise ClusterConfigError(f"{path}: no such file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{path}: a cluster config must be a mapping (cluster_name, provider, ...)")
    problems = check_cluster_config(config, rendered=rendered)
    if problems:
        raise ClusterConfigError("\n".join(f"{path}: {p}" for p in problems))
    return config


def check_cluster_config(config: dict, rendered: bool = False) -> list[str]:
    """Every problem as `field.path: message`; [] when Ray's schema and moeray's checks pass."""
    problems = ray_schema_problems(config)
    if problems:
        return problems  # the rest assumes Ray's shape
    provider = config["provider"]["type"]
    if provider == "aws":
        return _aws_problems(config, rendered)
    if provider == "local":
        commands = " ".join(config.get("worker_start_ray_commands", []))
        return [] if GROUP_RESOURCE in commands else [
            f"worker_start_ray_commands: workers must start with --resources carrying {GROUP_RESOURCE!r}"]
    return _group_resource_problems(config)


def ray_schema_problems(config: dict) -> list[str]:
    """Ray's own checks, as `ray up` runs them: defaults filled in, then the JSON schema."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(config.get("provider"), dict) or "type" not in config["provider"]:
        return ["provider.type: missing (aws, local, fake_multinode, ...)"]
    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # "setting max workers ..."
    try:
        # The fake provider's defaults file is not in Ray's wheel; its file is complete as it is.
        prepared = config if config["provider"]["type"] == "fake_multinode" else prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        return _schema_messages(err)
    except (ValueError, RuntimeError, KeyError, NotImplementedError) as err:  # what prepare/validate raise
        return [f"{err}"]  # for bad values (an unknown provider type, a node type without resources, ...)
    except click.ClickException as err:  # Ray's cli_logger.abort, e.g. a local provider without worker_ips
        return [f"provider: {err.format_message()}"]
    return []


def _schema_messages(err) -> list[str]:
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties", {}))
        return [f"{_join(err.absolute_path, key)}: unknown key{_suggest(key, known)}"
                for key in sorted(set(err.instance) - known)]
    return [f"{where}: {err.message}"]


def _aws_problems(config: dict, rendered: bool) -> list[str]:
    provider = config["provider"]
    problems = [f"provider.{key}: not a key Ray's AWS provider reads{_suggest(key, AWS_PROVIDER_KEYS)}"
                for key in sorted(set(provider) - AWS_PROVIDER_KEYS)]
    if not provider.get("region"):
        problems.append("provider.region: missing (e.g. us-east-1)")
    if rendered and not provider.get("availability_zone"):
        problems.append("provider.availability_zone: missing (the placement group and subnet live in one zone)")
    head = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        problems += _node_config_problems(f"available_node_types.{name}.node_config", node_type["node_config"],
                                          is_head=name == head, rendered=rendered)
    return problems + _group_resource_problems(config)


def _node_config_problems(where: str, node_config: dict, is_head: bool, rendered: bool) -> list[str]:
    problems = [f"{where}.{key}: not an EC2 RunInstances parameter{_suggest(key, RUN_INSTANCES_KEYS)}"
                for key in sorted(set(node_config) - RUN_INSTANCES_KEYS)]
    required = ["InstanceType"] + (["ImageId", "SubnetIds", "SecurityGroupIds", "IamInstanceProfile"] if rendered else [])
    problems += [f"{where}.{key}: missing" for key in required if not node_config.get(key)]
    if not rendered:
        return problems
    for key, prefix in (("SubnetIds", "subnet-"), ("SecurityGroupIds", "sg-")):
        ids = node_config.get(key) or []
        if not isinstance(ids, list) or not all(isinstance(i, str) and i.startswith(prefix) for i in ids):
            problems.append(f"{where}.{key}: must be a list of {prefix}... ids, got {ids!r}")
    profile = node_config.get("IamInstanceProfile") or {}
    if not isinstance(profile, dict) or not (profile.get("Arn") or profile.get("Name")):
        problems.append(f"{where}.IamInstanceProfile: must have Arn or Name, got {profile!r}")
    group = (node_config.get("Placement") or {}).get("GroupName")
    if not is_head and not group:
        problems.append(f"{where}.Placement.GroupName: missing (GPU workers share one cluster placement group)")
    return problems


def _group_resource_problems(config: dict) -> list[str]:
    problems = []
    for name, node_type in config["available_node_types"].items():
        amount = node_type.get("resources", {}).get(GROUP_RESOURCE, 0)
        if name == config["head_node_type"] and amount:
            problems.append(f"available_node_types.{name}.resources.{GROUP_RESOURCE}: the head must not carry it "
                            "(expert groups would land there)")
        elif name != config["head_node_type"] and not amount > 0:
            problems.append(f"available_node_types.{name}.resources.{GROUP_RESOURCE}: missing; expert groups ask "
                            "for it, so the autoscaler adds only node types that carry it")
    return problems


def _join(path, key: str) -> str:
    return ".".join([*(str(p) for p in path), key])


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
