"""fleet workers: chip detection, Celery tasks and handlers."""
