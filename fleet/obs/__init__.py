"""Observability: Prometheus alert rules, the Grafana dashboard's companions and the Flower launcher."""
