"""The compile stage: the declarations of steps/ and the parameter values become the list of
step requests, in the SageMaker API's shapes, that both executors run.

    declarations (steps/) --lower--> primitive steps --compile--> [StepRequest, ...]
                                                                   |            |
                              pipeline/sagemaker/definition.py <---+            +---> pipeline/local/runner.py
                              (SDK steps with these fields)                 (resolves, then runs)

A request holds what is known when the pipeline is built. What is known only at run time is a
placeholder in the definition's own expression syntax: `{"Get": "Parameters.Seed"}`,
`{"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']"}`, `{"Std:JsonGet": ...}`,
`{"Std:Join": ...}`. `Resolver` evaluates them (the local runner with its run's values; the
tests with a run's record), so a value is rendered one way on both sides ("true", not "True").

Everything that depends on a step's kind lives here, once: its request (`KINDS`), its data
dependencies (read back from the placeholders of its request), the branch that gates it, and
whether a result may be reused. A new kind of step is one `register()` call: either a request
compiler for a primitive type, or a `lower` function that rewrites the declaration into
primitive ones (both executors then run it with no change; tests/test_compile.py adds one).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

from pipeline.dag.parameters import PARAMETERS, REGISTERED_STATUS
from pipeline.registry.capture import CAPTURE_PERCENT, capture_settings
from pipeline.registry.labels import PIPELINE_STAGE, cost_tags
from pipeline.registry.local import BASELINE_PROPERTY, DIGEST_PROPERTY, REPORT_PROPERTY
from pipeline.registry.stages import STAGES
from steps.base import (CategoricalRange, ConditionStep, ContinuousRange, Dag, DeployStep, FailStep, JsonGet,
                        Param, ProcessingStep, RegisterStep, StepOutput, TrainingStep, TunedValue, TuningStep)
from steps.smoke import EndpointSmokeTest

CHECKPOINTS = "/opt/ml/checkpoints"
SERVING_CONTENT_TYPES = ["image/jpeg", "image/png", "application/x-image"]
SERVING_RESPONSE_TYPES = ["application/json"]
SERVING_CODE_DIR = "/opt/ml/model/code"  # model.tar.gz's code/, where the serving container runs it


class CompileError(ValueError):
    """A declaration that cannot become a request (a dangling reference, an unknown kind)."""


# --------------------------------------------------------------------------- placeholders


def get(ref: str) -> dict:
    return {"Get": ref}


def join(values, on: str = "") -> dict:
    return {"Std:Join": {"On": on, "Values": list(values)}}


def json_get(ref: JsonGet) -> dict:
    return {"Std:JsonGet": {"PropertyFile": get(f"Steps.{ref.step}.PropertyFiles.{ref.property_file}"),
                            "Path": ref.json_path}}


def references(expr) -> set[str]:
    """The steps a request reads from: every `Steps.<name>...` placeholder inside it."""
    found: set[str] = set()
    if isinstance(expr, dict):
        ref = expr.get("Get")
        if isinstance(ref, str) and ref.startswith("Steps."):
            found.add(ref.split(".")[1])
        for value in expr.values():
            found |= references(value)
    elif isinstance(expr, list):
        for value in expr:
            found |= references(value)
    return found


class Resolver:
    """Evaluates placeholders: parameters from `parameters`, step properties through `step_value`
    (given the `Steps.<name>...` reference, it returns the value), the execution id as given."""

    def __init__(self, parameters: dict, step_value: Callable[[str], object], execution_id: str = ""):
        self.parameters = parameters
        self.step_value = step_value
        self.execution_id = execution_id

    def __call__(self, expr):
        if isinstance(expr, dict) and "Get" in expr:
            return self.get(expr["Get"])
        if isinstance(expr, dict) and "Std:Join" in expr:
            spec = expr["Std:Join"]
            return spec["On"].join(self.text(self(v)) for v in spec["Values"])
        if isinstance(expr, dict) and "Std:JsonGet" in expr:
            spec = expr["Std:JsonGet"]
            return json_path(self(spec["PropertyFile"]), spec["Path"])
        if isinstance(expr, dict):
            return {k: self(v) for k, v in expr.items()}
        if isinstance(expr, list):
            return [self(v) for v in expr]
        return expr

    def get(self, ref: str):
        if ref.startswith("Parameters."):
            name = ref.split(".", 1)[1]
            if name not in self.parameters:
                raise CompileError(f"no value for parameter {name}")
            return self.parameters[name]
        if ref in ("Execution.PipelineExecutionId", "Execution.PipelineExecutionArn"):
            return self.execution_id  # a local run is named by its id either way
        return self.step_value(ref)

    @staticmethod
    def text(value) -> str:
        """A value inside Std:Join, as SageMaker renders it: JSON for booleans, str otherwise."""
        return json.dumps(value) if isinstance(value, bool) else str(value)


def json_path(document, path: str):
    """`a.b.c` lookup, as SageMaker's JsonGet reads a PropertyFile."""
    value = document
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"{path!r} not found (missing {key!r})")
        value = value[key]
    return value


STEP_REF = re.compile(r"Steps\.(?P<step>[\w-]+)\.(?P<path>.+)")


def parse_step_ref(ref: str) -> tuple[str, str]:
    """`Steps.Tune.BestTrainingJob...` -> ("Tune", "BestTrainingJob...")."""
    match = STEP_REF.fullmatch(ref)
    if not match:
        raise CompileError(f"not a step reference: {ref}")
    return match["step"], match["path"]


# --------------------------------------------------------------------------- the request of a step


@dataclass
class StepRequest:
    """One step, compiled. `arguments` is the request in the API's shape (CreateProcessingJob,
    CreateTrainingJob, ...) with placeholders; the rest is how the step sits in the DAG."""

    name: str
    type: str  # the definition's step Type: Processing, Training, Tuning, Condition, RegisterModel, Endpoint, Fail
    arguments: dict
    declaration: object = field(repr=False)
    description: str = ""
    depends_on: list[str] = field(default_factory=list)
    gate: tuple[str, bool] | None = None  # (condition step, branch) it runs on, if any
    cache: bool = False  # a result of an identical request may be reused
    property_files: list[dict] = field(default_factory=list)
    # Runner-side facts the API has no field for: the code that runs, the datasets the script
    # reads from S3 itself (never mounted), the registry group it looks up.
    code: dict | None = None
    read_by_script: list[dict] = field(default_factory=list)
    reads_registry: dict | None = None
    # The endpoint a job calls (a smoke test): the local runner serves it for the job's duration.
    invokes_endpoint: dict | None = None

    def to_json(self) -> dict:
        entry = {"Name": self.name, "Type": self.type, "Arguments": self.arguments,
                 "DependsOn": self.depends_on, "Cache": self.cache}
        if self.description:
            entry["Description"] = self.description
        if self.gate:
            entry["RunsIf"] = {"Condition": self.gate[0], "Outcome": self.gate[1]}
        for key, value in (("PropertyFiles", self.property_files), ("Code", self.code),
                           ("ReadByScript", self.read_by_script), ("ReadsRegistry", self.reads_registry),
                           ("InvokesEndpoint", self.invokes_endpoint)):
            if value:
                entry[key] = value
        return entry


class Compiler:
    """Turns declared values into request values: literals as the API takes them, the rest into
    placeholders. The one place a declaration's value is interpreted."""

    def __init__(self, dag: Dag, values: dict, types: dict[str, type]):
        self.dag = dag
        self.values = values  # build-time parameter values (decide optional fields)
        self.types = types  # parameter name -> int | float | str

    def value(self, v, *, as_string: bool = False):
        if isinstance(v, Param):
            if v.name not in self.types:
                raise CompileError(f"unknown parameter {v.name}")
            # A string field (an argument, a hyperparameter) gets a number parameter as text.
            return join([get(f"Parameters.{v.name}")]) if as_string and self.types[v.name] is not str \
                else get(f"Parameters.{v.name}")
        if isinstance(v, StepOutput):
            return self.output(v)
        if isinstance(v, TunedValue):
            self.known(v.tuning_step, TuningStep)
            return get(f"Steps.{v.tuning_step}.BestTrainingJob.TunedHyperParameters['{v.name}']")
        if isinstance(v, JsonGet):
            producer = self.known(v.step, ProcessingStep)
            if v.property_file not in [p.name for p in producer.property_files]:
                raise CompileError(f"step {v.step} has no property file {v.property_file}")
            return json_get(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if as_string else v

    def known(self, name: str, kind: type):
        try:
            step = self.dag[name]
        except KeyError:
            raise CompileError(f"a step reads from unknown step {name}") from None
        if not isinstance(step, kind):
            raise CompileError(f"step {name} is not a {kind.__name__}")
        return step

    def output(self, ref: StepOutput) -> dict:
        try:
            step = self.dag[ref.step]
        except KeyError:
            raise CompileError(f"{ref}: no step {ref.step}") from None
        if isinstance(step, ProcessingStep) and ref.output in [o.name for o in step.outputs]:
            return get(f"Steps.{ref.step}.ProcessingOutputConfig.Outputs['{ref.output}'].S3Output.S3Uri")
        if isinstance(step, TrainingStep) and ref.output == "model":
            return get(f"Steps.{ref.step}.ModelArtifacts.S3ModelArtifacts")
        raise CompileError(f"cannot read {ref}: step {ref.step} has no output {ref.output!r}")

    def build_time(self, v):
        """A value the definition fixes when it is built (an optional input's presence)."""
        return self.values.get(v.name) if isinstance(v, Param) else v


@dataclass(frozen=True)
class Kind:
    """How one declaration type compiles: the request type, its arguments, whether its results
    may be reused, and the runner-side facts (code, inputs the script reads itself)."""

    type: str
    arguments: Callable[[Compiler, object], dict]
    cacheable: Callable[[object], bool] = lambda decl: False
    extras: Callable[[Compiler, object], dict] = lambda compiler, decl: {}


KINDS: dict[type, Kind] = {}
LOWERINGS: dict[type, Callable[[object], tuple]] = {}


def register(declaration: type, kind: Kind | None = None, *, lower: Callable[[object], tuple] | None = None):
    """Teach the compile stage a declaration type: a primitive `kind`, or a `lower` function
    that returns the primitive declarations it stands for (in order)."""
    if (kind is None) == (lower is None):
        raise ValueError("register a kind or a lowering, not both")
    if kind is not None:
        KINDS[declaration] = kind
    else:
        LOWERINGS[declaration] = lower


def code_of(code) -> dict:
    return {"SourceDir": f"scripts/{code.source_dir}", "EntryPoint": code.entry_point}


# ---- Processing


def processing_arguments(c: Compiler, s: ProcessingStep) -> dict:
    read_by_script = {i.destination: i for i in s.inputs if i.s3_selection is not None}
    inputs = []
    for i in s.inputs:
        if i.destination in read_by_script:
            continue
        if i.optional and isinstance(i.source, Param) and not str(c.build_time(i.source) or "").strip():
            continue  # empty = no input: a pipeline cannot drop a field at run time
        inputs.append({"InputName": i.name, "S3Input": {"S3Uri": c.value(i.source), "LocalPath": i.destination}})
    arguments = [c.value(read_by_script[a].source) if isinstance(a, str) and a in read_by_script
                 else c.value(a, as_string=True) for a in s.arguments]
    return {
        "AppSpecification": {"ContainerArguments": arguments},
        "ProcessingInputs": inputs,
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": o.name, "S3Output": {"LocalPath": o.source}}
                                               for o in s.outputs]},
        "StoppingCondition": {"MaxRuntimeInSeconds": s.max_runtime_s},
    }


def processing_extras(c: Compiler, s: ProcessingStep) -> dict:
    return {
        "code": code_of(s.code),
        "property_files": [{"PropertyFileName": p.name, "OutputName": p.output, "FilePath": p.path}
                           for p in s.property_files],
        "read_by_script": [{"InputName": i.name, "Source": c.value(i.source), "LocalPath": i.destination,
                            "Selection": {"Manifest": c.value(i.s3_selection.manifest),
                                          "Counts": c.value(i.s3_selection.counts),
                                          "PerCount": c.value(i.s3_selection.per_count),
                                          "Seed": c.value(i.s3_selection.seed)}}
                           for i in s.inputs if i.s3_selection is not None],
        "reads_registry": ({"ModelPackageGroupName": c.value(s.reads_registry)} if s.reads_registry else None),
    }


# A step that reads the registry sees a different registry each run: never reused.
register(ProcessingStep, Kind("Processing", processing_arguments,
                              cacheable=lambda s: s.cache and s.reads_registry is None,
                              extras=processing_extras))


# ---- Training and Tuning


def metric_definitions(s: TrainingStep) -> list[dict]:
    return [{"Name": m.name, "Regex": m.regex} for m in s.metric_definitions]


def channels(c: Compiler, s: TrainingStep) -> list[dict]:
    return [{"ChannelName": name, "DataSource": {"S3DataSource": {"S3Uri": c.value(src)}}}
            for name, src in s.channels]


def debugger_enabled(c: Compiler) -> bool:
    """EnableDebugger is decided when the pipeline is built (it changes the Train job's image)."""
    return str(c.values.get("EnableDebugger", "false")).strip().lower() == "true"


def training_arguments(c: Compiler, s: TrainingStep) -> dict:
    from steps.train import DEBUGGER_COLLECTIONS, DEBUGGER_RULES

    request = {
        "AlgorithmSpecification": {"MetricDefinitions": metric_definitions(s)},
        "HyperParameters": {name: c.value(v, as_string=True) for name, v in s.hyperparameters},
        "InputDataConfig": channels(c, s),
        "StoppingCondition": {"MaxRuntimeInSeconds": s.max_runtime_s},
    }
    if s.checkpoints:
        request["CheckpointConfig"] = {"LocalPath": CHECKPOINTS}
    if debugger_enabled(c):
        request["DebugHookConfig"] = {"CollectionConfigurations": [
            {"CollectionName": name, "CollectionParameters": {"save_interval": str(interval)}}
            for name, interval in DEBUGGER_COLLECTIONS]}
        request["DebugRuleConfigurations"] = [
            {"RuleConfigurationName": rule, "RuleParameters": {"rule_to_invoke": rule, **params}}
            for rule, params in DEBUGGER_RULES]
    return request


def parameter_ranges(c: Compiler, s: TuningStep) -> dict:
    return {
        "ContinuousParameterRanges": [
            {"Name": r.name, "MinValue": c.value(r.min_value, as_string=True),
             "MaxValue": c.value(r.max_value, as_string=True), "ScalingType": r.scaling}
            for r in s.ranges if isinstance(r, ContinuousRange)],
        "CategoricalParameterRanges": [{"Name": r.name, "Values": list(r.values)}
                                       for r in s.ranges if isinstance(r, CategoricalRange)],
    }


def tuning_arguments(c: Compiler, s: TuningStep) -> dict:
    trial = s.training
    return {
        "HyperParameterTuningJobConfig": {
            "Strategy": s.strategy,
            "ResourceLimits": {"MaxNumberOfTrainingJobs": c.value(s.max_jobs),
                               "MaxParallelTrainingJobs": c.value(s.max_parallel_jobs)},
            "HyperParameterTuningJobObjective": {"Type": s.objective_type, "MetricName": s.objective_metric},
            "ParameterRanges": parameter_ranges(c, s),
            "TrainingJobEarlyStoppingType": s.early_stopping,
        },
        "TrainingJobDefinition": {
            "AlgorithmSpecification": {"MetricDefinitions": metric_definitions(trial)},
            "StaticHyperParameters": {name: c.value(v, as_string=True) for name, v in trial.hyperparameters},
            "InputDataConfig": channels(c, trial),
            "StoppingCondition": {"MaxRuntimeInSeconds": s.trial_max_runtime_s},
        },
    }


register(TrainingStep, Kind("Training", training_arguments,
                            extras=lambda c, s: {"code": code_of(s.code)}))
register(TuningStep, Kind("Tuning", tuning_arguments, cacheable=lambda s: s.cache,
                          extras=lambda c, s: {"code": code_of(s.training.code)}))


# ---- Condition, RegisterModel, Endpoint, Fail


register(ConditionStep, Kind("Condition", lambda c, s: {
    "Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": c.value(s.left), "RightValue": c.value(s.right)}],
    "IfSteps": list(s.if_true),
    "ElseSteps": list(s.if_false),
}))


def serving_container(code) -> dict:
    """The serving container's environment: it runs the artifact's own code/ (self-contained)."""
    return {"SAGEMAKER_PROGRAM": code.entry_point, "SAGEMAKER_SUBMIT_DIRECTORY": SERVING_CODE_DIR}


def register_arguments(c: Compiler, s: RegisterStep) -> dict:
    metrics = c.output(s.metrics)
    properties = {}
    if s.report_file:
        properties[REPORT_PROPERTY] = join([metrics, s.report_file], "/")
    if s.baseline_file:
        properties[BASELINE_PROPERTY] = join([metrics, s.baseline_file], "/")
    if s.artifact_digest is not None:
        properties[DIGEST_PROPERTY] = c.value(s.artifact_digest)
    request = {
        "ModelPackageGroupName": c.value(s.model_package_group),
        "ModelApprovalStatus": REGISTERED_STATUS,
        "ModelMetrics": {"ModelQuality": {"Statistics": {
            "ContentType": "application/json", "S3Uri": join([metrics, s.metrics_file], "/")}}},
        "InferenceSpecification": {
            "Containers": [{"ModelDataUrl": c.output(s.model), "Environment": serving_container(s.code)}],
            "SupportedContentTypes": SERVING_CONTENT_TYPES,
            "SupportedResponseMIMETypes": SERVING_RESPONSE_TYPES,
        },
    }
    if properties:
        request["CustomerMetadataProperties"] = properties
    if s.commit is not None:  # lineage (pipeline/lineage.py): the code's commit, the run, the data
        request["MetadataProperties"] = {"CommitId": c.value(s.commit),
                                         "GeneratedBy": get("Execution.PipelineExecutionArn")}
        request["ModelPackageDescription"] = join(
            ["run ", get("Execution.PipelineExecutionId"),
             *[part for p in s.selection for part in (f"; {p.name}=", c.value(p))]])
    return request


register(RegisterStep, Kind("RegisterModel", register_arguments))


def endpoint_arguments(c: Compiler, s: DeployStep) -> dict:
    """The endpoint with the two resources it needs, in the shapes of CreateModel and
    CreateEndpointConfig (the SageMaker definition makes each a step of its own).

    The endpoint captures every request and answer for the monitor, as a staging deploy of the
    deploy code does (deploy.capture_settings). Where to is the executor's, as a job output's S3
    URI is: s3://<bucket>/capture/<endpoint> on SageMaker (deploy.capture_uri_parts), the
    endpoint's own capture folder under $INVMON_HOME when `invmon serve` serves it locally."""
    register_step = c.known(s.register_step, RegisterStep)
    return {
        "EndpointName": c.value(s.endpoint_name),
        "Model": {"PrimaryContainer": {
            "ModelDataUrl": get(f"Steps.{s.register_step}.InferenceSpecification.Containers[0].ModelDataUrl"),
            "Environment": serving_container(register_step.code)},
            "EnableNetworkIsolation": True},
        "EndpointConfig": {"ProductionVariants": [{"VariantName": "AllTraffic", "InitialInstanceCount": 1,
                                                   "InstanceType": c.value(s.instance_type)}],
                           "DataCaptureConfig": capture_settings(CAPTURE_PERCENT["staging"])},
    }


register(DeployStep, Kind("Endpoint", endpoint_arguments))
register(FailStep, Kind("Fail", lambda c, s: {"ErrorMessage": join([c.value(p) for p in s.message])}))


# ---- the staging endpoint's smoke test: a processing job that calls what Deploy updated


def smoke_test_targets(c: Compiler, s: EndpointSmokeTest) -> dict:
    """The endpoint Deploy updated, the package Register made and its model data (run-time values)."""
    c.known(s.deploy_step, DeployStep)
    c.known(s.register_step, RegisterStep)
    return {"EndpointName": get(f"Steps.{s.deploy_step}.EndpointName"),
            "ModelPackage": get(f"Steps.{s.register_step}.ModelPackageArn"),
            "ModelData": get(f"Steps.{s.register_step}.InferenceSpecification.Containers[0].ModelDataUrl")}


def smoke_test_arguments(c: Compiler, s: EndpointSmokeTest) -> dict:
    request = processing_arguments(c, s)
    targets = smoke_test_targets(c, s)
    request["AppSpecification"]["ContainerArguments"] += [
        "--endpoint-name", targets["EndpointName"], "--model-package", targets["ModelPackage"],
        "--model-data", targets["ModelData"], "--run", get("Execution.PipelineExecutionArn")]
    return request


def smoke_test_extras(c: Compiler, s: EndpointSmokeTest) -> dict:
    if not s.property_files:
        raise CompileError(f"{s.name} must write its verdict in a property file")
    # The runner serves the endpoint for the job and records the verdict (the property file's
    # `record`) on the package; on SageMaker the job records it itself.
    return {**processing_extras(c, s), "invokes_endpoint": {
        **smoke_test_targets(c, s), "Verdict": s.property_files[0].name}}


register(EndpointSmokeTest, Kind("Processing", smoke_test_arguments, extras=smoke_test_extras))


# --------------------------------------------------------------------------- the DAG


def lower(dag: Dag) -> Dag:
    """The DAG in primitive declarations only (a registered lowering expands its declaration)."""
    steps = []
    for step in dag.steps:
        expand = LOWERINGS.get(type(step))
        steps.extend(lower(Dag(tuple(expand(step)))).steps if expand else (step,))
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise CompileError(f"step names must be unique: {names}")
    return Dag(tuple(steps))


def gates(dag: Dag) -> dict[str, tuple[str, bool]]:
    """step name -> (condition step, branch) for every step that runs on one branch only."""
    found: dict[str, tuple[str, bool]] = {}
    for step in dag.steps:
        if isinstance(step, ConditionStep):
            for names, branch in ((step.if_true, True), (step.if_false, False)):
                for name in names:
                    if name not in dag.names:
                        raise CompileError(f"condition {step.name} names unknown step {name}")
                    found[name] = (step.name, branch)
    return found


# The stage tag of each kind of request that makes a billable resource (a pipeline deploys to
# staging only); the other kinds make none.
TAGGED = {"Processing": PIPELINE_STAGE, "Training": PIPELINE_STAGE, "Tuning": PIPELINE_STAGE,
          "Endpoint": STAGES["staging"]}


def with_cost_tags(c: Compiler, kind: str, arguments: dict) -> dict:
    """The one place a request gets its cost-allocation tags (deploy.cost_tags): group (the DAG's
    model package group), stage, and the run (the execution id); an Endpoint's Model and
    EndpointConfig parts too."""
    if kind not in TAGGED:
        return arguments
    group = next((c.value(s.model_package_group) for s in c.dag.steps if isinstance(s, RegisterStep)), None)
    tags = cost_tags(group, TAGGED[kind], get("Execution.PipelineExecutionId"))
    for part in ([arguments["Model"], arguments["EndpointConfig"]] if kind == "Endpoint" else []) + [arguments]:
        part["Tags"] = [dict(t) for t in tags]
    return arguments


def compile_step(compiler: Compiler, step) -> StepRequest:
    kind = KINDS.get(type(step))
    if kind is None:
        raise CompileError(f"no compiler for {type(step).__name__} {step.name}: register() its kind")
    arguments = with_cost_tags(compiler, kind.type, kind.arguments(compiler, step))
    extras = kind.extras(compiler, step)
    depends = references(arguments) | references(extras)
    if isinstance(step, ConditionStep):  # its branches run after it, they are not its inputs
        depends -= set(step.if_true) | set(step.if_false)
    return StepRequest(name=step.name, type=kind.type, arguments=arguments, declaration=step,
                       description=step.description, depends_on=sorted(depends),
                       cache=kind.cacheable(step), **extras)


def compile_dag(dag: Dag, values: dict) -> list[StepRequest]:
    """Every step's request, in declaration order (each after the steps it reads from)."""
    dag = lower(dag)
    # A DAG of a test may use parameters of its own: typed by the value it is given.
    types = {name: type(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str
             for name, v in values.items()}
    compiler = Compiler(dag, values, {**types, **{p.name: p.type for p in PARAMETERS}})
    requests = [compile_step(compiler, step) for step in dag.steps]
    gated = gates(dag)
    seen: set[str] = set()
    for request in requests:
        request.gate = gated.get(request.name)
        if later := [d for d in request.depends_on if d not in seen]:
            raise CompileError(f"step {request.name} reads from {later}, declared after it or unknown")
        seen.add(request.name)
    return requests


def plan(dag: Dag, values: dict) -> dict:
    """The compiled pipeline as JSON (`invmon plan`; beside every local run as plan.json)."""
    return {"Parameters": values, "Steps": [r.to_json() for r in compile_dag(dag, values)]}

