"""The SageMaker Model Registry back-end: the LocalRegistry's methods over model packages."""
from __future__ import annotations

import json
from datetime import datetime, timezone

from pipeline.registry.local import STATUSES, ModelVersion, NotFoundError, RegistryError
from pipeline.sagemaker import clients
from pipeline.sagemaker.clients import AwsError, describe_error, resolve_region


def _iso(value) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    return str(value or "")


class SageMakerRegistry:
    """The SageMaker Model Registry with the LocalRegistry's methods and ModelVersion records.

    A model package group is a group; its versioned model packages are the versions. Metrics
    are the evaluation.json the Register step attached (ModelMetrics.ModelQuality.Statistics).
    Errors are RegistryError/NotFoundError, as with the local back-end.
    """

    def __init__(self, region: str | None = None, sagemaker_client=None, s3_client=None):
        if sagemaker_client is None:
            try:
                region = resolve_region(region)
            except AwsError as exc:
                raise RegistryError(str(exc)) from None
        self.sm = sagemaker_client or clients.client("sagemaker", region)
        self._s3 = s3_client
        self._region = region

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = clients.client("s3", self._region or self.sm.meta.region_name)
        return self._s3

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            message = describe_error(exc)
            if message.startswith("ResourceNotFound") or "does not exist" in message:
                raise NotFoundError(f"SageMaker Model Registry: {message}") from None
            raise RegistryError(f"SageMaker Model Registry: {message}") from None
        except BotoCoreError as exc:
            raise RegistryError(f"SageMaker Model Registry: {exc}") from None

    def groups(self) -> list[str]:
        names, token = [], None
        while True:
            kwargs = {"NextToken": token} if token else {}
            page = self._call(self.sm.list_model_package_groups, **kwargs)
            names += [g["ModelPackageGroupName"] for g in page.get("ModelPackageGroupSummaryList", [])]
            token = page.get("NextToken")
            if not token:
                return sorted(names)

    def _summaries(self, group: str, status: str | None = None) -> list[dict]:
        found, token = [], None
        while True:
            kwargs = {"ModelPackageGroupName": group, "ModelPackageType": "Versioned"}
            if status:
                kwargs["ModelApprovalStatus"] = status
            if token:
                kwargs["NextToken"] = token
            page = self._call(self.sm.list_model_packages, **kwargs)
            found += page.get("ModelPackageSummaryList", [])
            token = page.get("NextToken")
            if not token:
                return sorted(found, key=lambda s: s.get("ModelPackageVersion", 0))

    def _metrics(self, package: dict) -> dict:
        uri = (((package.get("ModelMetrics") or {}).get("ModelQuality") or {})
               .get("Statistics") or {}).get("S3Uri")
        if not uri or not uri.startswith("s3://"):
            return {}
        bucket, _, key = uri[5:].partition("/")
        try:
            return json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as exc:  # the version still lists; say why its metrics are missing
            return {"unavailable": f"{uri}: {describe_error(exc)}"}

    def _version(self, arn: str) -> ModelVersion:
        p = self._call(self.sm.describe_model_package, ModelPackageName=arn)
        containers = (p.get("InferenceSpecification") or {}).get("Containers") or [{}]
        return ModelVersion(
            group=p.get("ModelPackageGroupName", ""),
            version=int(p.get("ModelPackageVersion", 0)),
            status=p.get("ModelApprovalStatus", ""),
            artifact_uri=containers[0].get("ModelDataUrl", ""),
            metrics=self._metrics(p),
            created_at=_iso(p.get("CreationTime")),
            updated_at=_iso(p.get("LastModifiedTime") or p.get("CreationTime")),
            run_id=(p.get("MetadataProperties") or {}).get("GeneratedBy"),  # the execution's ARN
            description=p.get("ModelPackageDescription", "") or "",
            note=p.get("ApprovalDescription", "") or "",
            arn=p.get("ModelPackageArn", arn),
            properties=dict(p.get("CustomerMetadataProperties") or {}),  # REPORT_PROPERTY among them
            commit_id=(p.get("MetadataProperties") or {}).get("CommitId", "") or "",
        )

    def list_versions(self, group: str | None = None) -> list[ModelVersion]:
        groups = [group] if group is not None else self.groups()
        return [self._version(s["ModelPackageArn"]) for g in groups for s in self._summaries(g)]

    def _arn(self, group: str, version) -> str:
        try:
            number = int(version)
        except (TypeError, ValueError):
            raise RegistryError(f"model version must be a whole number from 1, got {version!r}") from None
        for s in self._summaries(group):
            if int(s.get("ModelPackageVersion", 0)) == number:
                return s["ModelPackageArn"]
        raise NotFoundError(f"model version {group}/{number} not found in the SageMaker Model Registry")

    def get(self, group: str, version: int) -> ModelVersion:
        return self._version(self._arn(group, version))

    def execution_parameters(self, execution_arn: str | None) -> tuple[dict | None, str]:
        """(parameters, "") of the pipeline execution that registered a version: the definition's
        defaults as that execution ran it, with the values it was started with; (None, why) when
        they cannot be read. For `invmon models show` only: no deploy path needs them."""
        if not execution_arn or ":pipeline/" not in execution_arn:
            return None, "no pipeline execution recorded with the version"
        try:
            defined = self._call(self.sm.describe_pipeline_definition_for_execution,
                                 PipelineExecutionArn=execution_arn)
            given = self._call(self.sm.list_pipeline_parameters_for_execution,
                               PipelineExecutionArn=execution_arn)
            definition = json.loads(defined.get("PipelineDefinition") or "{}")
        except (RegistryError, ValueError) as exc:
            return None, f"the execution's parameters could not be read ({exc})"
        values = {p["Name"]: p.get("DefaultValue") for p in definition.get("Parameters", [])}
        values.update({p["Name"]: p["Value"] for p in given.get("PipelineParameters", [])})
        return values, ""

    def set_status(self, group: str, version: int, status: str, note: str = "") -> ModelVersion:
        if status not in STATUSES:
            raise RegistryError(f"unknown approval status {status!r}; use one of {', '.join(STATUSES)}")
        arn = self._arn(group, version)
        kwargs = {"ModelPackageArn": arn, "ModelApprovalStatus": status}
        if note:
            kwargs["ApprovalDescription"] = note
        self._call(self.sm.update_model_package, **kwargs)
        return self._version(arn)

    def latest(self, group: str, status: str | None = None) -> ModelVersion | None:
        if status is not None and status not in STATUSES:
            raise RegistryError(f"unknown approval status {status!r}; use one of {', '.join(STATUSES)}")
        summaries = self._summaries(group, status)
        return self._version(summaries[-1]["ModelPackageArn"]) if summaries else None
