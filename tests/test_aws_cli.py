"""`invmon upsert/start/status/executions` against moto, in-process and as a CLI user runs them
(a subprocess talking to moto's server through AWS_ENDPOINT_URL); following an execution; the
SageMaker Model Registry back-end."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from aws_testing import (BUCKET, COMMIT, REGION, ROLE, ROOT, aws_env, default_offline_definition,
                         moto_server, patched_environ)
from pipeline.cli import main
from pipeline.sagemaker import clients

INVMON = ROOT / ".venv" / "bin" / "invmon"


def invmon_command() -> list[str]:
    # The console script `pip install -e .` puts in the venv, else the same entry point.
    return [str(INVMON)] if INVMON.exists() else [sys.executable, "-m", "pipeline"]


@pytest.fixture(scope="module")
def moto_aws():
    """moto for the module, with the pipeline upserted once (upsert builds the definition twice)."""
    from moto import mock_aws

    with patched_environ(aws_env()), mock_aws():
        session = clients.session(REGION)  # not boto3's process-wide default session
        session.client("s3").create_bucket(Bucket=BUCKET)
        sm = session.client("sagemaker")
        assert sm.list_pipelines()["PipelineSummaries"] == []
        assert main(["upsert", "--role-arn", ROLE, "--bucket", BUCKET, "--region", REGION]) == 0
        yield sm


def executions(sm) -> list:
    return sm.list_pipeline_executions(PipelineName="bin-count")["PipelineExecutionSummaries"]


@pytest.mark.slow
def test_upsert_creates_the_pipeline_then_updates_it(moto_aws, capsys):
    sm = moto_aws
    described = sm.describe_pipeline(PipelineName="bin-count")
    assert described["RoleArn"] == ROLE
    assert described["ParallelismConfiguration"] == {"MaxParallelExecutionSteps": 2}
    # What AWS now holds is exactly what `invmon definition` shows offline.
    assert json.loads(described["PipelineDefinition"]) == json.loads(default_offline_definition())
    code_keys = boto3_keys()
    assert any(k.startswith("bin-count/code/train-") and k.endswith("sourcedir.tar.gz") for k in code_keys)

    assert main(["upsert", "--role-arn", ROLE, "--bucket", BUCKET, "--region", REGION,
                 "--param", "Epochs=12"]) == 0
    assert "pipeline bin-count updated" in capsys.readouterr().out
    updated = json.loads(sm.describe_pipeline(PipelineName="bin-count")["PipelineDefinition"])
    assert {p["Name"]: p["DefaultValue"] for p in updated["Parameters"]}["Epochs"] == 12
    assert boto3_keys() == code_keys  # same code: same content-addressed objects, nothing new


def boto3_keys() -> set[str]:
    listed = clients.session(REGION).client("s3").list_objects_v2(Bucket=BUCKET)
    return {o["Key"] for o in listed.get("Contents", [])}


def test_start_with_parameters_and_commit_id(moto_aws, capsys):
    sm = moto_aws
    before = len(executions(sm))
    assert main(["start", "--region", REGION, "--param", "Epochs=3", "--param", "Arch=resnet18",
                 "--commit-id", COMMIT]) == 0
    out = capsys.readouterr().out
    arn = out.split("started ", 1)[1].split()[0]
    assert len(executions(sm)) == before + 1
    execution = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
    assert execution["PipelineExecutionDisplayName"] == f"commit-{COMMIT[:12]}"
    assert execution["PipelineExecutionDescription"] == f"CommitId={COMMIT}"
    params = sm.list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)["PipelineParameters"]
    assert {p["Name"]: p["Value"] for p in params} == {"Epochs": "3", "Arch": "resnet18"}

    assert main(["executions", "--region", REGION]) == 0
    assert f"commit-{COMMIT[:12]}" in capsys.readouterr().out
    assert main(["status", "--region", REGION]) == 0  # the latest execution
    assert arn in capsys.readouterr().out


# A bad option value is a usage error (exit 2), found before AWS is asked; what the account
# refuses (the deployed definition, a missing pipeline, the endpoint rule) is a failure (exit 1).
@pytest.mark.parametrize("argv, message, code", [
    (["start", "--param", "Nope=1"], "unknown parameter 'Nope'", 2),
    (["start", "--param", "Epochs=three"], "Epochs expects int", 2),
    (["start", "--param", "ModelApprovalStatus=Approved"],
     "ModelApprovalStatus=Approved refused: a run registers its model as PendingManualApproval", 2),
    (["start", "--param", "Decode=average"], "Decode='average' refused: Decode takes one of argmax, median, mean", 2),
    (["start", "--param", "Optimizer=adam"], "Optimizer='adam' refused: Optimizer takes one of sgd, adamw", 2),
    (["start", "--param", "AccuracyThreshold=-inf"], "AccuracyThreshold=-inf refused: AccuracyThreshold takes 0 to 1", 2),
    (["start", "--param", "AccuracyThreshold=nan"], "AccuracyThreshold=nan refused", 2),
    (["start", "--param", "Epochs=-3"], "Epochs=-3 refused: Epochs takes 1 to 200", 2),
    (["start", "--param", "TuningMaxJobs=0"], "TuningMaxJobs=0 refused", 2),
    (["start", "--param", "ImageSize=0"], "ImageSize=0 refused", 2),
    (["start", "--param", "ModelPackageGroupName="], "ModelPackageGroupName='' refused", 2),
    (["start", "--param", "TuningMaxJobs=5", "--param", "TuningMaxParallelJobs=8"],
     "TuningMaxParallelJobs (8) cannot exceed TuningMaxJobs (5)", 2),
    (["upsert", "--role-arn", ROLE, "--param", "Epochs=0"], "Epochs=0 refused", 2),
    (["start", "--param", "SubnetIds=subnet-1"], "cannot override SubnetIds at start", 1),
    (["start", "--param", "KmsKeyId=alias/k"], "KmsKeyId was empty when the pipeline was upserted", 1),
    (["start", "--pipeline-name", "nope"], "no pipeline 'nope'", 1),
    (["status", "--pipeline-name", "nope"], "no pipeline 'nope'", 1),
    (["upsert", "--role-arn", " "], "--role-arn is empty", 2),
    (["start", "--param", "StagingEndpointName=bin-count-production"],
     "deploys only to its group's staging endpoint bin-count-staging", 1),
    (["start", "--param", "ModelPackageGroupName=bin-count-production"], "StagingEndpointName=bin-count-staging refused", 1),
    (["upsert", "--role-arn", ROLE, "--param", "StagingEndpointName=prod"], "deploys only to its group's staging", 1),
])
def test_commands_refuse_what_cannot_work(moto_aws, capsys, argv, message, code):
    before = len(executions(moto_aws))
    assert main([*argv, "--region", REGION]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(executions(moto_aws)) == before


def test_a_missing_region_is_named(capsys):
    with patched_environ(aws_env(region=None)):
        assert main(["executions"]) == 2
    assert "no AWS region: pass --region or set AWS_REGION" in capsys.readouterr().err


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*invmon_command(), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow
def test_upsert_then_start_as_a_cli_user_against_moto_server():
    # This module's mock_aws state is live in the server thread too: no reset, own names.
    name = "bin-count-cli"
    with moto_server(reset=False) as endpoint:
        env = aws_env(endpoint_url=endpoint)
        env.pop("AWS_DEFAULT_REGION")
        env["AWS_REGION"] = REGION  # as CodeBuild and many shells set it
        upsert = run_cli(["upsert", "--role-arn", ROLE, "--pipeline-name", name], env)
        assert upsert.returncode == 0, upsert.stderr
        assert f"pipeline {name} created" in upsert.stdout
        assert "Traceback" not in upsert.stderr

        start = run_cli(["start", "--pipeline-name", name, "--commit-id", COMMIT,
                         "--param", "TuningMaxJobs=4"], env)
        assert start.returncode == 0, start.stderr
        arn = start.stdout.split("started ", 1)[1].split()[0]

        status = run_cli(["status", arn], env)
        assert status.returncode == 0, status.stderr
        assert f"CommitId={COMMIT}" in status.stdout

        with patched_environ(env):
            session = clients.session(REGION)  # fresh: reads AWS_ENDPOINT_URL now
            sm, s3 = session.client("sagemaker"), session.client("s3")
            definition = json.loads(sm.describe_pipeline(PipelineName=name)["PipelineDefinition"])
            (execution,) = sm.list_pipeline_executions(PipelineName=name)["PipelineExecutionSummaries"]
            default_bucket = f"sagemaker-{REGION}-123456789012"
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=default_bucket)["Contents"]]
    assert execution["PipelineExecutionArn"] == arn
    assert [s["Name"] for s in definition["Steps"]][0] == "Preprocess"
    # No --bucket: the SDK's default bucket, named from the caller identity moto reports
    # (through AWS_ENDPOINT_URL: the SDK's own STS endpoint would have left the machine).
    assert any(k.startswith(f"{name}/code/train-") for k in keys)


# --------------------------------------------------------------------------- following


class ScriptedSageMaker:
    """Just enough of the SageMaker client for start --wait: an execution that plays a script."""

    def __init__(self, script: list[list[dict]], final_status: str, failure: str = ""):
        self.script = script  # the step list returned by each successive poll
        self.final_status = final_status
        self.failure = failure
        self.polls = 0
        self.started_with = None

    def describe_pipeline(self, PipelineName):
        return {"PipelineDefinition": default_offline_definition()}

    def start_pipeline_execution(self, **kwargs):
        self.started_with = kwargs
        return {"PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:123456789012:pipeline/bin-count/execution/abc"}

    def list_pipeline_execution_steps(self, PipelineExecutionArn, SortOrder, NextToken=None):
        steps = self.script[min(self.polls, len(self.script) - 1)]
        return {"PipelineExecutionSteps": steps}

    def describe_pipeline_execution(self, PipelineExecutionArn):
        self.polls += 1
        done = self.polls >= len(self.script)
        result = {"PipelineExecutionStatus": self.final_status if done else "Executing"}
        if done and self.failure:
            result["FailureReason"] = self.failure
        return result


def step(name, status, **extra):
    return {"StepName": name, "StepStatus": status, "StartTime": datetime.now(timezone.utc), **extra}


FAILED_SCRIPT = [
    [step("Preprocess", "Executing")],
    [step("Preprocess", "Succeeded", CacheHitResult={"SourcePipelineExecutionArn": "arn:.../execution/old1"}),
     step("Tune", "Executing")],
    [step("Preprocess", "Succeeded"), step("Tune", "Succeeded"), step("Train", "Succeeded"),
     step("Evaluate", "Succeeded"), step("CheckAccuracy", "Succeeded"),
     step("AccuracyTooLow", "Failed",
          FailureReason="Test accuracy 0.21 is below AccuracyThreshold 0.3; the model was not registered.")],
]


def test_follow_prints_each_change_once_and_reports_the_failed_step():
    from pipeline.sagemaker.executions import follow

    lines = []
    sm = ScriptedSageMaker(FAILED_SCRIPT, "Failed", failure="Step failure: One or multiple steps failed.")
    outcome = follow(sm, "arn", poll_seconds=0, out=lines.append, sleep=lambda s: None)
    assert not outcome.ok
    assert outcome.failed_step == "AccuracyTooLow"
    assert outcome.failure_reason.startswith("Test accuracy 0.21 is below AccuracyThreshold 0.3")
    shown = [line.split("  ", 1)[1] for line in lines]
    assert sum("Preprocess" in s for s in shown) == 2  # Executing, then Succeeded (no repeats)
    assert any("cache hit: old1" in s for s in shown)
    assert shown[-1].startswith("AccuracyTooLow") and "Failed: Test accuracy 0.21" in shown[-1]


def test_start_wait_exits_non_zero_with_the_failed_steps_reason(monkeypatch, capsys):
    from pipeline.sagemaker import clients, executions

    sm = ScriptedSageMaker(FAILED_SCRIPT, "Failed")
    monkeypatch.setattr(clients, "client", lambda service, region: sm)
    assert main(["start", "--region", REGION, "--wait", "--poll-seconds", "0", "--commit-id", COMMIT]) == 1
    captured = capsys.readouterr()
    assert "Tune" in captured.out and "Succeeded" in captured.out
    assert "execution failed: step AccuracyTooLow Test accuracy 0.21 is below AccuracyThreshold 0.3" in captured.err
    assert sm.started_with["PipelineExecutionDisplayName"] == f"commit-{COMMIT[:12]}"
    assert sm.started_with["ParallelismConfiguration"] == {"MaxParallelExecutionSteps": 2}


def test_start_wait_exits_zero_when_the_execution_succeeds(monkeypatch, capsys):
    from pipeline.sagemaker import clients, executions

    script = [[step("Preprocess", "Executing")], [step("Preprocess", "Succeeded"), step("Deploy", "Succeeded")]]
    monkeypatch.setattr(clients, "client", lambda service, region: ScriptedSageMaker(script, "Succeeded"))
    assert main(["start", "--region", REGION, "--wait", "--poll-seconds", "0"]) == 0
    assert "execution succeeded" in capsys.readouterr().out


# --------------------------------------------------------------------------- registry


def _register(sm, s3, group: str, accuracy: float) -> str:
    key = f"evaluations/{accuracy}/evaluation.json"
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(
        {"multiclass_classification_metrics": {"accuracy": {"value": accuracy}},
         "regression_metrics": {"rmse": {"value": 1.0 - accuracy}}}))
    return sm.create_model_package(
        ModelPackageGroupName=group, ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": "123.dkr.ecr.us-east-1.amazonaws.com/x:1",
                                                "ModelDataUrl": f"s3://{BUCKET}/models/{accuracy}/model.tar.gz"}],
                                "SupportedContentTypes": ["image/jpeg"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        ModelMetrics={"ModelQuality": {"Statistics": {"ContentType": "application/json",
                                                      "S3Uri": f"s3://{BUCKET}/{key}"}}},
    )["ModelPackageArn"]


def test_sagemaker_registry_has_the_local_registry_methods(moto_aws, capsys):
    from pipeline.registry.sagemaker import SageMakerRegistry
    from pipeline.registry.local import ModelVersion, NotFoundError, RegistryError

    sm, s3 = moto_aws, clients.session(REGION).client("s3")
    sm.create_model_package_group(ModelPackageGroupName="bin-count")
    _register(sm, s3, "bin-count", 0.61)
    _register(sm, s3, "bin-count", 0.74)

    registry = SageMakerRegistry(region=REGION)
    versions = registry.list_versions("bin-count")
    assert [v.version for v in versions] == [1, 2]
    assert all(isinstance(v, ModelVersion) for v in versions)
    v2 = registry.get("bin-count", 2)
    assert v2.status == "PendingManualApproval"
    assert v2.artifact_uri == f"s3://{BUCKET}/models/0.74/model.tar.gz"
    assert v2.metrics["multiclass_classification_metrics"]["accuracy"]["value"] == 0.74
    assert registry.latest("bin-count", status="Approved") is None

    approved = registry.set_status("bin-count", 1, "Approved", note="looked at the confusion matrix")
    assert approved.status == "Approved"
    assert registry.latest("bin-count", status="Approved").version == 1
    assert registry.latest("bin-count").version == 2
    assert [v.group for v in registry.list_versions()] == ["bin-count", "bin-count"]

    # The same back-end behind `invmon models ... --backend aws`.
    assert main(["models", "list", "--backend", "aws", "--region", REGION]) == 0
    listed = capsys.readouterr().out
    assert "Approved" in listed and "0.7400" in listed and "PendingManualApproval" in listed

    with pytest.raises(NotFoundError, match="bin-count/7"):
        registry.get("bin-count", 7)
    with pytest.raises(RegistryError, match="unknown approval status"):
        registry.set_status("bin-count", 1, "Maybe")
    with patched_environ(aws_env(region=None)), pytest.raises(RegistryError, match="no AWS region"):
        SageMakerRegistry()
