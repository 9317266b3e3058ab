"""scripts/evaluate: run as its container runs it, on real ABID photos and a real model artifact."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, import_script, make_artifact
from in_process import run_main
from steps.evaluate import ACCURACY_PATH

SCRIPT = ROOT / "scripts" / "evaluate" / "evaluate.py"
PER_CLASS = 3
CORRUPTIONS = ("blur", "noise", "low_light", "jpeg")


def run_evaluate(*args, check: bool = True, process: bool = False) -> subprocess.CompletedProcess:
    """evaluate.py as its container runs it (a process) when `process`, else its main() here."""
    if process:
        result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                                capture_output=True, text=True, timeout=300)
    else:
        result = run_main(import_script("evaluate", "evaluate").main, *args)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real artifact whose random init gives varied counts on ABID photos (a ResNet-18, seed 3),
    so that comparing predictions means something; a randomly initialised EfficientNet answers one
    count for everything."""
    dest = tmp_path_factory.mktemp("eval-artifact")
    make_artifact(dest, arch="resnet18", seed=3, model_id="seeded-model")
    return dest


@pytest.fixture(scope="module")
def test_split(tmp_path_factory, bin_photos) -> Path:
    """Bin photos (real ABID when ../shared has them) in <count>/ folders, one as PNG, one corrupt file, and entries to ignore."""
    split = tmp_path_factory.mktemp("test-split")
    for count in range(1, 6):
        (split / str(count)).mkdir()
        photos = sorted((bin_photos / str(count)).glob("*.jpg"))[:PER_CLASS + 1]
        for photo in photos[:PER_CLASS]:
            (split / str(count) / photo.name).write_bytes(photo.read_bytes())
    extra = sorted((bin_photos / "2").glob("*.jpg"))[PER_CLASS]
    Image.open(extra).save(split / "2" / (extra.stem + ".png"))
    # A truncated JPEG: what a broken upload looks like.
    first = sorted((bin_photos / "3").glob("*.jpg"))[0].read_bytes()
    (split / "3" / "corrupt.jpg").write_bytes(first[:300])
    (split / "manifest.csv").write_text("id,count\n")
    (split / "9").mkdir()  # not a class 1..5: ignored
    (split / "9" / "x.jpg").write_bytes(first)
    return split


@pytest.fixture(scope="module")
def evaluated(model_dir, test_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    result = run_evaluate("--model", model_dir, "--test", test_split, "--output", out,
                          "--batch-size", 4, "--seed", 5, process=True)
    report = json.loads((out / "evaluation.json").read_text())
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    return report, rows, result.stdout


def get_path(report: dict, dotted: str):
    for key in dotted.split("."):
        report = report[key]
    return report


def load_served_model(model_dir: Path):
    """The artifact's own code/inference.py and model_fn, as an endpoint loads them."""
    code = model_dir / "model" / "code" / "inference.py"
    spec = importlib.util.spec_from_file_location("direct_inference", code)
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    return inference, inference.model_fn(str(model_dir / "model"))


@pytest.mark.slow
def test_report_has_the_sagemaker_model_quality_layout(evaluated):
    report, _, stdout = evaluated
    accuracy = get_path(report, ACCURACY_PATH)
    assert 0.0 <= accuracy <= 1.0
    mcm = report["multiclass_classification_metrics"]
    assert set(mcm["accuracy"]) == {"value", "standard_deviation"}
    assert set(report["regression_metrics"]["rmse"]) == {"value", "standard_deviation"}
    assert set(report["per_class"]) == {"1", "2", "3", "4", "5"}
    assert set(report["robustness"]) == set(CORRUPTIONS)
    for result in report["robustness"].values():
        # Every miss is off by 1 to 4 counts, so RMSE is pinned between sqrt and 4 x sqrt of the
        # error rate: a report whose RMSE and accuracy disagree fails here.
        wrong = 1.0 - result["accuracy"]
        assert wrong ** 0.5 - 1e-6 <= result["rmse"] <= 4 * wrong ** 0.5 + 1e-6
    assert report["model_id"] == "seeded-model"
    # Binomial standard error of the accuracy, as documented.
    n = report["test_images"]
    assert mcm["accuracy"]["standard_deviation"] == pytest.approx(
        np.sqrt(accuracy * (1 - accuracy) / n), abs=1e-6)
    assert f"accuracy={accuracy}" in stdout


@pytest.mark.slow
def test_counts_confusion_matrix_and_skipped_file(evaluated):
    report, rows, stdout = evaluated
    n = 5 * PER_CLASS + 1  # plus the PNG; the corrupt file and folder 9/ are not scored
    assert report["test_images"] == n == len(rows)
    matrix = report["multiclass_classification_metrics"]["confusion_matrix"]
    assert sum(sum(row.values()) for row in matrix.values()) == n
    supports = {label: c["support"] for label, c in report["per_class"].items()}
    assert supports == {"1": 3, "2": 4, "3": 3, "4": 3, "5": 3}
    assert {label: sum(row.values()) for label, row in matrix.items()} == supports
    # Always answering 2 (4 of 16 photos) is the best constant for accuracy; always 3 for RMSE:
    # squared errors 3x4 + 4x1 + 3x0 + 3x1 + 3x4 = 31 over 16 photos, against 45 for always 2.
    assert report["constant_answer_baselines"] == {
        "majority": {"answer": 2, "accuracy": 0.25, "rmse": round((45 / 16) ** 0.5, 6)},
        "lowest_rmse": {"answer": 3, "accuracy": 0.1875, "rmse": round((31 / 16) ** 0.5, 6)}}
    assert "always answering 2: accuracy 0.2500; the lowest rmse of a constant answer: 1.3919 (always 3)" in stdout
    assert [s["path"] for s in report["skipped"]] == ["3/corrupt.jpg"]
    assert "not a decodable" in report["skipped"][0]["reason"]
    assert "skipped 3/corrupt.jpg" in stdout
    assert "9/x.jpg" not in {r["path"] for r in rows}


@pytest.mark.slow
def test_metrics_equal_direct_predict_fn_on_the_same_photos(evaluated, model_dir, test_split):
    """Load the artifact the endpoint's way and predict photo by photo: same numbers."""
    report, rows, _ = evaluated
    inference, model = load_served_model(model_dir)
    y_true, y_pred = [], []
    for row in rows:
        path = test_split / row["path"]
        ctype = "image/png" if path.suffix == ".png" else "image/jpeg"
        y_true.append(int(row["label"]))
        y_pred.append(inference.predict_fn(inference.input_fn(path.read_bytes(), ctype), model)["count"])
    assert y_pred == [int(r["prediction"]) for r in rows]
    assert len(set(y_pred)) > 1, "the seeded artifact should not predict one count for every photo"
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    assert get_path(report, ACCURACY_PATH) == pytest.approx(np.mean(y_true == y_pred), abs=1e-6)
    rmse = np.sqrt(np.mean((y_true - y_pred) ** 2))
    assert report["regression_metrics"]["rmse"]["value"] == pytest.approx(rmse, abs=1e-6)
    matrix = report["multiclass_classification_metrics"]["confusion_matrix"]
    for t in range(1, 6):
        for p in range(1, 6):
            assert matrix[str(t)][str(p)] == int(np.sum((y_true == t) & (y_pred == p)))
        mask = y_true == t
        per_class = report["per_class"][str(t)]
        assert per_class["accuracy"] == pytest.approx(np.mean(y_pred[mask] == t), abs=1e-6)
        assert per_class["rmse"] == pytest.approx(np.sqrt(np.mean((y_pred[mask] - t) ** 2)), abs=1e-6)
    for kind in CORRUPTIONS:
        corrupted = np.array([int(r[kind]) for r in rows])
        expected = np.mean(corrupted == y_true)
        assert report["robustness"][kind]["accuracy"] == pytest.approx(expected, abs=1e-6)
    # The corruptions reach the model: at least one changes some answer.
    assert any(r[kind] != r["prediction"] for r in rows for kind in CORRUPTIONS)


@pytest.mark.slow
def test_corruptions_are_deterministic_and_independent_of_batch_size(evaluated, model_dir,
                                                                     test_split, tmp_path):
    report, rows, _ = evaluated
    run_evaluate("--model", model_dir / "model.tar.gz", "--test", test_split, "--output", tmp_path,
                 "--batch-size", 7, "--seed", 5, "--corruptions", "noise")
    again = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(again["robustness"]) == {"noise"}
    assert again["robustness"]["noise"] == report["robustness"]["noise"]
    assert again["multiclass_classification_metrics"] == report["multiclass_classification_metrics"]
    assert again["regression_metrics"] == report["regression_metrics"]


def test_missing_model_or_test_set_fails_with_a_clear_message(tmp_path, test_split, tiny_artifact):
    missing = run_evaluate("--model", tmp_path / "nope", "--test", test_split,
                           "--output", tmp_path / "out", check=False, process=True)
    assert missing.returncode != 0
    assert "--model" in missing.stderr and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr

    (tmp_path / "empty-model").mkdir()
    no_tarball = run_evaluate("--model", tmp_path / "empty-model", "--test", test_split, check=False)
    assert no_tarball.returncode != 0 and "no model.tar.gz" in no_tarball.stderr

    (tmp_path / "empty-test" / "1").mkdir(parents=True)
    empty = run_evaluate("--model", tiny_artifact, "--test", tmp_path / "empty-test",
                         "--output", tmp_path / "out", "--corruptions", "none", check=False)
    assert empty.returncode != 0 and "no photos" in empty.stderr and "Traceback" not in empty.stderr
    assert not (tmp_path / "out" / "evaluation.json").exists()

    bad = run_evaluate("--model", tiny_artifact, "--test", test_split, "--corruptions", "fog",
                       check=False)
    assert bad.returncode != 0 and "unknown fog" in bad.stderr


def test_unsafe_tarball_is_refused(tmp_path, test_split):
    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = run_evaluate("--model", tarball, "--test", test_split, "--output", tmp_path / "out",
                          check=False)
    assert result.returncode != 0 and "unsafe member path '../escaped.txt'" in result.stderr
    assert not (tmp_path.parent / "escaped.txt").exists()
