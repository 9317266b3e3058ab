"""Run one step container's script as a subprocess, under the contract it has on SageMaker.

Processing: the container's /opt/ml/processing tree is mirrored under the step's folder;
inputs are linked into it, outputs are read back from it, and arguments that name container
paths are rewritten to the mirror. Training: hyperparameters become `--name value` arguments,
channels and the model dir arrive as SM_* variables, and the model dir is tarred into
model.tar.gz afterwards, as SageMaker does.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from steps.base import PROCESSING_BASE, Code, MetricDefinition, stage_source


class JobFailed(RuntimeError):
    """The script exited non-zero; the message carries the end of its log."""


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
               should_stop: Callable[[dict[str, list[float]]], bool] | None = None) -> JobResult:
    """Stage the code like /opt/ml/code, run the entry point, stream and parse its log.

    `should_stop` is asked after every metric line (the tuner's early stopping); when it says
    yes the job is terminated and reported as stopped, not failed.
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
        proc = subprocess.Popen(
            [str(python), "-u", code.entry_point, *args], cwd=code_dir, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,  # so a stop reaches the script's DataLoader workers too
        )
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
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
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


def training_env(channels: dict[str, Path], model_dir: Path, output_dir: Path, job_name: str,
                 hyperparameters: dict[str, str]) -> dict[str, str]:
    """The SM_* variables the SageMaker training toolkit sets for the script."""
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch, no GPUs
        gpus = 0
    env = {
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DATA_DIR": str(output_dir),
        "SM_HOSTS": json.dumps(["algo-1"]),
        "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": str(gpus),
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
