"""Bulk counting on SageMaker: `invmon predict s3://BUCKET/PREFIX/ --backend aws --out counts.csv`.

A Batch Transform job counts the photos under an S3 prefix with a registered model package: the
package's own artifact, verified against the SHA-256 recorded at registration and served from
its copy under `registry/` (the copy production serves), in the package's serving image, so the
artifact's `code/inference.py` answers every photo as the endpoint would. Then the answers
become a CSV in exactly the local bulk command's format (pipeline/serving/bulk.py).

- Input: every .jpg/.jpeg/.png object under the prefix, named in a manifest (S3DataType
  ManifestFile), so objects that are not photos are never sent; they are skipped and listed. One
  job per content type (image/jpeg, image/png, by suffix), one photo per request (SplitType
  None, BatchStrategy SingleRecord), MaxPayloadInMB sized for the largest photo.
- Model: a SageMaker Model named by the version and what it serves (digest, image, role), made
  once and reused by later runs.
- Answers: Batch Transform writes `<key>.out` (output_fn's JSON) for each photo it answered. A
  photo the model refused (a 4xx from the container: not a JPEG, truncated, ...) gets no `.out`,
  and SageMaker then marks the whole job Failed; its message is in the job's data log in
  CloudWatch Logs, from which it becomes that photo's error row. The CSV is written only when
  every photo has its answer or its own error; otherwise (the job failed for another reason,
  or was stopped) FailureReason is printed and no CSV is written.

Plain boto3 (no SDK); requests retried by botocore's standard retry mode (clients.client).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Mapping

from pipeline.digests import sha256_of
from pipeline.registry.labels import DIGEST_ENV, PACKAGE_ENV, PACKAGE_TAG, cost_tags
from pipeline.registry.local import DIGEST_PROPERTY, ModelVersion
from pipeline.sagemaker import clients

LOG = logging.getLogger("invmon.transform")

STAGE = "batch"  # the invmon:stage cost tag of a bulk count's Model and jobs
BULK_PREFIX = "bulk"  # s3://<artifact bucket>/bulk/<group>/: what the stack lets ModelRole write
LOG_GROUP = "/aws/sagemaker/TransformJobs"
LOG_MARK = "[sagemaker logs]: "
MAX_PAYLOAD_MB = 100  # CreateTransformJob's ceiling, also for MaxConcurrentTransforms x MaxPayloadInMB
TERMINAL = ("Completed", "Failed", "Stopped")
JSON = "application/json"


class TransformError(Exception):
    """A bulk count on SageMaker that cannot start or did not finish; the message says why."""


# --------------------------------------------------------------------------- S3 input


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise TransformError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def content_type(key: str) -> str | None:
    """The request's ContentType by suffix (the local command's rule); None: not a photo."""
    from pipeline.serving.endpoint import CONTENT_TYPE_BY_SUFFIX

    return CONTENT_TYPE_BY_SUFFIX.get(PurePosixPath(key).suffix.lower())


@dataclass
class Photo:
    bucket: str
    key: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass
class Listing:
    bucket: str
    prefix: str  # "" or ending in "/"
    photos: list[Photo] = field(default_factory=list)  # sorted by key
    skipped: list[str] = field(default_factory=list)  # keys that are not photos
    refused: dict[str, str] = field(default_factory=dict)  # photo URI -> why it is not sent

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _objects(s3, bucket: str, prefix: str) -> Iterator[dict]:
    token = None
    while True:
        page = clients.call(s3.list_objects_v2, error=TransformError, service="S3", Bucket=bucket,
                            Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        yield from page.get("Contents", [])
        token = page.get("NextContinuationToken")
        if not token:
            return


def list_photos(s3, uri: str) -> Listing:
    """The photos under an s3:// prefix (a folder: `s3://b/p` means `s3://b/p/`), the objects
    that are not photos, and the photos no request can carry (over 100 MB)."""
    bucket, prefix = split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    listing = Listing(bucket, prefix)
    for found in _objects(s3, bucket, prefix):
        key, size = found["Key"], int(found.get("Size", 0))
        if key.endswith("/"):  # a console "folder"
            continue
        if content_type(key) is None:
            listing.skipped.append(key)
            continue
        photo = Photo(bucket, key, size)
        if size > MAX_PAYLOAD_MB * 1_000_000:
            listing.refused[photo.uri] = (f"{size / 1e6:.0f} MB: larger than the {MAX_PAYLOAD_MB} MB "
                                          "a Batch Transform request may carry")
        listing.photos.append(photo)
    listing.photos.sort(key=lambda p: p.key)
    if not listing.photos:
        others = f" ({len(listing.skipped)} other objects)" if listing.skipped else ""
        raise TransformError(f"no .jpg/.jpeg/.png photos under {listing.uri}{others}")
    return listing


def instance_types() -> list[str]:
    """The instance types a transform job may run on, from botocore's model of the API."""
    import botocore.session

    shape = botocore.session.get_session().get_service_model("sagemaker").shape_for("TransformInstanceType")
    return list(shape.enum)


def payload_mb(photos: Iterable[Photo]) -> int:
    """MaxPayloadInMB: the largest photo, rounded up to whole MB (at least 1)."""
    return max(1, math.ceil(max((p.size for p in photos), default=0) / 1_000_000))


# --------------------------------------------------------------------------- requests


@dataclass
class Settings:
    role_arn: str
    instance_type: str = "ml.m5.xlarge"
    instance_count: int = 1
    concurrency: int = 8  # MaxConcurrentTransforms: requests in flight per instance
    output: str | None = None  # s3:// prefix for the manifests and .out objects
    poll_seconds: float = 30.0


@dataclass
class Job:
    name: str
    content_type: str
    photos: list[Photo]
    manifest_uri: str
    output_uri: str  # ends in "/"
    request: dict = field(default_factory=dict)  # CreateTransformJob's


def model_name(model: ModelVersion, image: str, data_url: str, role_arn: str) -> str:
    """The Model's name: by version and what it serves, so a later run finds it (<= 63 chars)."""
    served = "\0".join((model.properties.get(DIGEST_PROPERTY, ""), image, data_url, role_arn))
    return f"{model.group[:38]}-v{model.version}-batch-{sha256_of([served.encode()])[:10]}"


def job_name(model: ModelVersion, kind: str, now: datetime) -> str:
    """Unique per millisecond and content type; starts with the group (its log streams are named by
    it, which ModelRole's log permission is scoped to)."""
    tail = f"-v{model.version}-{kind}-{now:%m%d%H%M%S}{now.microsecond // 1000:03d}"
    return model.group[:63 - len(tail)] + tail


def transform_request(job: Job, model: str, settings: Settings, payload: int, tags: list[dict]) -> dict:
    """CreateTransformJob: one photo per request, answered as JSON, one .out per photo."""
    return {
        "TransformJobName": job.name,
        "ModelName": model,
        "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": payload,
        "MaxConcurrentTransforms": max(1, min(settings.concurrency, MAX_PAYLOAD_MB // payload)),
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "ManifestFile", "S3Uri": job.manifest_uri}},
            "ContentType": job.content_type,
            "SplitType": "None",
            "CompressionType": "None",
        },
        "TransformOutput": {"S3OutputPath": job.output_uri, "Accept": JSON, "AssembleWith": "None"},
        "TransformResources": {"InstanceType": settings.instance_type,
                               "InstanceCount": settings.instance_count},
        "Tags": tags,
    }


def manifest(listing: Listing, photos: list[Photo]) -> list:
    """A ManifestFile: the input prefix, then each photo's key relative to it."""
    return [{"prefix": listing.uri}, *[p.key[len(listing.prefix):] for p in photos]]


def output_key(job: Job, listing: Listing, photo: Photo) -> str:
    """Where Batch Transform writes a photo's answer: its key relative to the manifest's prefix,
    under the job's output path, with `.out` appended."""
    _, out_prefix = split_s3(job.output_uri)
    return f"{out_prefix}{photo.key[len(listing.prefix):]}.out"


# --------------------------------------------------------------------------- the model


def _serving_container(sm, model: ModelVersion) -> dict:
    package = clients.call(sm.describe_model_package, error=TransformError, service="SageMaker",
                           ModelPackageName=model.arn)
    container = ((package.get("InferenceSpecification") or {}).get("Containers") or [{}])[0]
    if not container.get("Image"):
        raise TransformError(f"{model.name} names no serving image in its InferenceSpecification")
    return container


def ensure_model(sm, s3, model: ModelVersion, role_arn: str) -> str:
    """The SageMaker Model serving `model`'s verified artifact: made, or found from an earlier
    run. One of that name that serves something else is refused, never used."""
    from pipeline.registry.sagemaker_target import SageMakerTarget
    from pipeline.registry.stages import DeployError

    if not model.arn:
        raise TransformError(f"{model.name} has no model package ARN")
    container = _serving_container(sm, model)
    try:  # hashed against the digest recorded at registration, as every deploy does
        data_url = SageMakerTarget(sm, role_arn, s3=s3).registry_copy(model)
    except DeployError as exc:
        raise TransformError(str(exc)) from None
    name = model_name(model, container["Image"], data_url, role_arn)

    def same(found: dict) -> bool:
        have = (found.get("Containers") or [found.get("PrimaryContainer") or {}])[0]
        return (have.get("ModelDataUrl"), have.get("Image"), found.get("ExecutionRoleArn")) == \
            (data_url, container["Image"], role_arn)

    for attempt in range(2):
        try:
            found = clients.call(sm.describe_model, error=TransformError, service="SageMaker", ModelName=name)
        except TransformError as exc:
            if "Could not find model" not in str(exc) and "does not exist" not in str(exc):
                raise
            found = None
        if found is not None:
            if not same(found):
                raise TransformError(f"refused: a Model named {name} exists and serves something else "
                                     f"than {model.name}'s verified artifact; delete it or look into who made it")
            LOG.info(f"model {name} (reused)")
            return name
        if attempt:
            break
        environment = {**(container.get("Environment") or {}), PACKAGE_ENV: model.arn,
                       DIGEST_ENV: model.properties.get(DIGEST_PROPERTY, "")}
        try:
            clients.call(sm.create_model, error=TransformError, service="SageMaker", ModelName=name,
                         ExecutionRoleArn=role_arn, EnableNetworkIsolation=True,
                         Containers=[{"Image": container["Image"], "ModelDataUrl": data_url,
                                      "Environment": environment}],
                         Tags=tags_for(model))
            LOG.info(f"model {name} (created)")
            return name
        except TransformError as exc:
            if "already exist" not in str(exc):
                raise  # else another run made it meanwhile: check it, as above
    raise TransformError(f"Model {name} could not be created nor read")


def tags_for(model: ModelVersion) -> list[dict]:
    return [{"Key": PACKAGE_TAG, "Value": model.arn}, *cost_tags(model.group, STAGE, model.run_id or "unknown")]


# --------------------------------------------------------------------------- answers


def _object_of(rest: str, photos: Mapping[str, str]) -> tuple[str | None, str]:
    """("<bucket>/<key>", detail) from a data-log line's text after the mark, for a known photo."""
    start = 0
    while (at := rest.find(":", start)) != -1:
        if rest[:at] in photos and (at + 1 == len(rest) or rest[at + 1] == " "):
            return rest[:at], rest[at + 2:]
        start = at + 1
    return None, ""


def _refusal(status: str, message: str) -> str:
    try:
        parsed = json.loads(message)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return parsed["error"]  # output_fn's own answer: the local command's row says the same
    if message:
        return message[:500]
    return f"refused by the model container ({status or 'no reason logged'})"


def refusals_from_data_log(messages: Iterable[str], photos: Mapping[str, str]) -> dict[str, str]:
    """Photo URI -> the error the container answered it with, from a transform job's data log.

    `photos` maps "<bucket>/<key>" (how the log names an object) to the photo's URI. A refused
    object is logged as "<bucket>/<key>: ClientError: 400", then "<bucket>/<key>: Message:" and
    the response body, each line an event of its own or all of them lines of one event."""
    status: dict[str, str] = {}
    body: dict[str, list[str]] = {}
    reading: set[str] = set()
    for message in messages:
        first, *more = message.splitlines() or [""]
        _, mark, rest = first.partition(LOG_MARK)
        obj, detail = _object_of(rest, photos) if mark else (None, "")
        if obj is None:
            continue
        if detail.strip() == "Message:":
            reading.add(obj)
        elif obj in reading:
            body.setdefault(obj, []).append(detail)
        elif detail.strip():
            status.setdefault(obj, detail.strip())
        if more:  # the body on the event's own lines
            reading.add(obj)
            body.setdefault(obj, []).extend(more)
    return {photos[obj]: _refusal(status.get(obj, ""), "\n".join(body.get(obj, [])).strip())
            for obj in status.keys() | body.keys()}


def _data_log(logs, job: str) -> Iterator[str]:
    """The messages of a job's data-log streams, in order (none when it logged nothing)."""
    token = None
    streams = []
    while True:
        try:
            page = clients.call(logs.describe_log_streams, error=TransformError, service="CloudWatch Logs",
                                logGroupName=LOG_GROUP, logStreamNamePrefix=job,
                                **({"nextToken": token} if token else {}))
        except TransformError as exc:
            if "ResourceNotFound" in str(exc):
                return
            raise
        streams += [s["logStreamName"] for s in page.get("logStreams", [])
                    if s["logStreamName"].startswith(f"{job}/") and s["logStreamName"].endswith("/data-log")]
        token = page.get("nextToken")
        if not token:
            break
    for stream in sorted(streams):
        token = None
        while True:
            page = clients.call(logs.get_log_events, error=TransformError, service="CloudWatch Logs",
                                logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=True,
                                **({"nextToken": token} if token else {}))
            yield from (event.get("message", "") for event in page.get("events", []))
            if not page.get("events") or page.get("nextForwardToken") == token:
                break
            token = page.get("nextForwardToken")


# --------------------------------------------------------------------------- a run


@dataclass
class Result:
    """What the jobs left: each photo's answer (the key of its .out) or its error."""

    listing: Listing
    jobs: list[Job]
    described: dict[str, dict]
    outputs: dict[str, str]  # photo URI -> .out key
    refusals: dict[str, str]  # photo URI -> error
    missing: list[Photo]
    refused_by: dict[str, int] = field(default_factory=dict)  # job -> photos it refused

    @property
    def complete(self) -> bool:
        return not self.missing and all(
            d.get("TransformJobStatus") in ("Completed", "Failed") for d in self.described.values())

    def failures(self) -> list[str]:
        return [f"transform job {name} {d.get('TransformJobStatus')}: "
                f"{d.get('FailureReason') or 'no FailureReason given'}"
                + (f" (it refused {self.refused_by[name]} photos: each is a row with its error)"
                   if self.complete and self.refused_by.get(name) else "")
                for name, d in self.described.items() if d.get("TransformJobStatus") != "Completed"]


class BulkCount:
    """One `invmon predict s3://... --backend aws` run: plan, start, wait, collect."""

    def __init__(self, sm, s3, logs, settings: Settings, clock=time.time, sleep=time.sleep):
        self.sm, self.s3, self.logs, self.settings = sm, s3, logs, settings
        self.clock, self.sleep = clock, sleep

    def start(self, listing: Listing, model: ModelVersion) -> list[Job]:
        """The Model, a manifest per content type, and a transform job for each."""
        name = ensure_model(self.sm, self.s3, model, self.settings.role_arn)
        base = self.settings.output or _default_output(model)
        out_bucket, out_prefix = split_s3(base if base.endswith("/") else base + "/")
        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        sent = [p for p in listing.photos if p.uri not in listing.refused]
        jobs = []
        for kind in sorted({content_type(p.key) for p in sent}):
            photos = [p for p in sent if content_type(p.key) == kind]
            job = job_name(model, kind.split("/")[1], now)
            jobs.append(Job(job, kind, photos, f"s3://{out_bucket}/{out_prefix}{job}/input.manifest",
                            f"s3://{out_bucket}/{out_prefix}{job}/out/"))
        tags = tags_for(model)
        for job in jobs:
            job.request = transform_request(job, name, self.settings, payload_mb(job.photos), tags)
            bucket, key = split_s3(job.manifest_uri)
            clients.call(self.s3.put_object, error=TransformError, service="S3", Bucket=bucket, Key=key,
                         Body=json.dumps(manifest(listing, job.photos)).encode(), ContentType=JSON)
            clients.call(self.sm.create_transform_job, error=TransformError, service="SageMaker", **job.request)
            LOG.info(f"transform job {job.name}: {len(job.photos)} {job.content_type} photos on "
                     f"{self.settings.instance_count} x {self.settings.instance_type}, answers under {job.output_uri}")
        return jobs

    def _answered(self, job: Job) -> set[str]:
        bucket, prefix = split_s3(job.output_uri)
        return {o["Key"] for o in _objects(self.s3, bucket, prefix) if o["Key"].endswith(".out")}

    def wait(self, jobs: list[Job], total: int, progress: bool = True) -> dict[str, dict]:
        """Poll each job (DescribeTransformJob) until it ends; the bar counts the .out objects."""
        from tqdm import tqdm

        described: dict[str, dict] = {}
        try:
            with tqdm(total=total, unit="photo", disable=not progress, dynamic_ncols=True) as bar:
                while True:
                    for job in jobs:
                        if described.get(job.name, {}).get("TransformJobStatus") not in TERMINAL:
                            described[job.name] = clients.call(
                                self.sm.describe_transform_job, error=TransformError, service="SageMaker",
                                TransformJobName=job.name)
                    bar.n = min(total, sum(len(self._answered(job)) for job in jobs))
                    bar.set_postfix_str(", ".join(f"{job.content_type.split('/')[1]} job "
                                                  f"{described[job.name].get('TransformJobStatus')}"
                                                  for job in jobs))
                    bar.refresh()
                    if all(d.get("TransformJobStatus") in TERMINAL for d in described.values()):
                        return described
                    self.sleep(self.settings.poll_seconds)
        except KeyboardInterrupt:
            LOG.error("stopped waiting; the transform jobs keep running (stop them with `aws sagemaker "
                      "stop-transform-job --transform-job-name NAME`): " + ", ".join(j.name for j in jobs))
            raise

    def collect(self, listing: Listing, jobs: list[Job], described: dict[str, dict]) -> Result:
        outputs: dict[str, str] = {}
        refusals: dict[str, str] = dict(listing.refused)
        missing: list[Photo] = []
        refused_by: dict[str, int] = {}
        for job in jobs:
            present = self._answered(job)
            by_name: dict[str, list[str]] = {}
            for key in present:
                by_name.setdefault(PurePosixPath(key).name, []).append(key)
            unanswered = []
            for photo in job.photos:
                key = output_key(job, listing, photo)
                if key not in present:  # SageMaker's documented layout names subfolders
                    # differently for some inputs: a unique file name identifies the answer too
                    same = by_name.get(PurePosixPath(key).name, [])
                    key = same[0] if len(same) == 1 else None
                if key:
                    outputs[photo.uri] = key
                else:
                    unanswered.append(photo)
            if unanswered and described[job.name].get("TransformJobStatus") == "Failed":
                try:
                    logged = refusals_from_data_log(_data_log(self.logs, job.name),
                                                    {f"{p.bucket}/{p.key}": p.uri for p in unanswered})
                except TransformError as exc:
                    raise TransformError(
                        f"transform job {job.name} Failed: {described[job.name].get('FailureReason')}; "
                        f"why it refused {len(unanswered)} photos is in its data log ({LOG_GROUP}), which "
                        f"could not be read: {exc}. No CSV was written") from None
                refusals.update(logged)
                refused_by[job.name] = len(logged)
            for photo in unanswered:
                if photo.uri in refusals:
                    continue
                if photo.size == 0:  # an empty object may make no request: its row says so
                    refusals[photo.uri] = "empty file: zero bytes (Batch Transform sent no request for it)"
                else:
                    missing.append(photo)
        return Result(listing, jobs, described, outputs, refusals, missing, refused_by)

    def answers(self, result: Result) -> Iterator[tuple[str, bytes | None]]:
        """(photo URI, its .out's bytes or None) in photo order, fetched a few at a time."""
        def fetch(photo: Photo) -> tuple[str, bytes | None]:
            key = result.outputs.get(photo.uri)
            if key is None:
                return photo.uri, None
            bucket, _ = split_s3(result.jobs[0].output_uri)
            found = clients.call(self.s3.get_object, error=TransformError, service="S3", Bucket=bucket, Key=key)
            return photo.uri, found["Body"].read()

        with ThreadPoolExecutor(8, thread_name_prefix="invmon-out") as pool:
            yield from pool.map(fetch, result.listing.photos)


def _default_output(model: ModelVersion) -> str:
    """s3://<the artifact's bucket>/bulk/<group>/: where the stack's ModelRole may write."""
    bucket, _ = split_s3(model.artifact_uri)
    return f"s3://{bucket}/{BULK_PREFIX}/{model.group}/"


def write(rows, out: str | Path, total: int, s3=None, progress: bool = True):
    """The CSV, by the local command's writer, to a file or an s3:// URI: written whole to a
    temporary file first, so that whatever is at `out` is a complete CSV."""
    from pipeline.serving import bulk

    target = str(out)
    local = None if target.startswith("s3://") else Path(target)
    if local is None:
        bucket, key = split_s3(target)
        if not key or key.endswith("/"):
            raise TransformError(f"--out {target} names no object: give s3://bucket/key.csv")
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".counts-", suffix=".csv",
                                         dir=local.parent if local else None)
    os.close(handle)
    try:
        tally = bulk.write_csv(rows, Path(temporary), total=total, progress=progress)
        if local:
            os.replace(temporary, local)
        else:
            with open(temporary, "rb") as body:
                clients.call(s3.put_object, error=TransformError, service="S3", Bucket=bucket, Key=key,
                             Body=body, ContentType="text/csv")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return tally


def choose_version(registry, sm, group: str, version: int | None = None,
                   endpoint: str | None = None) -> ModelVersion:
    """The local command's choice on the SageMaker registry: --version of the group, or the
    version a SageMaker endpoint serves, or by default the newest Approved version."""
    from pipeline.registry.local import RegistryError
    from pipeline.registry.sagemaker_target import SageMakerTarget

    try:
        if endpoint:
            served = SageMakerTarget(sm, "").current(endpoint)
            if served is None:
                raise TransformError(f"no SageMaker endpoint {endpoint}")
            if not served.version:
                raise TransformError(f"endpoint {endpoint} serves no version of a model package group")
            return registry.get(served.group, served.version)
        if version is not None:
            return registry.get(group, version)
        found = registry.latest(group, "Approved")
    except RegistryError as exc:
        raise TransformError(str(exc)) from None
    if found is None:
        raise TransformError(f"{group} has no Approved version in the SageMaker Model Registry: "
                             "approve one, or pick one with --version")
    return found


def _listed(keys: list[str], shown: int = 10) -> str:
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def count(sm, s3, logs, source: str, out: str | Path, settings: Settings, group: str,
          version: int | None = None, endpoint: str | None = None, progress: bool = True,
          clock=time.time, sleep=time.sleep) -> str:
    """The whole bulk count: list, start, wait, collect, write. Returns the summary line; raises
    TransformError, with nothing written at `out`, when it cannot start or did not finish."""
    from pipeline.registry.sagemaker import SageMakerRegistry
    from pipeline.serving import bulk

    started = clock()
    listing = list_photos(s3, source)
    if listing.skipped:
        LOG.warning(f"skipped {len(listing.skipped)} objects under {listing.uri} that are not "
                    f".jpg/.jpeg/.png photos: {_listed(listing.skipped)}")
        LOG.debug("skipped: " + ", ".join(listing.skipped))
    model = choose_version(SageMakerRegistry(sagemaker_client=sm, s3_client=s3), sm, group, version, endpoint)
    LOG.info(f"counting {len(listing.photos)} photos under {listing.uri} with {model.name} ({model.status})")
    run = BulkCount(sm, s3, logs, settings, clock=clock, sleep=sleep)
    jobs = run.start(listing, model) if len(listing.refused) < len(listing.photos) else []
    described = run.wait(jobs, total=len(listing.photos) - len(listing.refused), progress=progress)
    result = run.collect(listing, jobs, described)
    if not result.complete:
        where = ", ".join(job.output_uri for job in jobs)
        raise TransformError(
            "; ".join(result.failures() or ["the transform jobs left photos without an answer"])
            + f". {len(result.outputs)} of {len(listing.photos)} photos were answered, "
              f"{len(result.refusals)} refused, {len(result.missing)} have neither (e.g. "
              f"{_listed([p.uri for p in result.missing], 3)}): no CSV was written. The answers stay "
              f"under {where}; the jobs' logs are in CloudWatch Logs, {LOG_GROUP}")
    for failure in result.failures():  # failed only for the photos it refused: their rows say why
        LOG.warning(failure)
    rows = bulk.rows_from_answers(run.answers(result), result.refusals)
    tally = write(rows, out, total=len(listing.photos), s3=s3, progress=progress)
    tally.seconds = clock() - started
    return f"wrote {out}: {bulk.summary_line(tally)}"
