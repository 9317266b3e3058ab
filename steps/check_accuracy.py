"""CheckAccuracy: register and deploy only when test accuracy reaches the threshold."""
from steps.base import ConditionStep, FailStep, JsonGet, Param
from steps.evaluate import ACCURACY_PATH, EVALUATION

ACCURACY = JsonGet("Evaluate", EVALUATION.name, ACCURACY_PATH)

STEP = ConditionStep(
    name="CheckAccuracy",
    description="accuracy >= AccuracyThreshold",
    left=ACCURACY,
    right=Param("AccuracyThreshold"),
    if_true=("Register", "Deploy", "SmokeTest", "CheckSmokeTest"),
    if_false=("AccuracyTooLow",),
)

FAIL = FailStep(
    name="AccuracyTooLow",
    description="Stop the execution, naming the metric and the threshold.",
    message=("Test accuracy ", ACCURACY, " is below AccuracyThreshold ", Param("AccuracyThreshold"),
             "; the model was not registered."),
)
