"""scripts/monitor: run as its container runs it, on generated bin photos (pipeline/data/synth.py)
served by a real model through the real local endpoint with capture on, against the baseline that
the real Evaluate step wrote for that model.

A window of new photos of the same kind finds no drift; darkened or blurred photos are found; the
same window as SageMaker's data capture files (base64 bodies, embedded through --model) gets the
same verdicts; a capture of another model is refused in one line. `invmon monitor` runs the same
container against an endpoint's capture and alerts drift.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import ROOT, import_script, make_artifact
from in_process import run_main
from pipeline.cli import main
from pipeline.registry.local import BASELINE_PROPERTY, open_registry
from pipeline.serving.endpoint import ServingSettings, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MONITOR = ROOT / "scripts" / "monitor" / "monitor.py"
EVALUATE = ROOT / "scripts" / "evaluate" / "evaluate.py"
drift = import_script("monitor", "drift")
monitor_script = import_script("monitor", "monitor")
captures = import_script("monitor", "captures")


def run(script: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def synthetic_split(root: Path, seed: int, per_class: int) -> list[Path]:
    from pipeline.data import synth

    abid = root / f"abid-{seed}"
    synth.write_dataset(abid, per_class=per_class, seed=seed, workers=1)
    split = root / f"split-{seed}"
    for meta in sorted((abid / "metadata").glob("*.json")):
        count = json.loads(meta.read_text())["EXPECTED_QUANTITY"]
        (split / str(count)).mkdir(parents=True, exist_ok=True)
        shutil.copy(abid / "bin-images" / f"{meta.stem}.jpg", split / str(count) / f"{meta.stem}.jpg")
    return sorted(split.rglob("*.jpg"))


def dark(image: Image.Image) -> Image.Image:  # Evaluate's low-light corruption
    return Image.fromarray((0.35 * (np.asarray(image, np.float32) / 255) ** 1.5 * 255 + 0.5).astype(np.uint8))


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(2.5))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, its baseline from 400 test photos, and 100 new photos of the same kind.

    A baseline is a sample too: against one made from fewer photos (200: a reference of 100),
    new photos of the same kind got embedding p-values of 0.006 to 0.37 over 12 windows; with
    400, 0.25 to 0.99 (docs/monitoring.md, "A baseline is a sample")."""
    root = tmp_path_factory.mktemp("monitor")
    synthetic_split(root, seed=0, per_class=80)
    window = synthetic_split(root, seed=1, per_class=20)
    artifact = make_artifact(root / "model", seed=3, image_size=64, model_id="monitored-model")
    run(EVALUATE, "--model", artifact, "--test", root / "split-0", "--output", root / "evaluation",
        "--corruptions", "none")
    return {"root": root, "artifact": artifact, "baseline": root / "evaluation" / "baseline.json", "window": window}


def serve(artifact: Path, bodies: list[bytes], folder: Path, version: str = "bin-count/1") -> list[dict]:
    """POST every body to the local endpoint with capture on (bodies kept); its answers."""
    settings = ServingSettings(capture_dir=str(folder), capture_body_sample=1.0)
    with TestClient(create_app(artifact, model_version=version, settings=settings)) as client:
        answers = []
        for body in bodies:
            response = client.post("/invocations", content=body, headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200
            answers.append(response.json())
    return answers


@pytest.fixture(scope="module")
def windows(world):
    """The new photos as served: as they are, darkened, blurred (local capture folders)."""
    made = {}
    for name, change in (("same", None), ("dark", dark), ("blur", blur)):
        bodies = [p.read_bytes() if change is None else jpeg(change(Image.open(p).convert("RGB")))
                  for p in world["window"]]
        serve(world["artifact"], bodies, world["root"] / f"capture-{name}")
        made[name] = world["root"] / f"capture-{name}"
    return made


def monitor(world, capture: Path, out: Path, *extra, check: bool = True, process: bool = False):
    """monitor.py on a capture against the world's baseline; as a process when `process`."""
    args = ["--capture", capture, "--baseline", world["baseline"], "--output", out, *extra, "--permutations", 500]
    result = run(MONITOR, *args, check=check) if process else run_main(monitor_script.main, *args)
    if check:
        assert result.returncode == 0, result.stderr
    report = json.loads((out / "monitor.json").read_text()) if result.returncode == 0 else None
    return result, report


@pytest.mark.slow
def test_the_same_kind_of_photos_is_no_drift(world, windows, tmp_path):
    result, report = monitor(world, windows["same"], tmp_path, process=True)
    assert report["drift"] is False and report["drifted"] == []
    assert report["window"]["requests"] == 100 and report["window"]["by_source"] == {"local": 100}
    assert set(report["tests"]) == {"embeddings", "predicted_counts", "brightness", "contrast", "sharpness",
                                    "width", "height"}
    for name, test in report["tests"].items():
        assert test["verdict"] == "no_drift", (name, test)
        assert test["threshold"] == pytest.approx(0.05 / 7)
        assert test["window_size"] == 100 and test["p_value"] >= test["threshold"]
    assert report["tests"]["embeddings"]["reference_size"] == 200  # half the baseline's photos
    assert "drift=0" in result.stdout.splitlines()
    page = (tmp_path / "report.html").read_text()
    assert "Monitor: no drift" in page and page.count("data:image/png;base64,") == 7


@pytest.mark.slow
@pytest.mark.parametrize("shift, found", [("dark", {"embeddings", "brightness"}), ("blur", {"embeddings", "sharpness"})])
def test_darkened_or_blurred_photos_are_drift(world, windows, tmp_path, shift, found):
    result, report = monitor(world, windows[shift], tmp_path)
    assert report["drift"] is True and found <= set(report["drifted"])
    assert {"width", "height"}.isdisjoint(report["drifted"])  # the photos' sizes did not change
    embeddings = report["tests"]["embeddings"]
    assert embeddings["statistic"] > embeddings["critical_statistic"] and embeddings["p_value"] < embeddings["threshold"]
    assert "drift=1" in result.stdout.splitlines() and "Monitor: DRIFT in" in (tmp_path / "report.html").read_text()


def to_sagemaker(folder: Path, dest: Path, output_encoding: str = "JSON") -> Path:
    """The local capture's requests as SageMaker's data capture writes them: the body in base64,
    the model's JSON answer, the event's time; no statistics, no embedding."""
    dest.mkdir(parents=True)
    hour = dest / "bin-count-staging" / "AllTraffic" / "2025" / "06" / "01" / "10"
    hour.mkdir(parents=True)
    lines = [json.dumps(captures.as_sagemaker(json.loads(line), output_encoding))
             for path in sorted(folder.glob("capture-*.jsonl")) for line in path.read_text().splitlines()]
    half = len(lines) // 2  # two files, as two hours' captures would be
    (hour / "00-00-000-a.jsonl").write_text("\n".join(lines[:half]) + "\n")
    (hour / "30-00-000-b.jsonl").write_text("\n".join(lines[half:]) + "\n")
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("shift", ["same", "dark"])
def test_sagemaker_capture_files_get_the_same_verdicts(world, windows, tmp_path, shift):
    local = monitor(world, windows[shift], tmp_path / "local")[1]
    capture = to_sagemaker(windows[shift], tmp_path / "sagemaker", "JSON" if shift == "same" else "BASE64")
    _, report = monitor(world, capture, tmp_path / "out", "--model", world["artifact"],
                        "--model-version", "bin-count/1")
    assert report["window"]["by_source"] == {"sagemaker": 100}
    for name, test in report["tests"].items():
        assert test["verdict"] == local["tests"][name]["verdict"], name
        assert test["statistic"] == pytest.approx(local["tests"][name]["statistic"], rel=1e-3, abs=1e-6), name


@pytest.mark.slow
def test_sagemaker_capture_without_the_model_has_statistics_but_no_embedding_test(world, windows, tmp_path):
    capture = to_sagemaker(windows["dark"], tmp_path / "sagemaker")
    # Their answers name the version (bin-count/1), not the artifact: which version to take is said.
    refused, _ = monitor(world, capture, tmp_path / "refused", check=False)
    assert refused.returncode == 2 and "answered by model bin-count/1" in refused.stderr
    _, report = monitor(world, capture, tmp_path / "out", "--model-version", "bin-count/1")
    assert report["tests"]["embeddings"]["verdict"] == "no_data"
    assert "--model" in report["tests"]["embeddings"]["detail"]["reason"]
    assert report["tests"]["brightness"]["verdict"] == "drift"
    assert report["tests"]["brightness"]["threshold"] == pytest.approx(0.05 / 6)


@pytest.mark.slow
def test_a_capture_of_another_model_is_refused_in_one_line(world, tmp_path):
    other = make_artifact(tmp_path / "other", seed=4, image_size=64, model_id="another-model")
    serve(other, [p.read_bytes() for p in world["window"][:5]], tmp_path / "capture", version="bin-count/2")
    result, _ = monitor(world, tmp_path / "capture", tmp_path / "out", check=False, process=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "monitor: error: refused: 5 of the 5 captured requests were answered by model another-model, not by the "
        "baseline's model monitored-model: monitor a model against its own baseline (or pick its requests with "
        "--model-version)"]
    assert not (tmp_path / "out" / "monitor.json").exists()
    # --model must be the artifact the baseline was made from, byte for byte.
    result, _ = monitor(world, tmp_path / "capture", tmp_path / "out", "--model", other, check=False)
    assert result.returncode == 2 and "is not the artifact the baseline was made from" in result.stderr


@pytest.mark.slow
def test_model_version_picks_the_requests_of_one_version(world, windows, tmp_path):
    """A folder that holds two versions' requests (the endpoint was updated): each is monitored
    against its own baseline; asking for one it never served is refused."""
    mixed = tmp_path / "mixed"
    shutil.copytree(windows["same"], mixed)
    other = make_artifact(tmp_path / "other", seed=4, image_size=64, model_id="another-model")
    serve(other, [p.read_bytes() for p in world["window"][:5]], mixed, version="bin-count/2")
    _, report = monitor(world, mixed, tmp_path / "out", "--model-version", "bin-count/1")
    assert report["window"]["requests"] == 100 and report["drift"] is False
    result, _ = monitor(world, mixed, tmp_path / "out2", "--model-version", "bin-count/9", check=False)
    assert result.returncode == 2
    assert "no captured request of model version bin-count/9 in the window (found: bin-count/1 (100), bin-count/2 (5))" \
        in result.stderr


@pytest.mark.slow
def test_the_window_is_bounded_by_since_and_until(world, windows, tmp_path):
    records = [json.loads(line) for p in sorted(windows["same"].glob("*.jsonl")) for line in p.read_text().splitlines()]
    times = sorted(r["time"] for r in records)
    _, report = monitor(world, windows["same"], tmp_path, "--since", times[40], "--until", times[80])
    assert report["window"]["requests"] == 40 and report["window"]["skipped"] == {"outside the window": 60}
    _, empty = monitor(world, windows["same"], tmp_path / "empty", "--since", "2999-01-01")
    assert empty["window"]["requests"] == 0 and empty["drift"] is False
    assert {t["verdict"] for t in empty["tests"].values()} == {"no_data"}


@pytest.mark.slow
def test_bad_input_gets_one_line(world, windows, tmp_path):
    cases = {
        "no such file or folder": ("--capture", tmp_path / "nowhere"),
        "not a baseline.json": ("--baseline", world["root"] / "evaluation" / "evaluation.json"),
        "neither an ISO 8601 time nor a duration": ("--since", "yesterday"),
        "--alpha 2.0 refused": ("--alpha", "2"),
    }
    for expected, (flag, value) in cases.items():
        args = {"--capture": windows["same"], "--baseline": world["baseline"], "--output": tmp_path, flag: value}
        argv = [str(x) for pair in args.items() for x in pair]
        result = run_main(monitor_script.main, *argv)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    torn = tmp_path / "torn"
    torn.mkdir()
    text = next(windows["same"].glob("*.jsonl")).read_text()
    (torn / "capture-x.jsonl").write_text(text + text[:500])  # a last line cut short (a full disk)
    _, report = monitor(world, torn, tmp_path / "torn-out")
    assert report["window"]["skipped"] == {"unreadable line": 1}


# --------------------------------------------------------------------------- the tests themselves


def test_mmd_holds_its_false_alarm_rate_and_sees_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 8))
    alarms = sum(drift.mmd_test(reference, rng.normal(size=(100, 8)), 0.05, 199, seed)["p_value"] < 0.05
                 for seed in range(40))
    assert alarms <= 6  # 2 expected at 5%
    shifted = drift.mmd_test(reference, rng.normal(0.5, 1.0, size=(100, 8)), 0.05, 199)
    assert shifted["verdict"] == "drift" and shifted["p_value"] == pytest.approx(1 / 200)


def test_count_test_merges_sparse_counts():
    result = drift.counts_test({"1": 50, "2": 50, "3": 48, "4": 2, "5": 0}, [1] * 30 + [2] * 30 + [3] * 40, 0.01)
    assert result["detail"]["bins"] == ["1", "2", "3+4+5"] and result["verdict"] == "no_drift"
    assert drift.counts_test({"1": 100, "2": 100}, [2] * 100, 0.01)["verdict"] == "drift"


# -- `invmon monitor`: an endpoint's capture against the baseline registered with the version it
# serves, through the monitor's own step container; drift is alerted. Here, beside the tests
# themselves, so the model and its windows are made once.

@pytest.fixture
def endpoint(world, invmon_home):
    """bin-count-staging serves the monitored model, registered with its baseline."""
    registry = open_registry(invmon_home)
    version = registry.register("bin-count", str(world["artifact"]), {"accuracy": 0.5}, run_id="r1",
                                status="PendingManualApproval",
                                properties={BASELINE_PROPERTY: world["baseline"].resolve().as_uri()})
    registry.deploy("bin-count-staging", "bin-count", version.version, require_approved=False)
    return invmon_home


def captured(home, source):
    shutil.copytree(source, home / "capture" / "bin-count-staging")


@pytest.mark.slow
def test_a_darkened_window_is_drift_and_is_alerted(endpoint, windows, notifications_log, capsys):
    captured(endpoint, windows["dark"])
    assert main(["monitor", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["drift"] and "brightness" in result["drifted"]
    (alert,) = [json.loads(line) for line in notifications_log.read_text().splitlines()]
    assert alert["kind"] == "drift" and alert["endpoint"] == "bin-count-staging" and alert["version"] == 1
    assert main(["monitor", "--fail-on-drift"]) == 3
    assert "DRIFT in" in capsys.readouterr().out


@pytest.mark.slow
def test_the_same_kind_of_photos_is_quiet(endpoint, windows, notifications_log, capsys):
    captured(endpoint, windows["same"])
    assert main(["monitor", "--fail-on-drift"]) == 0
    out = capsys.readouterr().out
    assert "no drift" in out and "report: " in out
    assert not notifications_log.exists()


@pytest.mark.slow
def test_what_is_missing_is_said_in_one_line(endpoint, world, capsys):
    assert main(["monitor"]) == 1
    assert "no capture at" in capsys.readouterr().err
    assert main(["monitor", "--version", "1"]) == 2
    assert "give --capture DIR" in capsys.readouterr().err
    registry = open_registry(endpoint)
    registry.register("bin-count", str(world["artifact"]), {"accuracy": 0.5}, run_id="r2",
                      status="PendingManualApproval")
    assert main(["monitor", "--version", "2", "--capture", str(endpoint)]) == 1
    assert "bin-count/2 has no monitoring baseline" in capsys.readouterr().err
