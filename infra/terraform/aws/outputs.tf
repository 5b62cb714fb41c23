output "subnet_id" {
  description = "Subnet for worker instances (tagged fleet)."
  value       = aws_subnet.workers.id
}

output "security_group_id" {
  description = "Security group for worker instances: no inbound."
  value       = aws_security_group.workers.id
}

output "worker_instance_profile" {
  description = "Instance profile to launch workers with (IamInstanceProfile)."
  value       = aws_iam_instance_profile.worker.name
}

output "autoscaler_role_arn" {
  description = "Role the autoscaler assumes."
  value       = aws_iam_role.autoscaler.arn
}

output "broker_url_secret_arn" {
  description = "Secrets Manager secret holding the broker URL."
  value       = aws_secretsmanager_secret.broker_url.arn
}
