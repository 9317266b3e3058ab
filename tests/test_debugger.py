"""smdebug in the training step's own environment: the hook records a real run and the trial reads back.

The environment is the one the local runner builds for scripts/train/requirements.txt (smdebug
1.0.34 with numpy<2, protobuf<3.21, pandas<2.3 over the project's environment), cached under
.invmon/envs like the runner's. Where it cannot be built (no package index), the test says why;
the report tests cover the missing-data path (tests/test_report.py).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, import_script
from pipeline.local.envs import StepEnvironmentError, python_for
from test_train import FAST, TRAIN, write_split

rules = import_script("evaluate", "rules")


def training_environment() -> Path:
    """The training step's python (built once, cached like the runner's), or skip saying why."""
    envs = Path(os.environ.get("INVMON_HOME", ROOT / ".invmon")) / "envs"
    try:
        return python_for(ROOT / "scripts" / "train" / "requirements.txt", envs)
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


def test_without_smdebug_training_works_and_says_why(tmp_path):
    """The project's environment has no smdebug (DESIGN.md): same run, no Debugger data, a reason."""
    import sys
    data = {"train": write_split(tmp_path / "train", 4, seed=1), "validation": write_split(tmp_path / "val", 2, seed=2)}
    done = train(Path(sys.executable), tmp_path, data, "--epochs", "1", "--checkpoint_dir", "none",
                 "--pretrained", "none")
    assert "debugger: off: smdebug is not usable here (ModuleNotFoundError" in done.stdout
    summary = json.loads((tmp_path / "model" / "debugger.json").read_text())
    assert summary["status"] == "missing" and "smdebug" in summary["reason"]
    assert (tmp_path / "model" / "model.pth").is_file()


def test_invmon_status_shows_the_training_jobs_rule_verdicts():
    from pipeline.aws import debugger_rule_lines

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
