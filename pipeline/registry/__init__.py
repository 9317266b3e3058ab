"""The model registry (local SQLite and SageMaker back-ends) and promotion to endpoints."""
