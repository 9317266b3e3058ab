"""smdebug in the Train job's Debugger environment: the hook records a real run and the trial reads back;
without it (the default everywhere) training is unchanged and the report still has the four rule verdicts.

The Debugger environment is the one scripts/train/requirements-debugger.txt gives the Train job with
EnableDebugger=true (train's requirements.txt, then smdebug 1.0.34 with numpy<2, protobuf<3.21,
pandas<2.3), built over the project's environment the way the local runner builds step environments
and cached under .invmon/envs like them. Where it cannot be built (no package index), the test says
why; the report tests cover the missing-data path too (tests/test_report.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, import_script
from in_process import run_main
from pipeline.home import step_envs
from pipeline.local.envs import StepEnvironmentError, python_for
from pipeline.local.jobs import tar_model
from test_train import FAST, TRAIN, write_split

rules = import_script("evaluate", "rules")
debugger = import_script("train", "debugger")
evaluate_script = import_script("evaluate", "evaluate")
DEBUGGER_REQUIREMENTS = ROOT / "scripts" / "train" / "requirements-debugger.txt"


def training_environment() -> Path:
    """The training step's python (built once, cached like the runner's), or skip saying why."""
    try:
        return python_for(DEBUGGER_REQUIREMENTS, step_envs(Path(os.environ.get("INVMON_HOME", ROOT / ".invmon"))))
    except StepEnvironmentError as exc:
        pytest.skip(f"the training step environment (smdebug) cannot be built here: {str(exc)[-300:]}")


@pytest.fixture(scope="module")
def step_python() -> Path:
    return training_environment()


def train(python: Path, tmp: Path, data: dict, *args: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    environ.update({"SM_CHANNEL_TRAIN": str(data["train"]), "SM_CHANNEL_VALIDATION": str(data["validation"]),
                    "SM_MODEL_DIR": str(tmp / "model"), "SM_OUTPUT_DATA_DIR": str(tmp / "output"),
                    "TORCH_HOME": str(tmp / "torch-home"), **env})
    done = subprocess.run([str(python), str(TRAIN), *FAST, *args], env=environ, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def evaluate(tmp: Path) -> tuple[dict, str]:
    """Evaluate's job on the artifact train() left in tmp/model (the same script and arguments on
    both back-ends; its main() in this process): evaluation.json's rule verdicts and the report page."""
    tar_model(tmp / "model", tmp / "model.tar.gz")
    test = write_split(tmp / "test", 1, seed=3)
    run_main(evaluate_script.main, "--model", tmp / "model.tar.gz", "--test", test,
             "--output", tmp / "evaluation", "--corruptions", "none", check=True)
    evaluation = json.loads((tmp / "evaluation" / "evaluation.json").read_text())
    page = (tmp / "evaluation" / "report.html").read_text()
    verdicts = {v["rule"]: v["status"] for v in evaluation["debugger_rules"]["verdicts"]}
    assert set(verdicts) == set(rules.RULES)
    for rule, status in verdicts.items():  # every verdict is in the page, on every artifact
        assert re.search(rf"<td>{rule}</td><td class='\w+'>{status}</td>", page), rule
    return evaluation, page


@pytest.mark.pypi
def test_the_hook_records_losses_weights_and_gradients_and_the_trial_reads_back(step_python, tmp_path):
    data = {"train": write_split(tmp_path / "train", 4, seed=1), "validation": write_split(tmp_path / "val", 2, seed=2)}
    done = train(step_python, tmp_path, data, "--epochs", "2", "--checkpoint_dir", "none", "--pretrained", "none",
                 DEBUGGER_INTERVAL="2")
    assert "debugger: smdebug 1.0.34 hook on" in done.stdout and "debugger: recorded" in done.stdout
    summary = json.loads((tmp_path / "model" / "debugger.json").read_text())
    assert summary["status"] == "recorded"
    # 20 training photos in batches of 16: 2 steps per epoch; 10 validation photos: 1 batch per epoch.
    assert len(summary["losses"]["train"]) == 4 and len(summary["losses"]["validation"]) == 2
    assert any("conv1" in name for name in summary["gradients"])
    assert all(points for points in summary["gradients"].values())
    # The learning rate, saved with the gradients (training steps 0 and 2 of 4, every 2nd), read
    # back from the trial: --lr 0.02 on a per-step cosine schedule over 4 steps is 0.02 then 0.01.
    gradient_steps = [step for step, _ in next(iter(summary["gradients"].values()))]
    assert [step for step, _ in summary["learning_rate"]] == gradient_steps and len(gradient_steps) == 2
    assert [lr for _, lr in summary["learning_rate"]] == [pytest.approx(0.02), pytest.approx(0.01)]
    # The counting head sits in `fc` (fc.weight, or fc.score.weight for the ordinal head).
    assert any(name.endswith(("fc.weight", "fc.score.weight")) for name in summary["tensors"]), sorted(summary["tensors"])
    # Read the trial itself with smdebug, in the step environment, as the summary was made.
    trial = subprocess.run([str(step_python), "-c", (
        "import sys; from smdebug.trials import create_trial; t = create_trial(sys.argv[1]); "
        "print('RESULT', len(t.tensor_names(collection='gradients')), len(t.tensor_names(collection='weights')), "
        "len(t.tensor_names(regex='^scalar/learning_rate$')), sorted(t.steps()))"), summary["trial"]],
        capture_output=True, text=True, timeout=300)
    assert trial.returncode == 0, trial.stderr[-2000:]
    result = [line for line in trial.stdout.splitlines() if line.startswith("RESULT ")][-1]  # smdebug logs too
    gradients, weights, rates, steps = result.split(maxsplit=4)[1:]
    assert int(gradients) > 10 and int(weights) > 10 and int(rates) == 1 and steps.strip().startswith("[0,")
    verdicts = {v.rule: v.status for v in rules.evaluate_rules(summary)}
    assert verdicts["VanishingGradient"] == verdicts["ExplodingTensor"] == rules.NO_ISSUES, verdicts
    # Evaluate reads the recorded trial's summary from the artifact: the same verdicts, in the report.
    evaluation, page = evaluate(tmp_path)
    assert {v["rule"]: v["status"] for v in evaluation["debugger_rules"]["verdicts"]} == verdicts
    assert evaluation["debugger_rules"]["note"].startswith("Debugger data recorded by smdebug 1.0.34")
    assert "loss per step" in page


@pytest.mark.slow
def test_without_smdebug_training_works_and_the_report_still_has_the_four_verdicts(tmp_path):
    """The default everywhere: train's requirements.txt has no smdebug, nor has the project's
    environment (DESIGN.md). Same run, its curves in history.json, no Debugger data and the reason;
    Evaluate's report gives the four verdicts from the per-epoch losses, as on SageMaker without
    EnableDebugger (same Evaluate request, same artifact layout)."""
    data = {"train": write_split(tmp_path / "train", 4, seed=1), "validation": write_split(tmp_path / "val", 2, seed=2)}
    done = train(Path(sys.executable), tmp_path, data, "--epochs", "3", "--checkpoint_dir", "none",
                 "--pretrained", "none")
    assert f"debugger: off: {debugger.NOT_INSTALLED}" in done.stdout
    assert "DebugHookConfig" not in done.stdout  # no hook config here: nothing asked for the Debugger
    summary = json.loads((tmp_path / "model" / "debugger.json").read_text())
    assert summary == {"status": "missing", "reason": debugger.NOT_INSTALLED}
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert [(e["epoch"], "loss" in e["train"], "loss" in e["validation"]) for e in history["epochs"]] == [
        (epoch, True, True) for epoch in (1, 2, 3)]  # the curves, as every run records them
    assert (tmp_path / "model" / "model.pth").is_file()
    evaluation, page = evaluate(tmp_path)
    verdicts = {v["rule"]: v["status"] for v in evaluation["debugger_rules"]["verdicts"]}
    assert verdicts["VanishingGradient"] == rules.NO_DATA  # no gradients recorded without the hook
    # The per-epoch losses are enough for Overfit, and ExplodingTensor checks them for NaN/inf.
    assert verdicts["Overfit"] in (rules.ISSUES, rules.NO_ISSUES) and verdicts["ExplodingTensor"] == rules.NO_ISSUES
    assert f"Debugger data missing ({debugger.NOT_INSTALLED})" in evaluation["debugger_rules"]["note"]
    assert "Debugger data missing" in page and "loss per step" not in page


def test_invmon_status_shows_the_training_jobs_rule_verdicts():
    from pipeline.sagemaker.executions import debugger_rule_lines

    class FakeSageMaker:
        def describe_training_job(self, TrainingJobName):
            assert TrainingJobName == "bin-count-Train-abc"
            return {"DebugRuleEvaluationStatuses": [
                {"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluationStatus": "NoIssuesFound"},
                {"RuleConfigurationName": "Overfit", "RuleEvaluationStatus": "IssuesFound",
                 "StatusDetails": "validation loss above training loss"}]}

    step = {"StepName": "Train", "Metadata": {"TrainingJob": {
        "Arn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/bin-count-Train-abc"}}}
    lines = debugger_rule_lines(FakeSageMaker(), step)
    assert lines[0].split() == ["rule", "LossNotDecreasing", "NoIssuesFound"]
    assert lines[1].startswith("rule Overfit") and lines[1].endswith("IssuesFound: validation loss above training loss")
    assert debugger_rule_lines(FakeSageMaker(), {"StepName": "Evaluate", "Metadata": {}}) == []
