"""Step environments: one virtual environment per requirements.txt, on top of the project's.

A step container installs its requirements.txt on top of the framework image. Locally the
"image" is the project's own environment: each step environment is a venv whose site-packages
also see the project's (a .pth file), so pip installs only what the step adds. Environments are
built once and cached by the hash of the requirements file and the interpreter.

A machine that reaches no package registry but already holds what the steps need (an image
built with it, or wheels installed beside the project) sets INVMON_STEP_ENVS=runner: every step
then runs in the runner's own interpreter and nothing is installed. The requirements it lacks are
named in the log, since a step fails only if it imports them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

from pipeline.digests import sha256_of

MODES = ("", "runner")  # INVMON_STEP_ENVS: a venv per requirements file (the default), or none
_reported: set = set()  # the requirements files whose missing distributions were logged


class StepEnvironmentError(RuntimeError):
    """A step's requirements could not be installed."""


def env_key(requirements: Path | None) -> str:
    parts = [sys.executable.encode()]
    if requirements is not None and requirements.is_file():
        parts.append(requirements.read_bytes())
    return sha256_of(parts)[:16]


def step_env_mode() -> str:
    mode = os.environ.get("INVMON_STEP_ENVS", "").strip()
    if mode not in MODES:
        raise StepEnvironmentError(f"INVMON_STEP_ENVS={mode}: the only value is 'runner' (every step in the runner's "
                                   "own interpreter, nothing installed); leave it unset for a venv per step")
    return mode


def requirement_names(requirements: Path, seen: frozenset = frozenset()) -> list[str]:
    """The distributions a requirements file names, its `-r` includes followed once each (pip's
    syntax, the subset step files use: one requirement a line, comments after #; other options
    are skipped, and a line that names no distribution, such as a path, is kept whole)."""
    seen = seen | {requirements.resolve()}
    names = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(("-r", "--requirement")):
            included = requirements.parent / re.split(r"[\s=]+", line, maxsplit=1)[-1].removeprefix("-r").strip()
            if included.resolve() not in seen:
                names += requirement_names(included, seen)
        elif line and not line.startswith("-"):
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*(?=\s*(?:[<>=!~;\[@]|$))", line)
            names.append(name.group(0) if name else line)
    return names


def missing_distributions(requirements: Path | None) -> list[str]:
    """What `requirements` names that this interpreter has not installed (versions not compared)."""
    missing = []
    for name in requirement_names(requirements) if requirements is not None and requirements.is_file() else []:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def python_for(requirements: Path | None, envs_dir: Path, log=print) -> Path:
    """The interpreter of the environment for `requirements`, building it on first use; with
    INVMON_STEP_ENVS=runner, the runner's own."""
    if step_env_mode() == "runner":
        missing = missing_distributions(requirements)
        if missing and requirements not in _reported:  # once a process (a run), not once a tuning trial
            _reported.add(requirements)
            log(f"INVMON_STEP_ENVS=runner: this interpreter lacks {', '.join(missing)} of {requirements}; "
                "the step fails if it imports them")
        return Path(sys.executable)
    env_dir = envs_dir / env_key(requirements)
    python = env_dir / "bin" / "python"
    ready = env_dir / ".ready"
    if ready.exists():
        return python

    log(f"building step environment {env_dir.name} from {requirements or 'no requirements'}")
    # Build beside the final place and rename, so two runs building at once never share a half-made env.
    building = env_dir.with_name(f"{env_dir.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    venv.EnvBuilder(clear=True, with_pip=False, symlinks=True).create(building)
    python = building / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip())
    # Layer the project's environment under the step's own packages (.pth entries come after it).
    parent_sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_invmon_base.pth").write_text("\n".join(sorted(parent_sites)) + "\n")
    if requirements is not None and requirements.is_file():
        # The project's pip installs into the step env; satisfied requirements cost no download.
        # --no-compile: a step imports a fraction of what it installs (the Debugger's smdebug
        # brings pandas); Python compiles what is imported, on first use (7.7 s of CPU to 3.1 s).
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
             "--disable-pip-version-check", "--no-compile", "-r", str(requirements)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise StepEnvironmentError(
                f"installing {requirements} failed:\n{result.stderr.strip()[-2000:]}"
            )
    (building / ".ready").write_text(str(requirements or ""))
    try:
        building.rename(env_dir)
    except OSError:  # another run finished the same environment first
        shutil.rmtree(building, ignore_errors=True)
    return env_dir / "bin" / "python"
