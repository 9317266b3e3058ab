"""The previous registered version: which one, its artifact, and the metrics it was registered with.

Evaluate scores that version's artifact on this run's test photos (champion.py) and compares the
two models on the same photos. The metrics it was registered with were measured on its own test
split, other photos: they are kept for reference, never compared with this run's.

Which version: the newest Approved one, else the newest of any status (named with its status).
Approved first because that is what production serves and the bar a reviewer last accepted;
without one, the newest registered version is still the best "what we had before".

Where from (the step looks the registry up itself, the same arguments in both executors):
  - on SageMaker: the Model Registry through boto3 (list_model_packages, describe_model_package:
    the artifact is InferenceSpecification.Containers[0].ModelDataUrl, its SHA-256 the
    ArtifactSha256 that Register records in CustomerMetadataProperties; the ModelQuality
    statistics, evaluation.json, from S3);
  - under the local runner: the listing the runner writes at $INVMON_MODEL_REGISTRY (the local
    registry is a SQLite file of the runner's, with no API a step container could call), each
    version with its artifact's path and recorded SHA-256.
A registry that cannot be read is a note in the report, never a failed evaluation.

Plain module of the Evaluate step: standard library, boto3 only when it reads SageMaker.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

LISTING_ENV = "INVMON_MODEL_REGISTRY"
# The version property holding the artifact's SHA-256 recorded at registration (the registry's
# DIGEST_PROPERTY, pipeline/registry/local.py; a test checks they agree).
DIGEST_PROPERTY = "ArtifactSha256"
HEADLINE = {"accuracy": ("multiclass_classification_metrics", "accuracy"),
            "weighted_f1": ("multiclass_classification_metrics", "weighted_f1"),
            "rmse": ("regression_metrics", "rmse")}


def nothing_registered(group: str) -> str:
    return f"no version of {group} is registered yet: nothing to compare with"


def choose(versions: list[dict]) -> dict | None:
    """Of [{"version": n, "status": s, ...}], the newest Approved one, else the newest."""
    approved = [v for v in versions if v.get("status") == "Approved"]
    pool = approved or versions
    return max(pool, key=lambda v: int(v["version"])) if pool else None


def headline(evaluation: dict) -> dict:
    """evaluation.json -> {"accuracy": a, "rmse": r, "weighted_f1": f} (what the report compares)."""
    flat = {}
    for name, (section, key) in HEADLINE.items():
        value = (evaluation.get(section) or {}).get(key)
        if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
            flat[name] = float(value["value"])
    return flat


def comparison(group: str, chosen: dict, evaluation: dict, artifact: dict | None = None) -> dict:
    """The --previous-metrics document: the version, the metrics it was registered with (measured
    on its own test split) and, where known, its artifact {"uri": ..., "sha256": ...}."""
    found = {"group": group, "version": int(chosen["version"]), "status": chosen.get("status", ""),
             "metrics": headline(evaluation)}
    if artifact and artifact.get("uri"):
        found["artifact"] = {"uri": str(artifact["uri"]), "sha256": str(artifact.get("sha256") or "")}
    return found


def from_listing(path: Path, group: str) -> tuple[dict | None, str]:
    """The local runner's listing:
    {"group": g, "versions": [{"version", "status", "evaluation", "artifact", "sha256"}]}."""
    listing = json.loads(Path(path).read_text())
    versions = [v for v in listing.get("versions", []) if listing.get("group") == group]
    chosen = choose(versions)
    if chosen is None:
        return None, nothing_registered(group)
    artifact = {"uri": chosen.get("artifact") or "", "sha256": chosen.get("sha256") or ""}
    return comparison(group, chosen, chosen.get("evaluation") or {}, artifact), ""


def from_sagemaker(group: str, sm=None, s3=None) -> tuple[dict | None, str]:
    """The SageMaker Model Registry: newest Approved package, else newest, its artifact and the
    evaluation.json it was registered with (none recorded: no metrics, the artifact still)."""
    import boto3
    from botocore.config import Config

    # Short timeouts: a job in a VPC without a SageMaker endpoint must not stall the evaluation.
    config = Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 3})
    sm = sm or boto3.client("sagemaker", config=config)
    summaries, token = [], None
    while True:
        page = sm.list_model_packages(ModelPackageGroupName=group, ModelPackageType="Versioned",
                                      **({"NextToken": token} if token else {}))
        summaries += [{"version": s["ModelPackageVersion"], "status": s.get("ModelApprovalStatus"),
                       "arn": s["ModelPackageArn"]} for s in page.get("ModelPackageSummaryList", [])]
        token = page.get("NextToken")
        if not token:
            break
    chosen = choose(summaries)
    if chosen is None:
        return None, nothing_registered(group)
    package = sm.describe_model_package(ModelPackageName=chosen["arn"])
    containers = (package.get("InferenceSpecification") or {}).get("Containers") or [{}]
    artifact = {"uri": containers[0].get("ModelDataUrl", ""),
                "sha256": (package.get("CustomerMetadataProperties") or {}).get(DIGEST_PROPERTY, "")}
    uri = (((package.get("ModelMetrics") or {}).get("ModelQuality") or {}).get("Statistics") or {}).get("S3Uri", "")
    evaluation = {}
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        s3 = s3 or boto3.client("s3", config=config)
        evaluation = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return comparison(group, chosen, evaluation, artifact), ""


def lookup(group: str | None, explicit: str | None = None) -> tuple[dict | None, str]:
    """(previous metrics or None, why there are none). `explicit`: a --previous-metrics file."""
    if explicit:
        try:
            return json.loads(Path(explicit).read_text()), ""
        except (OSError, ValueError) as exc:
            return None, f"--previous-metrics {explicit} could not be read ({exc})"
    if not group:
        return None, "neither --previous-metrics nor --model-package-group was given"
    listing = os.environ.get(LISTING_ENV)
    try:
        return from_listing(Path(listing), group) if listing else from_sagemaker(group)
    except Exception as exc:  # noqa: BLE001 - no permission, no network, a bad file: say so
        where = listing or "the SageMaker Model Registry"
        return None, (f"the previous version of {group} could not be read from {where} "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
