"""Small DAGs of real scripts for the runner's fault tests, runnable in a separate process:

    python tests/runner_dags.py KIND ROOT HOME [RUN_ID]

creates (or, with RUN_ID, resumes) a run of the DAG KIND under INVMON_HOME=HOME, with the
scripts written under ROOT, and prints the run id first. The scripts write their pid into
ROOT/pids/ and wait for ROOT/go-processing (or ROOT/go-train in a training job) before finishing, so a test can act while a job is running.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from pipeline.local.runner import LocalRun
from steps.base import (PROCESSING_BASE, Code, ContinuousRange, Dag, MetricDefinition, Param,
                        ProcessingOutput, ProcessingStep, StepOutput, TrainingStep, TuningStep)

WAIT_SCRIPT = """
import os, pathlib, sys, time
root = pathlib.Path(os.environ["FAULT_ROOT"])
(root / "pids").mkdir(exist_ok=True)
(root / "pids" / f"{os.getpid()}").write_text(" ".join(sys.argv))
print("validation:accuracy=0.5", flush=True)
flag = root / ("go-train" if "SM_MODEL_DIR" in os.environ else "go-processing")
for _ in range(600):
    if flag.exists():
        break
    time.sleep(0.1)
out = os.environ.get("SM_MODEL_DIR") or sys.argv[sys.argv.index("--output") + 1]
pathlib.Path(out, "done.txt").write_text("ok")
print("validation:accuracy=0.5", flush=True)
"""


def code(root: Path, name: str) -> Code:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(textwrap.dedent(WAIT_SCRIPT))
    (folder / "requirements.txt").write_text("")
    return Code(name, "main.py", root=root)


def processing(root: Path, max_runtime_s: int = 3600) -> ProcessingStep:
    out = f"{PROCESSING_BASE}/output"
    return ProcessingStep("Wait", code(root, "wait"), inputs=(),
                          outputs=(ProcessingOutput("result", out),),
                          arguments=("--output", out), max_runtime_s=max_runtime_s)


def dag(kind: str, root: Path) -> Dag:
    if kind == "wait":
        return Dag((processing(root),))
    if kind == "timeout":
        return Dag((processing(root, max_runtime_s=2),))
    if kind == "tune":
        trial = TrainingStep("Trial", code(root, "trial"),
                             channels=(("train", StepOutput("Wait", "result")),),
                             hyperparameters=(("epochs", Param("Epochs")),),
                             metric_definitions=(MetricDefinition("validation:accuracy",
                                                                  r"validation:accuracy=([0-9.]+)"),))
        return Dag((processing(root), TuningStep(
            "Tune", training=trial, ranges=(ContinuousRange("lr", 0.001, 0.1),),
            objective_metric="validation:accuracy", objective_type="Maximize",
            max_jobs=4, max_parallel_jobs=2, early_stopping="Off")))
    raise SystemExit(f"unknown DAG {kind}")


PARAMS = {"Epochs": 1, "Seed": 0}


def main(argv: list[str]) -> int:
    kind, root, home = argv[0], Path(argv[1]), Path(argv[2])
    if len(argv) > 3:
        run = LocalRun.load(home, dag(kind, root), argv[3], echo=lambda line: None)
    else:
        run = LocalRun.create(home, dag(kind, root), PARAMS, "test", echo=lambda line: None)
    print(run.state["id"], flush=True)
    try:
        state = run.execute()
    except KeyboardInterrupt:
        return 130
    print(state["status"], flush=True)
    return 0 if state["status"] == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
