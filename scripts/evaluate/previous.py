"""The previous registered version's metrics, which report.html compares this run with.

Which version: the newest Approved one, else the newest of any status (named with its status).
Approved first because that is what production serves and the bar a reviewer last accepted;
without one, the newest registered version is still the best "what we had before".

Where from (the step looks the registry up itself, the same arguments in both executors):
  - on SageMaker: the Model Registry through boto3 (list_model_packages, describe_model_package,
    and its ModelQuality statistics, evaluation.json, from S3);
  - under the local runner: the listing the runner writes at $INVMON_MODEL_REGISTRY (the local
    registry is a SQLite file of the runner's, with no API a step container could call).
A registry that cannot be read is a note in the report, never a failed evaluation.

Plain module of the Evaluate step: standard library, boto3 only when it reads SageMaker.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

LISTING_ENV = "INVMON_MODEL_REGISTRY"
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


def comparison(group: str, chosen: dict, evaluation: dict) -> dict:
    """The --previous-metrics document report.py reads."""
    return {"group": group, "version": int(chosen["version"]), "status": chosen.get("status", ""),
            "metrics": headline(evaluation)}


def from_listing(path: Path, group: str) -> tuple[dict | None, str]:
    """The local runner's listing: {"group": g, "versions": [{"version", "status", "evaluation"}]}."""
    listing = json.loads(Path(path).read_text())
    versions = [v for v in listing.get("versions", []) if listing.get("group") == group]
    chosen = choose(versions)
    if chosen is None:
        return None, nothing_registered(group)
    return comparison(group, chosen, chosen.get("evaluation") or {}), ""


def from_sagemaker(group: str, sm=None, s3=None) -> tuple[dict | None, str]:
    """The SageMaker Model Registry: newest Approved package, else newest, and its evaluation.json."""
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
    uri = (((package.get("ModelMetrics") or {}).get("ModelQuality") or {}).get("Statistics") or {}).get("S3Uri", "")
    if not uri.startswith("s3://"):
        return None, f"{group} version {chosen['version']} has no model quality statistics to compare with"
    bucket, _, key = uri[5:].partition("/")
    s3 = s3 or boto3.client("s3", config=config)
    evaluation = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return comparison(group, chosen, evaluation), ""


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
