"""The local runner on a small DAG of tiny real scripts: contract, failure, resume, caching.

The scripts are real programs run as subprocesses in step environments, exactly as the
pipeline's own steps are; they are small so that the runner's behaviour is what is tested.
"""
from __future__ import annotations

import json
import tarfile
import textwrap
from pathlib import Path

import pytest

from pipeline.local.runner import LocalRun
from steps.base import (PROCESSING_BASE, Code, ConditionStep, Dag, DeployStep, FailStep, JsonGet,
                        MetricDefinition, Param, ProcessingInput, ProcessingOutput, ProcessingStep,
                        PropertyFile, RegisterStep, StepOutput, TrainingStep)

COUNT_SCRIPT = """
import argparse, json, pathlib, os
p = argparse.ArgumentParser()
p.add_argument("--input"); p.add_argument("--manifest"); p.add_argument("--output"); p.add_argument("--tag")
a = p.parse_args()
files = sorted(x.name for x in pathlib.Path(a.input).iterdir())
manifest = sorted(x.name for x in pathlib.Path(a.manifest).iterdir()) if pathlib.Path(a.manifest).exists() else None
out = pathlib.Path(a.output) / "result"
(out / "files.json").write_text(json.dumps({"files": files, "manifest": manifest, "tag": a.tag}))
# Count executions in a file outside the run, so tests can see whether the step really ran.
counter = pathlib.Path(os.environ["RUN_COUNTER"])
counter.write_text(str(int(counter.read_text() or 0) + 1) if counter.exists() else "1")
print(f"counted {len(files)} files")
"""

TRAIN_SCRIPT = """
import argparse, json, os, pathlib, sys
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float); p.add_argument("--checkpoint_dir")
a = p.parse_args()
if pathlib.Path(os.environ["FAIL_FLAG"]).exists():
    sys.exit("training failed on purpose")
seen = json.loads((pathlib.Path(os.environ["SM_CHANNEL_TRAIN"]) / "files.json").read_text())
model = pathlib.Path(os.environ["SM_MODEL_DIR"])
(model / "weights.json").write_text(json.dumps({"lr": a.lr, "files": seen["files"]}))
print(f"epoch=1 validation:accuracy={min(a.lr * 10, 1):.4f}")
"""

EVAL_SCRIPT = """
import argparse, json, pathlib, tarfile
p = argparse.ArgumentParser(); p.add_argument("--model"); p.add_argument("--output")
a = p.parse_args()
with tarfile.open(pathlib.Path(a.model) / "model.tar.gz") as tar:
    weights = json.load(tar.extractfile("weights.json"))
report = {"multiclass_classification_metrics": {"accuracy": {"value": weights["lr"] * 10}},
          "regression_metrics": {"rmse": {"value": 1.0}}}
(pathlib.Path(a.output) / "evaluation.json").write_text(json.dumps(report))
"""


def write_script(root: Path, folder: str, source: str) -> Code:
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "main.py").write_text(textwrap.dedent(source))
    (root / folder / "requirements.txt").write_text("")
    return Code(folder, "main.py", root=root)


def small_dag(root: Path, cache: bool = True) -> Dag:
    data, manifest, out = f"{PROCESSING_BASE}/input/data", f"{PROCESSING_BASE}/input/manifest", f"{PROCESSING_BASE}/output"
    evaluation = PropertyFile("EvaluationReport", "evaluation", "evaluation.json")
    accuracy = JsonGet("Evaluate", "EvaluationReport", "multiclass_classification_metrics.accuracy.value")
    return Dag((
        ProcessingStep(
            "Count", write_script(root, "count", COUNT_SCRIPT),
            inputs=(ProcessingInput("data", Param("InputDataUrl"), data),
                    ProcessingInput("manifest", Param("ManifestUrl"), manifest, optional=True)),
            outputs=(ProcessingOutput("result", f"{out}/result"),),
            arguments=("--input", data, "--manifest", manifest, "--output", out, "--tag", Param("Tag")),
            cache=cache,
        ),
        TrainingStep(
            "Train", write_script(root, "train", TRAIN_SCRIPT),
            channels=(("train", StepOutput("Count", "result")),),
            hyperparameters=(("lr", Param("Lr")),),
            metric_definitions=(MetricDefinition("validation:accuracy", r"validation:accuracy=([0-9.]+)"),),
        ),
        ProcessingStep(
            "Evaluate", write_script(root, "evaluate", EVAL_SCRIPT),
            inputs=(ProcessingInput("model", StepOutput("Train", "model"), f"{PROCESSING_BASE}/model"),),
            outputs=(ProcessingOutput("evaluation", f"{PROCESSING_BASE}/evaluation"),),
            arguments=("--model", f"{PROCESSING_BASE}/model", "--output", f"{PROCESSING_BASE}/evaluation"),
            property_files=(evaluation,),
        ),
        ConditionStep("Check", left=accuracy, right=Param("Threshold"),
                      if_true=("Register", "Deploy"), if_false=("TooLow",)),
        RegisterStep("Register", model=StepOutput("Train", "model"), metrics=StepOutput("Evaluate", "evaluation"),
                     metrics_file="evaluation.json", model_package_group=Param("Group"),
                     code=Code("evaluate", "main.py", root=root)),
        DeployStep("Deploy", register_step="Register", endpoint_name=Param("Endpoint"),
                   instance_type=Param("Tag")),
        FailStep("TooLow", message=("accuracy ", accuracy, " is below Threshold ", Param("Threshold"))),
    ))


@pytest.fixture
def setup(tmp_path, invmon_home, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (data / name).write_bytes(b"x")
    monkeypatch.setenv("RUN_COUNTER", str(tmp_path / "count-runs"))
    monkeypatch.setenv("FAIL_FLAG", str(tmp_path / "fail-flag"))
    params = {"InputDataUrl": str(data), "ManifestUrl": "", "Tag": "t1", "Lr": 0.06,
              "Threshold": 0.5, "Group": "toy", "Status": "PendingManualApproval", "Endpoint": "toy-staging"}
    return tmp_path, invmon_home, params


def new_run(setup, dag=None, **overrides):
    tmp_path, home, params = setup
    return LocalRun.create(home, dag or small_dag(tmp_path / "scripts"), {**params, **overrides}, "test",
                           echo=lambda line: None)


def runs_of_count_step(tmp_path: Path) -> int:
    return int((tmp_path / "count-runs").read_text())


def test_full_run_follows_the_container_contract(setup):
    tmp_path, home, _ = setup
    state = new_run(setup).execute()
    assert state["status"] == "Succeeded", state["failure"]
    run_dir = home / "runs" / state["id"]
    # Processing: container paths were rewritten; the optional manifest, not given, is not
    # mounted (as on SageMaker, where the definition has no such input).
    seen = json.loads((run_dir / "Count" / state["steps"]["Count"]["outputs"]["result"] / "files.json").read_text())
    assert seen == {"files": ["a.jpg", "b.jpg", "c.jpg"], "manifest": None, "tag": "t1"}
    # Training: hyperparameters as arguments, channel via SM_CHANNEL_TRAIN, SM_MODEL_DIR tarred.
    with tarfile.open(run_dir / "Train" / "model" / "model.tar.gz") as tar:
        assert json.load(tar.extractfile("weights.json")) == {"lr": 0.06, "files": ["a.jpg", "b.jpg", "c.jpg"]}
    assert state["steps"]["Train"]["properties"]["FinalMetricDataList"] == {"validation:accuracy": 0.6}
    # Condition true: registered in the real SQLite registry and deployed to staging.
    assert state["steps"]["Check"]["properties"] == {"outcome": True, "left": 0.6, "right": 0.5}
    assert state["steps"]["TooLow"]["status"] == "Skipped"
    from pipeline.registry.local import open_registry

    registry = open_registry(home)
    version = registry.get("toy", state["steps"]["Register"]["properties"]["version"])
    assert version.status == "PendingManualApproval"
    assert version.metrics["multiclass_classification_metrics"]["accuracy"]["value"] == 0.6
    assert Path(version.artifact_uri).is_file()
    assert registry.get_endpoint("toy-staging").version == version.version


def test_gate_failure_names_metric_and_threshold_and_registers_nothing(setup):
    tmp_path, home, _ = setup
    state = new_run(setup, Lr=0.02).execute()
    assert state["status"] == "Failed"
    # The message is rendered as SageMaker renders the FailStep's Std:Join (the raw JSON value).
    assert state["failure"] == "TooLow: accuracy 0.2 is below Threshold 0.5"
    assert state["steps"]["Register"]["status"] == "Skipped"
    assert state["steps"]["Deploy"]["status"] == "Skipped"
    from pipeline.registry.local import open_registry

    assert open_registry(home).list_versions("toy") == []


def test_failed_step_keeps_earlier_outputs_and_resume_skips_finished_steps(setup):
    tmp_path, home, _ = setup
    (tmp_path / "fail-flag").write_text("1")
    run = new_run(setup, dag=small_dag(tmp_path / "scripts", cache=False))
    state = run.execute()
    assert state["status"] == "Failed"
    assert state["steps"]["Train"]["status"] == "Failed"
    assert "training failed on purpose" in state["steps"]["Train"]["error"]
    assert state["steps"]["Evaluate"]["status"] == "Pending"
    count_output = run.dir / "Count" / "processing" / "output" / "result" / "files.json"
    assert count_output.exists(), "a failed step must leave what earlier steps produced"
    assert runs_of_count_step(tmp_path) == 1

    (tmp_path / "fail-flag").unlink()
    resumed = LocalRun.load(home, small_dag(tmp_path / "scripts", cache=False), state["id"], echo=lambda l: None)
    state = resumed.execute()
    assert state["status"] == "Succeeded", state["failure"]
    assert runs_of_count_step(tmp_path) == 1, "resume must not redo a finished step"
    assert state["steps"]["Register"]["status"] == "Succeeded"


def test_cache_reuses_unchanged_steps_and_reruns_changed_ones(setup):
    tmp_path, home, _ = setup
    first = new_run(setup).execute()
    assert runs_of_count_step(tmp_path) == 1

    second = new_run(setup).execute()
    assert second["status"] == "Succeeded"
    assert second["steps"]["Count"]["reused_from"] == first["id"]
    assert runs_of_count_step(tmp_path) == 1, "an unchanged cached step must not run again"
    reused = home / "runs" / second["id"] / "Count" / "processing" / "output" / "result" / "files.json"
    assert reused.exists(), "a reused step's outputs must be in the new run's folder"

    # A changed argument, a changed input file and changed code each make the step run again.
    new_run(setup, Tag="t2").execute()
    assert runs_of_count_step(tmp_path) == 2
    (tmp_path / "data" / "a.jpg").write_bytes(b"changed")
    new_run(setup).execute()
    assert runs_of_count_step(tmp_path) == 3
    dag = small_dag(tmp_path / "scripts")
    script = tmp_path / "scripts" / "count" / "main.py"
    script.write_text(script.read_text() + "\n# edited\n")
    new_run(setup, dag=dag).execute()
    assert runs_of_count_step(tmp_path) == 4


def test_missing_input_folder_fails_the_step_with_a_clear_error(setup):
    state = new_run(setup, InputDataUrl="/nonexistent/photos").execute()
    assert state["status"] == "Failed"
    assert state["failure"] == "Count: parameter InputDataUrl: /nonexistent/photos does not exist"


def test_s3_input_without_a_selection_is_refused_locally_with_advice(setup):
    # Only an input declared with an S3Selection (Preprocess's data) is mirrored by the runner.
    state = new_run(setup, InputDataUrl="s3://aft-vbi-pds/").execute()
    assert "the local runner reads local files here" in state["failure"]


def test_cache_key_follows_symlinked_folders_and_ignores_hidden_bookkeeping(setup):
    tmp_path, home, _ = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "d.jpg").write_bytes(b"one")
    (tmp_path / "data" / "more").symlink_to(elsewhere, target_is_directory=True)
    new_run(setup).execute()
    assert runs_of_count_step(tmp_path) == 1
    (tmp_path / "data" / ".ledger").write_text("bookkeeping no step reads")
    new_run(setup).execute()
    assert runs_of_count_step(tmp_path) == 1, "a hidden file must not invalidate the cache"
    (elsewhere / "d.jpg").write_bytes(b"two")  # a photo behind the link changed
    new_run(setup).execute()
    assert runs_of_count_step(tmp_path) == 2


def test_train_uses_the_debugger_container_only_when_enabled(invmon_home, monkeypatch):
    """As on SageMaker (steps/images.py): Train's environment comes from requirements-debugger.txt
    with EnableDebugger=true, from requirements.txt otherwise; the tuning trials never."""
    from pipeline.local import envs
    from pipeline.dag.profiles import defaults
    from steps import DAG
    from steps.train import CODE

    asked = []
    monkeypatch.setattr(envs, "python_for", lambda requirements, *a, **k: asked.append(requirements.name))
    run = LocalRun.create(invmon_home, DAG, {**defaults("local"), "EnableDebugger": "true"}, "local",
                          echo=lambda line: None)
    run.python(CODE, debugger=True)
    run.python(CODE)
    assert asked == ["requirements-debugger.txt", "requirements.txt"]


def test_the_runner_counts_gpus_without_importing_torch_where_there_is_no_driver(monkeypatch):
    """SM_NUM_GPUS comes from torch only where an NVIDIA driver is installed: importing torch costs
    every `invmon run` 1-2 s of CPU, and a machine without the driver has no GPU to count."""
    import subprocess
    import sys

    from pipeline.local import jobs

    code = ("import json, sys; from pipeline.local import jobs; jobs.nvidia_driver_present = lambda: False; "
            "env = jobs.training_env({}, '/m', '/o', 'job', {}); "
            "print(json.dumps([env['SM_NUM_GPUS'], 'torch' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == ["0", False]
    # Where there is a driver, torch counts (a stand-in torch here, which says 3).
    fake = type(sys)("torch")
    fake.cuda = type("cuda", (), {"device_count": staticmethod(lambda: 3)})
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setattr(jobs, "nvidia_driver_present", lambda: True)
    assert jobs.training_env({}, Path("/m"), Path("/o"), "job", {})["SM_NUM_GPUS"] == "3"


def test_runner_step_envs_install_nothing_and_name_what_the_interpreter_lacks(setup, tmp_path, monkeypatch):
    """INVMON_STEP_ENVS=runner (a machine with no package registry whose interpreter already holds
    the steps' packages): every step runs in the runner's interpreter, no environment is built, and
    a requirement it lacks is named in the log rather than fetched."""
    envs_dir = tmp_path / "no-envs"
    monkeypatch.setenv("INVMON_ENVS", str(envs_dir))
    monkeypatch.setenv("INVMON_STEP_ENVS", "runner")
    dag = small_dag(tmp_path / "scripts")
    (tmp_path / "scripts" / "count" / "requirements.txt").write_text("-r more.txt\npillow>=10  # installed\n")
    (tmp_path / "scripts" / "count" / "more.txt").write_text("invmon-no-such-distribution==1.0\n")
    lines = []
    _, home, params = setup
    state = LocalRun.create(home, dag, params, "test", echo=lines.append).execute()
    assert state["status"] == "Succeeded", state["failure"]
    assert not envs_dir.exists()
    lacks = [line for line in lines if "lacks" in line]
    assert len(lacks) == 1 and "invmon-no-such-distribution" in lacks[0] and "pillow" not in lacks[0]


def test_an_unknown_step_env_mode_fails_the_run_in_words(setup, monkeypatch):
    monkeypatch.setenv("INVMON_STEP_ENVS", "none")
    state = new_run(setup).execute()
    assert state["status"] == "Failed"
    assert "INVMON_STEP_ENVS=none: the only value is 'runner'" in state["failure"]


def test_requirement_names_follow_includes_once_and_keep_what_names_no_distribution(tmp_path):
    """What INVMON_STEP_ENVS=runner checks: every distribution a step's file names, through `-r`
    includes (a cycle read once), with versions, extras and markers stripped; a path or URL kept
    whole (it is never installed, so it is reported as lacking)."""
    from pipeline.local.envs import missing_distributions, requirement_names

    (tmp_path / "a.txt").write_text("-r b.txt\npillow>=10  # why\nfoo[bar]==1 ; python_version<'3.12'\n"
                                    "./local.whl\n--index-url https://example.invalid/simple\n")
    (tmp_path / "b.txt").write_text("-ra.txt\nbaz\n--requirement=c.txt\n")
    (tmp_path / "c.txt").write_text("qux~=1.0\n")
    assert requirement_names(tmp_path / "a.txt") == ["baz", "qux", "pillow", "foo", "./local.whl"]
    assert missing_distributions(tmp_path / "a.txt") == ["baz", "qux", "foo", "./local.whl"]
