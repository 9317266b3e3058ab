"""From approval to production on the local back-end: `invmon deploy`, `invmon endpoints`,
approve/reject with notes, rollback and flags, the staging-only rule for pipeline runs, and
registry errors as one line. Real SQLite files, the real CLI entry point."""
from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.registry.local import RegistryError, open_registry
from pipeline.registry.local_target import LocalTarget
from pipeline.registry.stages import DeployError, endpoint_name

GROUP = "bin-count"


@pytest.fixture
def registry(invmon_home, tmp_path):
    """Three versions of bin-count with real (tiny) artifact files, each with a passing staging
    smoke test (approve's refusal of the others: tests/test_smoke.py)."""
    reg = open_registry(invmon_home)
    for n in (1, 2, 3):
        artifact = tmp_path / f"m{n}" / "model.tar.gz"
        artifact.parent.mkdir()
        artifact.write_bytes(b"model %d" % n)
        reg.register(GROUP, str(artifact), {}, properties={"SmokeTest": "passed"})
    return reg


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def serving(registry, stage="prod") -> int | None:
    endpoint = LocalTarget(registry).current(endpoint_name(GROUP, stage))
    return endpoint.version if endpoint else None


def test_stage_endpoint_names_are_fixed_per_group():
    assert endpoint_name("bin-count", "staging") == "bin-count-staging"
    assert endpoint_name("other", "prod") == "other-production"
    with pytest.raises(DeployError, match="unknown stage"):
        endpoint_name("bin-count", "canary")


def test_deploy_prod_takes_only_approved_and_refusal_changes_nothing(registry, capsys):
    code, _, err = run(capsys, "deploy", "--stage", "prod")
    assert code == 1 and "bin-count has no Approved version" in err and "Traceback" not in err
    registry.set_status(GROUP, 2, "Rejected")
    for version, status in ((1, "PendingManualApproval"), (2, "Rejected")):
        code, _, err = run(capsys, "deploy", "--stage", "prod", "--version", str(version))
        assert code == 1
        assert f"refused: bin-count/{version} is {status}" in err and "nothing was changed" in err
    assert registry.list_endpoints() == []

    registry.set_status(GROUP, 1, "Approved")
    registry.set_status(GROUP, 3, "Approved")
    code, out, _ = run(capsys, "deploy", "--stage", "prod")  # the newest Approved
    assert code == 0 and "bin-count-production now serves bin-count/3" in out
    code, out, _ = run(capsys, "deploy", "--stage", "prod", "--version", "1")  # in place
    assert code == 0 and "now serves bin-count/1 (was version 3)" in out
    assert [e.name for e in registry.list_endpoints()] == ["bin-count-production"]
    code, out, _ = run(capsys, "deploy", "--stage", "prod", "--version", "1")
    assert code == 0 and "already serves bin-count/1" in out


def test_staging_takes_a_named_version_of_any_status(registry, capsys):
    code, out, _ = run(capsys, "deploy", "--stage", "staging", "--version", "2")
    assert code == 0 and "bin-count-staging now serves bin-count/2" in out
    assert serving(registry, "staging") == 2 and serving(registry) is None


def test_approve_deploys_to_production_and_keeps_the_note(registry, capsys):
    code, out, _ = run(capsys, "models", "approve", "2", "--note", "checked the confusion matrix")
    assert code == 0 and "production endpoint bin-count-production now serves version 2" in out
    assert registry.get(GROUP, 2).note == "checked the confusion matrix"
    code, out, _ = run(capsys, "models", "show", "2")
    assert '"note": "checked the confusion matrix"' in out

    code, out, _ = run(capsys, "endpoints")
    production = next(line for line in out.splitlines() if line.startswith("prod"))
    assert "bin-count-production" in production and " 2 " in production
    assert "absent" in next(line for line in out.splitlines() if line.startswith("staging"))


def test_a_failed_deploy_keeps_the_approval_and_production_unchanged(registry, capsys):
    assert run(capsys, "models", "approve", "1")[0] == 0
    Path(registry.get(GROUP, 2).artifact_uri).unlink()  # the deploy of version 2 will fail
    code, _, err = run(capsys, "models", "approve", "2", "--note", "ship it")
    assert code == 1
    assert "bin-count/2 is Approved, but deploying it to production failed" in err
    assert "production still serves version 1" in err and "Traceback" not in err
    assert registry.get(GROUP, 2).status == "Approved" and registry.get(GROUP, 2).note == "ship it"
    assert serving(registry) == 1


def test_rejecting_what_production_serves_rolls_back_to_the_newest_other_approved(registry, capsys):
    for version in (1, 2, 3):
        assert run(capsys, "models", "approve", str(version))[0] == 0
    assert serving(registry) == 3
    code, out, _ = run(capsys, "models", "reject", "3", "--note", "miscounts taped bins")
    assert code == 0 and "rolled back from Rejected version 3 to bin-count/2" in out
    assert serving(registry) == 2
    assert registry.get(GROUP, 3).note == "miscounts taped bins"
    code, out, _ = run(capsys, "models", "reject", "1")  # not served: production untouched
    assert code == 0 and "rolled back" not in out and serving(registry) == 2


def test_rejecting_the_only_approved_version_leaves_production_flagged(registry, capsys):
    assert run(capsys, "models", "approve", "1")[0] == 0
    code, out, _ = run(capsys, "models", "reject", "1", "--note", "bad")
    assert code == 0 and "no other Approved version" in out and "flagged" in out
    assert serving(registry) == 1
    assert "serves Rejected version 1" in registry.get_endpoint("bin-count-production").flag
    code, out, _ = run(capsys, "endpoints")
    assert "serves Rejected version 1" in out
    # Serving a flagged production endpoint is refused: it points at a Rejected version.
    code, _, err = run(capsys, "predict", "--endpoint", "bin-count-production", __file__)
    assert code == 1 and "Rejected" in err
    # The next approval replaces it and clears the flag.
    assert run(capsys, "models", "approve", "2")[0] == 0
    assert serving(registry) == 2 and registry.get_endpoint("bin-count-production").flag == ""


def test_a_swapped_artifact_is_refused_at_deploy_and_serve_naming_both_digests(registry, capsys):
    assert run(capsys, "models", "approve", "1")[0] == 0
    registry.set_status(GROUP, 2, "Approved")
    artifact = Path(registry.get(GROUP, 2).artifact_uri)
    recorded = registry.get(GROUP, 2).properties["ArtifactSha256"]
    assert recorded == hashlib.sha256(b"model 2").hexdigest()  # recorded at registration
    artifact.write_bytes(b"another model, same path")
    code, _, err = run(capsys, "deploy", "--stage", "prod", "--version", "2")
    assert code == 1 and "Traceback" not in err
    assert (f"refused: the artifact of bin-count/2 is not the one registered: {artifact} has SHA-256 "
            f"{hashlib.sha256(b'another model, same path').hexdigest()}, the registry recorded {recorded}") in err
    assert serving(registry) == 1
    # An endpoint already pointing at it will not serve the swapped bytes either.
    assert run(capsys, "deploy", "--stage", "staging", "--version", "3")[0] == 0
    Path(registry.get(GROUP, 3).artifact_uri).write_bytes(b"swapped after the deploy")
    code, _, err = run(capsys, "serve", "--endpoint", "bin-count-staging")
    assert code == 1 and "the artifact of bin-count/3 is not the one registered" in err


def test_reject_that_cannot_read_production_fails_and_flags(registry, capsys, monkeypatch):
    assert run(capsys, "models", "approve", "1")[0] == 0
    assert run(capsys, "models", "approve", "2")[0] == 0

    def unreadable(self, name):
        raise RegistryError(f"registry {self.registry.path} is locked by another writer")

    with monkeypatch.context() as patch:
        patch.setattr(LocalTarget, "current", unreadable)
        code, out, err = run(capsys, "models", "reject", "2")
    assert code == 1 and "rolled back" not in out and "Traceback" not in err
    assert ("bin-count/2 is Rejected, but what bin-count-production serves could not be read (registry "
            in err and "is locked by another writer); it is flagged: check it with invmon endpoints" in err)
    assert registry.get(GROUP, 2).status == "Rejected"
    assert "not read after bin-count/2 was rejected" in registry.get_endpoint("bin-count-production").flag
    code, out, _ = run(capsys, "models", "reject", "2")  # once it can be read, the rollback happens
    assert code == 0 and "rolled back from Rejected version 2 to bin-count/1" in out


def test_registry_errors_are_one_line(invmon_home, registry, capsys, monkeypatch):
    code, _, err = run(capsys, "models", "approve", "9")
    assert code == 1 and "model version bin-count/9 not found" in err and "Traceback" not in err

    # Locked: another process holds the write lock; a write waits (briefly here), then says so.
    monkeypatch.setattr("pipeline.registry.local.BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(invmon_home / "registry.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        code, _, err = run(capsys, "models", "approve", "1")
        assert code == 1 and "is locked by another writer" in err and "Traceback" not in err
        # ...while reading never takes the write lock: list, show and endpoints still answer.
        assert run(capsys, "models", "list")[0] == 0
        assert run(capsys, "endpoints")[0] == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert registry.get(GROUP, 1).status == "PendingManualApproval"

    (invmon_home / "registry.db").write_bytes(b"this is not a database" * 100)
    for f in ("registry.db-wal", "registry.db-shm"):
        (invmon_home / f).unlink(missing_ok=True)
    for argv in (("models", "list"), ("models", "approve", "1"), ("endpoints",)):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "is damaged" in err and err.count("\n") == 1, err


def test_reading_a_missing_registry_creates_nothing(invmon_home, capsys):
    assert run(capsys, "models", "list")[0] == 0
    assert run(capsys, "endpoints")[0] == 0
    assert not (invmon_home / "registry.db").exists()


@pytest.mark.parametrize("params", [
    {"StagingEndpointName": "bin-count-production"},
    {"StagingEndpointName": "bin-count-prod"},
    {"ModelPackageGroupName": "other"},  # bin-count-staging is not other's staging endpoint
])
def test_a_run_naming_another_endpoint_is_refused_before_any_step(params, invmon_home):
    from pipeline.local.runner import LocalRun
    from pipeline.dag.profiles import defaults
    from steps import DAG

    run = LocalRun.create(invmon_home, DAG, {**defaults("local"), **params}, "local",
                          echo=lambda line: None)
    state = run.execute()
    assert state["status"] == "Failed" and "refused" in state["failure"]
    assert "deploys only to its group's staging endpoint" in state["failure"]
    assert all(s["status"] == "Pending" for s in state["steps"].values())
    assert open_registry(invmon_home).list_endpoints() == []


def test_the_cli_run_refuses_production_in_one_line(invmon_home):
    invmon_home.mkdir(parents=True, exist_ok=True)  # --data must exist: the refusal is about the endpoint
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run",
         "--param", "StagingEndpointName=bin-count-production", "--data", str(invmon_home)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "StagingEndpointName=bin-count-production refused" in done.stdout
    assert "Traceback" not in done.stderr


def test_a_run_cannot_register_its_model_as_approved(invmon_home):
    """The approval status is no parameter: a run asking for Approved is refused before it
    starts, and the registry itself refuses to register a version as Approved."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--param", "ModelApprovalStatus=Approved",
         "--data", str(invmon_home)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "invmon: error: ModelApprovalStatus=Approved refused: a run registers its model as "
        "PendingManualApproval; only a reviewer approves it (invmon models approve V, or the "
        "Model Registry on AWS)"]
    assert not (invmon_home / "runs").exists()  # no run was created
    with pytest.raises(RegistryError, match="registers a new version as PendingManualApproval"):
        open_registry(invmon_home).register(GROUP, "/m.tar.gz", {}, status="Approved")
    assert open_registry(invmon_home).list_versions() == []
