"""Parity: the SageMaker definition and the local runner's plan describe the same pipeline.

The plan is what pipeline/local executes (pipeline.dag.compile.execution_plan). Here the same
facts are read back out of the SageMaker definition JSON, with no help from steps/: the steps
and their data dependencies (from the Get references and DependsOn), the metric regexes,
hyperparameter ranges, tuning objective, property files, condition branches and caching. A
changed declaration must change both sides the same way.
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

import steps as declared
from aws_testing import default_offline_definition, offline_build
from pipeline.dag import profiles
from pipeline.dag.parameters import PARAMETERS
from steps.base import CategoricalRange, ContinuousRange, Dag, MetricDefinition, PropertyFile

# The local plan's step types, as they appear in the definition (Deploy is an Endpoint step
# with its "-Model" and "-EndpointConfig" helpers; see pipeline/sagemaker/definition.py).
SAGEMAKER_TYPE = {"Deploy": "Endpoint"}


def local_plan(dag: Dag) -> dict:
    from pipeline.dag.compile import execution_plan

    if len(inspect.signature(execution_plan).parameters) > 1:
        return execution_plan(dag, profiles.defaults("full"))
    return execution_plan(dag)


def _refs(obj, found: set):
    """Step names referenced by {"Get": "Steps.<name>...."} anywhere in obj."""
    if isinstance(obj, dict):
        ref = obj.get("Get")
        if isinstance(ref, str) and ref.startswith("Steps."):
            found.add(ref.split(".")[1])
        for value in obj.values():
            _refs(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _refs(value, found)
    return found


def sagemaker_plan(definition: dict, names: list[str]) -> dict[str, dict]:
    """The local plan's facts, read from the definition JSON; keyed by declared step name."""
    def declaration(step_name: str) -> str:
        return step_name if step_name in names else step_name.split("-")[0]

    flat: list[dict] = []

    def walk(items):
        for item in items:
            flat.append(item)
            if item["Type"] == "Condition":
                walk(item["Arguments"]["IfSteps"] + item["Arguments"]["ElseSteps"])

    walk(definition["Steps"])
    plan: dict[str, dict] = {}
    for step in flat:
        name = declaration(step["Name"])
        entry = plan.setdefault(name, {"name": name, "depends_on": set()})
        args = {k: v for k, v in step["Arguments"].items() if k not in ("IfSteps", "ElseSteps")}
        deps = _refs(args, set()) | {d if isinstance(d, str) else d["Step"] for d in step.get("DependsOn", [])}
        entry["depends_on"] |= {declaration(d) for d in deps} - {name}
        if step["Name"] != name:
            continue  # a helper step: it contributes its dependencies only
        entry["type"] = step["Type"]
        if step["Type"] in ("Processing", "Training", "Tuning"):
            entry["cache"] = bool(step.get("CacheConfig", {}).get("Enabled", False))
        if step["Type"] == "Processing":
            entry["property_files"] = step.get("PropertyFiles", [])
        if step["Type"] == "Training":
            entry["metric_definitions"] = args["AlgorithmSpecification"]["MetricDefinitions"]
        if step["Type"] == "Tuning":
            config = args["HyperParameterTuningJobConfig"]
            ranges = config["ParameterRanges"]
            entry["metric_definitions"] = args["TrainingJobDefinition"]["AlgorithmSpecification"]["MetricDefinitions"]
            entry["hyperparameter_ranges"] = {k: ranges.get(k, []) for k in
                                              ("ContinuousParameterRanges", "CategoricalParameterRanges")}
            assert not ranges.get("IntegerParameterRanges"), "the plan has no integer ranges"
            entry["objective"] = config["HyperParameterTuningJobObjective"]
            entry["strategy"] = config["Strategy"]
            entry["early_stopping"] = config["TrainingJobEarlyStoppingType"]
        if step["Type"] == "Condition":
            (condition,) = args["Conditions"]
            assert condition["Type"] == "GreaterThanOrEqualTo"
            json_get = condition["LeftValue"]["Std:JsonGet"]
            _, source, _, property_file = json_get["PropertyFile"]["Get"].split(".")
            entry["condition"] = {
                "left": {"step": source, "property_file": property_file, "json_path": json_get["Path"]},
                "right_parameter": condition["RightValue"]["Get"].removeprefix("Parameters."),
                "if_true": list(dict.fromkeys(declaration(s["Name"]) for s in step["Arguments"]["IfSteps"])),
                "if_false": list(dict.fromkeys(declaration(s["Name"]) for s in step["Arguments"]["ElseSteps"])),
            }
    for entry in plan.values():
        entry["depends_on"] = sorted(entry["depends_on"])
    return plan


def assert_same(local: dict, sagemaker: dict[str, dict]):
    local_steps = {s["name"]: s for s in local["steps"]}
    assert set(sagemaker) == set(local_steps)
    for name, expected in local_steps.items():
        got = sagemaker[name]
        assert got["type"] == SAGEMAKER_TYPE.get(expected["type"], expected["type"]), name
        assert got["depends_on"] == expected["depends_on"], name
        for key in ("metric_definitions", "hyperparameter_ranges", "objective", "strategy",
                    "early_stopping", "property_files", "condition", "cache"):
            if key in expected:
                assert got.get(key) == expected[key], f"{name}.{key}"
    # The local runner runs the declarations in order: every dependency comes first.
    order = [s["name"] for s in local["steps"]]
    for name, entry in sagemaker.items():
        assert all(order.index(d) < order.index(name) for d in entry["depends_on"]), name


def test_the_definition_and_the_local_plan_are_the_same_pipeline():
    definition = json.loads(default_offline_definition())
    assert_same(local_plan(declared.DAG), sagemaker_plan(definition, declared.DAG.names))
    # Both executors take their parameters from pipeline/dag/parameters.py.
    assert [p["Name"] for p in definition["Parameters"]] == [p.name for p in PARAMETERS]


def test_the_comparison_notices_a_difference():
    """The parity check itself can fail: a definition missing a dependency is caught."""
    definition = json.loads(default_offline_definition())
    train = next(s for s in definition["Steps"] if s["Name"] == "Train")
    for name in ("lr", "batch_size"):
        train["Arguments"]["HyperParameters"][name] = "0.01"  # no longer read from Tune
    with pytest.raises(AssertionError, match="Train"):
        assert_same(local_plan(declared.DAG), sagemaker_plan(definition, declared.DAG.names))


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
    local, sagemaker = local_plan(dag), sagemaker_plan(definition, dag.names)
    assert_same(local, sagemaker)

    original = sagemaker_plan(json.loads(default_offline_definition()), declared.DAG.names)
    assert sagemaker["Tune"]["hyperparameter_ranges"] == {
        "ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.0005", "MaxValue": "0.05",
                                       "ScalingType": "Linear"}],
        "CategoricalParameterRanges": [{"Name": "batch_size", "Values": ["16", "48"]}]}
    assert sagemaker["Tune"]["objective"] == {"Type": "Minimize", "MetricName": "validation:rmse"}
    for key, step in (("hyperparameter_ranges", "Tune"), ("objective", "Tune"),
                      ("metric_definitions", "Train"), ("property_files", "Evaluate"),
                      ("condition", "CheckAccuracy")):
        assert sagemaker[step][key] != original[step][key], f"{step}.{key} did not change"
    assert sagemaker["Train"]["metric_definitions"][2] == {
        "Name": "validation:accuracy", "Regex": "validation:accuracy: ([0-9.]+)"}
    assert sagemaker["Evaluate"]["property_files"][0]["FilePath"] == "reports/evaluation.json"
