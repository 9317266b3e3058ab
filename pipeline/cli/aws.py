"""AWS commands of `invmon`: definition, upsert, start, status, executions.

Nothing here imports the SageMaker SDK at module level: `invmon run` and friends must work
without it, and importing sagemaker.mlops needs a region (see sagemaker_pipeline.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.cli.errors import CommandError
from pipeline.dag.profiles import PROFILES

DEFAULT_PIPELINE = "bin-count"


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
    status.set_defaults(handler=cmd_status)

    executions = commands.add_parser("executions", help="recent executions of the pipeline")
    executions.add_argument("--max", type=int, default=20, help="how many (default: 20)")
    _aws_options(executions)
    executions.set_defaults(handler=cmd_executions)


def _aws_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    parser.add_argument("--pipeline-name", default=DEFAULT_PIPELINE, help="default: %(default)s")
    parser.add_argument("--verbose", action="store_true", help="show the SageMaker SDK's own logging")


def _build_options(parser: argparse.ArgumentParser) -> None:
    _aws_options(parser)
    parser.add_argument("--bucket", help="S3 bucket for code and artifacts "
                                         "(default: the SageMaker default bucket of the account)")
    parser.add_argument("--profile", default="full", choices=list(PROFILES),
                        help="parameter defaults baked into the definition (default: full; finetune: "
                             "the best recipe measured on real photos)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="set a parameter's default in the definition (repeatable); "
                             "KmsKeyId, ManifestUrl, SubnetIds, SecurityGroupIds are decided here")


def _aws_errors(handler):
    """botocore/SDK failures become one-line user errors (exit 2), never a traceback."""

    @functools.wraps(handler)
    def wrapped(args) -> int:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        from pipeline.sagemaker.clients import AwsError, describe_error
        from pipeline.sagemaker.preflight import PreflightError
        from pipeline.sagemaker.definition import DefinitionError, OfflineError

        warnings_filters(getattr(args, "verbose", False))
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


def _region(args) -> str:
    from pipeline.sagemaker.clients import resolve_region

    return resolve_region(args.region)


def _overrides(items: list[str]) -> dict:
    from pipeline.dag.parameters import parse_assignments

    try:
        return parse_assignments(items)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _build(args, region: str, role: str, bucket: str | None, offline_dir: Path | None):
    from pipeline.sagemaker import definition as sp

    overrides = _overrides(args.param)
    with sp.offline_environment(offline_dir is not None):
        for module in ("sagemaker.mlops.workflow.pipeline", "sagemaker.serve.model_builder"):
            importlib.import_module(module)  # creates the SDK's loggers, to quieten them
        quiet_sdk_loggers(getattr(args, "verbose", False))
        return sp.get_pipeline(region, role, default_bucket=bucket, pipeline_name=args.pipeline_name,
                               profile=args.profile, parameter_overrides=overrides,
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

    region = args.region
    if not region:
        from pipeline.sagemaker.clients import AwsError, resolve_region

        try:
            region = resolve_region(None)
        except AwsError:
            region = "us-east-1"
            print("invmon: no region given (--region, AWS_REGION): image URIs are for us-east-1",
                  file=sys.stderr)
    staging = args.staging_dir.resolve()
    with _sdk(region):
        pipeline = _build(args, region, args.role_arn or sp.PLACEHOLDER_ROLE, args.bucket, staging)
        text = json.dumps(json.loads(_checked_definition(pipeline)), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"definition written to {args.out}", file=sys.stderr)
    else:
        print(text)
    bucket = args.bucket or sp.PLACEHOLDER_BUCKET
    print(f"preflight passed; code staged offline under {staging / bucket} "
          f"(`invmon upsert` uploads the same files to s3://{bucket}/)", file=sys.stderr)
    if not args.role_arn or not args.bucket:
        print("note: role/bucket are placeholders; pass --role-arn/--bucket for the real values",
              file=sys.stderr)
    return 0


@_aws_errors
def cmd_upsert(args) -> int:
    import tempfile

    from pipeline.sagemaker import executions

    region = _region(args)
    if not args.role_arn.strip():
        raise CommandError("--role-arn is empty (in CodeBuild: set SAGEMAKER_ROLE_ARN on the project)")
    with _sdk(region):
        # Preflight first, on an offline build (the same definition, see tests): a definition
        # the API model rejects never uploads code or touches the pipeline.
        with tempfile.TemporaryDirectory(prefix="invmon-preflight-") as tmp:
            _checked_definition(_build(args, region, args.role_arn,
                                       args.bucket or "preflight-bucket", Path(tmp)))
        pipeline = _build(args, region, args.role_arn, args.bucket, None)
        result = executions.upsert(pipeline, args.role_arn, description=args.description)
    verb = "created" if result["created"] else "updated"
    print(f"pipeline {pipeline.name} {verb}: {result['PipelineArn']}")
    print(f"start it: invmon start --region {region}" +
          (f" --pipeline-name {pipeline.name}" if pipeline.name != DEFAULT_PIPELINE else ""))
    return 0


def _quiet_boto(verbose: bool) -> None:
    if not verbose:
        logging.getLogger("botocore").setLevel(logging.WARNING)


@_aws_errors
def cmd_start(args) -> int:
    from pipeline.sagemaker import clients, executions

    region = _region(args)
    sm = clients.client("sagemaker", region)
    arn = executions.start(sm, args.pipeline_name, _overrides(args.param), commit_id=args.commit_id,
                    display_name=args.display_name)
    print(f"started {arn}")
    if not args.wait:
        print(f"follow it: invmon status {arn}")
        return 0
    outcome = executions.follow(sm, arn, poll_seconds=args.poll_seconds,
                         out=lambda line: print(line, flush=True))
    if outcome.ok:
        print(f"execution succeeded: {arn}")
        return 0
    where = f"step {outcome.failed_step} " if outcome.failed_step else ""
    print(f"execution {outcome.status.lower()}: {where}{outcome.failure_reason or '(no reason given)'}",
          file=sys.stderr)
    return 1


@_aws_errors
def cmd_status(args) -> int:
    from pipeline.sagemaker import clients, executions

    sm = clients.client("sagemaker", _region(args))
    arn = args.execution_arn or executions.latest_execution(sm, args.pipeline_name)
    print(executions.status_report(sm, arn))
    return 0


@_aws_errors
def cmd_executions(args) -> int:
    from pipeline.sagemaker import clients, executions

    sm = clients.client("sagemaker", _region(args))
    print(executions.executions_report(sm, args.pipeline_name, args.max))
    return 0
