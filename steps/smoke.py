"""SmokeTest: call the staging endpoint Deploy just updated, then CheckSmokeTest stops the execution
(SmokeTestFailed, with the reason) when it answered wrongly, slowly or with a server error.

The job (scripts/smoke/) sends the test split's first PHOTOS_PER_COUNT photos of each count
(seeded) and five malformed requests; every photo must get Evaluate's prediction for it, the p95
latency must be under SmokeLatencyMs, every malformed request a 4xx JSON error. It records its
verdict on the version (SmokeTest=passed|failed), which `invmon models approve` reads: a version
is registered, and its reviewers alerted, before its staging endpoint exists.

The compile stage adds what only the executors know (pipeline/dag/compile.py): the endpoint Deploy
updated, the package Register made and its model data, the execution. On SageMaker the job calls
InvokeEndpoint and UpdateModelPackage itself; locally the runner starts the real local staging
endpoint for the step, stops it after, and records the verdict in the local registry.
"""
from dataclasses import dataclass

from steps.base import (PROCESSING_BASE, Code, ConditionStep, FailStep, JsonGet, Param, ProcessingInput,
                        ProcessingOutput, ProcessingStep, PropertyFile, StepOutput)
from steps.evaluate import EVALUATION

TEST = f"{PROCESSING_BASE}/test"
PREDICTIONS = f"{PROCESSING_BASE}/evaluation"
OUTPUT = f"{PROCESSING_BASE}/smoke"
PHOTOS_PER_COUNT = 5
# Waiting for the endpoint to be InService with this version, then the requests themselves.
MAX_RUNTIME_S = 3600

REPORT = PropertyFile("SmokeReport", output="smoke", path="smoke.json")


@dataclass(frozen=True)
class EndpointSmokeTest(ProcessingStep):
    """A processing job that invokes the endpoint `deploy_step` updated with the version
    `register_step` made, and records its verdict on that version (the first property file's
    `record`)."""

    deploy_step: str = "Deploy"
    register_step: str = "Register"


STEP = EndpointSmokeTest(
    name="SmokeTest",
    description="Call the staging endpoint with held-out photos and malformed requests.",
    code=Code("smoke", "smoke.py"),
    inputs=(
        ProcessingInput("test", StepOutput("Preprocess", "test"), TEST),
        ProcessingInput("evaluation", StepOutput("Evaluate", EVALUATION.output), PREDICTIONS),
    ),
    outputs=(ProcessingOutput("smoke", OUTPUT),),
    arguments=("--test", TEST, "--predictions", PREDICTIONS, "--output", OUTPUT,
               "--per-count", PHOTOS_PER_COUNT, "--seed", Param("Seed"),
               "--latency-ms", Param("SmokeLatencyMs")),
    property_files=(REPORT,),
    max_runtime_s=MAX_RUNTIME_S,
)

CHECK = ConditionStep(
    name="CheckSmokeTest",
    description="the staging endpoint passed its smoke test",
    left=JsonGet(STEP.name, REPORT.name, "passed"),
    right=1,
    if_true=(),
    if_false=("SmokeTestFailed",),
)

FAIL = FailStep(
    name="SmokeTestFailed",
    description="Stop the execution with the smoke test's reason, before anyone approves the version.",
    message=("The staging endpoint failed its smoke test: ", JsonGet(STEP.name, REPORT.name, "reason"),
             ". The version is recorded as SmokeTest=failed; invmon models approve refuses it."),
)
