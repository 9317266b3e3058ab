"""The drift monitor on a schedule: the monitor function of infra/invmon.yaml.

EventBridge's monitor schedule (`MonitorSchedule`, default rate(1 day)) invokes `handler`. For
each stage endpoint of the group that exists (<group>-staging, <group>-production) it finds the
model package version the endpoint serves, reads that version's MonitoringBaseline and artifact,
and starts a processing job: scripts/monitor/monitor.py in the monitor container
(steps/images.py) on the window's captured requests, which writes monitor.json and report.html
under s3://<bucket>/monitor/<endpoint>/ and publishes its verdicts to CloudWatch (invmon/Monitor
DriftDetected, which the stack's drift alarm reads).

- Which version: the package the endpoint's model names (the deploy code puts its ARN in the
  model's environment), else the group's version whose registered artifact the model serves
  (the pipeline's staging Deploy serves the artifact Register recorded).
- The window: from where the endpoint's previous monitor job's window ended (at most MAX_WINDOW
  back) to the schedule's time; with no previous job, one schedule period. Only the day folders
  of the window are read (SageMaker writes capture/<endpoint>/<endpoint>/<variant>/yyyy/mm/dd/hh/).
- Events are hints: anything but the schedule's event starts nothing; a job is named by its
  endpoint and window end, so a repeated event finds its job started, and a late one finds its
  window monitored. A job of that name that this function's role did not make is refused.
- An endpoint that does not exist, captures nothing or nothing in the window, or serves a
  version with no baseline is skipped and the log says why; the function does not fail for it.
  (pipeline/alerts.py has no kind for a skipped check, so it is logged, not alerted.) An AWS
  call that fails makes the invocation fail, after both endpoints were tried: the stack's
  alarm on the function's errors tells the reviewers.

The job runs as MonitorJobRole: it reads the group's capture and the pipeline's outputs (baseline
and artifact), writes under monitor/, and may put metrics in invmon/Monitor only.

Its code is staged ahead, as a pipeline step's is: `python -m pipeline.sagemaker.monitor_job stage
--bucket BUCKET` (where the SageMaker SDK is installed) uploads monitor.py's folder with
inference/photos.py beside it, as sourcedir.tar.gz, and job.json (image, instance type, the
tarball's SHA-256) under `MonitorJobPrefix`, which the roles that build cannot write.

The function is plain boto3 (the Lambda runtime has no SageMaker SDK); only `stage` uses the SDK.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pipeline.registry.capture import capture_uri
from pipeline.registry.labels import PACKAGE_ARN, PACKAGE_ENV
from pipeline.registry.local import BASELINE_PROPERTY
from pipeline.registry.stages import STAGES, endpoint_name
from pipeline.sagemaker.clients import call, client, resolve_region

NAMESPACE = "invmon/Monitor"
SCHEDULE_EVENT = "Scheduled Event"
JOB_INFIX = "mon"  # jobs are <group>-mon-<staging|prod>-<yymmddHHMM>: at most 62 characters
OUTPUT_PREFIX = "monitor"
DEFAULT_JOB_PREFIX = "invmon/monitor-job"
JOB_FILE, CODE_FILE = "job.json", "sourcedir.tar.gz"
MAX_WINDOW = timedelta(days=7)
DEFAULT_PERIOD = timedelta(days=1)  # a cron schedule's window when there is no previous job
MAX_CAPTURE_INPUTS = 7  # a job has at most 10 inputs: code, baseline and model take three
MAX_PACKAGES_SCANNED = 100
MAX_RUNTIME_S = 2 * 3600
VOLUME_GB = 30
# The serving container answers with MODEL_VERSION when its model sets it, else the artifact's
# model_id (scripts/inference/inference.py): --model-version must name what the answers say.
ANSWER_VERSION_ENV = "MODEL_VERSION"

CODE_DIR = "/opt/ml/processing/input/code"
CAPTURE_DIR = "/opt/ml/processing/capture"
BASELINE_DIR = "/opt/ml/processing/baseline"
MODEL_DIR = "/opt/ml/processing/model"
OUTPUT_DIR = "/opt/ml/processing/monitor"
# What the job's container runs: the staged code, checked against job.json's digest, with the
# monitor's requirements on top of the image (as the SDK's FrameworkProcessor does for a step).
# (One string of at most 256 characters, ContainerEntrypoint's limit.)
ENTRYPOINT = ('set -e;cd {code};echo "{sha256}  {tarball}"|sha256sum -c --quiet;tar xzf {tarball};'
              'python -m pip install -q -r requirements.txt;exec python monitor.py "$@"')


class MonitorJobError(Exception):
    """An AWS call or a setting that failed: one line."""


@dataclass(frozen=True)
class Settings:
    """The function's environment (infra/invmon.yaml sets it)."""

    group: str
    bucket: str
    role_arn: str
    job_prefix: str
    schedule: str

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        missing = [n for n in ("INVMON_MODEL_PACKAGE_GROUP", "INVMON_ARTIFACT_BUCKET", "INVMON_MONITOR_ROLE_ARN")
                   if not env.get(n, "").strip()]
        if missing:
            raise MonitorJobError(f"the monitor function needs {', '.join(missing)} (infra/invmon.yaml sets them)")
        return cls(env["INVMON_MODEL_PACKAGE_GROUP"].strip(), env["INVMON_ARTIFACT_BUCKET"].strip(),
                   env["INVMON_MONITOR_ROLE_ARN"].strip(),
                   env.get("INVMON_MONITOR_JOB_PREFIX", DEFAULT_JOB_PREFIX).strip().strip("/"),
                   env.get("INVMON_MONITOR_SCHEDULE", "").strip())


@dataclass(frozen=True)
class JobSpec:
    """job.json: what `stage` uploaded."""

    image: str
    instance_type: str
    code: str
    code_sha256: str


class Skip(Exception):
    """This endpoint is not monitored this time; the message says why."""


# --------------------------------------------------------------------------- small parts


def period_of(schedule: str) -> timedelta:
    """rate(N unit)'s period; a cron expression (or nothing) gives DEFAULT_PERIOD."""
    found = re.fullmatch(r"rate\((\d+) (minute|hour|day)s?\)", schedule.strip())
    if not found:
        return DEFAULT_PERIOD
    return timedelta(**{f"{found[2]}s": int(found[1])})


def utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def window_end(event: dict, now: datetime) -> datetime:
    """The schedule's time (to the minute), never later than now."""
    try:
        when = parse_utc(str(event["time"]))
    except (KeyError, ValueError):
        when = now
    return min(when, now).replace(second=0, microsecond=0)


def split_s3(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://") or "/" not in uri[5:]:
        raise Skip(f"{uri!r} is not an s3://bucket/key URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def job_prefix(group: str, stage: str) -> str:
    """<group>-mon-staging- or <group>-mon-prod-: the stage's key keeps a name within 63 characters."""
    return f"{group}-{JOB_INFIX}-{stage}-"


def job_name(group: str, stage: str, until: datetime) -> str:
    return f"{job_prefix(group, stage)}{until:%y%m%d%H%M}"


def _call(fn, **kwargs):
    """One boto3 request; a failure is a one-line MonitorJobError naming the operation."""
    return call(fn, error=MonitorJobError, **kwargs)


def _not_found(exc: MonitorJobError) -> bool:
    text = str(exc)
    return any(s in text for s in ("Could not find", "does not exist", "NoSuchKey", "Not Found", "404"))


# --------------------------------------------------------------------------- what is served


def read_job_spec(s3, settings: Settings) -> JobSpec:
    key = f"{settings.job_prefix}/{JOB_FILE}"
    try:
        spec = json.loads(_call(s3.get_object, Bucket=settings.bucket, Key=key)["Body"].read())
    except MonitorJobError as exc:
        raise MonitorJobError(f"cannot read s3://{settings.bucket}/{key} ({exc}): stage the monitor's code "
                              f"with `python -m pipeline.sagemaker.monitor_job stage --bucket {settings.bucket}`") from None
    except ValueError:
        raise MonitorJobError(f"s3://{settings.bucket}/{key} is not JSON: stage the monitor's code again") from None
    code_prefix = f"s3://{settings.bucket}/{settings.job_prefix}/"
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in
                                              ("image", "instance_type", "code", "code_sha256")):
        raise MonitorJobError(f"s3://{settings.bucket}/{key} lacks image, instance_type, code or code_sha256")
    if not spec["code"].startswith(code_prefix) or not re.fullmatch(r"[0-9a-f]{64}", spec["code_sha256"]) \
            or not spec["instance_type"].startswith("ml."):
        raise MonitorJobError(f"s3://{settings.bucket}/{key}: code must be under {code_prefix}, with a SHA-256, "
                              "on an ml.* instance type")
    return JobSpec(spec["image"], spec["instance_type"], spec["code"], spec["code_sha256"])


def served_package(sm, group: str, container: dict) -> dict:
    """The model package (DescribeModelPackage) the endpoint's model serves."""
    named = container.get("ModelPackageName") or (container.get("Environment") or {}).get(PACKAGE_ENV, "")
    if found := PACKAGE_ARN.search(named or ""):
        if found["group"] != group:
            raise Skip(f"it serves {found['group']}/{found['version']}, not a version of {group}")
        return _call(sm.describe_model_package, ModelPackageName=named)
    url, token, scanned = container.get("ModelDataUrl"), None, 0
    while url and scanned < MAX_PACKAGES_SCANNED:  # newest first: what a pipeline just deployed
        page = _call(sm.list_model_packages, ModelPackageGroupName=group, ModelPackageType="Versioned",
                     SortBy="CreationTime", SortOrder="Descending", **({"NextToken": token} if token else {}))
        for summary in page.get("ModelPackageSummaryList", []):
            scanned += 1
            package = _call(sm.describe_model_package, ModelPackageName=summary["ModelPackageArn"])
            containers = (package.get("InferenceSpecification") or {}).get("Containers") or [{}]
            if containers[0].get("ModelDataUrl") == url:
                return package
        token = page.get("NextToken")
        if not token:
            break
    raise Skip(f"its model ({url or 'no model data'}) is no version of {group} that can be found")


def answer_version(s3, container: dict, baseline_uri: str) -> str:
    """What the endpoint's answers name as their model_version (select() in monitor.py)."""
    if named := (container.get("Environment") or {}).get(ANSWER_VERSION_ENV):
        return named
    bucket, key = split_s3(baseline_uri)
    try:
        baseline = json.loads(_call(s3.get_object, Bucket=bucket, Key=key)["Body"].read())
    except MonitorJobError as exc:
        if _not_found(exc):
            raise Skip(f"its MonitoringBaseline {baseline_uri} does not exist") from None
        raise
    except ValueError:
        raise Skip(f"its MonitoringBaseline {baseline_uri} is not JSON") from None
    model_id = ((baseline if isinstance(baseline, dict) else {}).get("model") or {}).get("model_id")
    if not model_id:
        raise Skip(f"its MonitoringBaseline {baseline_uri} names no model_id")
    return str(model_id)


def previous_window_end(sm, prefix: str, role_arn: str) -> datetime | None:
    """Where the newest monitor job of this endpoint (made by this function's role, not failed
    or stopped) ended its window."""
    page = _call(sm.list_processing_jobs, NameContains=prefix, SortBy="CreationTime", SortOrder="Descending",
                 MaxResults=20)
    for summary in page.get("ProcessingJobSummaries", []):
        if not summary["ProcessingJobName"].startswith(prefix) or \
                summary.get("ProcessingJobStatus") in ("Failed", "Stopped"):
            continue
        job = _call(sm.describe_processing_job, ProcessingJobName=summary["ProcessingJobName"])
        arguments = (job.get("AppSpecification") or {}).get("ContainerArguments") or []
        if job.get("RoleArn") != role_arn or "--until" not in arguments[:-1]:
            continue  # not one of ours: it says nothing about what was monitored
        try:
            return parse_utc(arguments[arguments.index("--until") + 1])
        except ValueError:
            continue
    return None


def capture_inputs(s3, destination: str, endpoint: str, variants: list[str], since: datetime,
                   until: datetime) -> list[dict]:
    """The window's day folders that hold capture files, as processing inputs (or the endpoint's
    whole capture when there are too many days)."""
    bucket, key = split_s3(destination.rstrip("/") + "/")
    root = f"{key}{endpoint}/"
    days, day = [], since.date()
    while day <= (until - timedelta(microseconds=1)).date():
        days.append(day)
        day += timedelta(days=1)
    folders = [f"{root}{variant}/{day:%Y/%m/%d}/" for variant in variants for day in days]
    folders = [f for f in folders
               if _call(s3.list_objects_v2, Bucket=bucket, Prefix=f, MaxKeys=1).get("KeyCount", 0)]
    if len(folders) > MAX_CAPTURE_INPUTS:
        folders = [root]
    return [{"InputName": f"capture-{n}", "S3Input": {
        "S3Uri": f"s3://{bucket}/{folder}", "LocalPath": f"{CAPTURE_DIR}/{n}", "S3DataType": "S3Prefix",
        "S3InputMode": "File", "S3DataDistributionType": "FullyReplicated"}} for n, folder in enumerate(folders)]


def _input(name: str, uri: str, local: str) -> dict:
    return {"InputName": name, "S3Input": {"S3Uri": uri, "LocalPath": local, "S3DataType": "S3Prefix",
                                           "S3InputMode": "File", "S3DataDistributionType": "FullyReplicated"}}


# --------------------------------------------------------------------------- one endpoint


def job_request(settings: Settings, spec: JobSpec, *, name: str, endpoint: str, package: dict, label: str,
                baseline: str, artifact: str, captures: list[dict], since: datetime, until: datetime,
                region: str) -> dict:
    """CreateProcessingJob's request for one endpoint and window."""
    baseline_file, artifact_file = baseline.rsplit("/", 1)[-1], artifact.rsplit("/", 1)[-1]
    output = f"s3://{settings.bucket}/{OUTPUT_PREFIX}/{endpoint}/{until:%Y%m%d-%H%M}"
    return {
        "ProcessingJobName": name,
        "RoleArn": settings.role_arn,
        "AppSpecification": {
            "ImageUri": spec.image,
            "ContainerEntrypoint": ["/bin/bash", "-c", ENTRYPOINT.format(
                code=CODE_DIR, sha256=spec.code_sha256, tarball=CODE_FILE), "monitor"],
            "ContainerArguments": [
                "--capture", CAPTURE_DIR, "--baseline", f"{BASELINE_DIR}/{baseline_file}",
                "--model", f"{MODEL_DIR}/{artifact_file}", "--output", OUTPUT_DIR,
                "--since", utc(since), "--until", utc(until), "--model-version", label,
                "--cloudwatch-namespace", NAMESPACE, "--endpoint", endpoint],
        },
        "ProcessingInputs": [_input("code", spec.code, CODE_DIR), _input("baseline", baseline, BASELINE_DIR),
                             _input("model", artifact, MODEL_DIR), *captures],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "monitor", "S3Output": {
            "S3Uri": output, "LocalPath": OUTPUT_DIR, "S3UploadMode": "EndOfJob"}}]},
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": spec.instance_type,
                                                  "VolumeSizeInGB": VOLUME_GB}},
        "StoppingCondition": {"MaxRuntimeInSeconds": MAX_RUNTIME_S},
        # boto3 in the job needs a region for the metrics; SageMaker does not promise one.
        "Environment": {"AWS_DEFAULT_REGION": region},
        "Tags": [{"Key": "invmon:endpoint", "Value": endpoint},
                 {"Key": "invmon:model-package", "Value": package["ModelPackageArn"]}],
    }


def monitor_endpoint(sm, s3, settings: Settings, spec: JobSpec, stage: str, until: datetime, region: str) -> dict:
    """Start the monitor job of one stage's endpoint; raises Skip with the reason when it is not
    monitored this time."""
    name = endpoint_name(settings.group, stage)
    try:
        endpoint = _call(sm.describe_endpoint, EndpointName=name)
    except MonitorJobError as exc:
        if _not_found(exc):
            raise Skip("no such endpoint") from None
        raise
    config = _call(sm.describe_endpoint_config, EndpointConfigName=endpoint["EndpointConfigName"])
    capture = config.get("DataCaptureConfig") or {}
    expected = capture_uri(settings.bucket, name)
    if not capture or capture.get("EnableCapture") is False:
        raise Skip(f"its endpoint config {endpoint['EndpointConfigName']} captures nothing")
    if capture.get("DestinationS3Uri", "").rstrip("/") != expected:
        raise Skip(f"it captures to {capture.get('DestinationS3Uri')}, not {expected}, which the monitor reads")
    variants = [v["VariantName"] for v in config.get("ProductionVariants") or []]
    model = _call(sm.describe_model, ModelName=config["ProductionVariants"][0]["ModelName"])
    container = (model.get("Containers") or [model.get("PrimaryContainer") or {}])[0]
    package = served_package(sm, settings.group, container)
    version = f"{settings.group}/{package.get('ModelPackageVersion')}"
    baseline = (package.get("CustomerMetadataProperties") or {}).get(BASELINE_PROPERTY, "")
    if not baseline:
        raise Skip(f"{version} has no {BASELINE_PROPERTY} (registered before Evaluate made one): nothing to "
                   "compare its traffic with; register a new version to monitor it")
    artifact = ((package.get("InferenceSpecification") or {}).get("Containers") or [{}])[0].get("ModelDataUrl", "")
    for uri in (baseline, artifact):
        split_s3(uri)  # an s3:// URI, or skip saying so
    previous = previous_window_end(sm, job_prefix(settings.group, stage), settings.role_arn)
    since = max(previous, until - MAX_WINDOW) if previous else until - period_of(settings.schedule)
    if since >= until:
        raise Skip(f"monitored up to {utc(previous)} already")
    captures = capture_inputs(s3, expected, name, variants, since, until)
    if not captures:
        raise Skip(f"nothing captured from {utc(since)} to {utc(until)}")
    label = answer_version(s3, container, baseline)
    job = job_name(settings.group, stage, until)
    request = job_request(settings, spec, name=job, endpoint=name, package=package, label=label,
                          baseline=baseline, artifact=artifact, captures=captures, since=since, until=until,
                          region=region)
    for attempt in range(2):
        try:
            existing = _call(sm.describe_processing_job, ProcessingJobName=job)
        except MonitorJobError as exc:
            if not _not_found(exc):
                raise
            existing = None
        if existing is not None:
            if existing.get("RoleArn") != settings.role_arn:  # someone else took the name first
                raise MonitorJobError(f"refused: a processing job {job} exists and does not run as the monitor's "
                                      "role; look into who made it")
            raise Skip(f"{job} was started already (a repeated event)")
        if attempt:
            raise MonitorJobError(f"{job} could not be created nor read")
        try:
            _call(sm.create_processing_job, **request)
            break
        except MonitorJobError as exc:  # another delivery made it meanwhile: look at it, as above
            if "already exist" not in str(exc) and "ResourceInUse" not in str(exc):
                raise
    return {"endpoint": name, "version": version, "job": job, "window": [utc(since), utc(until)],
            "model_version": label, "output": request["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]}


# --------------------------------------------------------------------------- Lambda


def handler(event: dict, context=None, now: datetime | None = None) -> dict:
    """Invoked by the stack's monitor schedule (see the module docstring)."""
    now = now or datetime.now(timezone.utc)
    if event.get("source") != "aws.events" or event.get("detail-type") != SCHEDULE_EVENT:
        result = {"started": [], "ignored": f"not the monitor schedule ({event.get('detail-type')!r})"}
        print(json.dumps(result))
        return result
    settings = Settings.from_env()
    until = window_end(event, now)
    region = resolve_region(event.get("region"))
    sm, s3 = client("sagemaker", region), client("s3", region)
    spec = read_job_spec(s3, settings)
    started, skipped, failed = [], {}, {}
    for stage in STAGES:
        name = endpoint_name(settings.group, stage)
        try:
            started.append(monitor_endpoint(sm, s3, settings, spec, stage, until, region))
        except Skip as why:
            skipped[name] = str(why)
            print(f"monitor: {name} skipped: {why}")  # CloudWatch Logs
        except MonitorJobError as exc:
            failed[name] = str(exc)
    result = {"window_end": utc(until), "started": started, "skipped": skipped, "failed": failed}
    print(json.dumps(result))
    if failed:  # the invocation fails: the function's error alarm tells the reviewers
        raise MonitorJobError("; ".join(f"{name}: {why}" for name, why in failed.items()))
    return result


# --------------------------------------------------------------------------- staging the code


def stage(bucket: str, prefix: str = DEFAULT_JOB_PREFIX, region: str | None = None,
          instance_type: str = "ml.m5.xlarge", s3=None) -> dict:
    """Upload the monitor's code (scripts/monitor with inference/photos.py beside monitor.py, as
    Preprocess's is staged) and job.json under s3://bucket/prefix/; returns job.json."""
    import hashlib
    import tempfile
    from pathlib import Path

    from pipeline.sagemaker.definition import build_source_tarball, image_uri, sdk_import_region
    from steps.base import Code
    from steps.images import MONITOR

    region = resolve_region(region)
    sdk_import_region(region)  # the SDK's image table is read offline, but importing it needs a region
    prefix = prefix.strip("/")
    code = Code(MONITOR.requirements.parent.name, "monitor.py", extra_files=("inference/photos.py",))
    with tempfile.TemporaryDirectory(prefix="invmon-monitor-") as tmp:
        body = build_source_tarball(code, Path(tmp)).read_bytes()
    spec = {"format": 1, "image": image_uri(MONITOR, region, instance_type), "instance_type": instance_type,
            "code": f"s3://{bucket}/{prefix}/{CODE_FILE}", "code_sha256": hashlib.sha256(body).hexdigest()}
    s3 = s3 or client("s3", region)
    _call(s3.put_object, Bucket=bucket, Key=f"{prefix}/{CODE_FILE}", Body=body)
    _call(s3.put_object, Bucket=bucket, Key=f"{prefix}/{JOB_FILE}", Body=json.dumps(spec, indent=2).encode(),
          ContentType="application/json")
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sagemaker.monitor_job",
                                     description="Stage the scheduled monitor job's code and settings.")
    commands = parser.add_subparsers(dest="command", required=True)
    staging = commands.add_parser("stage", help="upload sourcedir.tar.gz and job.json for the monitor function")
    staging.add_argument("--bucket", required=True, help="the stack's ArtifactBucketName")
    staging.add_argument("--prefix", default=DEFAULT_JOB_PREFIX, help="the stack's MonitorJobPrefix")
    staging.add_argument("--region")
    staging.add_argument("--instance-type", default="ml.m5.xlarge",
                         help="the job's instance type (a GPU type gets the GPU image)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"ml\.[a-z0-9]+\.[a-z0-9]+", args.instance_type):
        parser.error(f"--instance-type {args.instance_type!r}: give an ml.* instance type")
    try:
        spec = stage(args.bucket, args.prefix, args.region, args.instance_type)
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"monitor_job: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(spec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
