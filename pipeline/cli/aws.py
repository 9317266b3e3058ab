"""AWS commands of `invmon`: definition, upsert, start, status, executions.

Nothing here imports the SageMaker SDK at module level: `invmon run` and friends must work
without it, and importing sagemaker.mlops needs a region (see pipeline/sagemaker/definition.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

from pipeline.cli.conventions import add_json_option, add_recipe_option, checked_parameters, print_json
from pipeline.cli.errors import CommandError, UsageError
from pipeline.lineage import COMMIT_PARAMETER

DEFAULT_PIPELINE = "bin-count"
LOG = logging.getLogger("invmon.aws")


def add_commands(commands) -> None:
    definition = commands.add_parser(
        "definition", help="print the SageMaker pipeline definition (offline: no AWS account)")
    definition.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    _build_options(definition)
    definition.add_argument("--role-arn", help="execution role written into the definition "
                                               "(default: a placeholder)")
    definition.add_argument("--staging-dir", type=Path, default=Path("build/sagemaker-staging"),
                            help="where the code that upsert would upload is staged "
                                 "(default: %(default)s)")
    definition.set_defaults(handler=cmd_definition)

    upsert = commands.add_parser("upsert", help="create or update the pipeline on SageMaker")
    upsert.add_argument("--role-arn", required=True,
                        help="IAM role the pipeline and its jobs run as (see README: On AWS)")
    _build_options(upsert)
    upsert.add_argument("--description", default=None, help="pipeline description")
    upsert.set_defaults(handler=cmd_upsert)

    start = commands.add_parser("start", help="start a pipeline execution")
    start.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="override a pipeline parameter for this execution (repeatable)")
    start.add_argument("--commit-id", help="git commit this execution is for (display name + description)")
    start.add_argument("--display-name", help="execution display name (default: commit-<id> with --commit-id)")
    start.add_argument("--wait", action="store_true",
                       help="follow the execution step by step; exit 1 if it does not succeed")
    start.add_argument("--poll-seconds", type=float, default=30.0, help="with --wait (default: 30)")
    _aws_options(start)
    start.set_defaults(handler=cmd_start)

    status = commands.add_parser("status", help="one execution and its steps (default: the latest)")
    status.add_argument("execution_arn", nargs="?", metavar="EXECUTION_ARN")
    _aws_options(status)
    add_json_option(status, "the execution and its steps")
    status.set_defaults(handler=cmd_status)

    executions = commands.add_parser("executions", help="recent executions of the pipeline")
    executions.add_argument("--max", type=int, default=20, help="how many (default: 20)")
    _aws_options(executions)
    add_json_option(executions, "the executions")
    executions.set_defaults(handler=cmd_executions)


def _aws_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    parser.add_argument("--pipeline-name", default=DEFAULT_PIPELINE, help="default: %(default)s")


def _build_options(parser: argparse.ArgumentParser) -> None:
    _aws_options(parser)
    parser.add_argument("--bucket", help="S3 bucket for code and artifacts "
                                         "(default: the SageMaker default bucket of the account)")
    add_recipe_option(parser, "full", help="parameter defaults baked into the definition (default: full; "
                                           "finetune: the best recipe measured on real photos)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="set a parameter's default in the definition (repeatable); "
                             "KmsKeyId, ManifestUrl, SubnetIds, SecurityGroupIds are decided here")


def _aws_errors(handler):
    """botocore/SDK failures become one-line errors (exit 1), never a traceback."""

    @functools.wraps(handler)
    def wrapped(args) -> int:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        from pipeline.sagemaker.clients import AwsError, describe_error
        from pipeline.sagemaker.preflight import PreflightError
        from pipeline.sagemaker.definition import DefinitionError, OfflineError

        warnings_filters(args.verbose)
        try:
            return handler(args)
        except (AwsError, DefinitionError, OfflineError, PreflightError) as exc:
            raise CommandError(str(exc)) from None
        except ClientError as exc:
            raise CommandError(f"AWS refused the request: {describe_error(exc)}") from None
        except BotoCoreError as exc:
            raise CommandError(f"cannot reach AWS: {exc}") from None
        except Boto3Error as exc:  # e.g. S3UploadFailedError
            raise CommandError(f"AWS request failed: {exc}") from None
    return wrapped


def warnings_filters(verbose: bool) -> None:
    """The SDK warns on every PipelineSession call: keep stderr readable."""
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"sagemaker(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"sagemaker(\.|$)")


def quiet_sdk_loggers(verbose: bool) -> None:
    """The SDK sets DEBUG/INFO levels on its own loggers at import: lower them to WARNING.

    Call after the SDK is imported (its loggers exist only then).
    """
    if verbose:
        return
    # Importing the SDK may configure the root logger at INFO (botocore chatter on stderr).
    logging.getLogger().setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name == "sagemaker" or name.startswith("sagemaker."):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("sagemaker.mlops.workflow.model_step").setLevel(logging.ERROR)


@contextlib.contextmanager
def _sdk(region: str):
    """Ready the process for the SDK; INVMON_SDK_TELEMETRY=off turns its telemetry off."""
    from pipeline.sagemaker import definition as sp

    sp.sdk_import_region(region)
    off = os.environ.get("INVMON_SDK_TELEMETRY", "").lower() in ("0", "off", "false", "no")
    with sp.telemetry_disabled() if off else contextlib.nullcontext():
        yield


def region_of(explicit: str | None) -> str:
    """--region, else the environment's; with neither, the command line lacks an option (exit 2)."""
    from pipeline.sagemaker.clients import AwsError, resolve_region

    try:
        region = resolve_region(explicit)
    except AwsError as exc:
        raise UsageError(str(exc)) from None
    LOG.debug(f"AWS region {region}")
    return region


def _definition_overrides(args) -> dict:
    from pipeline.dag.profiles import defaults

    from pipeline import lineage

    overrides = checked_parameters(args.param, defaults(args.recipe))
    overrides.setdefault(COMMIT_PARAMETER, upserted_commit())
    if problem := lineage.description_problem({**defaults(args.recipe), **overrides}):
        raise UsageError(problem)
    return overrides


def upserted_commit() -> str:
    """The commit of the code `upsert` uploads, which every execution of the definition runs:
    CodeBuild's CODEBUILD_RESOLVED_SOURCE_VERSION when it is a commit id, else empty with a
    warning (`--param CommitId=...` sets it by hand). Not the tree's own: `invmon definition`
    shows offline exactly what upsert sends, whichever tree builds it."""
    from pipeline import lineage

    built = os.environ.get("CODEBUILD_RESOLVED_SOURCE_VERSION", "").strip().lower()
    if re.fullmatch(lineage.COMMIT_PATTERN, built):
        return built
    LOG.warning(f"no commit recorded with the pipeline's models (outside CodeBuild): pass "
                f"--param {COMMIT_PARAMETER}=$(git rev-parse HEAD) to record one")
    return ""


def _build(args, region: str, role: str, bucket: str | None, offline_dir: Path | None, overrides: dict):
    from pipeline.sagemaker import definition as sp

    with sp.offline_environment(offline_dir is not None):
        for module in ("sagemaker.mlops.workflow.pipeline", "sagemaker.serve.model_builder"):
            importlib.import_module(module)  # creates the SDK's loggers, to quieten them
        quiet_sdk_loggers(args.verbose)
        return sp.get_pipeline(region, role, default_bucket=bucket, pipeline_name=args.pipeline_name,
                               profile=args.recipe, parameter_overrides=overrides,
                               offline_dir=offline_dir)


def _checked_definition(pipeline) -> str:
    from pipeline.sagemaker import preflight
    from pipeline.sagemaker import definition as sp

    text = sp.definition(pipeline)
    preflight.preflight(text)
    return text


@_aws_errors
def cmd_definition(args) -> int:
    from pipeline.sagemaker import definition as sp

    overrides = _definition_overrides(args)
    region = args.region
    if not region:
        from pipeline.sagemaker.clients import AwsError, resolve_region

        try:
            region = resolve_region(None)
        except AwsError:  # offline, a region only picks the image URIs
            region = "us-east-1"
            LOG.warning("no region given (--region, AWS_REGION): image URIs are for us-east-1")
    staging = args.staging_dir.resolve()
    with _sdk(region):
        pipeline = _build(args, region, args.role_arn or sp.PLACEHOLDER_ROLE, args.bucket, staging, overrides)
        text = json.dumps(json.loads(_checked_definition(pipeline)), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        LOG.info(f"definition written to {args.out}")
    else:
        print(text)
    bucket = args.bucket or sp.PLACEHOLDER_BUCKET
    LOG.info(f"preflight passed; code staged offline under {staging / bucket} "
             f"(`invmon upsert` uploads the same files to s3://{bucket}/)")
    if not args.role_arn or not args.bucket:
        LOG.info("note: role/bucket are placeholders; pass --role-arn/--bucket for the real values")
    return 0


@_aws_errors
def cmd_upsert(args) -> int:
    import tempfile

    from pipeline.sagemaker import executions

    if not args.role_arn.strip():
        raise UsageError("--role-arn is empty (in CodeBuild: set SAGEMAKER_ROLE_ARN on the project)")
    overrides = _definition_overrides(args)
    region = region_of(args.region)
    with _sdk(region):
        # Preflight first, on an offline build (the same definition, see tests): a definition
        # the API model rejects never uploads code or touches the pipeline.
        with tempfile.TemporaryDirectory(prefix="invmon-preflight-") as tmp:
            _checked_definition(_build(args, region, args.role_arn,
                                       args.bucket or "preflight-bucket", Path(tmp), overrides))
        pipeline = _build(args, region, args.role_arn, args.bucket, None, overrides)
        result = executions.upsert(pipeline, args.role_arn, description=args.description)
    verb = "created" if result["created"] else "updated"
    print(f"pipeline {pipeline.name} {verb}: {result['PipelineArn']}")
    LOG.info(f"start it: invmon start --region {region}" +
             (f" --pipeline-name {pipeline.name}" if pipeline.name != DEFAULT_PIPELINE else ""))
    return 0


@_aws_errors
def cmd_start(args) -> int:
    from pipeline.sagemaker import clients, executions

    overrides = checked_parameters(args.param)  # the deployed definition holds the rest
    if COMMIT_PARAMETER in overrides:  # the code an execution runs is the code upsert uploaded
        raise UsageError(f"{COMMIT_PARAMETER} is the commit the pipeline's code was upserted from; "
                         "upsert from the commit you mean instead")
    sm = clients.client("sagemaker", region_of(args.region))
    _check_lineage(sm, args.pipeline_name, overrides, args.commit_id)
    arn = executions.start(sm, args.pipeline_name, overrides, commit_id=args.commit_id,
                           display_name=args.display_name)
    print(f"started {arn}")
    if not args.wait:
        LOG.info(f"follow it: invmon status {arn}")
        return 0
    outcome = executions.follow(sm, arn, poll_seconds=args.poll_seconds,
                                out=lambda line: print(line, flush=True))
    if not outcome.ok:
        where = f"step {outcome.failed_step} " if outcome.failed_step else ""
        raise CommandError(f"execution {outcome.status.lower()}: {where}"
                           f"{outcome.failure_reason or '(no reason given)'}")
    print(f"execution succeeded: {arn}")
    return 0


def _check_lineage(sm, pipeline_name: str, overrides: dict, commit_id: str | None) -> None:
    """Before an execution starts: its selection must fit the description Register records (a
    failure at the end of the run otherwise), and `--commit-id`, which only names the execution,
    is said to differ when it is not the commit the code was upserted from (what the models
    record)."""
    from pipeline import lineage
    from pipeline.sagemaker import executions

    declared = {p["Name"]: p.get("DefaultValue") for p in
                executions.deployed_definition(sm, pipeline_name).get("Parameters", [])}
    if problem := lineage.description_problem({**declared, **overrides}):
        raise UsageError(problem)
    upserted = str(declared.get(COMMIT_PARAMETER) or "")
    if commit_id and upserted and upserted.removesuffix("-dirty") != commit_id.strip().lower():
        LOG.warning(f"{pipeline_name} runs the code upserted from commit {upserted}; its models record "
                    f"that commit, not {commit_id} (upsert from {commit_id} first)")


@_aws_errors
def cmd_status(args) -> int:
    from pipeline.sagemaker import clients, executions

    sm = clients.client("sagemaker", region_of(args.region))
    arn = args.execution_arn or executions.latest_execution(sm, args.pipeline_name)
    if args.json:
        print_json(execution_record(sm, arn))
    else:
        print(executions.status_report(sm, arn))
    return 0


def execution_record(sm, arn: str) -> dict:
    """`status --json`: the execution and its steps, in the order they started (steps is null
    where the endpoint cannot list them)."""
    from botocore.exceptions import ClientError

    from pipeline.sagemaker.clients import describe_error
    from pipeline.sagemaker.executions import execution_steps

    found = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
    record = {"execution_arn": arn, "status": found.get("PipelineExecutionStatus"),
              "display_name": found.get("PipelineExecutionDisplayName"),
              "description": found.get("PipelineExecutionDescription"),
              "created": found.get("CreationTime"), "last_modified": found.get("LastModifiedTime"),
              "failure_reason": found.get("FailureReason"), "steps": None}
    try:
        steps = execution_steps(sm, arn)
    except ClientError as exc:
        LOG.warning(f"steps not available: {describe_error(exc)}")
        return record
    record["steps"] = [{"name": s.get("StepName"), "status": s.get("StepStatus"),
                        "start_time": s.get("StartTime"), "end_time": s.get("EndTime"),
                        "attempts": s.get("AttemptCount"), "failure_reason": s.get("FailureReason"),
                        "cached_from": (s.get("CacheHitResult") or {}).get("SourcePipelineExecutionArn")}
                       for s in steps]
    return record


@_aws_errors
def cmd_executions(args) -> int:
    from pipeline.sagemaker import clients, executions

    sm = clients.client("sagemaker", region_of(args.region))
    if not args.json:
        print(executions.executions_report(sm, args.pipeline_name, args.max))
        return 0
    if not executions.pipeline_exists(sm, args.pipeline_name):
        raise CommandError(f"no pipeline {args.pipeline_name!r} in this account and region")
    found = sm.list_pipeline_executions(PipelineName=args.pipeline_name, SortBy="CreationTime",
                                        SortOrder="Descending", MaxResults=args.max)
    print_json([{"execution_arn": s["PipelineExecutionArn"], "status": s.get("PipelineExecutionStatus"),
                 "display_name": s.get("PipelineExecutionDisplayName"), "start_time": s.get("StartTime")}
                for s in found.get("PipelineExecutionSummaries", [])])
    return 0
