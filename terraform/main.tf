# Infrastructure for a moeray Ray cluster on AWS: the network, a security group, IAM for the head
# (the Ray autoscaler launches and stops workers) and the workers, a cluster placement group for
# the GPU nodes, and an optional checkpoint bucket. Ray creates the instances themselves (`ray up`
# on the file that `moeray cluster render` writes from this module's outputs).

data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

locals {
  tags     = merge(var.tags, { "moeray-cluster" = var.name })
  arn_ec2  = "arn:${data.aws_partition.current.partition}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}"
  image_id = var.image_id != null ? var.image_id : data.aws_ami.deep_learning[0].id
  ray_tag  = "ray-cluster-name" # Ray tags every instance it launches with the cluster_name
  client_ports = {
    ssh     = 22   # `ray up`, `ray exec`, `ray attach`
    http    = 8000 # OpenAI-compatible HTTP
    grpc    = 8001 # KServe v2 / Triton gRPC
    metrics = 8002 # Prometheus metrics
  }
}

data "aws_ami" "deep_learning" {
  count       = var.image_id == null ? 1 : 0
  most_recent = true
  owners      = ["amazon"]

  filter {
    name   = "name"
    values = ["Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

# ---- network: one VPC, one public subnet in one zone ----------------------------------------

resource "aws_vpc" "this" {
  #checkov:skip=CKV2_AWS_11:Flow logs bill per GB and the NCCL/EFA traffic between GPU nodes is large; turn them on in the account's network baseline if it wants them.
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = var.name })
}

# The VPC's default security group lets nothing in or out; the cluster uses its own.
resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${var.name}-default-deny" })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = var.name })
}

resource "aws_subnet" "this" {
  #checkov:skip=CKV_AWS_130:`ray up` reaches the head over SSH from the operator's machine, so nodes get public IPs; the security group admits only allowed_cidrs from outside.
  vpc_id                  = aws_vpc.this.id
  cidr_block              = var.subnet_cidr
  availability_zone       = var.availability_zone
  map_public_ip_on_launch = true
  tags                    = merge(local.tags, { Name = var.name })
}

resource "aws_route_table" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = var.name })

  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.this.id
  }
}

resource "aws_route_table_association" "this" {
  subnet_id      = aws_subnet.this.id
  route_table_id = aws_route_table.this.id
}

# ---- security group: members talk freely (Ray, NCCL, EFA); outsiders get four ports ----------

resource "aws_security_group" "cluster" {
  #checkov:skip=CKV2_AWS_5:Ray attaches this group to the instances it launches (SecurityGroupIds in the rendered cluster file), not Terraform.
  name        = "${var.name}-cluster"
  description = "moeray cluster: all traffic between members; SSH, HTTP, gRPC and metrics from allowed CIDRs"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-cluster" })
}

resource "aws_vpc_security_group_ingress_rule" "members" {
  security_group_id            = aws_security_group.cluster.id
  referenced_security_group_id = aws_security_group.cluster.id
  ip_protocol                  = "-1"
  description                  = "All traffic from cluster members (Ray, NCCL; EFA requires all protocols)"
}

resource "aws_vpc_security_group_egress_rule" "members" {
  security_group_id            = aws_security_group.cluster.id
  referenced_security_group_id = aws_security_group.cluster.id
  ip_protocol                  = "-1"
  description                  = "All traffic to cluster members (EFA requires all protocols outbound too)"
}

resource "aws_vpc_security_group_egress_rule" "internet" {
  #checkov:skip=CKV_AWS_382:Nodes install packages (pip, apt) and call the EC2 and S3 APIs; there is no NAT or proxy to narrow egress to.
  security_group_id = aws_security_group.cluster.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "Outbound to package indexes and AWS APIs"
}

resource "aws_vpc_security_group_ingress_rule" "clients" {
  for_each = {
    for pair in setproduct(keys(local.client_ports), var.allowed_cidrs) :
    "${pair[0]} ${pair[1]}" => { port = local.client_ports[pair[0]], cidr = pair[1], what = pair[0] }
  }
  security_group_id = aws_security_group.cluster.id
  cidr_ipv4         = each.value.cidr
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  description       = "${each.value.what} from an allowed CIDR"
}

# ---- IAM: the head runs Ray's autoscaler; workers only read checkpoints -----------------------

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "head" {
  name               = "${var.name}-ray-head"
  description        = "Ray head of moeray cluster ${var.name}: launches, tags, stops and terminates its workers"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = local.tags
}

resource "aws_iam_role" "worker" {
  name               = "${var.name}-ray-worker"
  description        = "Ray workers of moeray cluster ${var.name}"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name}-ray-head"
  role = aws_iam_role.head.name
  tags = local.tags
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.name}-ray-worker"
  role = aws_iam_role.worker.name
  tags = local.tags
}

# What Ray's AWS node provider calls from the head, and no more: describe, launch into this
# cluster's subnet / security group / placement group, and tag, start, stop or terminate only
# instances tagged with this cluster's name.
data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "Describe"
    actions = [
      "ec2:DescribeAvailabilityZones", "ec2:DescribeImages", "ec2:DescribeInstances", "ec2:DescribeInstanceStatus",
      "ec2:DescribeInstanceTypes", "ec2:DescribeKeyPairs", "ec2:DescribePlacementGroups",
      "ec2:DescribeSecurityGroups", "ec2:DescribeSubnets",
    ]
    resources = ["*"] # Describe* calls cannot be limited to resources
  }

  statement {
    sid     = "LaunchIntoTheClusterNetwork"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.arn_ec2}:subnet/${aws_subnet.this.id}",
      "${local.arn_ec2}:security-group/${aws_security_group.cluster.id}",
      "${local.arn_ec2}:placement-group/${aws_placement_group.gpu.name}",
      "${local.arn_ec2}:key-pair/*",
      "${local.arn_ec2}:network-interface/*",
      "${local.arn_ec2}:volume/*",
      "arn:${data.aws_partition.current.partition}:ec2:${data.aws_region.current.name}::image/*",
    ]
  }

  statement {
    sid       = "LaunchOnlyThisClustersInstances"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.arn_ec2}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/${local.ray_tag}"
      values   = [var.name]
    }
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.arn_ec2}:instance/*", "${local.arn_ec2}:volume/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOnlyThisClustersInstances"
    actions   = ["ec2:CreateTags", "ec2:DeleteTags", "ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"]
    resources = ["${local.arn_ec2}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/${local.ray_tag}"
      values   = [var.name]
    }
  }

  statement {
    sid       = "GiveWorkersTheirRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]
  }
}

resource "aws_iam_role_policy" "autoscaler" {
  name   = "ray-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

# ---- placement group: GPU nodes close together, for NCCL and EFA ------------------------------

resource "aws_placement_group" "gpu" {
  name     = "${var.name}-gpu"
  strategy = "cluster"
  tags     = local.tags
}

# ---- optional checkpoint bucket: private, versioned, encrypted with its own rotating key -------

data "aws_iam_policy_document" "checkpoint_key" {
  count = var.checkpoint_bucket ? 1 : 0

  statement {
    sid       = "AccountAdministersTheKeyRolesUseItThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy, "*" is this key
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}

resource "aws_kms_key" "checkpoints" {
  count                   = var.checkpoint_bucket ? 1 : 0
  description             = "moeray ${var.name} checkpoint bucket"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.checkpoint_key[0].json
  tags                    = local.tags
}

resource "aws_s3_bucket" "checkpoints" {
  #checkov:skip=CKV_AWS_18:Access logs need a second bucket per cluster; CloudTrail S3 data events are the account-wide way to audit reads.
  #checkov:skip=CKV_AWS_144:Checkpoints are copies of published weights that can be uploaded again; replicating them doubles storage for no new data.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; moeray reads checkpoints when it loads a model.
  count         = var.checkpoint_bucket ? 1 : 0
  bucket_prefix = "${var.name}-checkpoints-"
  tags          = local.tags
}

resource "aws_s3_bucket_public_access_block" "checkpoints" {
  count                   = var.checkpoint_bucket ? 1 : 0
  bucket                  = aws_s3_bucket.checkpoints[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "checkpoints" {
  count  = var.checkpoint_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs
  }
}

resource "aws_s3_bucket_versioning" "checkpoints" {
  count  = var.checkpoint_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "checkpoints" {
  count  = var.checkpoint_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.checkpoints[0].arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "checkpoints" {
  count  = var.checkpoint_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id

  rule {
    id     = "tidy"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
    noncurrent_version_expiration {
      noncurrent_days = var.checkpoint_noncurrent_days
    }
  }
}

data "aws_iam_policy_document" "checkpoints_tls_only" {
  count = var.checkpoint_bucket ? 1 : 0

  statement {
    sid       = "DenyPlainHTTP"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.checkpoints[0].arn, "${aws_s3_bucket.checkpoints[0].arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "checkpoints" {
  count  = var.checkpoint_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  policy = data.aws_iam_policy_document.checkpoints_tls_only[0].json
}

data "aws_iam_policy_document" "checkpoints_read" {
  count = var.checkpoint_bucket ? 1 : 0

  statement {
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.checkpoints[0].arn]
  }
  statement {
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.checkpoints[0].arn}/*"]
  }
  statement {
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.checkpoints[0].arn]
  }
}

data "aws_iam_policy_document" "checkpoints_write" {
  count                   = var.checkpoint_bucket ? 1 : 0
  source_policy_documents = [data.aws_iam_policy_document.checkpoints_read[0].json]

  statement {
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.checkpoints[0].arn}/*"]
  }
  statement {
    actions   = ["kms:GenerateDataKey"]
    resources = [aws_kms_key.checkpoints[0].arn]
  }
}

resource "aws_iam_role_policy" "head_checkpoints" {
  count  = var.checkpoint_bucket ? 1 : 0
  name   = "checkpoints-read-write"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.checkpoints_write[0].json
}

resource "aws_iam_role_policy" "worker_checkpoints" {
  count  = var.checkpoint_bucket ? 1 : 0
  name   = "checkpoints-read"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.checkpoints_read[0].json
}
