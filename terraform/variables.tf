variable "name" {
  description = "Cluster name: prefixes every resource, and is the Ray cluster_name (`moeray cluster render` copies it), which the head's IAM policy uses to limit it to this cluster's instances."
  type        = string
  default     = "moeray"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name must be 2-31 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "availability_zone" {
  description = "The one availability zone of the subnet and the placement group, e.g. us-east-1a. Pick one that has the GPU instance types of cluster/launch/aws-gpu.yaml (p5.48xlarge is in few zones)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9][a-z]$", var.availability_zone))
    error_message = "availability_zone must be a zone name such as us-east-1a."
  }
}

variable "allowed_cidrs" {
  description = "IPv4 CIDRs that may reach the head over SSH (22, for `ray up`), HTTP (8000), gRPC (8001) and metrics (8002), e.g. [\"203.0.113.7/32\"]. Nothing else is let in from outside the cluster."
  type        = list(string)

  validation {
    condition     = length(var.allowed_cidrs) > 0 && alltrue([for cidr in var.allowed_cidrs : can(cidrnetmask(cidr))])
    error_message = "allowed_cidrs must be a non-empty list of IPv4 CIDRs such as 203.0.113.7/32."
  }
}

variable "vpc_cidr" {
  description = "Address range of the VPC."
  type        = string
  default     = "10.42.0.0/16"
}

variable "subnet_cidr" {
  description = "Address range of the cluster's subnet (inside vpc_cidr)."
  type        = string
  default     = "10.42.0.0/20"
}

variable "image_id" {
  description = "AMI for every node; null: the newest AWS Deep Learning AMI with PyTorch (Ubuntu 22.04), which brings CUDA, NCCL and EFA."
  type        = string
  default     = null
}

variable "checkpoint_bucket" {
  description = "Create a private, versioned, KMS-encrypted S3 bucket for checkpoints (the head may write it, workers read it)."
  type        = bool
  default     = false
}

variable "checkpoint_noncurrent_days" {
  description = "Days an overwritten or deleted checkpoint object version is kept in the bucket."
  type        = number
  default     = 30
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
