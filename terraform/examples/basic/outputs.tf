# The module's outputs at the top level, where `terraform output -json` (and so
# `moeray cluster render --tf-output`) finds them.

output "cluster_name" {
  description = "Ray cluster_name."
  value       = module.moeray.cluster_name
}

output "region" {
  description = "AWS region."
  value       = module.moeray.region
}

output "availability_zone" {
  description = "Zone of every node."
  value       = module.moeray.availability_zone
}

output "image_id" {
  description = "AMI for every node."
  value       = module.moeray.image_id
}

output "vpc_id" {
  description = "The cluster's VPC."
  value       = module.moeray.vpc_id
}

output "subnet_id" {
  description = "Subnet of every node."
  value       = module.moeray.subnet_id
}

output "security_group_id" {
  description = "Security group of every node."
  value       = module.moeray.security_group_id
}

output "head_instance_profile_arn" {
  description = "Instance profile of the head."
  value       = module.moeray.head_instance_profile_arn
}

output "worker_instance_profile_arn" {
  description = "Instance profile of the workers."
  value       = module.moeray.worker_instance_profile_arn
}

output "placement_group_name" {
  description = "Placement group of the GPU workers."
  value       = module.moeray.placement_group_name
}

output "checkpoint_bucket" {
  description = "Checkpoint bucket name, or null."
  value       = module.moeray.checkpoint_bucket
}
