# The moeray AWS module with its defaults:
#   cp terraform.tfvars.example terraform.tfvars   # and edit it
#   terraform init && terraform apply
#   terraform output -json > tf.json               # for `moeray cluster render`

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.30, < 6.0"
    }
  }
}

provider "aws" {
  region = var.region
}

module "moeray" {
  source = "../.."

  name              = var.name
  availability_zone = var.availability_zone
  allowed_cidrs     = var.allowed_cidrs
  checkpoint_bucket = var.checkpoint_bucket
}
