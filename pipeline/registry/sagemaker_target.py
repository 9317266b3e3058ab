"""The SageMaker deploy back-end: real-time endpoints, a Model and an EndpointConfig per version
and artifact, switched blue/green.

Standard library and boto3 only: the deploy function (infra/) runs it, and the Lambda runtime has
boto3, not the SageMaker SDK. What it does around the switch has its own module: the rollout
(rollout.py), autoscaling (scaling.py), data capture (capture.py), the clean-up (cleanup.py), the
artifact's check (artifacts.py) and the labels it puts on what it makes (labels.py).
"""
from __future__ import annotations

import re
import time

from pipeline.digests import sha256_of
from pipeline.registry import cleanup, scaling
from pipeline.registry.artifacts import recorded_digest, verify_artifact
from pipeline.registry.capture import CAPTURE_PERCENT, capture_settings, capture_uri
from pipeline.registry.cleanup import Pruned
from pipeline.registry.labels import DIGEST_ENV, FLAG_TAG, PACKAGE_ARN, PACKAGE_ENV, PACKAGE_TAG, cost_tags
from pipeline.registry.local import DIGEST_PROPERTY, Endpoint, ModelVersion
from pipeline.registry.rollout import (STAGING_ROLLOUT, Rollout, alarm_names, deployment_config,
                                       rollout_report, rollout_settings)
from pipeline.registry.scaling import Scaling
from pipeline.registry.stages import STAGES, VARIANT, DeployError, NoChange, endpoint_name
from pipeline.sagemaker import clients

# Verified artifacts, by group, version and SHA-256, in the bucket of the registered one: only the
# deploy function (and a reviewer deploying by hand) may write here (infra/invmon.yaml).
REGISTRY_PREFIX = "registry"
ALREADY_EXISTS = ("already exist", "Cannot create already existing")
IN_PROGRESS = ("in-progress", "in progress", "is being updated", "Cannot update")


def _split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise DeployError(f"model artifact {uri!r} is not an s3://bucket/key URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


class SageMakerTarget:
    """SageMaker real-time endpoints: a Model + EndpointConfig per version and artifact (named by
    both, so a repeated deploy reuses them), then CreateEndpoint, or UpdateEndpoint with a
    blue/green DeploymentConfig that rolls back by itself when one of the endpoint's alarms fires
    while the new fleet bakes."""

    smoke_gate = True  # an approval in the console has passed no gate: production's deploy is it

    def __init__(self, sm, role_arn: str, instance_type: str = "ml.m5.large",
                 alarms: dict[str, list[str]] | None = None, clock=time.time, s3=None,
                 capture_percent: dict[str, int] | None = None, rollout: Rollout | None = None,
                 scaling: dict[str, Scaling] | None = None, autoscaling=None):
        self.sm, self.role_arn, self.instance_type = sm, role_arn, instance_type
        self.alarms = alarms or {}
        # What share of requests each stage's endpoint captures (DataCaptureConfig): all of
        # staging's, a sample of production's (infra/invmon.yaml's ProductionCapturePercent).
        self.capture_percent = {**CAPTURE_PERCENT, **(capture_percent or {})}
        defaults = rollout_settings({})
        self.rollout = rollout or defaults[0]  # production's; staging's is STAGING_ROLLOUT
        self.scaling = scaling or defaults[1]
        self.clock = clock
        self._s3, self._autoscaling = s3, autoscaling

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = clients.client("s3", self.sm.meta.region_name)
        return self._s3

    @property
    def autoscaling(self):
        if self._autoscaling is None:
            self._autoscaling = clients.client("application-autoscaling", self.sm.meta.region_name)
        return self._autoscaling

    def call(self, fn, **kwargs):
        """One request to S3, Application Auto Scaling or SageMaker; a failure is a one-line
        DeployError naming the service."""
        service = ("S3" if fn.__self__ is self._s3 else
                   "Application Auto Scaling" if fn.__self__ is self._autoscaling else "SageMaker")
        return clients.call(fn, error=DeployError, service=service, **kwargs)

    def describe(self, name: str) -> dict | None:
        """The endpoint, or None where there is none (any other failure is a DeployError)."""
        try:
            return self.call(self.sm.describe_endpoint, EndpointName=name)
        except DeployError as exc:
            if "Could not find endpoint" in str(exc) or "does not exist" in str(exc):
                return None
            raise

    def _served_by(self, config_name: str) -> tuple[str, int]:
        """(group, version) of the package an endpoint config's model serves; ("?", 0) if none."""
        config = self.call(self.sm.describe_endpoint_config, EndpointConfigName=config_name)
        model = self.call(self.sm.describe_model, ModelName=config["ProductionVariants"][0]["ModelName"])
        container = (model.get("Containers") or [model.get("PrimaryContainer") or {}])[0]
        arn = container.get("ModelPackageName") or (container.get("Environment") or {}).get(PACKAGE_ENV, "")
        found = PACKAGE_ARN.search(arn)
        return (found["group"], int(found["version"])) if found else ("?", 0)

    def current(self, name: str) -> Endpoint | None:
        endpoint = self.describe(name)
        if endpoint is None:
            return None
        group, version = self._served_by(endpoint["EndpointConfigName"])
        pending_config = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        pending = (self._served_by(pending_config)[1]
                   if pending_config and pending_config != endpoint["EndpointConfigName"] else None)
        tags = self.call(self.sm.list_tags, ResourceArn=endpoint["EndpointArn"]).get("Tags", [])
        flag = next((t["Value"] for t in tags if t["Key"] == FLAG_TAG), "")
        changed = endpoint.get("LastModifiedTime")
        return Endpoint(name=name, group=group, version=version,
                        updated_at=changed.isoformat() if hasattr(changed, "isoformat") else str(changed or ""),
                        flag=flag, status=endpoint.get("EndpointStatus", ""), pending=pending)

    def deployment_config(self, name: str, stage: str = "prod") -> dict:
        """UpdateEndpoint's blue/green DeploymentConfig: production's rollout (canary or linear by
        default), staging's all at once; both roll back on the endpoint's alarms."""
        rollout = self.rollout if stage == "prod" else STAGING_ROLLOUT
        return deployment_config(rollout, self.alarms.get(name, alarm_names(name)))

    def rollout_report(self, name: str, stage: str, creating: bool = False) -> str:
        return rollout_report(name, stage, self.rollout, creating)

    # ------------------------------------------------------------------ the artifact

    def _object_sha256(self, bucket: str, key: str) -> tuple[str, str] | None:
        """(SHA-256, ETag) of an object, read whole; None where there is no such object."""
        try:
            found = self.call(self.s3.get_object, Bucket=bucket, Key=key)
        except DeployError as exc:
            if "NoSuchKey" in str(exc):
                return None
            raise
        return sha256_of(found["Body"].iter_chunks(1 << 20)), found.get("ETag", "")

    def registry_copy(self, model: ModelVersion) -> str:
        """The verified artifact under `registry/<group>/<version>/<sha256>/` of its bucket.

        The registered object is read and hashed; a mismatch with the SHA-256 recorded at
        registration is refused with both digests. The copy is made only from the object version
        that was hashed (CopySourceIfMatch). An existing copy is hashed too before it is used."""
        recorded = recorded_digest(model)
        bucket, key = _split_s3(model.artifact_uri)
        copy_key = f"{REGISTRY_PREFIX}/{model.group}/{model.version}/{recorded}/model.tar.gz"
        copy_uri = f"s3://{bucket}/{copy_key}"
        existing = self._object_sha256(bucket, copy_key)
        if existing is not None:
            if existing[0] != recorded:
                raise DeployError(f"refused: the registry's copy of {model.name} ({copy_uri}) has SHA-256 "
                                  f"{existing[0]}, the registry recorded {recorded} (nothing was changed)")
            return copy_uri
        source = self._object_sha256(bucket, key)
        if source is None:
            raise DeployError(f"model artifact {model.artifact_uri} of {model.name} is missing")
        verify_artifact(model, source[0])
        self.call(self.s3.copy_object, Bucket=bucket, Key=copy_key, CopySourceIfMatch=source[1],
                   CopySource={"Bucket": bucket, "Key": key}, MetadataDirective="REPLACE",
                   Metadata={"sha256": recorded, "model-package": model.arn})
        return copy_uri

    def capture_config(self, name: str, stage: str, data_url: str) -> dict:
        """DataCaptureConfig: requests and answers, sampled per stage, under capture/<endpoint>/ of
        the artifact's bucket, where the monitor reads them (scripts/monitor)."""
        bucket, _ = _split_s3(data_url)
        return {**capture_settings(self.capture_percent[stage]), "DestinationS3Uri": capture_uri(bucket, name)}

    def resource_name(self, name: str, model: ModelVersion, image: str, stage: str = "prod") -> str:
        """The Model's and EndpointConfig's name: by endpoint, version, artifact and settings, so
        that every delivery of one deploy builds the same ones (at most 63 characters)."""
        settings = "\0".join((model.properties.get(DIGEST_PROPERTY, ""), image, self.instance_type,
                              self.role_arn, str(self.capture_percent[stage]),
                              str(self.scaling[stage].min_capacity)))
        return f"{name[:38]}-v{model.version}-{sha256_of([settings.encode()])[:10]}"

    # ------------------------------------------------------------------ the switch

    def _create(self, fn, describe, name_key: str, name: str, same, **kwargs) -> bool:
        """Create a named resource; False when it exists already (another delivery made it).

        An existing one is used only if `same(described)` says it is what this deploy would have
        made: the names are predictable, and another role (the pipeline's models are named
        `<pipeline>-*`, which may be `<group>-*`) could make one first pointing elsewhere."""
        for attempt in range(2):
            try:
                found = describe(**{name_key: name})
            except DeployError:
                found = None
            if found is not None:
                if not same(found):
                    raise DeployError(f"refused: {name} exists already and is not what this deploy "
                                      "would make (another artifact, image, role or size); nothing "
                                      "was switched, delete it or look into who made it")
                return False
            if attempt:
                break
            try:
                self.call(fn, **{name_key: name}, **kwargs)
                return True
            except DeployError as exc:
                if not any(text in str(exc) for text in ALREADY_EXISTS):
                    raise  # else another delivery made it meanwhile: check it, as above
        raise DeployError(f"{name} could not be created nor read")

    def _delete(self, model_name: str | None, config_name: str | None) -> None:
        """Remove what this deploy created and did not use (best effort: the names are reused)."""
        for fn, key, value in ((self.sm.delete_endpoint_config, "EndpointConfigName", config_name),
                               (self.sm.delete_model, "ModelName", model_name)):
            if value:
                try:
                    self.call(fn, **{key: value})
                except DeployError:
                    pass

    def deploy(self, name: str, model: ModelVersion, stage: str, recheck=None) -> None:
        if not model.arn:
            raise DeployError(f"{model.name} has no model package ARN")
        if not self.role_arn:
            raise DeployError("a SageMaker deploy needs the model's execution role: pass --role-arn "
                              "or set INVMON_MODEL_ROLE_ARN (the stack's ModelRoleArn output)")
        package = self.call(self.sm.describe_model_package, ModelPackageName=model.arn)
        if stage == "prod" and package.get("ModelApprovalStatus") != "Approved":  # the caller may not be `choose`
            raise DeployError(f"refused: {model.name} is {package.get('ModelApprovalStatus')}; "
                              "production serves only Approved versions (nothing was changed)")
        container = ((package.get("InferenceSpecification") or {}).get("Containers") or [{}])[0]
        if not container.get("Image"):
            raise DeployError(f"{model.name} names no serving image in its InferenceSpecification")
        data_url = self.registry_copy(model)
        resource = self.resource_name(name, model, container["Image"], stage)
        capture = self.capture_config(name, stage, data_url)
        existing = self.describe(name)
        if existing is not None:
            pending = (existing.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
            if existing.get("EndpointStatus") != "InService":
                if resource in (pending, existing.get("EndpointConfigName")):
                    raise NoChange(f"it is switching to {model.name} already ({existing.get('EndpointStatus')})")
                raise DeployError(f"endpoint {name} is {existing.get('EndpointStatus')}; deploy again "
                                  "when it is InService (nothing was changed)")
            if existing.get("EndpointConfigName") == resource:
                self._clear_flag(existing)  # serves it already: a flag on it is what was asked
                return
        tags = [{"Key": PACKAGE_TAG, "Value": model.arn},
                *cost_tags(model.group, STAGES[stage], model.run_id or "unknown")]
        environment = {**(container.get("Environment") or {}), PACKAGE_ENV: model.arn,
                       DIGEST_ENV: model.properties[DIGEST_PROPERTY]}
        def same_model(found: dict) -> bool:
            have = (found.get("Containers") or [found.get("PrimaryContainer") or {}])[0]
            return (have.get("ModelDataUrl"), have.get("Image"), found.get("ExecutionRoleArn")) == \
                (data_url, container["Image"], self.role_arn)

        fleet = self.scaling[stage].min_capacity  # a new endpoint starts at its minimum

        def same_config(found: dict) -> bool:
            variants = found.get("ProductionVariants") or [{}]
            return [(v.get("ModelName"), v.get("InstanceType"), v.get("InitialInstanceCount")) for v in variants] \
                == [(resource, self.instance_type, fleet)] and found.get("DataCaptureConfig") == capture

        made_model = self._create(
            self.sm.create_model, lambda **k: self.call(self.sm.describe_model, **k), "ModelName", resource,
            same_model, ExecutionRoleArn=self.role_arn, Tags=tags,
            # The artifact carries everything model_fn needs: the container needs no network.
            EnableNetworkIsolation=True,
            Containers=[{"Image": container["Image"], "ModelDataUrl": data_url, "Environment": environment}])
        made_config = self._create(
            self.sm.create_endpoint_config, lambda **k: self.call(self.sm.describe_endpoint_config, **k),
            "EndpointConfigName", resource, same_config, Tags=tags, DataCaptureConfig=capture,
            ProductionVariants=[{"VariantName": VARIANT, "ModelName": resource, "InitialInstanceCount": fleet,
                                 "InstanceType": self.instance_type}])
        if recheck and (problem := recheck()):
            self._delete(resource if made_model else None, resource if made_config else None)
            raise NoChange(f"not switched: {problem}")
        self._switch(name, resource, existing, tags, stage)
        if existing is not None:
            self._clear_flag(existing)
        if stage == "prod" and recheck and (problem := recheck()):  # rejected while it switched
            flag = f"switched to {model.name} while it stopped being deployable ({problem})"
            self.flag(name, flag)
            raise DeployError(f"{name} {flag}; it is flagged: run `invmon models reject {model.version}` "
                              "when the update ends to roll it back")

    def _switch(self, name: str, config: str, existing: dict | None, tags: list[dict], stage: str) -> None:
        """Create the endpoint or update it blue/green; a second delivery racing the first finds
        the switch made or under way, which is success (NoChange), never a failed invocation.
        The endpoint's cost tags follow the version it switches to.

        An update keeps the fleet autoscaling grew (RetainAllVariantProperties: the new config's
        count is a new endpoint's start, or a fleet below the stage's minimum) and takes the new
        config's DataCaptureConfig. SageMaker refuses to change the instance type of a scaled
        variant, so then the scaling goes first; the InService event applies it again."""
        try:
            if existing is None:
                self.call(self.sm.create_endpoint, EndpointName=name, EndpointConfigName=config, Tags=tags)
            else:
                if self._instance_type(existing["EndpointConfigName"]) != self.instance_type:
                    self.drop_scaling(name)
                running = (existing.get("ProductionVariants") or [{}])[0].get("DesiredInstanceCount") or 0
                keep_count = running >= self.scaling[stage].min_capacity
                self.call(self.sm.update_endpoint, EndpointName=name, EndpointConfigName=config,
                           DeploymentConfig=self.deployment_config(name, stage), RetainAllVariantProperties=True,
                           ExcludeRetainedVariantProperties=[{"VariantPropertyType": "DataCaptureConfig"}] + (
                               [] if keep_count else [{"VariantPropertyType": "DesiredInstanceCount"}]))
                try:  # bookkeeping: a tag that cannot be written never fails a switch that was made
                    self.call(self.sm.add_tags, ResourceArn=existing["EndpointArn"], Tags=tags)
                except DeployError:
                    pass
        except DeployError as exc:
            if not any(text in str(exc) for text in ALREADY_EXISTS + IN_PROGRESS):
                raise
            now = self.describe(name) or {}
            targets = (now.get("EndpointConfigName"), (now.get("PendingDeploymentSummary") or {}).get("EndpointConfigName"))
            if config in targets:
                raise NoChange(f"another delivery is switching it to {config} already") from None
            raise

    def _clear_flag(self, endpoint: dict) -> None:
        if any(t["Key"] == FLAG_TAG for t in
               self.call(self.sm.list_tags, ResourceArn=endpoint["EndpointArn"]).get("Tags", [])):
            self.call(self.sm.delete_tags, ResourceArn=endpoint["EndpointArn"], TagKeys=[FLAG_TAG])

    def flag(self, name: str, text: str) -> None:
        endpoint = self.describe(name)
        if endpoint is None:
            raise DeployError(f"no endpoint {name}")
        value = re.sub(r"[^\w .:/=+\-@]", " ", text)[:256]  # the characters a tag value may hold
        self.call(self.sm.add_tags, ResourceArn=endpoint["EndpointArn"],
                   Tags=[{"Key": FLAG_TAG, "Value": value}])

    def endpoints(self, group: str) -> list[Endpoint]:
        return [e for e in (self.current(endpoint_name(group, s)) for s in STAGES) if e]

    # ------------------------------------------------------------------ scaling and clean-up

    def _instance_type(self, config_name: str) -> str:
        config = self.call(self.sm.describe_endpoint_config, EndpointConfigName=config_name)
        return (config.get("ProductionVariants") or [{}])[0].get("InstanceType", "")

    def apply_scaling(self, name: str, stage: str) -> str:
        """The endpoint's autoscaling, once it is InService (scaling.apply_scaling)."""
        return scaling.apply_scaling(self, name, stage)

    def drop_scaling(self, name: str) -> None:
        scaling.drop_scaling(self, name)

    def prune(self, name: str, group: str, stage: str, dry_run: bool = False) -> Pruned:
        """Delete this endpoint's older Models and EndpointConfigs (cleanup.prune)."""
        return cleanup.prune(self, name, group, stage, dry_run)
