"""Autoscaling of a stage endpoint's variant, on invocations per instance.

SageMaker scales only an InService endpoint, so the deploy function applies it on the endpoint's
InService event, whoever deployed it (pipeline/registry/deploy.py). The settings come from the
deploy function's environment with the rollout's (pipeline/registry/rollout.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.registry.stages import VARIANT


@dataclass(frozen=True)
class Scaling:
    """Application Auto Scaling of a stage endpoint's variant: target tracking on
    SageMakerVariantInvocationsPerInstance (invocations a minute per instance)."""
    min_capacity: int
    max_capacity: int
    invocations_per_instance: int


# Defaults, as infra/invmon.yaml's parameters: production keeps two instances (a canary needs a
# fleet it can split); 600 invocations a minute is a quarter of the ~43 requests a second the
# local server answered on 2 cores (docs/benchmarks.md): half for headroom, half again because the
# SageMaker serving container was not measured.
CAPACITY = {"staging": (1, 2), "prod": (2, 4)}
INVOCATIONS_PER_INSTANCE = 600
CAPACITY_ENV = {"staging": ("INVMON_MIN_CAPACITY_STAGING", "INVMON_MAX_CAPACITY_STAGING"),
                "prod": ("INVMON_MIN_CAPACITY_PROD", "INVMON_MAX_CAPACITY_PROD")}
MAX_INSTANCES = 20
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALE_IN_COOLDOWN, SCALE_OUT_COOLDOWN = 300, 60  # seconds: out fast, in slowly


def scaling_resource(name: str) -> str:
    """Application Auto Scaling's ResourceId of an endpoint's variant."""
    return f"endpoint/{name}/variant/{VARIANT}"


def scaling_policy_name(name: str) -> str:
    return f"{name}-invocations-per-instance"


def apply_scaling(target, name: str, stage: str) -> str:
    """Register the endpoint's variant with Application Auto Scaling (the stage's minimum and
    maximum) and put its target tracking policy on invocations per instance; both calls set the
    same values when made again. `target` is a SageMakerTarget (its requests, its settings)."""
    endpoint = target.describe(name)
    status = (endpoint or {}).get("EndpointStatus", "absent")
    if status != "InService":
        return f"{name} is {status}: its scaling is applied when it is InService"
    scaling, resource = target.scaling[stage], scaling_resource(name)
    target.call(target.autoscaling.register_scalable_target, ServiceNamespace="sagemaker",
                ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
                MinCapacity=scaling.min_capacity, MaxCapacity=scaling.max_capacity)
    target.call(target.autoscaling.put_scaling_policy, PolicyName=scaling_policy_name(name),
                ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
                PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration={
                    "TargetValue": float(scaling.invocations_per_instance),
                    "PredefinedMetricSpecification": {
                        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "ScaleInCooldown": SCALE_IN_COOLDOWN, "ScaleOutCooldown": SCALE_OUT_COOLDOWN})
    return (f"{name} scales between {scaling.min_capacity} and {scaling.max_capacity} instances at "
            f"{scaling.invocations_per_instance} invocations a minute per instance")


def drop_scaling(target, name: str) -> None:
    """Deregister the variant (its policy goes with it), where it is registered."""
    resource = scaling_resource(name)
    found = target.call(target.autoscaling.describe_scalable_targets, ServiceNamespace="sagemaker",
                        ResourceIds=[resource], ScalableDimension=SCALABLE_DIMENSION)
    if found.get("ScalableTargets"):
        target.call(target.autoscaling.deregister_scalable_target, ServiceNamespace="sagemaker",
                    ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION)
