"""SageMaker: the pipeline definition adapter, executions, preflight. The SDK loads only inside functions."""
