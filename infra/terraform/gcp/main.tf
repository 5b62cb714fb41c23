# fleet on GCP: network and identity for the autoscaler and its workers (an example, not a
# product). Give the fleet its own project: GCE IAM conditions cannot scope instance creation
# by label, so the project is the boundary of the autoscaler's custom role.
terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.0"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

locals {
  autoscaler_role = yamldecode(file("${path.module}/../../iam/gcp-role.yaml"))
  act_as_role     = yamldecode(file("${path.module}/../../iam/gcp-actas-role.yaml"))
  autoscaler      = "serviceAccount:${google_service_account.autoscaler.email}"
}

resource "google_project_service" "apis" {
  for_each           = toset(["compute.googleapis.com", "secretmanager.googleapis.com", "cloudbilling.googleapis.com"])
  service            = each.value
  disable_on_destroy = false
}

# --- network: a custom VPC has no ingress allowed until a firewall rule says so -----------
resource "google_compute_network" "fleet" {
  name                    = var.fleet_name
  auto_create_subnetworks = false
  depends_on              = [google_project_service.apis]
}

resource "google_compute_subnetwork" "workers" {
  name                     = "${var.fleet_name}-workers"
  network                  = google_compute_network.fleet.id
  region                   = var.region
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true
}

# --- identities ------------------------------------------------------------------------------
resource "google_service_account" "autoscaler" {
  account_id   = "${var.fleet_name}-autoscaler"
  display_name = "fleet autoscaler"
}

resource "google_service_account" "worker" {
  account_id   = "${var.fleet_name}-worker"
  display_name = "fleet worker (reads the broker URL secret only)"
}

resource "google_project_iam_custom_role" "autoscaler" {
  role_id     = "fleetAutoscaler"
  title       = local.autoscaler_role.title
  description = local.autoscaler_role.description
  stage       = local.autoscaler_role.stage
  permissions = local.autoscaler_role.includedPermissions
}

resource "google_project_iam_member" "autoscaler" {
  project = var.project
  role    = google_project_iam_custom_role.autoscaler.id
  member  = local.autoscaler
}

# actAs on the worker service account only, not on every account in the project.
resource "google_project_iam_custom_role" "act_as" {
  role_id     = "fleetWorkerActAs"
  title       = local.act_as_role.title
  description = local.act_as_role.description
  stage       = local.act_as_role.stage
  permissions = local.act_as_role.includedPermissions
}

resource "google_service_account_iam_member" "autoscaler_acts_as_worker" {
  service_account_id = google_service_account.worker.name
  role               = google_project_iam_custom_role.act_as.id
  member             = local.autoscaler
}

# --- the broker URL, read by workers at boot ------------------------------------------------
resource "google_secret_manager_secret" "broker_url" {
  secret_id = "fleet-broker-url"
  replication {
    auto {}
  }
  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "broker_url" {
  secret      = google_secret_manager_secret.broker_url.id
  secret_data = var.broker_url # lands in the Terraform state: keep the state encrypted
}

resource "google_secret_manager_secret_iam_member" "worker_reads_broker_url" {
  secret_id = google_secret_manager_secret.broker_url.id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.worker.email}"
}
