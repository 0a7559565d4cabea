"""migrate-job: run Alembic migrations safely from a Kubernetes Job or init container."""

__version__ = "0.1.0"
