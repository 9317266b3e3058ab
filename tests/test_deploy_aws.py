"""From approval to production on SageMaker, under moto: approve/reject in the Model Registry,
deploys that create Model + EndpointConfig + Endpoint, refusals that change nothing, the
blue/green update, rollback on reject, the Lambda deploy function (from its zip, with recorded
EventBridge events), predict through sagemaker-runtime, and AWS errors as one line.

moto 5.2 has no UpdateEndpoint. The update path is tested by recording the request invmon sends
(a botocore `before-call` hook on the client): the request is checked against botocore's
service model for UpdateEndpoint, then applied to moto's endpoint so that what follows sees it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import sys
import urllib.request
from pathlib import Path

import pytest

from aws_testing import REGION, ROOT, aws_env, keep_customer_metadata, moto_server, patched_environ
from pipeline.cli import main
from pipeline.sagemaker import clients

GROUP = "bin-count"
MODEL_ROLE = "arn:aws:iam::123456789012:role/InvmonModelRole"
EVENTS = Path(__file__).parent / "events"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312"


ARTIFACTS = "invmon-artifacts"


def register(sm, group: str = GROUP, n: int = 3) -> list[str]:
    """n versions of `group`, each with a real model.tar.gz object in S3 and its SHA-256 recorded
    as the Register step records it (CustomerMetadataProperties ArtifactSha256)."""

    s3 = clients.session(REGION).client("s3")
    if ARTIFACTS not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=ARTIFACTS)
    sm.create_model_package_group(ModelPackageGroupName=group)
    arns = []
    for i in range(n):
        body = b"model.tar.gz of %s version %d" % (group.encode(), i + 1)
        s3.put_object(Bucket=ARTIFACTS, Key=f"{group}/{i}/model.tar.gz", Body=body)
        arns.append(sm.create_model_package(
            ModelPackageGroupName=group, ModelApprovalStatus="PendingManualApproval",
            InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl":
                                                    f"s3://{ARTIFACTS}/{group}/{i}/model.tar.gz"}],
                                    "SupportedContentTypes": ["image/jpeg"],
                                    "SupportedResponseMIMETypes": ["application/json"]},
            CustomerMetadataProperties={"ArtifactSha256": hashlib.sha256(body).hexdigest(),
                                        "SmokeTest": "passed"},  # approve refuses an unsmoked one
        )["ModelPackageArn"])
    return arns


@pytest.fixture
def sm(monkeypatch):
    from moto import mock_aws

    env = aws_env()
    env["INVMON_MODEL_ROLE_ARN"] = MODEL_ROLE
    keep_customer_metadata(monkeypatch)
    with patched_environ(env), mock_aws():
        client = clients.session(REGION).client("sagemaker")
        register(client)
        yield client


class Updates(list):
    """UpdateEndpoint as SageMaker answers it, which moto 5.2 cannot: each request is recorded
    (after botocore's own validation against UpdateEndpoint's model) and applied to moto's
    endpoint. With `hold`, an update stays in progress (EndpointStatus Updating, with a
    PendingDeploymentSummary) until `finish()`, and a second update meanwhile is refused as
    SageMaker refuses it."""

    def __init__(self):
        super().__init__()
        self.hold = False
        self.pending: dict[str, str] = {}  # endpoint -> config it is switching to
        self.lock = threading.Lock()
        self.barrier: threading.Barrier | None = None  # deliveries meet here before they update
        self.local = threading.local()  # each thread's request, from record() to apply()
        self.failing: dict = {}  # operation -> answer (see fail())
        self.after: dict = {}  # operation -> callback after SageMaker answered it
        self.models: list[dict] = []  # CreateModel requests

    def endpoint(self, name):
        from moto.sagemaker.models import sagemaker_backends

        return sagemaker_backends["123456789012"][REGION].endpoints[name]

    def record(self, params, model, **_):  # the API parameters, before botocore serializes them
        from botocore.validate import validate_parameters

        validate_parameters(params, model.input_shape)  # raises ParamValidationError
        self.local.params = json.loads(json.dumps(params))
        with self.lock:
            self.append(self.local.params)

    def apply(self, **_):  # short-circuits the HTTP call moto cannot answer
        from botocore.awsrequest import AWSResponse
        from moto.core.utils import utcnow

        params = self.local.params
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        name = params["EndpointName"]
        with self.lock:
            if name in self.pending:
                return AWSResponse("", 400, {}, None), {"Error": {
                    "Code": "ValidationException",
                    "Message": f"Cannot update in-progress endpoint \"{name}\"."}, "ResponseMetadata": {}}
            endpoint = self.endpoint(name)
            if self.hold:
                self.pending[name] = params["EndpointConfigName"]
            else:
                endpoint.endpoint_config_name = params["EndpointConfigName"]
            endpoint.last_modified_time = utcnow()
            return AWSResponse("", 200, {}, None), {"EndpointArn": endpoint.arn}

    def describe(self, parsed, **_):  # an update in progress shows as it does on SageMaker
        name = parsed.get("EndpointName")
        if name in self.pending:
            parsed["EndpointStatus"] = "Updating"
            parsed["PendingDeploymentSummary"] = {"EndpointConfigName": self.pending[name]}

    def finish(self):
        with self.lock:
            for name, config in self.pending.items():
                self.endpoint(name).endpoint_config_name = config
            self.pending.clear()

    def fail(self, operation: str, code: str = "ThrottlingException"):
        """Make every `operation` call fail with `code` (a read that cannot be made)."""
        from botocore.awsrequest import AWSResponse

        self.failing[operation] = lambda **_: (AWSResponse("", 400, {}, None), {
            "Error": {"Code": code, "Message": "Rate exceeded"}, "ResponseMetadata": {}})

    def hook(self, made):
        for operation, answer in self.failing.items():
            made.meta.events.register(f"before-call.sagemaker.{operation}", answer)
        for operation, callback in self.after.items():
            made.meta.events.register(f"after-call.sagemaker.{operation}", callback)
        made.meta.events.register("before-parameter-build.sagemaker.CreateModel",
                                  lambda params, **_: self.models.append(dict(params)))
        made.meta.events.register("before-parameter-build.sagemaker.UpdateEndpoint", self.record)
        made.meta.events.register("before-call.sagemaker.UpdateEndpoint", self.apply)
        made.meta.events.register("after-call.sagemaker.DescribeEndpoint", self.describe)
        return made


@pytest.fixture
def updates(monkeypatch):
    """UpdateEndpoint requests invmon sends, checked against botocore's model, applied to moto."""
    from pipeline.sagemaker import clients

    recorded = Updates()
    real_client = clients.client
    monkeypatch.setattr(clients, "client", lambda service, region: recorded.hook(real_client(service, region)))
    return recorded


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def resources(sm) -> tuple[list, list, list]:
    return ([m["ModelName"] for m in sm.list_models()["Models"]],
            [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]],
            [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]])


def s3():
    return clients.session(REGION).client("s3")


def approve(sm, *versions: int, status: str = "Approved") -> None:
    for version in versions:
        sm.update_model_package(ModelPackageArn=package(sm, version)["ModelPackageArn"],
                                ModelApprovalStatus=status)


def package(sm, version: int) -> dict:
    return sm.describe_model_package(
        ModelPackageName=f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{GROUP}/{version}")


def test_approve_and_reject_change_the_status_in_the_registry_with_notes(sm, capsys):
    code, out, _ = run(capsys, "models", "approve", "2", "--backend", "aws", "--note", "good on tape")
    assert code == 0 and "Approved" in out and "the approval rule deploys it" in out
    assert package(sm, 2)["ModelApprovalStatus"] == "Approved"
    assert package(sm, 2)["ApprovalDescription"] == "good on tape"
    assert resources(sm) == ([], [], [])  # on AWS the approval event deploys, not the CLI

    code, out, _ = run(capsys, "models", "reject", "1", "--backend", "aws", "--note", "blurry bins")
    assert code == 0 and "Rejected" in out
    assert package(sm, 1)["ModelApprovalStatus"] == "Rejected"
    assert package(sm, 1)["ApprovalDescription"] == "blurry bins"
    code, out, _ = run(capsys, "models", "show", "1", "--backend", "aws")
    assert '"note": "blurry bins"' in out


def test_deploy_of_an_approved_version_creates_model_config_and_endpoint(sm, capsys, updates):
    sm.update_model_package(ModelPackageArn=package(sm, 2)["ModelPackageArn"],
                            ModelApprovalStatus="Approved")
    code, out, err = run(capsys, "deploy", "--stage", "prod", "--backend", "aws",
                         "--instance-type", "ml.c5.xlarge")
    assert code == 0, err
    assert "bin-count-production now serves bin-count/2" in out
    models, configs, endpoints = resources(sm)
    assert endpoints == ["bin-count-production"] and len(models) == 1 and configs == models
    model = sm.describe_model(ModelName=models[0])
    assert model["ExecutionRoleArn"] == MODEL_ROLE
    # The model serves the verified copy under registry/, which the roles that build cannot
    # write, with the package's image; its environment names the package and the digest.
    digest = package(sm, 2)["CustomerMetadataProperties"]["ArtifactSha256"]
    copy = f"registry/bin-count/2/{digest}/model.tar.gz"
    assert model["Containers"] == [{"Image": IMAGE, "ModelDataUrl": f"s3://{ARTIFACTS}/{copy}", "Environment": {
        "INVMON_MODEL_PACKAGE_ARN": package(sm, 2)["ModelPackageArn"], "INVMON_ARTIFACT_SHA256": digest}}]
    assert hashlib.sha256(s3().get_object(Bucket=ARTIFACTS, Key=copy)["Body"].read()).hexdigest() == digest
    # moto does not echo EnableNetworkIsolation back: the request itself says it.
    assert updates.models[0]["EnableNetworkIsolation"] is True  # self-contained: no network at start
    config = sm.describe_endpoint_config(EndpointConfigName=configs[0])
    variant = config["ProductionVariants"][0]
    assert (variant["ModelName"], variant["InstanceType"]) == (models[0], "ml.c5.xlarge")
    # Production captures a sample of what it serves, requests and answers, for the monitor.
    assert config["DataCaptureConfig"] == {
        "EnableCapture": True, "InitialSamplingPercentage": 20,
        "DestinationS3Uri": f"s3://{ARTIFACTS}/capture/bin-count-production",
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]}}

    code, out, _ = run(capsys, "endpoints", "--backend", "aws")
    production = next(line for line in out.splitlines() if line.startswith("prod"))
    assert "bin-count-production" in production and " 2 " in production and "InService" in production


@pytest.mark.parametrize("status", ["PendingManualApproval", "Rejected"])
def test_deploy_of_a_version_not_approved_is_refused_and_changes_nothing(sm, capsys, status):
    sm.update_model_package(ModelPackageArn=package(sm, 1)["ModelPackageArn"],
                            ModelApprovalStatus=status)
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--version", "1", "--backend", "aws")
    assert code == 1 and f"refused: bin-count/1 is {status}" in err and "Traceback" not in err
    assert resources(sm) == ([], [], [])


def test_a_second_deploy_updates_in_place_with_blue_green_and_auto_rollback(sm, capsys, updates):
    """The update's traffic shifting itself (canary, linear, staging's all at once) is in
    tests/test_rollout.py."""
    for version in (1, 2):
        sm.update_model_package(ModelPackageArn=package(sm, version)["ModelPackageArn"],
                                ModelApprovalStatus="Approved")
    assert run(capsys, "deploy", "--stage", "prod", "--version", "1", "--backend", "aws")[0] == 0
    assert updates == []  # the first deploy creates the endpoint
    code, out, err = run(capsys, "deploy", "--stage", "prod", "--backend", "aws")
    assert code == 0, err
    assert "now serves bin-count/2 (was version 1)" in out

    (request,) = updates
    assert request["EndpointName"] == "bin-count-production"
    policy = request["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"]["Type"] == "CANARY"
    assert policy["TerminationWaitInSeconds"] > 0  # the old fleet is kept while the new one bakes
    assert request["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [
        {"AlarmName": "bin-count-production-invocation-5xx"},
        {"AlarmName": "bin-count-production-model-latency-p99"},
        {"AlarmName": "bin-count-production-low-confidence"}]}
    _, configs, endpoints = resources(sm)
    assert endpoints == ["bin-count-production"] and len(configs) == 2  # updated in place
    assert sm.describe_endpoint(EndpointName="bin-count-production")["EndpointConfigName"] == \
        request["EndpointConfigName"]
    code, out, _ = run(capsys, "endpoints", "--backend", "aws")
    assert " 2 " in next(line for line in out.splitlines() if line.startswith("prod"))


def test_staging_captures_everything_and_production_the_templates_share(sm, capsys, monkeypatch):
    approve(sm, 2)
    monkeypatch.setenv("INVMON_CAPTURE_PERCENT_PROD", "5")  # the stack's ProductionCapturePercent
    for stage in ("staging", "prod"):
        assert run(capsys, "deploy", "--stage", stage, "--backend", "aws")[0] == 0
    shares = {}
    for name in ("bin-count-staging", "bin-count-production"):
        config = sm.describe_endpoint_config(
            EndpointConfigName=sm.describe_endpoint(EndpointName=name)["EndpointConfigName"])
        shares[name] = (config["DataCaptureConfig"]["InitialSamplingPercentage"],
                        config["DataCaptureConfig"]["DestinationS3Uri"])
    assert shares == {"bin-count-staging": (100, f"s3://{ARTIFACTS}/capture/bin-count-staging"),
                      "bin-count-production": (5, f"s3://{ARTIFACTS}/capture/bin-count-production")}
    monkeypatch.setenv("INVMON_CAPTURE_PERCENT_PROD", "half")
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--version", "2", "--backend", "aws")
    assert code != 0 and "INVMON_CAPTURE_PERCENT_PROD='half': give a whole percentage, 0-100" in err


def test_rejecting_what_production_serves_rolls_back_or_flags(sm, capsys, updates):
    for version in (1, 2):
        sm.update_model_package(ModelPackageArn=package(sm, version)["ModelPackageArn"],
                                ModelApprovalStatus="Approved")
    assert run(capsys, "deploy", "--stage", "prod", "--backend", "aws")[0] == 0  # serves 2
    code, out, err = run(capsys, "models", "reject", "2", "--backend", "aws", "--note", "drift")
    assert code == 0, err
    assert "rolled back from Rejected version 2 to bin-count/1" in out
    assert len(updates) == 1 and updates[0]["DeploymentConfig"]["AutoRollbackConfiguration"]

    code, out, err = run(capsys, "models", "reject", "1", "--backend", "aws")
    assert code == 0 and "no other Approved version" in out and "flagged" in out
    assert len(updates) == 1  # production left as it is
    arn = sm.describe_endpoint(EndpointName="bin-count-production")["EndpointArn"]
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}
    assert "serves Rejected version 1" in tags["invmon:flag"]
    code, out, _ = run(capsys, "endpoints", "--backend", "aws")
    assert "serves Rejected version 1" in out


def test_start_refuses_parameters_that_name_the_production_endpoint(sm, capsys):
    from pipeline.sagemaker import clients, executions

    definition = {"Parameters": [{"Name": "ModelPackageGroupName", "DefaultValue": "bin-count"},
                                 {"Name": "StagingEndpointName", "DefaultValue": "bin-count-staging"},
                                 {"Name": "ModelApprovalStatus", "DefaultValue": "PendingManualApproval"}]}
    sm.create_pipeline(PipelineName="guarded", RoleArn=MODEL_ROLE,
                       PipelineDefinition=json.dumps({**definition, "Version": "2020-12-01", "Steps": []}))
    for params in ({"StagingEndpointName": "bin-count-production"}, {"ModelPackageGroupName": "other"}):
        with pytest.raises(clients.AwsError, match="deploys only to its group's staging endpoint"):
            executions.start(sm, "guarded", params)
    # A definition upserted before the approval status stopped being a parameter still declares
    # it: start refuses to set it all the same.
    with pytest.raises(clients.AwsError, match="ModelApprovalStatus refused: a run registers its model as "
                                           "PendingManualApproval; only a reviewer approves it"):
        executions.start(sm, "guarded", {"ModelApprovalStatus": "Approved"})
    assert sm.list_pipeline_executions(PipelineName="guarded")["PipelineExecutionSummaries"] == []
    assert executions.start(sm, "guarded", {})  # the group's own staging endpoint starts


def test_predict_invokes_the_sagemaker_endpoint(sm, capsys, tmp_path):
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    answer = {"count": 4, "probabilities": {"1": 0.0, "2": 0.0, "3": 0.1, "4": 0.8, "5": 0.1},
              "model_version": "bin-count/2"}
    sagemakerruntime_backends["123456789012"][REGION].results_queue.append(
        (json.dumps(answer), "application/json", "AllTraffic", ""))
    photo = tmp_path / "bin.jpg"
    photo.write_bytes(b"photo bytes")  # moto's runtime mock json-encodes the body: UTF-8 only
    code, out, err = run(capsys, "predict", "--backend", "aws", "--endpoint", "bin-count-production",
                         str(photo))
    assert code == 0, err
    assert f"{photo}: 4 items (p=0.80, model bin-count/2)" in out
    code, _, err = run(capsys, "predict", "--backend", "aws", str(photo))
    assert code == 2 and "--backend aws needs --endpoint NAME" in err


def test_aws_network_errors_are_one_line(capsys):
    from aws_testing import free_port

    env = aws_env(endpoint_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    env.update(AWS_MAX_ATTEMPTS="1", INVMON_MODEL_ROLE_ARN=MODEL_ROLE)
    with patched_environ(env):
        for argv in (["models", "list", "--backend", "aws"],
                     ["models", "approve", "1", "--backend", "aws"],
                     ["deploy", "--stage", "prod", "--backend", "aws"],
                     ["endpoints", "--backend", "aws"]):
            code, _, err = run(capsys, *argv)
            assert code == 1, argv
            assert "Could not connect to the endpoint URL" in err and "Traceback" not in err
            assert err.count("\n") == 1, err


# --------------------------------------------------------------------------- the Lambda


def deploy_function_zip() -> Path:
    """Built by the README's packaging command."""
    subprocess.run(["make", "-s", "deploy-function", f"PYTHON={sys.executable}"], cwd=ROOT,
                   check=True, capture_output=True, timeout=60)
    return ROOT / "build" / "deploy-function.zip"


LAMBDA_RUNNER = r"""
import importlib.abc, json, sys
# The Lambda runtime has boto3 but not the SageMaker SDK, torch or this project installed.
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sagemaker", "torch", "torchvision", "fastapi", "numpy", "PIL"):
            raise ImportError(f"{name} is not in the Lambda runtime")
sys.meta_path.insert(0, Absent())
sys.path = [p for p in sys.path if "site-packages" in p or "python3" in p and "wt-" not in p]
sys.path.insert(0, sys.argv[1])
import pipeline.registry.deploy
assert pipeline.registry.deploy.__file__.startswith(sys.argv[1]), pipeline.registry.deploy.__file__
for path in sys.argv[2:]:
    pipeline.registry.deploy.handler(json.load(open(path)), None)  # it logs its result as a JSON line
"""


@pytest.mark.slow
def test_the_deploy_function_deploys_approved_events_and_ignores_the_rest(tmp_path, monkeypatch):
    keep_customer_metadata(monkeypatch)
    archive = deploy_function_zip()
    with moto_server() as endpoint:
        env = aws_env(endpoint_url=endpoint)
        env.update(INVMON_MODEL_PACKAGE_GROUP=GROUP, INVMON_MODEL_ROLE_ARN=MODEL_ROLE,
                   INVMON_INSTANCE_TYPE="ml.m5.large", PYTHONPATH="")
        with patched_environ(env):
            sm = clients.session(REGION).client("sagemaker")
            register(sm)
            register(sm, "other-group", 1)
            for version in (1, 2):
                sm.update_model_package(ModelPackageArn=package(sm, version)["ModelPackageArn"],
                                        ModelApprovalStatus="Approved")
            sm.update_model_package(ModelPackageArn=package(sm, 1)["ModelPackageArn"],
                                    ModelApprovalStatus="Rejected")
            ignored = ["model_package_other_group_approved", "model_package_rejected",
                       "model_package_pending"]
            done = subprocess.run(
                [sys.executable, "-I", "-c", LAMBDA_RUNNER, str(archive),
                 *[str(EVENTS / f"{name}.json") for name in ignored]],
                env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            results = [json.loads(line) for line in done.stdout.splitlines()]
            assert [r["deployed"] for r in results] == [False, False, False]
            assert "is not 'bin-count'" in results[0]["ignored"]
            # A Rejected event rolls production back if it serves that version; here it serves nothing.
            assert results[1]["message"] == "bin-count-production left as it is: it does not serve bin-count/1"
            assert "'PendingManualApproval' is neither Approved nor Rejected" in results[2]["ignored"]
            assert resources(sm) == ([], [], [])

            done = subprocess.run(
                [sys.executable, "-I", "-c", LAMBDA_RUNNER, str(archive),
                 str(EVENTS / "model_package_approved.json"),
                 str(EVENTS / "model_package_approved.json")],  # EventBridge may deliver twice
                env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            first, again = (json.loads(line) for line in done.stdout.splitlines())
            name = sm.list_endpoint_configs()["EndpointConfigs"][0]["EndpointConfigName"]
            assert first == {"deployed": True, "endpoint": "bin-count-production", "version": 2,
                             "message": "bin-count-production now serves bin-count/2",
                             "event": "bin-count/2 Approved",
                             "rollout": "new endpoint: it takes all traffic once InService (no fleet to shift from)",
                             "pruned": f"bin-count-production: nothing to delete; kept {name} (current, version 2)"}
            assert again["deployed"] is False and "already serves bin-count/2" in again["message"]
            models, configs, endpoints = resources(sm)
            assert endpoints == ["bin-count-production"] and len(models) == len(configs) == 1
            assert sm.describe_model(ModelName=models[0])["Containers"][0]["Environment"][
                "INVMON_MODEL_PACKAGE_ARN"] == package(sm, 2)["ModelPackageArn"]

            # The endpoint's InService event (rule EndpointInServiceRule): its scaling, from the zip.
            done = subprocess.run(
                [sys.executable, "-I", "-c", LAMBDA_RUNNER, str(archive), str(EVENTS / "endpoint_in_service.json")],
                env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            (scaled,) = (json.loads(line) for line in done.stdout.splitlines())
            assert scaled["scaling"] == ("bin-count-production scales between 2 and 4 instances at 600 "
                                         "invocations a minute per instance")
            (target,) = clients.session(REGION).client("application-autoscaling").describe_scalable_targets(
                ServiceNamespace="sagemaker")["ScalableTargets"]
            assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (
                "endpoint/bin-count-production/variant/AllTraffic", 2, 4)


def test_models_show_names_the_report_the_register_step_recorded(sm, capsys):
    """The Register step's CustomerMetadataProperties (see test_sagemaker_definition) read back."""
    report = "s3://bucket/bin-count/exec-1/Evaluate/evaluation/report.html"
    sm.create_model_package_group(ModelPackageGroupName="with-report")
    sm.create_model_package(
        ModelPackageGroupName="with-report", ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl": "s3://bucket/m/model.tar.gz"}],
                                "SupportedContentTypes": ["image/jpeg"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        CustomerMetadataProperties={"EvaluationReport": report})
    code, out, _ = run(capsys, "models", "show", "1", "--group", "with-report", "--backend", "aws")
    assert code == 0 and f"evaluation report: {report}" in out.splitlines()
    code, out, _ = run(capsys, "models", "show", "1", "--backend", "aws")  # registered without one
    assert code == 0 and "evaluation report: none recorded for this version" in out


# --------------------------------------------------------------------------- the gate, attacked


def event(version: int, status: str = "Approved") -> dict:
    """An EventBridge "SageMaker Model Package State Change" for bin-count/`version`."""
    made = json.loads((EVENTS / "model_package_approved.json").read_text())
    arn = f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{GROUP}/{version}"
    made["resources"] = [arn]
    made["detail"].update(ModelPackageVersion=version, ModelPackageArn=arn, ModelApprovalStatus=status,
                          ModelPackageName=f"{GROUP}/{version}")
    return made


def deliver(*events_: dict) -> list[dict]:
    from pipeline.registry import deploy

    with patched_environ({**os.environ, "INVMON_MODEL_PACKAGE_GROUP": GROUP}):
        return [deploy.handler(e) for e in events_]


def production(sm) -> int | None:
    from pipeline.registry import deploy

    found = deploy.sagemaker_target(sm).current("bin-count-production")
    return found.version if found else None


def test_a_swapped_artifact_is_refused_at_deploy_naming_both_digests(sm, capsys, updates):
    approve(sm, 2)
    recorded = package(sm, 2)["CustomerMetadataProperties"]["ArtifactSha256"]
    swapped = b"a model.tar.gz whose code/inference.py does something else"
    s3().put_object(Bucket=ARTIFACTS, Key="bin-count/1/model.tar.gz", Body=swapped)  # version 2's object
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--backend", "aws")
    assert code == 1 and "Traceback" not in err
    assert (f"refused: the artifact of bin-count/2 is not the one registered: s3://{ARTIFACTS}/bin-count/1/"
            f"model.tar.gz has SHA-256 {hashlib.sha256(swapped).hexdigest()}, the registry recorded {recorded}"
            in err)
    assert resources(sm) == ([], [], [])
    from pipeline.registry.stages import DeployError

    with pytest.raises(DeployError, match=f"has SHA-256 {hashlib.sha256(swapped).hexdigest()}, the registry "
                                          f"recorded {recorded}"):
        deliver(event(2))  # the deploy function's invocation fails: its error alarm fires
    assert resources(sm) == ([], [], [])


def test_a_swapped_registry_copy_is_refused_too(sm, capsys, updates):
    approve(sm, 1, 2)
    assert run(capsys, "deploy", "--stage", "prod", "--version", "2", "--backend", "aws")[0] == 0
    recorded = package(sm, 2)["CustomerMetadataProperties"]["ArtifactSha256"]
    s3().put_object(Bucket=ARTIFACTS, Key=f"registry/bin-count/2/{recorded}/model.tar.gz", Body=b"swapped")
    assert run(capsys, "deploy", "--stage", "prod", "--version", "1", "--backend", "aws")[0] == 0
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--version", "2", "--backend", "aws")
    assert code == 1 and f"has SHA-256 {hashlib.sha256(b'swapped').hexdigest()}, the registry recorded {recorded}" in err
    assert production(sm) == 1


def test_duplicate_stale_out_of_order_and_late_events_leave_production_on_the_newest_approved(sm, updates):
    approve(sm, 1, 2, 3)
    # Out of order: version 3's approval arrives before version 2's, then version 1's, late.
    results = deliver(event(3), event(2), event(1), event(3))
    assert [r["deployed"] for r in results] == [True, False, False, False]
    assert results[1]["message"] == ("bin-count-production left as it is: bin-count/3 is the newest "
                                     "Approved version, not bin-count/2")
    assert "bin-count/3 is the newest Approved version, not bin-count/1" in results[2]["message"]
    assert results[3]["message"] == "bin-count-production already serves bin-count/3"  # a duplicate
    assert production(sm) == 3
    # A reviewer rejects 3 in the console: its Rejected event rolls production back to 2 ...
    approve(sm, 3, status="Rejected")
    (rolled,) = deliver(event(3, "Rejected"))
    assert rolled["deployed"] and rolled["message"] == ("bin-count-production rolled back from Rejected "
                                                        "version 3 to bin-count/2")
    # ... and 3's approval, delivered again late, changes nothing.
    (late,) = deliver(event(3))
    assert not late["deployed"] and late["message"] == "bin-count-production left as it is: bin-count/3 is Rejected now"
    assert production(sm) == 2
    models, configs, _ = resources(sm)
    assert len(models) == len(configs) == 2  # one per version served, none orphaned


def test_two_deliveries_at_once_switch_once_and_neither_fails(sm, updates):
    approve(sm, 1)
    deliver(event(1))
    approve(sm, 2)
    updates.hold, updates.barrier = True, threading.Barrier(2)  # both reach UpdateEndpoint together
    results, errors = [], []

    def one():
        try:
            results.extend(deliver(event(2)))
        except Exception as exc:  # a failed invocation
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(r["deployed"] for r in results) == [False, True]
    (second,) = [r for r in results if not r["deployed"]]
    assert "another delivery is switching it to bin-count-production-v2-" in second["message"]
    assert len(updates) == 2  # both asked; SageMaker refused the second as in progress
    updates.finish()
    assert production(sm) == 2
    models, configs, _ = resources(sm)
    assert len(models) == len(configs) == 2  # the second delivery built nothing of its own


def test_a_version_rejected_while_it_deploys_is_not_switched(sm, updates):
    approve(sm, 1)
    deliver(event(1))
    approve(sm, 2)
    before = resources(sm)

    def reviewer_rejects(**_):  # between the function's first check and its switch
        approve(sm, 2, status="Rejected")

    updates.after["CreateEndpointConfig"] = reviewer_rejects
    (result,) = deliver(event(2))
    assert not result["deployed"]
    assert result["message"] == "bin-count-production left as it is: not switched: bin-count/2 is Rejected now"
    assert production(sm) == 1 and len(updates) == 0
    assert resources(sm) == before  # what it had built for version 2 is gone again


def test_reject_that_cannot_read_production_fails_and_flags(sm, capsys, updates, monkeypatch):
    approve(sm, 1, 2)
    assert run(capsys, "deploy", "--stage", "prod", "--backend", "aws")[0] == 0
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    updates.fail("DescribeEndpointConfig")  # throttled: what production serves cannot be read
    code, out, err = run(capsys, "models", "reject", "2", "--backend", "aws")
    assert code == 1 and "Traceback" not in err
    assert ("bin-count/2 is Rejected, but what bin-count-production serves could not be read "
            "(SageMaker refused describe_endpoint_config: ThrottlingException: Rate exceeded); it is flagged") in err
    assert package(sm, 2)["ModelApprovalStatus"] == "Rejected"
    arn = sm.describe_endpoint(EndpointName="bin-count-production")["EndpointArn"]
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}
    assert "not read after bin-count/2 was rejected" in tags["invmon:flag"]


def test_reject_while_production_switches_to_it_fails_and_flags(sm, capsys, updates):
    approve(sm, 1, 2)
    assert run(capsys, "deploy", "--stage", "prod", "--version", "1", "--backend", "aws")[0] == 0
    updates.hold = True
    assert run(capsys, "deploy", "--stage", "prod", "--backend", "aws")[0] == 0  # switching to 2
    code, _, err = run(capsys, "models", "reject", "2", "--backend", "aws")
    assert code == 1
    assert "bin-count/2 is Rejected, but bin-count-production is switching to it right now (Updating)" in err
    arn = sm.describe_endpoint(EndpointName="bin-count-production")["EndpointArn"]
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}
    assert "switching to Rejected version 2" in tags["invmon:flag"]
    updates.finish()
    updates.hold = False
    code, out, _ = run(capsys, "models", "reject", "2", "--backend", "aws")  # again, once it ended
    assert code == 0 and "rolled back from Rejected version 2 to bin-count/1" in out
    assert production(sm) == 1


def test_a_model_made_in_advance_under_the_deploys_name_is_refused(sm, capsys, updates):
    """Model names are predictable (endpoint, version, digest, settings), and the pipeline role may
    create models named <pipeline>-*, which is <group>-* by default: a model planted under the
    name the deploy will use, pointing at another artifact, is refused, not served."""
    from pipeline.registry import deploy
    from pipeline.registry.sagemaker import SageMakerRegistry

    approve(sm, 2)
    target = deploy.sagemaker_target(sm)
    version = SageMakerRegistry(sagemaker_client=sm).get(GROUP, 2)
    name = target.resource_name("bin-count-production", version, IMAGE)
    s3().put_object(Bucket=ARTIFACTS, Key="planted/model.tar.gz", Body=b"someone else's model")
    sm.create_model(ModelName=name, ExecutionRoleArn=MODEL_ROLE,
                    Containers=[{"Image": IMAGE, "ModelDataUrl": f"s3://{ARTIFACTS}/planted/model.tar.gz"}])
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--backend", "aws")
    assert code == 1 and f"refused: {name} exists already and is not what this deploy would make" in err
    assert resources(sm)[1:] == ([], [])  # no config, no endpoint


# --------------------------------------------------------------------------- the smoke test gate on production

EXECUTION = f"arn:aws:sagemaker:{REGION}:123456789012:pipeline/bin-count/execution/"


def register_smoked(sm, smoke: dict, made_by: str = "exec-4") -> int:
    """One more version, registered by execution `made_by` with these smoke test properties."""
    body = b"model.tar.gz of the smoked version"
    s3().put_object(Bucket=ARTIFACTS, Key=f"{GROUP}/smoked/model.tar.gz", Body=body)
    arn = sm.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl":
                                                f"s3://{ARTIFACTS}/{GROUP}/smoked/model.tar.gz"}],
                                "SupportedContentTypes": ["image/jpeg"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        MetadataProperties={"GeneratedBy": EXECUTION + made_by},
        CustomerMetadataProperties={"ArtifactSha256": hashlib.sha256(body).hexdigest(), **smoke},
    )["ModelPackageArn"]
    return int(arn.rsplit("/", 1)[1])


def alerts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def serving_2(sm, updates, tmp_path):
    """Production serves version 2 (approved, smoke test passed); alerts go to a file."""
    os.environ["INVMON_NOTIFICATIONS"] = str(tmp_path / "alerts.jsonl")  # restored with the environment
    approve(sm, 2)
    assert [r["deployed"] for r in deliver(event(2))] == [True]
    return tmp_path / "alerts.jsonl"


@pytest.mark.parametrize("smoke, reason", [
    ({}, "bin-count/4 has no staging smoke test result"),
    ({"SmokeTest": "failed", "SmokeTestDetail": "3 of 10 photos got no good answer",
      "SmokeTestRun": EXECUTION + "exec-4"},
     "bin-count/4 failed its staging smoke test: 3 of 10 photos got no good answer"),
    ({"SmokeTest": "passed", "SmokeTestRun": EXECUTION + "exec-1"},
     f"bin-count/4's smoke test result was recorded by {EXECUTION}exec-1, not by {EXECUTION}exec-4"),
], ids=["never-ran", "failed", "another-execution"])
def test_a_console_approval_without_its_own_passing_smoke_test_changes_nothing_and_alerts(
        sm, serving_2, smoke, reason):
    """The bypass closed: a reviewer approves in the console (no CLI gate), the approval event
    reaches the deploy function, which refuses; production keeps version 2, unflagged, and the
    deploy-failed alert names the reason."""
    version = register_smoked(sm, smoke)
    approve(sm, version)
    before = resources(sm)
    (result,) = deliver(event(version))
    assert result["deployed"] is False and reason in result["refused"]
    assert result["message"] == result["refused"] and "left as it is" in result["message"]
    assert production(sm) == 2 and resources(sm) == before
    from pipeline.registry import deploy

    assert deploy.sagemaker_target(sm).current("bin-count-production").flag == ""  # nothing flagged
    (alert,) = [a for a in alerts(serving_2) if a["kind"] == "deploy-failed"]
    assert reason in alert["message"] and alert["version"] == version
    assert package(sm, version)["ModelApprovalStatus"] == "Approved"  # the reviewer's decision stands


def test_deploy_prod_by_hand_applies_the_same_gate(sm, serving_2, capsys):
    version = register_smoked(sm, {"SmokeTest": "failed", "SmokeTestRun": EXECUTION + "exec-4"})
    approve(sm, version)
    before = resources(sm)
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--backend", "aws", "--version", str(version))
    assert code == 1 and err.count("\n") == 1
    assert f"invmon: error: refused: bin-count/{version} failed its staging smoke test" in err
    assert production(sm) == 2 and resources(sm) == before


def test_a_passing_smoke_test_of_its_own_execution_deploys(sm, serving_2):
    version = register_smoked(sm, {"SmokeTest": "passed", "SmokeTestRun": EXECUTION + "exec-4"})
    approve(sm, version)
    (result,) = deliver(event(version))
    assert result["deployed"] is True and "refused" not in result
    assert production(sm) == version
    assert [a["kind"] for a in alerts(serving_2)] == ["deploy", "deploy"]


def test_the_operators_override_is_recorded_before_approval_and_deploys(sm, serving_2, capsys):
    version = register_smoked(sm, {"SmokeTest": "failed", "SmokeTestDetail": "p95 latency 2300 ms",
                                   "SmokeTestRun": EXECUTION + "exec-4"})
    code, _, err = run(capsys, "models", "approve", str(version), "--backend", "aws")
    assert code == 1 and "--force-no-smoke" in err
    assert package(sm, version)["ModelApprovalStatus"] == "PendingManualApproval"
    assert "SmokeTestOverride" not in package(sm, version)["CustomerMetadataProperties"]

    code, _, err = run(capsys, "models", "approve", str(version), "--backend", "aws", "--force-no-smoke",
                       "--note", "hotfix for the night shift (ticket #42)")
    assert code == 0, err
    recorded = package(sm, version)
    assert recorded["ModelApprovalStatus"] == "Approved"
    override = recorded["CustomerMetadataProperties"]["SmokeTestOverride"]
    # Who (the caller's identity), why (the note) and what it overrode, as a property may hold it.
    assert override.startswith("by arn:aws:sts::123456789012:") and "hotfix for the night shift" in override
    assert f"bin-count/{version} failed its staging smoke test: p95 latency 2300 ms" in override
    assert len(override) <= 256 and "(" not in override and "#" not in override
    assert "--force-no-smoke" in recorded["ApprovalDescription"]
    (result,) = deliver(event(version))
    assert result["deployed"] is True and production(sm) == version


def test_a_rollback_skips_an_approved_version_without_a_passing_smoke_test(sm, serving_2):
    """Rejecting what production serves must not put an unsmoked Approved version there either."""
    version = register_smoked(sm, {})
    approve(sm, version)
    assert deliver(event(version))[0]["deployed"] is False
    approve(sm, 1)  # passed: the rollback's target
    approve(sm, 2, status="Rejected")
    (rolled,) = deliver(event(2, "Rejected"))
    assert rolled["deployed"] and rolled["message"].endswith("to bin-count/1")
    assert production(sm) == 1
