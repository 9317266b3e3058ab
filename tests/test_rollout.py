"""Production's rollout, each endpoint's autoscaling and the clean-up of old Models and
EndpointConfigs, on SageMaker under moto and on the local back-end.

moto has no UpdateEndpoint: the request is recorded (test_deploy_aws.Updates), checked against
botocore's service model of UpdateEndpoint (types, required members, enums and integer ranges)
and applied to moto's endpoint. Application Auto Scaling is moto's own.
"""
from __future__ import annotations

import json

import pytest

from aws_testing import REGION
from pipeline.registry import deploy
from pipeline.registry.rollout import BAKE_SECONDS, rollout_settings
from pipeline.sagemaker import clients
from test_deploy_aws import EVENTS, GROUP, approve, deliver, event, resources, run
from test_deploy_aws import sm, updates  # noqa: F401 (fixtures)

ALARMS = ["bin-count-production-invocation-5xx", "bin-count-production-model-latency-p99",
          "bin-count-production-low-confidence"]


@pytest.fixture(autouse=True)
def home(invmon_home):
    """Alerts of these deploys go to a notifications log of this test's own."""
    return invmon_home


def conforms(value, shape, path: str = "") -> list[str]:
    """What in `value` breaks botocore's model of `shape`: unknown or missing members, enums, and
    the min/max of integers, strings and lists (botocore's own validation leaves out max)."""
    problems = []
    meta = shape.metadata
    if shape.type_name == "structure":
        problems += [f"{path}.{m} is required" for m in shape.required_members if m not in value]
        for key, item in value.items():
            if key not in shape.members:
                problems.append(f"{path}.{key} is not in the model")
            else:
                problems += conforms(item, shape.members[key], f"{path}.{key}")
    elif shape.type_name == "list":
        if not meta.get("min", 0) <= len(value) <= meta.get("max", len(value)):
            problems.append(f"{path} has {len(value)} items, not {meta.get('min')}-{meta.get('max')}")
        for i, item in enumerate(value):
            problems += conforms(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "integer":
        if not (isinstance(value, int) and meta.get("min", value) <= value <= meta.get("max", value)):
            problems.append(f"{path}={value!r} is outside {meta.get('min')}-{meta.get('max')}")
    elif shape.type_name == "string":
        if shape.enum and value not in shape.enum:
            problems.append(f"{path}={value!r} is not one of {shape.enum}")
        if not meta.get("min", 0) <= len(value) <= meta.get("max", len(value)):
            problems.append(f"{path} has {len(value)} characters")
    return problems


def update_endpoint_model():
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker").operation_model("UpdateEndpoint").input_shape


def test_the_checker_catches_what_the_service_model_refuses():
    shape = update_endpoint_model()
    good = {"EndpointName": "e", "EndpointConfigName": "c", "DeploymentConfig": {"BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {"Type": "CANARY", "WaitIntervalInSeconds": 600,
                                        "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}}}}}
    assert conforms(good, shape) == []
    routing = good["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    for change, problem in (({"WaitIntervalInSeconds": 3601}, "WaitIntervalInSeconds=3601 is outside 0-3600"),
                            ({"Type": "BLUE"}, "Type='BLUE' is not one of"),
                            ({"CanarySize": {"Value": 10}}, "CanarySize.Type is required")):
        assert any(problem in p for p in conforms(
            {**good, "DeploymentConfig": {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {
                **routing, **change}}}}, shape)), change


def two_deploys(capsys, stage: str = "prod") -> str:
    """Deploy version 1, then version 2 (an update): the second deploy's output."""
    assert run(capsys, "deploy", "--stage", stage, "--version", "1", "--backend", "aws")[0] == 0
    code, out, err = run(capsys, "deploy", "--stage", stage, "--version", "2", "--backend", "aws")
    assert code == 0, err
    return out


def test_production_rolls_out_by_canary_and_rolls_back_on_three_alarms(sm, capsys, updates):
    approve(sm, 1, 2)
    first = run(capsys, "deploy", "--stage", "prod", "--version", "1", "--backend", "aws")[1]
    assert "rollout: new endpoint: it takes all traffic once InService" in first
    code, out, err = run(capsys, "deploy", "--stage", "prod", "--version", "2", "--backend", "aws")
    assert code == 0, err
    (request,) = updates
    assert conforms(request, update_endpoint_model()) == []
    policy = request["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"] == {
        "Type": "CANARY", "WaitIntervalInSeconds": 600, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}}
    assert policy["TerminationWaitInSeconds"] == 600
    # The deployment may take the new fleet's start, the canary's bake and the old fleet's wait.
    assert policy["MaximumExecutionTimeoutInSeconds"] >= 600 + 600 + 1800
    assert request["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": a} for a in ALARMS]}
    # The fleet autoscaling grew is kept; the capture settings are the new config's.
    assert request["RetainAllVariantProperties"] is True
    assert request["ExcludeRetainedVariantProperties"] == [{"VariantPropertyType": "DataCaptureConfig"}]
    assert (f"rollout: 10% for 10 min, then 100%; old fleet kept 10 min; roll back on: {', '.join(ALARMS)}"
            in out.splitlines())
    # A new production endpoint starts with its minimum fleet: two instances, so a canary can be one.
    config = sm.describe_endpoint_config(EndpointConfigName=request["EndpointConfigName"])
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 2


def test_linear_steps_and_waits_come_from_the_stacks_parameters(sm, capsys, updates, monkeypatch):
    approve(sm, 1, 2)
    for name, value in (("INVMON_ROLLOUT_MODE", "LINEAR"), ("INVMON_ROLLOUT_PERCENT", "25"),
                        ("INVMON_ROLLOUT_WAIT_SECONDS", "300"), ("INVMON_ROLLOUT_TERMINATION_WAIT_SECONDS", "90")):
        monkeypatch.setenv(name, value)
    out = two_deploys(capsys)
    (request,) = updates
    assert conforms(request, update_endpoint_model()) == []
    policy = request["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"] == {
        "Type": "LINEAR", "WaitIntervalInSeconds": 300, "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25}}
    assert policy["TerminationWaitInSeconds"] == 90
    assert policy["MaximumExecutionTimeoutInSeconds"] >= 3 * 300 + 90 + 1800
    assert ("rollout: 25% for 5 min, 50% for 5 min, 75% for 5 min, then 100%; old fleet kept 90 s; "
            f"roll back on: {', '.join(ALARMS)}") in out.splitlines()


def test_staging_keeps_all_at_once(sm, capsys, updates):
    out = two_deploys(capsys, "staging")  # staging takes a version of any status
    (request,) = updates
    assert conforms(request, update_endpoint_model()) == []
    policy = request["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"] == {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    assert policy["TerminationWaitInSeconds"] == BAKE_SECONDS
    staging = [a.replace("production", "staging") for a in ALARMS]
    assert request["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": a} for a in staging]}
    assert f"rollout: 100% at once; old fleet kept 10 min; roll back on: {', '.join(staging)}" in out.splitlines()
    config = sm.describe_endpoint_config(EndpointConfigName=request["EndpointConfigName"])
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 1


@pytest.mark.parametrize("settings, message", [
    ({"INVMON_ROLLOUT_MODE": "BLUE"}, "INVMON_ROLLOUT_MODE='BLUE': use one of CANARY, LINEAR, ALL_AT_ONCE"),
    ({"INVMON_ROLLOUT_MODE": "LINEAR", "INVMON_ROLLOUT_PERCENT": "5"},
     "INVMON_ROLLOUT_PERCENT='5': give a whole number, 10-50 (% of the new fleet's capacity a step)"),
    ({"INVMON_ROLLOUT_PERCENT": "60"}, "INVMON_ROLLOUT_PERCENT='60': give a whole number, 1-50"),
    ({"INVMON_ROLLOUT_WAIT_SECONDS": "1h"}, "INVMON_ROLLOUT_WAIT_SECONDS='1h': give a whole number, 0-3600"),
    ({"INVMON_MIN_CAPACITY_PROD": "1"}, "INVMON_ROLLOUT_MODE=CANARY needs a production fleet of at least 2 instances"),
    ({"INVMON_MIN_CAPACITY_STAGING": "3"}, "INVMON_MIN_CAPACITY_STAGING=3 is above INVMON_MAX_CAPACITY_STAGING=2"),
    ({"INVMON_ROLLOUT_MODE": "LINEAR", "INVMON_ROLLOUT_WAIT_SECONDS": "3600"},  # 9 steps of an hour
     "take longer than the 8 hours SageMaker gives a deployment"),
])
def test_a_bad_setting_is_one_line_and_changes_nothing(sm, capsys, updates, monkeypatch, settings, message):
    approve(sm, 2)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--backend", "aws")
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert resources(sm) == ([], [], [])


def test_one_instance_is_fine_all_at_once():
    rollout, scaling = rollout_settings({"INVMON_ROLLOUT_MODE": "ALL_AT_ONCE", "INVMON_MIN_CAPACITY_PROD": "1"})
    assert rollout.traffic_routing() == {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    assert scaling["prod"].min_capacity == 1


def test_the_local_deploy_prints_what_would_shift_when(invmon_home, tmp_path, capsys):
    from pipeline.registry.local import open_registry

    registry = open_registry(invmon_home)
    for n in (1, 2):
        artifact = tmp_path / f"m{n}" / "model.tar.gz"
        artifact.parent.mkdir()
        artifact.write_bytes(b"model %d" % n)
        registry.register(GROUP, str(artifact), {})
        registry.set_status(GROUP, n, "Approved")
    code, out, _ = run(capsys, "deploy", "--stage", "prod", "--version", "1")
    assert code == 0 and "new endpoint: it takes all traffic once InService" in out
    code, out, _ = run(capsys, "deploy", "--stage", "prod")
    assert code == 0
    assert out.splitlines() == [
        "bin-count-production now serves bin-count/2 (was version 1)",
        "rollout on SageMaker (this local record switched at once): 10% for 10 min, then 100%; "
        f"old fleet kept 10 min; roll back on: {', '.join(ALARMS)}"]
    code, out, _ = run(capsys, "endpoints", "--prune", "--dry-run")
    assert code == 0 and out.splitlines() == [
        "bin-count-staging: nothing to prune: a local endpoint is one record naming the version it serves (no record)",
        "bin-count-production: nothing to prune: a local endpoint is one record naming the version it serves (2)"]
    code, _, err = run(capsys, "endpoints", "--dry-run")
    assert code == 2 and "--dry-run goes with --prune" in err


# --------------------------------------------------------------------------- autoscaling


def scalable_targets() -> list[dict]:
    import boto3

    return clients.session(REGION).client("application-autoscaling").describe_scalable_targets(
        ServiceNamespace="sagemaker")["ScalableTargets"]


def scaling_policies() -> list[dict]:
    import boto3

    return clients.session(REGION).client("application-autoscaling").describe_scaling_policies(
        ServiceNamespace="sagemaker")["ScalingPolicies"]


def in_service(name: str = "bin-count-production", status: str = "IN_SERVICE") -> dict:
    made = json.loads((EVENTS / "endpoint_in_service.json").read_text())
    made["detail"].update(EndpointName=name, EndpointStatus=status)
    return made


def test_an_endpoint_in_service_gets_target_tracking_on_invocations_per_instance(sm, capsys, updates, monkeypatch):
    approve(sm, 1)
    monkeypatch.setenv("INVMON_MAX_CAPACITY_PROD", "6")  # the stack's ProductionMaxCapacity
    monkeypatch.setenv("INVMON_INVOCATIONS_PER_INSTANCE", "450")
    # Events that are not this group's endpoints coming InService change nothing.
    ignored = deliver(in_service("other-production"), in_service(status="UPDATING"), in_service("bin-count-staging"))
    assert [r.get("ignored", r.get("scaling")) for r in ignored] == [
        "endpoint 'other-production' is neither of bin-count's", "bin-count-production is 'UPDATING', not IN_SERVICE",
        "bin-count-staging is absent: its scaling is applied when it is InService"]
    assert scalable_targets() == []
    deliver(event(1))
    (result,) = deliver(in_service())
    assert result["scaling"] == ("bin-count-production scales between 2 and 6 instances at 450 invocations "
                                 "a minute per instance")
    (target,) = scalable_targets()
    assert (target["ResourceId"], target["ScalableDimension"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/bin-count-production/variant/AllTraffic", "sagemaker:variant:DesiredInstanceCount", 2, 6)
    (policy,) = scaling_policies()
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 450.0, "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        "ScaleInCooldown": 300, "ScaleOutCooldown": 60}
    deliver(in_service())  # delivered again: the same target and policy, not a second one
    assert len(scalable_targets()) == 1 and len(scaling_policies()) == 1


def test_staging_scales_within_its_own_bounds(sm, capsys, updates):
    assert run(capsys, "deploy", "--stage", "staging", "--version", "1", "--backend", "aws")[0] == 0
    (result,) = deliver(in_service("bin-count-staging"))
    assert result["scaling"].startswith("bin-count-staging scales between 1 and 2 instances")
    (target,) = scalable_targets()
    assert target["ResourceId"] == "endpoint/bin-count-staging/variant/AllTraffic"


@pytest.mark.slow
def test_a_new_instance_type_deregisters_the_scaling_before_the_update(sm, capsys, updates):
    """SageMaker refuses to change a scaled variant's instance type: the scaling goes first, and
    the endpoint's InService event puts it back."""
    approve(sm, 1)
    deliver(event(1))
    deliver(in_service())
    assert len(scalable_targets()) == 1
    approve(sm, 2)
    seen_at_update = []
    updates.after["UpdateEndpoint"] = lambda **_: seen_at_update.append(len(scalable_targets()))
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--version", "2", "--backend", "aws",
                       "--instance-type", "ml.c5.xlarge")
    assert code == 0, err
    assert seen_at_update == [0] and scalable_targets() == []
    deliver(in_service())
    assert len(scalable_targets()) == 1
    # The same instance type: the scaling stays through the update.
    approve(sm, 3)
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--version", "3", "--backend", "aws",
                       "--instance-type", "ml.c5.xlarge")
    assert code == 0, err
    assert seen_at_update == [0, 1] and len(scalable_targets()) == 1


# --------------------------------------------------------------------------- clean-up


def served(sm, name: str = "bin-count-production") -> dict[str, int]:
    """Each endpoint config of `name` and the version its model serves."""
    found = {}
    for config in sm.list_endpoint_configs()["EndpointConfigs"]:
        described = sm.describe_endpoint_config(EndpointConfigName=config["EndpointConfigName"])
        model = sm.describe_model(ModelName=described["ProductionVariants"][0]["ModelName"])
        arn = (model["Containers"][0].get("Environment") or {}).get("INVMON_MODEL_PACKAGE_ARN")
        if arn and config["EndpointConfigName"].startswith(name):
            found[config["EndpointConfigName"]] = int(arn.rsplit("/", 1)[1])
    return found


def test_a_deploy_keeps_exactly_the_current_and_the_previous_version(sm, capsys, updates):
    approve(sm, 1, 2, 3)
    for version in (1, 2):
        assert run(capsys, "deploy", "--stage", "prod", "--version", str(version), "--backend", "aws")[0] == 0
    assert sorted(served(sm).values()) == [1, 2]
    code, out, err = run(capsys, "deploy", "--stage", "prod", "--version", "3", "--backend", "aws")
    assert code == 0, err
    assert sorted(served(sm).values()) == [2, 3]
    models, configs, _ = resources(sm)
    assert sorted(models) == sorted(configs) == sorted(served(sm))  # the models went with their configs
    (line,) = [x for x in out.splitlines() if x.startswith("clean-up:")]
    assert line.startswith("clean-up: bin-count-production: deleted 1 endpoint config(s) and 1 model(s); kept ")
    assert "(current, version 3)" in line and "(previous, version 2)" in line
    # A rollback (reject 3) goes back to 2 and keeps 2 and, as the version served before, 3.
    code, out, _ = run(capsys, "models", "reject", "3", "--backend", "aws")
    assert code == 0 and "rolled back from Rejected version 3 to bin-count/2" in out
    assert sorted(served(sm).values()) == [2, 3]


def deploy_without_cleanup(sm, *versions: int) -> None:
    """Deploys that leave every Model and EndpointConfig behind (as before the clean-up existed)."""
    from pipeline.registry.sagemaker import SageMakerRegistry

    from pipeline.sagemaker.clients import client

    hooked = client("sagemaker", REGION)  # UpdateEndpoint as the updates fixture answers it
    target, registry = deploy.sagemaker_target(hooked), SageMakerRegistry(sagemaker_client=hooked)
    for version in versions:
        target.deploy("bin-count-production", registry.get(GROUP, version), "prod")


def test_prune_dry_run_lists_what_would_go_and_deletes_nothing(sm, capsys, updates):
    approve(sm, 1, 2, 3)
    deploy_without_cleanup(sm, 1, 2, 3)
    before = resources(sm)
    old = next(name for name, version in served(sm).items() if version == 1)
    code, out, err = run(capsys, "endpoints", "--prune", "--dry-run", "--backend", "aws")
    assert code == 0, err
    assert resources(sm) == before
    lines = out.splitlines()
    assert lines[0] == "bin-count-staging: no such endpoint: nothing is pruned (what it would keep cannot be told)"
    assert lines[1].startswith("bin-count-production: would delete 1 endpoint config(s) and 1 model(s); kept ")
    assert lines[2:] == [f"  would delete endpoint config {old}", f"  would delete model {old}"]
    code, out, _ = run(capsys, "endpoints", "--prune", "--dry-run", "--json", "--backend", "aws")
    staging, production = json.loads(out)
    assert production["dry_run"] and production["endpoint_configs"] == production["models"] == [old]
    assert [k["why"] for k in production["kept"]] == ["current, version 3", "previous, version 2"]
    assert staging["note"].startswith("no such endpoint")
    assert resources(sm) == before

    code, out, err = run(capsys, "endpoints", "--prune", "--backend", "aws")
    assert code == 0, err
    assert sorted(served(sm).values()) == [2, 3]
    assert f"  deleted endpoint config {old}" in out.splitlines()


def test_prune_never_deletes_what_an_update_in_progress_switches_to(sm, capsys, updates):
    approve(sm, 1, 2, 3)
    deploy_without_cleanup(sm, 1, 2)
    updates.hold = True
    deploy_without_cleanup(sm, 3)  # production is switching from 2 to 3
    versions = {version: name for name, version in served(sm).items()}
    code, out, err = run(capsys, "endpoints", "--prune", "--backend", "aws")
    assert code == 0, err
    # 2 is current, 3 the update's target, 1 the version before 2 (a rollback's): all kept.
    assert sorted(served(sm).values()) == [1, 2, 3]
    assert f"{versions[3]} (an update in progress switches to it)" in out
    updates.finish()
    updates.hold = False
    code, out, err = run(capsys, "endpoints", "--prune", "--backend", "aws")
    assert code == 0, err
    assert sorted(served(sm).values()) == [2, 3]


def test_prune_leaves_what_is_not_tagged_as_this_groups(sm, capsys, updates):
    """A config named like one of this endpoint's but made by someone else (another group's
    prefix, a hand-made one) is listed as left, never deleted: the deploy role could not anyway."""
    from test_deploy_aws import IMAGE, MODEL_ROLE

    approve(sm, 1, 2, 3)
    deploy_without_cleanup(sm, 1, 2, 3)
    sm.create_model(ModelName="bin-count-production-v9-planted", ExecutionRoleArn=MODEL_ROLE,
                    Containers=[{"Image": IMAGE}], Tags=[{"Key": "invmon:group", "Value": "bin-count-eu"}])
    sm.create_endpoint_config(EndpointConfigName="bin-count-production-v9-planted", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": "bin-count-production-v9-planted", "InitialInstanceCount": 1,
        "InstanceType": "ml.m5.large"}], Tags=[{"Key": "invmon:group", "Value": "bin-count-eu"},
                                               {"Key": "invmon:stage", "Value": "production"}])
    code, out, err = run(capsys, "endpoints", "--prune", "--backend", "aws")
    assert code == 0, err
    assert ("  left bin-count-production-v9-planted: not tagged invmon:group=bin-count, invmon:stage=production"
            in out.splitlines())
    assert "bin-count-production-v9-planted" in resources(sm)[0] and "bin-count-production-v9-planted" in resources(sm)[1]
    assert sorted(served(sm).values()) == [2, 3]
