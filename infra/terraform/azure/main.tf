# fleet on Azure: network and identity for the autoscaler and its workers (an example, not a
# product). Azure ABAC conditions cannot test tags on Microsoft.Compute/Network actions, so
# the autoscaler's custom role is scoped to a resource group that holds only fleet resources.
terraform {
  required_version = ">= 1.5"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = ">= 4.0"
    }
  }
}

provider "azurerm" {
  subscription_id = var.subscription_id
  features {}
}

data "azurerm_client_config" "current" {}

locals {
  role = jsondecode(file("${path.module}/../../iam/azure-role.json"))
  tags = { fleet = var.fleet_name }
}

resource "azurerm_resource_group" "fleet" {
  name     = var.resource_group
  location = var.location
  tags     = local.tags
}

# --- network: no inbound; outbound through a NAT gateway ------------------------------------
resource "azurerm_virtual_network" "fleet" {
  name                = var.fleet_name
  resource_group_name = azurerm_resource_group.fleet.name
  location            = azurerm_resource_group.fleet.location
  address_space       = [var.vnet_cidr]
  tags                = local.tags
}

resource "azurerm_subnet" "workers" {
  name                 = "workers"
  resource_group_name  = azurerm_resource_group.fleet.name
  virtual_network_name = azurerm_virtual_network.fleet.name
  address_prefixes     = [cidrsubnet(var.vnet_cidr, 4, 0)]
}

resource "azurerm_network_security_group" "workers" {
  name                = "${var.fleet_name}-workers"
  resource_group_name = azurerm_resource_group.fleet.name
  location            = azurerm_resource_group.fleet.location
  tags                = local.tags

  security_rule {
    name                       = "deny-all-inbound"
    priority                   = 4096
    direction                  = "Inbound"
    access                     = "Deny"
    protocol                   = "*"
    source_port_range          = "*"
    destination_port_range     = "*"
    source_address_prefix      = "*"
    destination_address_prefix = "*"
  }
}

resource "azurerm_subnet_network_security_group_association" "workers" {
  subnet_id                 = azurerm_subnet.workers.id
  network_security_group_id = azurerm_network_security_group.workers.id
}

resource "azurerm_public_ip" "nat" {
  name                = "${var.fleet_name}-nat"
  resource_group_name = azurerm_resource_group.fleet.name
  location            = azurerm_resource_group.fleet.location
  allocation_method   = "Static"
  sku                 = "Standard"
  tags                = local.tags
}

resource "azurerm_nat_gateway" "fleet" {
  name                = var.fleet_name
  resource_group_name = azurerm_resource_group.fleet.name
  location            = azurerm_resource_group.fleet.location
  tags                = local.tags
}

resource "azurerm_nat_gateway_public_ip_association" "fleet" {
  nat_gateway_id       = azurerm_nat_gateway.fleet.id
  public_ip_address_id = azurerm_public_ip.nat.id
}

resource "azurerm_subnet_nat_gateway_association" "workers" {
  subnet_id      = azurerm_subnet.workers.id
  nat_gateway_id = azurerm_nat_gateway.fleet.id
}

# --- worker identity and the broker URL secret -----------------------------------------------
resource "azurerm_user_assigned_identity" "worker" {
  name                = "${var.fleet_name}-worker"
  resource_group_name = azurerm_resource_group.fleet.name
  location            = azurerm_resource_group.fleet.location
  tags                = local.tags
}

resource "azurerm_key_vault" "fleet" {
  name                      = var.key_vault_name
  resource_group_name       = azurerm_resource_group.fleet.name
  location                  = azurerm_resource_group.fleet.location
  tenant_id                 = data.azurerm_client_config.current.tenant_id
  sku_name                  = "standard"
  enable_rbac_authorization = true
  purge_protection_enabled  = false
  tags                      = local.tags
}

# Whoever runs Terraform writes the secret.
resource "azurerm_role_assignment" "deployer_writes_secrets" {
  scope                = azurerm_key_vault.fleet.id
  role_definition_name = "Key Vault Secrets Officer"
  principal_id         = data.azurerm_client_config.current.object_id
}

resource "azurerm_key_vault_secret" "broker_url" {
  name         = "fleet-broker-url"
  value        = var.broker_url # lands in the Terraform state: keep the state encrypted
  key_vault_id = azurerm_key_vault.fleet.id
  depends_on   = [azurerm_role_assignment.deployer_writes_secrets]
}

# Workers read this one secret and nothing else in the vault.
resource "azurerm_role_assignment" "worker_reads_broker_url" {
  scope                = azurerm_key_vault_secret.broker_url.resource_versionless_id
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.worker.principal_id
}

# --- autoscaler role: VMs, NICs and disks in this resource group only ------------------------
resource "azurerm_role_definition" "autoscaler" {
  name              = "${local.role.Name} (${var.resource_group})"
  scope             = azurerm_resource_group.fleet.id
  description       = local.role.Description
  assignable_scopes = [azurerm_resource_group.fleet.id]

  permissions {
    actions          = local.role.Actions
    not_actions      = local.role.NotActions
    data_actions     = local.role.DataActions
    not_data_actions = local.role.NotDataActions
  }
}

resource "azurerm_role_assignment" "autoscaler" {
  scope              = azurerm_resource_group.fleet.id
  role_definition_id = azurerm_role_definition.autoscaler.role_definition_resource_id
  principal_id       = var.autoscaler_principal_id
}
