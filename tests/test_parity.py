"""Parity: the SageMaker definition holds every compiled request, field for field.

pipeline/dag/compile.py compiles steps/ into requests (`invmon plan`); the SageMaker adapter
builds the definition from them and the local runner executes them. Here the built definition is
read back with no help from the compile stage (tests/request_parity.py): every field of every
request of all seven kinds is in it with the same value, and the steps' dependencies, branches,
caching and property files are the same. A changed declaration changes both sides.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest

import steps as declared
from aws_testing import BUCKET, all_steps, default_offline_definition, offline_build
from pipeline.dag import profiles
from pipeline.dag.compile import plan
from pipeline.dag.parameters import PARAMETERS
from request_parity import plan_differences
from steps.base import CategoricalRange, ContinuousRange, Dag, MetricDefinition, PropertyFile

KINDS = {"Processing", "Tuning", "Training", "Condition", "RegisterModel", "Endpoint", "Fail"}


def compiled(dag: Dag = declared.DAG, profile: str = "full") -> list[dict]:
    return plan(dag, profiles.defaults(profile))["Steps"]


def test_every_compiled_request_is_in_the_definition():
    requests = compiled()
    assert {r["Type"] for r in requests} == KINDS
    definition = json.loads(default_offline_definition())
    assert plan_differences(requests, definition) == []
    # Both executors take their parameters from pipeline/dag/parameters.py.
    assert [p["Name"] for p in definition["Parameters"]] == [p.name for p in PARAMETERS]


@pytest.mark.parametrize("change, expected", [
    (lambda s: s["Train"]["Arguments"]["HyperParameters"].update(lr="0.01"), "Train.HyperParameters.lr"),
    (lambda s: s["Evaluate"]["Arguments"]["AppSpecification"]["ContainerArguments"].pop(), "Evaluate.AppSpecification"),
    (lambda s: s["Deploy-Model"]["Arguments"].update(EnableNetworkIsolation=False), "Deploy-Model.EnableNetworkIsolation"),
    (lambda s: s["Deploy-EndpointConfig"]["Arguments"]["DataCaptureConfig"].update(InitialSamplingPercentage=5),
     "Deploy-EndpointConfig.DataCaptureConfig.InitialSamplingPercentage"),
    (lambda s: s["Deploy-EndpointConfig"]["Arguments"]["DataCaptureConfig"]["CaptureOptions"].pop(),
     "Deploy-EndpointConfig.DataCaptureConfig.CaptureOptions"),
    (lambda s: s["Deploy-EndpointConfig"]["Arguments"].pop("DataCaptureConfig"),
     "Deploy-EndpointConfig.DataCaptureConfig: not in the definition"),
    (lambda s: s["Register"]["Arguments"].update(ModelApprovalStatus="Approved"), "Register.ModelApprovalStatus"),
    (lambda s: s["AccuracyTooLow"]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"].pop(), "AccuracyTooLow.ErrorMessage"),
    (lambda s: s["CheckAccuracy"]["Arguments"]["Conditions"][0].update(Type="GreaterThan"), "CheckAccuracy.Conditions"),
    (lambda s: s["Tune"]["Arguments"]["HyperParameterTuningJobConfig"].update(Strategy="Random"), "Tune.HyperParameterTuningJobConfig.Strategy"),
    (lambda s: s["Preprocess"].pop("CacheConfig"), "Preprocess: cache"),
    (lambda s: s["SmokeTest"]["Arguments"]["AppSpecification"]["ContainerArguments"].pop(), "SmokeTest.AppSpecification"),
    (lambda s: s["CheckSmokeTest"]["Arguments"]["Conditions"][0].update(RightValue=0), "CheckSmokeTest.Conditions"),
    (lambda s: s["CheckSmokeTest"]["Arguments"]["ElseSteps"].clear(), "SmokeTestFailed"),
    (lambda s: s["SmokeTestFailed"]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"].pop(),
     "SmokeTestFailed.ErrorMessage"),
])
def test_the_comparison_notices_a_difference(change, expected):
    """The parity check itself can fail, on any kind of step."""
    definition = copy.deepcopy(json.loads(default_offline_definition()))
    change(all_steps(definition))
    found = plan_differences(compiled(), definition)
    assert found and all(expected in f for f in found), found


def changed_dag() -> Dag:
    dag = declared.DAG
    tune = dag["Tune"]
    tune = dataclasses.replace(tune, ranges=(ContinuousRange("lr", 0.0005, 0.05, scaling="Linear"),
                                             CategoricalRange("batch_size", ("16", "48"))),
                               objective_metric="validation:rmse", objective_type="Minimize")
    train = dag["Train"]
    metrics = tuple(MetricDefinition(m.name, m.regex.replace("=", ": ")) for m in train.metric_definitions)
    train = dataclasses.replace(train, metric_definitions=metrics)
    evaluate = dataclasses.replace(dag["Evaluate"], property_files=(
        PropertyFile("EvaluationReport", "evaluation", "reports/evaluation.json"),))
    check = dataclasses.replace(dag["CheckAccuracy"], left=dataclasses.replace(
        dag["CheckAccuracy"].left, json_path="multiclass_classification_metrics.weighted_accuracy.value"))
    replaced = {s.name: s for s in (tune, train, evaluate, check)}
    return Dag(tuple(replaced.get(s.name, s) for s in dag.steps))


def test_changing_a_declaration_changes_both(tmp_path):
    dag = changed_dag()
    definition = offline_build(tmp_path, dag=dag)
    requests = compiled(dag)
    assert plan_differences(requests, definition) == []
    original = {r["Name"]: r["Arguments"] for r in compiled()}
    changed = {r["Name"]: r["Arguments"] for r in requests}
    tune = all_steps(definition)["Tune"]["Arguments"]["HyperParameterTuningJobConfig"]
    assert tune["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "lr", "MinValue": "0.0005", "MaxValue": "0.05", "ScalingType": "Linear"}]
    assert tune["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "validation:rmse"}
    assert all_steps(definition)["Train"]["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"][2] == {
        "Name": "validation:accuracy", "Regex": "validation:accuracy: ([0-9.]+)"}
    assert all_steps(definition)["Evaluate"]["PropertyFiles"][0]["FilePath"] == "reports/evaluation.json"
    for step in ("Tune", "Train", "CheckAccuracy"):
        assert changed[step] != original[step], f"{step} did not change"


def test_the_staging_deploy_captures_what_it_serves_where_the_monitor_reads():
    """The pipeline's own staging endpoint captures every request and answer, with the settings
    of the deploy code's endpoints, under the same capture/<endpoint> prefix."""
    from pipeline.dag.compile import Resolver
    from pipeline.registry.capture import CAPTURE_PERCENT, capture_settings, capture_uri

    (deploy,) = [r for r in compiled() if r["Type"] == "Endpoint"]
    capture = deploy["Arguments"]["EndpointConfig"]["DataCaptureConfig"]
    assert capture == capture_settings(CAPTURE_PERCENT["staging"])
    assert capture["InitialSamplingPercentage"] == 100 and capture["EnableCapture"] is True
    assert capture["CaptureOptions"] == [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}]
    built = all_steps(json.loads(default_offline_definition()))["Deploy-EndpointConfig"]["Arguments"]
    # Where to is the executor's (as a job output's S3 URI is): the definition's bucket, and the
    # endpoint parameter, so an execution that names its group's endpoint captures to its prefix.
    destination = built["DataCaptureConfig"]["DestinationS3Uri"]
    for endpoint in ("bin-count-staging", "other-group-staging"):
        value = Resolver({"StagingEndpointName": endpoint}, lambda ref: None)(destination)
        assert value == capture_uri(BUCKET, endpoint) == f"s3://{BUCKET}/capture/{endpoint}"


def test_the_smoke_test_calls_what_deploy_updated_before_the_gate_is_passed():
    """SmokeTest runs in CheckAccuracy's branch after Deploy, on the endpoint Deploy updated and
    the package Register made, and its own condition (nested in that branch) stops the execution
    with the job's reason; on one instance, with the region boto3 needs."""
    definition = json.loads(default_offline_definition())
    steps = all_steps(definition)
    check = steps["CheckAccuracy"]["Arguments"]
    assert [s["Name"] for s in check["IfSteps"]][-2:] == ["SmokeTest", "CheckSmokeTest"]
    assert [s["Name"] for s in steps["CheckSmokeTest"]["Arguments"]["ElseSteps"]] == ["SmokeTestFailed"]
    assert "SmokeTest" not in [s["Name"] for s in definition["Steps"]]  # only inside the branch
    smoke = steps["SmokeTest"]["Arguments"]
    arguments = smoke["AppSpecification"]["ContainerArguments"]
    named = {arguments[i]: arguments[i + 1] for i in range(len(arguments) - 1) if isinstance(arguments[i], str)
             and arguments[i].startswith("--")}
    assert named["--endpoint-name"] == {"Get": "Steps.Deploy.EndpointName"}
    assert named["--model-package"] == {"Get": "Steps.Register.ModelPackageArn"}
    assert named["--model-data"] == {"Get": "Steps.Register.InferenceSpecification.Containers[0].ModelDataUrl"}
    assert named["--latency-ms"] == {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.SmokeLatencyMs"}]}}
    assert smoke["ProcessingResources"]["ClusterConfig"]["InstanceCount"] == 1
    assert smoke["Environment"]["AWS_DEFAULT_REGION"]
    (condition,) = steps["CheckSmokeTest"]["Arguments"]["Conditions"]
    assert condition["LeftValue"]["Std:JsonGet"]["Path"] == "passed" and condition["RightValue"] == 1
    assert steps["SmokeTest"]["PropertyFiles"] == [
        {"PropertyFileName": "SmokeReport", "OutputName": "smoke", "FilePath": "smoke.json"}]
