"""terraform/ checked offline: every file parses, the module keeps its contract, and checkov passes.

No provider plugins and no cloud: python-hcl2 reads the files as a reviewer would, and checkov
(its own venv: it pins `packaging<24`, which Ray cannot live with; `.ci/run` makes
`.venv-checkov`) runs its AWS policies over the module as the example root calls it.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

from moeray.cluster.render import REQUIRED_OUTPUTS

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "terraform"
EXAMPLE = MODULE / "examples" / "basic"
OPTIONS = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
CHECKOV_IN_VENV = ROOT / ".venv-checkov" / "bin" / "checkov"


def load(path: Path) -> dict:
    with open(path) as f:
        return hcl2.load(f, serialization_options=OPTIONS)


def named(path: Path, kind: str) -> dict[str, dict]:
    """`variable`/`output`/`module` blocks of one file by name."""
    return {name: body for block in load(path).get(kind, []) for name, body in block.items()}


def resources(kind: str = "resource") -> dict[str, dict]:
    """The module's resources (or data sources) as {"type.name": body}."""
    found = {}
    for block in load(MODULE / "main.tf").get(kind, []):
        for rtype, by_name in block.items():
            found.update({f"{rtype}.{name}": body for name, body in by_name.items()})
    return found


def test_every_tf_file_parses():
    files = sorted(MODULE.rglob("*.tf"))
    assert {f.name for f in files if f.parent == MODULE} == {"main.tf", "variables.tf", "outputs.tf", "versions.tf"}
    assert EXAMPLE / "main.tf" in files
    for path in files:
        assert load(path), path


def test_module_outputs_cover_what_cluster_render_reads_and_the_example_passes_them_on():
    module_outputs = named(MODULE / "outputs.tf", "output")
    assert set(REQUIRED_OUTPUTS) <= set(module_outputs)
    example_outputs = named(EXAMPLE / "outputs.tf", "output")
    assert {name: body["value"] for name, body in example_outputs.items()} == \
        {name: f"${{module.moeray.{name}}}" for name in module_outputs}


def test_the_example_sets_every_module_variable_that_has_no_default():
    required = {name for name, body in named(MODULE / "variables.tf", "variable").items() if "default" not in body}
    assert required == {"availability_zone", "allowed_cidrs"}
    call = named(EXAMPLE / "main.tf", "module")["moeray"]
    assert call["source"] == "../.."
    assert required <= set(call)


def test_outsiders_reach_only_ssh_http_grpc_and_metrics_while_members_reach_everything():
    found = resources()
    ports = load(MODULE / "main.tf")["locals"][0]["client_ports"]
    assert sorted(ports.values()) == [22, 8000, 8001, 8002]
    self_group = "${aws_security_group.cluster.id}"
    for direction in ("ingress", "egress"):
        members = found[f"aws_vpc_security_group_{direction}_rule.members"]
        assert members["referenced_security_group_id"] == self_group and members["ip_protocol"] == "-1"
    ingress = {k: v for k, v in found.items() if k.startswith("aws_vpc_security_group_ingress_rule.")}
    assert set(ingress) == {"aws_vpc_security_group_ingress_rule.members", "aws_vpc_security_group_ingress_rule.clients"}
    clients = ingress["aws_vpc_security_group_ingress_rule.clients"]
    assert "var.allowed_cidrs" in clients["for_each"] and "local.client_ports" in clients["for_each"]
    assert clients["ip_protocol"] == "tcp" and clients["from_port"] == clients["to_port"] == "${each.value.port}"
    assert "0.0.0.0/0" not in json.dumps(ingress)


def test_the_head_may_pass_only_the_worker_role_and_touch_only_its_clusters_instances():
    statements = resources("data")["aws_iam_policy_document.autoscaler"]["statement"]
    actions = [a for s in statements for a in s["actions"]]
    assert not [a for a in actions if a == "*" or a.endswith(":*")]
    pass_role = [s for s in statements if "iam:PassRole" in s["actions"]]
    assert pass_role == [{"sid": "GiveWorkersTheirRole", "actions": ["iam:PassRole"],
                          "resources": ["${aws_iam_role.worker.arn}"]}]
    for statement in statements:
        if {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances", "ec2:DeleteTags"} & set(statement["actions"]):
            assert statement["condition"][0]["variable"] == "aws:ResourceTag/${local.ray_tag}", statement
    policies = resources()
    assert policies["aws_iam_role_policy.autoscaler"]["role"] == "${aws_iam_role.head.id}"
    assert not [k for k, v in policies.items() if k.startswith("aws_iam_role_policy.")
                and v["role"] == "${aws_iam_role.worker.id}" and "autoscaler" in v["policy"]]


def test_the_checkpoint_bucket_is_optional_private_versioned_and_encrypted():
    found = resources()
    bucket_parts = {k: v for k, v in found.items() if k.endswith(".checkpoints") or "_checkpoints" in k}
    assert len(bucket_parts) >= 8
    assert all(v["count"] == "${var.checkpoint_bucket ? 1 : 0}" for v in bucket_parts.values())
    block = found["aws_s3_bucket_public_access_block.checkpoints"]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                          "restrict_public_buckets"))
    assert found["aws_s3_bucket_versioning.checkpoints"]["versioning_configuration"][0]["status"] == "Enabled"
    sse = found["aws_s3_bucket_server_side_encryption_configuration.checkpoints"]["rule"][0]
    assert sse["apply_server_side_encryption_by_default"][0]["sse_algorithm"] == "aws:kms"
    assert found["aws_kms_key.checkpoints"]["enable_key_rotation"] is True
    assert found["aws_placement_group.gpu"]["strategy"] == "cluster"


def test_every_checkov_skip_names_the_check_and_says_why():
    skips = [(path, line.strip()) for path in MODULE.rglob("*.tf") for line in path.read_text().splitlines()
             if "checkov:skip" in line]
    assert skips
    for path, line in skips:
        match = re.fullmatch(r"#checkov:skip=(CKV2?_AWS_\d+):(.{30,})", line)
        assert match, f"{path.relative_to(ROOT)}: {line!r} needs '#checkov:skip=CKV_AWS_N:the reason'"


def test_checkov_passes_on_the_module_as_the_example_uses_it():
    result = subprocess.run([_checkov(), "-d", str(MODULE), "--framework", "terraform", "--skip-download",
                             "--quiet", "--compact", "-o", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert not failed and result.returncode == 0, "\n".join(failed) or result.stderr
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 30, report["summary"]


def _checkov() -> str:
    """checkov from $MOERAY_CHECKOV, the repo's .venv-checkov (made by .ci/run), or PATH; missing is a failure."""
    for candidate in (os.environ.get("MOERAY_CHECKOV"), str(CHECKOV_IN_VENV), shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("checkov not found: run `bash .ci/run` (it installs checkov==3.3.30 in .venv-checkov), "
                "or set MOERAY_CHECKOV to a checkov executable")
