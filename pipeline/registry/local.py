"""The local model registry: model package groups, versions, approval status and endpoints.

The local back-end of the SageMaker Model Registry, on SQLite (stdlib sqlite3). Several
processes may use one registry file at once (a pipeline run registering while a reviewer
approves): the database runs in WAL mode with a busy timeout, and every write is one
`BEGIN IMMEDIATE` transaction, so two runs registering at the same moment get distinct,
consecutive version numbers.

Endpoints are records of which model version an endpoint name serves. An endpoint named like a
production endpoint (see `is_production`) may only point at an Approved version.

Reads never take the write lock: a reader opens the file without creating or migrating it (WAL
lets it read while a writer holds the lock); only writes create the schema. SQLite failures (a
locked or corrupt file) become RegistryError with one line that names the file.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.digests import file_sha256
from pipeline.home import invmon_home
from typing import Iterator

STATUSES = ("PendingManualApproval", "Approved", "Rejected")
# 2: model_versions.properties (a version's own key/values, SageMaker's CustomerMetadataProperties).
SCHEMA_VERSION = 2
# The property naming the Evaluate step's report.html (a file:// or s3:// URI), on both back-ends.
REPORT_PROPERTY = "EvaluationReport"
# The monitoring baseline Evaluate made (baseline.json), what `invmon monitor` compares with.
BASELINE_PROPERTY = "MonitoringBaseline"
# The SHA-256 of model.tar.gz recorded at registration (hex), on both back-ends; every deploy
# checks the artifact against it (pipeline/registry/artifacts.py).
DIGEST_PROPERTY = "ArtifactSha256"
# The commit of the code that made the version, `<sha>` or `<sha>-dirty` (pipeline/lineage.py);
# SageMaker keeps it as MetadataProperties.CommitId.
COMMIT_PROPERTY = "CommitId"
# The staging endpoint's smoke test (steps/smoke.py), recorded on the version it tested (SageMaker:
# CustomerMetadataProperties, by UpdateModelPackage): passed or failed, a line saying why, and the
# run or execution that recorded it. `invmon models approve` refuses a version without "passed".
SMOKE_PROPERTY = "SmokeTest"
SMOKE_DETAIL_PROPERTY = "SmokeTestDetail"
SMOKE_RUN_PROPERTY = "SmokeTestRun"
SMOKE_PROPERTIES = (SMOKE_PROPERTY, SMOKE_DETAIL_PROPERTY, SMOKE_RUN_PROPERTY)
# A new version is registered with one of these: Approved is a reviewer's step (set_status).
REGISTRABLE = ("PendingManualApproval", "Rejected")
BUSY_TIMEOUT_MS = 30_000
# "bin-count-production", "bin-count-prod", "prod-bin-count", "production".
PRODUCTION_NAME = re.compile(r"(^|[-_.])prod(uction)?($|[-_.])", re.IGNORECASE)

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    group_name   TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('PendingManualApproval', 'Approved', 'Rejected')),
    artifact_uri TEXT    NOT NULL,
    metrics      TEXT    NOT NULL DEFAULT '{}',
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    run_id       TEXT,
    description  TEXT    NOT NULL DEFAULT '',
    note         TEXT    NOT NULL DEFAULT '',
    properties   TEXT    NOT NULL DEFAULT '{}',
    PRIMARY KEY (group_name, version)
);
CREATE TABLE IF NOT EXISTS endpoints (
    name       TEXT    PRIMARY KEY,
    group_name TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    updated_at TEXT    NOT NULL,
    FOREIGN KEY (group_name, version) REFERENCES model_versions (group_name, version)
);
CREATE TABLE IF NOT EXISTS endpoint_flags (
    name       TEXT    PRIMARY KEY,
    flag       TEXT    NOT NULL,
    flagged_at TEXT    NOT NULL
);
"""


class RegistryError(Exception):
    """A registry request that cannot be done; the message names the group, version or rule."""


class NotFoundError(RegistryError, LookupError):
    """No such model version or endpoint."""


@dataclass
class ModelVersion:
    group: str
    version: int
    status: str
    artifact_uri: str
    metrics: dict = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    run_id: str | None = None
    description: str = ""
    note: str = ""
    arn: str = ""  # the model package ARN on the SageMaker back-end
    properties: dict = field(default_factory=dict)  # e.g. REPORT_PROPERTY -> the report's URI
    commit_id: str = ""  # the code's commit (COMMIT_PROPERTY), empty when not recorded

    @property
    def name(self) -> str:
        return f"{self.group}/{self.version}"


@dataclass
class Endpoint:
    name: str
    group: str
    version: int
    updated_at: str
    flag: str = ""  # why this endpoint needs a person (e.g. it serves a Rejected version)
    status: str = ""  # the SageMaker back-end's EndpointStatus
    pending: int | None = None  # the version an update in progress switches it to (SageMaker)


def open_registry(home: str | os.PathLike | None = None) -> "LocalRegistry":
    return LocalRegistry(Path(home if home is not None else invmon_home()) / "registry.db")


def is_production(endpoint_name: str) -> bool:
    return bool(PRODUCTION_NAME.search(endpoint_name))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise RegistryError(f"unknown approval status {status!r}; use one of {', '.join(STATUSES)}")


def _version_number(version: int | str) -> int:
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(version).strip() != str(number):
        raise RegistryError(f"model version must be a whole number from 1, got {version!r}")
    return number


def _version_from_row(row: sqlite3.Row) -> ModelVersion:
    properties = json.loads(row["properties"]) if "properties" in row.keys() else {}
    return ModelVersion(
        group=row["group_name"], version=row["version"], status=row["status"],
        artifact_uri=row["artifact_uri"], metrics=json.loads(row["metrics"]),
        created_at=row["created_at"], updated_at=row["updated_at"], run_id=row["run_id"],
        description=row["description"], note=row["note"],
        # A registry of schema 1 (not migrated by a read) has no properties column.
        properties=properties,
        commit_id=properties.get(COMMIT_PROPERTY, ""),
    )


def smoke_problem(version: ModelVersion) -> str | None:
    """Why `version` may not be approved as far as its staging smoke test goes, or None: it must
    have passed, and the verdict must come from the run that registered it (a verdict copied from
    another run's test says nothing about this version's endpoint)."""
    result = version.properties.get(SMOKE_PROPERTY)
    if result is None:
        return (f"{version.name} has no staging smoke test result: its run stopped before SmokeTest "
                "finished, or it was registered outside the pipeline")
    detail = version.properties.get(SMOKE_DETAIL_PROPERTY, "")
    if result != "passed":
        return f"{version.name} failed its staging smoke test" + (f": {detail}" if detail else "")
    tested_by = version.properties.get(SMOKE_RUN_PROPERTY, "")
    if version.run_id and tested_by != version.run_id:
        return (f"{version.name}'s smoke test result was recorded by {tested_by or 'an unknown run'}, not by "
                f"{version.run_id}, the run that registered it")
    return None


def _endpoint_from_row(row: sqlite3.Row, flags: dict[str, str]) -> Endpoint:
    return Endpoint(name=row["name"], group=row["group_name"], version=row["version"],
                    updated_at=row["updated_at"], flag=flags.get(row["name"], ""))


class LocalRegistry:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ready = False

    # ------------------------------------------------------------------ connection

    def _sqlite_error(self, exc: sqlite3.Error) -> RegistryError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return RegistryError(f"registry {self.path} is locked by another writer (waited "
                                 f"{BUSY_TIMEOUT_MS / 1000:.0f} s); try again when it finishes")
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError) \
                or "malformed" in text or "not a database" in text:
            return RegistryError(f"registry {self.path} is damaged ({text}); move it aside and "
                                 "restore a backup")
        return RegistryError(f"registry {self.path}: {text}")

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A short-lived connection per call: nothing is shared between threads or processes.

        A read of a registry that does not exist yet reads an empty in-memory one: reading
        never creates the file, migrates it or takes its write lock.
        """
        try:
            if not write and not self._initialised():
                conn = sqlite3.connect(":memory:", isolation_level=None)
                self._create_schema(conn)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: we issue BEGIN ourselves, so each write is exactly one transaction.
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc) from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if write and not self._ready:
                self._create_schema(conn)
                self._ready = True
            elif not write:
                self._check_readable(conn)
            yield conn
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc) from None
        finally:
            conn.close()

    def _initialised(self) -> bool:
        """Whether a write has created the registry's tables in the file (a plain read)."""
        if not self.path.exists():
            return False
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            return self._has_table(conn, "model_versions")
        finally:
            conn.close()

    def _check_readable(self, conn: sqlite3.Connection) -> None:
        """Refuse a registry newer than this code; never writes (query_only)."""
        conn.execute("PRAGMA query_only = ON")
        if self._has_table(conn, "schema_version"):
            found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            if found is not None and found > SCHEMA_VERSION:
                raise RegistryError(f"{self.path} has registry schema {found}, newer than this "
                                    f"invmon understands ({SCHEMA_VERSION}); upgrade invmon")

    @staticmethod
    def _has_table(conn: sqlite3.Connection, table: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (table,)).fetchone() is not None

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        self._enter_wal(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Statement by statement: executescript() would commit our transaction first.
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            found = row[0]
            if found is not None and found > SCHEMA_VERSION:
                raise RegistryError(f"{self.path} has registry schema {found}, newer than this "
                                    f"invmon understands ({SCHEMA_VERSION}); upgrade invmon")
            columns = {r[1] for r in conn.execute("PRAGMA table_info(model_versions)")}
            if "properties" not in columns:  # schema 1 -> 2, in the same transaction
                conn.execute("ALTER TABLE model_versions ADD COLUMN properties TEXT NOT NULL DEFAULT '{}'")
            if found is None or found < SCHEMA_VERSION:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _enter_wal(conn: sqlite3.Connection) -> None:
        """WAL: readers never block the writer, and writers queue on the busy timeout.

        Switching a new file into WAL needs the exclusive lock, and when two processes switch it
        at once SQLite answers "locked" at once instead of waiting (waiting could deadlock). So
        retry up to the busy timeout; once the file is in WAL the pragma is a no-op.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so a
        read-then-insert (the next version number) cannot interleave with another writer."""
        with self._connect(write=True) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def schema_version(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    # ------------------------------------------------------------------ model versions

    def register(self, group: str, artifact_uri: str, metrics: dict | None = None,
                 status: str = "PendingManualApproval", run_id: str | None = None,
                 description: str = "", properties: dict[str, str] | None = None,
                 artifact_sha256: str | None = None) -> ModelVersion:
        """Add the next version (1, 2, 3, ...) of `group`, never as Approved.

        The artifact's SHA-256 is recorded (`DIGEST_PROPERTY`): the one given, checked against
        the file when it is here, else the file's own.
        """
        if not group:
            raise RegistryError("model package group name is empty")
        _check_status(status)
        if status not in REGISTRABLE:
            raise RegistryError(f"the registry registers a new version as PendingManualApproval (or "
                                f"Rejected), not {status}: approving is a reviewer's step "
                                f"(invmon models approve V)")
        metrics_json = json.dumps(metrics or {})
        properties = {str(k): str(v) for k, v in (properties or {}).items()}
        if os.path.isfile(artifact_uri):
            found = file_sha256(artifact_uri)
            if artifact_sha256 and artifact_sha256 != found:
                raise RegistryError(f"refused to register {artifact_uri}: its SHA-256 is {found}, "
                                    f"not the {artifact_sha256} it was registered with")
            artifact_sha256 = found
        if artifact_sha256:
            properties[DIGEST_PROPERTY] = artifact_sha256
        now = _now()
        with self._write() as conn:
            (version,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions WHERE group_name = ?",
                (group,)).fetchone()
            conn.execute(
                "INSERT INTO model_versions (group_name, version, status, artifact_uri, metrics,"
                " created_at, updated_at, run_id, description, properties)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (group, version, status, str(artifact_uri), metrics_json, now, now, run_id,
                 description, json.dumps(properties)))
        return ModelVersion(group, version, status, str(artifact_uri), json.loads(metrics_json),
                            now, now, run_id, description, "", properties=properties,
                            commit_id=properties.get(COMMIT_PROPERTY, ""))

    def list_versions(self, group: str | None = None) -> list[ModelVersion]:
        with self._connect() as conn:
            if group is None:
                rows = conn.execute("SELECT * FROM model_versions ORDER BY group_name, version")
            else:
                rows = conn.execute("SELECT * FROM model_versions WHERE group_name = ? "
                                    "ORDER BY version", (group,))
            return [_version_from_row(r) for r in rows.fetchall()]

    def get(self, group: str, version: int) -> ModelVersion:
        with self._connect() as conn:
            return self._get(conn, group, version)

    def _get(self, conn: sqlite3.Connection, group: str, version: int) -> ModelVersion:
        version = _version_number(version)
        row = conn.execute("SELECT * FROM model_versions WHERE group_name = ? AND version = ?",
                           (group, version)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute(
                "SELECT version FROM model_versions WHERE group_name = ? ORDER BY version", (group,))]
            hint = (f"versions of {group!r}: {', '.join(map(str, known))}" if known
                    else f"no model package group {group!r} in {self.path}")
            raise NotFoundError(f"model version {group}/{version} not found ({hint})")
        return _version_from_row(row)

    def set_status(self, group: str, version: int, status: str, note: str = "") -> ModelVersion:
        _check_status(status)
        with self._write() as conn:
            self._get(conn, group, version)
            conn.execute("UPDATE model_versions SET status = ?, note = ?, updated_at = ? "
                         "WHERE group_name = ? AND version = ?",
                         (status, note, _now(), group, int(version)))
            return self._get(conn, group, version)

    def set_properties(self, group: str, version: int, properties: dict[str, str]) -> ModelVersion:
        """Add or replace some of a version's properties (SageMaker: UpdateModelPackage's
        CustomerMetadataProperties, which merges the same way). The artifact's SHA-256 is
        recorded at registration and never changed."""
        if DIGEST_PROPERTY in properties:
            raise RegistryError(f"{DIGEST_PROPERTY} is recorded when a version is registered and never changed")
        with self._write() as conn:
            model = self._get(conn, group, version)
            merged = {**model.properties, **{str(k): str(v) for k, v in properties.items()}}
            conn.execute("UPDATE model_versions SET properties = ?, updated_at = ? "
                         "WHERE group_name = ? AND version = ?",
                         (json.dumps(merged), _now(), group, int(version)))
            return self._get(conn, group, version)

    def latest(self, group: str, status: str | None = None) -> ModelVersion | None:
        """The highest version of `group` (with `status`, if given), or None."""
        if status is not None:
            _check_status(status)
        with self._connect() as conn:
            row = conn.execute(
                "SELECT * FROM model_versions WHERE group_name = ? AND (? IS NULL OR status = ?) "
                "ORDER BY version DESC LIMIT 1", (group, status, status)).fetchone()
            return _version_from_row(row) if row else None

    def groups(self) -> list[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute(
                "SELECT DISTINCT group_name FROM model_versions ORDER BY group_name")]

    # ------------------------------------------------------------------ endpoints

    def deploy(self, name: str, group: str, version: int,
               require_approved: bool | None = None) -> Endpoint:
        """Point endpoint `name` at `group/version` (create or update).

        `require_approved` defaults to whether `name` is a production endpoint name; a
        production endpoint requires an Approved version whatever the caller passes.
        """
        if not name:
            raise RegistryError("endpoint name is empty")
        need_approval = bool(require_approved) or is_production(name)
        with self._write() as conn:
            # Checked inside the write transaction: the status cannot change under us.
            model = self._get(conn, group, version)
            if need_approval and model.status != "Approved":
                why = "a production endpoint" if is_production(name) else "this deployment"
                raise RegistryError(
                    f"cannot deploy {group}/{version} to endpoint {name!r}: its status is "
                    f"{model.status}, and {why} serves only Approved models "
                    f"(approve it first: invmon models approve {group} {version})")
            now = _now()
            conn.execute(
                "INSERT INTO endpoints (name, group_name, version, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET group_name = excluded.group_name, "
                "version = excluded.version, updated_at = excluded.updated_at",
                (name, group, int(version), now))
            conn.execute("DELETE FROM endpoint_flags WHERE name = ?", (name,))
        return Endpoint(name, group, int(version), now)

    def flag_endpoint(self, name: str, flag: str) -> Endpoint:
        """Mark an endpoint as needing a person (shown by `invmon endpoints`); a deploy clears it."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM endpoints WHERE name = ?", (name,)).fetchone() is None:
                raise NotFoundError(f"no endpoint named {name!r}")
            conn.execute("INSERT INTO endpoint_flags (name, flag, flagged_at) VALUES (?, ?, ?) "
                         "ON CONFLICT (name) DO UPDATE SET flag = excluded.flag, "
                         "flagged_at = excluded.flagged_at", (name, flag, _now()))
        return self.get_endpoint(name)

    def _flags(self, conn: sqlite3.Connection) -> dict[str, str]:
        if not self._has_table(conn, "endpoint_flags"):  # a registry written by an older invmon
            return {}
        return {r[0]: r[1] for r in conn.execute("SELECT name, flag FROM endpoint_flags")}

    def set_endpoint(self, name: str, group: str, version: int) -> Endpoint:
        """Create or update an endpoint record; production names still require Approved."""
        return self.deploy(name, group, version, require_approved=False)

    def get_endpoint(self, name: str) -> Endpoint:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM endpoints WHERE name = ?", (name,)).fetchone()
            if row is None:
                known = [r[0] for r in conn.execute("SELECT name FROM endpoints ORDER BY name")]
                raise NotFoundError(f"no endpoint named {name!r} "
                                    f"(known: {', '.join(known) or 'none'})")
            return _endpoint_from_row(row, self._flags(conn))

    def list_endpoints(self) -> list[Endpoint]:
        with self._connect() as conn:
            flags = self._flags(conn)
            rows = conn.execute("SELECT * FROM endpoints ORDER BY name").fetchall()
            return [_endpoint_from_row(r, flags) for r in rows]
