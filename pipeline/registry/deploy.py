"""Putting a model version on a stage's endpoint: the rules, and the deploy function's handler.

One module for `invmon deploy`, `invmon models approve/reject`, `invmon endpoints` and the
Lambda deploy function that the approval rule invokes (infra/), so the rules are written once.
Standard library and boto3 only: the Lambda runtime has boto3, not the SageMaker SDK.

The back-ends and what they do around a switch have modules of their own, beside this one:
stages.py (the stage endpoints, DeployError), local_target.py and sagemaker_target.py (the two
back-ends), artifacts.py (the digest check), rollout.py (traffic shifts and rollback alarms),
scaling.py (autoscaling), cleanup.py (old Models and EndpointConfigs), capture.py (data
capture) and labels.py (cost tags, the flag, the package a Model serves).

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
from dataclasses import dataclass

from pipeline.alerts import notify
from pipeline.registry.cleanup import Pruned, tidy
from pipeline.registry.local import Endpoint, ModelVersion, RegistryError
from pipeline.registry.rollout import rollout_settings
from pipeline.registry.sagemaker_target import SageMakerTarget
from pipeline.registry.smoke import production_problem
from pipeline.registry.stages import STAGES, DeployError, NoChange, endpoint_name

EVENT_TYPE = "SageMaker Model Package State Change"
ENDPOINT_EVENT_TYPE = "SageMaker Endpoint State Change"


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
