"""The staging endpoint's smoke test: the job (scripts/smoke/), the runner serving the real local
endpoint for it, the verdict on the version, and `invmon models approve`'s refusal.

- The job against the real local endpoint (a uvicorn process on a socket the test bound) with
  Evaluate's own predictions.csv: a good model passes; answers that differ from Evaluate's, a
  tight latency limit, and an endpoint that answers 5xx, accepts junk or hangs fail it, each with
  its reason.
- The job against SageMaker: InvokeEndpoint's answers checked against botocore's service model
  (botocore's Stubber: moto has no model behind InvokeEndpoint), the endpoint, its config and
  model and the package under moto; the verdict recorded with UpdateModelPackage.
- Locally end to end (slow): the real declarations with a Train that ships a given artifact; the
  smoke step passes on a good model and stops the run, before approval, on one whose served
  answers differ from what Evaluate scored and on one that answers 500.
- The gate: approve refuses a version whose smoke test failed, never ran, or was recorded by
  another run; --force-no-smoke is logged and kept in the note. The pipeline role may invoke the
  staging endpoint only, and record only the smoke test's properties.
"""
from __future__ import annotations

import http.server
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import import_script, make_artifact
from serving_testing import ServerProcess, bin_photo, patched_artifact

smoke = import_script("smoke", "smoke")
smoke_cases = import_script("smoke", "smoke_cases")
smoke_clients = import_script("smoke", "smoke_clients")

GROUP = "bin-count"
REGION = "us-east-1"

# Served answers that differ from what Evaluate scored: output_fn runs only when the model is
# served (Evaluate calls predict_fn itself), as a serving-only bug would.
SHIFTED_WHEN_SERVED = """
_output_fn_shifted = output_fn


def output_fn(prediction, accept=JSON, context=None):
    if isinstance(prediction, dict) and "count" in prediction:
        prediction = {**prediction, "count": prediction["count"] % 5 + 1}
    return _output_fn_shifted(prediction, accept, context)
"""

FAILS_WHEN_SERVED = """
_output_fn_failing = output_fn


def output_fn(prediction, accept=JSON, context=None):
    if isinstance(prediction, dict) and "count" in prediction:
        raise RuntimeError("serving bug")
    return _output_fn_failing(prediction, accept, context)
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """A test split as Preprocess writes it: <count>/<id>.jpg, three photos per count."""
    test = tmp_path_factory.mktemp("split") / "test"
    for count in range(1, 6):
        (test / str(count)).mkdir(parents=True)
        for i in range(3):
            (test / str(count) / f"p{count}{i}.jpg").write_bytes(bin_photo(count * 10 + i))
    return test


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("model"), image_size=32)


@pytest.fixture(scope="module")
def evaluated(artifact, split, tmp_path_factory) -> Path:
    """The real Evaluate script's output for the artifact on the split (predictions.csv)."""
    evaluate = import_script("evaluate", "evaluate")
    out = tmp_path_factory.mktemp("evaluation")
    assert evaluate.main(["--model", str(artifact), "--test", str(split), "--output", str(out),
                          "--corruptions", "none"]) == 0
    return out


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    with ServerProcess(artifact, tmp_path_factory.mktemp("server") / "server.log") as running:
        yield running


def run_job(tmp_path, split, predictions, url: str, *extra: str, monkeypatch) -> tuple[int, dict]:
    monkeypatch.setenv(smoke.ENDPOINT_URL_ENV, url)
    out = tmp_path / "smoke"
    code = smoke.main(["--endpoint-name", "bin-count-staging", "--test", str(split), "--predictions",
                       str(predictions), "--output", str(out), "--per-count", "2", "--seed", "7",
                       "--latency-ms", "5000", "--model-package", f"{GROUP}/1", "--run", "run-1", *extra])
    report = json.loads((out / "smoke.json").read_text()) if (out / "smoke.json").exists() else {}
    return code, report


# --------------------------------------------------------------------------- what is sent


@pytest.mark.slow
def test_the_same_photos_for_the_same_split_and_seed(split, evaluated):
    predictions = smoke_cases.read_predictions(evaluated)
    first = smoke_cases.select_photos(split, predictions, 2, seed=7)
    assert [p.path for p in first] == [p.path for p in smoke_cases.select_photos(split, predictions, 2, seed=7)]
    assert sorted({p.label for p in first}) == [1, 2, 3, 4, 5] and len(first) == 10
    others = {p.path for seed in range(10) for p in smoke_cases.select_photos(split, predictions, 2, seed=seed)}
    assert len(others) > 10, "the seed picks the photos"
    assert all(p.expected == predictions[p.path] for p in first)
    with pytest.raises(smoke_cases.SmokeInputError, match="no prediction for"):
        smoke_cases.select_photos(split, {}, 2, seed=7)


def test_the_malformed_requests_are_what_they_say(split):
    photos = import_script("inference", "photos")
    jpeg = (split / "1" / "p10.jpg").read_bytes()
    cases = {c.name: c for c in smoke_cases.malformed_requests(jpeg)}
    assert cases["empty body"].body == b""
    assert cases["wrong content type"].content_type == "text/plain"
    assert cases["PNG declared as JPEG"].body.startswith(b"\x89PNG")
    photos.decode(cases["PNG declared as JPEG"].body)  # a valid PNG: only its declared type is wrong
    kinds = {}
    for name in ("truncated JPEG", "huge declared image"):
        with pytest.raises(photos.ImageRejected) as caught:
            photos.decode(cases[name].body)
        kinds[name] = caught.value.kind
    assert kinds["truncated JPEG"] in ("truncated", "corrupt") and kinds["huge declared image"] == "too_large"
    assert cases["truncated JPEG"].body == jpeg[:len(cases["truncated JPEG"].body)]  # headers whole


# --------------------------------------------------------------------------- against the real local endpoint


def test_a_good_endpoint_passes(tmp_path, split, evaluated, server, monkeypatch, capsys):
    code, report = run_job(tmp_path, split, evaluated, server.url, monkeypatch=monkeypatch)
    assert code == 0, capsys.readouterr()
    assert report["passed"] == 1 and report["failures"] == [] and report["reason"] == ""
    assert len(report["photos"]) == 10 and all(p["ok"] and p["status"] == 200 for p in report["photos"])
    statuses = {m["case"]: m["status"] for m in report["malformed"]}
    assert statuses["wrong content type"] == 415
    assert all(400 <= s < 500 for s in statuses.values()) and len(statuses) == 5, statuses
    assert all(m["ok"] for m in report["malformed"])
    assert 0 < report["latency_ms"]["p95"] < 5000 and report["latency_ms"]["requests"] == 10
    assert report["record"] == {"SmokeTest": "passed", "SmokeTestRun": "run-1",
                                "SmokeTestDetail": report["record"]["SmokeTestDetail"]}
    assert "smoke test passed" in capsys.readouterr().out


def test_answers_that_differ_from_evaluates_fail_it(tmp_path, split, evaluated, server, monkeypatch):
    rows = (evaluated / "predictions.csv").read_text().splitlines()
    shifted = [rows[0]] + [",".join([r.split(",")[0], r.split(",")[1], str(int(r.split(",")[2]) % 5 + 1),
                                     *r.split(",")[3:]]) for r in rows[1:]]
    (tmp_path / "predictions.csv").write_text("\n".join(shifted) + "\n")
    code, report = run_job(tmp_path, split, tmp_path / "predictions.csv", server.url, monkeypatch=monkeypatch)
    assert code == 0 and report["passed"] == 0  # a verdict, not a failed job
    assert report["reason"].startswith("10 of 10 photos answered differently from Evaluate (")
    assert "Evaluate predicted" in report["reason"] and report["record"]["SmokeTest"] == "failed"
    # A property value SageMaker accepts: no parentheses, commas or semicolons, at most 256 characters.
    assert re.fullmatch(r"[\w .:/=+\-@]{1,256}", report["record"]["SmokeTestDetail"])


def test_a_slow_endpoint_fails_it(tmp_path, split, evaluated, server, monkeypatch):
    code, report = run_job(tmp_path, split, evaluated, server.url, "--latency-ms", "0.01", monkeypatch=monkeypatch)
    assert code == 0 and report["passed"] == 0
    assert report["reason"].startswith("p95 latency ") and report["reason"].endswith("is not under 0.01 ms")


@pytest.mark.slow
def test_a_served_model_that_answers_500_fails_it(tmp_path, split, evaluated, monkeypatch):
    broken = patched_artifact(make_artifact, tmp_path / "broken", FAILS_WHEN_SERVED, image_size=32)
    with ServerProcess(broken, tmp_path / "server.log") as running:
        code, report = run_job(tmp_path, split, evaluated, running.url, monkeypatch=monkeypatch)
    assert code == 0 and report["passed"] == 0
    assert report["reason"].startswith("10 of 10 photos got no good answer (")
    assert "answered 500 (internal error: RuntimeError: serving bug)" in report["reason"]
    assert all(m["ok"] for m in report["malformed"]), "junk is still refused before the model"


class FakeEndpoint(http.server.ThreadingHTTPServer):
    """A stand-in endpoint that misbehaves on purpose, to show each check can fail."""

    def __init__(self, behave):
        handler = type("Handler", (http.server.BaseHTTPRequestHandler,), {
            "do_POST": lambda self: behave(self), "do_GET": FakeEndpoint.ping,
            "log_message": lambda self, *a: None})
        super().__init__(("127.0.0.1", 0), handler)
        self.handle_error = lambda request, address: None  # a client that gave up: expected here
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @staticmethod
    def ping(handler):
        FakeEndpoint.send(handler, 200, {"status": "ok"})

    @staticmethod
    def send(handler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def test_junk_accepted_a_5xx_or_silence_for_a_malformed_request_fails_it(tmp_path, split, evaluated, monkeypatch):
    predictions = smoke_cases.read_predictions(evaluated)
    by_size = {}

    def behave(handler):
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        kind = handler.headers.get("Content-Type")
        if kind == "image/jpeg" and body in by_size:  # a held-out photo: Evaluate's answer
            return FakeEndpoint.send(handler, 200, {"count": by_size[body]})
        if not body:
            time.sleep(3)  # silence past the job's deadline
            return FakeEndpoint.send(handler, 400, {"error": "empty"})
        if kind == "text/plain":
            return FakeEndpoint.send(handler, 200, {"count": 3})  # junk accepted
        if body.startswith(b"\x89PNG"):
            handler.send_response(400)  # a 4xx, but no JSON error
            handler.send_header("Content-Length", "2")
            handler.end_headers()
            return handler.wfile.write(b"no")
        return FakeEndpoint.send(handler, 503, {"error": "overloaded"})  # truncated, huge: 5xx

    for path, expected in predictions.items():
        by_size[(split / path).read_bytes()] = expected
    fake = FakeEndpoint(behave)
    try:
        code, report = run_job(tmp_path, split, evaluated, fake.url, "--timeout-s", "1", monkeypatch=monkeypatch)
    finally:
        fake.shutdown()
    assert code == 0 and report["passed"] == 0
    problems = {m["case"]: m for m in report["malformed"]}
    assert not any(m["ok"] for m in problems.values())
    assert problems["empty body"]["status"] is None and "no answer within 1 s" in problems["empty body"]["error"]
    assert problems["wrong content type"]["status"] == 200
    assert [f for f in report["failures"]] == [
        "5 of 5 malformed requests were not refused with a 4xx JSON error (empty body: no answer within 1 s; "
        "wrong content type: got 200: accepted; PNG declared as JPEG: got 400 without a JSON error; ...)"]
    assert all(p["ok"] for p in report["photos"])


def test_bad_arguments_and_inputs_are_one_line(tmp_path, split, evaluated, monkeypatch, capsys):
    monkeypatch.setenv(smoke.ENDPOINT_URL_ENV, "http://127.0.0.1:9")
    base = ["--endpoint-name", "e", "--test", str(split), "--output", str(tmp_path / "o"), "--latency-ms", "100"]
    assert smoke.main([*base, "--predictions", str(tmp_path / "none")]) == 2
    assert "no predictions.csv at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        smoke.main([*base, "--predictions", str(evaluated), "--per-count", "0"])
    assert exit_.value.code == 2 and "--per-count must be a positive number" in capsys.readouterr().err
    monkeypatch.delenv(smoke.ENDPOINT_URL_ENV)
    assert smoke.main([*base, "--predictions", str(evaluated), "--model-package", "bin-count/1"]) == 2
    assert "--model-package must be a model package ARN on SageMaker" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- against SageMaker


@pytest.fixture
def aws(monkeypatch):
    """moto's SageMaker with the staging endpoint of a pipeline's Deploy and a registered package."""
    import boto3
    from moto import mock_aws

    from aws_testing import aws_env, keep_customer_metadata, patched_environ

    keep_customer_metadata(monkeypatch)
    with patched_environ(aws_env()), mock_aws():
        sm = boto3.Session(region_name=REGION).client("sagemaker")
        sm.create_model_package_group(ModelPackageGroupName=GROUP)
        arn = sm.create_model_package(
            ModelPackageGroupName=GROUP, ModelApprovalStatus="PendingManualApproval",
            InferenceSpecification={"Containers": [{"Image": "img", "ModelDataUrl": "s3://b/run/Train/model.tar.gz"}],
                                    "SupportedContentTypes": ["image/jpeg"],
                                    "SupportedResponseMIMETypes": ["application/json"]},
            MetadataProperties={"GeneratedBy": EXECUTION},
            CustomerMetadataProperties={"ArtifactSha256": "a" * 64})["ModelPackageArn"]
        for name, data in (("bin-count-Deploy-1", "s3://b/run/Train/model.tar.gz"),
                           ("bin-count-Deploy-2", "s3://b/other/Train/model.tar.gz")):
            sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::123456789012:role/r",
                            PrimaryContainer={"Image": "img", "ModelDataUrl": data})
            sm.create_endpoint_config(EndpointConfigName=f"bin-count-staging-{name[-1]}", ProductionVariants=[
                {"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1,
                 "InstanceType": "ml.m5.large"}])
        sm.create_endpoint(EndpointName="bin-count-staging", EndpointConfigName="bin-count-staging-1")
        yield sm, arn


EXECUTION = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/bin-count/execution/abc123"


def stubbed_runtime(photos, malformed):
    """sagemaker-runtime answering as SageMaker does for this model: each request checked against
    InvokeEndpoint's model and the parameters expected, in order."""
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    runtime = boto3.Session(region_name=REGION).client("sagemaker-runtime")
    stub = Stubber(runtime)

    def expect(body: bytes, content_type: str) -> dict:
        return {"EndpointName": "bin-count-staging", "ContentType": content_type, "Accept": "application/json",
                "Body": body}

    for photo in photos[:1] + list(photos):  # the warm-up, then each photo
        answer = json.dumps({"count": photo.expected, "model_version": "m"}).encode()
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(answer), len(answer)),
                                              "ContentType": "application/json"},
                          expect(photo.file.read_bytes(), photo.content_type))
    for case in malformed:
        if not case.body:  # refused by SageMaker itself, before the model
            stub.add_client_error("invoke_endpoint", "ValidationError", "Body must not be empty", 400,
                                  expected_params=expect(case.body, case.content_type))
            continue
        status = 415 if case.content_type == "text/plain" else 400
        stub.add_client_error("invoke_endpoint", "ModelError", f"Received client error ({status})", 424,
                              modeled_fields={"OriginalStatusCode": status,
                                              "OriginalMessage": json.dumps({"error": case.name})},
                              expected_params=expect(case.body, case.content_type))
    stub.activate()
    return runtime, stub


def sagemaker_job(tmp_path, split, evaluated, sm, arn, runtime, wait_s="600") -> tuple[int, dict]:
    out = tmp_path / "smoke"
    endpoint = smoke_clients.SageMakerEndpoint("bin-count-staging", runtime=runtime, sagemaker=sm, poll_s=0.01)
    code = smoke.main(["--endpoint-name", "bin-count-staging", "--test", str(split), "--predictions", str(evaluated),
                       "--output", str(out), "--per-count", "2", "--seed", "7", "--latency-ms", "5000",
                       "--wait-s", wait_s, "--model-package", arn, "--model-data", "s3://b/run/Train/model.tar.gz",
                       "--run", EXECUTION], endpoint=endpoint, sagemaker=sm)
    return code, json.loads((out / "smoke.json").read_text())


def test_on_sagemaker_the_verdict_is_recorded_on_the_package(tmp_path, split, evaluated, aws, monkeypatch):
    from pipeline.registry.local import smoke_problem
    from pipeline.registry.sagemaker import SageMakerRegistry

    sm, arn = aws
    monkeypatch.delenv(smoke.ENDPOINT_URL_ENV, raising=False)
    photos = smoke_cases.select_photos(split, smoke_cases.read_predictions(evaluated), 2, 7)
    runtime, stub = stubbed_runtime(photos, smoke_cases.malformed_requests(photos[0].file.read_bytes()))
    code, report = sagemaker_job(tmp_path, split, evaluated, sm, arn, runtime)
    stub.assert_no_pending_responses()
    assert code == 0 and report["passed"] == 1, report["failures"]
    assert [(m["status"], m["source"]) for m in report["malformed"]][:2] == [(400, "sagemaker"), (415, "model")]
    recorded = sm.describe_model_package(ModelPackageName=arn)["CustomerMetadataProperties"]
    assert recorded["SmokeTest"] == "passed" and recorded["SmokeTestRun"] == EXECUTION
    assert recorded["ArtifactSha256"] == "a" * 64  # merged, as SageMaker merges an update's properties
    assert smoke_problem(SageMakerRegistry(sagemaker_client=sm).get(GROUP, 1)) is None


def test_on_sagemaker_an_endpoint_serving_another_model_is_not_tested_in_its_place(tmp_path, split, evaluated, aws,
                                                                                   monkeypatch):
    from pipeline.registry.local import smoke_problem
    from pipeline.registry.sagemaker import SageMakerRegistry

    sm, arn = aws
    monkeypatch.delenv(smoke.ENDPOINT_URL_ENV, raising=False)
    sm.delete_endpoint(EndpointName="bin-count-staging")  # another execution's model took staging
    sm.create_endpoint(EndpointName="bin-count-staging", EndpointConfigName="bin-count-staging-2")
    runtime, stub = stubbed_runtime([], [])  # nothing may be sent
    code, report = sagemaker_job(tmp_path, split, evaluated, sm, arn, runtime, wait_s="0.05")
    assert code == 0 and report["passed"] == 0 and report["photos"] == []
    assert report["reason"] == ("endpoint bin-count-staging serves s3://b/other/Train/model.tar.gz, not the version "
                                "under test (s3://b/run/Train/model.tar.gz): another execution deployed it since")
    version = SageMakerRegistry(sagemaker_client=sm).get(GROUP, 1)
    assert version.properties["SmokeTest"] == "failed"
    assert smoke_problem(version).startswith("bin-count/1 failed its staging smoke test: endpoint bin-count-staging")


def test_approve_on_aws_refuses_an_unsmoked_version(aws, capsys):
    from pipeline.cli import main

    sm, arn = aws
    assert main(["models", "approve", "1", "--backend", "aws"]) == 1
    err = capsys.readouterr().err
    assert "not approved: bin-count/1 has no staging smoke test result" in err and "Traceback" not in err
    assert sm.describe_model_package(ModelPackageName=arn)["ModelApprovalStatus"] == "PendingManualApproval"


# --------------------------------------------------------------------------- the gate on the local registry


@pytest.fixture
def registry(invmon_home, tmp_path):
    from pipeline.registry.local import open_registry

    reg = open_registry(invmon_home)
    for n in (1, 2, 3, 4):
        artifact = tmp_path / f"m{n}" / "model.tar.gz"
        artifact.parent.mkdir()
        artifact.write_bytes(b"model %d" % n)
        reg.register(GROUP, str(artifact), {}, run_id=f"run-{n}")
    reg.set_properties(GROUP, 2, {"SmokeTest": "failed", "SmokeTestDetail": "p95 latency 2300 ms is not under 1000 ms",
                                  "SmokeTestRun": "run-2"})
    reg.set_properties(GROUP, 3, {"SmokeTest": "passed", "SmokeTestRun": "run-1"})  # another run's verdict
    reg.set_properties(GROUP, 4, {"SmokeTest": "passed", "SmokeTestRun": "run-4"})
    return reg


def test_approve_refuses_a_version_whose_smoke_test_failed_never_ran_or_is_another_runs(registry, capsys):
    from pipeline.cli import main

    for version, said in ((1, "bin-count/1 has no staging smoke test result"),
                          (2, "bin-count/2 failed its staging smoke test: p95 latency 2300 ms is not under 1000 ms"),
                          (3, "bin-count/3's smoke test result was recorded by run-1, not by run-3")):
        assert main(["models", "approve", str(version)]) == 1
        err = capsys.readouterr().err
        assert f"invmon: error: not approved: {said}" in err and "--force-no-smoke" in err
        assert err.count("\n") == 1
        assert registry.get(GROUP, version).status == "PendingManualApproval"
    assert registry.list_endpoints() == []
    assert main(["models", "approve", "4"]) == 0
    assert registry.get(GROUP, 4).status == "Approved"


def test_an_operator_may_force_it_and_it_is_logged_and_kept(registry, capsys):
    from pipeline.cli import main

    assert main(["models", "approve", "2", "--note", "hotfix", "--force-no-smoke"]) == 0
    err = capsys.readouterr().err
    assert "invmon: warning: approving bin-count/2 without a passing staging smoke test (--force-no-smoke)" in err
    version = registry.get(GROUP, 2)
    assert version.status == "Approved"
    assert version.note == ("hotfix [--force-no-smoke: bin-count/2 failed its staging smoke test: "
                            "p95 latency 2300 ms is not under 1000 ms]")


def test_the_digest_is_never_a_property_to_set(registry):
    from pipeline.registry.local import RegistryError

    with pytest.raises(RegistryError, match="ArtifactSha256 is recorded when a version is registered"):
        registry.set_properties(GROUP, 4, {"ArtifactSha256": "0" * 64})
    assert registry.get(GROUP, 4).properties["SmokeTest"] == "passed"


def test_the_job_and_the_registry_name_the_verdict_alike():
    from pipeline.registry import local

    assert (smoke.RESULT_PROPERTY, smoke.DETAIL_PROPERTY, smoke.RUN_PROPERTY) == local.SMOKE_PROPERTIES
    from pipeline.local.runner import ENDPOINT_URL_ENV

    assert ENDPOINT_URL_ENV == smoke.ENDPOINT_URL_ENV


# --------------------------------------------------------------------------- the pipeline role


def test_the_pipeline_role_invokes_staging_only_and_records_only_the_smoke_test():
    import yaml

    from iam_policies import STACK, allowed, resolve
    from test_infra import TEMPLATE, CfnLoader

    template = yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)
    role = template["Resources"]["PipelineRole"]["Properties"]
    documents = [resolve(template, p["PolicyDocument"]) for p in role["Policies"]]
    endpoint = "arn:aws:sagemaker:us-east-1:123456789012:endpoint/{}"
    assert allowed(documents, "sagemaker:InvokeEndpoint", endpoint.format("bin-count-staging"))
    for other in ("bin-count-production", "other-group-staging"):
        assert not allowed(documents, "sagemaker:InvokeEndpoint", endpoint.format(other)), other
    package = f"arn:aws:sagemaker:us-east-1:123456789012:model-package/{STACK['ModelPackageGroupName']}/3"
    smoke_only = {"sagemaker:CustomerMetadataProperties/SmokeTest": "passed",
                  "sagemaker:CustomerMetadataProperties/SmokeTestRun": EXECUTION}
    assert allowed(documents, "sagemaker:UpdateModelPackage", package, smoke_only)
    for extra in ({"sagemaker:ModelApprovalStatus": "Rejected"},
                  {"sagemaker:ModelApprovalStatus": "Approved"},
                  {"sagemaker:CustomerMetadataProperties/ArtifactSha256": "0" * 64},
                  {"sagemaker:CustomerMetadataProperties/EvaluationReport": "s3://elsewhere/report.html"},
                  {"sagemaker:CustomerMetadataProperties/MonitoringBaseline": "s3://elsewhere/baseline.json"},
                  {"sagemaker:CustomerMetadataPropertiesToRemove": ["SmokeTestDetail"]}):
        assert not allowed(documents, "sagemaker:UpdateModelPackage", package, {**smoke_only, **extra}), extra
    assert not allowed(documents, "sagemaker:UpdateModelPackage", package, {})  # no smoke verdict: nothing
    other_group = "arn:aws:sagemaker:us-east-1:123456789012:model-package/other-group/1"
    assert not allowed(documents, "sagemaker:UpdateModelPackage", other_group, smoke_only)


# --------------------------------------------------------------------------- locally, end to end

SHIP = """
import os, pathlib, shutil, sys
source = pathlib.Path(sys.argv[sys.argv.index("--source") + 1])
shutil.copytree(source, os.environ["SM_MODEL_DIR"], dirs_exist_ok=True)
print("validation:accuracy=0.5", flush=True)
"""


def pipeline_dag(root: Path, model_dir: Path):
    """The real DAG with a Train that ships `model_dir` (no Tune): Preprocess, Evaluate, the gate,
    Register, Deploy, SmokeTest and its gate are the declarations of steps/, unchanged."""
    import dataclasses

    import steps as declared
    from steps.base import Code, Dag, TrainingStep

    (root / "ship").mkdir(parents=True, exist_ok=True)
    (root / "ship" / "ship.py").write_text(SHIP)
    (root / "ship" / "requirements.txt").write_text("")
    real = declared.DAG["Train"]
    train = TrainingStep("Train", Code("ship", "ship.py", root=root), channels=real.channels,
                         hyperparameters=(("source", str(model_dir)),), metric_definitions=real.metric_definitions,
                         checkpoints=False)
    kept = [dataclasses.replace(s) for s in declared.DAG.steps if s.name not in ("Tune", "Train")]
    at = [s.name for s in kept].index("Evaluate")
    return Dag((*kept[:at], train, *kept[at:]))


def model_dir(tmp: Path, code: str = "") -> Path:
    make_artifact(tmp, image_size=32)
    if code:
        inference = tmp / "model" / "code" / "inference.py"
        inference.write_text(inference.read_text() + "\n\n" + code)
    return tmp / "model"


@pytest.fixture(scope="module")
def local_pipeline(tmp_path_factory):
    """One INVMON_HOME for the module's runs (step environments and Preprocess's cache are shared)."""
    from pipeline.dag import profiles
    from pipeline.data import synth

    tmp = tmp_path_factory.mktemp("smoke-e2e")
    data = tmp / "data"
    synth.write_dataset(data, per_class=10, seed=1)
    params = {**profiles.defaults("local"), "InputDataUrl": str(data), "Arch": "resnet18", "ImageSize": 32,
              "ResizeShortSide": 40, "FreezeBackbone": "false", "AccuracyThreshold": 0.0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INVMON_HOME", str(tmp / "home"))
        patch.setenv("INVMON_NOTIFICATIONS", str(tmp / "notifications.jsonl"))
        yield tmp, tmp / "home", params


def run_pipeline(local_pipeline, name: str, code: str = "") -> dict:
    from pipeline.local.runner import LocalRun

    tmp, home, params = local_pipeline
    dag = pipeline_dag(tmp / f"scripts-{name}", model_dir(tmp / name, code))
    run = LocalRun.create(home, dag, params, "local", echo=lambda line: None)
    state = run.execute()
    state["dir"] = run.dir
    return state


def endpoint_gone(run_dir: Path) -> bool:
    log = (run_dir / "SmokeTest" / "endpoint.log").read_text()
    return "serving" in log and "shutting down" in log.lower()


@pytest.mark.slow
def test_locally_the_smoke_step_passes_a_good_model_and_records_it(local_pipeline, capsys):
    from pipeline.cli import main
    from pipeline.registry.local import open_registry

    state = run_pipeline(local_pipeline, "good")
    assert state["status"] == "Succeeded", state["failure"]
    steps = state["steps"]
    assert steps["SmokeTest"]["status"] == "Succeeded" and steps["SmokeTestFailed"]["status"] == "Skipped"
    assert steps["CheckSmokeTest"]["properties"]["outcome"] is True
    report = steps["SmokeTest"]["properties"]["SmokeReport"]
    assert report["passed"] == 1 and len(report["photos"]) >= 5 and all(m["ok"] for m in report["malformed"])
    assert "process_groups" not in steps["SmokeTest"]  # the endpoint was stopped with the step
    assert endpoint_gone(state["dir"])
    version = open_registry(local_pipeline[1]).get(GROUP, steps["Register"]["properties"]["version"])
    assert version.properties["SmokeTest"] == "passed" and version.properties["SmokeTestRun"] == state["id"]
    assert main(["models", "approve", str(version.version)]) == 0, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("broken, said", [
    (SHIFTED_WHEN_SERVED, "photos answered differently from Evaluate"),
    (FAILS_WHEN_SERVED, "photos got no good answer"),
])
def test_locally_a_broken_staging_model_stops_the_run_before_approval(local_pipeline, capsys, broken, said):
    from pipeline.cli import main
    from pipeline.registry.local import open_registry

    state = run_pipeline(local_pipeline, f"broken-{len(broken)}", broken)
    assert state["status"] == "Failed" and state["resumable"] is False
    assert state["failure"].startswith("SmokeTestFailed: The staging endpoint failed its smoke test: ")
    assert said in state["failure"] and state["failure"].endswith("invmon models approve refuses it.")
    assert state["steps"]["SmokeTest"]["status"] == "Succeeded"  # the job ran; its verdict stopped the run
    assert endpoint_gone(state["dir"])
    version = open_registry(local_pipeline[1]).get(GROUP, state["steps"]["Register"]["properties"]["version"])
    assert version.properties["SmokeTest"] == "failed" and said in version.properties["SmokeTestDetail"]
    capsys.readouterr()
    assert main(["models", "approve", str(version.version)]) == 1
    assert f"not approved: {version.name} failed its staging smoke test" in capsys.readouterr().err
    assert open_registry(local_pipeline[1]).get(GROUP, version.version).status == "PendingManualApproval"
