"""The step scripts' torch-free tests under the Python of every SageMaker image, not only 3.11.

The images run Python 3.13 (training, processing) and 3.12 (serving, and Train with the Debugger)
(steps/images.py); the project's own environment is 3.11. For each of those Pythons found on this
machine (on PATH as pythonX.Y, or under `pyenv root`), a virtual environment with what the step
containers install for these modules (numpy, Pillow, tqdm, boto3, matplotlib) and the test tools
(pytest, moto's S3 server) is built once and cached under build/image-pythons/ (git ignores build/),
then pytest runs TESTS with it in a subprocess. The Pythons run at once. A Python that is not
installed is a skip that says so; anything else that goes wrong is a failure.

Not here: modules that import torch (train.py, augment.py, inference.py, evaluate.py's scoring; no
torch wheel for these Pythons is small enough to install here) and tests that run the project's own
code (the CLI, the local runner), which is Python 3.11 only.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, bytecode_cache, install_command
from steps import images

PYTHONS = sorted({c.image.python_version for c in images.CONTAINERS}
                 - {f"{sys.version_info.major}.{sys.version_info.minor}"})
# What the step containers install for these modules, then the test tools: pytest, and moto's S3 with
# the two packages its threaded server needs (moto[server] would add ~35 packages no test here uses).
PACKAGES = ("numpy>=1.26", "pillow>=10", "tqdm>=4.66", "boto3>=1.34", "matplotlib>=3.8",
            "pytest>=8", "moto[s3]>=5.0", "flask", "flask-cors")
TESTS = ("tests/test_rules.py", "tests/test_preprocess.py", "tests/test_ingest.py", "tests/test_torch_free_scripts.py")
DESELECT = (  # these run the project's CLI or its local runner, which need the 3.11 environment
    "tests/test_ingest.py::test_fetch_command_killed_midway_then_rerun_gives_the_same_mirror_and_report",
    "tests/test_ingest.py::test_bad_source_is_one_clear_line",
    "tests/test_ingest.py::test_runner_mirrors_s3_once_through_the_same_code_and_caches_preprocess",
)
VENVS = ROOT / "build" / "image-pythons"


def find_python(version: str) -> Path | None:
    """A working pythonX.Y: on PATH (a pyenv shim only counts when it runs), else under `pyenv root`."""
    candidates = [shutil.which(f"python{version}")]
    pyenv = shutil.which("pyenv")
    root = os.environ.get("PYENV_ROOT")
    if not root and pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
    if root:
        candidates += sorted(Path(root).glob(f"versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in filter(None, candidates):
        done = subprocess.run([str(candidate), "-c", "import sys, venv; print(sys.executable)"],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return Path(done.stdout.strip())
    return None


def environment(python: Path, version: str) -> Path:
    """The cached venv's interpreter for `python`, built on first use (beside, then renamed)."""
    key = hashlib.sha256("\n".join([str(python), *PACKAGES]).encode()).hexdigest()[:12]
    env = VENVS / f"py{version}-{key}"
    if (env / ".ready").is_file():
        return env / "bin" / "python"
    building = env.with_name(f"{env.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([str(python), "-m", "venv", str(building)], check=True, capture_output=True)
    done = subprocess.run([*install_command(building / "bin" / "python"), *PACKAGES], capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        raise AssertionError(f"the Python {version} test environment could not be built: "
                             + done.stderr.strip()[-1500:])
    (building / ".ready").write_text("\n".join(PACKAGES) + "\n")
    try:
        building.rename(env)
    except OSError:  # another run finished it first
        shutil.rmtree(building, ignore_errors=True)
    return env / "bin" / "python"


def run_tests(version: str) -> tuple[str, subprocess.CompletedProcess | str]:
    python = find_python(version)
    if python is None:
        return version, f"Python {version} is not installed here (neither python{version} on PATH nor under pyenv)"
    venv_python = environment(python, version)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env = bytecode_cache(env, venv_python.parent.parent / "pycache")
    # The step folders on the path, as /opt/ml/code is in the container (`make env` does the same
    # for the project's environment with a .pth file).
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in sorted((ROOT / "scripts").iterdir()) if p.is_dir())
    done = subprocess.run([str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           *TESTS, *(f"--deselect={node}" for node in DESELECT)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return version, done


@pytest.fixture(scope="module")
def runs() -> dict:
    with ThreadPoolExecutor(max_workers=len(PYTHONS)) as pool:
        return dict(pool.map(run_tests, PYTHONS))


def test_the_images_pythons_are_the_ones_tested():
    assert PYTHONS == ["3.12", "3.13"]  # steps/images.py: training 3.13, inference and train-debugger 3.12


@pytest.mark.pypi
@pytest.mark.parametrize("version", PYTHONS)
def test_the_torch_free_script_tests_pass_under_the_images_python(runs, version):
    done = runs[version]
    if isinstance(done, str):
        pytest.skip(done)
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, f"under Python {version}:\n{tail}"
    last = done.stdout.strip().splitlines()[-1]  # "47 passed, 3 deselected[, N warnings] in 22.9s"
    summary = re.match(r"(\d+) passed\b", last)
    assert summary and int(summary.group(1)) >= 40, tail  # every file ran, not an empty selection
    assert f"{len(DESELECT)} deselected" in last and not re.search(r"failed|error", last), tail
