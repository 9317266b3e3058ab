"""Putting a model version on a stage's endpoint: the rules and the two back-ends.

One module for `invmon deploy`, `invmon models approve/reject`, `invmon endpoints` and the
Lambda deploy function that the approval rule invokes (infra/), so the rules are written once.
Standard library and boto3 only: the Lambda runtime has boto3, not the SageMaker SDK.

Rules:
- Each group has two fixed endpoints, `<group>-staging` and `<group>-production`. A pipeline
  execution deploys only to `<group>-staging` (pipeline_endpoint_problem).
- On SageMaker, production serves only an Approved version whose staging smoke test passed and
  was recorded by the execution that registered it, or on which an operator recorded an
  override (pipeline/registry/smoke.py): an approval in the console never passes through
  `invmon models approve`, which applies the rule on both back-ends. A version refused for its
  smoke test changes nothing and sends the deploy-failed alert with the reason, whichever way
  it came: the approval event (the deploy function), `invmon deploy --stage prod`, or a
  rollback's fallback. Locally a version becomes Approved only through that command.
- A refused deploy creates or changes nothing.
- Approving deploys to production; if that deploy fails the version stays Approved, the
  failure is reported and production keeps what it served.
- Rejecting what production serves moves production to the newest other Approved version, or,
  if there is none, leaves it as it is and flags it. What production serves is read again after
  the status change; a read that fails is an error and a flag, never "not served".
- Every deploy checks the artifact against the SHA-256 recorded at registration and refuses a
  mismatch, naming both digests. On SageMaker the verified artifact is copied under the bucket's
  `registry/` prefix (which the roles that build cannot write) and the Model serves that copy.
- An approval event deploys only the newest Approved version of the group, and the status is
  read again right before traffic switches: duplicate, late and out-of-order events change
  nothing. Models and endpoint configs are named by version and artifact, so two deliveries of
  one event build the same ones and the second finds the switch already made or under way.
- On SageMaker, production's update shifts traffic by canary or linear steps (staging's all at
  once) and rolls back by itself when a rollback alarm fires; each endpoint scales on invocations
  per instance once it is InService; a deploy keeps the Models and EndpointConfigs of the current
  and the previous version and deletes this endpoint's older ones, never what an endpoint uses or
  an update in progress switches to.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

from pipeline.alerts import notify
from pipeline.digests import file_sha256, sha256_of
from pipeline.registry.local import (DIGEST_PROPERTY, Endpoint, ModelVersion, NotFoundError, RegistryError)
from pipeline.registry.smoke import production_problem

STAGES = {"staging": "staging", "prod": "production"}
# Cost-allocation tags (activate them in Billing): what a job, model, endpoint config or endpoint
# costs, split by model group, stage and run. One definition for the deploys here and for every
# request the compile stage makes (pipeline/dag/compile.py: the pipeline's jobs and staging Deploy).
GROUP_TAG, STAGE_TAG, RUN_TAG = "invmon:group", "invmon:stage", "invmon:run"
PIPELINE_STAGE = "pipeline"  # the stage tag of a run's jobs
CAPTURE_PERCENT = {"staging": 100, "prod": 20}
CAPTURE_PREFIX = "capture"
EVENT_TYPE = "SageMaker Model Package State Change"
ENDPOINT_EVENT_TYPE = "SageMaker Endpoint State Change"
VARIANT = "AllTraffic"
# Staging's blue/green update: all traffic at once once the new fleet is up, then the old fleet is
# kept 10 minutes with the rollback alarms watched (SageMaker deployment guardrails).
BAKE_SECONDS = 600
# The rollback alarms infra/invmon.yaml creates for each stage endpoint, named <endpoint>-<suffix>.
ALARM_SUFFIXES = ("invocation-5xx", "model-latency-p99", "low-confidence")
# The share of answers given with low confidence, which the <endpoint>-low-confidence alarm reads
# (Average of a 0/1 value per answer, dimension EndpointName). Nothing publishes it yet: what a
# publisher must send is in docs/promotion.md (rollback alarms).
LOW_CONFIDENCE_NAMESPACE, LOW_CONFIDENCE_METRIC = "invmon/Endpoints", "LowConfidence"


class DeployError(RegistryError):
    """A deploy that was refused or failed; the message says what is still served."""


class NoChange(Exception):
    """Nothing to switch: the endpoint serves it already, or another delivery of the same event
    is switching it; or the version stopped being the one to deploy. The message says which."""


def endpoint_name(group: str, stage: str) -> str:
    if stage not in STAGES:
        raise DeployError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    return f"{group}-{STAGES[stage]}"


def cost_tags(group, stage: str, run) -> list[dict]:
    """The tags of one resource; `group` and `run` may be pipeline placeholders. A run is named by
    its id: a local run's, or the last part of a pipeline execution's ARN (its execution id)."""
    if isinstance(run, str):
        run = run.rsplit("/", 1)[-1] or "unknown"
    tags = [{"Key": GROUP_TAG, "Value": group}] if group is not None else []
    return tags + [{"Key": STAGE_TAG, "Value": stage}, {"Key": RUN_TAG, "Value": run}]


def capture_uri_parts(bucket, endpoint) -> list:
    """The parts of s3://<bucket>/capture/<endpoint>, joined on "/": where an endpoint's
    DataCaptureConfig writes and the monitor reads. Parts, so that the pipeline's staging Deploy
    can join them with its endpoint-name parameter (pipeline/sagemaker/definition.py)."""
    return ["s3:/", bucket, CAPTURE_PREFIX, endpoint]


def capture_uri(bucket: str, endpoint: str) -> str:
    return "/".join(capture_uri_parts(bucket, endpoint))


def capture_settings(percent: int) -> dict:
    """DataCaptureConfig less its destination: requests and answers, a share of them; JSON answers
    kept as text, photos (any other content type) in base64. One definition for every deploy,
    the pipeline's staging Deploy step included (pipeline/dag/compile.py)."""
    return {"EnableCapture": True, "InitialSamplingPercentage": percent,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]}}


def alarm_names(endpoint: str) -> list[str]:
    """The CloudWatch alarms infra/invmon.yaml creates for an endpoint (blue/green rollback)."""
    return [f"{endpoint}-{suffix}" for suffix in ALARM_SUFFIXES]


def pipeline_endpoint_problem(parameters: dict) -> str | None:
    """Why an execution with these parameters may not run, or None: it deploys only to staging.

    Parameters without StagingEndpointName (a DAG with no deploy step) deploy nothing."""
    if "StagingEndpointName" not in parameters:
        return None
    group = str(parameters.get("ModelPackageGroupName", ""))
    name = str(parameters.get("StagingEndpointName", ""))
    expected = endpoint_name(group, "staging")
    if name == expected:
        return None
    return (f"StagingEndpointName={name} refused: a pipeline execution deploys only to its group's "
            f"staging endpoint {expected}; production is deployed from an Approved version "
            f"(invmon deploy --stage prod, or approval in the registry)")


# --------------------------------------------------------------------------- rollout and scaling

ROLLOUT_MODES = ("CANARY", "LINEAR", "ALL_AT_ONCE")
PROVISION_SECONDS = 1800  # the new fleet's start, in the update's MaximumExecutionTimeoutInSeconds


@dataclass(frozen=True)
class Rollout:
    """How an update moves traffic from the old fleet to the new one (SageMaker's blue/green
    TrafficRoutingConfiguration). CANARY: `percent` of the new fleet's capacity takes traffic for
    `wait_seconds`, then all of it; LINEAR: `percent` more every `wait_seconds`; ALL_AT_ONCE: all
    of it. The old fleet is then kept `termination_wait_seconds`. A rollback alarm that fires at
    any time before that sends all traffic back to the old fleet."""
    mode: str = "CANARY"
    percent: int = 10
    wait_seconds: int = 600
    termination_wait_seconds: int = 600

    def steps(self) -> list[int]:
        """The shares of the new fleet's capacity that take traffic, each for `wait_seconds`,
        before all of it does."""
        if self.mode == "CANARY":
            return [self.percent]
        if self.mode == "LINEAR":
            return list(range(self.percent, 100, self.percent))
        return []

    def traffic_routing(self) -> dict:
        size = {"Type": "CAPACITY_PERCENT", "Value": self.percent}
        return {"Type": self.mode, "WaitIntervalInSeconds": self.wait_seconds if self.steps() else 0,
                **({"CanarySize": size} if self.mode == "CANARY" else {}),
                **({"LinearStepSize": size} if self.mode == "LINEAR" else {})}

    def timeout_seconds(self) -> int:
        total = PROVISION_SECONDS + len(self.steps()) * self.wait_seconds + self.termination_wait_seconds
        return max(total, 600)  # UpdateEndpoint's range is 600-28800 s (rollout_settings checks the top)

    def describe(self, alarms: list[str]) -> str:
        """What shifts when, e.g. `10% for 10 min, then 100%; old fleet kept 10 min; roll back on: ...`."""
        shifts = [f"{p}% for {_duration(self.wait_seconds)}" for p in self.steps()]
        shifts.append("then 100%" if shifts else "100% at once")
        return (", ".join(shifts) + f"; old fleet kept {_duration(self.termination_wait_seconds)}"
                f"; roll back on: {', '.join(alarms)}")


STAGING_ROLLOUT = Rollout("ALL_AT_ONCE", 100, 0, BAKE_SECONDS)


@dataclass(frozen=True)
class Scaling:
    """Application Auto Scaling of a stage endpoint's variant: target tracking on
    SageMakerVariantInvocationsPerInstance (invocations a minute per instance)."""
    min_capacity: int
    max_capacity: int
    invocations_per_instance: int


# Defaults, as infra/invmon.yaml's parameters: production keeps two instances (a canary needs a
# fleet it can split); 600 invocations a minute is a quarter of the ~43 requests a second the
# local server answered on 2 cores (docs/benchmarks.md): half for headroom, half again because the
# SageMaker serving container was not measured.
CAPACITY = {"staging": (1, 2), "prod": (2, 4)}
INVOCATIONS_PER_INSTANCE = 600
CAPACITY_ENV = {"staging": ("INVMON_MIN_CAPACITY_STAGING", "INVMON_MAX_CAPACITY_STAGING"),
                "prod": ("INVMON_MIN_CAPACITY_PROD", "INVMON_MAX_CAPACITY_PROD")}
MAX_INSTANCES = 20
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def _duration(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def _env_int(env, name: str, default: int, low: int, high: int, why: str = "") -> int:
    text = str(env.get(name, "")).strip()
    if not text:
        return default
    if not (text.isdigit() and low <= int(text) <= high):
        raise DeployError(f"{name}={text!r}: give a whole number, {low}-{high}{why}")
    return int(text)


def rollout_settings(env=None) -> tuple[Rollout, dict[str, Scaling]]:
    """Production's rollout and each stage's scaling, from the deploy function's environment
    (infra/invmon.yaml sets it from the stack's parameters) or the defaults. A bad value is one
    line naming the variable."""
    env = os.environ if env is None else env
    mode = str(env.get("INVMON_ROLLOUT_MODE", "")).strip().upper() or Rollout.mode
    if mode not in ROLLOUT_MODES:
        raise DeployError(f"INVMON_ROLLOUT_MODE={mode!r}: use one of {', '.join(ROLLOUT_MODES)}")
    rollout = Rollout(
        mode,
        # SageMaker: a canary is at most half of the new fleet, a linear step 10-50% of it.
        _env_int(env, "INVMON_ROLLOUT_PERCENT", Rollout.percent, 10 if mode == "LINEAR" else 1, 50,
                 " (% of the new fleet's capacity" + (" a step)" if mode == "LINEAR" else ")")),
        _env_int(env, "INVMON_ROLLOUT_WAIT_SECONDS", Rollout.wait_seconds, 0, 3600),
        _env_int(env, "INVMON_ROLLOUT_TERMINATION_WAIT_SECONDS", Rollout.termination_wait_seconds, 0, 3600))
    waits = len(rollout.steps()) * rollout.wait_seconds + rollout.termination_wait_seconds
    if PROVISION_SECONDS + waits > 28800:
        raise DeployError(f"the rollout: {len(rollout.steps())} step(s) of {rollout.wait_seconds} s and "
                          f"{rollout.termination_wait_seconds} s for the old fleet take longer than the 8 hours "
                          "SageMaker gives a deployment (less the new fleet's start); use bigger steps or shorter waits")
    scaling = {}
    for stage, (low_name, high_name) in CAPACITY_ENV.items():
        low = _env_int(env, low_name, CAPACITY[stage][0], 1, MAX_INSTANCES)
        high = _env_int(env, high_name, CAPACITY[stage][1], 1, MAX_INSTANCES)
        if low > high:
            raise DeployError(f"{low_name}={low} is above {high_name}={high}")
        scaling[stage] = Scaling(low, high, _env_int(env, "INVMON_INVOCATIONS_PER_INSTANCE",
                                                     INVOCATIONS_PER_INSTANCE, 1, 100_000))
    if rollout.steps() and scaling["prod"].min_capacity < 2:
        raise DeployError(f"INVMON_ROLLOUT_MODE={mode} needs a production fleet of at least 2 instances "
                          f"(INVMON_MIN_CAPACITY_PROD={scaling['prod'].min_capacity}): a share of one "
                          "instance is all of it; use ALL_AT_ONCE or a minimum of 2")
    return rollout, scaling


def rollout_report(name: str, stage: str, rollout: Rollout, creating: bool = False) -> str:
    """One line: how a deploy to `name` moves its traffic and what rolls it back."""
    if creating:
        return "new endpoint: it takes all traffic once InService (no fleet to shift from)"
    return (STAGING_ROLLOUT if stage == "staging" else rollout).describe(alarm_names(name))


@dataclass
class Pruned:
    """A clean-up of one endpoint's Models and EndpointConfigs: what it keeps and why, what it
    deletes (or would, in a dry run), what it leaves alone and why, and what failed."""
    endpoint: str
    kept: list[tuple[str, str]] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""

    def summary(self, dry_run: bool = False) -> str:
        if self.note:
            return f"{self.endpoint}: {self.note}"
        kept = ", ".join(f"{name} ({why})" for name, why in self.kept) or "nothing"
        verb = "would delete" if dry_run else "deleted"
        gone = (f"{verb} {len(self.configs)} endpoint config(s) and {len(self.models)} model(s)"
                if self.configs or self.models else "nothing to delete")
        return f"{self.endpoint}: {gone}; kept {kept}"


@dataclass
class Outcome:
    endpoint: str
    version: ModelVersion | None  # what the endpoint serves (or was asked to) afterwards
    previous: int | None = None
    changed: bool = False
    message: str = ""
    rollout: str = ""  # how the switch moves traffic (rollout_report)
    pruned: Pruned | None = None  # the clean-up after the switch
    refused: str = ""  # why production may not serve the version (its smoke test), if it may not


# --------------------------------------------------------------------------- choosing a version


def choose(registry, group: str, stage: str, version: int | None) -> ModelVersion:
    """The named version, or the newest Approved one; production takes only Approved."""
    if version is None:
        model = registry.latest(group, "Approved")
        if model is None:
            raise DeployError(f"{group} has no Approved version to deploy "
                              f"(approve one: invmon models approve V --group {group})")
        return model
    model = registry.get(group, version)
    if stage == "prod" and model.status != "Approved":
        raise DeployError(f"refused: {group}/{model.version} is {model.status}; production serves "
                          f"only Approved versions (nothing was changed)")
    return model


def recorded_digest(model: ModelVersion) -> str:
    """The SHA-256 recorded at registration; a version without one cannot be deployed."""
    recorded = model.properties.get(DIGEST_PROPERTY, "")
    if not recorded:
        raise DeployError(f"refused: {model.name} has no {DIGEST_PROPERTY} recorded at registration, so "
                          f"its artifact cannot be verified; register it again (nothing was changed)")
    return recorded


def verify_artifact(model: ModelVersion, actual: str) -> None:
    """Refuse an artifact whose bytes are not those registered (nothing is changed)."""
    recorded = recorded_digest(model)
    if actual != recorded:
        raise DeployError(f"refused: the artifact of {model.name} is not the one registered: "
                          f"{model.artifact_uri} has SHA-256 {actual}, the registry recorded {recorded} "
                          f"(nothing was changed)")


def deploy_problem(registry, model: ModelVersion, newest_only: bool, smoke: bool = False) -> str | None:
    """Why `model` may not go to production now, read afresh; None when it may.
    `newest_only`: an approval event deploys only the newest Approved version of the group.
    `smoke`: its staging smoke test (or an override) is checked again too."""
    fresh = registry.get(model.group, model.version)
    if fresh.status != "Approved":
        return f"{model.name} is {fresh.status} now"
    if newest_only:
        newest = registry.latest(model.group, "Approved")
        if newest is not None and newest.version != model.version:
            return f"{newest.name} is the newest Approved version, not {model.name}"
    return production_problem(fresh) if smoke else None


def smoke_refusal(name: str, model: ModelVersion) -> str | None:
    """Production's smoke-test gate: None when `model` may go there; otherwise the refusal,
    already sent as a deploy-failed alert (nothing was changed, nothing is flagged)."""
    problem = production_problem(model)
    if problem is None:
        return None
    message = (f"refused: {problem}; {name} was left as it is. Run the pipeline again, or record an "
               f"operator's override: invmon models approve {model.version} --backend aws --force-no-smoke --note WHY")
    notify("deploy-failed", f"{name}: {model.name} refused (staging smoke test)", message,
           endpoint=name, group=model.group, version=model.version)
    return message


def deploy(registry, target, group: str, stage: str, version: int | None = None,
           newest_only: bool = False) -> Outcome:
    """Put `version` (default: the newest Approved) on the stage's endpoint. With `newest_only`
    (approval events) a version that is not the newest Approved one changes nothing."""
    name = endpoint_name(group, stage)
    if newest_only:  # an event: a version it no longer makes sense to deploy is no error
        model = registry.get(group, version)
        if problem := deploy_problem(registry, model, True):
            return Outcome(name, model, None, False, f"{name} left as it is: {problem}")
    else:
        model = choose(registry, group, stage, version)
    recheck = None
    if stage == "prod":
        if target.smoke_gate and (refused := smoke_refusal(name, model)):
            if newest_only:  # an event: the invocation succeeds (no retry, no second alert)
                return Outcome(name, model, None, False, refused, refused=refused)
            raise DeployError(refused)

        def recheck() -> str | None:  # right before the traffic switches
            return deploy_problem(registry, model, newest_only, smoke=target.smoke_gate)
    current = target.current(name)
    previous = current.version if current and current.group == group else None
    if previous == model.version and not (current and current.flag) and current.pending is None:
        return Outcome(name, model, previous, False, f"{name} already serves {model.name}")
    rollout = target.rollout_report(name, stage, creating=current is None)  # a bad setting fails here
    try:
        target.deploy(name, model, stage, recheck=recheck)
    except NoChange as exc:
        return Outcome(name, model, previous, False, f"{name} left as it is: {exc}")
    except RegistryError as exc:
        notify("deploy-failed", f"{name}: deploying {model.name} failed", str(exc),
               endpoint=name, group=group, version=model.version)
        raise
    outcome = Outcome(name, model, previous, True, f"{name} now serves {model.name}"
                      + (f" (was version {previous})" if previous else ""), rollout,
                      tidy(target, name, group, stage))
    notify("deploy", f"{name} now serves {model.name}", outcome.message, endpoint=name, group=group,
           version=model.version, previous=previous)
    return outcome


def approve(registry, target, group: str, version: int, note: str = "") -> Outcome:
    """Approve, then deploy to production. A failed deploy keeps the approval (DeployError
    names the version still served); a refused approval changes nothing."""
    model = registry.set_status(group, version, "Approved", note)
    try:
        return deploy(registry, target, group, "prod", model.version)
    except RegistryError as exc:
        current = _safe_current(target, endpoint_name(group, "prod"))
        serving = f"version {current.version}" if current else "nothing"
        raise DeployError(f"{model.name} is Approved, but deploying it to production failed: {exc}; "
                          f"production still serves {serving}") from None


def reject(registry, target, group: str, version: int, note: str = "") -> Outcome | None:
    """Reject; if production serves it (or is switching to it), roll production back or flag it."""
    model = registry.set_status(group, version, "Rejected", note)
    return roll_back_from(registry, target, model)


def roll_back_from(registry, target, model: ModelVersion) -> Outcome | None:
    """After `model` was rejected: read what production serves now and, if it is `model`, move
    it to the newest other Approved version, or flag it. None when production does not serve it."""
    name = endpoint_name(model.group, "prod")
    try:
        current = target.current(name)
    except RegistryError as exc:  # unknown is not "not served": say so, and ask for a person
        flagged = _try_flag(target, name, f"not read after {model.name} was rejected; check what it serves")
        raise DeployError(f"{model.name} is Rejected, but what {name} serves could not be read ({exc}); "
                          + ("it is flagged: check it with invmon endpoints" if flagged else
                             "flagging it failed too: check it with invmon endpoints")) from None
    if not current or current.group != model.group or model.version not in (current.version, current.pending):
        return None
    if current.pending == model.version:  # a deploy of it is under way: it cannot be overtaken
        _try_flag(target, name, f"switching to Rejected version {model.version}; reject it again when "
                                "the update ends")
        raise DeployError(f"{model.name} is Rejected, but {name} is switching to it right now ({current.status}); "
                          f"it is flagged: run `invmon models reject {model.version}` again when the update "
                          f"ends to roll it back")
    approved = [v for v in registry.list_versions(model.group)
                if v.status == "Approved" and v.version != model.version]
    fallback = [v for v in approved if not target.smoke_gate or production_problem(v) is None]
    if not fallback:
        flag = (f"serves Rejected version {model.version}; no other Approved version to roll back to"
                + (" that passed its staging smoke test" if approved else ""))
        target.flag(name, flag)
        notify("deploy-failed", f"{name} serves Rejected {model.name}", f"{name} {flag}; it is flagged",
               endpoint=name, group=model.group, version=model.version)
        return Outcome(name, model, model.version, False, f"{name} {flag} (left as it is, flagged)")
    newest = fallback[-1]
    rollout = target.rollout_report(name, "prod")
    try:
        target.deploy(name, newest, "prod")
    except (RegistryError, NoChange) as exc:
        flag = f"serves Rejected version {model.version}; rollback to {newest.name} failed"
        _try_flag(target, name, flag)
        message = (f"{model.name} is Rejected, but rolling production back to {newest.name} failed: {exc}; "
                   f"production still serves version {model.version} (flagged)")
        notify("deploy-failed", f"{name}: rollback from {model.name} failed", message,
               endpoint=name, group=model.group, version=model.version)
        raise DeployError(message) from None
    outcome = Outcome(name, newest, model.version, True,
                      f"{name} rolled back from Rejected version {model.version} to {newest.name}",
                      rollout, tidy(target, name, model.group, "prod"))
    notify("rolled-back", f"{name} rolled back to {newest.name}", outcome.message, endpoint=name,
           group=model.group, version=newest.version, previous=model.version)
    return outcome


def tidy(target, name: str, group: str, stage: str) -> Pruned:
    """The clean-up after a switch. It never fails the deploy it follows: what it could not do is
    in the result's errors (and the next deploy, or `invmon endpoints --prune`, tries again)."""
    try:
        return target.prune(name, group, stage)
    except RegistryError as exc:
        return Pruned(name, errors=[str(exc)])


def _safe_current(target, name: str) -> Endpoint | None:
    try:
        return target.current(name)
    except RegistryError:
        return None


def _try_flag(target, name: str, text: str) -> bool:
    try:
        target.flag(name, text)
        return True
    except RegistryError:
        return False


# --------------------------------------------------------------------------- local back-end


def verify_local_artifact(model: ModelVersion) -> None:
    """The registered file, present and with the SHA-256 recorded at registration."""
    if not os.path.isfile(model.artifact_uri):
        raise DeployError(f"model artifact {model.artifact_uri} of {model.name} is missing")
    verify_artifact(model, file_sha256(model.artifact_uri))


class LocalTarget:
    """Endpoints as records in the SQLite registry (`invmon serve --endpoint` serves them)."""

    smoke_gate = False  # a local version is Approved only by `invmon models approve`, which applies it

    def __init__(self, registry):
        self.registry = registry

    def current(self, name: str) -> Endpoint | None:
        try:
            return self.registry.get_endpoint(name)
        except NotFoundError:
            return None

    def deploy(self, name: str, model: ModelVersion, stage: str, recheck=None) -> None:
        verify_local_artifact(model)
        if recheck and (problem := recheck()):
            raise NoChange(problem)
        # The status is checked again inside the registry's write transaction.
        self.registry.deploy(name, model.group, model.version, require_approved=stage == "prod")

    def flag(self, name: str, text: str) -> None:
        self.registry.flag_endpoint(name, text)

    def endpoints(self, group: str) -> list[Endpoint]:
        names = {endpoint_name(group, s) for s in STAGES}
        return [e for e in self.registry.list_endpoints() if e.name in names]

    def rollout_report(self, name: str, stage: str, creating: bool = False) -> str:
        """What a deploy on SageMaker would shift when, from the same settings the deploy function
        reads (the local record itself switches at once)."""
        return rollout_report(name, stage, rollout_settings()[0], creating)

    def prune(self, name: str, group: str, stage: str, dry_run: bool = False) -> Pruned:
        """A local endpoint is one record naming the version it serves: no models or configs pile up."""
        current = self.current(name)
        return Pruned(name, kept=[(name, f"serves version {current.version}")] if current else [],
                      note="nothing to prune: a local endpoint is one record naming the version it serves"
                           + (f" ({current.version})" if current else " (no record)"))


# --------------------------------------------------------------------------- SageMaker back-end


PACKAGE_ARN = re.compile(r":model-package/(?P<group>[^/]+)/(?P<version>\d+)$")
FLAG_TAG = "invmon:flag"
# Verified artifacts, by group, version and SHA-256, in the bucket of the registered one: only the
# deploy function (and a reviewer deploying by hand) may write here (infra/invmon.yaml).
REGISTRY_PREFIX = "registry"
# The Model's container names the package it serves and the digest of what it serves.
PACKAGE_ENV, DIGEST_ENV = "INVMON_MODEL_PACKAGE_ARN", "INVMON_ARTIFACT_SHA256"
ALREADY_EXISTS = ("already exist", "Cannot create already existing")
IN_PROGRESS = ("in-progress", "in progress", "is being updated", "Cannot update")


def _split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise DeployError(f"model artifact {uri!r} is not an s3://bucket/key URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


class SageMakerTarget:
    """SageMaker real-time endpoints: a Model + EndpointConfig per version and artifact (named by
    both, so a repeated deploy reuses them), then CreateEndpoint, or UpdateEndpoint with a
    blue/green DeploymentConfig that rolls back by itself when one of the endpoint's alarms fires
    while the new fleet bakes."""

    smoke_gate = True  # an approval in the console has passed no gate: production's deploy is it

    def __init__(self, sm, role_arn: str, instance_type: str = "ml.m5.large",
                 alarms: dict[str, list[str]] | None = None, clock=time.time, s3=None,
                 capture_percent: dict[str, int] | None = None, rollout: Rollout | None = None,
                 scaling: dict[str, Scaling] | None = None, autoscaling=None):
        self.sm, self.role_arn, self.instance_type = sm, role_arn, instance_type
        self.alarms = alarms or {}
        # What share of requests each stage's endpoint captures (DataCaptureConfig): all of
        # staging's, a sample of production's (infra/invmon.yaml's ProductionCapturePercent).
        self.capture_percent = {**CAPTURE_PERCENT, **(capture_percent or {})}
        defaults = rollout_settings({})
        self.rollout = rollout or defaults[0]  # production's; staging's is STAGING_ROLLOUT
        self.scaling = scaling or defaults[1]
        self.clock = clock
        self._s3, self._autoscaling = s3, autoscaling

    @property
    def s3(self):
        if self._s3 is None:
            from pipeline.sagemaker.clients import client

            self._s3 = client("s3", self.sm.meta.region_name)
        return self._s3

    @property
    def autoscaling(self):
        if self._autoscaling is None:
            from pipeline.sagemaker.clients import client

            self._autoscaling = client("application-autoscaling", self.sm.meta.region_name)
        return self._autoscaling

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        from pipeline.sagemaker.clients import describe_error

        service = ("S3" if fn.__self__ is self._s3 else
                   "Application Auto Scaling" if fn.__self__ is self._autoscaling else "SageMaker")
        try:
            return fn(**kwargs)
        except ClientError as exc:
            raise DeployError(f"{service} refused {fn.__name__}: {describe_error(exc)}") from None
        except BotoCoreError as exc:
            raise DeployError(f"cannot reach {service}: {exc}") from None

    def _describe(self, name: str) -> dict | None:
        """The endpoint, or None where there is none (any other failure is a DeployError)."""
        try:
            return self._call(self.sm.describe_endpoint, EndpointName=name)
        except DeployError as exc:
            if "Could not find endpoint" in str(exc) or "does not exist" in str(exc):
                return None
            raise

    def _served_by(self, config_name: str) -> tuple[str, int]:
        """(group, version) of the package an endpoint config's model serves; ("?", 0) if none."""
        config = self._call(self.sm.describe_endpoint_config, EndpointConfigName=config_name)
        model = self._call(self.sm.describe_model, ModelName=config["ProductionVariants"][0]["ModelName"])
        container = (model.get("Containers") or [model.get("PrimaryContainer") or {}])[0]
        arn = container.get("ModelPackageName") or (container.get("Environment") or {}).get(PACKAGE_ENV, "")
        found = PACKAGE_ARN.search(arn)
        return (found["group"], int(found["version"])) if found else ("?", 0)

    def current(self, name: str) -> Endpoint | None:
        endpoint = self._describe(name)
        if endpoint is None:
            return None
        group, version = self._served_by(endpoint["EndpointConfigName"])
        pending_config = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        pending = (self._served_by(pending_config)[1]
                   if pending_config and pending_config != endpoint["EndpointConfigName"] else None)
        tags = self._call(self.sm.list_tags, ResourceArn=endpoint["EndpointArn"]).get("Tags", [])
        flag = next((t["Value"] for t in tags if t["Key"] == FLAG_TAG), "")
        changed = endpoint.get("LastModifiedTime")
        return Endpoint(name=name, group=group, version=version,
                        updated_at=changed.isoformat() if hasattr(changed, "isoformat") else str(changed or ""),
                        flag=flag, status=endpoint.get("EndpointStatus", ""), pending=pending)

    def deployment_config(self, name: str, stage: str = "prod") -> dict:
        """UpdateEndpoint's blue/green DeploymentConfig: production's rollout (canary or linear by
        default), staging's all at once; both roll back on the endpoint's alarms."""
        rollout = self.rollout if stage == "prod" else STAGING_ROLLOUT
        alarms = self.alarms.get(name, alarm_names(name))
        return {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": rollout.traffic_routing(),
                "TerminationWaitInSeconds": rollout.termination_wait_seconds,
                "MaximumExecutionTimeoutInSeconds": rollout.timeout_seconds(),
            },
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in alarms]},
        }

    def rollout_report(self, name: str, stage: str, creating: bool = False) -> str:
        return rollout_report(name, stage, self.rollout, creating)

    # ------------------------------------------------------------------ the artifact

    def _object_sha256(self, bucket: str, key: str) -> tuple[str, str] | None:
        """(SHA-256, ETag) of an object, read whole; None where there is no such object."""
        try:
            found = self._call(self.s3.get_object, Bucket=bucket, Key=key)
        except DeployError as exc:
            if "NoSuchKey" in str(exc):
                return None
            raise
        return sha256_of(found["Body"].iter_chunks(1 << 20)), found.get("ETag", "")

    def registry_copy(self, model: ModelVersion) -> str:
        """The verified artifact under `registry/<group>/<version>/<sha256>/` of its bucket.

        The registered object is read and hashed; a mismatch with the SHA-256 recorded at
        registration is refused with both digests. The copy is made only from the object version
        that was hashed (CopySourceIfMatch). An existing copy is hashed too before it is used."""
        recorded = recorded_digest(model)
        bucket, key = _split_s3(model.artifact_uri)
        copy_key = f"{REGISTRY_PREFIX}/{model.group}/{model.version}/{recorded}/model.tar.gz"
        copy_uri = f"s3://{bucket}/{copy_key}"
        existing = self._object_sha256(bucket, copy_key)
        if existing is not None:
            if existing[0] != recorded:
                raise DeployError(f"refused: the registry's copy of {model.name} ({copy_uri}) has SHA-256 "
                                  f"{existing[0]}, the registry recorded {recorded} (nothing was changed)")
            return copy_uri
        source = self._object_sha256(bucket, key)
        if source is None:
            raise DeployError(f"model artifact {model.artifact_uri} of {model.name} is missing")
        verify_artifact(model, source[0])
        self._call(self.s3.copy_object, Bucket=bucket, Key=copy_key, CopySourceIfMatch=source[1],
                   CopySource={"Bucket": bucket, "Key": key}, MetadataDirective="REPLACE",
                   Metadata={"sha256": recorded, "model-package": model.arn})
        return copy_uri

    def capture_config(self, name: str, stage: str, data_url: str) -> dict:
        """DataCaptureConfig: requests and answers, sampled per stage, under capture/<endpoint>/ of
        the artifact's bucket, where the monitor reads them (scripts/monitor)."""
        bucket, _ = _split_s3(data_url)
        return {**capture_settings(self.capture_percent[stage]), "DestinationS3Uri": capture_uri(bucket, name)}

    def resource_name(self, name: str, model: ModelVersion, image: str, stage: str = "prod") -> str:
        """The Model's and EndpointConfig's name: by endpoint, version, artifact and settings, so
        that every delivery of one deploy builds the same ones (at most 63 characters)."""
        settings = "\0".join((model.properties.get(DIGEST_PROPERTY, ""), image, self.instance_type,
                              self.role_arn, str(self.capture_percent[stage]),
                              str(self.scaling[stage].min_capacity)))
        return f"{name[:38]}-v{model.version}-{sha256_of([settings.encode()])[:10]}"

    # ------------------------------------------------------------------ the switch

    def _create(self, fn, describe, name_key: str, name: str, same, **kwargs) -> bool:
        """Create a named resource; False when it exists already (another delivery made it).

        An existing one is used only if `same(described)` says it is what this deploy would have
        made: the names are predictable, and another role (the pipeline's models are named
        `<pipeline>-*`, which may be `<group>-*`) could make one first pointing elsewhere."""
        for attempt in range(2):
            try:
                found = describe(**{name_key: name})
            except DeployError:
                found = None
            if found is not None:
                if not same(found):
                    raise DeployError(f"refused: {name} exists already and is not what this deploy "
                                      "would make (another artifact, image, role or size); nothing "
                                      "was switched, delete it or look into who made it")
                return False
            if attempt:
                break
            try:
                self._call(fn, **{name_key: name}, **kwargs)
                return True
            except DeployError as exc:
                if not any(text in str(exc) for text in ALREADY_EXISTS):
                    raise  # else another delivery made it meanwhile: check it, as above
        raise DeployError(f"{name} could not be created nor read")

    def _delete(self, model_name: str | None, config_name: str | None) -> None:
        """Remove what this deploy created and did not use (best effort: the names are reused)."""
        for fn, key, value in ((self.sm.delete_endpoint_config, "EndpointConfigName", config_name),
                               (self.sm.delete_model, "ModelName", model_name)):
            if value:
                try:
                    self._call(fn, **{key: value})
                except DeployError:
                    pass

    def deploy(self, name: str, model: ModelVersion, stage: str, recheck=None) -> None:
        if not model.arn:
            raise DeployError(f"{model.name} has no model package ARN")
        if not self.role_arn:
            raise DeployError("a SageMaker deploy needs the model's execution role: pass --role-arn "
                              "or set INVMON_MODEL_ROLE_ARN (the stack's ModelRoleArn output)")
        package = self._call(self.sm.describe_model_package, ModelPackageName=model.arn)
        if stage == "prod" and package.get("ModelApprovalStatus") != "Approved":  # the caller may not be `choose`
            raise DeployError(f"refused: {model.name} is {package.get('ModelApprovalStatus')}; "
                              "production serves only Approved versions (nothing was changed)")
        container = ((package.get("InferenceSpecification") or {}).get("Containers") or [{}])[0]
        if not container.get("Image"):
            raise DeployError(f"{model.name} names no serving image in its InferenceSpecification")
        data_url = self.registry_copy(model)
        resource = self.resource_name(name, model, container["Image"], stage)
        capture = self.capture_config(name, stage, data_url)
        existing = self._describe(name)
        if existing is not None:
            pending = (existing.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
            if existing.get("EndpointStatus") != "InService":
                if resource in (pending, existing.get("EndpointConfigName")):
                    raise NoChange(f"it is switching to {model.name} already ({existing.get('EndpointStatus')})")
                raise DeployError(f"endpoint {name} is {existing.get('EndpointStatus')}; deploy again "
                                  "when it is InService (nothing was changed)")
            if existing.get("EndpointConfigName") == resource:
                self._clear_flag(existing)  # serves it already: a flag on it is what was asked
                return
        tags = [{"Key": "invmon:model-package", "Value": model.arn},
                *cost_tags(model.group, STAGES[stage], model.run_id or "unknown")]
        environment = {**(container.get("Environment") or {}), PACKAGE_ENV: model.arn,
                       DIGEST_ENV: model.properties[DIGEST_PROPERTY]}
        def same_model(found: dict) -> bool:
            have = (found.get("Containers") or [found.get("PrimaryContainer") or {}])[0]
            return (have.get("ModelDataUrl"), have.get("Image"), found.get("ExecutionRoleArn")) == \
                (data_url, container["Image"], self.role_arn)

        fleet = self.scaling[stage].min_capacity  # a new endpoint starts at its minimum

        def same_config(found: dict) -> bool:
            variants = found.get("ProductionVariants") or [{}]
            return [(v.get("ModelName"), v.get("InstanceType"), v.get("InitialInstanceCount")) for v in variants] \
                == [(resource, self.instance_type, fleet)] and found.get("DataCaptureConfig") == capture

        made_model = self._create(
            self.sm.create_model, lambda **k: self._call(self.sm.describe_model, **k), "ModelName", resource,
            same_model, ExecutionRoleArn=self.role_arn, Tags=tags,
            # The artifact carries everything model_fn needs: the container needs no network.
            EnableNetworkIsolation=True,
            Containers=[{"Image": container["Image"], "ModelDataUrl": data_url, "Environment": environment}])
        made_config = self._create(
            self.sm.create_endpoint_config, lambda **k: self._call(self.sm.describe_endpoint_config, **k),
            "EndpointConfigName", resource, same_config, Tags=tags, DataCaptureConfig=capture,
            ProductionVariants=[{"VariantName": VARIANT, "ModelName": resource, "InitialInstanceCount": fleet,
                                 "InstanceType": self.instance_type}])
        if recheck and (problem := recheck()):
            self._delete(resource if made_model else None, resource if made_config else None)
            raise NoChange(f"not switched: {problem}")
        self._switch(name, resource, existing, tags, stage)
        if existing is not None:
            self._clear_flag(existing)
        if stage == "prod" and recheck and (problem := recheck()):  # rejected while it switched
            flag = f"switched to {model.name} while it stopped being deployable ({problem})"
            self.flag(name, flag)
            raise DeployError(f"{name} {flag}; it is flagged: run `invmon models reject {model.version}` "
                              "when the update ends to roll it back")

    def _switch(self, name: str, config: str, existing: dict | None, tags: list[dict], stage: str) -> None:
        """Create the endpoint or update it blue/green; a second delivery racing the first finds
        the switch made or under way, which is success (NoChange), never a failed invocation.
        The endpoint's cost tags follow the version it switches to.

        An update keeps the fleet autoscaling grew (RetainAllVariantProperties: the new config's
        count is a new endpoint's start, or a fleet below the stage's minimum) and takes the new
        config's DataCaptureConfig. SageMaker refuses to change the instance type of a scaled
        variant, so then the scaling goes first; the InService event applies it again."""
        try:
            if existing is None:
                self._call(self.sm.create_endpoint, EndpointName=name, EndpointConfigName=config, Tags=tags)
            else:
                if self._instance_type(existing["EndpointConfigName"]) != self.instance_type:
                    self.drop_scaling(name)
                running = (existing.get("ProductionVariants") or [{}])[0].get("DesiredInstanceCount") or 0
                keep_count = running >= self.scaling[stage].min_capacity
                self._call(self.sm.update_endpoint, EndpointName=name, EndpointConfigName=config,
                           DeploymentConfig=self.deployment_config(name, stage), RetainAllVariantProperties=True,
                           ExcludeRetainedVariantProperties=[{"VariantPropertyType": "DataCaptureConfig"}] + (
                               [] if keep_count else [{"VariantPropertyType": "DesiredInstanceCount"}]))
                try:  # bookkeeping: a tag that cannot be written never fails a switch that was made
                    self._call(self.sm.add_tags, ResourceArn=existing["EndpointArn"], Tags=tags)
                except DeployError:
                    pass
        except DeployError as exc:
            if not any(text in str(exc) for text in ALREADY_EXISTS + IN_PROGRESS):
                raise
            now = self._describe(name) or {}
            targets = (now.get("EndpointConfigName"), (now.get("PendingDeploymentSummary") or {}).get("EndpointConfigName"))
            if config in targets:
                raise NoChange(f"another delivery is switching it to {config} already") from None
            raise

    def _clear_flag(self, endpoint: dict) -> None:
        if any(t["Key"] == FLAG_TAG for t in
               self._call(self.sm.list_tags, ResourceArn=endpoint["EndpointArn"]).get("Tags", [])):
            self._call(self.sm.delete_tags, ResourceArn=endpoint["EndpointArn"], TagKeys=[FLAG_TAG])

    def flag(self, name: str, text: str) -> None:
        endpoint = self._describe(name)
        if endpoint is None:
            raise DeployError(f"no endpoint {name}")
        value = re.sub(r"[^\w .:/=+\-@]", " ", text)[:256]  # the characters a tag value may hold
        self._call(self.sm.add_tags, ResourceArn=endpoint["EndpointArn"],
                   Tags=[{"Key": FLAG_TAG, "Value": value}])

    def endpoints(self, group: str) -> list[Endpoint]:
        return [e for e in (self.current(endpoint_name(group, s)) for s in STAGES) if e]

    # ------------------------------------------------------------------ scaling

    def _instance_type(self, config_name: str) -> str:
        config = self._call(self.sm.describe_endpoint_config, EndpointConfigName=config_name)
        return (config.get("ProductionVariants") or [{}])[0].get("InstanceType", "")

    def apply_scaling(self, name: str, stage: str) -> str:
        """Register the endpoint's variant with Application Auto Scaling (the stage's minimum and
        maximum) and put its target tracking policy on invocations per instance; both calls set
        the same values when made again. SageMaker scales only an InService endpoint, so the
        deploy function applies it on the endpoint's InService event, whoever deployed it."""
        endpoint = self._describe(name)
        status = (endpoint or {}).get("EndpointStatus", "absent")
        if status != "InService":
            return f"{name} is {status}: its scaling is applied when it is InService"
        scaling, resource = self.scaling[stage], scaling_resource(name)
        self._call(self.autoscaling.register_scalable_target, ServiceNamespace="sagemaker",
                   ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
                   MinCapacity=scaling.min_capacity, MaxCapacity=scaling.max_capacity)
        self._call(self.autoscaling.put_scaling_policy, PolicyName=scaling_policy_name(name),
                   ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
                   PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration={
                       "TargetValue": float(scaling.invocations_per_instance),
                       "PredefinedMetricSpecification": {
                           "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                       "ScaleInCooldown": SCALE_IN_COOLDOWN, "ScaleOutCooldown": SCALE_OUT_COOLDOWN})
        return (f"{name} scales between {scaling.min_capacity} and {scaling.max_capacity} instances at "
                f"{scaling.invocations_per_instance} invocations a minute per instance")

    def drop_scaling(self, name: str) -> None:
        """Deregister the variant (its policy goes with it), where it is registered."""
        resource = scaling_resource(name)
        found = self._call(self.autoscaling.describe_scalable_targets, ServiceNamespace="sagemaker",
                           ResourceIds=[resource], ScalableDimension=SCALABLE_DIMENSION)
        if found.get("ScalableTargets"):
            self._call(self.autoscaling.deregister_scalable_target, ServiceNamespace="sagemaker",
                       ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION)

    # ------------------------------------------------------------------ clean-up

    def _in_use(self, group: str) -> tuple[set[str], set[str]]:
        """The endpoint configs the group's two endpoints use or switch to, and their models."""
        configs: set[str] = set()
        for stage in STAGES:
            endpoint = self._describe(endpoint_name(group, stage)) or {}
            configs |= {endpoint.get("EndpointConfigName"),
                        (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")}
        configs.discard(None)
        models = set()
        for config in configs:
            try:
                models |= set(_models_of(self._call(self.sm.describe_endpoint_config, EndpointConfigName=config)))
            except DeployError as exc:  # unknown is not "unused": nothing is deleted
                raise DeployError(f"what {config} serves could not be read ({exc}); nothing was deleted") from None
        return configs, models

    def _tags(self, arn: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self._call(self.sm.list_tags, ResourceArn=arn).get("Tags", [])}

    def _candidates(self, name: str) -> list[dict]:
        """The endpoint configs named for `name`: the deploy code's `<name[:38]>-v<version>-...` and
        the pipeline's staging Deploy's `<name>-<execution id>`, oldest first."""
        found, token = [], None
        while True:
            page = self._call(self.sm.list_endpoint_configs, NameContains=name[:38], MaxResults=100,
                              **({"NextToken": token} if token else {}))
            found += [c for c in page.get("EndpointConfigs", [])
                      if c["EndpointConfigName"].startswith((f"{name}-", f"{name[:38]}-v"))]
            token = page.get("NextToken")
            if not token:
                return sorted(found, key=lambda c: (c["CreationTime"], c["EndpointConfigName"]))

    def prune(self, name: str, group: str, stage: str, dry_run: bool = False) -> Pruned:
        """Delete this endpoint's older Models and EndpointConfigs: all but the config it uses,
        the one an update in progress switches to, and the newest one of another version (the
        previous version's, for a rollback). Only what carries this group's and stage's tags is
        touched (the deploy role may delete nothing else), and what either of the group's
        endpoints uses or switches to is read again right before anything is deleted. A later
        deploy of a deleted version makes them again from its verified copy under registry/."""
        result = Pruned(name)
        endpoint = self._describe(name)
        if endpoint is None:
            result.note = "no such endpoint: nothing is pruned (what it would keep cannot be told)"
            return result
        current = endpoint["EndpointConfigName"]
        pending = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        own, described = [], {}
        for summary in self._candidates(name):
            config = summary["EndpointConfigName"]
            tags = self._tags(summary["EndpointConfigArn"])
            if (tags.get(GROUP_TAG), tags.get(STAGE_TAG)) != (group, STAGES[stage]):
                if config not in (current, pending):
                    result.left.append((config, f"not tagged {GROUP_TAG}={group}, {STAGE_TAG}={STAGES[stage]}"))
                continue
            own.append(config)
            described[config] = self._call(self.sm.describe_endpoint_config, EndpointConfigName=config)
        for config in (current, pending):  # kept whoever made them; their models with them
            if config and config not in described:
                described[config] = self._call(self.sm.describe_endpoint_config, EndpointConfigName=config)
        models: dict[str, dict | None] = {}

        def model(model_name: str) -> dict | None:
            if model_name not in models:
                try:
                    models[model_name] = self._call(self.sm.describe_model, ModelName=model_name)
                except DeployError:
                    models[model_name] = None  # gone already, or unreadable: left alone
            return models[model_name]

        def version_of(config: str) -> str:  # configs of an unknown version count as their own
            found = [model(m) for m in _models_of(described[config])]
            arns = [(_container(m).get("Environment") or {}).get(PACKAGE_ENV, "") for m in found if m]
            matched = PACKAGE_ARN.search(arns[0]) if len(arns) == 1 else None
            return f"version {matched['version']}" if matched else config

        others = [c for c in own if c not in (current, pending) and version_of(c) != version_of(current)]
        previous = others[-1] if others else None  # the newest: what was served before, or tried
        result.kept = [(c, why) for c, why in ((current, f"current, {version_of(current)}"),
                                               (pending, "an update in progress switches to it"),
                                               (previous, f"previous, {version_of(previous) if previous else ''}"))
                       if c]
        doomed = [c for c in own if c not in (current, pending, previous)]
        keep_models = {m for c in (current, pending, previous) if c in described for m in _models_of(described[c])}
        for config in doomed:
            for model_name in _models_of(described[config]):
                found = model(model_name)
                if model_name in keep_models or model_name in result.models:
                    continue
                if found is None:
                    result.left.append((model_name, "could not be read"))
                elif self._tags(found["ModelArn"]).get(GROUP_TAG) != group:
                    result.left.append((model_name, f"not tagged {GROUP_TAG}={group}"))
                else:
                    result.models.append(model_name)
        result.configs = doomed
        if dry_run or not (doomed or result.models):
            return result
        in_use, used_models = self._in_use(group)  # read again: a deploy may have started since
        for kind, names, used, delete in (
                ("endpoint config", result.configs, in_use, lambda n: self._call(
                    self.sm.delete_endpoint_config, EndpointConfigName=n)),
                ("model", result.models, used_models, lambda n: self._call(self.sm.delete_model, ModelName=n))):
            for item in list(names):
                if item in used:
                    names.remove(item)
                    result.left.append((item, "an endpoint uses it or switches to it now"))
                    continue
                try:
                    delete(item)
                except DeployError as exc:
                    names.remove(item)
                    result.errors.append(f"{kind} {item}: {exc}")
        return result


def _models_of(config: dict) -> list[str]:
    return [v["ModelName"] for v in config.get("ProductionVariants") or [] if v.get("ModelName")]


def _container(model: dict) -> dict:
    return (model.get("Containers") or [model.get("PrimaryContainer") or {}])[0]


def scaling_resource(name: str) -> str:
    """Application Auto Scaling's ResourceId of an endpoint's variant."""
    return f"endpoint/{name}/variant/{VARIANT}"


def scaling_policy_name(name: str) -> str:
    return f"{name}-invocations-per-instance"


SCALE_IN_COOLDOWN, SCALE_OUT_COOLDOWN = 300, 60  # seconds: out fast, in slowly


def sagemaker_target(sm, role_arn: str | None = None, instance_type: str | None = None) -> SageMakerTarget:
    """A SageMakerTarget configured from arguments or the environment (CLI and Lambda)."""
    prod = os.environ.get("INVMON_CAPTURE_PERCENT_PROD", "").strip()
    if prod and not (prod.isdigit() and 0 <= int(prod) <= 100):
        raise DeployError(f"INVMON_CAPTURE_PERCENT_PROD={prod!r}: give a whole percentage, 0-100")
    rollout, scaling = rollout_settings()
    return SageMakerTarget(sm, role_arn or os.environ.get("INVMON_MODEL_ROLE_ARN", ""),
                           instance_type or os.environ.get("INVMON_INSTANCE_TYPE", "ml.m5.large"),
                           capture_percent={"prod": int(prod)} if prod else None,
                           rollout=rollout, scaling=scaling)


# --------------------------------------------------------------------------- Lambda


def handler(event: dict, context=None) -> dict:
    """The deploy function, invoked by EventBridge for this group (infra/invmon.yaml). Events may
    come twice, late or out of order, so each is only a hint to look again:
    - "SageMaker Model Package State Change", Approved: deploy that version to production if it
      is, now, the newest Approved version (re-checked right before traffic switches); otherwise
      change nothing and say why. A version whose staging smoke test did not pass (and has no
      operator's override) is refused: nothing changes, the deploy-failed alert says why, and the
      result's `refused` does too. Rejected: if production serves that version (a reject in the
      console, say), roll it back to the newest other Approved version that passed, or flag it.
    - "SageMaker Endpoint State Change" of <group>-staging or <group>-production to IN_SERVICE,
      whoever deployed it (an approval, the pipeline's staging Deploy, a deploy by hand): if it is
      InService now, apply its scaling and delete its older Models and EndpointConfigs.
    Anything else is ignored (the rules already filter; this is the second lock). A failed deploy
    raises: the invocation fails, its error is logged and the function's error alarm fires."""
    group = os.environ["INVMON_MODEL_PACKAGE_GROUP"]
    kind = event.get("detail-type")
    if event.get("source") != "aws.sagemaker" or kind not in (EVENT_TYPE, ENDPOINT_EVENT_TYPE):
        result = {"deployed": False, "ignored": f"not a model package or endpoint state change ({kind!r})"}
    elif kind == EVENT_TYPE:
        result = _on_package_event(group, event)
    else:
        result = _on_endpoint_event(group, event)
    print(json.dumps(result))  # CloudWatch Logs
    return result


def _function_target(event: dict) -> tuple:
    from pipeline.sagemaker.clients import client, resolve_region

    sm = client("sagemaker", resolve_region(event.get("region")))
    return sm, sagemaker_target(sm)


def _on_package_event(group: str, event: dict) -> dict:
    from pipeline.registry.sagemaker import SageMakerRegistry

    detail = event.get("detail") or {}
    status = detail.get("ModelApprovalStatus")
    if detail.get("ModelPackageGroupName") != group:
        return {"deployed": False, "ignored": f"group {detail.get('ModelPackageGroupName')!r} is not {group!r}"}
    if status not in ("Approved", "Rejected"):
        return {"deployed": False, "ignored": f"status {status!r} is neither Approved nor Rejected"}
    sm, target = _function_target(event)
    registry = SageMakerRegistry(sagemaker_client=sm)
    version = int(detail["ModelPackageVersion"])
    name = endpoint_name(group, "prod")
    if status == "Approved":
        outcome = deploy(registry, target, group, "prod", version, newest_only=True)
    else:
        model = registry.get(group, version)
        outcome = (roll_back_from(registry, target, model) if model.status == "Rejected" else
                   Outcome(name, model, None, False, f"{name} left as it is: {model.name} is {model.status} now"))
        outcome = outcome or Outcome(name, model, None, False,
                                     f"{name} left as it is: it does not serve {model.name}")
    result = {"deployed": outcome.changed, "endpoint": outcome.endpoint,
              "version": outcome.version.version, "message": outcome.message,
              "event": f"{group}/{version} {status}"}
    if outcome.refused:
        result["refused"] = outcome.refused
    if outcome.changed:
        result["rollout"] = outcome.rollout
        result["pruned"] = outcome.pruned.summary() if outcome.pruned else ""
    return result


def _on_endpoint_event(group: str, event: dict) -> dict:
    detail = event.get("detail") or {}
    name = detail.get("EndpointName")
    stage = next((s for s in STAGES if endpoint_name(group, s) == name), None)
    if stage is None:
        return {"deployed": False, "ignored": f"endpoint {name!r} is neither of {group}'s"}
    if detail.get("EndpointStatus") != "IN_SERVICE":
        return {"deployed": False, "ignored": f"{name} is {detail.get('EndpointStatus')!r}, not IN_SERVICE"}
    _, target = _function_target(event)
    scaling = target.apply_scaling(name, stage)  # reads the endpoint afresh; a failure raises
    pruned = tidy(target, name, group, stage)  # what it could not delete is logged; the next event retries
    return {"deployed": False, "endpoint": name, "scaling": scaling, "pruned": pruned.summary(),
            "errors": pruned.errors}
