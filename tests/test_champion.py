"""The champion against the challenger on the same photos (scripts/evaluate/champion.py).

Two models trained for real (train.py) on different generated photos: the champion is
registered, the challenger evaluated. Evaluate must score the champion on the challenger's test
photos, with the champion's own code/inference.py, after checking its bytes against the SHA-256
the registry recorded; the report's change column compares the two on those photos, with a
paired interval. Where the champion cannot be scored, the report says why instead, and the step
still succeeds. Both registries: the local runner's listing, and SageMaker's under moto."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from aws_testing import BUCKET, REGION, aws_env, patched_environ
from conftest import ROOT, import_script
from pipeline.local.jobs import tar_model
from test_train import run_train, write_split

SCRIPT = ROOT / "scripts" / "evaluate" / "evaluate.py"
champion = import_script("evaluate", "champion")
evaluate = import_script("evaluate", "evaluate")
previous = import_script("evaluate", "previous")
TEST_PER_CLASS = 6
# Recorded with the champion at its registration, measured on its own test split: never compared.
RECORDED = {"multiclass_classification_metrics": {"accuracy": {"value": 0.987}},
            "regression_metrics": {"rmse": {"value": 0.111}}}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(root: Path, seed: int) -> Path:
    """A real small training run (resnet18 at 32 px, 8 epochs) on its own generated photos."""
    data = {"train": write_split(root / "train", 24, seed=seed),
            "validation": write_split(root / "validation", 4, seed=seed + 1)}
    run_train(root, data, "--arch", "resnet18", "--image_size", "32", "--batch_size", "32", "--lr", "0.02",
              "--epochs", "8", "--checkpoint_dir", "none", "--pretrained", "none")
    return tar_model(root / "model", root / "model.tar.gz")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The champion and the challenger, trained on different photos, and the challenger's test split."""
    root = tmp_path_factory.mktemp("champion")
    return {"champion": train(root / "champion", seed=11), "challenger": train(root / "challenger", seed=31),
            "test": write_split(root / "test", TEST_PER_CLASS, seed=3)}


def photos_of(test: Path) -> list[Path]:
    return sorted(p for p in test.glob("*/*.jpg"))


def direct_counts(tarball: Path, photos: list[Path], tmp: Path) -> list[int]:
    """Each photo through the artifact's own input_fn and predict_fn, loaded as an endpoint loads it."""
    folder = tmp / f"direct-{sha256(tarball)[:12]}"
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    spec = importlib.util.spec_from_file_location(f"direct_{folder.name.replace('-', '_')}",
                                                  folder / "code" / "inference.py")
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    model = inference.model_fn(str(folder))
    return [int(inference.predict_fn(inference.input_fn(p.read_bytes(), "image/jpeg"), model)["count"])
            for p in photos]


def listing(path: Path, *versions: dict) -> dict:
    path.write_text(json.dumps({"group": "bin-count", "versions": list(versions)}))
    return {previous.LISTING_ENV: str(path)}


def version(number: int, tarball: Path | str, digest: str | None, status: str = "Approved") -> dict:
    return {"version": number, "status": status, "evaluation": RECORDED, "artifact": str(tarball),
            "sha256": digest if digest is not None else sha256(Path(tarball))}


def run_in_process(monkeypatch, env: dict, *args) -> dict:
    """evaluate.main in this process: evaluation.json, with report.html's text under "_page"."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = Path(args[args.index("--output") + 1])
    assert evaluate.main([*map(str, args), "--corruptions", "none", "--model-package-group", "bin-count"]) == 0
    written = json.loads((out / "evaluation.json").read_text())
    written["_page"] = (out / "report.html").read_text()
    return written


def repacked(tarball: Path, dest: Path, edit) -> Path:
    """A copy of the artifact with `edit(folder)` applied to its extracted files, packed again."""
    folder = dest / "model"
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    edit(folder)
    return tar_model(folder, dest / "model.tar.gz")


# --------------------------------------------------------------------------- the comparison


@pytest.mark.slow
def test_the_champion_is_rescored_on_the_challengers_test_photos(models, tmp_path):
    """The job as its container runs it, with the runner's listing: the champion (version 1,
    Approved, trained on other photos) is scored on the challenger's test split."""
    env = {**os.environ, **listing(tmp_path / "registry.json",
                                   version(1, models["champion"], None),
                                   version(2, tmp_path / "absent.tar.gz", "0" * 64, "PendingManualApproval"))}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(models["challenger"]), "--test",
                           str(models["test"]), "--output", str(out), "--corruptions", "none", "--seed", "4",
                           "--model-package-group", "bin-count"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    written = json.loads((out / "evaluation.json").read_text())
    before = written["previous_version"]
    assert (before["version"], before["status"]) == (1, "Approved") and "note" not in before
    assert before["artifact"] == {"uri": str(models["champion"]), "sha256": sha256(models["champion"])}
    assert before["recorded_metrics"] == {"accuracy": 0.987, "rmse": 0.111}

    # Scored on exactly the challenger's test photos, with what the champion's own code answers.
    photos = photos_of(models["test"])
    assert before["these_photos"]["photos"] == written["test_images"] == len(photos) == 5 * TEST_PER_CLASS
    truth = np.array([int(p.parent.name) for p in photos])
    theirs = np.array(direct_counts(models["champion"], photos, tmp_path))
    ours = np.array(direct_counts(models["challenger"], photos, tmp_path))
    assert np.any(theirs != ours), "two models trained on different photos should not answer alike"
    champion_accuracy = float(np.mean(theirs == truth))
    assert before["these_photos"]["accuracy"]["value"] == pytest.approx(champion_accuracy, abs=1e-6)
    champion_rmse = float(np.sqrt(np.mean((theirs - truth) ** 2)))
    assert before["these_photos"]["rmse"]["value"] == pytest.approx(champion_rmse, abs=1e-6)

    # The change is challenger minus champion on these photos, not minus the recorded numbers.
    ours_accuracy = written["multiclass_classification_metrics"]["accuracy"]["value"]
    assert ours_accuracy == pytest.approx(float(np.mean(ours == truth)), abs=1e-6)
    difference = before["difference"]
    assert difference["photos"] == len(photos)
    assert difference["accuracy"]["value"] == pytest.approx(ours_accuracy - champion_accuracy, abs=1e-6)
    assert difference["rmse"]["value"] == pytest.approx(
        written["regression_metrics"]["rmse"]["value"] - champion_rmse, abs=1e-5)
    for name in ("accuracy", "rmse"):
        low, high = difference[name]["interval"]
        assert low <= difference[name]["value"] <= high and low < high
    assert difference["only_this_model_right"] == int(np.sum((ours == truth) & (theirs != truth)))
    assert difference["only_previous_right"] == int(np.sum((ours != truth) & (theirs == truth)))
    assert "seed 4" in difference["interval"]
    assert f"compared with: bin-count 1, Approved on the same {len(photos)} photos" in done.stdout

    page = (out / "report.html").read_text()
    assert "previous version (1, Approved) on these photos" in page
    assert f"{difference['accuracy']['value']:+.4f}</span> [{difference['accuracy']['interval'][0]:+.4f}, " in page
    assert f"{ours_accuracy - 0.987:+.4f}" not in page  # nothing is compared with other photos' numbers


@pytest.mark.slow
def test_the_champion_runs_its_own_serving_code(models, tmp_path, monkeypatch):
    """A champion whose code/photos.py decodes photos with their colours inverted: Evaluate must
    get the answers that code gives, so it runs the champion's inference.py and its siblings, not
    the modules the challenger's inference.py already imported."""
    inverted = ("\n_served_decode = decode\n\n\ndef decode(*args, **kwargs):\n"
                "    return ImageOps.invert(_served_decode(*args, **kwargs))\n")
    champion_code = repacked(models["champion"], tmp_path / "inverted",
                             lambda d: (d / "code" / "photos.py").write_text((d / "code" / "photos.py").read_text() + inverted))
    written = run_in_process(monkeypatch, listing(tmp_path / "registry.json", version(1, champion_code, None)),
                             "--model", models["challenger"], "--test", models["test"], "--output", tmp_path / "out")
    photos = photos_of(models["test"])
    truth = np.array([int(p.parent.name) for p in photos])
    own, plain = (np.array(direct_counts(t, photos, tmp_path)) for t in (champion_code, models["champion"]))
    assert float(np.mean(own == truth)) != float(np.mean(plain == truth))
    assert written["previous_version"]["these_photos"]["accuracy"]["value"] == pytest.approx(
        float(np.mean(own == truth)), abs=1e-6)
    # Its modules are gone again: a later artifact imports its own.
    assert not [m for m in sys.modules if m.startswith(evaluate.CHAMPION_MODULE)]


# --------------------------------------------------------------------------- not scored: a note


@pytest.mark.slow
def test_a_swapped_artifact_is_not_loaded_and_the_report_says_so(models, tmp_path, monkeypatch):
    """The file at the registered path is not the registered bytes: its code must not run (it
    would write a marker), no difference is printed, the step succeeds."""
    marker = tmp_path / "champion-code-ran"
    monkeypatch.setenv("CHAMPION_MARKER", str(marker))
    trojan = repacked(models["champion"], tmp_path / "trojan", lambda d: (d / "code" / "inference.py").write_text(
        (d / "code" / "inference.py").read_text()
        + "\nimport pathlib\npathlib.Path(os.environ['CHAMPION_MARKER']).write_text('ran')\n"))
    served = tmp_path / "registered" / "model.tar.gz"
    served.parent.mkdir()
    shutil.copy(trojan, served)
    recorded = sha256(models["champion"])  # what the registry recorded: the champion's bytes
    written = run_in_process(monkeypatch, listing(tmp_path / "registry.json", version(1, served, recorded)),
                             "--model", models["challenger"], "--test", models["test"], "--output", tmp_path / "out")
    before = written["previous_version"]
    assert not marker.exists()
    assert "these_photos" not in before and "difference" not in before
    assert before["note"] == (f"version 1 (Approved) was not scored on these photos: its artifact {served} has "
                              f"SHA-256 {sha256(trojan)}, the registry recorded {recorded}: not the registered "
                              f"artifact, so it was not loaded")
    assert written["multiclass_classification_metrics"]["accuracy"]["value"] >= 0  # the evaluation itself
    page = written["_page"]
    assert ("No change is shown against the previous version (1, Approved): version 1 (Approved) was not "
            "scored on these photos: its artifact ") in page and "not the registered artifact, so it was not loaded." in page
    assert "on these photos</th>" not in page and "change (this run" not in page
    assert "measured on its own test split (other photos, not comparable with this run's): accuracy 0.9870" in page

    # The control: the same bytes, registered as they are, do run (the marker works).
    run_in_process(monkeypatch, listing(tmp_path / "registry.json", version(1, served, None)),
                   "--model", models["challenger"], "--test", models["test"], "--output", tmp_path / "control")
    assert marker.read_text() == "ran"


def broken_import(d: Path) -> None:
    (d / "code" / "inference.py").write_text("raise RuntimeError('needs a package this job lacks')\n")


def other_labels(d: Path) -> None:
    config = json.loads((d / "model_config.json").read_text())
    (d / "model_config.json").write_text(json.dumps({**config, "labels": [0, 1, 2, 3, 4]}))


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("no digest", "the registry records no SHA-256 of its artifact, so the artifact cannot be verified "
                   "and was not loaded"),
    ("missing", "its artifact {uri} is not there"),
    ("other labels", "it counts with other class labels ([0, 1, 2, 3, 4]) than this model ([1, 2, 3, 4, 5]): "
                      "its answers are not comparable"),
    ("code fails", "the artifact's code/inference.py failed to import (RuntimeError: needs a package this job lacks)"),
    ("no artifact", "the registry records no artifact for it"),
])
def test_a_champion_that_cannot_be_scored_is_a_note(models, tmp_path, monkeypatch, case, expected):
    tarball = models["champion"]
    if case == "missing":
        tarball = tmp_path / "gone" / "model.tar.gz"
    elif case == "other labels":
        tarball = repacked(models["champion"], tmp_path / "labels", other_labels)
    elif case == "code fails":
        tarball = repacked(models["champion"], tmp_path / "broken", broken_import)
    entry = version(1, tarball, "" if case == "no digest" else ("0" * 64 if case == "missing" else None))
    if case == "no artifact":
        entry = {k: v for k, v in entry.items() if k not in ("artifact", "sha256")}
    written = run_in_process(monkeypatch, listing(tmp_path / "registry.json", entry),
                             "--model", models["challenger"], "--test", models["test"], "--output", tmp_path / "out")
    before = written["previous_version"]
    assert before["note"] == "version 1 (Approved) was not scored on these photos: " + expected.format(uri=tarball)
    assert "difference" not in before and before["recorded_metrics"]["accuracy"] == 0.987
    assert "No change is shown against the previous version (1, Approved)" in written["_page"]


# --------------------------------------------------------------------------- the interval


def test_the_paired_interval():
    truth = np.repeat([1, 2, 3, 4, 5], 20)
    # Two models that differ on one photo of 100: a paired interval is narrow (an unpaired one,
    # resampling each model's photos apart, would be about +-0.13 wide at this accuracy).
    a = truth.copy()
    a[::2] = np.where(truth[::2] == 5, 4, truth[::2] + 1)  # half right, each miss off by one
    b = a.copy()
    b[1] = 2  # truth[1] is 1: the challenger gets it, the champion does not
    d = champion.paired_difference(truth, a, b, seed=0)
    assert d["accuracy"]["value"] == pytest.approx(0.01)
    low, high = d["accuracy"]["interval"]
    assert low == 0.0 and 0.01 <= high <= 0.04  # the photo drawn 0 to about 3 times in 100
    assert d["rmse"]["value"] == pytest.approx(np.sqrt(0.5) - np.sqrt(0.51), abs=1e-6)
    assert (d["only_this_model_right"], d["only_previous_right"]) == (1, 0)
    assert d == champion.paired_difference(truth, a, b, seed=0)  # seeded
    same = champion.paired_difference(truth, a, a, seed=3)
    assert same["accuracy"] == {"value": 0.0, "interval": [0.0, 0.0]} and same["rmse"] == {"value": 0.0, "interval": [0.0, 0.0]}
    # Challenger right everywhere, champion on half: +0.5, an interval around it that leaves out 0.
    d = champion.paired_difference(truth, truth, a, seed=1)
    assert d["accuracy"]["value"] == 0.5 and 0.35 < d["accuracy"]["interval"][0] < 0.5 < d["accuracy"]["interval"][1] < 0.65
    assert d["rmse"]["value"] == pytest.approx(-np.sqrt(0.5)) and d["rmse"]["interval"][1] < 0
    assert (d["only_this_model_right"], d["only_previous_right"]) == (50, 0)
    with pytest.raises(ValueError):
        champion.paired_difference([], [], [], seed=0)


# --------------------------------------------------------------------------- SageMaker, under moto


@pytest.fixture
def sagemaker(monkeypatch):
    import boto3
    from moto import mock_aws

    monkeypatch.delenv(previous.LISTING_ENV, raising=False)
    with patched_environ(aws_env()), mock_aws():
        session = boto3.Session(region_name=REGION)
        s3 = session.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        sm = session.client("sagemaker")
        sm.create_model_package_group(ModelPackageGroupName="bin-count")
        yield sm, s3


def register(sm, s3, key: str, body: bytes, digest: str, status: str = "Approved") -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    s3.put_object(Bucket=BUCKET, Key=f"{key}.evaluation.json", Body=json.dumps(RECORDED))
    sm.create_model_package(
        ModelPackageGroupName="bin-count", ModelApprovalStatus=status,
        InferenceSpecification={"Containers": [{"Image": "123.dkr.ecr.us-east-1.amazonaws.com/x:1",
                                                "ModelDataUrl": f"s3://{BUCKET}/{key}"}],
                                "SupportedContentTypes": ["image/jpeg"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        ModelMetrics={"ModelQuality": {"Statistics": {"ContentType": "application/json",
                                                      "S3Uri": f"s3://{BUCKET}/{key}.evaluation.json"}}},
        CustomerMetadataProperties={previous.DIGEST_PROPERTY: digest})


@pytest.mark.slow
def test_on_sagemaker_the_packages_artifact_is_fetched_checked_and_scored(models, sagemaker, tmp_path):
    sm, s3 = sagemaker
    key = "bin-count/exec-1/Train/pipelines-abc-Train-1/output/model.tar.gz"
    body = models["champion"].read_bytes()
    register(sm, s3, key, body, sha256(models["champion"]))
    args = ["--model", str(models["challenger"]), "--test", str(models["test"]), "--corruptions", "none",
            "--model-package-group", "bin-count"]
    assert evaluate.main([*args, "--output", str(tmp_path / "out")]) == 0
    before = json.loads((tmp_path / "out" / "evaluation.json").read_text())["previous_version"]
    assert before["artifact"] == {"uri": f"s3://{BUCKET}/{key}", "sha256": sha256(models["champion"])}
    assert before["recorded_metrics"] == {"accuracy": 0.987, "rmse": 0.111}
    photos = photos_of(models["test"])
    truth = np.array([int(p.parent.name) for p in photos])
    theirs = np.array(direct_counts(models["champion"], photos, tmp_path))
    assert before["these_photos"]["photos"] == len(photos)
    assert before["these_photos"]["accuracy"]["value"] == pytest.approx(float(np.mean(theirs == truth)), abs=1e-6)
    assert "difference" in before

    # A newer Approved package whose object is not the recorded bytes: a note, no score.
    swapped = "bin-count/exec-2/Train/pipelines-abc-Train-2/output/model.tar.gz"
    register(sm, s3, swapped, models["challenger"].read_bytes(), sha256(models["champion"]))
    assert evaluate.main([*args, "--output", str(tmp_path / "swapped")]) == 0
    before = json.loads((tmp_path / "swapped" / "evaluation.json").read_text())["previous_version"]
    assert before["version"] == 2 and "these_photos" not in before
    assert before["note"].startswith(f"version 2 (Approved) was not scored on these photos: its artifact "
                                     f"s3://{BUCKET}/{swapped} has SHA-256 {sha256(models['challenger'])}")

    # An object that is not there: a note naming the error, and the step still succeeds.
    s3.delete_object(Bucket=BUCKET, Key=swapped)
    assert evaluate.main([*args, "--output", str(tmp_path / "gone")]) == 0
    note = json.loads((tmp_path / "gone" / "evaluation.json").read_text())["previous_version"]["note"]
    assert f"its artifact s3://{BUCKET}/{swapped} could not be read (NoSuchKey" in note


def test_the_pipeline_role_may_read_the_registered_artifacts():
    """The Evaluate job reads the champion's model.tar.gz (Train's output, in the artifact bucket)
    under the pipeline role, as it reads its evaluation.json."""
    import yaml

    from iam_policies import STACK, allowed, resolve
    from test_infra import TEMPLATE, CfnLoader, policies

    template = yaml.load(TEMPLATE.read_text(), Loader=CfnLoader)
    role = [resolve(template, d) for name, d in policies(template) if name == "PipelineRole"]
    bucket = f"arn:aws:s3:::{STACK['ArtifactBucketName']}"
    assert allowed(role, "s3:GetObject", f"{bucket}/bin-count/exec-1/Train/pipelines-abc-Train-1/output/model.tar.gz")
    assert not allowed(role, "s3:GetObject", "arn:aws:s3:::another-bucket/model.tar.gz")


def test_the_registry_and_the_script_name_the_digest_alike():
    from pipeline.registry.local import DIGEST_PROPERTY

    assert previous.DIGEST_PROPERTY == DIGEST_PROPERTY
