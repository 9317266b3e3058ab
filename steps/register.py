"""Register: a new model version with evaluation.json attached as its model metrics, the
evaluation report (report.html) named by its EvaluationReport property, and its lineage: the
commit of the code, the run, and the data selection (pipeline/lineage.py)."""
from steps.base import Code, JsonGet, Param, RegisterStep, StepOutput
from steps.evaluate import BASELINE_FILE, EVALUATION, REPORT_FILE

STEP = RegisterStep(
    name="Register",
    description="New version in the model package group, PendingManualApproval: only a reviewer approves.",
    model=StepOutput("Train", "model"),
    metrics=StepOutput("Evaluate", EVALUATION.output),
    metrics_file=EVALUATION.path,
    model_package_group=Param("ModelPackageGroupName"),
    code=Code("inference", "inference.py"),
    report_file=REPORT_FILE,
    baseline_file=BASELINE_FILE,
    artifact_digest=JsonGet("Evaluate", EVALUATION.name, "artifact.sha256"),
    commit=Param("CommitId"),
    selection=tuple(Param(name) for name in ("InputDataUrl", "ManifestUrl", "SelectCounts", "PerCount", "Seed")),
)
