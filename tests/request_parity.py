"""Compare the job requests a local run made (requests.jsonl) with the SageMaker definition's.

The definition's values are pipeline expressions (`Get`, `Std:Join`, `Std:JsonGet`); they are
evaluated here with the run's own parameters and step properties, so that what the runner
passed to each script is checked against what SageMaker would pass, value for value. The only
mapping applied is the one the runner makes on purpose: an S3 dataset the step reads itself
(InputDataUrl) is handed to the local script as the folder it was mirrored to.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from aws_testing import all_steps

SDK_ADDED_INPUTS = {"code", "aux", "entrypoint"}  # FrameworkProcessor's own inputs
SDK_ADDED_CHANNELS = {"code", "sm_drivers"}  # ModelTrainer's own channels


class Resolver:
    """Evaluates definition expressions with a local run's parameters and step properties."""

    def __init__(self, state: dict, mapped: dict[str, str]):
        self.params = state["parameters"]
        self.steps = state["steps"]
        self.mapped = mapped  # parameter name -> the local value the runner substitutes

    def __call__(self, expr):
        if isinstance(expr, dict) and "Get" in expr:
            return self.get(expr["Get"])
        if isinstance(expr, dict) and "Std:Join" in expr:
            join = expr["Std:Join"]
            return join["On"].join(self.text(self(v)) for v in join["Values"])
        if isinstance(expr, dict) and "Std:JsonGet" in expr:
            ref = expr["Std:JsonGet"]
            step, _, name = ref["PropertyFile"]["Get"].split(".")[1:4]
            value = self.steps[step]["properties"][name]
            for key in ref["Path"].split("."):
                value = value[key]
            return value
        if isinstance(expr, list):
            return [self(v) for v in expr]
        if isinstance(expr, dict):
            return {k: self(v) for k, v in expr.items()}
        return expr

    def get(self, ref: str):
        if ref.startswith("Parameters."):
            name = ref.split(".", 1)[1]
            return self.mapped.get(name, self.params[name])
        match = re.fullmatch(r"Steps\.(\w+)\.BestTrainingJob\.TunedHyperParameters\['(\w+)'\]", ref)
        if match:
            return self.steps[match[1]]["properties"]["TunedHyperParameters"][match[2]]
        raise AssertionError(f"no local value for {ref}")

    @staticmethod
    def text(value) -> str:
        """How SageMaker renders a value inside Std:Join (a JSON number or a string)."""
        return json.dumps(value) if isinstance(value, bool) else str(value)


def strings(values) -> list[str]:
    return [v if isinstance(v, str) else Resolver.text(v) for v in values]


def hyperparameters(resolved: dict) -> dict[str, str]:
    """Hyperparameters as the script receives them, without the ones the SDK adds for itself."""
    return {k: v if isinstance(v, str) else Resolver.text(v)
            for k, v in resolved.items() if not k.startswith("sagemaker_")}


def differences(run_dir: Path, definition: dict, mapped: dict[str, str]) -> list[str]:
    """Every field where a recorded local request and the definition's request disagree."""
    state = json.loads((run_dir / "run.json").read_text())
    resolve = Resolver(state, mapped)
    steps = all_steps(definition)
    found: list[str] = []

    def check(step: str, field: str, local, remote) -> None:
        if local != remote:
            found.append(f"{step}.{field}: local {local!r} != definition {remote!r}")

    requests = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    for request in requests:
        name, kind = request["step"], request["Type"]
        args = steps[name]["Arguments"] if name in steps else None
        if args is None:
            found.append(f"{name}: the local run made a request the definition has no step for")
            continue
        if kind == "Processing":
            check(name, "ContainerArguments", request["ContainerArguments"],
                  strings(resolve(args["AppSpecification"]["ContainerArguments"])))
            remote_inputs = {i["InputName"]: i["S3Input"]["LocalPath"] for i in args["ProcessingInputs"]
                             if i["InputName"] not in SDK_ADDED_INPUTS}
            check(name, "ProcessingInputs", request["ProcessingInputs"], remote_inputs)
            remote_outputs = {o["OutputName"]: o["S3Output"]["LocalPath"]
                              for o in args["ProcessingOutputConfig"]["Outputs"]}
            check(name, "ProcessingOutputs", request["ProcessingOutputs"], remote_outputs)
        elif kind == "Training":
            check(name, "HyperParameters", request["HyperParameters"],
                  hyperparameters(resolve(args["HyperParameters"])))
            check(name, "MetricDefinitions", request["MetricDefinitions"],
                  args["AlgorithmSpecification"]["MetricDefinitions"])
            check(name, "Channels", request["Channels"],
                  sorted(c["ChannelName"] for c in args["InputDataConfig"]
                         if c["ChannelName"] not in SDK_ADDED_CHANNELS))
        elif kind == "Tuning":
            job = args["TrainingJobDefinition"]
            config = args["HyperParameterTuningJobConfig"]
            check(name, "StaticHyperParameters", request["StaticHyperParameters"],
                  hyperparameters(resolve(job["StaticHyperParameters"])))
            check(name, "MetricDefinitions", request["MetricDefinitions"],
                  job["AlgorithmSpecification"]["MetricDefinitions"])
            limits = resolve(config["ResourceLimits"])
            check(name, "MaxNumberOfTrainingJobs", request["MaxNumberOfTrainingJobs"], limits["MaxNumberOfTrainingJobs"])
            check(name, "MaxParallelTrainingJobs", request["MaxParallelTrainingJobs"], limits["MaxParallelTrainingJobs"])
            check(name, "Strategy", request["Strategy"], config["Strategy"])
            check(name, "EarlyStopping", request["EarlyStopping"], config["TrainingJobEarlyStoppingType"])
            check(name, "Objective", request["Objective"], config["HyperParameterTuningJobObjective"])
            check(name, "ParameterRanges", request["ParameterRanges"], resolve(config["ParameterRanges"]))
        elif kind == "Condition":
            (condition,) = args["Conditions"]
            check(name, "Operator", request["Operator"], condition["Type"])
            check(name, "LeftValue", request["LeftValue"], resolve(condition["LeftValue"]))
            check(name, "RightValue", request["RightValue"], resolve(condition["RightValue"]))
    recorded = {r["step"] for r in requests}
    for name, step in steps.items():
        ran = state["steps"].get(name, {}).get("status") == "Succeeded"
        if step["Type"] in ("Processing", "Training", "Tuning", "Condition") and ran and name not in recorded:
            found.append(f"{name}: ran locally but no request was recorded")
    return found
