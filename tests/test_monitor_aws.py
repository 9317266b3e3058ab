"""The drift monitor on AWS, under moto: the scheduled function (pipeline/sagemaker/monitor_job.py)
starts a processing job of scripts/monitor/monitor.py for each stage endpoint serving a version
with a baseline, with the right inputs, arguments and role, and skips the rest saying why; the
staged code runs as the job's entry point runs it; monitor.py publishes the metric the stack's
drift alarm reads, and only when asked.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from aws_testing import REGION, ROOT, aws_env, free_port, keep_customer_metadata, moto_server, patched_environ
from pipeline.registry import deploy
from pipeline.registry.capture import capture_settings, capture_uri
from pipeline.registry.sagemaker_target import SageMakerTarget
from pipeline.registry.stages import endpoint_name
from pipeline.sagemaker import monitor_job
from pipeline.sagemaker import clients

GROUP = "bin-count"
BUCKET = "invmon-artifacts"
ACCOUNT = "123456789012"
JOB_ROLE = f"arn:aws:iam::{ACCOUNT}:role/invmon-MonitorJobRole-ABC"
MODEL_ROLE = f"arn:aws:iam::{ACCOUNT}:role/invmon-ModelRole-ABC"
PIPELINE_ROLE = f"arn:aws:iam::{ACCOUNT}:role/invmon-PipelineRole-ABC"
IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-inference:2.6-cpu-py312"
MODEL_ID = "bin-count-3f2a9c"  # what the served artifact's answers name (no MODEL_VERSION set)
SCHEDULED = {"version": "0", "id": "5b3f0f4e", "detail-type": "Scheduled Event", "source": "aws.events",
             "account": ACCOUNT, "time": "2026-12-06T03:00:00Z", "region": REGION,
             "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/invmon-MonitorScheduleRule-X"], "detail": {}}
CAPTURE_DAYS = ("2026/11/20/09", "2026/12/05/10", "2026/12/06/01")


def function_env(**extra) -> dict:
    return {"INVMON_MODEL_PACKAGE_GROUP": GROUP, "INVMON_ARTIFACT_BUCKET": BUCKET,
            "INVMON_MONITOR_ROLE_ARN": JOB_ROLE, "INVMON_MONITOR_JOB_PREFIX": "invmon/monitor-job",
            "INVMON_MONITOR_SCHEDULE": "rate(1 day)", **extra}


def sagemaker_capture_line(count: int = 3) -> str:
    return json.dumps({"captureData": {
        "endpointInput": {"observedContentType": "image/jpeg", "mode": "INPUT", "data": "AAAA", "encoding": "BASE64"},
        "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT", "encoding": "JSON",
                           "data": json.dumps({"count": count, "model_version": MODEL_ID})}},
        "eventMetadata": {"eventId": "e1", "inferenceTime": "2026-12-05T10:00:00Z"}, "eventVersion": "0"})


def build_world(sm, s3, *, staging_baseline: bool = False, capture: bool = True) -> dict:
    """The group with two versions; production serves version 1 (with a baseline) through the
    deploy code, staging serves version 2 (without one unless asked) as the pipeline's Deploy
    step leaves it: a model of the registered artifact with nothing naming the package."""
    s3.create_bucket(Bucket=BUCKET)
    sm.create_model_package_group(ModelPackageGroupName=GROUP)
    packages = {}
    for version in (1, 2):
        run = f"{GROUP}/exec-{version}"
        body = b"model.tar.gz of version %d" % version
        s3.put_object(Bucket=BUCKET, Key=f"{run}/Train/model.tar.gz", Body=body)
        # A passed smoke test: production's deploy refuses a version without one.
        properties = {"ArtifactSha256": hashlib.sha256(body).hexdigest(), "SmokeTest": "passed"}
        if version == 1 or staging_baseline:
            key = f"{run}/Evaluate/evaluation/baseline.json"
            s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(
                {"format": 1, "model": {"model_id": MODEL_ID if version == 1 else "staging-model"},
                 "predicted_counts": {"1": 1}}).encode())
            properties["MonitoringBaseline"] = f"s3://{BUCKET}/{key}"
        packages[version] = sm.create_model_package(
            ModelPackageGroupName=GROUP, ModelApprovalStatus="PendingManualApproval",
            InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl": f"s3://{BUCKET}/{run}/Train/model.tar.gz"}],
                                    "SupportedContentTypes": ["image/jpeg"],
                                    "SupportedResponseMIMETypes": ["application/json"]},
            CustomerMetadataProperties=properties)["ModelPackageArn"]
    sm.update_model_package(ModelPackageArn=packages[1], ModelApprovalStatus="Approved")
    from pipeline.registry.sagemaker import SageMakerRegistry

    target = SageMakerTarget(sm, MODEL_ROLE, s3=s3)
    outcome = deploy.deploy(SageMakerRegistry(sagemaker_client=sm, s3_client=s3), target, GROUP, "prod", 1)
    assert outcome.changed
    staging = endpoint_name(GROUP, "staging")
    sm.create_model(ModelName=f"{GROUP}-Deploy-abc123", ExecutionRoleArn=PIPELINE_ROLE,
                    PrimaryContainer={"Image": IMAGE, "ModelDataUrl": f"s3://{BUCKET}/{GROUP}/exec-2/Train/model.tar.gz",
                                      "Environment": {"SAGEMAKER_PROGRAM": "inference.py"}})
    sm.create_endpoint_config(
        EndpointConfigName=f"{staging}-exec2", ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": f"{GROUP}-Deploy-abc123", "InitialInstanceCount": 1,
            "InstanceType": "ml.m5.large"}],
        DataCaptureConfig={**capture_settings(100), "DestinationS3Uri": capture_uri(BUCKET, staging)})
    sm.create_endpoint(EndpointName=staging, EndpointConfigName=f"{staging}-exec2")
    if capture:
        for endpoint in (endpoint_name(GROUP, "prod"), staging):
            for hour in CAPTURE_DAYS:
                s3.put_object(Bucket=BUCKET, Key=f"capture/{endpoint}/{endpoint}/AllTraffic/{hour}/part.jsonl",
                              Body=(sagemaker_capture_line() + "\n").encode())
    spec = monitor_job.stage(BUCKET, region=REGION, s3=s3)
    return {"packages": packages, "spec": spec}


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    keep_customer_metadata(monkeypatch)
    with patched_environ({**aws_env(), **function_env()}), mock_aws():
        session = clients.session(REGION)
        yield session.client("sagemaker"), session.client("s3")


@pytest.fixture
def sent(monkeypatch) -> list[dict]:
    """Every CreateProcessingJob request the function sends, as sent (moto keeps only part of it)."""
    from pipeline.sagemaker import clients

    requests: list[dict] = []
    real = clients.client

    def recording(service, region):
        made = real(service, region)
        made.meta.events.register("before-parameter-build.sagemaker.CreateProcessingJob",
                                  lambda params, **_: requests.append(json.loads(json.dumps(params))))
        return made

    monkeypatch.setattr(monitor_job, "client", recording)
    return requests


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def event_at(when: str) -> dict:
    return {**SCHEDULED, "time": when}


# --------------------------------------------------------------------------- the function


def test_a_job_for_the_endpoint_serving_a_baseline_and_a_reasoned_skip_for_the_other(aws, sent, capsys):
    sm, s3 = aws
    world = build_world(sm, s3)
    result = monitor_job.handler(SCHEDULED, now=at("2026-12-06T03:00:41Z"))
    assert result["failed"] == {}
    (started,) = result["started"]
    production = "bin-count-production"
    assert started == {
        "endpoint": production, "version": "bin-count/1", "job": "bin-count-mon-prod-2612060300",
        "window": ["2026-12-05T03:00:00Z", "2026-12-06T03:00:00Z"], "model_version": MODEL_ID,
        "output": f"s3://{BUCKET}/monitor/{production}/20261206-0300"}
    # Staging serves version 2, found by its artifact (the pipeline's model names no package),
    # which has no baseline: skipped, saying so, and the function did not fail.
    assert "bin-count/2 has no MonitoringBaseline" in result["skipped"]["bin-count-staging"]
    assert "bin-count-staging skipped: bin-count/2 has no MonitoringBaseline" in capsys.readouterr().out

    job = sm.describe_processing_job(ProcessingJobName=started["job"])
    assert job["RoleArn"] == JOB_ROLE
    app = job["AppSpecification"]
    assert app["ImageUri"] == world["spec"]["image"] == \
        f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-training:2.10-cpu-py313"
    assert app["ContainerEntrypoint"][:2] == ["/bin/bash", "-c"]
    assert world["spec"]["code_sha256"] in app["ContainerEntrypoint"][2]
    assert app["ContainerArguments"] == [
        "--capture", "/opt/ml/processing/capture", "--baseline", "/opt/ml/processing/baseline/baseline.json",
        "--model", "/opt/ml/processing/model/model.tar.gz", "--output", "/opt/ml/processing/monitor",
        "--since", "2026-12-05T03:00:00Z", "--until", "2026-12-06T03:00:00Z", "--model-version", MODEL_ID,
        "--cloudwatch-namespace", "invmon/Monitor", "--endpoint", production]
    inputs = {i["InputName"]: (i["S3Input"]["S3Uri"], i["S3Input"]["LocalPath"]) for i in job["ProcessingInputs"]}
    package = sm.describe_model_package(ModelPackageName=world["packages"][1])
    capture = f"s3://{BUCKET}/capture/{production}/{production}/AllTraffic"
    assert inputs == {
        "code": (world["spec"]["code"], "/opt/ml/processing/input/code"),
        "baseline": (package["CustomerMetadataProperties"]["MonitoringBaseline"], "/opt/ml/processing/baseline"),
        "model": (package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"], "/opt/ml/processing/model"),
        # Only the days of the window: not the capture of November.
        "capture-0": (f"{capture}/2026/12/05/", "/opt/ml/processing/capture/0"),
        "capture-1": (f"{capture}/2026/12/06/", "/opt/ml/processing/capture/1")}
    assert job["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"] == started["output"]
    (request,) = sent  # as sent: what moto does not keep
    assert request["Environment"] == {"AWS_DEFAULT_REGION": REGION}  # boto3 in the job, for the metrics
    assert request["ProcessingResources"]["ClusterConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert {t["Key"]: t["Value"] for t in request["Tags"]} == {
        "invmon:endpoint": production, "invmon:model-package": world["packages"][1]}


def test_the_window_starts_where_the_last_one_ended_and_a_repeated_event_starts_nothing(aws):
    sm, s3 = aws
    build_world(sm, s3, staging_baseline=True)
    first = monitor_job.handler(SCHEDULED, now=at("2026-12-06T03:00:05Z"))
    assert sorted(s["job"] for s in first["started"]) == ["bin-count-mon-prod-2612060300",
                                                          "bin-count-mon-staging-2612060300"]
    staging = next(s for s in first["started"] if s["endpoint"] == "bin-count-staging")
    assert staging["version"] == "bin-count/2" and staging["model_version"] == "staging-model"
    # EventBridge delivers the same event again: the window is monitored already.
    again = monitor_job.handler(SCHEDULED, now=at("2026-12-06T03:02:00Z"))
    assert again["started"] == [] and again["failed"] == {}
    assert "monitored up to 2026-12-06T03:00:00Z already" in again["skipped"]["bin-count-production"]
    # A schedule that missed a day: the next window runs from where the last one ended.
    later = monitor_job.handler(event_at("2026-12-08T03:00:00Z"), now=at("2026-12-08T03:00:09Z"))
    prod = next(s for s in later["started"] if s["endpoint"] == "bin-count-production")
    assert prod["window"] == ["2026-12-06T03:00:00Z", "2026-12-08T03:00:00Z"]
    # An event from the future is read as now: a window never reaches past the clock.
    early = monitor_job.handler(event_at("2026-12-30T00:00:00Z"), now=at("2026-12-09T03:00:00Z"))
    assert {s["window"][1] for s in early["started"]} <= {"2026-12-09T03:00:00Z"}


def test_a_job_name_taken_by_another_role_is_refused_and_ignored_as_a_previous_window(aws):
    """A pipeline run may create processing jobs named <pipeline>-*, and the pipeline is named as
    the group by default: one named like the monitor's next job must neither stand in for it
    nor move its window."""
    sm, s3 = aws
    build_world(sm, s3)
    monitor_job.handler(SCHEDULED, now=at("2026-12-06T03:00:05Z"))
    for name, until in (("bin-count-mon-prod-2612070300", "2026-12-07T03:00:00Z"),
                        ("bin-count-mon-prod-2612061200", "2026-12-20T00:00:00Z")):
        sm.create_processing_job(
            ProcessingJobName=name, RoleArn=PIPELINE_ROLE,
            AppSpecification={"ImageUri": "attacker/image", "ContainerArguments": ["--until", until]},
            ProcessingResources={"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large",
                                                   "VolumeSizeInGB": 1}},
            StoppingCondition={"MaxRuntimeInSeconds": 60})
    with pytest.raises(monitor_job.MonitorJobError) as failed:
        monitor_job.handler(event_at("2026-12-07T03:00:00Z"), now=at("2026-12-07T03:00:05Z"))
    assert "bin-count-production: refused: a processing job bin-count-mon-prod-2612070300 exists and does " \
           "not run as the monitor's role" in str(failed.value)
    later = monitor_job.handler(event_at("2026-12-08T03:00:00Z"), now=at("2026-12-08T03:00:05Z"))
    (prod,) = later["started"]
    assert prod["window"] == ["2026-12-06T03:00:00Z", "2026-12-08T03:00:00Z"]  # ours, not theirs


def test_no_endpoint_no_capture_and_other_events_start_nothing(aws):
    sm, s3 = aws
    s3.create_bucket(Bucket=BUCKET)
    monitor_job.stage(BUCKET, region=REGION, s3=s3)
    result = monitor_job.handler(SCHEDULED, now=at("2026-12-06T03:00:05Z"))
    assert result["skipped"] == {"bin-count-staging": "no such endpoint", "bin-count-production": "no such endpoint"}
    alarm = {**SCHEDULED, "source": "aws.cloudwatch", "detail-type": "CloudWatch Alarm State Change"}
    assert monitor_job.handler(alarm)["ignored"] == "not the monitor schedule ('CloudWatch Alarm State Change')"
    assert sm.list_processing_jobs()["ProcessingJobSummaries"] == []


def test_nothing_captured_in_the_window_is_a_skip(aws):
    sm, s3 = aws
    build_world(sm, s3, capture=False)
    result = monitor_job.handler(SCHEDULED, now=at("2026-12-06T03:00:05Z"))
    assert result["started"] == []
    assert result["skipped"]["bin-count-production"] == \
        "nothing captured from 2026-12-05T03:00:00Z to 2026-12-06T03:00:00Z"


def test_an_unstaged_job_is_one_failure_that_names_the_command(aws):
    sm, s3 = aws
    s3.create_bucket(Bucket=BUCKET)
    with pytest.raises(monitor_job.MonitorJobError) as failed:
        monitor_job.handler(SCHEDULED)
    assert "python -m pipeline.sagemaker.monitor_job stage --bucket invmon-artifacts" in str(failed.value)


def test_the_windows_period_comes_from_the_schedule():
    assert monitor_job.period_of("rate(1 day)") == timedelta(days=1)
    assert monitor_job.period_of("rate(6 hours)") == timedelta(hours=6)
    assert monitor_job.period_of("rate(30 minutes)") == timedelta(minutes=30)
    assert monitor_job.period_of("cron(0 3 * * ? *)") == monitor_job.DEFAULT_PERIOD
    # The longest group the template allows still gives a valid job name.
    name = monitor_job.job_name("g" * 39, "staging", datetime(2026, 12, 6, 3, tzinfo=timezone.utc))
    assert len(name) <= 63


# --------------------------------------------------------------------------- the packaged function


LAMBDA_RUNNER = r"""
import importlib.abc, json, sys
class Absent(importlib.abc.MetaPathFinder):  # the Lambda runtime: boto3, no SDK, no torch, no numpy
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sagemaker", "torch", "torchvision", "numpy", "PIL", "steps"):
            raise ImportError(f"{name} is not in the Lambda runtime")
sys.meta_path.insert(0, Absent())
sys.path = [p for p in sys.path if "site-packages" in p or "python3" in p and "wt-" not in p]
sys.path.insert(0, sys.argv[1])
from pipeline.sagemaker import monitor_job
assert monitor_job.__file__.startswith(sys.argv[1]), monitor_job.__file__
monitor_job.handler(json.loads(sys.argv[2]))
"""


def test_the_packaged_function_starts_the_job_with_boto3_alone(tmp_path, monkeypatch):
    keep_customer_metadata(monkeypatch)
    subprocess.run(["make", "-s", "deploy-function", f"PYTHON={sys.executable}"], cwd=ROOT,
                   check=True, capture_output=True, timeout=60)
    archive = ROOT / "build" / "deploy-function.zip"
    with moto_server() as endpoint:
        env = {**aws_env(endpoint_url=endpoint), **function_env(), "PYTHONPATH": ""}
        with patched_environ(env):
            session = clients.session(REGION)
            sm, s3 = session.client("sagemaker"), session.client("s3")
            build_world(sm, s3)
            event = {**SCHEDULED, "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:00Z")}
            day = datetime.now(timezone.utc).strftime("%Y/%m/%d/%H")
            s3.put_object(Bucket=BUCKET, Key=f"capture/bin-count-production/bin-count-production/AllTraffic/{day}/p.jsonl",
                          Body=sagemaker_capture_line().encode())
            done = subprocess.run([sys.executable, "-I", "-c", LAMBDA_RUNNER, str(archive), json.dumps(event)],
                                  env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout.splitlines()[-1])
            assert [s["endpoint"] for s in result["started"]] == ["bin-count-production"]
            assert sm.describe_processing_job(ProcessingJobName=result["started"][0]["job"])["RoleArn"] == JOB_ROLE


# --------------------------------------------------------------------------- the staged code


def staged_tarball(aws) -> tuple[dict, bytes]:
    sm, s3 = aws
    s3.create_bucket(Bucket=BUCKET)
    spec = monitor_job.stage(BUCKET, region=REGION, s3=s3)
    body = s3.get_object(Bucket=BUCKET, Key="invmon/monitor-job/sourcedir.tar.gz")["Body"].read()
    return spec, body


def run_entrypoint(code_dir: Path, spec: dict, *args: str) -> subprocess.CompletedProcess:
    """The job's entry point, as the container runs it, with the code folder at `code_dir`."""
    script = monitor_job.ENTRYPOINT.format(code=code_dir, sha256=spec["code_sha256"], tarball=monitor_job.CODE_FILE)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PIP_NO_INDEX": "1", "PYTHONPATH": ""}  # satisfied requirements: pip installs nothing
    return subprocess.run(["/bin/bash", "-c", script, "monitor", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_staged_code_runs_under_the_jobs_entry_point_and_a_changed_one_does_not(aws, tmp_path):
    spec, body = staged_tarball(aws)
    assert hashlib.sha256(body).hexdigest() == spec["code_sha256"]
    assert spec["code"] == f"s3://{BUCKET}/invmon/monitor-job/sourcedir.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = set(tar.getnames())
    assert {"monitor.py", "cloudwatch.py", "captures.py", "drift.py", "photos.py", "requirements.txt"} <= names
    assert len(monitor_job.ENTRYPOINT.format(code="/opt/ml/processing/input/code", sha256=spec["code_sha256"],
                                             tarball=monitor_job.CODE_FILE)) <= 256
    good = tmp_path / "good"
    good.mkdir()
    (good / monitor_job.CODE_FILE).write_bytes(body)
    done = run_entrypoint(good, spec, "--help")
    assert done.returncode == 0, done.stderr
    assert "--cloudwatch-namespace" in done.stdout and "--model-version" in done.stdout
    assert (good / "photos.py").is_file()  # beside monitor.py, as Preprocess has it
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / monitor_job.CODE_FILE).write_bytes(body + b"\0")
    done = run_entrypoint(changed, spec, "--help")
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr
    assert not (changed / "monitor.py").exists()


# --------------------------------------------------------------------------- monitor.py's metrics


@pytest.fixture
def window(tmp_path) -> tuple[Path, Path]:
    """A real baseline.json (scripts/evaluate/baseline.py) without embeddings, and a local capture
    of 60 requests that all answered 5 where the baseline's answers were spread evenly."""
    import baseline as baseline_code

    stats = [{"brightness": 0.4 + 0.001 * i, "contrast": 0.1, "sharpness": 300.0 + i, "width": 640, "height": 480}
             for i in range(100)]
    made = baseline_code.build(model_id="monitored-model", artifact_sha256="0" * 64,
                               counts=[1 + i % 5 for i in range(100)], labels=[1, 2, 3, 4, 5], embeddings=None,
                               stats=stats, stat_names=("brightness", "contrast", "sharpness", "width", "height"),
                               side=160, seed=0, notes=["no embeddings in this test"])
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(made))
    capture = tmp_path / "capture.jsonl"
    capture.write_text("".join(json.dumps({
        "time": f"2026-12-06T01:{i:02d}:00Z", "request_id": str(i), "model_version": "bin-count/1",
        "model_id": "monitored-model", "content_type": "image/jpeg", "size": 1000,
        "image": stats[i], "answer": {"count": 5}}) + "\n" for i in range(60)))
    return path, capture


def run_monitor(baseline: Path, capture: Path, out: Path, *extra: str) -> int:
    import monitor

    return monitor.main(["--capture", str(capture), "--baseline", str(baseline), "--output", str(out),
                         "--model-version", "bin-count/1", *extra])


def drift_alarm() -> dict:
    from test_infra import CfnLoader

    template = yaml.load((ROOT / "infra" / "invmon.yaml").read_text(), Loader=CfnLoader)
    return template["Resources"]["DriftAlarm"]["Properties"]


def test_monitor_puts_the_metric_the_drift_alarm_reads(window, tmp_path, capsys):
    from moto import mock_aws

    baseline, capture = window
    with patched_environ(aws_env()), mock_aws():
        assert run_monitor(baseline, capture, tmp_path / "out", "--cloudwatch-namespace", "invmon/Monitor",
                           "--endpoint", "bin-count-production") == 0
        cloudwatch = clients.session(REGION).client("cloudwatch")
        metrics = cloudwatch.list_metrics(Namespace="invmon/Monitor")["Metrics"]
        alarm = drift_alarm()
        dimensions = [{"Name": d["Name"], "Value": d["Value"]["!Sub"].replace("${ModelPackageGroupName}", GROUP)}
                      for d in alarm["Dimensions"]]
        # The alarm's namespace, metric and exact set of dimensions: the metric it reads is this one.
        assert (alarm["Namespace"], alarm["MetricName"]) == (monitor_job.NAMESPACE, "DriftDetected")
        drift_metrics = [m for m in metrics if m["MetricName"] == alarm["MetricName"]]
        assert [m["Dimensions"] for m in drift_metrics] == [dimensions]
        value = cloudwatch.get_metric_statistics(
            Namespace=alarm["Namespace"], MetricName=alarm["MetricName"], Dimensions=dimensions,
            StartTime=datetime.now(timezone.utc) - timedelta(hours=1), EndTime=datetime.now(timezone.utc) + timedelta(hours=1),
            Period=alarm["Period"], Statistics=[alarm["Statistic"]])["Datapoints"]
        assert [p[alarm["Statistic"]] for p in value] == [1.0]  # every answer was 5: drift
        assert value[0][alarm["Statistic"]] >= alarm["Threshold"]  # so the alarm would fire
        # Each test's p-value and window size, by test.
        result = json.loads((tmp_path / "out" / "monitor.json").read_text())
        by_test = {(m["MetricName"], {d["Name"]: d["Value"] for d in m["Dimensions"]}.get("Test")) for m in metrics}
        assert ("PValue", "predicted_counts") in by_test and ("WindowSize", "brightness") in by_test
        assert ("PValue", "embeddings") not in by_test  # no data, no p-value
        assert ("WindowSize", "embeddings") in by_test and ("WindowRequests", None) in by_test
        assert result["drift"] is True and "predicted_counts" in result["drifted"]
    assert "published 15 metrics to CloudWatch (invmon/Monitor, EndpointName=bin-count-production)" \
           in capsys.readouterr().out


def test_without_the_flag_the_monitor_never_touches_aws(window, tmp_path):
    baseline, capture = window
    probe = ("import sys, monitor; code = monitor.main(sys.argv[1:]); "
             "print('AWS' if {'boto3', 'botocore'} & set(sys.modules) else 'no AWS'); sys.exit(code)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", probe, "--capture", str(capture), "--baseline", str(baseline),
                           "--output", str(tmp_path / "out"), "--model-version", "bin-count/1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "no AWS" and "drift=1" in done.stdout


@pytest.mark.parametrize("extra, message", [
    (["--cloudwatch-namespace", "invmon/Monitor"], "--cloudwatch-namespace needs --endpoint NAME"),
    (["--endpoint", "bin-count-production"], "--endpoint names the metrics' endpoint: give --cloudwatch-namespace too"),
    (["--cloudwatch-namespace", "AWS/SageMaker", "--endpoint", "e"], "not a namespace of ours"),
])
def test_metric_options_given_wrong_are_one_line(window, tmp_path, capsys, extra, message):
    baseline, capture = window
    assert run_monitor(baseline, capture, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "monitor.json").exists()


def test_metrics_that_cannot_be_put_fail_the_run_in_one_line_after_the_verdicts(window, tmp_path, capsys):
    baseline, capture = window
    env = {**aws_env(endpoint_url=f"http://127.0.0.1:{free_port()}"), "AWS_MAX_ATTEMPTS": "1"}
    with patched_environ(env):
        code = run_monitor(baseline, capture, tmp_path / "out", "--cloudwatch-namespace", "invmon/Monitor",
                           "--endpoint", "bin-count-production")
    err = capsys.readouterr().err
    assert code == 1 and "monitor: error: cannot reach CloudWatch" in err and "Traceback" not in err
    assert (tmp_path / "out" / "monitor.json").is_file()
