"""Bulk counting on SageMaker: `invmon predict s3://BUCKET/PREFIX/ --backend aws --out ...`.

moto records CreateTransformJob but runs nothing, and checks none of its fields. So the request
is checked against botocore's model of CreateTransformJob (test_rollout.conforms, plus the name
patterns), and each job is run here as Batch Transform runs it: every photo its manifest names
is read from S3 and answered by the artifact's own input_fn, predict_fn and output_fn, called
as the serving toolkit calls them (with its request context). An answer becomes `<key>.out`
under the job's output path; a refusal (a 4xx) becomes the lines Batch Transform writes to the
job's data log in CloudWatch Logs, and the job ends Failed, as SageMaker marks it.

The CSV those answers make must be the local bulk command's CSV of the same photos, field for
field (only the path column names the S3 object instead of the file).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from aws_testing import REGION, ROOT, aws_env, keep_customer_metadata, moto_server, patched_environ
from pipeline.cli import main
from pipeline.registry.sagemaker import SageMakerRegistry
from pipeline.sagemaker import transform
from pipeline.serving import bulk
from pipeline.serving.endpoint import content_type_for, load_model
from test_rollout import conforms

ACCOUNT = "123456789012"
GROUP = "bin-count"
PHOTOS = "invmon-photos"
ARTIFACTS = "invmon-artifacts"
PREFIX = "bins/2026-12/"
SOURCE = f"s3://{PHOTOS}/{PREFIX}"
MODEL_ROLE = "arn:aws:iam::123456789012:role/InvmonModelRole"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312"
NOT_PHOTOS = ["notes.txt", "a/labels.json"]
REFUSED = {"corrupt", "really_a_png", "empty"}


# --------------------------------------------------------------------------- photos and answers


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Generated bin photos (pipeline.data.synth), a third of them PNG, in two sub-folders; files
    the model refuses (a truncated JPEG, a PNG named .jpg, an empty file); and files that are
    not photos."""
    from pipeline.data import synth

    work = tmp_path_factory.mktemp("bulk-photos")
    synth.write_dataset(work / "abid", per_class=2, seed=7, workers=1)
    root = work / "photos"
    for i, jpg in enumerate(sorted((work / "abid" / "bin-images").glob("*.jpg"))):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            Image.open(jpg).save(sub / f"{jpg.stem}.png")
        else:
            shutil.copy(jpg, sub / jpg.name)
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50))
    png = io.BytesIO()
    Image.open(next((work / "abid" / "bin-images").glob("*.jpg"))).save(png, "PNG")
    (root / "b" / "really_a_png.jpg").write_bytes(png.getvalue())
    (root / "a" / "empty.png").write_bytes(b"")
    for name in NOT_PHOTOS:
        (root / name).write_text("not a photo")
    return root


@pytest.fixture(scope="module")
def handler(tiny_artifact):
    """The artifact loaded through its own code/inference.py (model_fn), as the container loads it."""
    return load_model(tiny_artifact)


class Context:
    """The serving toolkit's request context, as input_fn and output_fn use it."""

    def __init__(self):
        self.status = 200

    def set_response_status(self, code, phrase):
        self.status = code


def served(model, body: bytes, content_type: str) -> tuple[int, str]:
    """What the serving container answers one Batch Transform request with: (status, body)."""
    inference, context = model.inference, Context()
    data = inference.input_fn(body, content_type, context)
    answer = inference.output_fn(inference.predict_fn(data, model.model), "application/json", context)
    return context.status, answer[0] if isinstance(answer, tuple) else answer


@pytest.fixture(scope="module")
def local_csv(folder, handler, tmp_path_factory) -> Path:
    """The local bulk command's CSV of the same photos (its own functions: collect, count, write),
    one photo per forward pass, as each Batch Transform request is."""
    out = tmp_path_factory.mktemp("local") / "counts.csv"
    photos = bulk.collect_photos([folder])
    bulk.write_csv(bulk.count_local(handler, photos, batch_size=1), out, total=len(photos), progress=False)
    return out


def read_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow
def test_the_csv_made_from_the_handlers_answers_is_the_local_bulk_csv(folder, handler, local_csv, tmp_path):
    """The assembly alone: the artifact's answers to each photo's bytes, refusals included, make
    the same bytes as the local command."""
    answers, refusals = [], {}
    for photo in bulk.collect_photos([folder]):
        status, body = served(handler, photo.read_bytes(), content_type_for(photo))
        if status == 200:
            answers.append((photo, body))
        else:
            answers.append((photo, None))
            refusals[str(photo)] = json.loads(body)["error"]
    assert set(Path(p).stem for p in refusals) == REFUSED
    out = tmp_path / "assembled.csv"
    bulk.write_csv(bulk.rows_from_answers(answers, refusals), out, total=len(answers), progress=False)
    assert out.read_bytes() == local_csv.read_bytes()


def test_an_answer_row_for_each_kind_of_answer():
    good = json.dumps({"count": 2, "probabilities": {"1": 0.1, "2": 0.6, "3": 0.1, "4": 0.1, "5": 0.1}})
    assert bulk.answer_row("s3://b/x.jpg", good).answer["count"] == 2
    assert bulk.answer_row("s3://b/x.jpg", good).id == "x"
    for body, refusal, error in (
            (json.dumps({"error": "not a decodable JPEG"}), None, "not a decodable JPEG"),
            (None, "a refusal", "a refusal"),
            (good, "a refusal", "a refusal"),
            (None, None, "no answer for this photo in the job's output"),
            (b"<html>", None, "the answer is not JSON"),
            (json.dumps({"count": 7, "probabilities": {"1": 1.0}}), None, "no count with its probabilities"),
            (json.dumps([1, 2]), None, "no count with its probabilities"),
            (json.dumps({"count": 1, "probabilities": {"1": "high"}}), None, "no count with its probabilities")):
        row = bulk.answer_row("s3://b/x.jpg", body, refusal)
        assert row.answer is None and error in row.error, (body, refusal, row.error)


def test_refusals_are_read_from_the_data_log_in_both_layouts():
    photos = {"b/p/x.jpg": "s3://b/p/x.jpg", "b/p/y: z.png": "s3://b/p/y: z.png", "b/p/w.jpg": "s3://b/p/w.jpg"}
    mark = "2026-12-06T10:00:00.000:[sagemaker logs]: "
    messages = [
        mark + "MaxConcurrentTransforms=8, MaxPayloadInMB=1, BatchStrategy=SINGLE_RECORD",
        # one event per line, as the agent logs a refusal
        mark + "b/p/x.jpg: ClientError: 400", mark + "b/p/x.jpg:", mark + "b/p/x.jpg: Message:",
        mark + 'b/p/x.jpg: {"error": "not a decodable JPEG"}',
        # the body on the lines of one event (a key with ": " in it)
        mark + 'b/p/y: z.png: \n{\n  "error": "empty request body"\n}',
        # a status and nothing else
        mark + "b/p/w.jpg: ClientError: 413",
        mark + "b/p/unknown.jpg: ClientError: 400",  # not one of the photos asked about
    ]
    assert transform.refusals_from_data_log(messages, photos) == {
        "s3://b/p/x.jpg": "not a decodable JPEG",
        "s3://b/p/y: z.png": "empty request body",
        "s3://b/p/w.jpg": "refused by the model container (ClientError: 413)"}


# --------------------------------------------------------------------------- AWS under moto


def put_artifact(sm, s3, artifact: Path, versions: int = 2) -> list[str]:
    """`versions` versions of the group, each the tiny artifact with its SHA-256 recorded as the
    Register step records it; version 1 Approved."""
    body = artifact.read_bytes()
    s3.put_object(Bucket=ARTIFACTS, Key=f"{GROUP}/exec-1/Train/model.tar.gz", Body=body)
    sm.create_model_package_group(ModelPackageGroupName=GROUP)
    arns = []
    for _ in range(versions):
        arns.append(sm.create_model_package(
            ModelPackageGroupName=GROUP, ModelApprovalStatus="PendingManualApproval",
            InferenceSpecification={"Containers": [{"Image": IMAGE, "ModelDataUrl":
                                                    f"s3://{ARTIFACTS}/{GROUP}/exec-1/Train/model.tar.gz"}],
                                    "SupportedContentTypes": ["image/jpeg", "image/png"],
                                    "SupportedResponseMIMETypes": ["application/json"]},
            MetadataProperties={"GeneratedBy": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/bin-count/execution/exec-1"},
            CustomerMetadataProperties={"ArtifactSha256": hashlib.sha256(body).hexdigest()},
        )["ModelPackageArn"])
    sm.update_model_package(ModelPackageArn=arns[0], ModelApprovalStatus="Approved")
    return arns


def put_photos(s3, folder: Path, prefix: str = PREFIX) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=PHOTOS, Key=prefix + path.relative_to(folder).as_posix(), Body=path.read_bytes())


def split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def job_of(name: str):
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[ACCOUNT][REGION].transform_jobs[name]


def run_job(request: dict, model, s3, logs, reason: str | None = None, limit: int | None = None) -> None:
    """Batch Transform's work for one job: the manifest's photos answered by the artifact's
    handler; answers as `.out` objects, refusals in the job's data log. `reason`: the job fails
    for a reason of its own after `limit` photos."""
    manifest_bucket, manifest_key = split(request["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"])
    head, *relatives = json.loads(s3.get_object(Bucket=manifest_bucket, Key=manifest_key)["Body"].read())
    in_bucket, in_prefix = split(head["prefix"])
    out_bucket, out_prefix = split(request["TransformOutput"]["S3OutputPath"])
    lines = []
    for relative in relatives[:limit]:
        body = s3.get_object(Bucket=in_bucket, Key=in_prefix + relative)["Body"].read()
        status, text = served(model, body, request["TransformInput"]["ContentType"])
        if status == 200:
            s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}{relative}.out", Body=text.encode())
        else:
            named = f"{in_bucket}/{in_prefix}{relative}"
            lines += [f"{named}: ClientError: {status}", f"{named}:", f"{named}: Message:", f"{named}: {text}"]
    name = request["TransformJobName"]
    if lines:
        group = transform.LOG_GROUP
        if not logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"]:
            logs.create_log_group(logGroupName=group)
        stream = f"{name}/i-0123456789abcdef0-1765015200/data-log"
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        now = int(time.time() * 1000)
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
            {"timestamp": now + i, "message": f"2026-12-06T10:00:00.{i:03d}:[sagemaker logs]: {line}"}
            for i, line in enumerate(lines)])
    job = job_of(name)
    if reason or lines:
        job.transform_job_status = "Failed"
        job.failure_reason = reason or "ClientError: See job logs for more information"
    else:
        job.transform_job_status = "Completed"


class Jobs(list):
    """The CreateTransformJob requests invmon sends (checked by botocore's own validation, then
    recorded), each run at once by `run_job`; and the CreateModel requests."""

    def __init__(self, model):
        super().__init__()
        self.model, self.models, self.reason, self.limit = model, [], None, None

    def hook(self, made):
        import boto3

        def record(params, **_):
            self.append(json.loads(json.dumps(params)))

        def ran(**_):
            session = boto3.Session(region_name=REGION)
            run_job(self[-1], self.model, session.client("s3"), session.client("logs"), self.reason, self.limit)

        made.meta.events.register("before-parameter-build.sagemaker.CreateTransformJob", record)
        made.meta.events.register("after-call.sagemaker.CreateTransformJob", ran)
        made.meta.events.register("before-parameter-build.sagemaker.CreateModel",
                                  lambda params, **_: self.models.append(dict(params)))
        return made


@pytest.fixture
def aws(monkeypatch, folder, tiny_artifact, handler):
    """moto in this process: the photos under PREFIX, the group with two versions of the tiny
    artifact (1 Approved), and every transform job run as Batch Transform runs it."""
    import boto3
    from moto import mock_aws

    from pipeline.sagemaker import clients

    env = aws_env()
    env["INVMON_MODEL_ROLE_ARN"] = MODEL_ROLE
    keep_customer_metadata(monkeypatch)
    jobs = Jobs(handler)
    real = clients.client
    monkeypatch.setattr(clients, "client", lambda service, region: jobs.hook(real(service, region)))
    with patched_environ(env), mock_aws():
        session = boto3.Session(region_name=REGION)
        s3 = session.client("s3")
        for bucket in (PHOTOS, ARTIFACTS):
            s3.create_bucket(Bucket=bucket)
        put_photos(s3, folder)
        jobs.arns = put_artifact(session.client("sagemaker"), s3, tiny_artifact)
        jobs.s3, jobs.sm = s3, session.client("sagemaker")
        yield jobs


def predict(capsys, *args) -> tuple[int, str, str]:
    code = main(["predict", *args, "--backend", "aws", "--poll-seconds", "0.01"])
    out, err = capsys.readouterr()
    return code, out, err


def names_conform(request: dict) -> list[str]:
    """The name patterns and lengths the service model declares (botocore checks neither)."""
    shape = create_transform_job_model()
    problems = []
    for member in ("TransformJobName", "ModelName"):
        meta = shape.members[member].metadata
        if not (re.fullmatch(meta["pattern"], request[member]) and len(request[member]) <= meta["max"]):
            problems.append(f"{member}={request[member]!r}")
    return problems


def create_transform_job_model():
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker").operation_model(
        "CreateTransformJob").input_shape


def test_the_request_is_checked_against_the_service_model_and_the_checks_can_fail():
    photos = [transform.Photo(PHOTOS, f"{PREFIX}a/{i}.jpg", 30_500_000 if i == 2 else 70_000) for i in range(3)]
    job = transform.Job("bin-count-v3-jpeg-1206100000000", "image/jpeg", photos,
                        f"s3://{ARTIFACTS}/bulk/bin-count/j/input.manifest", f"s3://{ARTIFACTS}/bulk/bin-count/j/out/")
    settings = transform.Settings(MODEL_ROLE, concurrency=8)
    request = transform.transform_request(job, "bin-count-v3-batch-0123456789", settings,
                                          transform.payload_mb(photos), transform.tags_for(
                                              transform.ModelVersion(GROUP, 3, "Approved", "s3://b/k", arn="arn")))
    assert conforms(request, create_transform_job_model()) == [] and names_conform(request) == []
    # Sized for the largest photo (31 MB), and no more requests in flight than the 100 MB the API
    # allows in all (a rule of CreateTransformJob's documentation, not of its model).
    assert (request["MaxPayloadInMB"], request["MaxConcurrentTransforms"]) == (31, 3)
    for change, problem in ((("BatchStrategy", "OneRecord"), "BatchStrategy='OneRecord' is not one of"),
                            (("MaxConcurrentTransforms", -1), "MaxConcurrentTransforms=-1 is outside"),
                            (("TransformJobName", "bin_count v3"), "TransformJobName="),
                            (("ModelName", "m" * 64), "ModelName=")):
        bad = {**request, change[0]: change[1]}
        found = conforms(bad, create_transform_job_model()) + names_conform(bad)
        assert any(problem in p for p in found), (change, found)
    bad = json.loads(json.dumps(request))
    bad["TransformInput"]["SplitType"] = "Lines"
    assert any("SplitType='Lines'" in p for p in conforms(bad, create_transform_job_model()))


def same_rows(s3_text: str, local_csv: Path, folder: Path) -> None:
    """Every field of every row equal, in the same order; the path column names the S3 object of
    the same file."""
    local, remote = read_rows(local_csv.read_text()), read_rows(s3_text)
    assert list(remote[0]) == list(local[0]) and len(remote) == len(local)
    for row, expected in zip(remote, local):
        relative = Path(expected.pop("path")).relative_to(folder).as_posix()
        assert row.pop("path") == SOURCE + relative
        assert row == expected


def photo_keys(folder: Path, content_type: str) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in {Path(n).name for n in NOT_PHOTOS}
                  and content_type_for(p) == content_type)


@pytest.mark.slow
def test_a_bulk_count_on_sagemaker_sends_this_request_and_writes_the_local_csv(aws, folder, local_csv,
                                                                              tmp_path, capsys):
    out = tmp_path / "counts.csv"
    code, printed, err = predict(capsys, SOURCE, "--out", str(out), "--instance-type", "ml.c5.2xlarge",
                                 "--instance-count", "2", "--concurrency", "4")
    assert code == 0, err
    # One job per content type, each a request the service model accepts.
    assert [r["TransformInput"]["ContentType"] for r in aws] == ["image/jpeg", "image/png"]
    shape = create_transform_job_model()
    (model,) = aws.models
    for request in aws:
        assert conforms(request, shape) == [] and names_conform(request) == []
        assert request["ModelName"] == model["ModelName"]
        assert request["BatchStrategy"] == "SingleRecord"
        assert request["TransformInput"]["SplitType"] == "None"
        assert request["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
        assert request["TransformResources"] == {"InstanceType": "ml.c5.2xlarge", "InstanceCount": 2}
        assert request["MaxPayloadInMB"] == 1 and request["MaxConcurrentTransforms"] == 4  # photos < 1 MB
        assert request["TransformOutput"]["Accept"] == "application/json"
        output = request["TransformOutput"]["S3OutputPath"]
        assert output.startswith(f"s3://{ARTIFACTS}/bulk/{GROUP}/{request['TransformJobName']}/")
        assert request["TransformJobName"].startswith(f"{GROUP}-v1-")  # the newest Approved version
        tags = {t["Key"]: t["Value"] for t in request["Tags"]}
        assert tags == {"invmon:group": GROUP, "invmon:stage": "batch", "invmon:run": "exec-1",
                        "invmon:model-package": aws.arns[0]}
        # The manifest names exactly the photos of its content type, relative to the prefix.
        bucket, key = split(request["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"])
        head, *keys = json.loads(aws.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert head == {"prefix": SOURCE}
        assert keys == photo_keys(folder, request["TransformInput"]["ContentType"])
    # The Model: the package's image, its verified copy under registry/, the model role, isolated.
    container = model["Containers"][0]
    assert container["Image"] == IMAGE and model["ExecutionRoleArn"] == MODEL_ROLE
    assert container["ModelDataUrl"].startswith(f"s3://{ARTIFACTS}/registry/{GROUP}/1/")
    assert container["Environment"]["INVMON_MODEL_PACKAGE_ARN"] == aws.arns[0]
    assert model["EnableNetworkIsolation"] is True
    # The CSV: the local command's, row for row; the refused photos are rows with their errors.
    same_rows(out.read_text(), local_csv, folder)
    assert {row["id"] for row in read_rows(out.read_text()) if row["error"]} == REFUSED
    assert f"wrote {out}: 13 photos in" in printed and "10 counted, 3 errors" in printed
    # The objects that are not photos were skipped, and named; the job's failure was said.
    assert "skipped 2 objects" in err and all(f"{PREFIX}{name}" in err for name in NOT_PHOTOS)
    assert "Failed: ClientError: See job logs" in err and "each is a row with its error" in err
    assert "photo" in err  # the progress bar

    # A second count reuses the Model (named by version and artifact): no second CreateModel.
    again = tmp_path / "again.csv"
    code, _, err = predict(capsys, SOURCE, "--out", str(again))
    assert code == 0, err
    assert len(aws.models) == 1 and len({r["TransformJobName"] for r in aws}) == 4
    assert aws[-1]["ModelName"] == model["ModelName"]
    assert again.read_text() == out.read_text()


@pytest.mark.slow
def test_the_csv_can_go_to_s3_and_a_version_or_an_endpoint_picks_the_model(aws, folder, local_csv, capsys):
    code, printed, err = predict(capsys, SOURCE.rstrip("/"), "--version", "2",
                                 "--out", f"s3://{PHOTOS}/results/counts.csv")
    assert code == 0, err
    assert all(r["TransformJobName"].startswith(f"{GROUP}-v2-") for r in aws)
    text = aws.s3.get_object(Bucket=PHOTOS, Key="results/counts.csv")["Body"].read().decode()
    same_rows(text, local_csv, folder)
    # The version an endpoint serves: production serving version 2.
    aws.sm.create_model(ModelName="served", ExecutionRoleArn=MODEL_ROLE, Containers=[{
        "Image": IMAGE, "Environment": {"INVMON_MODEL_PACKAGE_ARN": aws.arns[1]}}])
    aws.sm.create_endpoint_config(EndpointConfigName="served", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": "served", "InitialInstanceCount": 1,
        "InstanceType": "ml.m5.large"}])
    aws.sm.create_endpoint(EndpointName=f"{GROUP}-production", EndpointConfigName="served")
    registry = SageMakerRegistry(sagemaker_client=aws.sm)
    assert transform.choose_version(registry, aws.sm, GROUP, endpoint=f"{GROUP}-production").version == 2
    assert transform.choose_version(registry, aws.sm, GROUP).version == 1
    aws.sm.update_model_package(ModelPackageArn=aws.arns[0], ModelApprovalStatus="Rejected")
    with pytest.raises(transform.TransformError, match="bin-count has no Approved version"):
        transform.choose_version(registry, aws.sm, GROUP)
    with pytest.raises(transform.TransformError, match="no SageMaker endpoint bin-count-staging"):
        transform.choose_version(registry, aws.sm, GROUP, endpoint=f"{GROUP}-staging")


@pytest.mark.slow
def test_a_prefix_without_photos_is_a_named_error(aws, tmp_path, capsys):
    aws.s3.put_object(Bucket=PHOTOS, Key="other/readme.txt", Body=b"no photos here")
    out = tmp_path / "counts.csv"
    for source in (f"s3://{PHOTOS}/other/", f"s3://{PHOTOS}/nothing/"):
        code, _, err = predict(capsys, source, "--out", str(out))
        assert code == 1 and f"no .jpg/.jpeg/.png photos under {source}" in err
    assert not aws and not aws.models and not out.exists()


@pytest.mark.slow
def test_a_failed_job_prints_its_reason_exits_1_and_writes_no_csv(aws, tmp_path, capsys):
    aws.reason, aws.limit = "AlgorithmError: model_fn could not load the model", 0  # answered none
    out = tmp_path / "counts.csv"
    code, printed, err = predict(capsys, SOURCE, "--out", str(out))
    assert code == 1
    assert "Failed: AlgorithmError: model_fn could not load the model" in err
    assert "no CSV was written" in err and not out.exists() and "wrote" not in printed
    # Part of the photos answered, the others neither answered nor refused: still no CSV.
    aws.reason, aws.limit = "InternalServerError: capacity", 3
    code, _, err = predict(capsys, SOURCE, "--out", f"s3://{PHOTOS}/results/counts.csv")
    assert code == 1 and "InternalServerError: capacity" in err and "no CSV was written" in err
    assert "results/counts.csv" not in [o["Key"] for o in aws.s3.list_objects_v2(Bucket=PHOTOS).get("Contents", [])]


def test_usage_errors_are_refused_before_anything_is_made(aws, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "c.csv")
    for args, message in (
            ([SOURCE, "--out", out, "--backend", "local"], "s3:// photos are counted on SageMaker"),
            ([SOURCE, "--backend", "aws"], "s3:// photos are counted on SageMaker"),
            ([SOURCE, SOURCE, "--backend", "aws", "--out", out], "one s3://BUCKET/PREFIX/"),
            ([str(tmp_path), "--out", f"s3://{PHOTOS}/c.csv"], "--out s3://... is for s3:// photos"),
            ([SOURCE, "--backend", "aws", "--out", out, "--instance-type", "ml.m5.huge"],
             "--instance-type ml.m5.huge: Batch Transform runs on ml.m5.large"),
            ([SOURCE, "--backend", "aws", "--out", out, "--transform-output", "/tmp/x"],
             "--transform-output /tmp/x: give an s3://")):
        assert main(["predict", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    monkeypatch.delenv("INVMON_MODEL_ROLE_ARN")
    assert main(["predict", SOURCE, "--backend", "aws", "--out", out]) == 2
    assert "--role-arn" in capsys.readouterr().err
    assert not aws and not aws.models


# --------------------------------------------------------------------------- the command line


def test_the_command_line_end_to_end_under_motos_server(folder, tiny_artifact, handler, local_csv,
                                                        monkeypatch, tmp_path):
    """`invmon predict s3://... --backend aws --out s3://...` as a user runs it, against moto's
    server: the job runs for a while (InProgress, answers appearing one by one) while the command
    shows its progress, then the CSV is in S3."""
    import boto3
    from moto.sagemaker.models import FakeTransformJob

    keep_customer_metadata(monkeypatch)
    made = FakeTransformJob.__init__

    def in_progress(self, *args, **kwargs):  # SageMaker's jobs start InProgress; moto's finish at once
        made(self, *args, **kwargs)
        self.transform_job_status = "InProgress"

    monkeypatch.setattr(FakeTransformJob, "__init__", in_progress)
    with moto_server() as url:
        env = {**aws_env(url), "INVMON_HOME": str(tmp_path / "home"), "INVMON_MODEL_ROLE_ARN": MODEL_ROLE}
        with patched_environ(env):
            session = boto3.Session(region_name=REGION)
            s3, sm, logs = session.client("s3"), session.client("sagemaker"), session.client("logs")
            for bucket in (PHOTOS, ARTIFACTS):
                s3.create_bucket(Bucket=bucket)
            put_photos(s3, folder)
            put_artifact(sm, s3, tiny_artifact)
        done, stop = [], threading.Event()

        def batch_transform():  # SageMaker's side: each job, a while after it was created
            from moto.sagemaker.models import sagemaker_backends

            backend = sagemaker_backends[ACCOUNT][REGION]
            while not stop.is_set():
                for name, job in list(backend.transform_jobs.items()):
                    if name not in done:
                        done.append(name)
                        time.sleep(0.5)
                        run_job({"TransformJobName": name, "TransformInput": job.transform_input,
                                 "TransformOutput": job.transform_output}, handler, s3, logs)
                time.sleep(0.05)

        worker = threading.Thread(target=batch_transform, daemon=True)
        worker.start()
        script = Path(sys.executable).parent / "invmon"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]
        try:
            ran = subprocess.run([*command, "predict", SOURCE, "--backend", "aws", "--out",
                                  f"s3://{PHOTOS}/results/counts.csv", "--poll-seconds", "0.2"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        finally:
            stop.set()
            worker.join(timeout=30)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert len(done) == 2 and "InProgress" in ran.stderr and "photo" in ran.stderr
        assert "wrote s3://invmon-photos/results/counts.csv: 13 photos" in ran.stdout
        with patched_environ(env):
            text = s3.get_object(Bucket=PHOTOS, Key="results/counts.csv")["Body"].read().decode()
    same_rows(text, local_csv, folder)


# --------------------------------------------------------------------------- IAM


def test_the_model_role_reads_the_photos_and_writes_only_the_bulk_prefix():
    """The job runs as the stack's ModelRole: it reads photos in the data bucket and under
    bulk/<group>/ of the artifact bucket, writes answers only there, and logs as its jobs."""
    import yaml

    from iam_policies import STACK, allowed
    from test_infra import TEMPLATE, CfnLoader, documents

    role = documents(yaml.load(TEMPLATE.read_text(), Loader=CfnLoader))["ModelRole"]
    bucket = f"arn:aws:s3:::{STACK['ArtifactBucketName']}"
    data = f"arn:aws:s3:::{STACK['DataBucketName']}"
    job = "bin-count-v3-jpeg-1206100000000"
    assert allowed(role, "s3:GetObject", f"{data}/bin-images/1.jpg")
    assert allowed(role, "s3:GetObject", f"{bucket}/bulk/bin-count/photos/1.jpg")
    assert allowed(role, "s3:GetObject", f"{bucket}/bulk/bin-count/{job}/input.manifest")
    assert allowed(role, "s3:PutObject", f"{bucket}/bulk/bin-count/{job}/out/a/1.jpg.out")
    for target in (f"{data}/bin-images/1.jpg", f"{bucket}/registry/bin-count/3/{'ab' * 32}/model.tar.gz",
                   f"{bucket}/bin-count/exec-1/Train/model.tar.gz", f"{bucket}/bulk/other-group/x.out"):
        assert not allowed(role, "s3:PutObject", target), target
    assert not allowed(role, "s3:GetObject", f"{bucket}/bin-count/exec-1/Train/model.tar.gz")
    assert not allowed(role, "s3:GetObject", f"{bucket}/bulk/other-group/x.jpg")
    logs = "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/TransformJobs"
    assert allowed(role, "logs:CreateLogStream", f"{logs}:log-stream:{job}/i-1/data-log")
    assert allowed(role, "logs:PutLogEvents", f"{logs}:log-stream:{job}/i-1/data-log")
    assert not allowed(role, "logs:PutLogEvents", f"{logs}:log-stream:other-job/i-1/data-log")
