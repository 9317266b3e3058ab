"""Evaluate's comparison with the previous registered version (scripts/evaluate/previous.py):
which version is chosen, read from the SageMaker Model Registry under moto and from the local
runner's listing with its artifact and recorded SHA-256 (what Evaluate scores on the same photos,
tests/test_champion.py), and a registry that cannot be read is a note, not a failure."""
from __future__ import annotations

import json

import pytest

from aws_testing import BUCKET, REGION, aws_env, patched_environ
from conftest import import_script

previous = import_script("evaluate", "previous")


def evaluation(accuracy: float) -> dict:
    return {"multiclass_classification_metrics": {"accuracy": {"value": accuracy, "standard_deviation": 0.01},
                                                  "weighted_f1": {"value": accuracy - 0.05}},
            "regression_metrics": {"rmse": {"value": 1.0 - accuracy}}}


def test_the_newest_approved_version_wins_over_newer_pending_ones():
    versions = [{"version": 1, "status": "Approved"}, {"version": 2, "status": "Approved"},
                {"version": 3, "status": "Rejected"}, {"version": 4, "status": "PendingManualApproval"}]
    assert previous.choose(versions)["version"] == 2
    # Nothing approved yet: the newest of any status.
    assert previous.choose([v for v in versions if v["status"] != "Approved"])["version"] == 4
    assert previous.choose([]) is None


def test_the_runners_listing_and_the_scripts_agree_on_where_it_is():
    from pipeline.local.runner import REGISTRY_LISTING_ENV

    assert REGISTRY_LISTING_ENV == previous.LISTING_ENV


def test_from_the_local_runners_listing(tmp_path, monkeypatch):
    listing = tmp_path / "registry.json"
    listing.write_text(json.dumps({"group": "bin-count", "versions": [
        {"version": 1, "status": "Approved", "evaluation": evaluation(0.61), "artifact": "/r/1/model.tar.gz",
         "sha256": "ab" * 32},
        {"version": 2, "status": "PendingManualApproval", "evaluation": evaluation(0.74)}]}))
    monkeypatch.setenv(previous.LISTING_ENV, str(listing))
    found, note = previous.lookup("bin-count")
    assert note == ""
    assert found == {"group": "bin-count", "version": 1, "status": "Approved",
                     "metrics": {"accuracy": 0.61, "weighted_f1": pytest.approx(0.56), "rmse": pytest.approx(0.39)},
                     "artifact": {"uri": "/r/1/model.tar.gz", "sha256": "ab" * 32}}
    # An explicit --previous-metrics file is used as given.
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"version": 9, "metrics": {"accuracy": 0.5}}))
    assert previous.lookup("bin-count", str(given)) == ({"version": 9, "metrics": {"accuracy": 0.5}}, "")
    # An empty registry, and a listing that cannot be read: no comparison, and why.
    listing.write_text(json.dumps({"group": "bin-count", "versions": []}))
    assert previous.lookup("bin-count") == (None, "no version of bin-count is registered yet: nothing to compare with")
    listing.unlink()
    found, note = previous.lookup("bin-count")
    assert found is None and "could not be read from" in note and "FileNotFoundError" in note


@pytest.fixture
def sagemaker():
    import boto3
    from moto import mock_aws

    with patched_environ(aws_env()), mock_aws():
        session = boto3.Session(region_name=REGION)
        s3 = session.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        yield session.client("sagemaker"), s3


def register(sm, s3, accuracy: float, status: str = "PendingManualApproval", metrics: bool = True) -> None:
    key = f"runs/{accuracy}/evaluation.json"
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(evaluation(accuracy)))
    extra = {"ModelMetrics": {"ModelQuality": {"Statistics": {
        "ContentType": "application/json", "S3Uri": f"s3://{BUCKET}/{key}"}}}} if metrics else {}
    # The artifact's SHA-256, as Register records it.
    extra["CustomerMetadataProperties"] = {previous.DIGEST_PROPERTY: f"{int(accuracy * 100):064d}"}
    sm.create_model_package(
        ModelPackageGroupName="bin-count", ModelApprovalStatus=status,
        InferenceSpecification={"Containers": [{"Image": "123.dkr.ecr.us-east-1.amazonaws.com/x:1",
                                                "ModelDataUrl": f"s3://{BUCKET}/m/{accuracy}.tar.gz"}],
                                "SupportedContentTypes": ["image/jpeg"],
                                "SupportedResponseMIMETypes": ["application/json"]}, **extra)


def test_from_the_sagemaker_model_registry(sagemaker, monkeypatch):
    monkeypatch.delenv(previous.LISTING_ENV, raising=False)
    sm, s3 = sagemaker
    sm.create_model_package_group(ModelPackageGroupName="bin-count")
    assert previous.lookup("bin-count") == (None, "no version of bin-count is registered yet: nothing to compare with")

    register(sm, s3, 0.61)
    register(sm, s3, 0.74)
    found, note = previous.lookup("bin-count")  # boto3's own clients, as in the job
    assert note == "" and (found["version"], found["status"]) == (2, "PendingManualApproval")
    assert found["metrics"]["accuracy"] == 0.74
    # The package's ModelDataUrl and recorded digest: what Evaluate scores on this run's photos.
    assert found["artifact"] == {"uri": f"s3://{BUCKET}/m/0.74.tar.gz", "sha256": f"{74:064d}"}

    sm.update_model_package(ModelPackageArn=f"arn:aws:sagemaker:{REGION}:123456789012:model-package/bin-count/1",
                            ModelApprovalStatus="Approved")
    found, _ = previous.lookup("bin-count")
    assert (found["version"], found["status"], found["metrics"]["accuracy"]) == (1, "Approved", 0.61)


def test_a_package_without_metrics_still_names_its_artifact_and_an_unreachable_registry_is_a_note(sagemaker, monkeypatch):
    monkeypatch.delenv(previous.LISTING_ENV, raising=False)
    sm, s3 = sagemaker
    sm.create_model_package_group(ModelPackageGroupName="bin-count")
    register(sm, s3, 0.5, metrics=False)
    # No recorded metrics: still the version and its artifact, which Evaluate can score itself.
    assert previous.lookup("bin-count") == ({
        "group": "bin-count", "version": 1, "status": "PendingManualApproval", "metrics": {},
        "artifact": {"uri": f"s3://{BUCKET}/m/0.5.tar.gz", "sha256": f"{50:064d}"}}, "")
    with patched_environ(aws_env(region=None)):  # no region: boto3 cannot even make the client
        found, note = previous.lookup("bin-count")
    assert found is None and "could not be read from the SageMaker Model Registry (NoRegionError" in note
