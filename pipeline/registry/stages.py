"""A model group's two stage endpoints, `<group>-staging` and `<group>-production`, and the
errors of putting a version on them.

A pipeline execution deploys only to `<group>-staging` (pipeline_endpoint_problem); production is
deployed from an Approved version (pipeline/registry/deploy.py). Standard library only: the deploy
function imports it, and so do the compile stage and the monitor function.
"""
from __future__ import annotations

from pipeline.registry.local import RegistryError

STAGES = {"staging": "staging", "prod": "production"}
VARIANT = "AllTraffic"  # each endpoint's one production variant


class DeployError(RegistryError):
    """A deploy that was refused or failed; the message says what is still served."""


class NoChange(Exception):
    """Nothing to switch: the endpoint serves it already, or another delivery of the same event
    is switching it; or the version stopped being the one to deploy. The message says which."""


def endpoint_name(group: str, stage: str) -> str:
    if stage not in STAGES:
        raise DeployError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    return f"{group}-{STAGES[stage]}"


def pipeline_endpoint_problem(parameters: dict) -> str | None:
    """Why an execution with these parameters may not run, or None: it deploys only to staging.

    Parameters without StagingEndpointName (a DAG with no deploy step) deploy nothing."""
    if "StagingEndpointName" not in parameters:
        return None
    group = str(parameters.get("ModelPackageGroupName", ""))
    name = str(parameters.get("StagingEndpointName", ""))
    expected = endpoint_name(group, "staging")
    if name == expected:
        return None
    return (f"StagingEndpointName={name} refused: a pipeline execution deploys only to its group's "
            f"staging endpoint {expected}; production is deployed from an Approved version "
            f"(invmon deploy --stage prod, or approval in the registry)")
