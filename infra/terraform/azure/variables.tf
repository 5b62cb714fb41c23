variable "subscription_id" {
  description = "Azure subscription of the fleet."
  type        = string
}

variable "location" {
  description = "Azure region of the fleet's pools."
  type        = string
  default     = "eastus"
}

variable "resource_group" {
  description = "Resource group holding only fleet resources (the scope of the autoscaler's role)."
  type        = string
  default     = "fleet"
}

variable "fleet_name" {
  description = "Name prefix and the fleet tag value."
  type        = string
  default     = "fleet"
}

variable "vnet_cidr" {
  description = "Address space of the fleet virtual network."
  type        = string
  default     = "10.44.0.0/16"
}

variable "key_vault_name" {
  description = "Globally unique Key Vault name (3-24 characters); put it in the workers' FLEET_KEY_VAULT."
  type        = string
}

variable "autoscaler_principal_id" {
  description = "Object id of the identity the autoscaler runs as (a managed identity or service principal)."
  type        = string
}

variable "broker_url" {
  description = "Broker URL with credentials (redis://, rediss:// or amqp://); stored in Key Vault as fleet-broker-url."
  type        = string
  sensitive   = true
}
