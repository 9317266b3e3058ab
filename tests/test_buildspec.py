"""buildspec.yml, phase by phase, as CodeBuild runs it, against moto's server.

The test-suite command (`make test ARGS=...`) is replaced by a one-file pytest run (passing,
then failing) with the buildspec's own ARGS, so the JUnit report lands where `reports:` reads
it; `make` targets of the install phase run as `make -n` (the environment this test runs in is
what they build, and installing packages inside a test would be slow). Everything else runs as
written.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import yaml

from aws_testing import BUCKET, COMMIT, REGION, ROLE, ROOT, aws_env, moto_server, patched_environ

PHASES = ("install", "pre_build", "build", "post_build")
TEST_COMMAND = "make test"


def load_spec() -> dict:
    return yaml.safe_load((ROOT / "buildspec.yml").read_text())


def pytest_arguments(command: str) -> list[str] | None:
    """The pytest arguments of the buildspec's `make test [ARGS=...]` line; None for another line."""
    words = shlex.split(command.partition(" || ")[0])
    if words[:2] != TEST_COMMAND.split():
        return None
    return [a for w in words[2:] if w.startswith("ARGS=") for a in shlex.split(w[len("ARGS="):])]


def run_phases(spec: dict, env: dict, test_file) -> list[tuple[str, int, str]]:
    """Run each phase's commands in one shell (as CodeBuild 0.2 does: the first failing command
    ends its phase) and go on as CodeBuild's phase transitions do: a failed install or pre_build
    ends the build, a failed build still runs post_build, unless the phase's `on-failure` says
    ABORT (end the build) or CONTINUE (the next phase). Later phases see
    CODEBUILD_BUILD_SUCCEEDING=0 after a failure, as on CodeBuild."""
    variables = {k: str(v) for k, v in (spec.get("env", {}).get("variables") or {}).items()}
    shell = spec.get("env", {}).get("shell", "sh")
    ran, succeeding = [], "1"
    for phase in PHASES:
        commands = (spec["phases"].get(phase) or {}).get("commands", [])
        if not commands:
            continue
        script = ["set -e"]
        for command in commands:
            pytest_args = pytest_arguments(command)
            if pytest_args is not None:
                _, otherwise, tail = command.partition(" || ")
                command = shlex.join([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      *pytest_args, str(test_file)]) + (f" || {tail}" if otherwise else "")
            elif phase == "install" and command.startswith("make "):
                command = "make -n " + command[len("make "):]
            script.append(command)
        # Project variables win over the buildspec's own defaults.
        result = subprocess.run([shell, "-c", "\n".join(script)], cwd=ROOT,
                                env={**variables, **env, "CODEBUILD_BUILD_SUCCEEDING": succeeding},
                                capture_output=True, text=True, timeout=300)
        ran.append((phase, result.returncode, result.stdout + result.stderr))
        if result.returncode == 0:
            continue
        succeeding = "0"
        on_failure = (spec["phases"].get(phase) or {}).get("on-failure")
        if on_failure == "CONTINUE":
            continue
        if on_failure == "ABORT" or phase in ("install", "pre_build"):
            break
        # A failed build phase: on to post_build (which runs whatever it holds).
    return ran


def test_tests_run_before_anything_touches_aws():
    spec = load_spec()
    assert spec["version"] == 0.2
    phases = spec["phases"]
    build = phases["build"]["commands"]
    tests = next(n for n, c in enumerate(build) if pytest_arguments(c) is not None)
    upsert = next(n for n, c in enumerate(build) if "invmon upsert" in c)
    start = next(n for n, c in enumerate(build) if "invmon start" in c)
    assert tests < upsert < start  # a failing test ends the phase before either
    assert "--commit-id \"$CODEBUILD_RESOLVED_SOURCE_VERSION\"" in build[start]
    earlier = [c for p in ("install", "pre_build") for c in (phases.get(p) or {}).get("commands", [])]
    assert not any("invmon" in c for c in earlier)
    # Nothing after the tests may ignore a failure (a `|| true`, a CONTINUE) and go on to AWS.
    assert phases["build"].get("on-failure") != "CONTINUE"
    assert not any("||" in c for c in build[tests:start + 1])


def test_the_report_cache_and_summary_are_declared():
    """The JUnit file the tests write is the one the report group reads; uv's and pip's download
    caches (where `make env` installs from, and the directories they are told to use) are kept;
    post_build prints the build's time and the execution."""
    spec = load_spec()
    (args,) = [pytest_arguments(c) for c in spec["phases"]["build"]["commands"] if pytest_arguments(c) is not None]
    (junit,) = [a.split("=", 1)[1] for a in args if a.startswith("--junitxml=")]
    (group,) = spec["reports"].values()
    assert group["file-format"] == "JUNITXML"
    assert f"{group['base-directory']}/{group['files'][0]}" == junit
    caches = [spec["env"]["variables"][name] for name in ("PIP_CACHE_DIR", "UV_CACHE_DIR")]
    assert spec["cache"]["paths"] == [f"{cache}/**/*" for cache in caches]
    # -B: the recipe as a fresh machine runs it, even where this checkout's environment is built.
    plan = subprocess.run(["make", "-n", "-B", "env", "PYTHON=python3.11"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})
    assert "uv pip install" in plan.stdout and "--no-cache" not in plan.stdout
    summary = " ".join(spec["phases"]["post_build"]["commands"])
    assert "CODEBUILD_START_TIME" in summary and "pipeline execution" in summary


@pytest.fixture
def server():
    with moto_server() as endpoint:  # one per test: each starts from an empty AWS
        yield endpoint


BUILD_STARTED_S_AGO = 125  # CODEBUILD_START_TIME is this long before the phases run


def codebuild_env(endpoint: str, tmp_path) -> dict:
    env = aws_env(endpoint_url=endpoint)
    env.update(AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, SAGEMAKER_ROLE_ARN=ROLE,
               SAGEMAKER_BUCKET=BUCKET, CODEBUILD_RESOLVED_SOURCE_VERSION=COMMIT,
               CODEBUILD_START_TIME=str(int((time.time() - BUILD_STARTED_S_AGO) * 1000)),
               EXECUTION_FILE=str(tmp_path / "pipeline-execution.txt"))
    return env


@pytest.fixture
def junit():
    """The report file the build writes (in the checkout's build/, as on CodeBuild)."""
    path = ROOT / "build" / "reports" / "junit.xml"
    path.unlink(missing_ok=True)
    yield path
    path.unlink(missing_ok=True)


def report_counts(path) -> dict:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k)) for k in ("tests", "failures", "errors")}


def summary(log: str) -> tuple[int, str]:
    """(seconds, execution) from post_build's two lines."""
    import re

    minutes, seconds = re.search(r"^build time: (\d+) min (\d+) s$", log, re.M).groups()
    return int(minutes) * 60 + int(seconds), re.search(r"^pipeline execution: (.+)$", log, re.M)[1]


def aws_state(endpoint: str) -> tuple[list, list]:
    import boto3

    with patched_environ(aws_env(endpoint_url=endpoint)):
        session = boto3.Session(region_name=REGION)
        pipelines = session.client("sagemaker").list_pipelines()["PipelineSummaries"]
        buckets = session.client("s3").list_buckets()["Buckets"]
    return pipelines, buckets


def test_a_failing_test_stops_the_build_before_upsert_and_is_reported(server, tmp_path, junit):
    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("def test_fine():\n    pass\n\ndef test_broken():\n    assert 1 + 1 == 3\n")
    ran = run_phases(load_spec(), codebuild_env(server, tmp_path), test_file)
    assert [(phase, rc == 0) for phase, rc, _ in ran] == [("install", True), ("build", False), ("post_build", True)]
    assert "1 failed" in ran[1][2] and "invmon upsert" not in ran[1][2]
    assert aws_state(server) == ([], [])  # upsert never reached AWS
    assert report_counts(junit) == {"tests": 2, "failures": 1, "errors": 0}  # the report, failed
    seconds, execution = summary(ran[-1][2])
    assert BUILD_STARTED_S_AGO <= seconds < BUILD_STARTED_S_AGO + 120 and execution == "none started"


@pytest.mark.slow
def test_the_stop_comes_from_the_order_of_the_build_commands(server, tmp_path, junit):
    """The same failing suite with `|| true` after it would go on to upsert: the stop above is
    the buildspec's doing (the first failing command ends the phase), not the simulator's."""
    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("def test_broken():\n    assert 1 + 1 == 3\n")
    spec = load_spec()
    commands = spec["phases"]["build"]["commands"]
    commands[:] = [c + " || true" if pytest_arguments(c) is not None else c for c in commands]
    ran = run_phases(spec, codebuild_env(server, tmp_path), test_file)
    assert "pipeline bin-count created" in ran[1][2]


@pytest.mark.slow
def test_a_passing_build_upserts_and_starts_the_pipeline(server, tmp_path, junit):
    import boto3

    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("def test_fine():\n    assert 1 + 1 == 2\n")
    ran = run_phases(load_spec(), codebuild_env(server, tmp_path), test_file)
    assert [(phase, rc) for phase, rc, _ in ran] == [("install", 0), ("build", 0), ("post_build", 0)], ran[1][2]
    build_log = ran[1][2]
    assert "pipeline bin-count created" in build_log and "started arn:" in build_log
    assert report_counts(junit) == {"tests": 1, "failures": 0, "errors": 0}
    seconds, printed = summary(ran[-1][2])
    assert BUILD_STARTED_S_AGO <= seconds < BUILD_STARTED_S_AGO + 300

    pipelines, buckets = aws_state(server)
    assert [p["PipelineName"] for p in pipelines] == ["bin-count"]
    assert [b["Name"] for b in buckets] == [BUCKET]  # SAGEMAKER_BUCKET was used
    with patched_environ(aws_env(endpoint_url=server)):
        sm = boto3.Session(region_name=REGION).client("sagemaker")
        (execution,) = sm.list_pipeline_executions(PipelineName="bin-count")["PipelineExecutionSummaries"]
        described = sm.describe_pipeline_execution(PipelineExecutionArn=execution["PipelineExecutionArn"])
        definition = json.loads(sm.describe_pipeline(PipelineName="bin-count")["PipelineDefinition"])
    assert described["PipelineExecutionDescription"] == f"CommitId={COMMIT}"
    arn = execution["PipelineExecutionArn"]
    assert printed == f"{arn} (follow it: invmon status {arn})"
    # The models it registers record the commit CodeBuild built, which upsert baked in.
    assert {p["Name"]: p.get("DefaultValue") for p in definition["Parameters"]}["CommitId"] == COMMIT
