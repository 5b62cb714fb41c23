output "subnetwork" {
  description = "Subnetwork for worker instances."
  value       = google_compute_subnetwork.workers.self_link
}

output "autoscaler_service_account" {
  description = "Service account the autoscaler runs as."
  value       = google_service_account.autoscaler.email
}

output "worker_service_account" {
  description = "Service account attached to worker instances."
  value       = google_service_account.worker.email
}

output "broker_url_secret" {
  description = "Secret Manager secret holding the broker URL."
  value       = google_secret_manager_secret.broker_url.id
}
