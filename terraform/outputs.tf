# `moeray cluster render --tf-output` reads these (from `terraform output -json`) into the
# `ray up` file; keep their names in step with cluster/render.py's REQUIRED_OUTPUTS.

output "cluster_name" {
  description = "Ray cluster_name; the head may manage only instances tagged ray-cluster-name=<this>."
  value       = var.name
}

output "region" {
  description = "AWS region of everything here."
  value       = data.aws_region.current.name
}

output "availability_zone" {
  description = "Zone of the subnet (and so of every node and the placement group)."
  value       = aws_subnet.this.availability_zone
}

output "image_id" {
  description = "AMI for every node."
  value       = local.image_id
}

output "vpc_id" {
  description = "The cluster's VPC."
  value       = aws_vpc.this.id
}

output "subnet_id" {
  description = "Subnet every node launches into (node_config.SubnetIds)."
  value       = aws_subnet.this.id
}

output "security_group_id" {
  description = "Security group of every node (node_config.SecurityGroupIds)."
  value       = aws_security_group.cluster.id
}

output "head_instance_profile_arn" {
  description = "Instance profile of the head (node_config.IamInstanceProfile.Arn)."
  value       = aws_iam_instance_profile.head.arn
}

output "worker_instance_profile_arn" {
  description = "Instance profile of the workers (node_config.IamInstanceProfile.Arn)."
  value       = aws_iam_instance_profile.worker.arn
}

output "placement_group_name" {
  description = "Cluster placement group of the GPU workers (node_config.Placement.GroupName)."
  value       = aws_placement_group.gpu.name
}

output "checkpoint_bucket" {
  description = "Name of the checkpoint bucket; null unless checkpoint_bucket = true."
  value       = one(aws_s3_bucket.checkpoints[*].bucket)
}
