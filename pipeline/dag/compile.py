"""The execution plan: what the local runner runs, derived from the step declarations.

The runner and the tuner read their wiring (dependencies, branches, metric regexes, ranges,
property files) from this plan, and tests/test_parity.py compares it with the SageMaker
definition JSON, so the two executors cannot drift apart unnoticed. Keys follow the SageMaker
API spelling where one exists (MetricDefinitions, ParameterRanges, PropertyFiles).
"""
from __future__ import annotations

from steps.base import (CategoricalRange, ConditionStep, ContinuousRange, Dag, DeployStep, FailStep, Param,
                        ProcessingStep, RegisterStep, TrainingStep, TuningStep, upstream)

STEP_TYPES = {
    ProcessingStep: "Processing",
    TuningStep: "Tuning",
    TrainingStep: "Training",
    ConditionStep: "Condition",
    RegisterStep: "RegisterModel",
    DeployStep: "Deploy",
    FailStep: "Fail",
}


def metric_definitions(step: TrainingStep) -> list[dict]:
    return [{"Name": m.name, "Regex": m.regex} for m in step.metric_definitions]


def bound(value) -> object:
    """A range bound as the definition spells it: a number as a string, a parameter as the
    expression that renders it as one when the execution starts."""
    if isinstance(value, Param):
        return {"Std:Join": {"On": "", "Values": [{"Get": f"Parameters.{value.name}"}]}}
    return str(value)


def parameter_ranges(step: TuningStep) -> dict:
    continuous = [
        {"Name": r.name, "MinValue": bound(r.min_value), "MaxValue": bound(r.max_value), "ScalingType": r.scaling}
        for r in step.ranges if isinstance(r, ContinuousRange)
    ]
    categorical = [
        {"Name": r.name, "Values": list(r.values)} for r in step.ranges if isinstance(r, CategoricalRange)
    ]
    return {"ContinuousParameterRanges": continuous, "CategoricalParameterRanges": categorical}


def plan_step(step) -> dict:
    entry: dict = {"name": step.name, "type": STEP_TYPES[type(step)], "depends_on": sorted(upstream(step))}
    if isinstance(step, TrainingStep):
        entry["metric_definitions"] = metric_definitions(step)
    if isinstance(step, TuningStep):
        entry["metric_definitions"] = metric_definitions(step.training)
        entry["hyperparameter_ranges"] = parameter_ranges(step)
        entry["objective"] = {"MetricName": step.objective_metric, "Type": step.objective_type}
        entry["strategy"] = step.strategy
        entry["early_stopping"] = step.early_stopping
    if isinstance(step, ProcessingStep):
        entry["property_files"] = [
            {"PropertyFileName": p.name, "OutputName": p.output, "FilePath": p.path}
            for p in step.property_files
        ]
    if isinstance(step, ConditionStep):
        entry["condition"] = {
            "left": {"step": step.left.step, "property_file": step.left.property_file,
                     "json_path": step.left.json_path},
            "right_parameter": step.right.name,
            "if_true": list(step.if_true),
            "if_false": list(step.if_false),
        }
    if isinstance(step, (ProcessingStep, TuningStep, TrainingStep)):
        entry["cache"] = getattr(step, "cache", False)
    return entry


def execution_plan(dag: Dag) -> dict:
    """The DAG as the local runner executes it, in declaration (topological) order."""
    names = set(dag.names)
    for step in dag.steps:
        missing = [d for d in upstream(step) if d not in names]
        if missing:
            raise ValueError(f"step {step.name} reads from unknown step(s) {missing}")
    return {"steps": [plan_step(step) for step in dag.steps]}


def gated_steps(dag: Dag) -> dict[str, tuple[str, bool]]:
    """step name -> (condition step, branch) for every step that runs only on one branch."""
    gates: dict[str, tuple[str, bool]] = {}
    for step in dag.steps:
        if isinstance(step, ConditionStep):
            gates.update({name: (step.name, True) for name in step.if_true})
            gates.update({name: (step.name, False) for name in step.if_false})
    return gates
