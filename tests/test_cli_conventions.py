"""The conventions of the `invmon` command line: --version, --json (one JSON document on stdout,
documented keys), exit status 2 for usage errors and 1 for failures, -q/-v, and --recipe with
--profile as its deprecated spelling. Through the real entry point, on a local registry under a
temporary INVMON_HOME and a scripted SageMaker client."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata

import pytest
from botocore.exceptions import ClientError

from aws_testing import REGION, aws_env, patched_environ
from pipeline.cli import main
from pipeline.registry.local import REPORT_PROPERTY, open_registry

GROUP = "bin-count"
VERSION_KEYS = {"group", "version", "status", "artifact_uri", "metrics", "created_at", "updated_at",
                "run_id", "description", "note", "arn", "properties", "commit_id", "lineage"}
METRICS = {"multiclass_classification_metrics": {"accuracy": {"value": 0.75}},
           "regression_metrics": {"rmse": {"value": 0.6}}}
DEPRECATED = ("invmon: warning: --profile is deprecated (to the AWS CLI, --profile names credentials): "
              "use --recipe")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_out(capsys, *argv: str):
    """The command's stdout, which must be exactly one JSON document; nothing on stderr."""
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert err == ""
    return json.loads(out)


@pytest.fixture
def registry(invmon_home, tmp_path):
    """bin-count versions 1 (Approved, serving production, with a report) and 2 (pending)."""
    reg = open_registry(invmon_home)
    report = tmp_path / "report.html"
    report.write_text("<p>report</p>")
    for n in (1, 2):
        artifact = tmp_path / f"m{n}" / "model.tar.gz"
        artifact.parent.mkdir()
        artifact.write_bytes(b"model %d" % n)
        reg.register(GROUP, str(artifact), METRICS, properties={REPORT_PROPERTY: report.as_uri()})
    reg.set_status(GROUP, 1, "Approved")
    reg.deploy(f"{GROUP}-production", GROUP, 1)
    return reg


@pytest.fixture
def runs(invmon_home):
    """Two recorded runs (run.json as the runner writes it): one passed the gate, one failed."""
    states = [
        {"id": "20250101-000000-aaaa", "created_at": "2025-01-01T00:00:00", "profile": "local",
         "parameters": {"Epochs": 3}, "status": "Succeeded", "failure": "",
         "steps": {"Train": {"status": "Succeeded", "seconds": 12.0},
                   "CheckAccuracy": {"status": "Succeeded", "properties": {"left": 0.8, "right": 0.3}}}},
        {"id": "20250102-000000-bbbb", "created_at": "2025-01-02T00:00:00", "profile": "real",
         "parameters": {"Epochs": 3}, "status": "Failed", "failure": "Train: out of memory",
         "steps": {"Train": {"status": "Failed", "error": "out of memory"},
                   "CheckAccuracy": {"status": "Pending"}}},
    ]
    for state in states:
        folder = invmon_home / "runs" / state["id"]
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(state))
    return states


# --------------------------------------------------------------------------- --version


def test_version_prints_the_installed_distributions_version():
    done = subprocess.run([sys.executable, "-m", "pipeline", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"invmon {metadata.version('invmon')}\n"


# --------------------------------------------------------------------------- --json


def test_models_list_and_show_json(registry, capsys):
    versions = json_out(capsys, "models", "list", "--json")
    assert [(v["version"], v["status"]) for v in versions] == [(1, "Approved"), (2, "PendingManualApproval")]
    assert all(set(v) == VERSION_KEYS for v in versions)
    assert versions[0]["metrics"] == METRICS

    shown = json_out(capsys, "models", "show", "2", "--json")
    assert set(shown) == VERSION_KEYS | {"evaluation_report"}
    assert shown["version"] == 2 and shown["evaluation_report"].startswith("file://")
    # Without --json the human output is unchanged: the record, then the report's line.
    code, out, _ = run(capsys, "models", "show", "2")
    assert code == 0 and out.splitlines()[-1].startswith("evaluation report: file://")


def test_an_empty_registry_lists_an_empty_json_array(invmon_home, capsys):
    assert json_out(capsys, "models", "list", "--json") == []
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "no registered models yet" in out


def test_endpoints_json_has_both_stages(registry, capsys):
    stages = json_out(capsys, "endpoints", "--json")
    keys = {"stage", "name", "present", "version", "status", "updated_at", "flag", "pending"}
    assert all(set(s) == keys for s in stages)
    staging, production = stages
    assert (staging["stage"], staging["name"], staging["present"], staging["version"]) == (
        "staging", "bin-count-staging", False, None)
    assert (production["stage"], production["name"], production["present"], production["version"]) == (
        "prod", "bin-count-production", True, 1)


def test_runs_list_and_show_json(runs, capsys):
    listed = json_out(capsys, "runs", "list", "--json")
    assert listed == [
        {"id": "20250101-000000-aaaa", "status": "Succeeded", "profile": "local",
         "created_at": "2025-01-01T00:00:00", "accuracy": 0.8, "failed_step": None},
        {"id": "20250102-000000-bbbb", "status": "Failed", "profile": "real",
         "created_at": "2025-01-02T00:00:00", "accuracy": None, "failed_step": "Train"}]
    assert json_out(capsys, "runs", "show", "--json") == runs[1]  # the latest: its run.json
    assert json_out(capsys, "runs", "show", runs[0]["id"], "--json") == runs[0]
    code, out, _ = run(capsys, "runs", "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["RUN", "STATUS", "PROFILE", "ACCURACY", "FAILED", "STEP"]


ARN = f"arn:aws:sagemaker:{REGION}:123456789012:pipeline/bin-count/execution/abc"
STARTED = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


class ScriptedSageMaker:
    """The read calls of `status` and `executions`, answering one finished execution; with
    `missing`, the pipeline does not exist (AWS's ResourceNotFound)."""

    def __init__(self, missing: bool = False):
        self.missing = missing

    def describe_pipeline(self, PipelineName):
        if self.missing:
            raise ClientError({"Error": {"Code": "ResourceNotFound", "Message": "no such pipeline"}},
                              "DescribePipeline")
        return {"PipelineName": PipelineName}

    def list_pipeline_executions(self, **kwargs):
        return {"PipelineExecutionSummaries": [
            {"PipelineExecutionArn": ARN, "PipelineExecutionStatus": "Failed", "StartTime": STARTED,
             "PipelineExecutionDisplayName": "commit-abc"}]}

    def describe_pipeline_execution(self, PipelineExecutionArn):
        return {"PipelineExecutionArn": ARN, "PipelineExecutionStatus": "Failed",
                "PipelineExecutionDisplayName": "commit-abc", "PipelineExecutionDescription": "CommitId=abc",
                "CreationTime": STARTED, "LastModifiedTime": STARTED, "FailureReason": "Step failure"}

    def list_pipeline_execution_steps(self, **kwargs):
        return {"PipelineExecutionSteps": [
            {"StepName": "Preprocess", "StepStatus": "Succeeded", "StartTime": STARTED, "EndTime": STARTED,
             "AttemptCount": 1, "CacheHitResult": {"SourcePipelineExecutionArn": "arn:.../execution/old"}},
            {"StepName": "AccuracyTooLow", "StepStatus": "Failed", "StartTime": STARTED,
             "AttemptCount": 1, "FailureReason": "Test accuracy 0.2 is below AccuracyThreshold 0.3"}]}


@pytest.fixture
def scripted_aws(monkeypatch):
    from pipeline.sagemaker import clients

    def use(sm: ScriptedSageMaker) -> None:
        monkeypatch.setattr(clients, "client", lambda service, region: sm)

    use(ScriptedSageMaker())
    with patched_environ(aws_env()):
        yield use


def test_status_and_executions_json(scripted_aws, capsys):
    status = json_out(capsys, "status", "--region", REGION, "--json")
    assert set(status) == {"execution_arn", "status", "display_name", "description", "created",
                           "last_modified", "failure_reason", "steps"}
    assert (status["execution_arn"], status["status"]) == (ARN, "Failed")
    assert status["created"] == STARTED.isoformat()
    preprocess, failed = status["steps"]
    assert set(preprocess) == {"name", "status", "start_time", "end_time", "attempts", "failure_reason",
                               "cached_from"}
    assert (preprocess["name"], preprocess["cached_from"]) == ("Preprocess", "arn:.../execution/old")
    assert (failed["status"], failed["end_time"]) == ("Failed", None)

    assert json_out(capsys, "executions", "--region", REGION, "--json") == [
        {"execution_arn": ARN, "status": "Failed", "display_name": "commit-abc",
         "start_time": STARTED.isoformat()}]


def test_json_errors_go_to_stderr_with_exit_1(scripted_aws, capsys):
    scripted_aws(ScriptedSageMaker(missing=True))
    for argv in (["executions", "--json"], ["status", "--json"]):
        code, out, err = run(capsys, *argv, "--region", REGION)
        assert (code, out) == (1, "")
        assert err == "invmon: error: no pipeline 'bin-count' in this account and region\n"


# --------------------------------------------------------------------------- exit status


def test_argparse_usage_errors_exit_2(invmon_home, capsys):
    for argv in (["models", "show", "one"], ["run", "--recipe", "huge"], ["nope"], ["runs"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv
        assert "usage: invmon" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["plan", "--param", "Epochs=zero"], "parameter Epochs expects int, got 'zero'"),
    (["run", "--resume", "x", "--param", "Epochs=3"], "--resume reruns a run with its own parameters"),
    (["predict", "x.jpg", "--out", "x.csv", "--batch-size", "0"], "--batch-size and --concurrency must be"),
    (["predict", "x.jpg", "--backend", "aws"], "--backend aws needs --endpoint NAME"),
    (["upsert", "--role-arn", " "], "--role-arn is empty"),
    (["start", "--param", "Epochs=0"], "Epochs=0 refused"),
])
def test_bad_option_values_exit_2(invmon_home, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("invmon: error: ") and message in err and err.count("\n") == 1, err


def test_a_missing_region_is_a_usage_error(capsys):
    with patched_environ(aws_env(region=None)):
        code, _, err = run(capsys, "models", "list", "--backend", "aws")
    assert code == 2 and "no AWS region: pass --region" in err


@pytest.mark.parametrize("argv, message", [
    (["models", "show", "9"], "model version bin-count/9 not found"),
    (["runs", "show", "no-such-run"], "no run 'no-such-run'"),
    (["run", "--resume", "no-such-run"], "no-such-run"),
    (["deploy", "--stage", "prod", "--version", "2"], "refused: bin-count/2 is PendingManualApproval"),
    (["serve", "--endpoint", "bin-count-staging"], "no local endpoint 'bin-count-staging'"),
    (["predict", "/no/such/photo.jpg"], "no such photo, folder or matching glob"),
])
def test_commands_that_ran_and_failed_exit_1(registry, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("invmon: error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_an_aws_refusal_exits_1(scripted_aws, capsys):
    class Denied(ScriptedSageMaker):
        def describe_pipeline_execution(self, PipelineExecutionArn):
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not allowed"}},
                              "DescribePipelineExecution")

    scripted_aws(Denied())
    code, _, err = run(capsys, "status", ARN, "--region", REGION)
    assert code == 1
    assert err == "invmon: error: AWS refused the request: AccessDeniedException: not allowed\n"


# --------------------------------------------------------------------------- -q / -v, --recipe


def refused_run(capsys, invmon_home, *options: str) -> tuple[int, str, str]:
    """A real `invmon run` that the runner refuses before any step (the endpoint rule): quick."""
    invmon_home.mkdir(parents=True, exist_ok=True)  # --data must name a folder that exists
    return run(capsys, "run", *options, "--param", "StagingEndpointName=bin-count-production",
               "--data", str(invmon_home))


def recorded_recipe(invmon_home) -> str:
    (state,) = [json.loads(p.read_text()) for p in (invmon_home / "runs").glob("*/run.json")]
    return state["profile"]


def test_run_says_where_its_run_is_on_stderr_and_q_silences_it(invmon_home, capsys):
    code, out, err = refused_run(capsys, invmon_home, "--recipe", "local")
    assert code == 1
    assert "(local recipe) in" in err and "parameters: " in err
    assert "StagingEndpointName=bin-count-production refused" in out  # the result: the summary
    for quiet in (["-q"], ["--quiet"]):
        code, out, err = run(capsys, *quiet, "run", "--param", "StagingEndpointName=bin-count-production",
                             "--data", str(invmon_home))
        assert code == 1 and err == "" and "refused" in out
    code, _, err = refused_run(capsys, invmon_home, "-q")  # after the command, too
    assert code == 1 and err == ""


def test_recipe_selects_the_defaults_and_profile_still_works_with_a_warning(invmon_home, capsys):
    code, _, err = refused_run(capsys, invmon_home, "--profile", "real")
    assert code == 1 and recorded_recipe(invmon_home) == "real"
    assert err.splitlines()[0] == DEPRECATED
    assert err.count("deprecated") == 1

    real = json_out(capsys, "plan", "--recipe", "real")
    code, out, err = run(capsys, "plan", "--profile", "real", "-q")  # -q keeps warnings
    assert code == 0 and json.loads(out) == real and err == DEPRECATED + "\n"
    assert json_out(capsys, "plan")["Parameters"] != real["Parameters"]  # the default: local


def test_help_shows_recipe_not_profile(capsys):
    for command in ("run", "plan", "definition", "upsert"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        assert "--recipe {local,real,finetune,full}" in shown and "--profile" not in shown, command
        assert "-q, --quiet" in shown and "-v, --verbose" in shown


def test_verbose_shows_debug_messages(registry, capsys):
    code, _, err = run(capsys, "models", "list")
    assert code == 0 and "local registry" not in err
    code, out, err = run(capsys, "-v", "models", "list", "--json")
    assert code == 0 and json.loads(out) and "local registry" in err
