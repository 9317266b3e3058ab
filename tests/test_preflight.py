"""Preflight: step requests checked against botocore's SageMaker API model, offline."""
from __future__ import annotations

import copy
import json
import os

import pytest

from aws_testing import BUCKET, REGION, ROLE, all_steps, aws_env, default_offline_definition, patched_environ
from pipeline.sagemaker.preflight import Issue, PreflightError, check_definition, preflight


@pytest.fixture
def definition() -> dict:
    return copy.deepcopy(json.loads(default_offline_definition()))


def only(issues: list[Issue]) -> Issue:
    assert len(issues) == 1, "\n".join(map(str, issues))
    return issues[0]


def test_the_built_definition_passes(definition):
    assert check_definition(definition) == []
    preflight(json.dumps(definition))  # no exception


def test_every_step_type_is_checked_against_its_api():
    from pipeline.sagemaker.preflight import STEP_APIS

    types = {s["Type"] for s in all_steps(json.loads(default_offline_definition())).values()}
    assert types - {"Condition", "Fail"} <= set(STEP_APIS)
    assert set(STEP_APIS.values()) >= {"CreateProcessingJob", "CreateHyperParameterTuningJob",
                                       "CreateTrainingJob", "CreateModelPackage",
                                       "CreateEndpointConfig", "CreateEndpoint"}


def test_a_bad_instance_count_type_is_rejected_naming_step_and_field(definition):
    steps = all_steps(definition)
    steps["Preprocess"]["Arguments"]["ProcessingResources"]["ClusterConfig"]["InstanceCount"] = "1"
    issue = only(check_definition(definition))
    assert (issue.step, issue.api, issue.field) == (
        "Preprocess", "CreateProcessingJob", "ProcessingResources.ClusterConfig.InstanceCount")
    assert "expected an integer" in issue.message


def test_an_unknown_field_is_rejected(definition):
    all_steps(definition)["Train"]["Arguments"]["ResourceConfig"]["InstanceCounts"] = 1
    issue = only(check_definition(definition))
    assert (issue.step, issue.api, issue.field) == ("Train", "CreateTrainingJob", "ResourceConfig.InstanceCounts")
    assert "unknown field" in issue.message


def test_a_missing_required_field_is_rejected(definition):
    del all_steps(definition)["Tune"]["Arguments"]["TrainingJobDefinition"]["RoleArn"]
    issue = only(check_definition(definition))
    assert (issue.step, issue.field) == ("Tune", "TrainingJobDefinition.RoleArn")
    assert "missing required" in issue.message


def test_steps_inside_condition_branches_are_checked(definition):
    all_steps(definition)["Register"]["Arguments"]["ModelApprovalStatus"] = "Maybe"
    issue = only(check_definition(definition))
    assert (issue.step, issue.api, issue.field) == ("Register", "CreateModelPackage", "ModelApprovalStatus")
    assert "not one of" in issue.message


def test_a_parameter_of_the_wrong_type_is_caught_where_it_is_used(definition):
    param = next(p for p in definition["Parameters"] if p["Name"] == "ProcessingInstanceCount")
    param["Type"], param["DefaultValue"] = "String", "1"
    issues = check_definition(definition)
    assert {(i.step, i.field) for i in issues} == {
        ("Preprocess", "ProcessingResources.ClusterConfig.InstanceCount"),
        ("Evaluate", "ProcessingResources.ClusterConfig.InstanceCount")}
    assert all("String parameter ProcessingInstanceCount" in i.message for i in issues)


def test_an_empty_string_default_where_the_api_needs_a_value(definition):
    """Why empty KmsKeyId/ManifestUrl are left out of the definition rather than wired."""
    inputs = all_steps(definition)["Preprocess"]["Arguments"]["ProcessingInputs"]
    index = next(i for i, item in enumerate(inputs) if item["InputName"] == "manifest")
    assert inputs[index]["S3Input"]["S3Uri"] == {"Get": "Parameters.ManifestUrl"}
    next(p for p in definition["Parameters"] if p["Name"] == "ManifestUrl")["DefaultValue"] = ""
    issue = only(check_definition(definition))
    assert issue.step == "Preprocess" and issue.field == f"ProcessingInputs[{index}].S3Input.S3Uri"
    assert "parameter ManifestUrl" in issue.message


def test_a_property_reference_that_does_not_exist(definition):
    container = all_steps(definition)["Register"]["Arguments"]["InferenceSpecification"]["Containers"][0]
    container["ModelDataUrl"] = {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifact"}
    issue = only(check_definition(definition))
    assert issue.step == "Register" and "InferenceSpecification.Containers[0].ModelDataUrl" in issue.field
    assert "has no property" in issue.message


def test_references_to_missing_steps_and_property_files(definition):
    steps = all_steps(definition)
    steps["Deploy"]["Arguments"]["EndpointConfigName"] = {"Get": "Steps.NoSuchStep.EndpointConfigName"}
    steps["CheckAccuracy"]["Arguments"]["Conditions"][0]["LeftValue"]["Std:JsonGet"]["PropertyFile"] = \
        {"Get": "Steps.Evaluate.PropertyFiles.Nope"}
    issues = {(i.step, i.field): i.message for i in check_definition(definition)}
    assert "not in the pipeline" in issues[("Deploy", "EndpointConfigName")]
    assert any(step == "CheckAccuracy" and "does not declare it" in msg for (step, _), msg in issues.items())


def test_preflight_error_lists_step_and_field(definition):
    all_steps(definition)["Evaluate"]["Arguments"]["ProcessingResources"]["ClusterConfig"]["VolumeSizeInGB"] = 0
    with pytest.raises(PreflightError) as raised:
        preflight(definition)
    text = str(raised.value)
    assert "step Evaluate (CreateProcessingJob): ProcessingResources.ClusterConfig.VolumeSizeInGB" in text
    assert "below the minimum 1" in text


def _corrupt(monkeypatch):
    """Make the builder produce a definition whose Train step asks for a bad instance count."""
    from pipeline.sagemaker import definition as sp

    real = sp.definition

    def corrupted(pipeline):
        built = json.loads(real(pipeline))
        all_steps(built)["Train"]["Arguments"]["ResourceConfig"]["InstanceCount"] = "two"
        return json.dumps(built)

    monkeypatch.setattr(sp, "definition", corrupted)


def test_invmon_definition_runs_preflight(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    _corrupt(monkeypatch)
    with patched_environ({k: v for k, v in os.environ.items() if not k.startswith("AWS_")}):
        code = main(["definition", "--region", REGION, "--staging-dir", str(tmp_path),
                     "--out", str(tmp_path / "d.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert "step Train (CreateTrainingJob): ResourceConfig.InstanceCount" in err
    assert "Traceback" not in err
    assert not (tmp_path / "d.json").exists()


def test_invmon_upsert_runs_preflight_before_touching_aws(monkeypatch, capsys):
    import boto3
    from moto import mock_aws

    from pipeline.cli import main

    _corrupt(monkeypatch)
    with patched_environ(aws_env()), mock_aws():
        boto3.Session(region_name=REGION).client("s3").create_bucket(Bucket=BUCKET)
        code = main(["upsert", "--role-arn", ROLE, "--bucket", BUCKET, "--region", REGION])
        err = capsys.readouterr().err
        assert boto3.Session(region_name=REGION).client("sagemaker").list_pipelines()["PipelineSummaries"] == []
        assert boto3.Session(region_name=REGION).client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    assert code == 1
    assert "step Train (CreateTrainingJob): ResourceConfig.InstanceCount" in err
