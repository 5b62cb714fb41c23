# fleet on AWS: network and identity for the autoscaler and its workers (an example, not a
# product). Workers need no inbound access: they reach out to the broker and the package index.
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = { fleet = var.fleet_name }
  }
}

data "aws_caller_identity" "current" {}
data "aws_availability_zones" "available" { state = "available" }

locals {
  account_id       = data.aws_caller_identity.current.account_id
  worker_role_name = "${var.fleet_name}-worker"
}

# --- network: one public subnet, no inbound rules ----------------------------------------
resource "aws_vpc" "fleet" {
  cidr_block           = var.vpc_cidr
  enable_dns_hostnames = true
}

resource "aws_internet_gateway" "fleet" {
  vpc_id = aws_vpc.fleet.id
}

resource "aws_subnet" "workers" {
  vpc_id                  = aws_vpc.fleet.id
  cidr_block              = cidrsubnet(var.vpc_cidr, 4, 0)
  availability_zone       = data.aws_availability_zones.available.names[0]
  map_public_ip_on_launch = true # outbound only; use a NAT gateway for private workers
}

resource "aws_route_table" "workers" {
  vpc_id = aws_vpc.fleet.id
  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.fleet.id
  }
}

resource "aws_route_table_association" "workers" {
  subnet_id      = aws_subnet.workers.id
  route_table_id = aws_route_table.workers.id
}

resource "aws_security_group" "workers" {
  name        = "${var.fleet_name}-workers"
  description = "fleet workers: no inbound, all outbound"
  vpc_id      = aws_vpc.fleet.id

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# --- the broker URL, read by workers at boot ------------------------------------------------
resource "aws_secretsmanager_secret" "broker_url" {
  name = "fleet/broker-url"
}

resource "aws_secretsmanager_secret_version" "broker_url" {
  secret_id     = aws_secretsmanager_secret.broker_url.id
  secret_string = var.broker_url # lands in the Terraform state: keep the state encrypted
}

# --- worker identity: reads the broker URL secret and nothing else ---------------------------
data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "worker" {
  name               = local.worker_role_name
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "worker" {
  name = "read-broker-url"
  role = aws_iam_role.worker.id
  policy = templatefile("${path.module}/../../iam/aws-worker-policy.json", {
    account_id = local.account_id
  })
}

resource "aws_iam_instance_profile" "worker" {
  name = local.worker_role_name
  role = aws_iam_role.worker.name
}

# --- autoscaler identity: launch, list and terminate fleet-tagged instances ------------------
data "aws_iam_policy_document" "autoscaler_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "AWS"
      identifiers = var.autoscaler_principal_arns
    }
  }
}

resource "aws_iam_role" "autoscaler" {
  name               = "${var.fleet_name}-autoscaler"
  assume_role_policy = data.aws_iam_policy_document.autoscaler_assume.json
}

resource "aws_iam_role_policy" "autoscaler" {
  name = "fleet-autoscaler"
  role = aws_iam_role.autoscaler.id
  policy = templatefile("${path.module}/../../iam/aws-policy.json", {
    account_id       = local.account_id
    fleet_name       = var.fleet_name
    worker_role_name = aws_iam_role.worker.name
  })
}
