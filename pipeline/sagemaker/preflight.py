"""Preflight: check every step's request against the SageMaker API model before AWS sees it.

A pipeline definition is accepted by CreatePipeline almost regardless of what its steps ask
for; a wrong field surfaces only when an execution reaches the step, possibly hours in. This
walks each step's Arguments against botocore's offline service model of the API that the step
calls (CreateProcessingJob, CreateHyperParameterTuningJob, CreateTrainingJob,
CreateModelPackage, CreateModel, CreateEndpointConfig, CreateEndpoint): unknown and missing
fields, types, enums, lengths, ranges and patterns.

Pipeline variables are replaced by type-correct placeholders first:
  - {"Get": "Parameters.X"}: the parameter's default value, typed by the parameter's Type, so a
    String parameter wired into an integer field is caught, and so is a default that breaks
    the field's rules (an empty string where the API needs one character, say). An execution
    may still override it: what is checked is the value the definition runs with by default.
  - {"Get": "Steps.S.<path>"}: a value of the type that <path> has in S's Describe* response
    (the path must exist there, and S must be a step of the pipeline); its content is unknown
    until run time, so only its type is checked.
  - {"Get": "Execution.*"}, {"Std:Join": ...}: a string of unknown content.
  - {"Std:JsonGet": ...}: unknown type and content; its property-file reference is checked.
Names the pipeline service generates (job and model names, when the definition leaves them
out) are filled in before the check.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

STEP_APIS = {
    "Processing": "CreateProcessingJob",
    "Training": "CreateTrainingJob",
    "Tuning": "CreateHyperParameterTuningJob",
    "RegisterModel": "CreateModelPackage",
    "Model": "CreateModel",
    "EndpointConfig": "CreateEndpointConfig",
    # The service creates the endpoint, or updates it when it exists: same fields.
    "Endpoint": "CreateEndpoint",
}

# The Describe* responses a step's properties are read from (Steps.<name>.<path>).
PROPERTY_SHAPES = {
    "Processing": ("DescribeProcessingJob",),
    "Training": ("DescribeTrainingJob",),
    "Tuning": ("DescribeHyperParameterTuningJob", "ListTrainingJobsForHyperParameterTuningJob"),
    "RegisterModel": ("DescribeModelPackage",),
    "Model": ("DescribeModel",),
    "EndpointConfig": ("DescribeEndpointConfig",),
    "Endpoint": ("DescribeEndpoint",),
}

# Required names the pipeline service supplies at run time when the definition has none.
SERVICE_FILLED = {
    "CreateProcessingJob": "ProcessingJobName",
    "CreateTrainingJob": "TrainingJobName",
    "CreateHyperParameterTuningJob": "HyperParameterTuningJobName",
    "CreateModel": "ModelName",
}
GENERATED_NAME = "pipelines-generated-name"


@dataclass(frozen=True)
class Issue:
    step: str
    api: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.step} ({self.api})" if self.api else self.step
        return f"step {where}: {self.field or '(request)'}: {self.message}"


class PreflightError(ValueError):
    def __init__(self, issues: list[Issue]):
        self.issues = issues
        lines = "\n  ".join(str(i) for i in issues)
        super().__init__(f"the pipeline definition fails the SageMaker API model "
                         f"({len(issues)} problem{'s' if len(issues) != 1 else ''}):\n  {lines}")


# --------------------------------------------------------------------------- placeholders


class _Unknown:
    """A run-time value whose type is unknown (JsonGet): any type passes."""

    def __init__(self, origin: str):
        self.origin = origin


class _DynStr(str):
    """A run-time string (step property, Join, execution variable): type known, content not."""

    origin = ""


class _DynInt(int):
    origin = ""


class _DynFloat(float):
    origin = ""


class _DynBool(int):  # bool cannot be subclassed; checked by _is_bool
    origin = ""


def _dynamic(type_name: str, origin: str):
    value = {"string": _DynStr(""), "integer": _DynInt(0), "long": _DynInt(0),
             "float": _DynFloat(0.0), "double": _DynFloat(0.0),
             "boolean": _DynBool(0)}.get(type_name)
    if value is None:
        return _Unknown(origin)
    value.origin = origin
    return value


def _is_dynamic(value) -> bool:
    return isinstance(value, (_DynStr, _DynInt, _DynFloat, _DynBool, _Unknown))


def _is_bool(value) -> bool:
    return isinstance(value, (bool, _DynBool))


def _describe(value) -> str:
    origin = getattr(value, "origin", "")
    if origin:
        return origin
    return f"{value!r} ({type(value).__name__})"


@lru_cache(maxsize=1)
def service_model():
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


_PATH_TOKEN = re.compile(r"\.?([A-Za-z0-9_]+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")


def _property_type(step_type: str, path: str) -> str | None:
    """botocore type name of `path` in the step type's Describe* response, None if absent."""
    model = service_model()
    for operation in PROPERTY_SHAPES.get(step_type, ()):
        shape = model.operation_model(operation).output_shape
        pos, ok = 0, True
        while pos < len(path) and ok:
            m = _PATH_TOKEN.match(path, pos)
            if not m or m.end() == pos:
                ok = False
                break
            pos = m.end()
            member, index = m.group(1), m.group(2)
            if member is not None:
                if shape.type_name != "structure" or member not in shape.members:
                    ok = False
                else:
                    shape = shape.members[member]
            elif index is not None:
                ok = shape.type_name == "list"
                shape = shape.member if ok else shape
            else:  # ['key']: a map value, or a list element selected by name (Outputs['train'])
                if shape.type_name == "map":
                    shape = shape.value
                elif shape.type_name == "list":
                    shape = shape.member
                else:
                    ok = False
        if ok and pos == len(path):
            return shape.type_name
    return None


class _Resolver:
    """Replaces pipeline variables by placeholders, recording references that do not exist."""

    def __init__(self, definition: dict, steps: dict[str, dict]):
        self.params = {p["Name"]: p for p in definition.get("Parameters", [])}
        self.steps = steps
        self.problems: list[tuple[str, str]] = []  # (field, message)

    def resolve(self, value, field: str):
        if isinstance(value, dict):
            if len(value) == 1:
                (key, inner), = value.items()
                if key == "Get" and isinstance(inner, str):
                    return self.get(inner, field)
                if key == "Std:Join":
                    for i, part in enumerate(inner.get("Values", [])):
                        self.resolve(part, f"{field}(Join[{i}])")
                    return _dynamic("string", "a Std:Join value")
                if key == "Std:JsonGet":
                    self.json_get(inner, field)
                    return _Unknown("a Std:JsonGet value")
            return {k: self.resolve(v, f"{field}.{k}" if field else k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, f"{field}[{i}]") for i, v in enumerate(value)]
        return value

    def get(self, ref: str, field: str):
        head, _, rest = ref.partition(".")
        if head == "Parameters":
            param = self.params.get(rest)
            if param is None:
                self.problems.append((field, f"refers to undefined parameter {rest!r}"))
                return _Unknown(ref)
            kind = param.get("Type", "String")
            default = param.get("DefaultValue")
            if default is None:
                return _dynamic({"Integer": "integer", "Float": "float", "Boolean": "boolean"}
                                .get(kind, "string"), f"parameter {rest} (no default)")
            value = {"Integer": int, "Float": float, "Boolean": bool}.get(kind, str)(default)
            return _Origin.wrap(value, f"the default {default!r} of {kind} parameter {rest}")
        if head == "Execution":
            return _dynamic("string", f"execution variable {rest}")
        if head == "Steps":
            name, _, path = rest.partition(".")
            step = self.steps.get(name)
            if step is None:
                self.problems.append((field, f"refers to step {name!r}, which is not in the pipeline"))
                return _Unknown(ref)
            if path.startswith("PropertyFiles."):
                return _Unknown(ref)
            type_name = _property_type(step["Type"], path)
            if type_name is None:
                self.problems.append((field, f"refers to {ref}, but a {step['Type']} step has no "
                                             f"property {path!r}"))
                return _Unknown(ref)
            return _dynamic(type_name, ref)
        self.problems.append((field, f"unknown pipeline variable {ref!r}"))
        return _Unknown(ref)

    def json_get(self, spec: dict, field: str):
        prop = spec.get("PropertyFile")
        ref = prop.get("Get", "") if isinstance(prop, dict) else str(prop)
        m = re.fullmatch(r"Steps\.([^.]+)\.PropertyFiles\.(.+)", ref)
        if not m:
            self.problems.append((field, f"JsonGet has no property file reference ({prop!r})"))
            return
        step = self.steps.get(m.group(1))
        names = [f.get("PropertyFileName") for f in (step or {}).get("PropertyFiles", [])]
        if step is None or m.group(2) not in names:
            self.problems.append((field, f"JsonGet reads property file {m.group(2)!r} of step "
                                         f"{m.group(1)!r}, which does not declare it"))


class _Origin:
    """Typed parameter defaults that remember where they came from (for messages)."""

    class Str(str):
        origin = ""

    class Int(int):
        origin = ""

    class Float(float):
        origin = ""

    @classmethod
    def wrap(cls, value, origin: str):
        if isinstance(value, bool):
            return value
        kind = {str: cls.Str, int: cls.Int, float: cls.Float}[type(value)]
        wrapped = kind(value)
        wrapped.origin = origin
        return wrapped


# --------------------------------------------------------------------------- the walk


def _validate(value, shape, field: str, out: list[tuple[str, str]]) -> None:
    if isinstance(value, _Unknown):
        return
    kind = shape.type_name
    meta = shape.metadata
    if kind == "structure":
        if not isinstance(value, dict):
            out.append((field, f"expected a structure ({shape.name}), got {_describe(value)}"))
            return
        for name in value:
            if name not in shape.members:
                out.append((_join(field, name), f"unknown field in {shape.name}; known: "
                                                f"{', '.join(shape.members)}"))
        for name in shape.required_members:
            if name not in value:
                out.append((_join(field, name), f"missing required field of {shape.name}"))
        for name, item in value.items():
            if name in shape.members:
                _validate(item, shape.members[name], _join(field, name), out)
    elif kind == "list":
        if not isinstance(value, list):
            out.append((field, f"expected a list, got {_describe(value)}"))
            return
        _check_size(len(value), meta, field, "items", out)
        for i, item in enumerate(value):
            _validate(item, shape.member, f"{field}[{i}]", out)
    elif kind == "map":
        if not isinstance(value, dict):
            out.append((field, f"expected a map, got {_describe(value)}"))
            return
        _check_size(len(value), meta, field, "entries", out)
        for key, item in value.items():
            _validate(key, shape.key, f"{field} key {key!r}", out)
            _validate(item, shape.value, f"{field}[{key!r}]", out)
    elif kind == "string":
        if not isinstance(value, str):
            out.append((field, f"expected a string, got {_describe(value)}"))
            return
        if _is_dynamic(value):
            return
        if shape.enum and value not in shape.enum:
            shown = ", ".join(shape.enum[:8]) + (", ..." if len(shape.enum) > 8 else "")
            out.append((field, f"{_describe(value)} is not one of {shown}"))
            return
        _check_size(len(value), meta, field, "characters", out, value)
        pattern = meta.get("pattern")
        if pattern:
            try:
                ok = re.fullmatch(pattern, value, re.DOTALL) is not None
            except re.error:  # a Java-only construct: leave it to the service
                ok = True
            if not ok:
                out.append((field, f"{_describe(value)} does not match the pattern {pattern}"))
    elif kind in ("integer", "long"):
        if _is_bool(value) or not isinstance(value, int):
            out.append((field, f"expected an integer, got {_describe(value)}"))
            return
        if not _is_dynamic(value):
            _check_range(value, meta, field, out)
    elif kind in ("float", "double"):
        if _is_bool(value) or not isinstance(value, (int, float)):
            out.append((field, f"expected a number, got {_describe(value)}"))
            return
        if not _is_dynamic(value):
            _check_range(value, meta, field, out)
    elif kind == "boolean":
        if not _is_bool(value):
            out.append((field, f"expected true or false, got {_describe(value)}"))
    # timestamp, blob: not used in step requests


def _join(field: str, name: str) -> str:
    return f"{field}.{name}" if field else name


def _check_size(n, meta, field, unit, out, value=None):
    shown = _describe(value) + " has " if value is not None else ""
    if "min" in meta and n < meta["min"]:
        out.append((field, f"{shown}{n} {unit}, fewer than the minimum {meta['min']}"))
    if "max" in meta and n > meta["max"]:
        out.append((field, f"{shown}{n} {unit}, more than the maximum {meta['max']}"))


def _check_range(value, meta, field, out):
    if "min" in meta and value < meta["min"]:
        out.append((field, f"{_describe(value)} is below the minimum {meta['min']}"))
    if "max" in meta and value > meta["max"]:
        out.append((field, f"{_describe(value)} is above the maximum {meta['max']}"))


def _all_steps(steps: list[dict], found: dict[str, dict]) -> dict[str, dict]:
    for step in steps:
        found[step["Name"]] = step
        if step.get("Type") == "Condition":
            args = step.get("Arguments", {})
            _all_steps(args.get("IfSteps", []) + args.get("ElseSteps", []), found)
    return found


def check_definition(definition: dict | str) -> list[Issue]:
    """Every problem found in the definition's step requests (empty: it passes)."""
    if isinstance(definition, str):
        definition = json.loads(definition)
    steps = _all_steps(definition.get("Steps", []), {})
    resolver = _Resolver(definition, steps)
    model = service_model()
    issues: list[Issue] = []
    for name, step in steps.items():
        step_type = step.get("Type")
        api = STEP_APIS.get(step_type, "")
        for dep in step.get("DependsOn", []) or []:
            dep_name = dep.get("Step") if isinstance(dep, dict) else dep
            if dep_name not in steps:
                issues.append(Issue(name, api, "DependsOn", f"step {dep_name!r} is not in the pipeline"))
        resolver.problems = []
        args = step.get("Arguments", {})
        if step_type == "Condition":
            resolver.resolve({k: v for k, v in args.items() if k not in ("IfSteps", "ElseSteps")}, "")
        elif step_type == "Fail" or not api:
            resolver.resolve(args, "")
        else:
            request = resolver.resolve(args, "")
            filled = SERVICE_FILLED.get(api)
            if filled and filled not in request:
                request[filled] = GENERATED_NAME
            found: list[tuple[str, str]] = []
            _validate(request, model.operation_model(api).input_shape, "", found)
            issues += [Issue(name, api, f, msg) for f, msg in found]
        issues += [Issue(name, api, f, msg) for f, msg in resolver.problems]
    return issues


def preflight(definition: dict | str) -> None:
    """Raise PreflightError naming each step and field the API model rejects."""
    issues = check_definition(definition)
    if issues:
        raise PreflightError(issues)
