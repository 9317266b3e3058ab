"""The local runner: executes the DAG in steps/ on this machine.

Every run has a folder, $INVMON_HOME/runs/<run id>/, with run.json (parameters, each step's
status, outputs, properties and errors) and one folder per step (its staged code, log and
outputs). A failed run keeps everything its finished steps produced and can be resumed from the
failed step; steps declared `cache=True` reuse an earlier identical result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline import lineage
from pipeline.alerts import notify
from pipeline.dag.compile import Resolver, StepRequest, compile_dag, lower, parse_step_ref
from pipeline.local import envs, jobs
from pipeline.digests import tree_sha256
from pipeline.home import step_envs
from pipeline.local.cache import StepCache, cache_key, link_tree
from pipeline.local.tuner import Tuner
from steps.base import ContinuousRange, Dag, MetricDefinition

SYNTHETIC_PER_CLASS = 300
FEATURE_CACHE = "feature-cache"  # in the run's folder: train.py's cache of frozen-layer outputs
# Where a step that reads the registry finds the local one's listing (scripts/evaluate/previous.py).
REGISTRY_LISTING_ENV = "INVMON_MODEL_REGISTRY"
# Where a job that calls an endpoint (scripts/smoke/) finds the local one the runner serves for it.
ENDPOINT_URL_ENV = "INVMON_ENDPOINT_URL"


class RunFailed(RuntimeError):
    """The run stopped at a failed step (the step's error is the message)."""


class RunLocked(RuntimeError):
    """Another process is executing this run right now."""


class RunStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: every job was stopped and the run recorded as Stopped."""


# Errors of the machine rather than of the step: one line that says what to fix.
OS_PROBLEMS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "the file system is read-only"}


def os_problem(exc: BaseException) -> str | None:
    """`disk full writing /path` for a machine problem anywhere in the exception's chain."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in OS_PROBLEMS:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{OS_PROBLEMS[exc.errno]}{where}: free space or fix permissions, then --resume"
        exc = exc.__cause__ or exc.__context__
    return None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LocalRun:
    def __init__(self, home: Path, dag: Dag, state: dict, echo: Callable[[str], None] = print):
        self.home = home
        self.dag = lower(dag)
        self.state = state
        self.dir = home / "runs" / state["id"]
        self.params = state["parameters"]
        # What this run executes: the compiled requests (plan.json beside the run), each resolved
        # with the run's values right before its step runs (executed.jsonl).
        self.requests = {r.name: r for r in compile_dag(self.dag, self.params)}
        self.cache = StepCache(home / "cache")
        self._echo = echo
        self._save_lock = threading.RLock()

    # -- creation and persistence ----------------------------------------------------------------
    @classmethod
    def create(cls, home: Path, dag: Dag, parameters: dict, profile: str, echo=print) -> "LocalRun":
        run_id = datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        git = lineage.git_state()
        parameters = dict(parameters)
        if lineage.COMMIT_PARAMETER in parameters:  # a record of the tree that runs, not a setting
            parameters[lineage.COMMIT_PARAMETER] = lineage.commit_value(git)
        state = {
            "id": run_id, "created_at": now(), "profile": profile, "parameters": parameters,
            "status": "Executing", "failure": "",
            "lineage": {"git": git, "manifest_sha256": lineage.manifest_sha256(parameters.get("ManifestUrl"))},
            "steps": {name: {"status": "Pending"} for name in lower(dag).names},
        }
        run = cls(home, dag, state, echo)
        run.dir.mkdir(parents=True)
        (run.dir / "plan.json").write_text(json.dumps(
            {"Parameters": run.params, "Steps": [r.to_json() for r in run.requests.values()]}, indent=2, default=str))
        run.save()
        return run

    @classmethod
    def load(cls, home: Path, dag: Dag, run_id: str, echo=print) -> "LocalRun":
        path = home / "runs" / run_id / "run.json"
        if not path.exists():
            raise FileNotFoundError(f"no run {run_id!r} under {home / 'runs'}")
        return cls(home, dag, json.loads(path.read_text()), echo)

    def save(self) -> None:
        with self._save_lock:  # tuning trials record their process groups from threads
            tmp = self.dir / "run.json.tmp"
            tmp.write_text(json.dumps(self.state, indent=2, default=str))
            tmp.replace(self.dir / "run.json")

    def record_executed(self, request: StepRequest, arguments: dict) -> None:
        """Append the request as this run resolved it (its compiled form is in plan.json) to
        executed.jsonl: tests/test_end_to_end.py compares each with the SageMaker definition."""
        with self._save_lock, open(self.dir / "executed.jsonl", "a") as f:
            f.write(json.dumps({"Name": request.name, "Type": request.type, "Arguments": arguments},
                               sort_keys=True, default=str) + "\n")

    def _job_started(self, record: dict):
        """on_start for a job: remember its process group and when its leader started, so a
        resume after kill -9 can stop it, and only it (a pid may be reused)."""
        def started(pgid: int, since: float) -> None:
            with self._save_lock:
                record.setdefault("process_groups", []).append({"pgid": pgid, "started": since})
            self.save()
        return started

    def _job_ended(self, record: dict):
        """on_end for a job: its process group is gone, forget it."""
        def ended(pgid: int) -> None:
            with self._save_lock:
                groups = [g for g in record.get("process_groups", []) if g.get("pgid") != pgid]
                if groups:
                    record["process_groups"] = groups
                else:
                    record.pop("process_groups", None)
            self.save()
        return ended

    def echo(self, step: str, message: str) -> None:
        line = f"{datetime.now():%H:%M:%S} {step:<14}| {message}"
        self._echo(line)
        with open(self.dir / "run.log", "a") as log:
            log.write(line + "\n")

    # -- the loop --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        """One executor per run: an flock on the run folder, released by the kernel even when the
        holder is killed with -9, so a resume after a crash is never refused by a stale lock."""
        handle = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLocked(f"run {self.state['id']} is executing now (pid {holder}); wait for it, "
                            "or stop it, before resuming") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.close()

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """Ctrl-C and SIGTERM stop every running job's whole process tree (trials included)
        before anything waits on them; the run is then recorded as Stopped."""
        jobs.accept_jobs()  # an earlier run's stop in this process stopped job starts
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum, _frame):
            jobs.stop_all()
            raise RunStopped(signal.Signals(signum).name)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_leftovers(self) -> None:
        """Jobs of an earlier executor of this run that was killed (-9) may still be running:
        their process groups are in run.json; stop them before running the step again."""
        for record in self.state["steps"].values():
            for group in record.pop("process_groups", []):
                if not isinstance(group, dict):  # recorded without its start time: cannot be told apart
                    self.echo("runner", f"not stopping process group {group}: recorded by an older "
                                        "invmon without the process's start time")
                elif jobs.still_ours(group["pgid"], group["started"]):
                    self.echo("runner", f"stopping process group {group['pgid']} left by a killed runner")
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group["pgid"], signal.SIGKILL)
                elif jobs.group_alive(group["pgid"]):
                    self.echo("runner", f"not stopping process group {group['pgid']}: its number now "
                                        "belongs to a process this run did not start")

    def execute(self) -> dict:
        """Run every step not yet succeeded, in order. Returns the final state."""
        with self._lock(), self._stop_on_signals():
            self._stop_leftovers()
            self._note_tree()
            try:
                return self._execute()
            except RunStopped as stop:
                for record in self.state["steps"].values():
                    if record.get("status") == "Executing":
                        record.update(status="Stopped", error=f"stopped by {stop}", ended_at=now())
                self.state.update(status="Stopped", failure=f"stopped by {stop}", resumable=True)
                self.save()
                raise

    def _note_tree(self) -> None:
        """A resume from another tree (a new commit, other uncommitted changes) is recorded: the
        steps of this run did not all run the same code."""
        recorded = self.state.setdefault("lineage", {}).get("git")
        if recorded is None:  # a run made before lineage was recorded
            return
        current = lineage.git_state()
        if (current.get("commit"), current.get("dirty")) != (recorded.get("commit"), recorded.get("dirty")):
            self.state["lineage"].setdefault("resumed_at", []).append({**current, "at": now()})
            self.save()

    def _execute(self) -> dict:
        from pipeline.registry.stages import pipeline_endpoint_problem
        from pipeline.dag.parameters import BY_NAME, ParameterError, validate

        try:  # every declared parameter within its range, before any step runs
            validate({k: v for k, v in self.params.items() if k in BY_NAME})
            problem = pipeline_endpoint_problem(self.params)  # never deploy to production
        except ParameterError as exc:
            problem = str(exc)
        if problem:
            self.state.update(status="Failed", failure=problem, resumable=False)
            self.save()
            return self.state
        self.state["status"], self.state["failure"] = "Executing", ""
        self.save()
        for step in self.dag.steps:
            record = self.state["steps"][step.name]
            if record["status"] == "Succeeded":
                continue
            if not self._on_taken_branch(step.name):
                record.update(status="Skipped", reason="not on the condition's taken branch")
                self.save()
                continue
            record.clear()
            record.update(status="Executing", started_at=now())
            self.save()
            started = time.monotonic()
            try:
                self._run_step(step, record)
            except Exception as exc:  # noqa: BLE001 - any step error ends the run, recorded
                problem = os_problem(exc)
                if problem:
                    exc = RuntimeError(problem)
                record.update(status="Failed", error=str(exc), seconds=round(time.monotonic() - started, 1),
                              ended_at=now())
                # A Fail step fails the same way every time: resuming it cannot help.
                self.state.update(status="Failed", failure=f"{step.name}: {exc}",
                                  resumable=self.requests[step.name].type != "Fail")
                self.echo(step.name, f"FAILED: {exc}")
                self.save()
                notify("run-failed", f"run {self.state['id']} failed at {step.name}", str(exc),
                       run=self.state["id"], step=step.name, resumable=self.state["resumable"])
                if not self.state["resumable"]:
                    self._drop_feature_cache()
                return self.state
            record.update(status="Succeeded", seconds=round(time.monotonic() - started, 1), ended_at=now())
            self.echo(step.name, f"{record['status'].lower()} in {record['seconds']:.0f}s"
                      + (f" (cached from run {record['reused_from']})" if record.get("reused_from") else ""))
            self.save()
        self.state["status"] = "Succeeded"
        self.save()
        self._drop_feature_cache()
        return self.state

    def _drop_feature_cache(self) -> None:
        """The frozen layers' cached output (train.py) serves the trials and Train of this run only,
        and is large (190 MB for the real profile): gone once no job can need it again."""
        shutil.rmtree(self.dir / FEATURE_CACHE, ignore_errors=True)

    def _on_taken_branch(self, name: str) -> bool:
        gate = self.requests[name].gate
        if gate is None:
            return True
        condition, branch = gate
        outcome = self.state["steps"][condition].get("properties", {}).get("outcome")
        return outcome is branch

    def _run_step(self, step, record: dict) -> None:
        handlers = {"Processing": self._processing, "Tuning": self._tuning, "Training": self._training,
                    "Condition": self._condition, "RegisterModel": self._register,
                    "Endpoint": self._deploy, "Fail": self._fail}
        request = self.requests[step.name]
        self.echo(step.name, "started")
        handlers[request.type](request, record)

    # -- value resolution ------------------------------------------------------------------------
    def resolve(self, expr, parameters: dict | None = None):
        """A compiled value with this run's parameters and its finished steps' results."""
        return Resolver({**self.params, **(parameters or {})}, self.step_value, self.state["id"])(expr)

    def keyed(self, expr, folders: dict | None = None):
        """A compiled value for a cache key: parameters resolved, but no run's paths in it (an
        upstream output or a local dataset is keyed by its fingerprint, not by where it is)."""
        hidden = {name: f"<{name}>" for name in folders or {}}
        return Resolver({**self.params, **hidden}, lambda ref: f"<{ref}>", "<execution>")(expr)

    def step_value(self, ref: str):
        """A `Steps.<name>...` placeholder: local folders stand for S3 URIs, run.json's records
        for the Describe* responses."""
        step, path = parse_step_ref(ref)
        record = self.state["steps"][step]
        if record.get("status") != "Succeeded":
            raise RuntimeError(f"{ref} is not available: step {step} has not succeeded")
        if m := re.fullmatch(r"ProcessingOutputConfig\.Outputs\['([^']+)'\]\.S3Output\.S3Uri", path):
            return str(self.output_path(step, m[1]))
        if path == "ModelArtifacts.S3ModelArtifacts":
            return str(self.output_path(step, "model"))
        if m := re.fullmatch(r"PropertyFiles\.(\w+)", path):
            return record["properties"][m[1]]
        if m := re.fullmatch(r"BestTrainingJob\.TunedHyperParameters\['([^']+)'\]", path):
            return record["properties"]["TunedHyperParameters"][m[1]]
        if path == "InferenceSpecification.Containers[0].ModelDataUrl":
            return record["properties"]["artifact"]
        if path == "ModelPackageArn":  # a local version is named group/version
            return f"{record['properties']['group']}/{record['properties']['version']}"
        if path == "EndpointName":
            return record["properties"]["endpoint"]
        raise RuntimeError(f"no local value for {ref}")

    def output_path(self, step: str, output: str) -> Path:
        record = self.state["steps"][step]
        if output not in record.get("outputs", {}):
            raise RuntimeError(f"{step}.{output} is not available: step {step} has not produced it")
        return self.dir / step / record["outputs"][output]

    def read_by_script(self, request: StepRequest) -> dict[str, Path]:
        """Parameter -> local folder for the datasets a script reads from S3 itself: an s3:// URI is
        mirrored once into $INVMON_HOME/data/s3 (only the selection), through the step's own code."""
        folders = {}
        for item in request.read_by_script:
            name = item["Source"]["Get"].removeprefix("Parameters.")
            text = str(self.resolve(item["Source"])).strip()
            if text.startswith("s3://"):
                from pipeline.data import fetch as data

                sel = item["Selection"]
                manifest = self.local_file(self.resolve(sel["Manifest"]), "parameter ManifestUrl", optional=True)
                folders[name] = data.mirror(self.home, text, manifest, str(self.resolve(sel["Counts"])),
                                            int(self.resolve(sel["PerCount"])), int(self.resolve(sel["Seed"])),
                                            echo=lambda m: self.echo("data", m))
            else:
                folders[name] = self.local_file(text, f"parameter {name}")
        return folders

    @staticmethod
    def local_file(text, what: str, optional: bool = False) -> Path | None:
        """A resolved S3Uri on this machine: a local path (a parameter's or a step output's)."""
        text = str(text).strip()
        if not text:
            if optional:
                return None
            raise ValueError(f"{what} is empty")
        if text.startswith("s3://"):
            raise ValueError(f"{what}={text}: the local runner reads local files here; fetch it "
                             "first (aws s3 cp, or `invmon data fetch` for photos) or give a local path")
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what}: {path} does not exist")
        return path.resolve()

    def python(self, code, debugger: bool = False) -> Path:
        """The step's environment: its container's requirements file (steps/images.py), the
        Debugger's for Train when EnableDebugger is true, as on SageMaker."""
        from steps.base import SCRIPTS
        from steps.images import container_for

        requirements = code.requirements  # a script folder of its own (a test's toy DAG)
        if code.root == SCRIPTS:
            requirements = container_for(code.source_dir, debugger=debugger).requirements
        return envs.python_for(requirements, step_envs(self.home), log=lambda m: self.echo("env", m))

    # -- caching ---------------------------------------------------------------------------------
    def _cached(self, request: StepRequest, record: dict, settings: dict, inputs: dict[str, Path | None]) -> bool:
        """Reuse an identical earlier result when the compile stage says the step may be reused
        (request.cache). Sets record["cache_key"]."""
        if not request.cache:
            return False
        step = request.declaration
        prints = {name: (tree_sha256(p) if p is not None else None) for name, p in inputs.items()}
        key = cache_key(step.name, step.code if hasattr(step, "code") else step.training.code,
                        settings, prints)
        record["cache_key"] = key
        hit = self.cache.lookup(step.name, key)
        if hit is None:
            return False
        step_dir = self.dir / step.name
        shutil.rmtree(step_dir, ignore_errors=True)
        link_tree(Path(hit["step_dir"]), step_dir)
        record.update(outputs=hit["outputs"], properties=hit["properties"], reused_from=hit["run"])
        return True

    def _remember(self, step, record: dict) -> None:
        if record.get("cache_key"):
            self.cache.store(step.name, record["cache_key"], {
                "run": self.state["id"], "step_dir": str(self.dir / step.name),
                "outputs": record.get("outputs", {}), "properties": record.get("properties", {}),
            })

    # -- step kinds: each runs its resolved request -----------------------------------------------
    def _processing(self, request: StepRequest, record: dict) -> None:
        step_dir = self.dir / request.name
        local = jobs.processing_paths(step_dir)
        folders = self.read_by_script(request)
        executed = self.resolve(request.arguments, {name: str(path) for name, path in folders.items()})
        self.record_executed(request, executed)
        arguments = [str(a) for a in executed["AppSpecification"]["ContainerArguments"]]
        sources = {i["InputName"]: self.local_file(i["S3Input"]["S3Uri"], source_name(compiled["S3Input"]["S3Uri"], i))
                   for compiled, i in zip(request.arguments["ProcessingInputs"], executed["ProcessingInputs"])}
        keyed = self.keyed(request.arguments["AppSpecification"]["ContainerArguments"], folders)
        if self._cached(request, record, {"arguments": keyed}, {**sources, **folders}):
            return
        shutil.rmtree(step_dir, ignore_errors=True)
        for i in executed["ProcessingInputs"]:
            jobs.link_input(sources[i["InputName"]], Path(local(i["S3Input"]["LocalPath"])))
        outputs = {o["OutputName"]: Path(local(o["S3Output"]["LocalPath"]))
                   for o in executed["ProcessingOutputConfig"]["Outputs"]}
        for path in outputs.values():
            path.mkdir(parents=True, exist_ok=True)
        code = request.declaration.code
        with self._serving(request, step_dir, record) as endpoint_env:
            jobs.run_script(
                self.python(code), code, step_dir, [local(a) for a in arguments],
                {**self._registry_listing(request, step_dir), **endpoint_env},
                step_dir / "log.txt", echo=lambda line: self.echo(request.name, line),
                max_runtime_s=executed["StoppingCondition"]["MaxRuntimeInSeconds"],
                on_start=self._job_started(record), on_end=self._job_ended(record),
            )
        record["outputs"] = {name: str(path.relative_to(step_dir)) for name, path in outputs.items()}
        properties = {}
        for pf in request.property_files:
            path = step_dir / record["outputs"][pf["OutputName"]] / pf["FilePath"]
            if not path.exists():
                raise FileNotFoundError(f"{request.name} did not write its property file {pf['FilePath']}")
            properties[pf["PropertyFileName"]] = json.loads(path.read_text())
        record["properties"] = properties
        if request.invokes_endpoint:
            self._record_verdict(request, properties)
        self._remember(request.declaration, record)

    def _package(self, request: StepRequest) -> tuple[str, int]:
        """(group, version) of the version a job that invokes an endpoint tests."""
        group, _, version = str(self.resolve(request.invokes_endpoint["ModelPackage"])).rpartition("/")
        return group, int(version)

    @contextlib.contextmanager
    def _serving(self, request: StepRequest, step_dir: Path, record: dict):
        """The job environment of a step that calls an endpoint (the smoke test): the real local
        endpoint, served for the job from the version this run deployed, at $INVMON_ENDPOINT_URL,
        and stopped after it. An endpoint that no longer serves this run's version, or whose
        artifact is not the registered bytes, is never tested in its place."""
        if not request.invokes_endpoint:
            yield {}
            return
        from pipeline.registry.artifacts import verify_local_artifact
        from pipeline.registry.local import open_registry

        name = str(self.resolve(request.invokes_endpoint["EndpointName"]))
        group, version = self._package(request)
        registry = open_registry(self.home)
        endpoint = registry.get_endpoint(name)
        if (endpoint.group, endpoint.version) != (group, version):
            raise RunFailed(f"endpoint {name} serves {endpoint.group}/{endpoint.version}, not {group}/{version}, "
                            "which this run deployed: another run deployed it since, and this version stays "
                            "untested (invmon models approve refuses it)")
        model = registry.get(group, version)
        verify_local_artifact(model)
        try:
            with jobs.serve_endpoint(Path(model.artifact_uri), model.name, step_dir / "endpoint.log",
                                     # where `invmon serve --endpoint NAME` captures, as SageMaker's staging does
                                     capture_dir=str(self.home / "capture" / name),
                                     on_start=self._job_started(record), on_end=self._job_ended(record)) as url:
                self.echo(request.name, f"{name} serves {model.name} at {url} for the job")
                yield {ENDPOINT_URL_ENV: url}
        except jobs.EndpointFailed as exc:
            self._record_smoke(group, version, {"SmokeTest": "failed",
                                                "SmokeTestDetail": "the staging endpoint did not start"})
            raise RunFailed(f"{name} ({model.name}) did not start: {exc}") from None
        self.echo(request.name, f"{name} stopped")

    def _record_verdict(self, request: StepRequest, properties: dict) -> None:
        """The job's verdict (its property file's `record`) on the version it tested, in the local
        registry: what UpdateModelPackage records on SageMaker."""
        verdict = properties.get(request.invokes_endpoint["Verdict"], {}).get("record")
        if not isinstance(verdict, dict):
            raise RunFailed(f"{request.name} wrote no verdict to record (its property file has no 'record')")
        self._record_smoke(*self._package(request), verdict)

    def _record_smoke(self, group: str, version: int, verdict: dict) -> None:
        from pipeline.registry.local import SMOKE_PROPERTIES, SMOKE_PROPERTY, SMOKE_RUN_PROPERTY, open_registry

        kept = {k: str(v) for k, v in verdict.items() if k in SMOKE_PROPERTIES}
        if kept.get(SMOKE_PROPERTY) not in ("passed", "failed"):
            raise RunFailed(f"a smoke test verdict is passed or failed, not {kept.get(SMOKE_PROPERTY)!r}")
        kept[SMOKE_RUN_PROPERTY] = self.state["id"]  # the run that recorded it, as the runner knows it
        open_registry(self.home).set_properties(group, version, kept)
        self.echo("runner", f"recorded {SMOKE_PROPERTY}={kept[SMOKE_PROPERTY]} on {group}/{version}")

    def _registry_listing(self, request: StepRequest, step_dir: Path) -> dict[str, str]:
        """The job environment of a step that reads the registry: the local registry's versions of
        its group in a file, the local stand-in for the SageMaker Model Registry API. The script
        picks the version itself (newest Approved, else newest), the same rule on both back-ends.
        Each version comes with its artifact and the SHA-256 recorded at registration, as a model
        package has its ModelDataUrl and ArtifactSha256: Evaluate scores the one it picks on the
        run's test photos after checking the bytes."""
        if not request.reads_registry:
            return {}
        from pipeline.registry.local import DIGEST_PROPERTY, open_registry

        group = str(self.resolve(request.reads_registry["ModelPackageGroupName"]))
        versions = open_registry(self.home).list_versions(group)
        listing = step_dir / "registry.json"
        listing.write_text(json.dumps({"group": group, "versions": [
            {"version": v.version, "status": v.status, "evaluation": v.metrics, "artifact": v.artifact_uri,
             "sha256": v.properties.get(DIGEST_PROPERTY, "")} for v in versions]}))
        return {REGISTRY_LISTING_ENV: str(listing)}

    def _training_job(self, code, job: dict, job_dir: Path, hyperparameters: dict[str, str], echo,
                      record: dict, should_stop=None, debugger: bool = False) -> jobs.JobResult:
        """One training job (the Train step or a tuning trial) in `job_dir`, from its resolved
        job definition (`job`: channels, metric definitions, stopping condition)."""
        channels = {c["ChannelName"]: self.local_file(c["DataSource"]["S3DataSource"]["S3Uri"], c["ChannelName"])
                    for c in job["InputDataConfig"]}
        metrics = [MetricDefinition(m["Name"], m["Regex"]) for m in job["AlgorithmSpecification"]["MetricDefinitions"]]
        model_dir, output_dir = job_dir / "model_dir", job_dir / "output" / "data"
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        job_name = f"{self.state['id']}-{job_dir.relative_to(self.dir).as_posix().replace('/', '-')}"
        env = jobs.training_env(channels, model_dir, output_dir, job_name, hyperparameters)
        # The trials and Train of a run share the frozen layers' output (an explicit setting wins).
        env["INVMON_FEATURE_CACHE"] = os.environ.get("INVMON_FEATURE_CACHE") or str(self.dir / FEATURE_CACHE)
        # Checkpoints survive a failed attempt, so a retried job resumes (SageMaker syncs them to S3).
        args = jobs.hyperparameter_args(hyperparameters) + ["--checkpoint_dir", str(job_dir / "checkpoints")]
        result = jobs.run_script(self.python(code, debugger), code, job_dir, args, env,
                                 job_dir / "log.txt", metrics=metrics, echo=echo, should_stop=should_stop,
                                 max_runtime_s=job["StoppingCondition"]["MaxRuntimeInSeconds"],
                                 on_start=self._job_started(record), on_end=self._job_ended(record))
        if not result.stopped_early:
            jobs.tar_model(model_dir, job_dir / "model" / "model.tar.gz")
        return result

    def _training(self, request: StepRequest, record: dict) -> None:
        executed = self.resolve(request.arguments)
        self.record_executed(request, executed)
        hyperparameters = {k: str(v) for k, v in executed["HyperParameters"].items()}
        self.echo(request.name, f"hyperparameters {hyperparameters}")
        # SageMaker Debugger's client in Train's environment only when compiled in (never the trials).
        result = self._training_job(request.declaration.code, executed, self.dir / request.name, hyperparameters,
                                    echo=lambda line: self.echo(request.name, line), record=record,
                                    debugger="DebugHookConfig" in executed)
        record["outputs"] = {"model": "model"}
        record["properties"] = {
            "HyperParameters": hyperparameters,
            "FinalMetricDataList": {name: values[-1] for name, values in result.metrics.items()},
        }

    def _tuning(self, request: StepRequest, record: dict) -> None:
        step = request.declaration
        step_dir = self.dir / request.name
        executed = self.resolve(request.arguments)
        self.record_executed(request, executed)
        config, job = executed["HyperParameterTuningJobConfig"], executed["TrainingJobDefinition"]
        static = {k: str(v) for k, v in job["StaticHyperParameters"].items()}
        limits = config["ResourceLimits"]
        max_jobs, max_parallel = int(limits["MaxNumberOfTrainingJobs"]), int(limits["MaxParallelTrainingJobs"])
        # The ranges as this execution set them (a bound may be a parameter).
        bounds = {r["Name"]: (float(r["MinValue"]), float(r["MaxValue"]))
                  for r in config["ParameterRanges"]["ContinuousParameterRanges"]}
        step = dataclasses.replace(step, ranges=tuple(
            dataclasses.replace(r, min_value=bounds[r.name][0], max_value=bounds[r.name][1])
            if isinstance(r, ContinuousRange) else r for r in step.ranges))
        seed = int(self.params.get("Seed", 0))
        # The tuning job as compiled and resolved, the seed, and the tuner's own code (and Optuna's
        # version) are the key.
        settings = {"request": self.keyed(request.arguments), "seed": seed, "tuner": Tuner.fingerprint()}
        inputs = {c["ChannelName"]: self.local_file(c["DataSource"]["S3DataSource"]["S3Uri"], c["ChannelName"])
                  for c in job["InputDataConfig"]}
        if self._cached(request, record, settings, inputs):
            return
        shutil.rmtree(step_dir, ignore_errors=True)
        tuner = Tuner(step, max_jobs, max_parallel, seed=seed, log=lambda m: self.echo(request.name, m))

        def run_trial(trial, should_stop):
            return self._training_job(
                step.training.code, job, step_dir / "trials" / f"{trial.index:03d}",
                {**static, **trial.hyperparameters},
                echo=lambda line: self.echo(f"{request.name}#{trial.index}", line), should_stop=should_stop,
                record=record)

        best = tuner.run(run_trial)
        summary = tuner.summary()
        (step_dir / "tuning.json").write_text(json.dumps(summary, indent=2))
        record["outputs"] = {}
        record["properties"] = {"TunedHyperParameters": best.hyperparameters,
                                "BestObjective": best.objective, "BestTrial": best.index,
                                "Trials": len(tuner.trials)}
        self._remember(request.declaration, record)

    def _condition(self, request: StepRequest, record: dict) -> None:
        executed = self.resolve(request.arguments)
        self.record_executed(request, executed)
        (condition,) = executed["Conditions"]
        if condition["Type"] != "GreaterThanOrEqualTo":
            raise RunFailed(f"{request.name}: the local runner has no condition {condition['Type']}")
        left, right = float(condition["LeftValue"]), float(condition["RightValue"])
        outcome = left >= right
        record["properties"] = {"outcome": outcome, "left": left, "right": right}
        self.echo(request.name, f"{left:.4f} >= {right} -> {outcome}")

    def _register(self, request: StepRequest, record: dict) -> None:
        from pipeline.registry.local import BASELINE_PROPERTY, DIGEST_PROPERTY, REPORT_PROPERTY, open_registry

        executed = self.resolve(request.arguments)
        self.record_executed(request, executed)
        (container,) = executed["InferenceSpecification"]["Containers"]
        artifact = Path(container["ModelDataUrl"])
        if artifact.is_dir():  # a training job's model output holds model.tar.gz
            artifact = artifact / "model.tar.gz"
        metrics = json.loads(Path(executed["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]).read_text())
        described = executed.get("CustomerMetadataProperties", {})
        # The registry keeps its own copy: a run folder may be deleted, a model version may not.
        store = self.home / "artifacts" / tree_sha256(artifact)[:16]
        store.mkdir(parents=True, exist_ok=True)
        if not (store / "model.tar.gz").exists():
            # Copy beside, then rename: a stop mid-copy never leaves a torn artifact in the store.
            partial = store / f".model.tar.gz.part-{os.getpid()}"
            shutil.copy2(artifact, partial)
            partial.chmod(0o444)  # registered bytes are not to be edited in place
            os.replace(partial, store / "model.tar.gz")
        properties = {}
        # Evaluate's page and the monitoring baseline go with the version, named by run: two runs
        # may register the same artifact, each with its own.
        for prop, stem in ((REPORT_PROPERTY, "report"), (BASELINE_PROPERTY, "baseline")):
            made = Path(described[prop]) if described.get(prop) else None
            if made is not None and made.is_file():
                kept = store / f"{stem}-{self.state['id']}{made.suffix}"
                partial = store / f".{stem}.part-{os.getpid()}"
                shutil.copy2(made, partial)
                os.replace(partial, kept)
                properties[prop] = kept.resolve().as_uri()
        registry = open_registry(self.home)
        group = str(executed["ModelPackageGroupName"])
        # A resumed Register (the runner was stopped after registering, before recording it)
        # finds this run's version instead of registering the same model twice.
        earlier = [v for v in registry.list_versions(group) if v.run_id == self.state["id"]]
        if earlier:
            version = earlier[0]
            record["properties"] = {"group": version.group, "version": version.version,
                                    "status": version.status, "artifact": version.artifact_uri}
            self.echo(request.name, f"already registered by this run: {version.group} version {version.version}")
            return
        properties.update(self._lineage_properties())
        # The registry records the stored copy's SHA-256 and refuses one that is not what
        # Evaluate scored.
        version = registry.register(
            group, str(store / "model.tar.gz"), metrics, status=executed["ModelApprovalStatus"],
            run_id=str((executed.get("MetadataProperties") or {}).get("GeneratedBy") or self.state["id"]),
            description=str(executed.get("ModelPackageDescription")
                            or f"run {self.state['id']} ({self.state['profile']} profile)"),
            properties=properties, artifact_sha256=described.get(DIGEST_PROPERTY),
        )
        record["properties"] = {"group": version.group, "version": version.version,
                                "status": version.status, "artifact": version.artifact_uri,
                                "report": properties.get(REPORT_PROPERTY, "")}
        self.echo(request.name, f"registered {version.group} version {version.version} ({version.status})")
        notify("pending-approval", f"{version.name} waits for approval",
               f"{version.name} ({version.status}) from run {self.state['id']}; review it with "
               f"`invmon models show {version.version} --group {version.group}`",
               group=version.group, version=version.version, run=self.state["id"],
               report=properties.get(REPORT_PROPERTY, ""))

    def _lineage_properties(self) -> dict[str, str]:
        """What made this run's model, as version properties (pipeline/lineage.py): the commit of
        the tree that ran (and any other tree a resume went on from), the manifest's and the
        splits' SHA-256, every parameter. Kept in run.json too."""
        record = self.state.setdefault("lineage", {})
        git = record.get("git") or {"commit": None, "reason": "run made before lineage was recorded"}
        found = {lineage.COMMIT_PROPERTY: lineage.commit_value(git),
                 lineage.PARAMETERS_PROPERTY: json.dumps(self.params, sort_keys=True, default=str)}
        if not git.get("commit"):
            found[lineage.NO_COMMIT_PROPERTY] = git.get("reason", "unknown")
        if record.get("resumed_at"):
            found[lineage.RESUMED_PROPERTY] = ",".join(lineage.commit_value(g) or "none"
                                                       for g in record["resumed_at"])
        if record.get("manifest_sha256"):
            found[lineage.MANIFEST_PROPERTY] = record["manifest_sha256"]
        preprocess = self.state["steps"].get("Preprocess", {})
        if preprocess.get("status") == "Succeeded":
            record["data"] = lineage.split_data(self.dir / "Preprocess", preprocess.get("outputs", {}))
            if record["data"].get("sha256"):
                found[lineage.DATA_PROPERTY] = record["data"]["sha256"]
        return {k: v for k, v in found.items() if v}

    def _deploy(self, request: StepRequest, record: dict) -> None:
        from pipeline.registry.artifacts import verify_local_artifact
        from pipeline.registry.local import open_registry

        executed = self.resolve(request.arguments)
        self.record_executed(request, executed)
        (register_step,) = request.depends_on
        registered = self.state["steps"][register_step]["properties"]
        name = str(executed["EndpointName"])
        registry = open_registry(self.home)
        verify_local_artifact(registry.get(registered["group"], registered["version"]))
        endpoint = registry.deploy(name, registered["group"], registered["version"], require_approved=False)
        record["properties"] = {"endpoint": endpoint.name, "group": endpoint.group,
                                "version": endpoint.version}
        self.echo(request.name, f"endpoint {name} now serves {endpoint.group} version {endpoint.version}; "
                  f"start it with: invmon serve --endpoint {name}")

    def _fail(self, request: StepRequest, record: dict) -> None:
        executed = self.resolve(request.arguments)
        self.record_executed(request, executed)
        raise RunFailed(str(executed["ErrorMessage"]))


def source_name(compiled, item: dict) -> str:
    """How an error names an input: by the parameter it came from, else by its name."""
    if isinstance(compiled, dict) and str(compiled.get("Get", "")).startswith("Parameters."):
        return f"parameter {compiled['Get'].split('.', 1)[1]}"
    return f"input {item['InputName']}"


def synthetic_data(home: Path, seed: int, echo=print) -> Path:
    """The embedded default data, generated once per seed under $INVMON_HOME/data."""
    from pipeline.data import synth

    out = home / "data" / f"synthetic-seed{seed}-{SYNTHETIC_PER_CLASS}"
    if not (out / ".complete").exists():
        echo(f"generating the embedded synthetic dataset ({5 * SYNTHETIC_PER_CLASS} photos) in {out}")
        shutil.rmtree(out, ignore_errors=True)
        synth.write_dataset(out, per_class=SYNTHETIC_PER_CLASS, seed=seed)
        (out / ".complete").write_text(now())
    return out


def list_runs(home: Path) -> list[dict]:
    runs = []
    for path in sorted((home / "runs").glob("*/run.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue  # a run folder being written right now
    return runs
