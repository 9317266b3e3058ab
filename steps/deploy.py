"""Deploy: create or update the staging endpoint with the newly registered model."""
from steps.base import DeployStep, Param

STEP = DeployStep(
    name="Deploy",
    description="Create or update the staging endpoint with the registered model.",
    register_step="Register",
    endpoint_name=Param("StagingEndpointName"),
    instance_type=Param("InferenceInstanceType"),
)
