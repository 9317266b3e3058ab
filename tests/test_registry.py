"""The local model registry on a real SQLite file, including two processes writing at once."""
from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import datetime

import pytest

from pipeline.home import invmon_home as invmon_home_dir

from pipeline.registry.local import (Endpoint, LocalRegistry, ModelVersion, NotFoundError, RegistryError,
                               is_production, open_registry)

METRICS = {"multiclass_classification_metrics":
           {"accuracy": {"value": 0.71, "standard_deviation": 0.02}}}


@pytest.fixture
def registry(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry.db")


def test_versions_increment_per_group(registry):
    first = registry.register("bin-count", "/runs/a/model.tar.gz", METRICS, run_id="run-a")
    second = registry.register("bin-count", "/runs/b/model.tar.gz", {})
    other = registry.register("other-group", "/runs/c/model.tar.gz", {})
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert first.status == "PendingManualApproval"
    assert registry.groups() == ["bin-count", "other-group"]
    assert [v.version for v in registry.list_versions("bin-count")] == [1, 2]
    assert [(v.group, v.version) for v in registry.list_versions()] == [
        ("bin-count", 1), ("bin-count", 2), ("other-group", 1)]


def test_record_round_trips_and_persists_across_connections(tmp_path):
    path = tmp_path / "registry.db"
    made = LocalRegistry(path).register("bin-count", "s3://bucket/model.tar.gz", METRICS,
                                        status="Rejected", run_id="run-7", description="first",
                                        properties={"EvaluationReport": "file:///reports/run-7.html"},
                                        artifact_sha256="ab" * 32)
    got = LocalRegistry(path).get("bin-count", 1)  # a new object, new connections
    assert isinstance(got, ModelVersion)
    assert got == made
    assert got.metrics["multiclass_classification_metrics"]["accuracy"]["value"] == 0.71
    assert got.properties == {"EvaluationReport": "file:///reports/run-7.html", "ArtifactSha256": "ab" * 32}
    assert datetime.fromisoformat(got.created_at).utcoffset().total_seconds() == 0  # ISO UTC
    # The file is a real SQLite database, in WAL mode, with a schema version.
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    assert LocalRegistry(path).schema_version() == 2


def test_a_schema_1_registry_is_read_as_is_and_migrated_by_the_first_write(tmp_path):
    """A registry written before versions had properties (schema 1, no properties column)."""
    from pipeline.registry import local as module

    path = tmp_path / "registry.db"
    schema_1 = module.SCHEMA.replace("    properties   TEXT    NOT NULL DEFAULT '{}',\n", "")
    assert "properties" not in schema_1
    with sqlite3.connect(path) as conn:
        conn.executescript(schema_1)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute("INSERT INTO model_versions (group_name, version, status, artifact_uri, created_at,"
                     " updated_at) VALUES ('bin-count', 1, 'Approved', '/old/model.tar.gz', 't', 't')")
    old = LocalRegistry(path)
    assert old.get("bin-count", 1).properties == {} and old.schema_version() == 1  # a read never migrates
    new = old.register("bin-count", "/new/model.tar.gz", properties={"EvaluationReport": "file:///r.html"})
    assert new.version == 2 and old.schema_version() == 2
    assert LocalRegistry(path).get("bin-count", 2).properties == {"EvaluationReport": "file:///r.html"}
    assert LocalRegistry(path).get("bin-count", 1).artifact_uri == "/old/model.tar.gz"
    with sqlite3.connect(path) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(model_versions)")]
    assert columns[-1] == "properties"


def test_get_missing_names_group_and_version(registry):
    with pytest.raises(NotFoundError, match="bin-count/3.*no model package group"):
        registry.get("bin-count", 3)
    registry.register("bin-count", "/m.tar.gz", {})
    with pytest.raises(RegistryError, match=r"bin-count/3 not found \(versions of 'bin-count': 1\)"):
        registry.get("bin-count", 3)
    with pytest.raises(LookupError):
        registry.get("bin-count", 9)
    with pytest.raises(RegistryError, match="whole number"):
        registry.get("bin-count", "latest")


def test_status_is_validated_and_updated(registry):
    with pytest.raises(RegistryError, match="unknown approval status 'approved'"):
        registry.register("bin-count", "/m.tar.gz", {}, status="approved")
    assert registry.list_versions() == []  # nothing half-written
    registry.register("bin-count", "/m.tar.gz", {})
    with pytest.raises(RegistryError, match="unknown approval status 'Deployed'"):
        registry.set_status("bin-count", 1, "Deployed")
    before = registry.get("bin-count", 1)
    after = registry.set_status("bin-count", 1, "Approved", note="looks good")
    assert (after.status, after.note) == ("Approved", "looks good")
    assert after.updated_at >= before.updated_at and after.created_at == before.created_at
    assert registry.get("bin-count", 1).status == "Approved"
    with pytest.raises(NotFoundError, match="bin-count/2"):
        registry.set_status("bin-count", 2, "Rejected")


def test_latest_with_and_without_status(registry):
    assert registry.latest("bin-count") is None
    for _ in range(3):
        registry.register("bin-count", "/m.tar.gz", {})
    registry.set_status("bin-count", 2, "Approved")
    assert registry.latest("bin-count").version == 3
    assert registry.latest("bin-count", status="Approved").version == 2
    assert registry.latest("bin-count", status="Rejected") is None


PER_WORKER = 100  # enough that the two processes overlap for many transactions


def _register_many(path: str, worker: int, count: int, start, results) -> None:
    registry = LocalRegistry(path)
    start.wait()  # both processes begin together, so their transactions really collide
    try:
        versions = [registry.register("bin-count", f"/w{worker}/{i}.tar.gz", {"i": i}).version
                    for i in range(count)]
    except Exception as exc:  # report it, so the test fails at once with the cause
        versions = f"{type(exc).__name__}: {exc}"
    results.put((worker, versions))


def test_two_processes_registering_at_once_get_distinct_consecutive_versions(tmp_path):
    path = str(tmp_path / "registry.db")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has torch threads
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_register_many, args=(path, w, PER_WORKER, start, results))
               for w in range(2)]
    for p in workers:
        p.start()
    start.set()
    got = dict(results.get(timeout=120) for _ in workers)
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [v for v in got.values() if isinstance(v, str)]
    assert not errors, f"a registering process failed: {errors}"
    mine = got[0] + got[1]
    assert sorted(mine) == list(range(1, 2 * PER_WORKER + 1))
    # The stored rows match what each worker was told.
    stored = {v.version: v.artifact_uri for v in LocalRegistry(path).list_versions("bin-count")}
    assert sorted(stored) == list(range(1, 2 * PER_WORKER + 1))
    for worker, versions in got.items():
        assert all(stored[v].startswith(f"/w{worker}/") for v in versions)


FRESH_FILES = 40  # each a race to create the file; without the WAL retry 2-14 of 80 failed


def _create_in_step(paths: list[str], worker: int, barrier, results) -> None:
    errors = []
    for path in paths:
        barrier.wait()  # both processes open the same new file together
        try:
            LocalRegistry(path).register("bin-count", f"/w{worker}.tar.gz", {})
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    results.put(errors)


def test_two_processes_creating_a_new_registry_at_once_both_register(tmp_path):
    """Two runs whose first registration creates the same file: switching a new file into WAL
    answers "locked" at once (no busy wait) to the process that loses, which must wait, not fail."""
    paths = [str(tmp_path / f"r{i}.db") for i in range(FRESH_FILES)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_create_in_step, args=(paths, w, barrier, results))
               for w in range(2)]
    for p in workers:
        p.start()
    errors = [e for _ in workers for e in results.get(timeout=120)]
    for p in workers:
        p.join(timeout=60)
    assert not errors, f"{len(errors)} of {2 * FRESH_FILES} first registrations failed: {errors[0]}"
    for path in paths:
        assert [v.version for v in LocalRegistry(path).list_versions("bin-count")] == [1, 2]


def test_endpoints_create_update_and_list(registry):
    registry.register("bin-count", "/a.tar.gz", {})
    registry.register("bin-count", "/b.tar.gz", {})
    created = registry.set_endpoint("bin-count-staging", "bin-count", 1)
    assert isinstance(created, Endpoint) and (created.group, created.version) == ("bin-count", 1)
    updated = registry.set_endpoint("bin-count-staging", "bin-count", 2)
    assert registry.get_endpoint("bin-count-staging") == updated
    assert [e.name for e in registry.list_endpoints()] == ["bin-count-staging"]
    with pytest.raises(NotFoundError, match="bin-count/7"):
        registry.set_endpoint("bin-count-staging", "bin-count", 7)
    assert registry.get_endpoint("bin-count-staging").version == 2
    with pytest.raises(NotFoundError, match="no endpoint named 'nope'.*bin-count-staging"):
        registry.get_endpoint("nope")


def test_production_serves_only_approved_versions(registry):
    assert is_production("bin-count-production") and is_production("prod-bin-count")
    assert not is_production("bin-count-staging") and not is_production("productive")
    registry.register("bin-count", "/a.tar.gz", {})
    with pytest.raises(RegistryError, match="status is PendingManualApproval.*only Approved"):
        registry.deploy("bin-count-production", "bin-count", 1, require_approved=False)
    with pytest.raises(RegistryError, match="only Approved"):
        registry.set_endpoint("bin-count-production", "bin-count", 1)  # no back door
    with pytest.raises(RegistryError, match="only Approved"):
        registry.deploy("canary", "bin-count", 1, require_approved=True)
    assert registry.list_endpoints() == []
    registry.deploy("bin-count-staging", "bin-count", 1, require_approved=False)
    registry.set_status("bin-count", 1, "Approved")
    live = registry.deploy("bin-count-production", "bin-count", 1, require_approved=True)
    assert registry.get_endpoint("bin-count-production") == live
    registry.set_status("bin-count", 1, "Rejected")
    with pytest.raises(RegistryError, match="status is Rejected"):
        registry.deploy("bin-count-production", "bin-count", 1, require_approved=True)


def test_open_registry_uses_invmon_home(invmon_home):
    assert invmon_home_dir() == invmon_home.resolve()
    registry = open_registry()
    registry.register("bin-count", "/m.tar.gz", {})
    assert (invmon_home / "registry.db").is_file()
    assert open_registry(invmon_home).get("bin-count", 1).artifact_uri == "/m.tar.gz"
