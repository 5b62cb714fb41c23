variable "region" {
  description = "AWS region of the fleet's pools."
  type        = string
  default     = "us-east-1"
}

variable "fleet_name" {
  description = "Value of the fleet tag on every resource; the autoscaler may only launch and terminate instances carrying it."
  type        = string
  default     = "fleet"
}

variable "vpc_cidr" {
  description = "CIDR block of the fleet VPC."
  type        = string
  default     = "10.42.0.0/16"
}

variable "autoscaler_principal_arns" {
  description = "IAM principals (roles or users) allowed to assume the autoscaler role."
  type        = list(string)
}

variable "broker_url" {
  description = "Broker URL with credentials (redis://, rediss:// or amqp://); stored in Secrets Manager as fleet/broker-url."
  type        = string
  sensitive   = true
}
