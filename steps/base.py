"""The vocabulary every step declaration is written in.

A declaration says *what* a step runs and how it is wired; it never says how to run it.
pipeline/dag/compile.py compiles the declarations into step requests, which two executors run:
`pipeline.local` (subprocesses on this machine) and `pipeline.sagemaker.definition` (SageMaker
Python SDK v3). Nothing here imports any of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

PROCESSING_BASE = "/opt/ml/processing"
# MaxRuntimeInSeconds of each kind of job: SageMaker stops a job past it, and so does the
# local runner (pipeline/local/jobs.py), from the same declaration.
PROCESSING_MAX_RUNTIME_S = 4 * 3600
TRIAL_MAX_RUNTIME_S = 2 * 3600
TRAINING_MAX_RUNTIME_S = 24 * 3600


@dataclass(frozen=True)
class Param:
    """A reference to a pipeline parameter (see pipeline/dag/parameters.py)."""

    name: str


@dataclass(frozen=True)
class StepOutput:
    """A reference to a named output of an upstream step (`Preprocess.train`, ...)."""

    step: str
    output: str

    def __str__(self) -> str:
        return f"{self.step}.{self.output}"


# What an argument, input or hyperparameter may be bound to.
Value = Union[str, int, float, bool, Param]
Source = Union[Param, StepOutput]


@dataclass(frozen=True)
class S3Selection:
    """How a step reads a dataset from S3 itself: only the objects a manifest or a selection
    rule names. Such an input is never mounted on SageMaker (a File-mode input copies the whole
    prefix, 535k images for the ABID bucket); its container path in the arguments becomes the
    S3 URI. The local runner mirrors the same selection once into its cache and links it in."""

    manifest: Param
    counts: Param
    per_count: Param
    seed: Param


@dataclass(frozen=True)
class ProcessingInput:
    name: str
    source: Source
    destination: str  # container path, under /opt/ml/processing
    optional: bool = False  # an empty Param means "no input" (e.g. no manifest)
    s3_selection: S3Selection | None = None  # read by the script itself when the source is s3://


@dataclass(frozen=True)
class ProcessingOutput:
    name: str
    source: str  # container path the script writes to


@dataclass(frozen=True)
class PropertyFile:
    """A JSON file a step writes whose values later steps read (SageMaker PropertyFile)."""

    name: str
    output: str  # which ProcessingOutput holds it
    path: str  # file name inside that output


@dataclass(frozen=True)
class Code:
    """A step container's code: its script folder plus files staged beside the entry point.

    `extra_files` exist because the model artifact must carry scripts/inference/inference.py:
    the training container gets a copy next to train.py (both executors stage the same way,
    see `stage_source`).
    """

    source_dir: str  # relative to root
    entry_point: str
    extra_files: tuple[str, ...] = ()  # relative to root
    root: Path = SCRIPTS

    @property
    def path(self) -> Path:
        return self.root / self.source_dir

    @property
    def requirements(self) -> Path:
        return self.path / "requirements.txt"

    def files(self) -> list[tuple[Path, str]]:
        """(file on disk, name inside the staged source dir), sorted, for staging and hashing."""
        found = [
            (p, p.relative_to(self.path).as_posix())
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
        found += [(self.root / extra, Path(extra).name) for extra in self.extra_files]
        return found


def stage_source(code: Code, dest: Path) -> Path:
    """Copy a step's code into `dest` the way its container sees it (/opt/ml/code)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in code.files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
    return dest


@dataclass(frozen=True)
class ProcessingStep:
    name: str
    code: Code
    inputs: tuple[ProcessingInput, ...]
    outputs: tuple[ProcessingOutput, ...]
    # Script arguments. Container paths in here are rewritten to local paths by the local runner.
    arguments: tuple[Value, ...] = ()
    property_files: tuple[PropertyFile, ...] = ()
    cache: bool = False
    description: str = ""
    max_runtime_s: int = PROCESSING_MAX_RUNTIME_S
    # The model package group the script looks up in the model registry itself (the group is
    # also among its arguments). SageMaker: boto3 in the job, given its region. Local: the
    # runner hands it the local registry's listing ($INVMON_MODEL_REGISTRY). Never cached.
    reads_registry: Param | None = None


@dataclass(frozen=True)
class MetricDefinition:
    """A metric read from the job's log, exactly as SageMaker reads it."""

    name: str
    regex: str


@dataclass(frozen=True)
class ContinuousRange:
    """A bound may be a pipeline parameter: the range that suits SGD does not suit AdamW."""
    name: str
    min_value: float | Param
    max_value: float | Param
    scaling: str = "Logarithmic"  # SageMaker ScalingType: Auto | Linear | Logarithmic


@dataclass(frozen=True)
class CategoricalRange:
    name: str
    values: tuple[str, ...]


HyperparameterRange = Union[ContinuousRange, CategoricalRange]


@dataclass(frozen=True)
class TrainingStep:
    name: str
    code: Code
    channels: tuple[tuple[str, StepOutput], ...]  # (channel name, upstream output)
    hyperparameters: tuple[tuple[str, Value | "TunedValue"], ...]
    metric_definitions: tuple[MetricDefinition, ...]
    checkpoints: bool = True
    description: str = ""
    max_runtime_s: int = TRAINING_MAX_RUNTIME_S

    @property
    def hyperparameter_dict(self) -> dict:
        return dict(self.hyperparameters)


@dataclass(frozen=True)
class TunedValue:
    """The best trial's value of a tuned hyperparameter (BestTrainingJob.TunedHyperParameters)."""

    tuning_step: str
    name: str


@dataclass(frozen=True)
class TuningStep:
    name: str
    training: TrainingStep  # the trial job; its hyperparameters are the static ones
    ranges: tuple[HyperparameterRange, ...]
    objective_metric: str
    objective_type: str  # Maximize | Minimize
    max_jobs: Value
    max_parallel_jobs: Value
    strategy: str = "Bayesian"
    early_stopping: str = "Auto"
    cache: bool = False
    description: str = ""
    trial_max_runtime_s: int = TRIAL_MAX_RUNTIME_S


@dataclass(frozen=True)
class JsonGet:
    """A value read from an upstream step's PropertyFile (SageMaker JsonGet)."""

    step: str
    property_file: str
    json_path: str


@dataclass(frozen=True)
class ConditionStep:
    """`left >= right`: run `if_true` steps, else `if_false` steps."""

    name: str
    left: JsonGet
    right: Param
    if_true: tuple[str, ...]
    if_false: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class RegisterStep:
    name: str
    model: StepOutput  # the model artifact (model.tar.gz)
    metrics: StepOutput  # the output holding evaluation.json
    metrics_file: str
    model_package_group: Param  # registered PendingManualApproval, always (parameters.REGISTERED_STATUS)
    code: Code  # the inference code the serving container runs
    description: str = ""
    # The SHA-256 of the model.tar.gz that Evaluate scored: recorded with the version
    # (ArtifactSha256), checked by every deploy.
    artifact_digest: JsonGet | None = None
    # A file of the metrics output that goes with the version (Evaluate's report.html); its URI
    # is the version's EvaluationReport property (CustomerMetadataProperties on SageMaker).
    report_file: str | None = None
    # The monitoring baseline beside it (Evaluate's baseline.json): the MonitoringBaseline
    # property, what `invmon monitor` compares the version's traffic with.
    baseline_file: str | None = None
    # Lineage (pipeline/lineage.py): the parameter holding the code's commit
    # (MetadataProperties.CommitId) and the data selection's parameters (the description).
    commit: Param | None = None
    selection: tuple[Param, ...] = ()


@dataclass(frozen=True)
class DeployStep:
    name: str
    register_step: str
    endpoint_name: Param
    instance_type: Param
    description: str = ""


@dataclass(frozen=True)
class FailStep:
    name: str
    # Message parts: literal strings and values resolved at run time.
    message: tuple[Union[str, JsonGet, Param], ...]
    description: str = ""


Step = Union[ProcessingStep, TuningStep, TrainingStep, ConditionStep, RegisterStep, DeployStep, FailStep]


@dataclass(frozen=True)
class Dag:
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def __getitem__(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]
