"""Read a SageMaker definition back and compare it with the compile stage's requests.

Two comparisons, both independent of the code they check (this module evaluates the
definition's expressions itself):
- `plan_differences`: every field of every compiled request (plan.json, `invmon plan`) is in
  the definition's step with the same value; the SDK adds fields of its own (images, roles,
  the code channels), which are not compared. Dependencies, branches, caching and property
  files are read from the definition and compared too.
- `run_differences`: every request a local run executed (executed.jsonl) is the definition's
  request evaluated with the run's own parameters and step results.
A Deploy (type Endpoint) is compiled as one request with its Model and EndpointConfig parts;
the definition makes each part a step of its own, "<name>-Model" and "<name>-EndpointConfig".
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from aws_testing import all_steps

# Lists whose items are matched by name (the SDK adds items of its own, e.g. the code channel).
KEYS = ("InputName", "OutputName", "ChannelName", "Name", "RuleConfigurationName", "CollectionName",
        "VariantName")
ENDPOINT_PARTS = ("Model", "EndpointConfig")


def missing(expected, built, path: str = "") -> list[str]:
    """Where `built` lacks or differs from a field of `expected` (built may have more)."""
    if isinstance(expected, dict):
        if not isinstance(built, dict):
            return [f"{path}: {built!r} is not an object"]
        found = []
        for key, value in expected.items():
            if key not in built:
                found.append(f"{path}.{key}: not in the definition")
            else:
                found += missing(value, built[key], f"{path}.{key}")
        return found
    if isinstance(expected, list):
        if not isinstance(built, list):
            return [f"{path}: {built!r} is not a list"]
        if not expected and all(isinstance(i, dict) for i in built):
            return []  # no named item compiled (e.g. no optional input): the SDK's own may be there
        key = next((k for k in KEYS if expected and all(isinstance(i, dict) and k in i for i in expected)), None)
        if key:
            by_key = {i.get(key): i for i in built if isinstance(i, dict)}
            return [d for item in expected
                    for d in ([f"{path}[{item[key]}]: not in the definition"] if item[key] not in by_key
                              else missing(item, by_key[item[key]], f"{path}[{item[key]}]"))]
        if len(expected) != len(built):
            return [f"{path}: {len(expected)} items compiled, {len(built)} in the definition: {built!r}"]
        return [d for n, (a, b) in enumerate(zip(expected, built)) for d in missing(a, b, f"{path}[{n}]")]
    return [] if expected == built else [f"{path}: compiled {expected!r}, definition {built!r}"]


def project(expected, built):
    """The part of `built` that `expected` has fields for (the rest may hold references that only
    SageMaker resolves, such as another helper step's ModelName)."""
    if isinstance(expected, dict) and isinstance(built, dict) and not ({"Get", "Std:Join", "Std:JsonGet"} & set(built)):
        return {k: project(v, built[k]) for k, v in expected.items() if k in built}
    if isinstance(expected, list) and isinstance(built, list):
        key = next((k for k in KEYS if expected and all(isinstance(i, dict) and k in i for i in expected)), None)
        if key:
            wanted = {i[key]: i for i in expected}
            return [project(wanted[i[key]], i) for i in built if isinstance(i, dict) and i.get(key) in wanted]
        if len(expected) == len(built):
            return [project(a, b) for a, b in zip(expected, built)]
    return built


def declared_name(step_name: str, names: set[str]) -> str:
    return step_name if step_name in names else step_name.rsplit("-", 1)[0]


def parts(request: dict) -> dict[str, dict]:
    """Definition step name -> the part of `request` it must hold."""
    args = dict(request["Arguments"])
    if request["Type"] == "Endpoint":
        found = {f"{request['Name']}-{part}": args.pop(part) for part in ENDPOINT_PARTS}
        return {**found, request["Name"]: args}
    if request["Type"] == "Condition":
        args.pop("IfSteps"), args.pop("ElseSteps")
    return {request["Name"]: args}


def refs(obj) -> set[str]:
    if isinstance(obj, dict):
        ref = obj.get("Get")
        found = {ref.split(".")[1]} if isinstance(ref, str) and ref.startswith("Steps.") else set()
        return found.union(*(refs(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(refs(v) for v in obj))
    return set()


def plan_differences(plan: list[dict], definition: dict) -> list[str]:
    """Every way the definition is not the compiled plan (see the module docstring)."""
    built = all_steps(definition)
    names = {r["Name"] for r in plan}
    found = []
    if {declared_name(n, names) for n in built} != names:
        found.append(f"steps: compiled {sorted(names)}, definition {sorted({declared_name(n, names) for n in built})}")
    gates = {}
    for step in built.values():
        if step["Type"] == "Condition":
            for branch, outcome in (("IfSteps", True), ("ElseSteps", False)):
                for s in step["Arguments"][branch]:
                    gates[declared_name(s["Name"], names)] = (step["Name"], outcome)
    for request in plan:
        name = request["Name"]
        for part, expected in parts(request).items():
            if part not in built:
                found.append(f"{part}: not in the definition")
                continue
            found += [f"{part}{d}" for d in missing(expected, built[part]["Arguments"])]
        if name not in built:
            continue
        step = built[name]
        if step["Type"] != request["Type"]:
            found.append(f"{name}: type {request['Type']} compiled, {step['Type']} in the definition")
        deps = set()
        for part in parts(request):
            if part in built:
                args = {k: v for k, v in built[part]["Arguments"].items() if k not in ("IfSteps", "ElseSteps")}
                deps |= refs(args) | {d if isinstance(d, str) else d["Step"] for d in built[part].get("DependsOn", [])}
        deps = sorted({declared_name(d, names) for d in deps} - {name})
        if deps != request["DependsOn"]:
            found.append(f"{name}: depends on {request['DependsOn']} compiled, {deps} in the definition")
        if request["Type"] == "Condition":
            for branch in ("IfSteps", "ElseSteps"):
                got = list(dict.fromkeys(declared_name(s["Name"], names) for s in step["Arguments"][branch]))
                if got != request["Arguments"][branch]:
                    found.append(f"{name}.{branch}: compiled {request['Arguments'][branch]}, definition {got}")
        cached = bool(step.get("CacheConfig", {}).get("Enabled", False))
        if cached != request["Cache"]:
            found.append(f"{name}: cache {request['Cache']} compiled, {cached} in the definition")
        if step.get("PropertyFiles", []) != request.get("PropertyFiles", []):
            found.append(f"{name}: property files {request.get('PropertyFiles')} compiled, "
                         f"{step.get('PropertyFiles')} in the definition")
        gate = request.get("RunsIf")
        if (gates.get(name) != (gate["Condition"], gate["Outcome"]) if gate else name in gates):
            found.append(f"{name}: runs if {gate} compiled, {gates.get(name)} in the definition")
    return found


class RunValues:
    """Evaluates definition expressions with a local run's parameters and step results."""

    def __init__(self, run_dir: Path, state: dict):
        self.dir = run_dir  # where the run's outputs were when it ran
        self.params = state["parameters"]
        self.steps = state["steps"]
        self.execution = state["id"]

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
            return self.params[ref.split(".", 1)[1]]
        if ref in ("Execution.PipelineExecutionId", "Execution.PipelineExecutionArn"):
            return self.execution  # a local run is named by its id either way
        if m := re.fullmatch(r"Steps\.(\w+)\.ProcessingOutputConfig\.Outputs\['(\w+)'\]\.S3Output\.S3Uri", ref):
            return str(self.dir / m[1] / self.steps[m[1]]["outputs"][m[2]])
        if m := re.fullmatch(r"Steps\.(\w+)\.ModelArtifacts\.S3ModelArtifacts", ref):
            return str(self.dir / m[1] / self.steps[m[1]]["outputs"]["model"])
        if m := re.fullmatch(r"Steps\.(\w+)\.BestTrainingJob\.TunedHyperParameters\['(\w+)'\]", ref):
            return self.steps[m[1]]["properties"]["TunedHyperParameters"][m[2]]
        if m := re.fullmatch(r"Steps\.(\w+)\.InferenceSpecification\.Containers\[0\]\.ModelDataUrl", ref):
            return self.steps[m[1]]["properties"]["artifact"]
        if m := re.fullmatch(r"Steps\.(\w+)\.ModelPackageArn", ref):  # a local version: group/version
            return f"{self.steps[m[1]]['properties']['group']}/{self.steps[m[1]]['properties']['version']}"
        if m := re.fullmatch(r"Steps\.(\w+)\.EndpointName", ref):
            return self.steps[m[1]]["properties"]["endpoint"]
        raise AssertionError(f"no local value for {ref}")

    @staticmethod
    def text(value) -> str:
        """How SageMaker renders a value inside Std:Join (a JSON number or a string)."""
        return json.dumps(value) if isinstance(value, bool) else str(value)


def run_differences(run_dir: Path, definition: dict, origin: Path | None = None) -> list[str]:
    """Every field where a request the run executed and the definition's request disagree.
    `origin`: the run's folder when it ran, if run.json and executed.jsonl were copied since."""
    state = json.loads((run_dir / "run.json").read_text())
    values = RunValues(origin or run_dir, state)
    built = all_steps(definition)
    executed = [json.loads(line) for line in (run_dir / "executed.jsonl").read_text().splitlines()]
    found = []
    for request in executed:
        for part, expected in parts(request).items():
            if part not in built:
                found.append(f"{part}: executed locally, not in the definition")
                continue
            found += [f"{part}{d}" for d in missing(expected, values(project(expected, built[part]["Arguments"])))]
    ran = {name for name, record in state["steps"].items() if record.get("status") in ("Succeeded", "Failed")}
    if missing_records := ran - {r["Name"] for r in executed}:
        found.append(f"{sorted(missing_records)}: ran locally but no executed request was recorded")
    return found
