variable "region" {
  description = "AWS region, e.g. us-east-1."
  type        = string
}

variable "availability_zone" {
  description = "Zone in that region with the GPU instance types you want, e.g. us-east-1a."
  type        = string
}

variable "allowed_cidrs" {
  description = "Your IPv4 CIDRs, e.g. [\"203.0.113.7/32\"]: they may reach SSH, HTTP 8000, gRPC 8001 and metrics 8002."
  type        = list(string)
}

variable "name" {
  description = "Cluster name (and Ray cluster_name)."
  type        = string
  default     = "moeray"
}

variable "checkpoint_bucket" {
  description = "Create the private checkpoint bucket."
  type        = bool
  default     = false
}
