"""Evaluate: score the test split through the model's own inference code; write evaluation.json."""
from steps.base import (PROCESSING_BASE, Code, ProcessingInput, ProcessingOutput, ProcessingStep,
                        PropertyFile, StepOutput)

MODEL = f"{PROCESSING_BASE}/model"
TEST = f"{PROCESSING_BASE}/test"
OUTPUT = f"{PROCESSING_BASE}/evaluation"

EVALUATION = PropertyFile("EvaluationReport", output="evaluation", path="evaluation.json")
ACCURACY_PATH = "multiclass_classification_metrics.accuracy.value"

STEP = ProcessingStep(
    name="Evaluate",
    description="Accuracy, RMSE, per-class metrics, confusion matrix, accuracy under corruptions.",
    code=Code("evaluate", "evaluate.py"),
    inputs=(
        ProcessingInput("model", StepOutput("Train", "model"), MODEL),
        ProcessingInput("test", StepOutput("Preprocess", "test"), TEST),
    ),
    outputs=(ProcessingOutput("evaluation", OUTPUT),),
    arguments=("--model", MODEL, "--test", TEST, "--output", OUTPUT),
    property_files=(EVALUATION,),
)
