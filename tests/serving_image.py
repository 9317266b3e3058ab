"""What the SageMaker PyTorch serving image has, and nothing more, for tests that load artifacts.

The serving image ships torch, torchvision, Pillow and numpy (and what torch itself needs). A
folder of links to exactly those distributions of the project's own environment (no second copy
of torch) is put on the path of an isolated interpreter (`python -I -S`: no site-packages, no
PYTHONPATH, no user site); the project, efficientnet_lite_pytorch and the SageMaker toolkit are
not on it. Where `unshare -n` works (root on Linux), the interpreter also runs with no network.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from packaging.requirements import Requirement

SERVING_IMAGE_PACKAGES = ("torch", "torchvision", "pillow", "numpy")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(packages=SERVING_IMAGE_PACKAGES) -> dict[str, metadata.Distribution]:
    """The installed distributions `packages` need, their dependencies' too (markers evaluated
    for this interpreter, extras followed), by normalised name."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(name, frozenset()) for name in packages]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (_key(name), extras) in seen:
            continue
        seen.add((_key(name), extras))
        try:
            dist = found.get(_key(name)) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency this environment does not have
        found[_key(name)] = dist
        for line in dist.requires or ():
            requirement = Requirement(line)
            wanted = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in wanted):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return found


def link_serving_image(dest: Path) -> Path:
    """`dest` holds links to the top-level files and folders of the serving image's distributions
    (their dist-info too, so that pip sees them installed). Returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in closure().values():
        for file in dist.files or ():
            top = file.parts[0]
            if top == ".." or top.endswith(".pth") or top == "__pycache__":
                continue  # scripts in bin/, and .pth hooks (this folder is not a site dir)
            link = dest / top
            if not link.exists() and not link.is_symlink():
                link.symlink_to(Path(dist.locate_file(top)).resolve())
    return dest


@lru_cache(maxsize=1)
def no_network_prefix() -> tuple[str, ...]:
    """`unshare -n` where it works (a process with no network at all), else nothing."""
    try:
        done = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return ("unshare", "-n") if done.returncode == 0 else ()


def run_isolated(image: Path, code: str, *args: str, cwd: Path | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """`code` in `python -I -S` whose path is the standard library and `image` only, with no
    network where unshare allows it (and proxies that refuse, where it does not)."""
    prelude = f"import sys; sys.path.append({str(image)!r}); del sys\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd or image),
           "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    command = [*no_network_prefix(), sys.executable, "-I", "-S", "-c", prelude + code, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
