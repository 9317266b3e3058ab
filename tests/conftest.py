"""Shared fixtures: a tiny real model artifact, the real ABID sample, an isolated INVMON_HOME."""
from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ABID_SAMPLE = ROOT.parent / "shared" / "data" / "abid-sample"
FILE_LIST = ROOT.parent / "shared" / "data" / "file_list.json"


def import_script(folder: str, module: str):
    """scripts/<folder>/<module>.py, by its plain name, as its container imports it (`make env`
    lists the step folders in the environment's invmon-step-code.pth)."""
    imported = importlib.import_module(module)
    expected = (SCRIPTS / folder).resolve()
    if Path(imported.__file__).resolve().parent != expected:
        raise ImportError(f"{module} came from {imported.__file__}, not {expected}: run `make env`")
    return imported


def make_artifact(dest: Path, arch: str = "efficientnet_lite0", image_size: int = 32, seed: int = 0,
                  model_id: str = "test-model", tta: str | None = None) -> Path:
    """Write a real (randomly initialised) model artifact, as train.py lays it out.

    Returns the path of model.tar.gz; the extracted layout is left in dest/model/.
    """
    import torch

    inference = import_script("inference", "inference")
    torch.manual_seed(seed)
    model_dir = dest / "model"
    (model_dir / "code").mkdir(parents=True, exist_ok=True)
    model = inference.build_model(arch, 5)
    torch.save(model.state_dict(), model_dir / "model.pth")
    config = {"arch": arch, "labels": [1, 2, 3, 4, 5], "image_size": image_size,
              "mean": list(inference.IMAGENET_MEAN), "std": list(inference.IMAGENET_STD),
              "model_id": model_id, **({"tta": tta} if tta else {})}
    (model_dir / "model_config.json").write_text(json.dumps(config))
    for name in ("inference.py", "photos.py"):
        shutil.copy(SCRIPTS / "inference" / name, model_dir / "code" / name)
    from pipeline.local.jobs import tar_model  # packed as SageMaker packs SM_MODEL_DIR

    return tar_model(model_dir, dest / "model.tar.gz")


def install_command(python: Path) -> list[str]:
    """The command that installs packages into the venv of `python`, the packages to follow: uv
    where the project's environment has it (`make env` installs it; in parallel, a fraction of
    pip's time), else pip. Nothing is byte-compiled up front (12 s of CPU for the image-Python
    environment, most of it modules no test imports): the processes that use the environment
    compile what they import and keep it there (`bytecode_cache`)."""
    uv = Path(sys.executable).with_name("uv")
    if uv.is_file():
        return [str(uv), "pip", "install", "--quiet", "--system-certs", "--python", str(python)]
    return [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]


def bytecode_cache(env: dict, folder: Path) -> dict:
    """`env` for a process that writes the bytecode it compiles under `folder` (a test environment's
    own), whatever PYTHONDONTWRITEBYTECODE says here, and leaves the source tree without __pycache__."""
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(folder)}


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="session")
def abid_sample() -> Path:
    if not ABID_SAMPLE.is_dir():
        pytest.skip(f"real ABID sample not found at {ABID_SAMPLE}")
    return ABID_SAMPLE


@pytest.fixture(scope="session")
def bin_photos(tmp_path_factory) -> Path:
    """Photos in 1/ ... 5/ folders: the real ABID sample when ../shared has it, generated bin
    photos (pipeline.data.synth) otherwise, so the core contracts run on a checkout without it."""
    if ABID_SAMPLE.is_dir():
        return ABID_SAMPLE
    from pipeline.data import synth

    out = tmp_path_factory.mktemp("generated-bins")
    abid = out / "abid"
    synth.write_dataset(abid, per_class=8, seed=3)
    for meta in sorted((abid / "metadata").glob("*.json")):
        count = json.loads(meta.read_text())["EXPECTED_QUANTITY"]
        (out / str(count)).mkdir(exist_ok=True)
        shutil.copy(abid / "bin-images" / f"{meta.stem}.jpg", out / str(count) / f"{meta.stem}.jpg")
    return out


def run_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this test run that its parallel workers share (each worker's own temporary
    folders sit side by side in one base folder); take `locked` around what is built there."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


@contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (created if missing), held across processes until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def shared_step_envs(tmp_path_factory):
    """One folder of step environments for the whole run, shared by the parallel workers
    (INVMON_ENVS): each test still has its own INVMON_HOME, but a step's requirements are
    installed once per run, not once per home (a pip check of a second or more each)."""
    folder = run_folder(tmp_path_factory, "step-envs")
    before = os.environ.get("INVMON_ENVS")
    os.environ["INVMON_ENVS"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("INVMON_ENVS", None)
    else:
        os.environ["INVMON_ENVS"] = before


@pytest.fixture
def invmon_home(tmp_path, monkeypatch) -> Path:
    """An isolated INVMON_HOME (runs, registry, step environments, cache) for one test."""
    home = tmp_path / "invmon-home"
    monkeypatch.setenv("INVMON_HOME", str(home))
    return home


# -- real-sample tests: marked, and counted at the end of every run ---------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: needs the real ABID sample in ../shared/data")
    share_the_cores_among_workers()


def share_the_cores_among_workers() -> None:
    """On parallel workers, give each worker's torch (and the jobs it starts) its share of the
    cores, waiting passively: N workers of all-core OpenMP pools on these cores spin against each
    other (a training test and a monitor test took 12% less CPU with one thread each). Runs before
    any test imports torch; a setting already in the environment wins, and tests of the thread
    defaults clear it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The files that take longest start first. `make test` runs the files on parallel workers
# (pytest-xdist, one file at a time per worker, so a module's fixtures are built once) in this
# order, and a long file started last would keep one worker busy while the other waits. Measured
# wall seconds on the 2-core machine (docs/benchmarks.md), the environment builds of a fresh
# clone counted (image-pythons, torchserve); files not listed follow in collection order.
LONGEST_FIRST = ("test_end_to_end.py", "test_image_pythons.py", "test_train.py", "test_monitor.py",
                 "test_torchserve_ping.py", "test_serving_server.py", "test_smoke.py", "test_deploy_aws.py",
                 "test_champion.py", "test_artifact_self_contained.py", "test_train_distributed.py",
                 "test_torchserve.py", "test_debugger.py", "test_baseline.py", "test_report.py",
                 "test_predict_bulk.py", "test_aws_cli.py", "test_cli_s3.py", "test_partial_finetune.py",
                 "test_rollout.py", "test_tails.py", "test_pretrained.py", "test_transform.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "abid_sample" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say how many real-sample tests ran: a checkout without ../shared skips them, visibly."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in counts:
        for report in terminalreporter.stats.get(outcome, []):
            if "real_data" in getattr(report, "keywords", {}):
                counts[outcome] += 1
    total = sum(counts.values())
    if total:
        where = "present" if ABID_SAMPLE.is_dir() else "ABSENT: these tests were skipped"
        terminalreporter.write_line(
            f"real ABID sample tests: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped (../shared/data/abid-sample {where})")


@pytest.fixture(autouse=True)
def notifications_log(tmp_path, monkeypatch) -> Path:
    """Where this test's local alerts go (pipeline/alerts.py), never the project's .invmon/."""
    path = tmp_path / "notifications.jsonl"
    monkeypatch.setenv("INVMON_NOTIFICATIONS", str(path))
    monkeypatch.delenv("INVMON_ALERTS_TOPIC_ARN", raising=False)
    monkeypatch.delenv("INVMON_NOTIFY_COMMAND", raising=False)
    return path
