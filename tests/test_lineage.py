"""Lineage and cost tags: what made a model version, on both back-ends, and what a run's
resources are charged to.

Local runs are real runs of a small DAG of tiny real scripts (as tests/test_runner.py), in a
git checkout made for the test, so the commit and the dirty flag are known. SageMaker is moto:
the Register request the definition carries, resolved as SageMaker resolves it, is what creates
the model package, and `invmon models show --backend aws` reads the lineage back.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import steps as declared
from aws_testing import COMMIT, REGION, ROLE, all_steps, aws_env, default_offline_definition, patched_environ
from pipeline import lineage
from pipeline.cli import main
from pipeline.dag import profiles
from pipeline.dag.compile import Resolver, compile_dag
from pipeline.digests import named_files_sha256
from pipeline.registry.local import open_registry
from pipeline.sagemaker import clients
from steps.base import (PROCESSING_BASE, Code, ConditionStep, Dag, DeployStep, FailStep, JsonGet,
                        MetricDefinition, Param, ProcessingInput, ProcessingOutput, ProcessingStep,
                        PropertyFile, RegisterStep, StepOutput, TrainingStep)
from test_runner import TRAIN_SCRIPT, write_script

TAG_KEYS = ("invmon:group", "invmon:stage", "invmon:run")

# A Preprocess that splits its input's files, drops the first --drop of them, and writes the
# split indexes and data report the real one writes (names, not photos: the runner only reads
# manifest*.csv and data_report.json).
PREPROCESS_SCRIPT = """
import argparse, json, pathlib
p = argparse.ArgumentParser()
p.add_argument("--input"); p.add_argument("--output"); p.add_argument("--drop", type=int)
a = p.parse_args()
files = sorted(x.name for x in pathlib.Path(a.input).iterdir())[a.drop:]
out = pathlib.Path(a.output)
splits = {"train": files[:-2], "validation": files[-2:-1], "test": files[-1:]}
for split, names in splits.items():
    (out / split / "manifest.csv").write_text("id,count\\n" + "".join(f"{n},1\\n" for n in names))
(out / "train" / "files.json").write_text(json.dumps({"files": files}))
counts = {s: {"1": len(n), "total": len(n)} for s, n in splits.items()}
(out / "report" / "data_report.json").write_text(json.dumps({"counts": counts}))
"""

EVAL_SCRIPT = """
import argparse, json, pathlib, tarfile
p = argparse.ArgumentParser(); p.add_argument("--model"); p.add_argument("--output")
a = p.parse_args()
with tarfile.open(pathlib.Path(a.model) / "model.tar.gz") as tar:
    weights = json.load(tar.extractfile("weights.json"))
accuracy = weights["lr"] * 10
(pathlib.Path(a.output) / "evaluation.json").write_text(json.dumps({
    "multiclass_classification_metrics": {"accuracy": {"value": accuracy}},
    "regression_metrics": {"rmse": {"value": 1 - accuracy}},
    "per_class": {"1": {"accuracy": accuracy, "support": 2}, "2": {"accuracy": 0.5, "support": 2}}}))
"""


def lineage_dag(root: Path) -> Dag:
    out = f"{PROCESSING_BASE}/output"
    data = f"{PROCESSING_BASE}/input/data"
    accuracy = JsonGet("Evaluate", "EvaluationReport", "multiclass_classification_metrics.accuracy.value")
    return Dag((
        ProcessingStep(
            "Preprocess", write_script(root, "preprocess", PREPROCESS_SCRIPT),
            inputs=(ProcessingInput("data", Param("InputDataUrl"), data),),
            outputs=tuple(ProcessingOutput(n, f"{out}/{n}") for n in ("train", "validation", "test", "report")),
            arguments=("--input", data, "--output", out, "--drop", Param("Drop")),
        ),
        TrainingStep(
            "Train", write_script(root, "train", TRAIN_SCRIPT),
            channels=(("train", StepOutput("Preprocess", "train")),),
            hyperparameters=(("lr", Param("Lr")),),
            metric_definitions=(MetricDefinition("validation:accuracy", r"validation:accuracy=([0-9.]+)"),),
        ),
        ProcessingStep(
            "Evaluate", write_script(root, "evaluate", EVAL_SCRIPT),
            inputs=(ProcessingInput("model", StepOutput("Train", "model"), f"{PROCESSING_BASE}/model"),),
            outputs=(ProcessingOutput("evaluation", f"{PROCESSING_BASE}/evaluation"),),
            arguments=("--model", f"{PROCESSING_BASE}/model", "--output", f"{PROCESSING_BASE}/evaluation"),
            property_files=(PropertyFile("EvaluationReport", "evaluation", "evaluation.json"),),
        ),
        ConditionStep("Check", left=accuracy, right=Param("Threshold"),
                      if_true=("Register", "Deploy"), if_false=("TooLow",)),
        RegisterStep("Register", model=StepOutput("Train", "model"), metrics=StepOutput("Evaluate", "evaluation"),
                     metrics_file="evaluation.json", model_package_group=Param("Group"),
                     code=Code("evaluate", "main.py", root=root),
                     commit=Param("CommitId"), selection=(Param("InputDataUrl"), Param("ManifestUrl"))),
        DeployStep("Deploy", register_step="Register", endpoint_name=Param("Endpoint"), instance_type=Param("Tag")),
        FailStep("TooLow", message=("accuracy ", accuracy, " is below ", Param("Threshold"))),
    ))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A git checkout with one commit, standing for the tree the code runs from."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "train.py").write_text("print('v1')\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "v1")
    monkeypatch.setattr(lineage, "ROOT", repo)
    return repo


@pytest.fixture
def setup(tmp_path, invmon_home, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (data / name).write_bytes(b"x")
    monkeypatch.setenv("FAIL_FLAG", str(tmp_path / "fail-flag"))
    params = {"InputDataUrl": str(data), "ManifestUrl": "", "Drop": 0, "Lr": 0.06, "Threshold": 0.5,
              "Group": "toy", "Endpoint": "toy-staging", "Tag": "t1", "CommitId": ""}
    return tmp_path, invmon_home, params


def run(setup, **overrides) -> dict:
    from pipeline.local.runner import LocalRun

    tmp_path, home, params = setup
    made = LocalRun.create(home, lineage_dag(tmp_path / "scripts"), {**params, **overrides}, "test",
                           echo=lambda line: None)
    return made.execute()


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- git


def test_git_state_clean_dirty_untracked_and_elsewhere(checkout, tmp_path):
    sha = git(checkout, "rev-parse", "HEAD")
    assert lineage.git_state() == {"commit": sha, "dirty": False, "changed_files": 0}
    (checkout / "train.py").write_text("print('v2')\n")  # changed, not committed
    assert lineage.git_state() == {"commit": sha, "dirty": True, "changed_files": 1}
    git(checkout, "checkout", "-q", "--", "train.py")
    (checkout / "new_step.py").write_text("")  # untracked code runs too
    assert lineage.git_state()["dirty"] is True
    assert lineage.commit_value(lineage.git_state()) == f"{sha}-dirty"
    assert lineage.parse_commit(f"{sha}-dirty") == (sha, True)

    # A folder inside a checkout that is not its top: code installed there is not that commit.
    inside = checkout / "site-packages"
    inside.mkdir()
    assert lineage.git_state(inside)["commit"] is None
    assert "does not run from a git checkout" in lineage.git_state(inside)["reason"]
    plain = tmp_path / "plain"
    plain.mkdir()
    found = lineage.git_state(plain)
    assert found["commit"] is None and found["reason"].startswith("not a git checkout: ")


def test_without_git_the_commit_is_absent_with_the_reason(checkout, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert lineage.git_state() == {"commit": None, "reason": "git is not installed"}
    assert lineage.commit_value(lineage.git_state()) == ""


# ----------------------------------------------------------------------------- local runs


def test_a_local_run_records_its_lineage_with_the_version(checkout, setup, capsys):
    tmp_path, home, _ = setup
    sha = git(checkout, "rev-parse", "HEAD")
    state = run(setup)
    assert state["status"] == "Succeeded", state["failure"]
    run_dir = home / "runs" / state["id"]
    # run.json: the tree, and the parameter the Register request sends.
    assert state["lineage"]["git"] == {"commit": sha, "dirty": False, "changed_files": 0}
    assert state["parameters"]["CommitId"] == sha
    executed = {json.loads(line)["Name"]: json.loads(line)["Arguments"]
                for line in (run_dir / "executed.jsonl").read_text().splitlines()}
    assert executed["Register"]["MetadataProperties"] == {"CommitId": sha, "GeneratedBy": state["id"]}

    version = open_registry(home).get("toy", 1)
    assert version.commit_id == sha and version.run_id == state["id"]
    assert version.description == f"run {state['id']}; InputDataUrl={tmp_path / 'data'}; ManifestUrl="
    outputs = state["steps"]["Preprocess"]["outputs"]
    expected = named_files_sha256([(f"{s}/manifest.csv", run_dir / "Preprocess" / outputs[s] / "manifest.csv")
                                   for s in ("train", "validation", "test")])
    assert version.properties["DataSha256"] == expected
    assert json.loads(version.properties["Parameters"]) == state["parameters"]
    assert state["lineage"]["data"]["counts"]["train"] == {"1": 2, "total": 2}

    code, out, _ = cli(capsys, "models", "show", "1", "--group", "toy")
    assert code == 0
    assert f"  commit       {sha}" in out.splitlines()
    assert f"  run          {state['id']}" in out.splitlines()
    assert f"  splits       {expected}" in out.splitlines()
    assert "Lr=0.06" in out and "InputDataUrl=" in out
    code, out, _ = cli(capsys, "models", "show", "1", "--group", "toy", "--json")
    shown = json.loads(out)["lineage"]
    assert (shown["commit"], shown["dirty"], shown["run"], shown["commit_missing"]) == (sha, False, state["id"], None)
    assert shown["data"] == {"manifest_sha256": None, "split_sha256": expected,
                             "selection": {"InputDataUrl": str(tmp_path / "data"), "ManifestUrl": ""}}
    assert shown["parameters"]["Lr"] == 0.06
    code, out, _ = cli(capsys, "models", "list", "--group", "toy", "--json")
    assert json.loads(out)[0]["lineage"]["commit"] == sha


def test_a_dirty_tree_is_recorded_as_dirty(checkout, setup):
    _, home, _ = setup
    (checkout / "train.py").write_text("print('uncommitted')\n")
    state = run(setup)
    assert state["status"] == "Succeeded", state["failure"]
    version = open_registry(home).get("toy", 1)
    assert version.commit_id == git(checkout, "rev-parse", "HEAD") + "-dirty"
    assert lineage.of_version(version)["dirty"] is True


def test_outside_a_checkout_the_run_registers_and_says_why(setup, monkeypatch, tmp_path, capsys):
    plain = tmp_path / "installed"
    plain.mkdir()
    monkeypatch.setattr(lineage, "ROOT", plain)
    state = run(setup)
    assert state["status"] == "Succeeded", state["failure"]  # never fails a run
    version = open_registry(setup[1]).get("toy", 1)
    assert version.commit_id == "" and "CommitId" not in version.properties
    assert version.properties["GitCommitMissing"].startswith("not a git checkout: ")
    code, out, _ = cli(capsys, "models", "show", "1", "--group", "toy")
    assert code == 0 and "  commit       none (not a git checkout: " in out


def test_a_resume_from_another_commit_is_recorded(checkout, setup, capsys):
    tmp_path, home, _ = setup
    first = git(checkout, "rev-parse", "HEAD")
    (tmp_path / "fail-flag").write_text("1")
    failed = run(setup)
    assert failed["status"] == "Failed"
    (checkout / "train.py").write_text("print('v2')\n")
    git(checkout, "commit", "-q", "-am", "v2")
    second = git(checkout, "rev-parse", "HEAD")
    (tmp_path / "fail-flag").unlink()
    from pipeline.local.runner import LocalRun

    resumed = LocalRun.load(home, lineage_dag(tmp_path / "scripts"), failed["id"], echo=lambda line: None).execute()
    assert resumed["status"] == "Succeeded", resumed["failure"]
    assert [g["commit"] for g in resumed["lineage"]["resumed_at"]] == [second]
    version = open_registry(home).get("toy", 1)
    assert version.commit_id == first and version.properties["GitResumedAt"] == second
    assert lineage.of_version(version)["resumed_at"] == [second]
    code, out, _ = cli(capsys, "models", "show", "1", "--group", "toy")
    assert f"  commit       {first}; resumed at {second}" in out.splitlines()


def test_a_run_cannot_set_its_own_commit(capsys, invmon_home):
    code, _, err = cli(capsys, "run", "--param", "CommitId=0123456")
    assert code == 2 and "CommitId is read from the working tree" in err and "Traceback" not in err
    assert not (invmon_home / "runs").exists()


def test_split_digest_follows_the_photos_kept(tmp_path):
    step = tmp_path / "Preprocess"
    outputs = {s: f"output/{s}" for s in ("train", "validation", "test", "report")}
    for split in ("train", "validation", "test"):
        (step / "output" / split).mkdir(parents=True)
        (step / "output" / split / "manifest.csv").write_text("id,count,md5\na,1,aa\n")
    (step / "output" / "report").mkdir()
    (step / "output" / "report" / "data_report.json").write_text(json.dumps({"counts": {"test": {"total": 1}}}))
    before = lineage.split_data(step, outputs)
    assert before["counts"] == {"test": {"total": 1}} and len(before["sha256"]) == 64
    (step / "output" / "test" / "manifest.csv").write_text("id,count,md5\na,1,ab\n")  # one photo's bytes
    assert lineage.split_data(step, outputs)["sha256"] != before["sha256"]
    assert lineage.split_data(tmp_path / "nothing", outputs) == {}


def test_the_description_is_what_the_register_request_joins():
    """The selection the DAG's Register records is the one lineage.py reads back; the compiled
    description, resolved, parses to it."""
    register = declared.DAG["Register"]
    assert tuple(p.name for p in register.selection) == lineage.SELECTION
    assert register.commit.name == lineage.COMMIT_PARAMETER
    values = profiles.defaults("full")
    request = {r.name: r for r in compile_dag(declared.DAG, values)}["Register"]
    text = Resolver(values, lambda ref: None, "exec-1")(request.arguments["ModelPackageDescription"])
    assert text == lineage.description("exec-1", values)
    assert lineage.parse_description(text) == ("exec-1", {n: str(values[n]) for n in lineage.SELECTION})
    assert lineage.parse_description("something else") == (None, {})


# ----------------------------------------------------------------------------- runs compare


def test_runs_compare_two_real_runs(checkout, setup, capsys):
    a = run(setup)
    b = run(setup, Lr=0.08, Drop=1)
    assert a["status"] == b["status"] == "Succeeded"
    code, out, err = cli(capsys, "runs", "compare", a["id"], b["id"], "--json")
    assert code == 0 and err == ""
    document = json.loads(out)
    rows = {(r["section"], r["name"]): r for r in document["rows"]}
    assert (rows[("parameters", "Lr")]["a"], rows[("parameters", "Lr")]["b"]) == (0.06, 0.08)
    assert rows[("parameters", "Lr")]["differs"] and not rows[("parameters", "Threshold")]["differs"]
    assert not rows[("code", "commit")]["differs"]
    assert rows[("data", "train photos")]["a"] == "2 (1:2)" and rows[("data", "train photos")]["b"] == "1 (1:1)"
    assert rows[("data", "splits sha256")]["differs"]
    assert rows[("metrics", "accuracy")]["a"] == pytest.approx(0.6)
    assert rows[("metrics", "accuracy")]["b"] == pytest.approx(0.8)
    assert rows[("metrics", "rmse")]["differs"]
    assert rows[("metrics", "accuracy count 2")] == {"section": "metrics", "name": "accuracy count 2",
                                                     "a": 0.5, "b": 0.5, "differs": False}
    assert set(document["differences"]) == {
        "parameters.Lr", "parameters.Drop", "data.splits sha256", "data.train photos",
        "metrics.accuracy", "metrics.rmse", "metrics.accuracy count 1"}

    code, out, _ = cli(capsys, "runs", "compare", a["id"], b["id"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [a["id"], b["id"]]
    assert next(line for line in lines if " Lr " in line).split() == ["*", "Lr", "0.06", "0.08"]
    assert next(line for line in lines if " Threshold " in line).split() == ["Threshold", "0.5", "0.5"]
    assert lines[-1] == "7 differences (marked *)"


def test_runs_compare_names_an_unknown_run_in_one_line(checkout, setup, capsys):
    a = run(setup)
    code, out, err = cli(capsys, "runs", "compare", a["id"], "20260101-000000-dead")
    assert (code, out) == (1, "")
    assert err == "invmon: error: no run '20260101-000000-dead'; see `invmon runs list`\n"
    with pytest.raises(SystemExit) as usage:  # argparse's own: a missing run id
        main(["runs", "compare", a["id"]])
    assert usage.value.code == 2


# ----------------------------------------------------------------------------- cost tags


def tags_of(arguments: dict) -> dict:
    return {t["Key"]: t["Value"] for t in arguments.get("Tags", [])}


def test_every_job_and_endpoint_request_carries_the_cost_tags():
    """Compiled once (pipeline/dag/compile.py), in the definition as compiled."""
    group, run_id = {"Get": "Parameters.ModelPackageGroupName"}, {"Get": "Execution.PipelineExecutionId"}
    requests = {r.name: r for r in compile_dag(declared.DAG, profiles.defaults("full"))}
    for name in ("Preprocess", "Tune", "Train", "Evaluate"):
        assert tags_of(requests[name].arguments) == {"invmon:group": group, "invmon:stage": "pipeline",
                                                     "invmon:run": run_id}, name
    deploy = requests["Deploy"].arguments
    for part in (deploy, deploy["Model"], deploy["EndpointConfig"]):
        assert tags_of(part) == {"invmon:group": group, "invmon:stage": "staging", "invmon:run": run_id}
    for name in ("CheckAccuracy", "Register", "AccuracyTooLow"):  # they make nothing billable
        assert "Tags" not in requests[name].arguments

    built = all_steps(json.loads(default_offline_definition()))
    for name, stage in (("Preprocess", "pipeline"), ("Tune", "pipeline"), ("Train", "pipeline"),
                        ("Evaluate", "pipeline"), ("Deploy-Model", "staging"),
                        ("Deploy-EndpointConfig", "staging"), ("Deploy", "staging")):
        assert tags_of(built[name]["Arguments"]) == {"invmon:group": group, "invmon:stage": stage,
                                                     "invmon:run": run_id}, name


def test_a_local_run_resolves_the_tags_it_executes(checkout, setup):
    state = run(setup)
    executed = [json.loads(line) for line in
                (setup[1] / "runs" / state["id"] / "executed.jsonl").read_text().splitlines()]
    tagged = {r["Name"]: r["Arguments"] for r in executed if "Tags" in r["Arguments"]}
    assert set(tagged) == {"Preprocess", "Train", "Evaluate", "Deploy"}
    for name, arguments in tagged.items():
        stage = "staging" if name == "Deploy" else "pipeline"
        assert tags_of(arguments) == {"invmon:group": "toy", "invmon:stage": stage, "invmon:run": state["id"]}


# ----------------------------------------------------------------------------- SageMaker (moto)

BUCKET = "invmon-lineage"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312"
MODEL_ROLE = "arn:aws:iam::123456789012:role/InvmonModelRole"
MODEL_BYTES = b"the registered model.tar.gz"


class AsSageMaker(Resolver):
    """A compiled request resolved as SageMaker resolves it in one execution."""

    def __init__(self, parameters: dict, execution_arn: str, step_values: dict):
        super().__init__(parameters, step_values.__getitem__, execution_arn.rsplit("/", 1)[-1])
        self.arn = execution_arn

    def get(self, ref: str):
        return self.arn if ref == "Execution.PipelineExecutionArn" else super().get(ref)


def register_from_an_execution(sm, s3, epochs: int) -> tuple[str, str]:
    """An execution of the pipeline (started with Epochs=`epochs`) and the version it registered:
    the definition's Register request, resolved, sent to CreateModelPackage (botocore validates
    it against the API's model on the way). Returns (execution ARN, execution id)."""
    values = {**profiles.defaults("full"), "CommitId": COMMIT}
    arn = sm.start_pipeline_execution(PipelineName="bin-count", PipelineParameters=[
        {"Name": "Epochs", "Value": str(epochs)}])["PipelineExecutionArn"]
    execution = arn.rsplit("/", 1)[-1]
    body = MODEL_BYTES + execution.encode()
    s3.put_object(Bucket=BUCKET, Key=f"bin-count/{execution}/Train/model.tar.gz", Body=body)
    request = {r.name: r for r in compile_dag(declared.DAG, values)}["Register"].arguments
    resolved = AsSageMaker({**values, "Epochs": epochs}, arn, {
        "Steps.Train.ModelArtifacts.S3ModelArtifacts": f"s3://{BUCKET}/bin-count/{execution}/Train/model.tar.gz",
        "Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri":
            f"s3://{BUCKET}/bin-count/{execution}/Evaluate/evaluation",
        "Steps.Evaluate.PropertyFiles.EvaluationReport": {"artifact": {"sha256": hashlib.sha256(body).hexdigest()}},
    })(request)
    resolved["InferenceSpecification"]["Containers"][0]["Image"] = IMAGE  # what the SDK adds
    sm.create_model_package(**resolved)
    return arn, execution


@pytest.fixture
def sagemaker(monkeypatch):
    """The pipeline and one version, registered by an execution started with Epochs=3."""
    from moto import mock_aws

    env = {**aws_env(), "INVMON_MODEL_ROLE_ARN": MODEL_ROLE}
    with patched_environ(env), mock_aws():
        session = clients.session(REGION)
        sm, s3 = session.client("sagemaker"), session.client("s3")
        values = {**profiles.defaults("full"), "CommitId": COMMIT}
        sm.create_pipeline(PipelineName="bin-count", RoleArn=ROLE, PipelineDefinition=json.dumps(
            {"Version": "2020-12-01", "Parameters": [{"Name": k, "Type": "String", "DefaultValue": str(v)}
                                                     for k, v in values.items()], "Steps": []}))
        s3.create_bucket(Bucket=BUCKET)
        sm.create_model_package_group(ModelPackageGroupName="bin-count")
        arn, execution = register_from_an_execution(sm, s3, epochs=3)
        yield sm, arn, execution


def test_sagemaker_versions_carry_the_same_lineage(sagemaker, capsys):
    sm, arn, execution = sagemaker
    package = sm.describe_model_package(ModelPackageName=sm.list_model_packages(
        ModelPackageGroupName="bin-count")["ModelPackageSummaryList"][0]["ModelPackageArn"])
    assert package["MetadataProperties"] == {"CommitId": COMMIT, "GeneratedBy": arn}
    assert package["ModelPackageDescription"].startswith(f"run {execution}; InputDataUrl=s3://aft-vbi-pds/;")

    code, out, err = cli(capsys, "models", "show", "1", "--backend", "aws", "--region", REGION, "--json")
    assert code == 0, err
    shown = json.loads(out)["lineage"]
    assert (shown["commit"], shown["dirty"], shown["run"]) == (COMMIT, False, arn)
    assert shown["data"]["selection"] == {"InputDataUrl": "s3://aft-vbi-pds/",
                                          "ManifestUrl": str(profiles.defaults("full")["ManifestUrl"]),
                                          "SelectCounts": "1-5", "PerCount": "0", "Seed": "42"}
    # The execution's parameters: the definition's defaults with what it was started with.
    assert shown["parameters"]["Epochs"] == "3" and shown["parameters"]["CommitId"] == COMMIT
    code, out, _ = cli(capsys, "models", "show", "1", "--backend", "aws", "--region", REGION)
    assert f"  commit       {COMMIT}" in out.splitlines() and "Epochs=3" in out


def test_sagemaker_without_the_execution_says_why(sagemaker, capsys):
    sm, arn, _ = sagemaker
    sm.delete_pipeline(PipelineName="bin-count", ClientRequestToken="delete-the-bin-count-pipeline-now")
    code, out, err = cli(capsys, "models", "show", "1", "--backend", "aws", "--region", REGION, "--json")
    assert code == 0, err
    shown = json.loads(out)["lineage"]
    assert shown["commit"] == COMMIT and shown["parameters"] is None
    assert shown["parameters_missing"].startswith("the execution's parameters could not be read")


def test_a_deploy_tags_the_model_its_config_and_the_endpoint(sagemaker, capsys):
    sm, _, execution = sagemaker
    code, _, err = cli(capsys, "deploy", "--stage", "staging", "--version", "1", "--backend", "aws",
                       "--region", REGION)
    assert code == 0, err
    endpoint = sm.describe_endpoint(EndpointName="bin-count-staging")
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    for arn in (endpoint["EndpointArn"], config["EndpointConfigArn"], model["ModelArn"]):
        tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}
        # The run the version came from: the execution's id, as the pipeline's own jobs are tagged.
        assert {k: tags[k] for k in TAG_KEYS} == {"invmon:group": "bin-count", "invmon:stage": "staging",
                                                  "invmon:run": execution}, arn


def test_an_update_moves_the_endpoints_run_tag_to_the_version_it_serves(sagemaker, capsys, monkeypatch):
    """moto has no UpdateEndpoint: tests/test_deploy_aws.py's stand-in checks the request against
    botocore's model and applies it."""
    from pipeline.sagemaker import clients
    from test_deploy_aws import Updates

    sm, _, _ = sagemaker
    updates = Updates()
    real_client = clients.client
    monkeypatch.setattr(clients, "client", lambda service, region: updates.hook(real_client(service, region)))
    assert cli(capsys, "deploy", "--stage", "staging", "--version", "1", "--backend", "aws", "--region", REGION)[0] == 0
    _, second = register_from_an_execution(sm, clients.session(REGION).client("s3"), epochs=4)
    code, _, err = cli(capsys, "deploy", "--stage", "staging", "--version", "2", "--backend", "aws", "--region", REGION)
    assert code == 0, err
    assert len(updates) == 1  # the update path, not a new endpoint
    endpoint = sm.describe_endpoint(EndpointName="bin-count-staging")
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=endpoint["EndpointArn"])["Tags"]}
    assert tags["invmon:run"] == second and tags["invmon:stage"] == "staging"


# ----------------------------------------------------------------------------- upsert and start


def test_upsert_records_the_commit_codebuild_built(monkeypatch, caplog):
    from pipeline.cli.aws import upserted_commit

    monkeypatch.setenv("CODEBUILD_RESOLVED_SOURCE_VERSION", COMMIT)
    assert upserted_commit() == COMMIT
    # An S3 source's version id is no commit: none is recorded, and upsert says how to record one.
    monkeypatch.setenv("CODEBUILD_RESOLVED_SOURCE_VERSION", "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo")
    assert upserted_commit() == ""
    assert "pass --param CommitId=$(git rev-parse HEAD)" in caplog.text


def test_start_refuses_to_set_the_commit(capsys):
    with patched_environ(aws_env()):
        code, _, err = cli(capsys, "start", "--param", f"CommitId={COMMIT[:12]}", "--region", REGION)
    assert code == 2 and "CommitId is the commit the pipeline's code was upserted from" in err


def test_scripts_never_see_the_commit():
    """The commit is a record of the Register request only: no job's request reads it, so a new
    commit alone never invalidates a cached step."""
    requests = compile_dag(declared.DAG, {**profiles.defaults("full"), "CommitId": COMMIT})
    readers = [r.name for r in requests if "Parameters.CommitId" in json.dumps(r.arguments)]
    assert readers == ["Register"]


def test_a_selection_too_long_to_record_is_refused_before_anything_runs(capsys):
    """SageMaker's ModelPackageDescription takes 1,024 characters: a longer selection would fail
    Register at the end of an execution, so upsert (and start) refuse it first."""
    long_uri = "s3://invmon-data/" + "a" * 1000 + "/"
    assert lineage.description_problem({"InputDataUrl": "s3://aft-vbi-pds/", "ManifestUrl": ""}) is None
    code, out, err = cli(capsys, "definition", "--region", REGION, "--param", f"InputDataUrl={long_uri}")
    assert (code, out) == (2, "")
    assert "InputDataUrl and ManifestUrl are too long to record with the model" in err and "Traceback" not in err
