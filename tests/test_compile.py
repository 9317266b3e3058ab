"""The compile stage: one resolver, one place per kind, and a new kind of step in one file.

The toy kind below is declared and registered here and nowhere else: a `Require` gate that
stops the run unless a metric reaches a parameter. The compile stage lowers it into a
condition and a fail step, and both executors run it unchanged: it is in the SageMaker
definition (and parity holds) and it gates a local run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import steps as declared
from aws_testing import all_steps, offline_build
from pipeline.cli import main
from pipeline.dag import compile as stage
from pipeline.dag import profiles
from request_parity import plan_differences
from steps.base import ConditionStep, Dag, FailStep, JsonGet, Param, StepOutput
from steps.check_accuracy import ACCURACY
from test_runner import new_run, setup, small_dag  # noqa: F401 (setup is a fixture)


@dataclass(frozen=True)
class Require:
    """Stop the run unless `metric` >= `at_least`; the steps in `then` run only if it holds."""

    name: str
    metric: JsonGet
    at_least: Param
    then: tuple[str, ...] = ()
    description: str = ""


def lower_require(gate: Require) -> tuple:
    failed = FailStep(f"{gate.name}Failed", message=(f"{gate.metric.json_path} ", gate.metric,
                                                      " is below ", gate.at_least))
    return (ConditionStep(gate.name, left=gate.metric, right=gate.at_least, if_true=gate.then,
                          if_false=(failed.name,), description=gate.description), failed)


@pytest.fixture
def require_kind():
    stage.register(Require, lower=lower_require)
    yield Require
    del stage.LOWERINGS[Require]


def test_a_new_kind_reaches_the_sagemaker_definition(require_kind, tmp_path):
    dag = Dag((*declared.DAG.steps, Require("AccuracyAtLeastThreshold", ACCURACY, Param("AccuracyThreshold"))))
    definition = offline_build(tmp_path, dag=dag)
    built = all_steps(definition)
    assert built["AccuracyAtLeastThreshold"]["Type"] == "Condition"
    gate = next(s for s in definition["Steps"] if s["Name"] == "AccuracyAtLeastThreshold")
    assert [s["Name"] for s in gate["Arguments"]["ElseSteps"]] == ["AccuracyAtLeastThresholdFailed"]
    requests = stage.plan(dag, profiles.defaults("full"))["Steps"]
    assert plan_differences(requests, definition) == []


def test_a_new_kind_gates_a_local_run(require_kind, setup):
    accuracy = JsonGet("Evaluate", "EvaluationReport", "multiclass_classification_metrics.accuracy.value")
    tmp_path = setup[0]
    base = small_dag(tmp_path / "scripts")
    steps = list(base.steps)
    steps.insert(base.names.index("Check"), Require("AccuracyFloor", accuracy, Param("Floor")))
    dag = Dag(tuple(steps))

    passed = new_run(setup, dag, Floor=0.5).execute()  # accuracy is 10 x Lr = 0.6
    assert passed["status"] == "Succeeded", passed["failure"]
    assert passed["steps"]["AccuracyFloor"]["properties"]["outcome"] is True
    assert passed["steps"]["AccuracyFloorFailed"]["status"] == "Skipped"

    stopped = new_run(setup, dag, Floor=0.9).execute()
    assert stopped["status"] == "Failed"
    assert stopped["failure"] == ("AccuracyFloorFailed: multiclass_classification_metrics.accuracy.value "
                                  "0.6 is below 0.9")
    assert stopped["steps"]["Register"]["status"] == "Pending"  # the run stopped at the gate


def test_every_kind_is_compiled_in_one_place():
    requests = stage.compile_dag(declared.DAG, profiles.defaults("full"))
    assert {type(r.declaration) for r in requests} <= set(stage.KINDS)
    by_name = {r.name: r for r in requests}
    # Dependencies come from the placeholders of the request itself.
    assert by_name["Train"].depends_on == ["Preprocess", "Tune"]
    assert by_name["Deploy"].depends_on == ["Register"]
    assert by_name["AccuracyTooLow"].gate == ("CheckAccuracy", False)
    # The cache rule: declared, and never for a step that reads the registry.
    assert (by_name["Preprocess"].cache, by_name["Tune"].cache, by_name["Evaluate"].cache) == (True, True, False)


def test_a_declaration_of_no_known_kind_is_refused():
    @dataclass(frozen=True)
    class Unknown:
        name: str
        description: str = ""

    with pytest.raises(stage.CompileError, match="no compiler for Unknown Mystery"):
        stage.compile_dag(Dag((Unknown("Mystery"),)), {})


def test_a_reference_to_a_later_or_unknown_step_is_refused():
    evaluate = declared.DAG["Evaluate"]
    backwards = Dag((evaluate, *[s for s in declared.DAG.steps if s.name != "Evaluate"]))
    with pytest.raises(stage.CompileError, match="Evaluate reads from .*declared after it"):
        stage.compile_dag(backwards, profiles.defaults("full"))
    dangling = FailStep("Oops", message=(JsonGet("Nowhere", "X", "a"),))
    with pytest.raises(stage.CompileError, match="unknown step Nowhere"):
        stage.compile_dag(Dag((dangling,)), {})
    with pytest.raises(stage.CompileError, match="has no output 'weights'"):
        stage.Compiler(declared.DAG, {}, {}).output(StepOutput("Train", "weights"))


def test_the_resolver_renders_values_as_sagemaker_does():
    resolve = stage.Resolver({"On": True, "N": 3, "Name": "x"},
                             lambda ref: {"Steps.E.PropertyFiles.R": {"a": {"b": 0.5}}}[ref], "exec-1")
    assert resolve(stage.join([{"Get": "Parameters.On"}, "-", {"Get": "Parameters.N"}])) == "true-3"
    assert resolve({"Std:JsonGet": {"PropertyFile": {"Get": "Steps.E.PropertyFiles.R"}, "Path": "a.b"}}) == 0.5
    assert resolve(stage.join(["s3:/", {"Get": "Execution.PipelineExecutionId"}], "/")) == "s3://exec-1"
    with pytest.raises(stage.CompileError, match="no value for parameter Missing"):
        resolve({"Get": "Parameters.Missing"})


def test_invmon_plan_prints_the_compiled_requests(capsys):
    assert main(["plan", "--recipe", "local", "--param", "Epochs=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    train = next(s for s in printed["Steps"] if s["Name"] == "Train")
    assert train["Arguments"]["HyperParameters"]["epochs"] == {"Std:Join": {"On": "", "Values": [
        {"Get": "Parameters.Epochs"}]}}
    assert printed["Parameters"]["Epochs"] == 3
    assert [s["Type"] for s in printed["Steps"]] == ["Processing", "Tuning", "Training", "Processing",
                                                     "Condition", "RegisterModel", "Endpoint", "Processing",
                                                     "Condition", "Fail", "Fail"]
    assert main(["plan", "--param", "Epochs=zero"]) == 2
    assert "Epochs" in capsys.readouterr().err
