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
import secrets
import shutil
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.local import envs, jobs
from pipeline.local.cache import StepCache, cache_key, fingerprint, link_tree
from pipeline.dag.compile import execution_plan, gated_steps, parameter_ranges
from pipeline.local.tuner import Tuner
from steps.base import (ConditionStep, ContinuousRange, Dag, DeployStep, FailStep, JsonGet, Param,
                        ProcessingStep, RegisterStep, StepOutput, TrainingStep, TunedValue, TuningStep)

SYNTHETIC_PER_CLASS = 300
FEATURE_CACHE = "feature-cache"  # in the run's folder: train.py's cache of frozen-layer outputs
# Where a step that reads the registry finds the local one's listing (scripts/evaluate/previous.py).
REGISTRY_LISTING_ENV = "INVMON_MODEL_REGISTRY"


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


def json_path(document: dict, path: str):
    """`a.b.c` lookup, as SageMaker's JsonGet reads a PropertyFile."""
    value = document
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"{path!r} not found (missing {key!r})")
        value = value[key]
    return value


class LocalRun:
    def __init__(self, home: Path, dag: Dag, state: dict, echo: Callable[[str], None] = print):
        self.home = home
        self.dag = dag
        self.state = state
        self.dir = home / "runs" / state["id"]
        self.params = state["parameters"]
        self.plan = {s["name"]: s for s in execution_plan(dag)["steps"]}
        self.gates = gated_steps(dag)
        self.cache = StepCache(home / "cache")
        self._echo = echo
        self._save_lock = threading.RLock()

    # -- creation and persistence ----------------------------------------------------------------
    @classmethod
    def create(cls, home: Path, dag: Dag, parameters: dict, profile: str, echo=print) -> "LocalRun":
        run_id = datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        state = {
            "id": run_id, "created_at": now(), "profile": profile, "parameters": dict(parameters),
            "status": "Executing", "failure": "",
            "steps": {name: {"status": "Pending"} for name in dag.names},
        }
        run = cls(home, dag, state, echo)
        run.dir.mkdir(parents=True)
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

    def record_request(self, step: str, request: dict) -> None:
        """Append the request a step resolved to (what SageMaker would be sent, container paths
        and all) to requests.jsonl: tests/test_end_to_end.py compares each with the definition."""
        with self._save_lock, open(self.dir / "requests.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **request}, sort_keys=True, default=str) + "\n")

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
            try:
                return self._execute()
            except RunStopped as stop:
                for record in self.state["steps"].values():
                    if record.get("status") == "Executing":
                        record.update(status="Stopped", error=f"stopped by {stop}", ended_at=now())
                self.state.update(status="Stopped", failure=f"stopped by {stop}", resumable=True)
                self.save()
                raise

    def _execute(self) -> dict:
        from pipeline.registry.deploy import pipeline_endpoint_problem
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
                                  resumable=not isinstance(step, FailStep))
                self.echo(step.name, f"FAILED: {exc}")
                self.save()
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
        if name not in self.gates:
            return True
        condition, branch = self.gates[name]
        outcome = self.state["steps"][condition].get("properties", {}).get("outcome")
        return outcome is branch

    def _run_step(self, step, record: dict) -> None:
        handlers = {
            ProcessingStep: self._processing, TuningStep: self._tuning, TrainingStep: self._training,
            ConditionStep: self._condition, RegisterStep: self._register, DeployStep: self._deploy,
            FailStep: self._fail,
        }
        self.echo(step.name, "started")
        handlers[type(step)](step, record)

    # -- value resolution ------------------------------------------------------------------------
    def value(self, v) -> object:
        if isinstance(v, Param):
            return self.params[v.name]
        if isinstance(v, TunedValue):
            tuned = self.state["steps"][v.tuning_step]["properties"]["TunedHyperParameters"]
            return tuned[v.name]
        if isinstance(v, JsonGet):
            report = self.state["steps"][v.step]["properties"][v.property_file]
            return json_path(report, v.json_path)
        return v

    def output_path(self, ref: StepOutput) -> Path:
        record = self.state["steps"][ref.step]
        if ref.output not in record.get("outputs", {}):
            raise RuntimeError(f"{ref} is not available: step {ref.step} has not produced it")
        return self.dir / ref.step / record["outputs"][ref.output]

    def input_path(self, item) -> Path | None:
        """Where a processing input's data is on this machine; an S3 dataset the step reads by
        selection is mirrored once into $INVMON_HOME/data/s3 through the step's own code."""
        text = str(self.value(item.source)).strip() if isinstance(item.source, Param) else ""
        if item.s3_selection is not None and text.startswith("s3://"):
            from pipeline.data import fetch as data

            sel = item.s3_selection
            manifest = self.source_path(sel.manifest, optional=True)
            return data.mirror(self.home, text, manifest, str(self.value(sel.counts)),
                               int(self.value(sel.per_count)), int(self.value(sel.seed)),
                               echo=lambda m: self.echo("data", m))
        return self.source_path(item.source, item.optional)

    def source_path(self, source, optional: bool) -> Path | None:
        if isinstance(source, StepOutput):
            return self.output_path(source)
        text = str(self.value(source)).strip()
        if not text:
            if optional:
                return None
            raise ValueError(f"parameter {source.name} is empty")
        if text.startswith("s3://"):
            raise ValueError(f"parameter {source.name}={text}: the local runner reads local files "
                             "here; fetch it first (aws s3 cp) or give a local path")
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"parameter {source.name}: {path} does not exist")
        return path.resolve()

    def python(self, code, debugger: bool = False) -> Path:
        """The step's environment: its container's requirements file (steps/images.py), the
        Debugger's for Train when EnableDebugger is true, as on SageMaker."""
        from steps.base import SCRIPTS
        from steps.images import container_for

        requirements = code.requirements  # a script folder of its own (a test's toy DAG)
        if code.root == SCRIPTS:
            requirements = container_for(code.source_dir, debugger=debugger).requirements
        return envs.python_for(requirements, self.home / "envs", log=lambda m: self.echo("env", m))

    # -- caching ---------------------------------------------------------------------------------
    def _cached(self, step, record: dict, settings: dict, inputs: dict[str, Path | None]) -> bool:
        """Reuse an identical earlier result when the step is cacheable. Sets record["cache_key"]."""
        # A step that reads the registry sees a different registry each run: never reused.
        if not getattr(step, "cache", False) or getattr(step, "reads_registry", None) is not None:
            return False
        prints = {name: (fingerprint(p) if p is not None else None) for name, p in inputs.items()}
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

    # -- step kinds ------------------------------------------------------------------------------
    def _processing(self, step: ProcessingStep, record: dict) -> None:
        step_dir = self.dir / step.name
        local = jobs.processing_paths(step_dir)
        sources = {i.name: self.input_path(i) for i in step.inputs}
        arguments = [str(self.value(a)) for a in step.arguments]
        self.record_request(step.name, {
            "Type": "Processing", "ContainerArguments": arguments, "Entrypoint": step.code.entry_point,
            "ProcessingInputs": {i.name: i.destination for i in step.inputs if sources.get(i.name)
                                 and i.s3_selection is None},
            "ProcessingOutputs": {o.name: o.source for o in step.outputs}})
        if self._cached(step, record, {"arguments": arguments}, sources):
            return
        shutil.rmtree(step_dir, ignore_errors=True)
        for i in step.inputs:
            jobs.link_input(sources[i.name], Path(local(i.destination)))
        for o in step.outputs:
            Path(local(o.source)).mkdir(parents=True, exist_ok=True)
        jobs.run_script(
            self.python(step.code), step.code, step_dir, [local(a) for a in arguments],
            self._registry_listing(step, step_dir),
            step_dir / "log.txt", echo=lambda line: self.echo(step.name, line),
            max_runtime_s=step.max_runtime_s, on_start=self._job_started(record),
            on_end=self._job_ended(record),
        )
        record["outputs"] = {o.name: str(Path(local(o.source)).relative_to(step_dir)) for o in step.outputs}
        properties = {}
        for pf in step.property_files:
            path = step_dir / record["outputs"][pf.output] / pf.path
            if not path.exists():
                raise FileNotFoundError(f"{step.name} did not write its property file {pf.path}")
            properties[pf.name] = json.loads(path.read_text())
        record["properties"] = properties
        self._remember(step, record)

    def _registry_listing(self, step: ProcessingStep, step_dir: Path) -> dict[str, str]:
        """The job environment of a step that reads the registry: the local registry's versions of
        its group in a file, the local stand-in for the SageMaker Model Registry API. The script
        picks the version itself (newest Approved, else newest), the same rule on both back-ends."""
        if step.reads_registry is None:
            return {}
        from pipeline.registry.local import open_registry

        group = str(self.value(step.reads_registry))
        versions = open_registry(self.home).list_versions(group)
        listing = step_dir / "registry.json"
        listing.write_text(json.dumps({"group": group, "versions": [
            {"version": v.version, "status": v.status, "evaluation": v.metrics} for v in versions]}))
        return {REGISTRY_LISTING_ENV: str(listing)}

    def _training_job(self, step: TrainingStep, job_dir: Path, hyperparameters: dict[str, str],
                      echo, record: dict, should_stop=None, max_runtime_s: int | None = None,
                      debugger: bool = False) -> jobs.JobResult:
        """One training job (the Train step or a tuning trial) in `job_dir`."""
        channels = {name: self.output_path(src) for name, src in step.channels}
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
        result = jobs.run_script(self.python(step.code, debugger), step.code, job_dir, args, env,
                                 job_dir / "log.txt", metrics=step.metric_definitions, echo=echo,
                                 should_stop=should_stop, max_runtime_s=max_runtime_s or step.max_runtime_s,
                                 on_start=self._job_started(record), on_end=self._job_ended(record))
        if not result.stopped_early:
            jobs.tar_model(model_dir, job_dir / "model" / "model.tar.gz")
        return result

    def _hyperparameters(self, step: TrainingStep) -> dict[str, str]:
        return {name: str(self.value(v)) for name, v in step.hyperparameters}

    def _training(self, step: TrainingStep, record: dict) -> None:
        step_dir = self.dir / step.name
        hyperparameters = self._hyperparameters(step)
        self.record_request(step.name, {
            "Type": "Training", "HyperParameters": hyperparameters, "Entrypoint": step.code.entry_point,
            "MetricDefinitions": self.plan[step.name]["metric_definitions"],
            "Channels": sorted(name for name, _ in step.channels)})
        self.echo(step.name, f"hyperparameters {hyperparameters}")
        # SageMaker Debugger's client in Train's environment only when asked (tuning trials never).
        debugger = str(self.params.get("EnableDebugger", "false")).lower() == "true"
        result = self._training_job(step, step_dir, hyperparameters,
                                    echo=lambda line: self.echo(step.name, line), record=record,
                                    debugger=debugger)
        record["outputs"] = {"model": "model"}
        record["properties"] = {
            "HyperParameters": hyperparameters,
            "FinalMetricDataList": {name: values[-1] for name, values in result.metrics.items()},
        }

    def _tuning(self, step: TuningStep, record: dict) -> None:
        step_dir = self.dir / step.name
        static = self._hyperparameters(step.training)
        max_jobs, max_parallel = int(self.value(step.max_jobs)), int(self.value(step.max_parallel_jobs))
        # Range bounds that are parameters, as this execution set them.
        step = dataclasses.replace(step, ranges=tuple(
            dataclasses.replace(r, min_value=float(self.value(r.min_value)), max_value=float(self.value(r.max_value)))
            if isinstance(r, ContinuousRange) else r for r in step.ranges))
        ranges = parameter_ranges(step)
        self.record_request(step.name, {
            "Type": "Tuning", "StaticHyperParameters": static, "Entrypoint": step.training.code.entry_point,
            "MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel,
            "Strategy": step.strategy, "EarlyStopping": step.early_stopping,
            "Objective": {"MetricName": step.objective_metric, "Type": step.objective_type},
            "MetricDefinitions": self.plan[step.name]["metric_definitions"],
            "ParameterRanges": ranges})
        seed = int(self.params.get("Seed", 0))
        # The tuning config (ranges, strategy, objective, early stopping in the plan; budget, seed)
        # and the tuner's own code (and Optuna's version) are part of the key.
        settings = {"static": static, "max_jobs": max_jobs, "max_parallel": max_parallel, "seed": seed,
                    "plan": self.plan[step.name], "ranges": ranges, "tuner": Tuner.fingerprint()}
        inputs = {name: self.output_path(src) for name, src in step.training.channels}
        if self._cached(step, record, settings, inputs):
            return
        shutil.rmtree(step_dir, ignore_errors=True)
        tuner = Tuner(step, max_jobs, max_parallel, seed=seed,
                      log=lambda m: self.echo(step.name, m))

        def run_trial(trial, should_stop):
            hyperparameters = {**static, **trial.hyperparameters}
            return self._training_job(
                step.training, step_dir / "trials" / f"{trial.index:03d}", hyperparameters,
                echo=lambda line: self.echo(f"{step.name}#{trial.index}", line), should_stop=should_stop,
                record=record, max_runtime_s=step.trial_max_runtime_s,
            )

        best = tuner.run(run_trial)
        summary = tuner.summary()
        (step_dir / "tuning.json").write_text(json.dumps(summary, indent=2))
        record["outputs"] = {}
        record["properties"] = {"TunedHyperParameters": best.hyperparameters,
                                "BestObjective": best.objective, "BestTrial": best.index,
                                "Trials": len(tuner.trials)}
        self._remember(step, record)

    def _condition(self, step: ConditionStep, record: dict) -> None:
        left, right = float(self.value(step.left)), float(self.value(step.right))
        outcome = left >= right
        self.record_request(step.name, {"Type": "Condition", "Operator": "GreaterThanOrEqualTo",
                                        "LeftValue": left, "RightValue": right})
        record["properties"] = {"outcome": outcome, "left": left, "right": right}
        self.echo(step.name, f"{step.left.json_path} = {left:.4f} >= {step.right.name} = {right} -> {outcome}")

    def _register(self, step: RegisterStep, record: dict) -> None:
        from pipeline.dag.parameters import REGISTERED_STATUS
        from pipeline.registry.local import REPORT_PROPERTY, open_registry

        artifact = self.output_path(step.model) / "model.tar.gz"
        metrics = json.loads((self.output_path(step.metrics) / step.metrics_file).read_text())
        # The registry keeps its own copy: a run folder may be deleted, a model version may not.
        store = self.home / "artifacts" / fingerprint(artifact)[:16]
        store.mkdir(parents=True, exist_ok=True)
        if not (store / "model.tar.gz").exists():
            # Copy beside, then rename: a stop mid-copy never leaves a torn artifact in the store.
            partial = store / f".model.tar.gz.part-{os.getpid()}"
            shutil.copy2(artifact, partial)
            partial.chmod(0o444)  # registered bytes are not to be edited in place
            os.replace(partial, store / "model.tar.gz")
        properties = {}
        report = self.output_path(step.metrics) / step.report_file if step.report_file else None
        if report is not None and report.is_file():  # Evaluate's page goes with the version
            # Named by run: two runs may register the same artifact, each with its own report.
            kept = store / f"report-{self.state['id']}.html"
            shutil.copy2(report, store / f".report.html.part-{os.getpid()}")
            os.replace(store / f".report.html.part-{os.getpid()}", kept)
            properties[REPORT_PROPERTY] = kept.resolve().as_uri()
        registry = open_registry(self.home)
        group = str(self.value(step.model_package_group))
        # A resumed Register (the runner was stopped after registering, before recording it)
        # finds this run's version instead of registering the same model twice.
        earlier = [v for v in registry.list_versions(group) if v.run_id == self.state["id"]]
        if earlier:
            version = earlier[0]
            record["properties"] = {"group": version.group, "version": version.version,
                                    "status": version.status, "artifact": version.artifact_uri}
            self.echo(step.name, f"already registered by this run: {version.group} version {version.version}")
            return
        # The registry records the stored copy's SHA-256 and refuses one that is not what
        # Evaluate scored.
        scored = str(self.value(step.artifact_digest)) if step.artifact_digest else None
        version = registry.register(
            str(self.value(step.model_package_group)), str(store / "model.tar.gz"), metrics,
            status=REGISTERED_STATUS, run_id=self.state["id"],
            description=f"run {self.state['id']} ({self.state['profile']} profile)", properties=properties,
            artifact_sha256=scored,
        )
        record["properties"] = {"group": version.group, "version": version.version,
                                "status": version.status, "artifact": version.artifact_uri,
                                "report": properties.get(REPORT_PROPERTY, "")}
        self.echo(step.name, f"registered {version.group} version {version.version} ({version.status})")

    def _deploy(self, step: DeployStep, record: dict) -> None:
        from pipeline.registry.local import open_registry

        from pipeline.registry.deploy import verify_local_artifact

        registered = self.state["steps"][step.register_step]["properties"]
        name = str(self.value(step.endpoint_name))
        registry = open_registry(self.home)
        verify_local_artifact(registry.get(registered["group"], registered["version"]))
        endpoint = registry.deploy(name, registered["group"], registered["version"],
                                                   require_approved=False)
        record["properties"] = {"endpoint": endpoint.name, "group": endpoint.group,
                                "version": endpoint.version}
        self.echo(step.name, f"endpoint {name} now serves {endpoint.group} version {endpoint.version}; "
                  f"start it with: invmon serve --endpoint {name}")

    def _fail(self, step: FailStep, record: dict) -> None:
        parts = []
        for part in step.message:
            value = self.value(part)
            parts.append(f"{float(value):.4f}" if isinstance(part, JsonGet) else str(value))
        raise RunFailed("".join(parts))


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
