"""Shared fixtures: a tiny real model artifact, the real ABID sample, an isolated INVMON_HOME."""
from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ABID_SAMPLE = ROOT.parent / "shared" / "data" / "abid-sample"
FILE_LIST = ROOT.parent / "shared" / "data" / "file_list.json"


def import_script(folder: str, module: str):
    """Import scripts/<folder>/<module>.py the way its container would (its folder on sys.path)."""
    path = str(SCRIPTS / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return __import__(module)


def make_artifact(dest: Path, arch: str = "resnet18", image_size: int = 32, seed: int = 0,
                  model_id: str = "test-model") -> Path:
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
              "model_id": model_id}
    (model_dir / "model_config.json").write_text(json.dumps(config))
    for name in ("inference.py", "photos.py"):
        shutil.copy(SCRIPTS / "inference" / name, model_dir / "code" / name)
    tarball = dest / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for item in sorted(model_dir.rglob("*")):
            tar.add(item, arcname=item.relative_to(model_dir).as_posix(), recursive=False)
    return tarball


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="session")
def abid_sample() -> Path:
    if not ABID_SAMPLE.is_dir():
        pytest.skip(f"real ABID sample not found at {ABID_SAMPLE}")
    return ABID_SAMPLE


@pytest.fixture
def invmon_home(tmp_path, monkeypatch) -> Path:
    """An isolated INVMON_HOME (runs, registry, step environments, cache) for one test."""
    home = tmp_path / "invmon-home"
    monkeypatch.setenv("INVMON_HOME", str(home))
    return home
