"""`invmon run --data s3://... --manifest s3://...` through the command line, against moto's server
on 127.0.0.1 holding a small ABID bucket (tests/abid_bucket.py), down to a registered model; and
what `--data`/`--manifest` refuse, each in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from abid_bucket import BUCKET, PREFIX, bucket_objects, fill_bucket, mirror_bytes
from aws_testing import aws_env, moto_server, patched_environ
from conftest import ROOT

from pipeline.cli import main
from pipeline.data import fetch

SOURCE = f"s3://{BUCKET}/{PREFIX}"
MANIFEST_KEY = "lists/file_list.json"
# The smallest training the command line allows: one trial of one epoch at 32 px, and a gate
# any model passes (the test is about the data's way in, not the model).
SMALL = ["TuningMaxJobs=1", "TrialEpochs=1", "Epochs=1", "ImageSize=32", "ResizeShortSide=40",
         "AccuracyThreshold=0"]
# The runner refuses this before any step: a run that records its parameters and stops at once.
REFUSED = ["--param", "StagingEndpointName=bin-count-production"]


@pytest.fixture(scope="module")
def dataset():
    return bucket_objects(per_count=4)


@pytest.fixture
def server(dataset):
    """moto's server on 127.0.0.1 with the bucket and the manifest as an object beside it."""
    objects, manifest, _ = dataset
    with moto_server() as url:
        env = aws_env(url)
        with patched_environ(env):
            s3 = boto3.client("s3")
            fill_bucket(s3, objects)
            s3.put_object(Bucket=BUCKET, Key=MANIFEST_KEY, Body=json.dumps(manifest).encode())
        yield env


def invmon(env: dict, *args: str) -> subprocess.CompletedProcess:
    """The `invmon` console script the environment installs (the package's entry point)."""
    script = Path(sys.executable).parent / "invmon"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]
    return subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_run_from_s3_data_and_an_s3_manifest_registers_a_model(server, dataset, tmp_path):
    objects, manifest, expected = dataset
    env = {**server, "INVMON_HOME": str(tmp_path / "home")}
    params = [a for p in SMALL for a in ("--param", p)]
    run = invmon(env, "run", "--data", SOURCE.rstrip("/"), "--manifest", f"s3://{BUCKET}/{MANIFEST_KEY}",
                 *params)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "registered model bin-count version 1 (PendingManualApproval)" in run.stdout

    listed = invmon(env, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (version,) = json.loads(listed.stdout)
    assert (version["version"], version["status"]) == (1, "PendingManualApproval")

    # The run kept the S3 URI and read the manifest's own bytes (copied, named by content).
    (run_dir,) = (tmp_path / "home" / "runs").iterdir()
    state = json.loads((run_dir / "run.json").read_text())
    assert state["parameters"]["InputDataUrl"] == SOURCE.rstrip("/")
    copied = Path(state["parameters"]["ManifestUrl"])
    assert copied.parent == tmp_path / "home" / "data" / "manifests"
    assert json.loads(copied.read_text()) == manifest
    # Exactly the listed objects were mirrored (the unlisted photo never read), and Preprocess
    # judged them: the manifest's mismatch and every damaged photo rejected, the rest split.
    (mirror,) = (tmp_path / "home" / "data" / "s3").iterdir()
    assert "bin-images/y_unlisted.jpg" not in mirror_bytes(mirror)
    assert mirror_bytes(mirror)["bin-images/x_dup_a.jpg"] == objects[f"{PREFIX}bin-images/x_dup_a.jpg"]
    report = json.loads((run_dir / "Preprocess" / "processing" / "output" / "report"
                         / "data_report.json").read_text())
    kinds = {(r["id"], r["kind"]) for r in report["rejections"]}
    assert {("x_mismatch", "manifest_mismatch"), ("x_corrupt", "corrupt"), ("x_trunc", "truncated"),
            ("x_nometa", "unlabelled"), ("x_pngbomb", "too_large")} <= kinds
    assert report["totals"]["valid"] == len(expected["good"]) + 2  # + the duplicate pair


@pytest.mark.parametrize("option, value, message", [
    ("--data", "s3:/abid-mirror", "--data 's3:/abid-mirror' is not a valid S3 URI: expected s3://bucket/prefix/"),
    ("--data", "s3://", "--data 's3://' is not a valid S3 URI: expected s3://bucket/prefix/"),
    ("--data", "s3://Abid_Mirror/x/", "is not a valid S3 URI"),
    ("--data", "S3://abid-mirror/", "is not a valid S3 URI"),
    ("--data", "https://example.com/abid/", "only s3:// URIs and local paths are read, not https:"),
    ("--data", "~/no-such-photos", "--data ~/no-such-photos: no such folder"),
    ("--data", "{file}", "not a folder"),
    ("--manifest", "s3://abid-mirror/", "--manifest 's3://abid-mirror/' names no object"),
    ("--manifest", "s3:/abid-mirror/list.json", "is not a valid S3 URI: expected s3://bucket/key.json"),
    ("--manifest", "~/no-such-list.json", "--manifest ~/no-such-list.json: no such file"),
    ("--manifest", "{folder}", "not a file"),
])
def test_a_bad_location_is_one_line_and_exit_2(option, value, message, tmp_path, invmon_home, monkeypatch,
                                              capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # what ~ means here
    (tmp_path / "photo.jpg").write_bytes(b"x")
    value = value.format(file=tmp_path / "photo.jpg", folder=tmp_path)
    code = main(["run", option, value])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("invmon: error: ") and message in err, err
    assert "Traceback" not in err and out == ""
    assert not (invmon_home / "runs").exists(), "a refused command line started a run"


def test_local_paths_expand_the_home_folder(tmp_path, invmon_home, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos" / "1").mkdir(parents=True)
    (tmp_path / "list.json").write_text('{"1": []}')
    code = main(["run", "--data", "~/photos", "--manifest", "~/list.json", *REFUSED])
    capsys.readouterr()
    assert code == 1  # refused by the runner, after the parameters were recorded
    (state,) = [json.loads(p.read_text()) for p in (invmon_home / "runs").glob("*/run.json")]
    assert state["parameters"]["InputDataUrl"] == str(tmp_path / "photos")
    assert state["parameters"]["ManifestUrl"] == str(tmp_path / "list.json")


def test_an_s3_manifest_that_cannot_be_read_fails_in_one_line(server, invmon_home, monkeypatch, capsys):
    with patched_environ({**server, "INVMON_HOME": str(invmon_home)}):
        code = main(["run", "--data", SOURCE, "--manifest", f"s3://{BUCKET}/lists/none.json"])
        out, err = capsys.readouterr()
        assert (code, out) == (1, "")
        assert err == f"invmon: error: manifest s3://{BUCKET}/lists/none.json does not exist\n"
        # A hostile size is refused from the object's length, before its body is read.
        monkeypatch.setattr(fetch.ingest().abid, "MAX_MANIFEST_BYTES", 64)
        code = main(["run", "--data", SOURCE, "--manifest", f"s3://{BUCKET}/{MANIFEST_KEY}"])
        out, err = capsys.readouterr()
    assert code == 1
    assert err == f"invmon: error: manifest s3://{BUCKET}/{MANIFEST_KEY} is over the 64-byte limit\n"
    assert not (invmon_home / "runs").exists()


def test_the_manifest_copy_is_named_by_its_bytes(server, tmp_path):
    """A changed object is a new copy (a run keyed on the old bytes is never reused for it)."""
    uri = f"s3://{BUCKET}/{MANIFEST_KEY}"
    with patched_environ(server):
        first = fetch.manifest_location(tmp_path, uri, echo=lambda m: None)
        again = fetch.manifest_location(tmp_path, uri, echo=lambda m: None)
        boto3.client("s3").put_object(Bucket=BUCKET, Key=MANIFEST_KEY, Body=b'{"2": []}')
        changed = fetch.manifest_location(tmp_path, uri, echo=lambda m: None)
    assert first == again and changed != first
    assert changed.read_bytes() == b'{"2": []}'
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no partial copies
