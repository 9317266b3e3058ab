"""Each step container's SageMaker image and the requirements file it installs: one decision, here.

A SageMaker job starts an AWS Deep Learning Container and pip-installs its step's requirements
file before the script runs, so the image (framework version, Python, CPU or GPU) and the file are
chosen together. `pipeline/sagemaker/definition.py` builds every request from these declarations, and
tests/test_step_requirements.py resolves every file with pip for its image's Python and platform
(binary wheels only, torch and torchvision held at what the image ships). docs/aws.md, "Images and
requirements", says why these images and what was measured.

CPU or GPU: the image follows the build-time value of the instance-type parameter named in
`instance_type` (an image URI cannot follow a run-time parameter). A GPU image still runs on a CPU
instance; the reverse loses the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steps.base import SCRIPTS


@dataclass(frozen=True)
class Image:
    """An AWS PyTorch Deep Learning Container, as `sagemaker.core.image_uris.retrieve("pytorch", ...)`
    names it, with what it ships (its Dockerfile in github.com/aws/deep-learning-containers,
    pytorch/<scope>/docker/<version>/py3/)."""

    scope: str  # image_uris' image_scope: "training" or "inference"
    version: str  # framework version, as image_uris takes it
    python: str  # image_uris' py_version, e.g. "py313"
    torch: str  # the torch and torchvision the image ships: pip holds them there
    torchvision: str
    glibc: str = "2.35"  # every one of these is built FROM ubuntu:22.04

    @property
    def python_version(self) -> str:
        """"py313" -> "3.13"."""
        digits = self.python.removeprefix("py")
        return f"{digits[0]}.{digits[1:]}"


@dataclass(frozen=True)
class Container:
    """A step container: the image a job starts and the requirements file it installs on top."""

    name: str
    image: Image
    requirements: Path  # a file of the step's script folder (it travels in sourcedir.tar.gz)
    instance_type: str  # the parameter whose build-time value picks the CPU or GPU image
    # Packages with no wheel for any platform that the image compiles when it installs the file
    # (these images carry build-essential); the resolution test checks their source release exists.
    compiled_in_image: tuple[str, ...] = ()

    @property
    def requirements_name(self) -> str:
        return self.requirements.name


PYTORCH_TRAINING = Image("training", "2.10", "py313", torch="2.10.0", torchvision="0.25.0")
# The newest training image with Python 3.12: smdebug's numpy<2 has no wheel for 3.13.
PYTORCH_TRAINING_PY312 = Image("training", "2.9", "py312", torch="2.9.0", torchvision="0.24.0")
PYTORCH_INFERENCE = Image("inference", "2.6", "py312", torch="2.6.0", torchvision="0.21.0")

PREPROCESS = Container("preprocess", PYTORCH_TRAINING, SCRIPTS / "preprocess" / "requirements.txt",
                       "ProcessingInstanceType")
TRAIN = Container("train", PYTORCH_TRAINING, SCRIPTS / "train" / "requirements.txt", "TrainingInstanceType")
# The Train job with EnableDebugger=true: smdebug (SageMaker Debugger's client) and its pins on top of
# train's own requirements. smdebug pins pyinstrument 3.4.2, whose C part has no wheel at all.
TRAIN_DEBUGGER = Container("train-debugger", PYTORCH_TRAINING_PY312,
                           SCRIPTS / "train" / "requirements-debugger.txt", "TrainingInstanceType",
                           compiled_in_image=("pyinstrument-cext",))
EVALUATE = Container("evaluate", PYTORCH_TRAINING, SCRIPTS / "evaluate" / "requirements.txt",
                     "ProcessingInstanceType")
# Serving installs nothing at start (the model runs with network isolation; the artifact carries the
# code it needs): this file says what the serving code needs on top of the image, and must hold there.
INFERENCE = Container("inference", PYTORCH_INFERENCE, SCRIPTS / "inference" / "requirements.txt",
                      "InferenceInstanceType")

# The drift monitor (scripts/monitor/): a processing job on a schedule; torch from the image embeds
# SageMaker-captured photos through the served artifact's own code.
MONITOR = Container("monitor", PYTORCH_TRAINING, SCRIPTS / "monitor" / "requirements.txt",
                    "ProcessingInstanceType")

# The staging endpoint's smoke test (scripts/smoke/): HTTP and boto3 only, torch-free; the training
# image because it ships boto3 and is the one the other processing jobs already pull.
SMOKE = Container("smoke", PYTORCH_TRAINING, SCRIPTS / "smoke" / "requirements.txt", "ProcessingInstanceType")

CONTAINERS: tuple[Container, ...] = (PREPROCESS, TRAIN, TRAIN_DEBUGGER, EVALUATE, INFERENCE, MONITOR, SMOKE)
BY_NAME = {c.name: c for c in CONTAINERS}


def container_for(source_dir: str, *, debugger: bool = False) -> Container:
    """The container that runs scripts/<source_dir> (Tune's trials and Train share train's; Train
    with the Debugger on gets train-debugger)."""
    name = "train-debugger" if debugger and source_dir == "train" else source_dir
    if name not in BY_NAME:
        raise KeyError(f"no SageMaker image is declared for scripts/{source_dir} (steps/images.py)")
    return BY_NAME[name]
