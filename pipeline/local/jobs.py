"""Run one step container's script as a subprocess, under the contract it has on SageMaker.

Processing: the container's /opt/ml/processing tree is mirrored under the step's folder;
inputs are linked into it, outputs are read back from it, and arguments that name container
paths are rewritten to the mirror. Training: hyperparameters become `--name value` arguments,
channels and the model dir arrive as SM_* variables, and the model dir is tarred into
model.tar.gz afterwards, as SageMaker does. A job that calls an endpoint (the smoke test) gets the
real local endpoint, served for its duration (`serve_endpoint`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from steps.base import PROCESSING_BASE, ROOT, Code, MetricDefinition, stage_source


class JobFailed(RuntimeError):
    """The script exited non-zero; the message carries the end of its log."""


class JobTimedOut(JobFailed):
    """The job ran past its MaxRuntimeInSeconds and was stopped, as SageMaker stops it."""


# Process groups of the jobs running now (a tuner runs several at once, from threads): a stop of
# the runner (Ctrl-C, SIGTERM) ends every one of them, trials included, before anything waits.
_LIVE: dict[int, str] = {}
_LIVE_LOCK = threading.RLock()  # re-entrant: stop_all also runs in a signal handler of the main thread
# Set by stop_all: a job that a tuner's thread was about to start when the stop came (after
# stop_all had looked at _LIVE) must not start at all, or the stopped runner would wait for it.
_STOPPING = threading.Event()


class JobNotStarted(JobFailed):
    """A stop came before the job's process started; it never ran."""


def accept_jobs() -> None:
    """A new run starts jobs again after an earlier stop in this process."""
    _STOPPING.clear()


def live_process_groups() -> dict[int, str]:
    with _LIVE_LOCK:
        return dict(_LIVE)


def stop_all(sig: int = signal.SIGTERM, grace_s: float = 5.0) -> None:
    """Signal every live job's process group, then SIGKILL what is left after `grace_s`; no new
    job starts until accept_jobs()."""
    with _LIVE_LOCK:
        _STOPPING.set()
        groups = dict(_LIVE)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    deadline = time.monotonic() + grace_s
    while groups and time.monotonic() < deadline:
        groups = {g: n for g, n in groups.items() if group_alive(g)}
        time.sleep(0.05)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


STOP_GRACE_S = 10.0


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def identity(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None where there is none: with
    its pid, what tells this process from a later one that reuses the number."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def still_ours(pgid: int, started: float) -> bool:
    """Whether `pgid` is still the process group a job of ours led: its leader alive, started
    when we recorded, and still the leader of that group."""
    found = identity(pgid)
    if found is None or abs(found - started) > 0.05:
        return False
    try:
        return os.getpgid(pgid) == pgid
    except ProcessLookupError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass
class JobResult:
    seconds: float
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> every value seen
    stopped_early: bool = False


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def run_script(python: Path, code: Code, workdir: Path, args: list[str], env: dict[str, str],
               log_path: Path, metrics: tuple[MetricDefinition, ...] = (),
               echo: Callable[[str], None] | None = None,
               should_stop: Callable[[dict[str, list[float]]], bool] | None = None,
               max_runtime_s: float | None = None,
               on_start: Callable[[int, float], None] | None = None,
               on_end: Callable[[int], None] | None = None) -> JobResult:
    """Stage the code like /opt/ml/code, run the entry point, stream and parse its log.

    `should_stop` is asked after every metric line (the tuner's early stopping); when it says
    yes the job is terminated and reported as stopped, not failed. A job still running after
    `max_runtime_s` (the step's MaxRuntimeInSeconds) is stopped and fails with JobTimedOut.
    `on_start(pgid, started)` lets the runner record the job's process group and when its leader
    started (see LocalRun); `on_end(pgid)` tells it the group is gone.
    """
    code_dir = stage_source(code, workdir / "code")
    patterns = [(m.name, re.compile(m.regex)) for m in metrics]
    seen: dict[str, list[float]] = {}
    stopped = False
    started = time.monotonic()
    # Passive OpenMP waits: spinning threads collapse PyTorch's CPU throughput (20x measured)
    # whenever anything else shares the cores, e.g. a tuning trial beside the runner.
    full_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "w") as log:
        if _STOPPING.is_set():
            raise JobNotStarted(f"{code.entry_point} was not started: the run is stopping")
        proc = subprocess.Popen(
            [str(python), "-u", code.entry_point, *args], cwd=code_dir, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,  # so a stop reaches the script's DataLoader workers too
        )
        with _LIVE_LOCK:  # stop_all either sees this job, or stopped before it was registered
            _LIVE[proc.pid] = code.entry_point
            stopping = _STOPPING.is_set()
        if stopping:  # the stop came while it was starting: end it here, it never ran its course
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            with _LIVE_LOCK:
                _LIVE.pop(proc.pid, None)
            raise JobNotStarted(f"{code.entry_point} was stopped as it started: the run is stopping")
        if on_start:
            on_start(proc.pid, identity(proc.pid) or 0.0)
        timer = None
        timed_out = threading.Event()
        if max_runtime_s:
            def expire() -> None:
                timed_out.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                # As SageMaker does: SIGTERM, then SIGKILL for a job that does not stop.
                force = threading.Timer(STOP_GRACE_S, _kill_group, args=(proc.pid,))
                force.daemon = True
                force.start()
            timer = threading.Timer(max_runtime_s, expire)
            timer.daemon = True
            timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    echo(line.rstrip("\n"))
                matched = False
                for name, pattern in patterns:
                    for value in pattern.findall(line):
                        seen.setdefault(name, []).append(float(value))
                        matched = True
                if matched and should_stop and should_stop(seen):
                    stopped = True
                    os.killpg(proc.pid, signal.SIGTERM)
                    break
            proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
            # The script has exited; anything it left in its group (a DataLoader worker) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with _LIVE_LOCK:
                _LIVE.pop(proc.pid, None)
            if on_end:
                on_end(proc.pid)
    if timed_out.is_set():
        raise JobTimedOut(f"{code.entry_point} ran past its MaxRuntimeInSeconds of {max_runtime_s:g} s "
                          f"and was stopped; end of its log ({log_path}):\n{tail(log_path)}")
    if proc.returncode != 0 and not stopped:
        raise JobFailed(f"{code.entry_point} exited with code {proc.returncode}; end of its log "
                        f"({log_path}):\n{tail(log_path)}")
    return JobResult(time.monotonic() - started, seen, stopped)


def processing_paths(step_dir: Path) -> Callable[[str], str]:
    """Map container paths (/opt/ml/processing/...) to the step's local mirror of them."""
    mirror = step_dir / "processing"

    def local(value: str) -> str:
        if value == PROCESSING_BASE or value.startswith(PROCESSING_BASE + "/"):
            return str(mirror) + value[len(PROCESSING_BASE):]
        return value

    return local


def link_input(source: Path | None, destination: Path) -> None:
    """Put an input where the container expects it: a folder is linked, a file goes inside one."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_symlink() or destination.is_file():
        destination.unlink()
    if source is None:  # an optional input that was not given: an empty folder, as SageMaker mounts
        destination.mkdir(exist_ok=True)
    elif source.is_dir():
        destination.symlink_to(source.resolve(), target_is_directory=True)
    else:
        destination.mkdir(exist_ok=True)
        (destination / source.name).symlink_to(source.resolve())


def nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def visible_gpus() -> int:
    """How many GPUs a job started here sees. torch is asked only where an NVIDIA driver is
    installed: importing it costs the runner 1-2 s of CPU per run, and a machine without the
    driver has no GPU to count."""
    if not nvidia_driver_present():
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a driver without torch, or a broken one: no GPUs to use
        return 0


def training_env(channels: dict[str, Path], model_dir: Path, output_dir: Path, job_name: str,
                 hyperparameters: dict[str, str]) -> dict[str, str]:
    """The SM_* variables the SageMaker training toolkit sets for the script."""
    env = {
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DATA_DIR": str(output_dir),
        "SM_HOSTS": json.dumps(["algo-1"]),
        "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": str(visible_gpus()),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HPS": json.dumps(hyperparameters),
        "TRAINING_JOB_NAME": job_name,
    }
    env.update({f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()})
    return env


def hyperparameter_args(hyperparameters: dict[str, str]) -> list[str]:
    args: list[str] = []
    for name, value in hyperparameters.items():
        args += [f"--{name}", str(value)]
    return args


def tar_model(model_dir: Path, tarball: Path) -> Path:
    """model_dir -> model.tar.gz with paths relative to the dir, as SageMaker packs SM_MODEL_DIR."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:gz") as tar:
        for item in sorted(model_dir.rglob("*")):
            tar.add(item, arcname=item.relative_to(model_dir).as_posix(), recursive=False)
    return tarball


class EndpointFailed(RuntimeError):
    """The local endpoint a job needs did not start (its log's end is in the message)."""


ENDPOINT_READY_S = 180.0  # importing torch and loading a model on a busy 2-core machine
ENDPOINT_STOP_S = 20.0


def _ping(port: int) -> int | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@contextlib.contextmanager
def serve_endpoint(artifact: Path, model_version: str, log_path: Path, capture_dir: str = "",
                   ready_s: float = ENDPOINT_READY_S,
                   on_start: Callable[[int, float], None] | None = None,
                   on_end: Callable[[int], None] | None = None):
    """The real local endpoint (`python -m pipeline.serving.http_server`) for the block: yields
    its URL once /ping answers 200, and stops it after (SIGTERM: it drains; SIGKILL past
    ENDPOINT_STOP_S). The socket is bound here, on 127.0.0.1 and a free port, and handed over,
    so no port is picked and raced for. Its process group counts among the jobs that a stop of
    the runner ends (stop_all), and `on_start`/`on_end` let the runner record it as a job's."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    args = [sys.executable, "-m", "pipeline.serving.http_server", str(artifact), "--fd", str(sock.fileno()),
            "--model-version", model_version]
    if capture_dir:
        args += ["--capture-dir", capture_dir]
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, pass_fds=[sock.fileno()], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        sock.close()  # the server holds its own copy
    with _LIVE_LOCK:
        _LIVE[proc.pid] = "local endpoint"
    if on_start:
        on_start(proc.pid, identity(proc.pid) or 0.0)
    try:
        deadline = time.monotonic() + ready_s
        while _ping(port) != 200:
            if proc.poll() is not None:
                raise EndpointFailed(f"the local endpoint exited with code {proc.returncode} before it was "
                                     f"ready; end of its log ({log_path}):\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise EndpointFailed(f"the local endpoint was not ready within {ready_s:g} s; end of its "
                                     f"log ({log_path}):\n{tail(log_path)}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=ENDPOINT_STOP_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
        _kill_group(proc.pid)  # anything it left in its group
        log.close()
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)
        if on_end:
            on_end(proc.pid)
