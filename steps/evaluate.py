"""Evaluate: score the test split through the model's own inference code; write evaluation.json
and report.html (metrics against the gate and against the previous registered version scored on
the same photos, loss curves, Debugger rule verdicts, data report)."""
from steps.base import (PROCESSING_BASE, Code, Param, ProcessingInput, ProcessingOutput, ProcessingStep,
                        PropertyFile, StepOutput)

MODEL = f"{PROCESSING_BASE}/model"
TEST = f"{PROCESSING_BASE}/test"
OUTPUT = f"{PROCESSING_BASE}/evaluation"
DATA_REPORT = f"{PROCESSING_BASE}/report"
REPORT_FILE = "report.html"  # beside evaluation.json in the evaluation output
BASELINE_FILE = "baseline.json"  # the monitoring baseline, beside them

EVALUATION = PropertyFile("EvaluationReport", output="evaluation", path="evaluation.json")
ACCURACY_PATH = "multiclass_classification_metrics.accuracy.value"

STEP = ProcessingStep(
    name="Evaluate",
    description="Accuracy, RMSE, per-class metrics, confusion matrix, accuracy under corruptions.",
    code=Code("evaluate", "evaluate.py"),
    inputs=(
        ProcessingInput("model", StepOutput("Train", "model"), MODEL),
        ProcessingInput("test", StepOutput("Preprocess", "test"), TEST),
        ProcessingInput("report", StepOutput("Preprocess", "report"), DATA_REPORT),
    ),
    outputs=(ProcessingOutput("evaluation", OUTPUT),),
    arguments=("--model", MODEL, "--test", TEST, "--output", OUTPUT, "--data-report", DATA_REPORT,
               "--threshold", Param("AccuracyThreshold"),
               "--model-package-group", Param("ModelPackageGroupName")),
    property_files=(EVALUATION,),
    # report.html compares with the group's previous version, which the job scores on the same test
    # photos (scripts/evaluate/previous.py, champion.py). Looked up by the job, not passed in: a
    # pipeline parameter would be stale or empty on every start not made by `invmon start`, and a
    # ProcessingInput cannot have an empty source.
    reads_registry=Param("ModelPackageGroupName"),
)
