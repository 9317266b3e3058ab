"""Every step container's requirements file installs in its SageMaker image (steps/images.py).

A job pip-installs its step's requirements file on top of the image before the script runs. Here
pip resolves each file for the image's Python (`--python-version`) and platform (manylinux up to
the image's glibc, x86_64), binary wheels only as in a container that should compile nothing,
with torch and torchvision held at the versions the image ships (installed there already: here
metadata-only wheels at those versions and a constraints file). A package declared as compiled in
the image (steps/images.py) must have a source release pip can read; its metadata stands in for a
wheel. pip reads wheel metadata only (PEP 658), so nothing large is downloaded.

It needs the package index (PyPI; CI has it). It skips, saying so, only when the index cannot be
reached; any other failure of pip fails the test with pip's own lines, which name the requirement.
The machine's pip configuration files are left out (a mirror or a local wheel folder is not what
the image sees); PIP_INDEX_URL, PIP_CERT and proxies from the environment are kept.

A resolution that succeeded is kept for CACHE_HOURS under build/step-requirements/, keyed by the
bytes of the files (those it includes with -r/-c too), the image, the index and pip's version: a
changed file is resolved again at once; a new release on the index is seen within CACHE_HOURS
(and always on a fresh checkout, as in CI). A failure is never kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from steps import images
from steps.images import Container

pytestmark = pytest.mark.pypi

PYPI = "https://pypi.org/simple"
CACHE = images.SCRIPTS.parent / "build" / "step-requirements"
CACHE_HOURS = 6
# Settings from the environment that say where and how to reach the index: kept. Every other PIP_*
# variable (find-links, extra indexes, constraints) is this machine's, not the image's: dropped.
KEPT_PIP_SETTINGS = {"PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY",
                     "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_CACHE_DIR"}


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", PYPI).rstrip("/")


def pip_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in KEPT_PIP_SETTINGS}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def index_unreachable() -> str | None:
    """Why the package index cannot be reached, or None when it answers."""
    url = f"{index_url()}/pip/"
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20,
                                    context=context) as answer:
            answer.read(0)
        return None
    except urllib.error.HTTPError as exc:  # it answered: reachable (pip will say what is wrong)
        return None if exc.code < 500 else f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} cannot be reached ({getattr(exc, 'reason', exc)})"


@pytest.fixture(scope="module")
def index():
    why = index_unreachable()
    if why:
        pytest.skip(f"the package index is needed to resolve the step requirements: {why}")
    return index_url()


def platforms(glibc: str) -> list[str]:
    """The manylinux tags an x86_64 Linux with this glibc installs (pip does not widen a
    manylinux_2_N tag given on the command line by itself)."""
    newest = int(glibc.split(".")[1])
    return ([f"manylinux_2_{minor}_x86_64" for minor in range(newest, 4, -1)]
            + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])


@dataclass
class Resolution:
    container: Container
    requirements: Path
    returncode: int
    installs: dict[str, str] = field(default_factory=dict)  # name -> version
    errors: list[str] = field(default_factory=list)  # pip's ERROR lines

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        image = self.container.image
        file = self.requirements
        if file.is_relative_to(images.SCRIPTS.parent):
            file = file.relative_to(images.SCRIPTS.parent)
        what = f"{file} in pytorch-{image.scope} {image.version} (Python {image.python_version}, torch {image.torch})"
        if self.ok:
            return f"{what}: {len(self.installs)} packages"
        return f"{what} cannot be installed: " + " | ".join(self.errors or ["pip failed with no error line"])


def metadata_wheel(folder: Path, name: str, version: str, requires: list[str] = (),
                   requires_python: str | None = None) -> Path:
    """A wheel holding nothing but metadata: what pip needs to resolve against a package that the
    image provides itself."""
    dist = f"{name.replace('-', '_')}-{version}"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    if requires_python:
        lines.append(f"Requires-Python: {requires_python}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", "\n".join(lines) + "\n")
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def compiled_stand_in(name: str, folder: Path, env: dict) -> str:
    """A package that ships source only and that the image compiles: pip's own reading of its newest
    source release gives the version and the dependencies (which must resolve too); the stand-in
    wheel carries them. Returns the version."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps",
         f"--no-binary={name}", "--target", str(folder / "target"), "--report", "-", name],
        capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"{name} (compiled in the image) has no source release that pip can read: "
                             + " | ".join(line for line in done.stderr.splitlines() if "ERROR" in line))
    (item,) = json.loads(done.stdout)["install"]
    meta, archive = item["metadata"], item["download_info"]
    assert not archive["url"].endswith(".whl"), archive  # a source release
    metadata_wheel(folder, meta["name"], meta["version"], meta.get("requires_dist", []), meta.get("requires_python"))
    return meta["version"]


def included_files(requirements: Path) -> list[Path]:
    """The file and every file it includes (-r, --requirement, -c, --constraint), recursively."""
    found, pending = [], [requirements]
    while pending:
        file = pending.pop()
        if file in found:
            continue
        found.append(file)
        for line in file.read_text().splitlines():
            words = line.split("#")[0].split()
            if len(words) >= 2 and words[0] in ("-r", "--requirement", "-c", "--constraint"):
                pending.append((file.parent / words[1]).resolve())
            elif words and words[0].startswith(("--requirement=", "--constraint=")):
                pending.append((file.parent / words[0].split("=", 1)[1]).resolve())
    return found


def cache_file(container: Container, requirements: Path) -> Path:
    from importlib.metadata import version

    key = hashlib.sha256(json.dumps([dataclasses.asdict(container.image), container.compiled_in_image,
                                     index_url(), version("pip"), platforms(container.image.glibc)]).encode())
    for file in included_files(requirements):
        key.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return CACHE / f"{container.name}-{key.hexdigest()[:20]}.json"


def resolve(container: Container, requirements: Path | None = None) -> Resolution:
    """resolve_with_pip(), or its recent success with the same inputs (see the module docstring)."""
    requirements = requirements or container.requirements
    cached = cache_file(container, requirements)
    if cached.is_file() and time.time() - cached.stat().st_mtime < CACHE_HOURS * 3600:
        return Resolution(container, requirements, 0, json.loads(cached.read_text()))
    result = resolve_with_pip(container, requirements)
    if result.ok:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(result.installs, indent=1, sort_keys=True) + "\n")
        partial.replace(cached)
    return result


def resolve_with_pip(container: Container, requirements: Path) -> Resolution:
    """pip's resolution of `requirements` in the container's image.

    The image's torch and torchvision are already installed there: pip keeps them when they satisfy
    the file and never looks at their own dependencies. Here they are metadata-only wheels at the
    image's versions, labelled `+image` (a local version: it sorts above the index's release of the
    same number, and `==2.10.0` matches it), held by a constraints file, so that anything asking for
    another torch fails instead of replacing the image's.
    """
    image = container.image
    env = pip_environment()
    with tempfile.TemporaryDirectory(prefix=f"resolve-{container.name}-") as tmp:
        tmp = Path(tmp)
        provided = tmp / "provided"
        held = tmp / "image.txt"
        held.write_text(f"torch=={image.torch}\ntorchvision=={image.torchvision}\n")
        metadata_wheel(provided, "torch", f"{image.torch}+image")
        metadata_wheel(provided, "torchvision", f"{image.torchvision}+image", [f"torch=={image.torch}"])
        for name in container.compiled_in_image:
            compiled_stand_in(name, provided, env)
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--only-binary=:all:", "--implementation", "cp", "--python-version", image.python_version,
                   *(f"--platform={p}" for p in platforms(image.glibc)),
                   "--target", str(tmp / "target"), "--find-links", str(provided), "--constraint", str(held),
                   "--requirement", str(requirements), "--report", "-"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    result = Resolution(container, requirements, done.returncode)
    if done.returncode == 0:
        report = json.loads(done.stdout)
        result.installs = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
                           for i in report["install"]}
    else:
        result.errors = [line.removeprefix("ERROR: ") for line in done.stderr.splitlines()
                         if line.startswith("ERROR: ") and "yanked" not in line]
    return result


@pytest.fixture(scope="module")
def resolutions(index) -> dict[str, Resolution]:
    # The files resolve at once: each is a few seconds of waiting on the index.
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip([c.name for c in images.CONTAINERS], pool.map(resolve, images.CONTAINERS)))


@pytest.mark.parametrize("name", [c.name for c in images.CONTAINERS])
def test_the_requirements_install_in_the_steps_image(resolutions, name):
    result = resolutions[name]
    assert result.ok, result.describe()
    image = result.container.image
    # The image's own torch and torchvision stay: the file asks for nothing that would replace them.
    for name, version in (("torch", image.torch), ("torchvision", image.torchvision)):
        assert result.installs.get(name, f"{version}+image") == f"{version}+image", (name, result.installs[name])


def test_every_step_script_folder_has_a_declared_container():
    declared = {c.requirements.parent.name for c in images.CONTAINERS}
    folders = {p.parent.name for p in images.SCRIPTS.glob("*/requirements.txt")}
    assert folders == declared
    for container in images.CONTAINERS:
        assert container.requirements.is_file(), container.requirements


def test_the_debugger_requirements_keep_trains_own(resolutions):
    """requirements-debugger.txt is train's file plus smdebug, not a second list to keep in step."""
    assert images.TRAIN_DEBUGGER.requirements.read_text().splitlines().count("-r requirements.txt") == 1
    plain, debugger = resolutions["train"].installs, resolutions["train-debugger"].installs
    assert {"smdebug", "pyinstrument-cext"} <= set(debugger) and "smdebug" not in plain
    assert debugger["numpy"].startswith("1.") and {n for n in plain if n.startswith("efficientnet")} <= set(debugger)


def test_a_pin_that_cannot_install_fails_naming_it(index, tmp_path):
    """The file train had before: numpy<2 (for smdebug) has no wheel for Python 3.13."""
    file = tmp_path / "requirements.txt"
    file.write_text("pillow>=10\nnumpy>=1.26,<2\n")
    result = resolve(images.TRAIN, file)
    assert not result.ok
    assert any("numpy<2,>=1.26" in line for line in result.errors), result.errors
    assert "Python 3.13" in result.describe() and "numpy<2,>=1.26" in result.describe()
    # The same file installs in the Python 3.12 image, so the failure is the pin against the image.
    assert resolve(Container("py312", images.PYTORCH_TRAINING_PY312, file, "TrainingInstanceType")).ok

