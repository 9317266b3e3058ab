"""SageMaker pipeline executions: upsert, start, follow, status, and one call to an endpoint.

Plain boto3 here: only building and upserting the definition needs the SageMaker SDK
(pipeline/sagemaker/definition.py). Every function takes the client it uses, so tests can hand
in moto's or a scripted one.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from pipeline.dag.parameters import BY_NAME, ParameterError, validate
from pipeline.sagemaker.clients import AwsError, describe_error

TERMINAL = ("Succeeded", "Failed", "Stopped")


# --------------------------------------------------------------------------- pipelines


def _missing_pipeline(exc) -> bool:
    # ResourceNotFound on AWS; moto answers ValidationException "Could not find pipeline".
    message = describe_error(exc)
    return message.startswith("ResourceNotFound") or "Could not find pipeline" in message


def pipeline_exists(sm, pipeline_name: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        sm.describe_pipeline(PipelineName=pipeline_name)
        return True
    except ClientError as exc:
        if _missing_pipeline(exc):
            return False
        raise


def upsert(pipeline, role_arn: str, description: str | None = None) -> dict:
    """Create the pipeline or update it; returns {"PipelineArn", "created": bool}."""
    from pipeline.sagemaker.definition import parallelism_config

    existed = pipeline_exists(pipeline.sagemaker_session.sagemaker_client, pipeline.name)
    response = pipeline.upsert(role_arn=role_arn, description=description,
                               parallelism_config=parallelism_config())
    return {"PipelineArn": response["PipelineArn"], "created": not existed}


def deployed_definition(sm, pipeline_name: str) -> dict:
    from botocore.exceptions import ClientError

    try:
        described = sm.describe_pipeline(PipelineName=pipeline_name)
    except ClientError as exc:
        if not _missing_pipeline(exc):
            raise
        raise AwsError(f"no pipeline {pipeline_name!r} in this account and region: "
                       "create it first with `invmon upsert --role-arn ARN`") from None
    text = described.get("PipelineDefinition")
    return json.loads(text) if text else {}


def execution_display_name(commit_id: str) -> str:
    """A display name the API accepts ([a-zA-Z0-9](-*[a-zA-Z0-9]){0,81}) naming the commit."""
    clean = re.sub(r"[^a-zA-Z0-9]+", "-", commit_id).strip("-")[:12] or "unknown"
    return f"commit-{clean}"


def start(sm, pipeline_name: str, parameters: dict | None = None, commit_id: str | None = None,
          display_name: str | None = None) -> str:
    """Start an execution with `parameters` (typed, see parse_assignments); returns its ARN.

    The commit id goes into the execution's display name (commit-<first 12>) and, whole, into
    its description ("CommitId=<sha>"), where the console and list-executions show it.
    """
    from pipeline.registry.stages import pipeline_endpoint_problem
    from pipeline.sagemaker.definition import MAX_ENDPOINT_NAME, MAX_PARALLEL_STEPS, fixed_parameters

    parameters = parameters or {}
    try:  # names and ranges of what is set, before the account is asked anything
        validate(parameters)
    except ParameterError as exc:
        raise AwsError(str(exc)) from None
    definition = deployed_definition(sm, pipeline_name)
    declared = {p["Name"]: p for p in definition.get("Parameters", [])}
    fixed = fixed_parameters(definition)
    for name, value in parameters.items():
        if name not in declared:
            raise AwsError(f"pipeline {pipeline_name!r} has no parameter {name!r} (upsert it again "
                           f"to bring its definition up to date)")
        if name in fixed and str(value) != str(declared[name].get("DefaultValue", "")):
            raise AwsError(f"cannot override {name} at start: {fixed[name]}")
        if BY_NAME[name].type is str and value == "" and declared[name].get("DefaultValue") not in ("", None):
            raise AwsError(f"{name} cannot be empty at start (the definition passes it to an AWS API "
                           f"field that needs a value); to drop an optional setting, upsert with "
                           f"--param {name}=")
        if name == "StagingEndpointName" and len(str(value)) > MAX_ENDPOINT_NAME:
            raise AwsError(f"StagingEndpointName may have at most {MAX_ENDPOINT_NAME} characters "
                           f"(the endpoint config is named <endpoint>-<execution id>)")
    effective = {**{n: p.get("DefaultValue") for n, p in declared.items()}, **parameters}
    try:  # the ranges, before anything starts (the definition's defaults were checked at upsert)
        validate({n: BY_NAME[n].parse(str(v)) if n not in parameters else v
                  for n, v in effective.items() if n in BY_NAME})
    except ParameterError as exc:
        raise AwsError(str(exc)) from None
    problem = pipeline_endpoint_problem(effective)
    if problem:
        raise AwsError(problem)
    kwargs = {
        "PipelineName": pipeline_name,
        "PipelineParameters": [{"Name": k, "Value": str(v)} for k, v in parameters.items()],
        "ParallelismConfiguration": {"MaxParallelExecutionSteps": MAX_PARALLEL_STEPS},
    }
    if commit_id:
        kwargs["PipelineExecutionDisplayName"] = display_name or execution_display_name(commit_id)
        kwargs["PipelineExecutionDescription"] = f"CommitId={commit_id}"
    elif display_name:
        kwargs["PipelineExecutionDisplayName"] = display_name
    return sm.start_pipeline_execution(**kwargs)["PipelineExecutionArn"]


def latest_execution(sm, pipeline_name: str) -> str:
    if not pipeline_exists(sm, pipeline_name):
        raise AwsError(f"no pipeline {pipeline_name!r} in this account and region")
    found = sm.list_pipeline_executions(PipelineName=pipeline_name, SortBy="CreationTime",
                                        SortOrder="Descending", MaxResults=1)
    summaries = found.get("PipelineExecutionSummaries", [])
    if not summaries:
        raise AwsError(f"pipeline {pipeline_name!r} has no executions yet: `invmon start`")
    return summaries[0]["PipelineExecutionArn"]


def execution_steps(sm, execution_arn: str) -> list[dict]:
    """All steps of an execution, in the order they started."""
    steps, token = [], None
    while True:
        kwargs = {"PipelineExecutionArn": execution_arn, "SortOrder": "Ascending"}
        if token:
            kwargs["NextToken"] = token
        page = sm.list_pipeline_execution_steps(**kwargs)
        steps += page.get("PipelineExecutionSteps", [])
        token = page.get("NextToken")
        if not token:
            return steps


def _step_line(step: dict) -> str:
    status = step.get("StepStatus", "?")
    extra = ""
    cache = step.get("CacheHitResult") or {}
    if cache.get("SourcePipelineExecutionArn"):
        extra = f" (cache hit: {cache['SourcePipelineExecutionArn'].rsplit('/', 1)[-1]})"
    attempts = step.get("AttemptCount") or 0
    if attempts > 1:
        extra += f" (attempt {attempts})"
    if step.get("FailureReason"):
        extra += f": {step['FailureReason']}"
    return f"{step.get('StepName', '?'):<24} {status}{extra}"


@dataclass
class Outcome:
    status: str
    failure_reason: str = ""
    failed_step: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "Succeeded"


def follow(sm, execution_arn: str, poll_seconds: float = 30.0, out: Callable[[str], None] = print,
           sleep: Callable[[float], None] = time.sleep, timeout_s: float | None = None) -> Outcome:
    """Poll the execution, print each step's status changes, return how it ended."""
    seen: dict[str, tuple] = {}
    started = time.monotonic()
    while True:
        for step in execution_steps(sm, execution_arn):
            key = (step.get("StepStatus"), step.get("AttemptCount"), step.get("FailureReason"))
            if seen.get(step.get("StepName")) != key:
                seen[step.get("StepName")] = key
                out(f"{datetime.now().strftime('%H:%M:%S')}  {_step_line(step)}")
        execution = sm.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
        status = execution.get("PipelineExecutionStatus", "?")
        if status in TERMINAL:
            outcome = Outcome(status, execution.get("FailureReason", ""))
            if status != "Succeeded":
                failed = [s for s in execution_steps(sm, execution_arn) if s.get("StepStatus") == "Failed"]
                if failed:
                    outcome.failed_step = failed[-1].get("StepName", "")
                    outcome.failure_reason = failed[-1].get("FailureReason") or outcome.failure_reason
            return outcome
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise AwsError(f"execution still {status} after {timeout_s:.0f}s: {execution_arn}")
        sleep(poll_seconds)


def status_report(sm, execution_arn: str) -> str:
    execution = sm.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
    lines = [f"execution {execution_arn}",
             f"  status:  {execution.get('PipelineExecutionStatus', '?')}"]
    for key, label in (("PipelineExecutionDisplayName", "name"),
                       ("PipelineExecutionDescription", "note"),
                       ("CreationTime", "started"), ("LastModifiedTime", "updated"),
                       ("FailureReason", "failure")):
        if execution.get(key):
            lines.append(f"  {label + ':':<8} {execution[key]}")
    try:
        steps = execution_steps(sm, execution_arn)
    except Exception as exc:  # an endpoint without ListPipelineExecutionSteps (moto) still shows the rest
        lines.append(f"  steps:   not available ({describe_error(exc).splitlines()[0][:200]})")
        return "\n".join(lines)
    lines.append("  steps:" if steps else "  steps:   none started yet")
    for step in steps:
        lines.append(f"    {_step_line(step)}")
        lines += [f"      {line}" for line in debugger_rule_lines(sm, step)]
    return "\n".join(lines)


def debugger_rule_lines(sm, step: dict) -> list[str]:
    """The Debugger rule verdicts of a training step's job (DebugRuleEvaluationStatuses)."""
    arn = ((step.get("Metadata") or {}).get("TrainingJob") or {}).get("Arn")
    if not arn:
        return []
    try:
        job = sm.describe_training_job(TrainingJobName=arn.rsplit("/", 1)[-1])
    except Exception as exc:
        return [f"debugger rules: not available ({describe_error(exc).splitlines()[0][:160]})"]
    return [f"rule {r.get('RuleConfigurationName', '?'):<20} {r.get('RuleEvaluationStatus', '?')}"
            + (f": {r['StatusDetails']}" if r.get("StatusDetails") else "")
            for r in job.get("DebugRuleEvaluationStatuses") or []]


def executions_report(sm, pipeline_name: str, max_results: int = 20) -> str:
    if not pipeline_exists(sm, pipeline_name):
        raise AwsError(f"no pipeline {pipeline_name!r} in this account and region")
    found = sm.list_pipeline_executions(PipelineName=pipeline_name, SortBy="CreationTime",
                                        SortOrder="Descending", MaxResults=max_results)
    summaries = found.get("PipelineExecutionSummaries", [])
    if not summaries:
        return f"pipeline {pipeline_name} has no executions yet"
    lines = [f"{'STARTED':<26} {'STATUS':<10} {'NAME':<20} ARN"]
    for s in summaries:
        started = s.get("StartTime")
        started = started.isoformat(timespec="seconds") if hasattr(started, "isoformat") else str(started or "")
        lines.append(f"{started:<26} {s.get('PipelineExecutionStatus', '?'):<10} "
                     f"{(s.get('PipelineExecutionDisplayName') or '-'):<20} {s['PipelineExecutionArn']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- endpoints


def invoke_endpoint(runtime, endpoint_name: str, body: bytes, content_type: str) -> dict:
    """One photo to a SageMaker endpoint (sagemaker-runtime InvokeEndpoint); the JSON answer.

    Errors become pipeline.serving.endpoint.EndpointError with one line (the CLI reports it per photo).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.serving.endpoint import EndpointError

    try:
        response = runtime.invoke_endpoint(EndpointName=endpoint_name, Body=body,
                                           ContentType=content_type, Accept="application/json")
        return json.loads(response["Body"].read())
    except ClientError as exc:
        raise EndpointError(f"endpoint {endpoint_name}: {describe_error(exc)}") from None
    except BotoCoreError as exc:
        raise EndpointError(f"cannot reach endpoint {endpoint_name}: {exc}") from None
    except ValueError as exc:
        raise EndpointError(f"endpoint {endpoint_name} answered something that is not JSON: {exc}") from None
