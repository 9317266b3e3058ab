"""The bin-count DAG as a SageMaker pipeline (SageMaker Python SDK v3).

`get_pipeline()` is the SageMaker project-template entry point. It compiles the step
declarations (`steps.DAG`) with a profile's defaults (pipeline/dag/compile.py) and turns each
compiled request, by its type, into SDK v3 objects; every field the request holds comes from it
(`_Build.sdk` turns its placeholders into Parameters, step Properties, Join and JsonGet):

    Processing     -> FrameworkProcessor (PyTorch image, the step's own source + requirements)
                      (each step container's image and requirements file: steps/images.py);
                      the smoke test is one too, on one instance, given the region for boto3
    Tuning         -> HyperparameterTuner over a ModelTrainer, tuner.tune() -> TuningStep
    Training       -> ModelTrainer.train() -> TrainingStep (checkpoints + managed spot)
    Condition      -> ConditionStep(ConditionGreaterThanOrEqualTo(JsonGet, parameter))
    Fail           -> FailStep(Join(message parts))
    RegisterModel  -> ModelBuilder.register() -> ModelStep (ModelMetrics = evaluation.json,
                      CustomerMetadataProperties: the report's S3 URI and the artifact's SHA-256;
                      lineage: MetadataProperties, the description)
    Endpoint       -> ModelBuilder.build() -> ModelStep "<name>-Model",
                      EndpointConfigStep "<name>-EndpointConfig" (with the DataCaptureConfig,
                      writing to s3://<bucket>/capture/<endpoint>), EndpointStep "<name>"

What the SDK adds (images, roles, volumes, retry policies, code channels, spot) is this
module's; tests/test_parity.py checks that every compiled field is in the definition as is.

Helper steps a declaration needs are named "<declaration>-<part>", so the declared DAG can be
read back from the definition (tests/test_parity.py does).

Every SDK import is inside a function: importing sagemaker.mlops creates boto3 clients at import
time and fails without a region, and the local path of `invmon` must not need the SDK at all.

Code staging. The SDK uploads code while it builds the definition, by default under keys named
after timestamped job names, so every build would be a new definition. Here each step's code is
a reproducible sourcedir.tar.gz (stage_source, so train.py has inference.py beside it) and every
upload goes through `StagingSession`, which keys it by content
(s3://BUCKET/PIPELINE/code/<name>-<sha256 prefix>/...); the SDK's own runproc.sh is keyed by its
hash and its fixed install_requirements.py helper by the step's job prefix. So the definition
only changes when the code does: step caching (Preprocess, Tune) survives an upsert of
unchanged code, and a cached step never reuses results computed by other code. With
`offline_dir`, the same files are written under that folder instead and any AWS call the SDK
attempts raises `OfflineError`: `invmon definition` builds the exact definition `invmon upsert`
would (tests/test_sagemaker_definition.py compares them), with no network and no AWS account.

Empty-string parameter defaults. A few parameters mean "not used" when empty (KmsKeyId,
ManifestUrl, SubnetIds, SecurityGroupIds). An empty string must never reach the AWS APIs (an
empty S3Uri or subnet is rejected when the job is created, and an empty KMS key id is not "no
key"), and a pipeline cannot drop a field at run time, so these are decided when the
definition is built (at upsert, from the profile or `--param`):
  - KmsKeyId: empty -> no KMS fields at all; set -> output, processing-volume and endpoint
    KMS fields are wired to the KmsKeyId parameter (so an execution may switch keys).
  - ManifestUrl (an optional input in steps/): empty -> Preprocess has no manifest input (the
    script finds nothing at --manifest, as with the local runner's empty folder); set -> the
    input reads the ManifestUrl parameter.
  - SubnetIds/SecurityGroupIds: a pipeline cannot split a string into a list at run time, so
    the VPC config holds the literal lists given at build time; the parameters stay in the
    definition as a record. `invmon start` refuses overrides that the definition cannot honour
    (see `fixed_parameters`).
  - EnableDebugger: "true" at build time gives the Train job SageMaker Debugger's hook and
    built-in rules (DebugHookConfig, DebugRuleConfigurations) and the image and requirements file
    that carry smdebug (steps/images.py, train-debugger); "false" gives none of them. A pipeline
    cannot add request fields or change an image at run time, so the parameter stays in the
    definition as a record and `invmon start` refuses to override it.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import steps as declared
from pipeline.dag import profiles
from pipeline.digests import file_sha256, tree_sha256
from pipeline.dag.compile import CompileError, Resolver, StepRequest, compile_dag, lower, parse_step_ref
from pipeline.dag.parameters import PARAMETERS, ParameterError, validate
from steps import base, images

# Each step container's image (framework version, Python, CPU/GPU) and requirements file are
# declared in steps/images.py; the CPU or GPU image follows the build-time instance type.

CACHE_EXPIRY = "P30D"
MAX_PARALLEL_STEPS = 2  # ParallelismConfiguration sent with create/update and each start
# Endpoint configs are named <StagingEndpointName>-<12-char execution id>, at most 63 chars.
MAX_ENDPOINT_NAME = 50
SPOT_WAIT_FACTOR = 2  # MaxWaitTimeInSeconds = 2 x MaxRuntimeInSeconds (it must be >= it)
PROCESSING_VOLUME_GB = 50
TRAINING_VOLUME_GB = 50
# Used for `invmon definition` when no role/bucket is given: the definition is complete and
# valid, but only `invmon upsert --role-arn ...` makes one that can run.
PLACEHOLDER_ROLE = "arn:aws:iam::000000000000:role/invmon-definition-placeholder"
PLACEHOLDER_BUCKET = "invmon-definition-placeholder"

# Parameters whose value is fixed into the definition's structure when it is built.
KMS_PARAMETER = "KmsKeyId"
VPC_PARAMETERS = ("SubnetIds", "SecurityGroupIds")
DEBUGGER_PARAMETER = "EnableDebugger"


class OfflineError(RuntimeError):
    """The SDK tried to call AWS while the definition was being built offline."""


class DefinitionError(ValueError):
    """A declaration or parameter value that cannot become a SageMaker definition."""


# --------------------------------------------------------------------------- staging


def _clean_copy(src: Path, dest: Path) -> None:
    """Copy a file or folder, leaving out bytecode caches (they differ between machines)."""
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def build_source_tarball(code: base.Code, dest_dir: Path) -> Path:
    """`sourcedir.tar.gz` of a step's code, staged as its container sees it (stage_source).

    Byte-for-byte reproducible (sorted members, zero mtimes/owners, no gzip timestamp), so its
    digest names the code, not the checkout it came from.
    """
    staged = base.stage_source(code, dest_dir / "src")
    tarball = dest_dir / "sourcedir.tar.gz"
    with open(tarball, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in sorted(p for p in staged.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(item.relative_to(staged).as_posix())
            data = item.read_bytes()
            info.size, info.mtime, info.mode = len(data), 0, 0o755 if os.access(item, os.X_OK) else 0o644
            tar.addfile(info, io.BytesIO(data))
    return tarball


def image_uri(container: images.Container, region: str, instance_type: str) -> str:
    """The URI of a step container's image in `region` for `instance_type` (CPU or GPU): the
    SDK's image_uris, which reads its own tables and calls no AWS API."""
    from sagemaker.core import image_uris

    image = container.image
    return image_uris.retrieve("pytorch", region=region, version=image.version, py_version=image.python,
                               instance_type=instance_type, image_scope=image.scope)


def _is_pipeline_variable(value) -> bool:
    from sagemaker.core.helper.pipeline_variable import PipelineVariable

    return isinstance(value, PipelineVariable)


_SESSION_CLASS = None


def _staging_session_class():
    """PipelineSession with content-addressed (and optionally offline) uploads."""
    global _SESSION_CLASS
    if _SESSION_CLASS is not None:
        return _SESSION_CLASS
    from sagemaker.core.workflow.pipeline_context import PipelineSession

    class StagingSession(PipelineSession):
        def __init__(self, *, boto_session, default_bucket, code_prefix, offline_dir=None):
            super().__init__(boto_session=boto_session, default_bucket=default_bucket)
            self.code_prefix = code_prefix.strip("/")
            self.offline_dir = Path(offline_dir) if offline_dir is not None else None

        # The SDK passes a hard-coded regional STS endpoint_url here, which overrides
        # AWS_ENDPOINT_URL; a plain client keeps boto3's own endpoint resolution.
        def account_id(self) -> str:
            return self.boto_session.client("sts").get_caller_identity()["Account"]

        def generate_default_sagemaker_bucket_name(self, boto_session):
            account = boto_session.client("sts").get_caller_identity()["Account"]
            return f"sagemaker-{boto_session.region_name}-{account}"

        def default_bucket(self):
            if self.offline_dir is not None:
                # The real one checks (and may create) the bucket: not offline.
                return self._default_bucket_name_override
            return super().default_bucket()

        def upload_data(self, path, bucket=None, key_prefix="data", callback=None, extra_args=None):
            with tempfile.TemporaryDirectory(prefix="invmon-upload-") as tmp:
                src = Path(path)
                clean = Path(tmp) / src.name
                _clean_copy(src, clean)
                key_prefix = key_prefix.strip("/")
                if not key_prefix.startswith(self.code_prefix + "/"):
                    leaf = key_prefix.rsplit("/", 1)[-1] or "data"
                    key_prefix = f"{self.code_prefix}/{leaf}-{tree_sha256(clean)[:16]}"
                if extra_args:  # a run-time parameter cannot encrypt a build-time upload
                    extra_args = {k: v for k, v in extra_args.items() if not _is_pipeline_variable(v)}
                    if "SSEKMSKeyId" not in extra_args:
                        extra_args.pop("ServerSideEncryption", None)
                if self.offline_dir is None:
                    return super().upload_data(str(clean), bucket=bucket, key_prefix=key_prefix,
                                               callback=callback, extra_args=extra_args or None)
                bucket = bucket or self.default_bucket()
                target = self.offline_dir / bucket / key_prefix
                if clean.is_dir():
                    _clean_copy(clean, target)
                    return f"s3://{bucket}/{key_prefix}"
                _clean_copy(clean, target / clean.name)
                return f"s3://{bucket}/{key_prefix}/{clean.name}"

        def upload_string_as_file_body(self, body, bucket, key, kms_key=None):
            if _is_pipeline_variable(kms_key):
                kms_key = None  # see upload_data
            if self.offline_dir is None:
                return super().upload_string_as_file_body(body, bucket, key, kms_key=kms_key)
            target = self.offline_dir / bucket / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body if isinstance(body, bytes) else body.encode())
            return f"s3://{bucket}/{key}"

    _SESSION_CLASS = StagingSession
    return StagingSession


def _refuse_aws_call(event_name=None, **_):
    operation = (event_name or "").split(".", 1)[-1]
    raise OfflineError(
        f"the SageMaker SDK tried to call AWS ({operation}) while building the definition "
        "offline; this build needs AWS access: run `invmon upsert` with credentials and a region")


def sdk_import_region(region: str) -> None:
    """Importing sagemaker.mlops/serve builds boto3 clients from the default region at import
    time (NoRegionError without one), and botocore reads AWS_DEFAULT_REGION, not AWS_REGION:
    give the process `region` unless it has a default region already."""
    os.environ.setdefault("AWS_DEFAULT_REGION", region)


def make_session(region: str, bucket: str | None, pipeline_name: str,
                 offline_dir: str | os.PathLike | None = None, boto_session=None):
    """A StagingSession for `region`. Offline (offline_dir given) it never calls AWS.

    boto3 reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SAGEMAKER / AWS_ENDPOINT_URL_S3 itself, and
    every client the SDK makes comes from this boto session, so a local endpoint (moto's server)
    serves all of them.
    """
    import boto3

    if boto_session is None:
        boto_session = boto3.Session(region_name=region)
    if offline_dir is not None:
        if not bucket:
            raise DefinitionError("an offline build needs a bucket name for the S3 URIs it writes")
        # before-call runs ahead of signing and sending: no credentials, no network.
        boto_session.events.register("before-call", _refuse_aws_call)
    cls = _staging_session_class()
    return cls(boto_session=boto_session, default_bucket=bucket,
               code_prefix=f"{pipeline_name}/code", offline_dir=offline_dir)


OFFLINE_ENVIRONMENT = {
    # The SDK simulates IAM policies for the role unless told not to: an AWS call.
    "SAGEMAKER_VALIDATE_ROLE": "false",
    # Without credentials botocore asks the EC2 metadata service for some, per client.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def telemetry_disabled():
    """No SDK telemetry for the block: it is an HTTP request to AWS (a background thread, and a
    synchronous one in sagemaker.serve). The SDK's own switch, TelemetryOptOut in its config
    file, makes every config lookup re-validate the whole config schema (~0.3 s each, 70+ per
    build), so the senders are replaced by no-ops here instead."""
    import sagemaker.core.telemetry.telemetry_logging as core_telemetry
    import sagemaker.serve.utils.telemetry_logger as serve_telemetry

    saved = (core_telemetry._send_telemetry_request, serve_telemetry._send_telemetry)
    core_telemetry._send_telemetry_request = lambda *a, **k: None
    serve_telemetry._send_telemetry = lambda *a, **k: None
    try:
        yield
    finally:
        core_telemetry._send_telemetry_request, serve_telemetry._send_telemetry = saved


@contextlib.contextmanager
def offline_environment(offline: bool = True):
    """Environment for an offline build (restored afterwards); a no-op when not offline."""
    if not offline:
        yield
        return
    old = {name: os.environ.get(name) for name in OFFLINE_ENVIRONMENT}
    os.environ.update(OFFLINE_ENVIRONMENT)
    try:
        with telemetry_disabled():
            yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------- parameters


def parameter_values(profile: str = "full", overrides: dict | None = None) -> dict:
    """The profile's defaults with `overrides` (already typed, see parse_assignments) applied."""
    try:
        return validate({**profiles.defaults(profile), **(overrides or {})})
    except ParameterError as exc:
        raise DefinitionError(str(exc)) from None


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def fixed_parameters(definition: dict) -> dict[str, str]:
    """Parameters an execution of `definition` cannot override, with the reason.

    Read from a built definition (e.g. describe_pipeline's), so `invmon start` can refuse an
    override the running pipeline would silently ignore.
    """
    defaults = {p["Name"]: p.get("DefaultValue") for p in definition.get("Parameters", [])}
    fixed = {}
    for name in VPC_PARAMETERS:
        fixed[name] = (f"{name} is fixed when the pipeline is upserted (a pipeline cannot turn a "
                       f"string into a subnet/security-group list at run time); "
                       f"re-run `invmon upsert --param {name}=...`")
    fixed[DEBUGGER_PARAMETER] = (f"{DEBUGGER_PARAMETER} is fixed when the pipeline is upserted (it decides the "
                                 f"Train job's image, requirements and Debugger fields, which a pipeline "
                                 f"cannot change at run time); re-run `invmon upsert --param "
                                 f"{DEBUGGER_PARAMETER}=...`")
    for name in (KMS_PARAMETER, *_optional_input_parameters(declared.DAG)):
        if defaults.get(name) in ("", None):
            fixed[name] = (f"{name} was empty when the pipeline was upserted, so the definition "
                           f"has no field for it; re-run `invmon upsert --param {name}=...`")
    return fixed


def _optional_input_parameters(dag: base.Dag) -> list[str]:
    names = []
    for step in dag.steps:
        if isinstance(step, base.ProcessingStep):
            names += [i.source.name for i in step.inputs
                      if i.optional and isinstance(i.source, base.Param)]
    return names


def _pipeline_parameter_objects(values: dict) -> dict:
    from sagemaker.core.workflow.parameters import (ParameterFloat, ParameterInteger,
                                                    ParameterString)

    made = {}
    for p in PARAMETERS:
        value = values[p.name]
        if p.type is int:
            made[p.name] = ParameterInteger(name=p.name, default_value=int(value))
        elif p.type is float:
            made[p.name] = ParameterFloat(name=p.name, default_value=float(value))
        else:
            made[p.name] = ParameterString(name=p.name, default_value=str(value),
                                           enum_values=list(p.choices) or None)
    return made


# --------------------------------------------------------------------------- the builder


def _job_prefix(pipeline_name: str, step_name: str, limit: int) -> str:
    """`<pipeline>-<step>` trimmed to `limit`: SageMaker appends its own unique suffix."""
    import re

    name = re.sub(r"[^a-zA-Z0-9-]", "-", f"{pipeline_name}-{step_name}").strip("-")
    return name[:limit].rstrip("-")


@dataclass
class _Build:
    dag: base.Dag
    pipeline_name: str
    region: str
    role: str
    bucket: str
    session: object
    values: dict
    params: dict
    workdir: Path
    sm_steps: dict = field(default_factory=dict)  # declaration name -> SDK step
    property_files: dict = field(default_factory=dict)  # (step, name) -> PropertyFile
    staged: dict = field(default_factory=dict)  # Code -> S3 URI of its sourcedir.tar.gz

    # ---- shared settings

    @property
    def kms(self):
        return self.params[KMS_PARAMETER] if self.values[KMS_PARAMETER] else None

    def vpc(self) -> tuple[list[str], list[str]] | None:
        subnets, groups = (_split_list(self.values[n]) for n in VPC_PARAMETERS)
        if bool(subnets) != bool(groups):
            raise DefinitionError("SubnetIds and SecurityGroupIds go together: set both or neither")
        return (subnets, groups) if subnets else None

    def retry_policies(self, kind: str) -> list:
        from sagemaker.mlops.workflow.retry import (SageMakerJobExceptionTypeEnum,
                                                    SageMakerJobStepRetryPolicy,
                                                    StepExceptionTypeEnum, StepRetryPolicy)

        # Throttling and service faults: every step that calls an API can retry them.
        policies = [StepRetryPolicy(
            exception_types=[StepExceptionTypeEnum.THROTTLING, StepExceptionTypeEnum.SERVICE_FAULT],
            interval_seconds=10, backoff_rate=2.0, max_attempts=5)]
        if kind == "job":
            # No capacity for the instance type (spot included), or an account limit hit
            # while creating the job: wait and try again rather than fail the execution.
            policies.append(SageMakerJobStepRetryPolicy(
                exception_types=[SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT],
                failure_reason_types=[SageMakerJobExceptionTypeEnum.CAPACITY_ERROR,
                                      SageMakerJobExceptionTypeEnum.INTERNAL_ERROR],
                interval_seconds=60, backoff_rate=2.0, max_attempts=5))
        return policies

    def container(self, code: base.Code, *, debugger: bool = False) -> images.Container:
        """The step container (image + requirements file) that runs `code` (steps/images.py)."""
        try:
            container = images.container_for(code.source_dir, debugger=debugger)
        except KeyError as exc:
            raise DefinitionError(exc.args[0]) from None
        if container.requirements.parent != code.path:
            raise DefinitionError(f"{container.requirements} is not in scripts/{code.source_dir}, "
                                  "so the job would not have it")
        return container

    def requirements(self, container: images.Container) -> str | None:
        """The requirements file name inside the staged source dir, for the SDK (None: none)."""
        return container.requirements_name if container.requirements.is_file() else None

    def image(self, container: images.Container) -> str:
        return image_uri(container, self.region, self.values[container.instance_type])

    def execution_uri(self, *parts):
        """s3://BUCKET/PIPELINE/<execution id>/<parts...>: one place per execution."""
        from sagemaker.core.workflow.execution_variables import ExecutionVariables
        from sagemaker.core.workflow.functions import Join

        return Join(on="/", values=["s3:/", self.bucket, self.pipeline_name,
                                    ExecutionVariables.PIPELINE_EXECUTION_ID, *parts])

    def stage_code(self, code: base.Code) -> str:
        """Upload (or stage offline) the step's sourcedir.tar.gz; returns its S3 URI."""
        if code in self.staged:  # Tune's trials and Train run the same code
            return self.staged[code]
        if not (code.path / code.entry_point).is_file():
            raise DefinitionError(f"{code.path / code.entry_point} does not exist (entry point of "
                                  f"scripts/{code.source_dir})")
        tmp = Path(tempfile.mkdtemp(prefix=f"{code.source_dir}-", dir=self.workdir))
        tarball = build_source_tarball(code, tmp)
        key_prefix = f"{self.pipeline_name}/code/{code.source_dir}-{tree_sha256(tarball)[:16]}"
        self.staged[code] = self.session.upload_data(str(tarball), bucket=self.bucket,
                                                     key_prefix=key_prefix)
        return self.staged[code]

    # ---- values

    def sdk(self, expr):
        """A compiled value (placeholders of pipeline/dag/compile.py) as the SDK's object."""
        from sagemaker.core.workflow.execution_variables import ExecutionVariables
        from sagemaker.core.workflow.functions import Join, JsonGet

        if isinstance(expr, dict) and "Get" in expr:
            ref = expr["Get"]
            if ref.startswith("Parameters."):
                return self.params[ref.split(".", 1)[1]]
            if ref == "Execution.PipelineExecutionId":
                return ExecutionVariables.PIPELINE_EXECUTION_ID
            if ref == "Execution.PipelineExecutionArn":
                return ExecutionVariables.PIPELINE_EXECUTION_ARN
            step, path = parse_step_ref(ref)
            return _property(self.sm_steps[step].properties, path)
        if isinstance(expr, dict) and "Std:Join" in expr:
            spec = expr["Std:Join"]
            return Join(on=spec["On"], values=[self.sdk(v) for v in spec["Values"]])
        if isinstance(expr, dict) and "Std:JsonGet" in expr:
            spec = expr["Std:JsonGet"]
            step, _, name = spec["PropertyFile"]["Get"].split(".")[1:4]
            return JsonGet(step_name=step, property_file=self.property_files[(step, name)], json_path=spec["Path"])
        if isinstance(expr, dict):
            return {k: self.sdk(v) for k, v in expr.items()}
        if isinstance(expr, list):
            return [self.sdk(v) for v in expr]
        return expr

    def build_time(self, expr):
        """A compiled value with this build's parameter values (fields the SDK takes as literals)."""
        def no_step(ref):
            raise DefinitionError(f"{ref} is known only at run time")

        return Resolver(self.values, no_step)(expr)

    def cache(self, request: StepRequest):
        from sagemaker.mlops.workflow.steps import CacheConfig

        return CacheConfig(enable_caching=True, expire_after=CACHE_EXPIRY) if request.cache else None

    # ---- step translations

    def processing(self, request: StepRequest):
        from sagemaker.core.network import NetworkConfig
        from sagemaker.core.processing import FrameworkProcessor
        from sagemaker.core.shapes import (ProcessingInput, ProcessingOutput, ProcessingS3Input,
                                           ProcessingS3Output)
        from sagemaker.core.workflow.properties import PropertyFile
        from sagemaker.mlops.workflow.steps import ProcessingStep

        decl, args = request.declaration, request.arguments
        vpc = self.vpc()
        prefix = _job_prefix(self.pipeline_name, decl.name, 40)
        container = self.container(decl.code)
        processor = FrameworkProcessor(
            image_uri=self.image(container),
            role=self.role,
            instance_type=self.params["ProcessingInstanceType"],
            # A smoke test runs once: N instances would each call the endpoint and record a verdict.
            instance_count=1 if request.invokes_endpoint else self.params["ProcessingInstanceCount"],
            volume_size_in_gb=PROCESSING_VOLUME_GB,
            volume_kms_key=self.kms,
            output_kms_key=self.kms,
            max_runtime_in_seconds=args["StoppingCondition"]["MaxRuntimeInSeconds"],
            base_job_name=prefix,
            code_location=f"s3://{self.bucket}",  # helper scripts: <bucket>/<job prefix>/source/
            sagemaker_session=self.session,
            network_config=NetworkConfig(subnets=vpc[0], security_group_ids=vpc[1]) if vpc else None,
            # A step that reads the model registry (or invokes an endpoint) calls it with boto3,
            # which needs a region: SageMaker does not promise one in a processing container.
            env={"AWS_DEFAULT_REGION": self.region} if request.reads_registry or request.invokes_endpoint else None,
            tags=self.sdk(args.get("Tags")),
        )
        for item in request.read_by_script:  # read from S3 by the script itself, never mounted
            uri = str(self.build_time(item["Source"]))
            if not uri.startswith("s3://"):
                raise DefinitionError(f"{item['Source']['Get'].split('.', 1)[1]} must be an s3:// URI on "
                                      f"SageMaker, got {uri!r} (a local folder runs with `invmon run --data`)")
        inputs = [ProcessingInput(input_name=i["InputName"], s3_input=ProcessingS3Input(
            s3_uri=self.sdk(i["S3Input"]["S3Uri"]), local_path=i["S3Input"]["LocalPath"],
            s3_data_type="S3Prefix", s3_input_mode="File")) for i in args["ProcessingInputs"]]
        outputs = [ProcessingOutput(output_name=o["OutputName"], s3_output=ProcessingS3Output(
            s3_uri=self.execution_uri(decl.name, o["OutputName"]), local_path=o["S3Output"]["LocalPath"],
            s3_upload_mode="EndOfJob")) for o in args["ProcessingOutputConfig"]["Outputs"]]
        arguments = self.sdk(args["AppSpecification"]["ContainerArguments"])
        source = self.stage_code(decl.code)
        step_args = processor.run(
            code=decl.code.entry_point, source_dir=source,
            requirements=self.requirements(container),
            inputs=inputs, outputs=outputs, arguments=arguments,
            # A fixed job name keeps the helper-script URIs stable (the SDK derives them from
            # it); the service still gives every job a unique name from this prefix.
            job_name=prefix,
        )
        files = [PropertyFile(name=p["PropertyFileName"], output_name=p["OutputName"], path=p["FilePath"])
                 for p in request.property_files]
        for f in files:
            self.property_files[(decl.name, f.name)] = f
        return ProcessingStep(name=decl.name, step_args=step_args, description=decl.description or None,
                              property_files=files or None, cache_config=self.cache(request),
                              retry_policies=self.retry_policies("job"))

    def trainer(self, decl: base.TrainingStep, job: dict, *, step_name: str, trial: bool,
                hyperparameters: dict, debugger: bool = False):
        """A ModelTrainer for `decl`, run as pipeline step `step_name` (Tune for the trials), from
        its compiled job (`job`: AlgorithmSpecification, StoppingCondition); with `debugger`, in
        the container that carries smdebug (steps/images.py, train-debugger)."""
        from sagemaker.core.training.configs import (CheckpointConfig, Compute, MetricDefinition,
                                                     Networking, OutputDataConfig, SourceCode,
                                                     StoppingCondition)
        from sagemaker.core.shapes import Tag
        from sagemaker.train import ModelTrainer

        vpc = self.vpc()
        spot = decl.checkpoints and not trial  # only a job that resumes from checkpoints
        container = self.container(decl.code, debugger=debugger)
        trainer = ModelTrainer(
            training_image=self.image(container),
            role=self.role,
            sagemaker_session=self.session,
            base_job_name=_job_prefix(self.pipeline_name, step_name, 40),
            source_code=SourceCode(
                source_dir=self.stage_code(decl.code), entry_script=decl.code.entry_point,
                requirements=self.requirements(container)),
            compute=Compute(
                instance_type=self.params["TrainingInstanceType"],
                instance_count=self.params["TrainingInstanceCount"],
                volume_size_in_gb=TRAINING_VOLUME_GB,
                # No VolumeKmsKeyId: GPU instances (g4dn, g5, p3dn...) have local NVMe storage,
                # which the API refuses a volume key for (it is hardware-encrypted).
                enable_managed_spot_training=spot or None),
            stopping_condition=StoppingCondition(
                max_runtime_in_seconds=job["StoppingCondition"]["MaxRuntimeInSeconds"],
                max_wait_time_in_seconds=SPOT_WAIT_FACTOR * decl.max_runtime_s if spot else None),
            output_data_config=OutputDataConfig(
                s3_output_path=self.execution_uri(step_name),
                kms_key_id=self.kms, compression_type="GZIP"),
            checkpoint_config=CheckpointConfig(
                s3_uri=self.execution_uri(step_name, "checkpoints"),
                local_path=job["CheckpointConfig"]["LocalPath"]) if "CheckpointConfig" in job else None,
            networking=Networking(subnets=vpc[0], security_group_ids=vpc[1]) if vpc else None,
            hyperparameters=hyperparameters,
            # The Train job's tags (a tuning job tags its trials itself).
            tags=[Tag(key=t["Key"], value=self.sdk(t["Value"])) for t in job["Tags"]] if job.get("Tags") else None,
        )
        trainer = trainer.with_metric_definitions(
            [MetricDefinition(name=m["Name"], regex=m["Regex"]) for m in job["AlgorithmSpecification"]["MetricDefinitions"]])
        return trainer

    def channels(self, job: dict) -> list:
        from sagemaker.core.training.configs import InputData

        return [InputData(channel_name=c["ChannelName"], data_source=self.sdk(c["DataSource"]["S3DataSource"]["S3Uri"]))
                for c in job["InputDataConfig"]]

    def training(self, request: StepRequest):
        decl, job = request.declaration, request.arguments
        debugger = "DebugHookConfig" in job  # EnableDebugger=true when built (compile stage)
        trainer = self.trainer(decl, job, step_name=decl.name, trial=False, debugger=debugger,
                               hyperparameters=self.sdk(job["HyperParameters"]))
        step_args = trainer.train(input_data_config=self.channels(job))
        return _prefixed_step_classes()[0](
            name=decl.name, step_args=step_args, description=decl.description or None,
            retry_policies=self.retry_policies("job"),
            job_prefix=_job_prefix(self.pipeline_name, decl.name, 40),
            extra=self.debugger(decl.name, job) if debugger else None)

    def debugger(self, step_name: str, job: dict) -> dict:
        """The compiled DebugHookConfig and built-in rules (EnableDebugger=true only) with where
        they run: ModelTrainer (SDK v3) has no debugger settings, so they are added to the step's
        CreateTrainingJob request."""
        from sagemaker.core import image_uris

        evaluator = image_uris.retrieve("debugger", region=self.region)
        return {
            "DebugHookConfig": {"S3OutputPath": self.execution_uri(step_name, "debugger").expr,
                                "LocalPath": "/opt/ml/output/tensors", **job["DebugHookConfig"]},
            "DebugRuleConfigurations": [
                {"RuleConfigurationName": rule["RuleConfigurationName"], "RuleEvaluatorImage": evaluator,
                 "InstanceType": "ml.t3.medium", "VolumeSizeInGB": 0, "RuleParameters": rule["RuleParameters"]}
                for rule in job["DebugRuleConfigurations"]],
        }

    def tuning(self, request: StepRequest):
        from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter
        from sagemaker.train.tuner import HyperparameterTuner

        decl, args = request.declaration, request.arguments
        config, job = args["HyperParameterTuningJobConfig"], args["TrainingJobDefinition"]
        trainer = self.trainer(decl.training, job, step_name=decl.name, trial=True,
                               hyperparameters=self.sdk(job["StaticHyperParameters"]))
        ranges, bounds = {}, {}
        for r in config["ParameterRanges"]["ContinuousParameterRanges"]:
            # Built with the build-time values (the SDK's request shape takes strings only);
            # PrefixedTuningStep puts the parameters back, as it does for the limits.
            ranges[r["Name"]] = ContinuousParameter(float(self.build_time(r["MinValue"])),
                                                    float(self.build_time(r["MaxValue"])),
                                                    scaling_type=r["ScalingType"])
            bounds[r["Name"]] = {"MinValue": self.sdk(r["MinValue"]), "MaxValue": self.sdk(r["MaxValue"])}
        for r in config["ParameterRanges"]["CategoricalParameterRanges"]:
            ranges[r["Name"]] = CategoricalParameter(list(r["Values"]))
        limits = config["ResourceLimits"]
        tuner = HyperparameterTuner(
            model_trainer=trainer,
            objective_metric_name=config["HyperParameterTuningJobObjective"]["MetricName"],
            objective_type=config["HyperParameterTuningJobObjective"]["Type"],
            hyperparameter_ranges=ranges,
            metric_definitions=job["AlgorithmSpecification"]["MetricDefinitions"],
            strategy=config["Strategy"],
            early_stopping_type=config["TrainingJobEarlyStoppingType"],
            # SDK 3.27's ResourceLimits shape takes ints only: build with the build-time values,
            # then PrefixedTuningStep puts the parameters back in the request.
            max_jobs=int(self.build_time(limits["MaxNumberOfTrainingJobs"])),
            max_parallel_jobs=int(self.build_time(limits["MaxParallelTrainingJobs"])),
            base_tuning_job_name=_job_prefix(self.pipeline_name, decl.name, 19),
            tags=self.sdk(args.get("Tags")),
        )
        step_args = tuner.tune(inputs=self.channels(job))
        return _prefixed_step_classes()[1](
            name=decl.name, step_args=step_args, description=decl.description or None,
            cache_config=self.cache(request), retry_policies=self.retry_policies("job"),
            job_prefix=_job_prefix(self.pipeline_name, decl.name, 19),
            resource_limits=self.sdk(limits), bounds=bounds)

    def model_builder(self, model_uri, environment: dict):
        from sagemaker.core.training.configs import Networking
        from sagemaker.serve.model_builder import ModelBuilder

        return ModelBuilder(
            image_uri=self.image(self.container(self.dag_register_code())),
            s3_model_data_url=model_uri,
            role_arn=self.role,
            sagemaker_session=self.session,
            log_level=None,  # its default resets the SDK's shared logger to DEBUG
            # The artifact is self-contained (nothing to pip-install at start): no network needed.
            network=Networking(enable_network_isolation=True),
            # model.tar.gz carries code/inference.py (DESIGN: self-contained artifact): the
            # serving container runs it from the model directory, nothing is repacked.
            env_vars={**environment, "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "SAGEMAKER_REGION": self.region},
        )

    def dag_register_code(self) -> base.Code:
        for step in self.dag.steps:
            if isinstance(step, base.RegisterStep):
                return step.code
        return base.Code("inference", "inference.py")

    def register(self, request: StepRequest):
        from sagemaker.core.metadata_properties import MetadataProperties
        from sagemaker.core.model_metrics import MetricsSource, ModelMetrics
        from sagemaker.mlops.workflow.model_step import ModelStep

        decl, args = request.declaration, request.arguments
        (container,) = args["InferenceSpecification"]["Containers"]
        statistics = args["ModelMetrics"]["ModelQuality"]["Statistics"]
        builder = self.model_builder(self.sdk(container["ModelDataUrl"]), container["Environment"])
        step_args = builder.register(
            model_package_group_name=self.sdk(args["ModelPackageGroupName"]),
            approval_status=args["ModelApprovalStatus"],  # never a parameter: only a reviewer approves
            content_types=args["InferenceSpecification"]["SupportedContentTypes"],
            response_types=args["InferenceSpecification"]["SupportedResponseMIMETypes"],
            inference_instances=[self.params["InferenceInstanceType"]],
            transform_instances=[self.params["InferenceInstanceType"]],
            model_metrics=ModelMetrics(model_statistics=MetricsSource(
                content_type=statistics["ContentType"], s3_uri=self.sdk(statistics["S3Uri"]))),
            # The evaluation report and the artifact's SHA-256 (every deploy checks it): key/values
            # of the package, where `invmon models show` and Studio show them.
            customer_metadata_properties=self.sdk(args.get("CustomerMetadataProperties")) or None,
            # Lineage: the code's commit, the execution, the data selection (pipeline/lineage.py).
            metadata_properties=MetadataProperties(
                commit_id=self.sdk(args["MetadataProperties"]["CommitId"]),
                generated_by=self.sdk(args["MetadataProperties"]["GeneratedBy"])) if "MetadataProperties" in args else None,
            description=self.sdk(args.get("ModelPackageDescription")),
        )
        return ModelStep(name=decl.name, step_args=step_args, description=decl.description or None,
                         retry_policies=self.retry_policies("api"))

    def deploy(self, request: StepRequest) -> list:
        from sagemaker.core.workflow.execution_variables import ExecutionVariables
        from sagemaker.core.workflow.functions import Join
        from sagemaker.mlops.workflow.endpoint_step import EndpointConfigStep, EndpointStep
        from sagemaker.mlops.workflow.model_step import ModelStep

        from pipeline.registry.capture import capture_uri_parts

        decl, args = request.declaration, request.arguments
        container = args["Model"]["PrimaryContainer"]
        # Serve what was registered: the model data comes from the Register step's package
        # (same image and environment), which also orders Deploy after Register.
        builder = self.model_builder(self.sdk(container["ModelDataUrl"]), container["Environment"])
        model_step = ModelStep(name=f"{decl.name}-Model",
                               step_args=builder.build(
                                   model_name=_job_prefix(self.pipeline_name, decl.name, 40),
                                   tags=self.sdk(args["Model"].get("Tags"))),
                               retry_policies=self.retry_policies("api"))
        endpoint_name = self.sdk(args["EndpointName"])
        (variant,) = args["EndpointConfig"]["ProductionVariants"]
        capture = args["EndpointConfig"].get("DataCaptureConfig")
        if capture:  # written where the deploy code's endpoints write theirs, and the monitor reads
            capture = {**capture, "DestinationS3Uri": Join(on="/", values=capture_uri_parts(self.bucket, endpoint_name))}
        config_args = self.session.create_endpoint_config(
            # A new config per execution: the endpoint switches over to it.
            name=Join(on="-", values=[endpoint_name, ExecutionVariables.PIPELINE_EXECUTION_ID]),
            production_variants=[{**variant, "ModelName": model_step.properties.ModelName,
                                  "InstanceType": self.sdk(variant["InstanceType"])}],
            kms_key=self.kms,
            data_capture_config_dict=capture or None,
            tags=self.sdk(args["EndpointConfig"].get("Tags")),
        )
        config_step = EndpointConfigStep(name=f"{decl.name}-EndpointConfig", step_args=config_args,
                                         retry_policies=self.retry_policies("api"))
        endpoint_args = self.session.create_endpoint(
            endpoint_name=endpoint_name, config_name=config_step.properties.EndpointConfigName,
            tags=self.sdk(args.get("Tags")))
        endpoint_step = EndpointStep(name=decl.name, step_args=endpoint_args,
                                     description=decl.description or None)
        return [model_step, config_step, endpoint_step]

    def fail(self, request: StepRequest):
        from sagemaker.mlops.workflow.fail_step import FailStep

        return FailStep(name=request.name, error_message=self.sdk(request.arguments["ErrorMessage"]),
                        description=request.description or None)

    def condition(self, request: StepRequest, branches: dict):
        from sagemaker.core.workflow.conditions import ConditionGreaterThanOrEqualTo
        from sagemaker.mlops.workflow.condition_step import ConditionStep

        (condition,) = request.arguments["Conditions"]
        if condition["Type"] != "GreaterThanOrEqualTo":
            raise DefinitionError(f"{request.name}: no SageMaker translation for condition {condition['Type']}")
        return ConditionStep(
            name=request.name, description=request.description or None,
            conditions=[ConditionGreaterThanOrEqualTo(left=self.sdk(condition["LeftValue"]),
                                                      right=self.sdk(condition["RightValue"]))],
            if_steps=[s for name in request.arguments["IfSteps"] for s in branches[name]],
            else_steps=[s for name in request.arguments["ElseSteps"] for s in branches[name]],
        )


def _property(properties, path: str):
    """`ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri` read off an SDK step's properties."""
    value = properties
    for attribute, key, index in re.findall(r"(\w+)|\['([^']*)'\]|\[(\d+)\]", path):
        value = getattr(value, attribute) if attribute else value[key] if key else value[int(index)]
    return value


_STEP_CLASSES: dict = {}


def _prefixed_step_classes():
    """Training/Tuning steps that keep the job-name prefix in the definition.

    With use_custom_job_prefix the service names each job "<prefix>-<suffix>", but the v3
    ModelTrainer and HyperparameterTuner drop the name under a PipelineSession. The tuning
    step also gets its run-time resource limits back (see _Build.tuning).
    """
    if _STEP_CLASSES:
        return _STEP_CLASSES["Training"], _STEP_CLASSES["Tuning"]
    from sagemaker.mlops.workflow.steps import TrainingStep, TuningStep

    class PrefixedTrainingStep(TrainingStep):
        def __init__(self, *args, job_prefix: str, extra: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.job_prefix = job_prefix
            self.extra = extra or {}  # request fields ModelTrainer cannot set (Debugger)

        @property
        def arguments(self):
            request = super().arguments
            request.setdefault("TrainingJobName", self.job_prefix)
            request.update(self.extra)
            return request

    class PrefixedTuningStep(TuningStep):
        def __init__(self, *args, job_prefix: str, resource_limits: dict, bounds: dict, **kwargs):
            super().__init__(*args, **kwargs)
            self.job_prefix = job_prefix
            self.resource_limits = resource_limits
            self.bounds = bounds  # continuous range name -> its MinValue/MaxValue expressions

        @property
        def arguments(self):
            request = super().arguments
            request.setdefault("HyperParameterTuningJobName", self.job_prefix)
            config = request["HyperParameterTuningJobConfig"]
            config["ResourceLimits"].update(self.resource_limits)
            for r in config["ParameterRanges"].get("ContinuousParameterRanges", []):
                r.update(self.bounds.get(r["Name"], {}))
            return request

    _STEP_CLASSES.update(Training=PrefixedTrainingStep, Tuning=PrefixedTuningStep)
    return PrefixedTrainingStep, PrefixedTuningStep


def get_pipeline(
    region: str,
    role: str,
    default_bucket: str | None = None,
    pipeline_name: str = "bin-count",
    profile: str = "full",
    sagemaker_session=None,
    parameter_overrides: dict | None = None,
    offline_dir: str | os.PathLike | None = None,
    dag: base.Dag | None = None,
):
    """The bin-count pipeline, built from steps.DAG (or `dag`) with `profile`'s defaults.

    `sagemaker_session`: a PipelineSession to use as is (a StagingSession is made otherwise).
    `offline_dir`: build without AWS, staging code under this folder (see the module doc).
    """
    sdk_import_region(region)
    with offline_environment(offline_dir is not None):
        return _build_pipeline(region, role, default_bucket, pipeline_name, profile,
                               sagemaker_session, parameter_overrides, offline_dir,
                               lower(dag or declared.DAG))


def stage_local_files(values: dict, session, bucket: str, pipeline_name: str) -> dict:
    """A ManifestUrl naming a local file (the shipped 10,441-image manifest by default) is
    uploaded content-addressed beside the code, and its S3 URI becomes the default."""
    manifest = str(values.get("ManifestUrl") or "")
    if manifest and not manifest.startswith("s3://"):
        path = Path(manifest).expanduser()
        if not path.is_file():
            raise DefinitionError(f"ManifestUrl {manifest} is neither an s3:// URI nor a local file")
        digest = file_sha256(path)[:16]
        values = {**values, "ManifestUrl": session.upload_data(
            str(path), bucket=bucket, key_prefix=f"{pipeline_name}/code/manifest-{digest}")}
    return values


def _build_pipeline(region, role, default_bucket, pipeline_name, profile, sagemaker_session,
                    parameter_overrides, offline_dir, dag):
    from sagemaker.core.workflow.pipeline_definition_config import PipelineDefinitionConfig
    from sagemaker.mlops.workflow.pipeline import Pipeline

    values = parameter_values(profile, parameter_overrides)
    bucket = default_bucket or (PLACEHOLDER_BUCKET if offline_dir is not None else None)
    if sagemaker_session is None:
        session = make_session(region, bucket, pipeline_name, offline_dir)
        # Online, the SDK's default_bucket() creates the bucket when it is missing.
        bucket = session.default_bucket()
    else:
        session = sagemaker_session
        bucket = bucket or session.default_bucket()
    workdir = Path(tempfile.mkdtemp(prefix="invmon-sagemaker-"))
    values = stage_local_files(values, session, bucket, pipeline_name)
    try:
        build = _Build(dag=dag, pipeline_name=pipeline_name, region=region, role=role,
                       bucket=bucket, session=session, values=values,
                       params=_pipeline_parameter_objects(values), workdir=workdir)
        steps = _translate(build, dag)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # staged code is uploaded by now
    pipeline = Pipeline(
        name=pipeline_name,
        parameters=list(build.params.values()),
        steps=steps,
        sagemaker_session=session,
        # Keeps the job names set above ("<pipeline>-<step>") as prefixes of the real ones.
        pipeline_definition_config=PipelineDefinitionConfig(use_custom_job_prefix=True),
    )
    pipeline._invmon_offline = offline_dir is not None
    return pipeline


def _translate(build: _Build, dag: base.Dag) -> list:
    """The SDK steps for the declarations, as the pipeline's top-level step list."""
    build.vpc()  # fail early on half a VPC config
    from pipeline.registry.stages import pipeline_endpoint_problem

    if problem := pipeline_endpoint_problem(build.values):  # executions deploy only to staging
        raise DefinitionError(problem)
    if len(str(build.values["StagingEndpointName"])) > MAX_ENDPOINT_NAME:
        raise DefinitionError(f"StagingEndpointName may have at most {MAX_ENDPOINT_NAME} characters "
                              "(the endpoint config is named <endpoint>-<execution id>)")

    try:
        requests = compile_dag(dag, build.values)
    except CompileError as exc:
        raise DefinitionError(str(exc)) from None
    translate = {"Processing": build.processing, "Tuning": build.tuning, "Training": build.training,
                 "RegisterModel": build.register, "Endpoint": build.deploy, "Fail": build.fail}
    branches: dict[str, list] = {}  # step name -> the SDK steps it became
    conditions = []
    for request in requests:
        if request.type == "Condition":
            conditions.append(request)  # built once its branch steps exist
            continue
        if request.type not in translate:
            raise DefinitionError(f"no SageMaker translation for {request.type} step {request.name}")
        made = translate[request.type](request)
        made = made if isinstance(made, list) else [made]
        build.sm_steps[request.name] = made[-1]
        branches[request.name] = made
    # Inner conditions first: a condition inside another's branch (CheckSmokeTest inside
    # CheckAccuracy's) is declared after it, and must exist when the outer one is built.
    for request in reversed(conditions):
        build.sm_steps[request.name] = build.condition(request, branches)
        branches[request.name] = [build.sm_steps[request.name]]
    # Steps inside a condition's branches must not also be listed at the top level.
    return [s for request in requests if request.gate is None for s in branches[request.name]]


def definition(pipeline) -> str:
    """pipeline.definition(), offline-safe when the pipeline was built offline."""
    with offline_environment(getattr(pipeline, "_invmon_offline", False)):
        return pipeline.definition()


def parallelism_config():
    from sagemaker.mlops.workflow.parallelism_config import ParallelismConfiguration

    return ParallelismConfiguration(max_parallel_execution_steps=MAX_PARALLEL_STEPS)
