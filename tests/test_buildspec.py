"""buildspec.yml, phase by phase, as CodeBuild runs it, against moto's server.

The test-suite command is replaced by a one-file pytest run (passing, then failing); `make`
targets of the install phase run as `make -n` (the environment this test runs in is what they
build, and installing packages inside a test would be slow). Everything else runs as written.
"""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml

from aws_testing import BUCKET, COMMIT, REGION, ROLE, ROOT, aws_env, moto_server, patched_environ

PHASES = ("install", "pre_build", "build", "post_build")
TEST_COMMAND = "make test"


def load_spec() -> dict:
    return yaml.safe_load((ROOT / "buildspec.yml").read_text())


def run_phases(spec: dict, env: dict, test_file) -> list[tuple[str, int, str]]:
    """Run each phase's commands in one shell (as CodeBuild 0.2 does), honouring each phase's
    `on-failure`: ABORT (CodeBuild's default) ends the build at a failed phase, CONTINUE goes on
    to the next phase."""
    variables = {k: str(v) for k, v in (spec.get("env", {}).get("variables") or {}).items()}
    shell = spec.get("env", {}).get("shell", "sh")
    ran = []
    for phase in PHASES:
        commands = (spec["phases"].get(phase) or {}).get("commands", [])
        if not commands:
            continue
        script = ["set -e"]
        for command in commands:
            if command.strip() == TEST_COMMAND:
                command = f"{shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider {shlex.quote(str(test_file))}"
            elif phase == "install" and command.startswith("make "):
                command = "make -n " + command[len("make "):]
            script.append(command)
        # Project variables win over the buildspec's own defaults.
        result = subprocess.run([shell, "-c", "\n".join(script)], cwd=ROOT, env={**variables, **env},
                                capture_output=True, text=True, timeout=300)
        ran.append((phase, result.returncode, result.stdout + result.stderr))
        on_failure = (spec["phases"].get(phase) or {}).get("on-failure", "ABORT")
        if result.returncode != 0 and on_failure != "CONTINUE":
            break
    return ran


def test_tests_run_before_anything_touches_aws():
    spec = load_spec()
    assert spec["version"] == 0.2
    phases = spec["phases"]
    assert TEST_COMMAND in phases["pre_build"]["commands"]
    assert phases["pre_build"].get("on-failure", "ABORT") == "ABORT"
    build = " ".join(phases["build"]["commands"])
    assert build.index("invmon upsert") < build.index("invmon start")
    assert "--commit-id \"$CODEBUILD_RESOLVED_SOURCE_VERSION\"" in build
    earlier = [c for p in ("install", "pre_build") for c in phases[p]["commands"]]
    assert not any("invmon" in c for c in earlier)


@pytest.fixture
def server():
    with moto_server() as endpoint:  # one per test: each starts from an empty AWS
        yield endpoint


def codebuild_env(endpoint: str) -> dict:
    env = aws_env(endpoint_url=endpoint)
    env.update(AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, SAGEMAKER_ROLE_ARN=ROLE,
               SAGEMAKER_BUCKET=BUCKET, CODEBUILD_RESOLVED_SOURCE_VERSION=COMMIT)
    return env


def aws_state(endpoint: str) -> tuple[list, list]:
    import boto3

    with patched_environ(aws_env(endpoint_url=endpoint)):
        session = boto3.Session(region_name=REGION)
        pipelines = session.client("sagemaker").list_pipelines()["PipelineSummaries"]
        buckets = session.client("s3").list_buckets()["Buckets"]
    return pipelines, buckets


def test_a_failing_test_stops_the_build_before_upsert(server, tmp_path):
    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("def test_broken():\n    assert 1 + 1 == 3\n")
    ran = run_phases(load_spec(), codebuild_env(server), test_file)
    assert [(phase, rc == 0) for phase, rc, _ in ran] == [("install", True), ("pre_build", False)]
    assert "1 failed" in ran[-1][2]
    assert aws_state(server) == ([], [])  # upsert never reached AWS


def test_the_stop_comes_from_the_buildspecs_on_failure_setting(server, tmp_path):
    """The same failing suite with pre_build set to CONTINUE would go on to upsert: the stop
    above is the buildspec's doing, not the simulator's."""
    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("def test_broken():\n    assert 1 + 1 == 3\n")
    spec = load_spec()
    spec["phases"]["pre_build"]["on-failure"] = "CONTINUE"
    ran = run_phases(spec, codebuild_env(server), test_file)
    assert [phase for phase, _, _ in ran][:3] == ["install", "pre_build", "build"]


def test_a_passing_build_upserts_and_starts_the_pipeline(server, tmp_path):
    import boto3

    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("def test_fine():\n    assert 1 + 1 == 2\n")
    ran = run_phases(load_spec(), codebuild_env(server), test_file)
    assert [(phase, rc) for phase, rc, _ in ran] == [("install", 0), ("pre_build", 0), ("build", 0)], ran[-1][2]
    build_log = ran[-1][2]
    assert "pipeline bin-count created" in build_log and "started arn:" in build_log

    pipelines, buckets = aws_state(server)
    assert [p["PipelineName"] for p in pipelines] == ["bin-count"]
    assert [b["Name"] for b in buckets] == [BUCKET]  # SAGEMAKER_BUCKET was used
    with patched_environ(aws_env(endpoint_url=server)):
        sm = boto3.Session(region_name=REGION).client("sagemaker")
        (execution,) = sm.list_pipeline_executions(PipelineName="bin-count")["PipelineExecutionSummaries"]
        described = sm.describe_pipeline_execution(PipelineExecutionArn=execution["PipelineExecutionArn"])
    assert described["PipelineExecutionDescription"] == f"CommitId={COMMIT}"
