variable "project" {
  description = "GCP project dedicated to the fleet."
  type        = string
}

variable "region" {
  description = "Region of the fleet's pools."
  type        = string
  default     = "us-central1"
}

variable "fleet_name" {
  description = "Prefix of the network and service accounts; the fleet label value on instances."
  type        = string
  default     = "fleet"
}

variable "subnet_cidr" {
  description = "CIDR range of the workers' subnetwork."
  type        = string
  default     = "10.43.0.0/20"
}

variable "broker_url" {
  description = "Broker URL with credentials (redis://, rediss:// or amqp://); stored in Secret Manager as fleet-broker-url."
  type        = string
  sensitive   = true
}
