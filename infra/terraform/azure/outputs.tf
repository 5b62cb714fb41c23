output "subnet_id" {
  description = "Subnet for worker VMs (no inbound)."
  value       = azurerm_subnet.workers.id
}

output "worker_identity_id" {
  description = "Resource id of the user-assigned identity to attach to worker VMs."
  value       = azurerm_user_assigned_identity.worker.id
}

output "worker_identity_client_id" {
  description = "Client id of the worker identity: the workers' FLEET_AZURE_CLIENT_ID."
  value       = azurerm_user_assigned_identity.worker.client_id
}

output "key_vault_name" {
  description = "Key Vault holding fleet-broker-url: the workers' FLEET_KEY_VAULT."
  value       = azurerm_key_vault.fleet.name
}

output "autoscaler_role_definition_id" {
  description = "The autoscaler's custom role."
  value       = azurerm_role_definition.autoscaler.role_definition_resource_id
}
