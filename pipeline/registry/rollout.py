"""How an update moves an endpoint's traffic to the new version, and what rolls it back.

Production's update shifts traffic by canary or linear steps, staging's all at once (SageMaker's
blue/green deployment with guardrails); both roll back by themselves when one of the endpoint's
rollback alarms fires. The settings (production's rollout and each stage's scaling) come from the
deploy function's environment, which infra/invmon.yaml sets from the stack's parameters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.registry.scaling import CAPACITY, CAPACITY_ENV, INVOCATIONS_PER_INSTANCE, MAX_INSTANCES, Scaling
from pipeline.registry.stages import DeployError

# Staging's blue/green update: all traffic at once once the new fleet is up, then the old fleet is
# kept 10 minutes with the rollback alarms watched (SageMaker deployment guardrails).
BAKE_SECONDS = 600
# The rollback alarms infra/invmon.yaml creates for each stage endpoint, named <endpoint>-<suffix>.
ALARM_SUFFIXES = ("invocation-5xx", "model-latency-p99", "low-confidence")
# The share of answers given with low confidence, which the <endpoint>-low-confidence alarm reads
# (Average of a 0/1 value per answer, dimension EndpointName). Nothing publishes it yet: what a
# publisher must send is in docs/promotion.md (rollback alarms).
LOW_CONFIDENCE_NAMESPACE, LOW_CONFIDENCE_METRIC = "invmon/Endpoints", "LowConfidence"
ROLLOUT_MODES = ("CANARY", "LINEAR", "ALL_AT_ONCE")
PROVISION_SECONDS = 1800  # the new fleet's start, in the update's MaximumExecutionTimeoutInSeconds


def alarm_names(endpoint: str) -> list[str]:
    """The CloudWatch alarms infra/invmon.yaml creates for an endpoint (blue/green rollback)."""
    return [f"{endpoint}-{suffix}" for suffix in ALARM_SUFFIXES]


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


def deployment_config(rollout: Rollout, alarms: list[str]) -> dict:
    """UpdateEndpoint's blue/green DeploymentConfig: `rollout`'s traffic shifts, rolled back on
    any of `alarms`."""
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": rollout.traffic_routing(),
            "TerminationWaitInSeconds": rollout.termination_wait_seconds,
            "MaximumExecutionTimeoutInSeconds": rollout.timeout_seconds(),
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in alarms]},
    }


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
