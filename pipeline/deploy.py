"""Putting a model version on a stage's endpoint: the rules and the two back-ends.

One module for `invmon deploy`, `invmon models approve/reject`, `invmon endpoints` and the
Lambda deploy function that the approval rule invokes (infra/), so the rules are written once.
Standard library and boto3 only: the Lambda runtime has boto3, not the SageMaker SDK.

Rules:
- Each group has two fixed endpoints, `<group>-staging` and `<group>-production`. A pipeline
  execution deploys only to `<group>-staging` (pipeline_endpoint_problem).
- Production serves only an Approved version; a refused deploy creates or changes nothing.
- Approving deploys to production; if that deploy fails the version stays Approved, the
  failure is reported and production keeps what it served.
- Rejecting what production serves moves production to the newest other Approved version, or,
  if there is none, leaves it as it is and flags it.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

from pipeline.registry import Endpoint, ModelVersion, NotFoundError, RegistryError

STAGES = {"staging": "staging", "prod": "production"}
EVENT_TYPE = "SageMaker Model Package State Change"
VARIANT = "AllTraffic"
# Blue/green: shift all traffic at once after the new fleet is up, then bake for 10 minutes with
# the rollback alarms watched before the old fleet is terminated (SageMaker deployment guardrails).
BAKE_SECONDS = 600
ALARM_SUFFIXES = ("invocation-5xx", "model-latency")


class DeployError(RegistryError):
    """A deploy that was refused or failed; the message says what is still served."""


def endpoint_name(group: str, stage: str) -> str:
    if stage not in STAGES:
        raise DeployError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    return f"{group}-{STAGES[stage]}"


def alarm_names(endpoint: str) -> list[str]:
    """The CloudWatch alarms infra/invmon.yaml creates for an endpoint (blue/green rollback)."""
    return [f"{endpoint}-{suffix}" for suffix in ALARM_SUFFIXES]


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


@dataclass
class Outcome:
    endpoint: str
    version: ModelVersion | None  # what the endpoint serves (or was asked to) afterwards
    previous: int | None = None
    changed: bool = False
    message: str = ""


# --------------------------------------------------------------------------- choosing a version


def choose(registry, group: str, stage: str, version: int | None) -> ModelVersion:
    """The named version, or the newest Approved one; production takes only Approved."""
    if version is None:
        model = registry.latest(group, "Approved")
        if model is None:
            raise DeployError(f"{group} has no Approved version to deploy "
                              f"(approve one: invmon models approve V --group {group})")
        return model
    model = registry.get(group, version)
    if stage == "prod" and model.status != "Approved":
        raise DeployError(f"refused: {group}/{model.version} is {model.status}; production serves "
                          f"only Approved versions (nothing was changed)")
    return model


def deploy(registry, target, group: str, stage: str, version: int | None = None) -> Outcome:
    name = endpoint_name(group, stage)
    model = choose(registry, group, stage, version)
    current = target.current(name)
    previous = current.version if current and current.group == group else None
    if previous == model.version and not (current and current.flag):
        return Outcome(name, model, previous, False, f"{name} already serves {model.name}")
    target.deploy(name, model, stage)
    return Outcome(name, model, previous, True, f"{name} now serves {model.name}"
                   + (f" (was version {previous})" if previous else ""))


def approve(registry, target, group: str, version: int, note: str = "") -> Outcome:
    """Approve, then deploy to production. A failed deploy keeps the approval (DeployError
    names the version still served); a refused approval changes nothing."""
    model = registry.set_status(group, version, "Approved", note)
    try:
        return deploy(registry, target, group, "prod", model.version)
    except RegistryError as exc:
        current = _safe_current(target, endpoint_name(group, "prod"))
        serving = f"version {current.version}" if current else "nothing"
        raise DeployError(f"{model.name} is Approved, but deploying it to production failed: {exc}; "
                          f"production still serves {serving}") from None


def reject(registry, target, group: str, version: int, note: str = "") -> Outcome | None:
    """Reject; if production serves it, roll production back or flag it."""
    model = registry.set_status(group, version, "Rejected", note)
    name = endpoint_name(group, "prod")
    current = _safe_current(target, name)
    if not current or current.group != group or current.version != model.version:
        return None
    fallback = [v for v in registry.list_versions(group)
                if v.status == "Approved" and v.version != model.version]
    if not fallback:
        flag = f"serves Rejected version {model.version}; no other Approved version to roll back to"
        target.flag(name, flag)
        return Outcome(name, model, model.version, False, f"{name} {flag} (left as it is, flagged)")
    newest = fallback[-1]
    try:
        target.deploy(name, newest, "prod")
    except RegistryError as exc:
        flag = f"serves Rejected version {model.version}; rollback to {newest.name} failed"
        try:
            target.flag(name, flag)
        except RegistryError:
            pass  # the error below says the same
        raise DeployError(f"{model.name} is Rejected, but rolling production back to {newest.name} "
                          f"failed: {exc}; production still serves version {model.version} (flagged)") from None
    return Outcome(name, newest, model.version, True,
                   f"{name} rolled back from Rejected version {model.version} to {newest.name}")


def _safe_current(target, name: str) -> Endpoint | None:
    try:
        return target.current(name)
    except RegistryError:
        return None


# --------------------------------------------------------------------------- local back-end


class LocalTarget:
    """Endpoints as records in the SQLite registry (`invmon serve --endpoint` serves them)."""

    def __init__(self, registry):
        self.registry = registry

    def current(self, name: str) -> Endpoint | None:
        try:
            return self.registry.get_endpoint(name)
        except NotFoundError:
            return None

    def deploy(self, name: str, model: ModelVersion, stage: str) -> None:
        if not os.path.isfile(model.artifact_uri):
            raise DeployError(f"model artifact {model.artifact_uri} of {model.name} is missing")
        self.registry.deploy(name, model.group, model.version, require_approved=stage == "prod")

    def flag(self, name: str, text: str) -> None:
        self.registry.flag_endpoint(name, text)

    def endpoints(self, group: str) -> list[Endpoint]:
        names = {endpoint_name(group, s) for s in STAGES}
        return [e for e in self.registry.list_endpoints() if e.name in names]


# --------------------------------------------------------------------------- SageMaker back-end


PACKAGE_ARN = re.compile(r":model-package/(?P<group>[^/]+)/(?P<version>\d+)$")
FLAG_TAG = "invmon:flag"


class SageMakerTarget:
    """SageMaker real-time endpoints: a new Model + EndpointConfig per deploy, then
    CreateEndpoint, or UpdateEndpoint with a blue/green DeploymentConfig that rolls back by
    itself when one of the endpoint's alarms fires while the new fleet bakes."""

    def __init__(self, sm, role_arn: str, instance_type: str = "ml.m5.large",
                 alarms: dict[str, list[str]] | None = None, clock=time.time):
        self.sm, self.role_arn, self.instance_type = sm, role_arn, instance_type
        self.alarms = alarms or {}
        self.clock = clock

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        from pipeline.aws import describe_error

        try:
            return fn(**kwargs)
        except ClientError as exc:
            raise DeployError(f"SageMaker refused {fn.__name__}: {describe_error(exc)}") from None
        except BotoCoreError as exc:
            raise DeployError(f"cannot reach SageMaker: {exc}") from None

    def _describe(self, name: str) -> dict | None:
        """The endpoint, or None where there is none (any other failure is a DeployError)."""
        try:
            return self._call(self.sm.describe_endpoint, EndpointName=name)
        except DeployError as exc:
            if "Could not find endpoint" in str(exc) or "does not exist" in str(exc):
                return None
            raise

    def current(self, name: str) -> Endpoint | None:
        endpoint = self._describe(name)
        if endpoint is None:
            return None
        config = self._call(self.sm.describe_endpoint_config,
                            EndpointConfigName=endpoint["EndpointConfigName"])
        model = self._call(self.sm.describe_model,
                           ModelName=config["ProductionVariants"][0]["ModelName"])
        containers = model.get("Containers") or [model.get("PrimaryContainer") or {}]
        found = PACKAGE_ARN.search(containers[0].get("ModelPackageName", ""))
        tags = self._call(self.sm.list_tags, ResourceArn=endpoint["EndpointArn"]).get("Tags", [])
        flag = next((t["Value"] for t in tags if t["Key"] == FLAG_TAG), "")
        changed = endpoint.get("LastModifiedTime")
        return Endpoint(name=name, group=found["group"] if found else "?",
                        version=int(found["version"]) if found else 0,
                        updated_at=changed.isoformat() if hasattr(changed, "isoformat") else str(changed or ""),
                        flag=flag, status=endpoint.get("EndpointStatus", ""))

    def deployment_config(self, name: str) -> dict:
        alarms = self.alarms.get(name, alarm_names(name))
        return {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
                "TerminationWaitInSeconds": BAKE_SECONDS,
                "MaximumExecutionTimeoutInSeconds": 3600,
            },
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in alarms]},
        }

    def deploy(self, name: str, model: ModelVersion, stage: str) -> None:
        if not model.arn:
            raise DeployError(f"{model.name} has no model package ARN")
        if not self.role_arn:
            raise DeployError("a SageMaker deploy needs the model's execution role: pass --role-arn "
                              "or set INVMON_MODEL_ROLE_ARN (the stack's ModelRoleArn output)")
        if stage == "prod":  # checked again here: the caller may not be `choose`
            status = self._call(self.sm.describe_model_package, ModelPackageName=model.arn)
            if status.get("ModelApprovalStatus") != "Approved":
                raise DeployError(f"refused: {model.name} is {status.get('ModelApprovalStatus')}; "
                                  "production serves only Approved versions (nothing was changed)")
        existing = self._describe(name)
        if existing and existing.get("EndpointStatus") not in ("InService",):
            raise DeployError(f"endpoint {name} is {existing.get('EndpointStatus')}; deploy again "
                              "when it is InService (nothing was changed)")
        # Names stay within 63 characters and are unique per deploy (a config is never reused).
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.clock()))
        resource = f"{name[:38]}-v{model.version}-{stamp}"
        tags = [{"Key": "invmon:model-package", "Value": model.arn}]
        self._call(self.sm.create_model, ModelName=resource, ExecutionRoleArn=self.role_arn,
                   Containers=[{"ModelPackageName": model.arn}], Tags=tags)
        self._call(self.sm.create_endpoint_config, EndpointConfigName=resource, Tags=tags,
                   ProductionVariants=[{"VariantName": VARIANT, "ModelName": resource,
                                        "InitialInstanceCount": 1,
                                        "InstanceType": self.instance_type}])
        if existing is None:
            self._call(self.sm.create_endpoint, EndpointName=name, EndpointConfigName=resource,
                       Tags=[{"Key": "invmon:stage", "Value": stage}])
            return
        self._call(self.sm.update_endpoint, EndpointName=name, EndpointConfigName=resource,
                   DeploymentConfig=self.deployment_config(name))
        if any(t["Key"] == FLAG_TAG for t in
               self._call(self.sm.list_tags, ResourceArn=existing["EndpointArn"]).get("Tags", [])):
            self._call(self.sm.delete_tags, ResourceArn=existing["EndpointArn"], TagKeys=[FLAG_TAG])

    def flag(self, name: str, text: str) -> None:
        endpoint = self._describe(name)
        if endpoint is None:
            raise DeployError(f"no endpoint {name}")
        value = re.sub(r"[^\w .:/=+\-@]", " ", text)[:256]  # the characters a tag value may hold
        self._call(self.sm.add_tags, ResourceArn=endpoint["EndpointArn"],
                   Tags=[{"Key": FLAG_TAG, "Value": value}])

    def endpoints(self, group: str) -> list[Endpoint]:
        return [e for e in (self.current(endpoint_name(group, s)) for s in STAGES) if e]


def sagemaker_target(sm, role_arn: str | None = None, instance_type: str | None = None) -> SageMakerTarget:
    """A SageMakerTarget configured from arguments or the environment (CLI and Lambda)."""
    return SageMakerTarget(sm, role_arn or os.environ.get("INVMON_MODEL_ROLE_ARN", ""),
                           instance_type or os.environ.get("INVMON_INSTANCE_TYPE", "ml.m5.large"))


# --------------------------------------------------------------------------- Lambda


def handler(event: dict, context=None) -> dict:
    """The deploy function: EventBridge's "SageMaker Model Package State Change" for this
    group's change to Approved deploys that version to production. Anything else is ignored
    (the rule already filters; this is the second lock). A failed deploy raises: the invocation
    fails, its error is logged and the function's error alarm fires; the version stays Approved."""
    from pipeline.aws import SageMakerRegistry, client, resolve_region

    group = os.environ["INVMON_MODEL_PACKAGE_GROUP"]
    detail = event.get("detail") or {}
    why = None
    if event.get("detail-type") != EVENT_TYPE or event.get("source") != "aws.sagemaker":
        why = f"not a model package state change ({event.get('detail-type')!r})"
    elif detail.get("ModelPackageGroupName") != group:
        why = f"group {detail.get('ModelPackageGroupName')!r} is not {group!r}"
    elif detail.get("ModelApprovalStatus") != "Approved":
        why = f"status {detail.get('ModelApprovalStatus')!r} is not Approved"
    if why:
        result = {"deployed": False, "ignored": why}
    else:
        sm = client("sagemaker", resolve_region(event.get("region")))
        registry = SageMakerRegistry(sagemaker_client=sm)
        outcome = deploy(registry, sagemaker_target(sm), group, "prod",
                         int(detail["ModelPackageVersion"]))
        result = {"deployed": outcome.changed, "endpoint": outcome.endpoint,
                  "version": outcome.version.version, "message": outcome.message}
    print(json.dumps(result))  # CloudWatch Logs
    return result
